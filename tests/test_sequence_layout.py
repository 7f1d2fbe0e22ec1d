"""How 3-D inputs are read: (B, C, L) signals or (B, T, D) sequences (``_internal.layout``).

The mask methods (RISE, Sobol, HSIC, meaningful perturbation, sound masks), CD, ACD and the
interaction groups must mask, tile and group the *steps* of a sequence model's input, and let the
user say which layout applies.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks._internal.layout import StepsLast, check_channels_first, reads_channels_first
from explain_callbacks.attribution import ATTRIBUTIONS
from explain_callbacks.interaction import ACD, INTERACTIONS
from explain_callbacks.interaction.contextual import ContextualDecomposition

T, D, STEP = 8, 3, 5


class StepReader(nn.Module):
    """(B, T, D) -> 2 logits; class 0 reads only step ``STEP`` (a positive projection of its features)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, 1, bias=False)
        with torch.no_grad():
            self.proj.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).squeeze(-1)  # (B, T)
        return torch.stack([h[:, STEP], -h.mean(1)], 1)


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(D, 6, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


def _inputs(b: int = 2) -> torch.Tensor:
    return torch.rand(b, T, D, generator=torch.Generator().manual_seed(0)) + 0.5


def test_layout_is_read_from_the_first_layer_unless_given():
    seq, sig = torch.randn(2, T, D), torch.randn(2, D, T)
    assert not reads_channels_first(GRUNet(), seq)
    assert not reads_channels_first(StepReader(), seq)
    assert not reads_channels_first(nn.TransformerEncoderLayer(D + 1, 1, 8, batch_first=True), torch.randn(2, T, D + 1))
    assert reads_channels_first(nn.Sequential(nn.Conv1d(D, 4, 3), nn.Flatten()), sig)
    assert reads_channels_first(nn.Sequential(nn.BatchNorm1d(D), nn.Flatten()), sig)
    # a flatten then Linear(C·L) reads signals (the Linear's width is not the last dim); no layer: signals
    assert reads_channels_first(nn.Sequential(nn.Flatten(), nn.Linear(D * T, 2)), sig)
    assert reads_channels_first(nn.Identity(), sig)
    assert reads_channels_first(GRUNet(), torch.randn(2, 1, D))  # one step: (B, 1, L) signals
    assert reads_channels_first(GRUNet(), seq, True) and not reads_channels_first(nn.Conv1d(D, 2, 1), sig, False)
    assert not reads_channels_first(nn.Conv1d(D, 2, 1), torch.randn(2, D, 4, 4))  # not 3-D
    with pytest.raises(ValueError, match="channels_first must be True"):
        check_channels_first("yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels_first must be True"):
        ATTRIBUTIONS.build("rise", channels_first=1)


def test_steps_last_view_mirrors_the_model_and_leaves_its_mode():
    model = GRUNet().eval()
    view = StepsLast(model)
    assert not view.training and not model.training
    x = _inputs()
    torch.testing.assert_close(view(x.transpose(1, 2)), model(x))
    model.train()
    assert StepsLast(model).training and model.training


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("rise", dict(n_masks=256, grid_size=T, upsample="nearest", shift=False, output="logit")),
        ("sobol", dict(grid_size=T, n_designs=32, output="logit", map_upsample="nearest")),
        ("hsic", dict(grid_size=T, n_designs=256, output="logit", map_upsample="nearest")),
        ("meaningful_perturbation", dict(n_steps=60, jitter=0, substrate="zeros", output="logit")),
        ("sound_mask", dict(n_steps=40, n_fills=2)),
    ],
)
def test_mask_methods_mask_the_steps_of_a_sequence_model(name, kwargs):
    """A (B, T, D) model reading one step: the map is (B, T, 1) and that step carries the evidence."""
    if name == "sound_mask":
        kwargs["reference"] = torch.zeros(4, T, D)  # (N, T, D) fills, as the inputs
    method = ATTRIBUTIONS.build(name, **kwargs)
    x, t = _inputs(), torch.zeros(2, dtype=torch.long)
    a = method(StepReader().eval(), x, t)
    assert a.shape == (2, T, 1)
    score = a[:, :, 0]
    assert (score.argmax(1) == STEP).all(), (name, score)
    # the same method told the model reads (B, C, L) masks the D features instead
    assert ATTRIBUTIONS.build(name, channels_first=True, **kwargs)(StepReader().eval(), x, t).shape == (2, 1, D)


def test_steps_layout_equals_the_transposed_signal_model():
    """RISE on a (B, T, D) model equals RISE on the same model fed (B, D, T), transposed back; a tensor
    substrate shaped like the inputs is transposed with them."""
    model = GRUNet().eval()
    x, t = _inputs(3), torch.tensor([0, 1, 0])
    sub = torch.rand(1, T, D)
    kw = dict(n_masks=64, grid_size=4, output="logit", seed=3)
    got = ATTRIBUTIONS.build("rise", substrate=sub, **kw)(model, x, t)
    ref = ATTRIBUTIONS.build("rise", substrate=sub.transpose(1, 2), channels_first=True, **kw)(
        StepsLast(model), x.transpose(1, 2), t
    )
    torch.testing.assert_close(got, ref.transpose(1, 2))
    with pytest.raises(ValueError, match=r"substrate of shape \(1, 2, 2\) does not broadcast to inputs \(3, 8, 3\)"):
        ATTRIBUTIONS.build("rise", substrate=torch.zeros(1, 2, 2), **kw)(model, x, t)


def test_cd_acd_and_interaction_groups_follow_the_layout():
    model, x, t = StepReader().eval(), _inputs(), torch.zeros(2, dtype=torch.long)
    cd = ContextualDecomposition()(model, x, t)
    assert cd.shape == (2, T, 1)
    torch.testing.assert_close(cd[:, STEP, 0], x[:, STEP].sum(1))  # the whole logit sits on its step
    assert ContextualDecomposition(channels_first=True)(model, x, t).shape == (2, 1, D)
    inter = INTERACTIONS.build("cd")
    assert inter(model, x, t).shape == (2, T, T)
    assert INTERACTIONS.build("cd", channels_first=True)(model, x, t).shape == (2, D, D)
    h = ACD(percentile=50)(model, x[:1], t[:1])[0]
    assert h.grid == (T,) and h.input_size == (T,)
    h = ACD(percentile=50, channels_first=True)(model, x[:1], t[:1])[0]
    assert h.grid == (D,)
    conv = nn.Sequential(nn.Conv1d(D, 2, 1), nn.Flatten(), nn.Linear(2 * T, 2))
    assert ACD(percentile=50)(conv, x[:1].transpose(1, 2), t[:1])[0].grid == (T,)  # (B, C, L): tiles along L


def test_hsic_interactions_on_the_steps_of_a_sequence_model():
    """HSIC interactions over the T steps of a (B, T, D) LSTM (they used to be refused): the diagonal is
    HSIC's per-step attribution with the same designs and cells."""
    from explain_callbacks.attribution.blackbox.hsic import HSIC

    model = GRUNet().eval()
    x, t = _inputs(2), torch.tensor([0, 1])
    s = INTERACTIONS.build("hsic", n_designs=64)(model, x, t)
    assert s.shape == (2, T, T) and torch.isfinite(s).all()
    h = HSIC(grid_size=T, n_designs=64, output="logit", map_upsample="nearest")(model, x, t)
    assert h.shape == (2, T, 1)
    torch.testing.assert_close(s.diagonal(dim1=1, dim2=2), h[:, :, 0].to(s.dtype), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="'sobol', 'cd' or 'integrated_hessians'"):
        INTERACTIONS.build("hsic", n_designs=64)(model, x, t, groups=torch.arange(T * D).view(T, D) % 3)


def test_sobol_interaction_blurs_along_the_steps_of_a_sequence():
    """The blur substrate of Sobol interactions runs along T for (B, T, D) inputs: the same as the
    transposed signal model with channels_first=True."""
    model = GRUNet().eval()
    x, t = _inputs(2), torch.tensor([0, 1])
    got = INTERACTIONS.build("sobol", n_designs=16, substrate="blur")(model, x, t)
    ref = INTERACTIONS.build("sobol", n_designs=16, substrate="blur", channels_first=True)(
        StepsLast(model), x.transpose(1, 2), t
    )
    torch.testing.assert_close(got, ref)


def test_monitor_scores_the_step_maps_of_a_sequence_model(tmp_path):
    """In training, RISE and Sobol maps (B, T, 1) of a GRU on (B, T, D) are scored by every metric, and
    the weights are those of a run without the monitor."""
    from torch.utils.data import DataLoader, TensorDataset

    from explain_callbacks.callbacks import AttributionMonitor
    from tests.test_generality import GRUClassifier, _assert_same, _fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 12, 3, generator=g)
    y = (x[:, 5, 0] > 0).long()
    loaders = (
        DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8),
        DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8),
    )
    w0 = _fit(tmp_path / "a", GRUClassifier, loaders, logger=False)
    methods = [{"name": "rise", "n_masks": 64}, {"name": "sobol", "n_designs": 8}]
    mon = AttributionMonitor(
        budget=None, methods=methods, metrics=["deletion", "mufidelity"], num_samples=4, strict=True)
    w1 = _fit(tmp_path / "b", GRUClassifier, loaders, callbacks=[mon])
    _assert_same(w0, w1)
    for name in ("rise", "sobol"):
        for metric in ("deletion", "mufidelity"):
            assert torch.isfinite(torch.as_tensor(mon.last_scores[name][metric])), (name, metric)
