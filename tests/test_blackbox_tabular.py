"""Black-box methods on tabular (B, F) inputs with their default settings: a model that reads one known
feature must credit that feature alone (issue 16, item 14)."""

from __future__ import annotations

import torch
from torch import nn

from explain_callbacks.attribution import MeaningfulPerturbation, Occlusion, build_attributor


def _one_feature_model(n_out: int, n_features: int = 10) -> nn.Linear:
    """A linear model that reads only x0 (weights +2 / −2 on it, 0 elsewhere)."""
    lin = nn.Linear(n_features, n_out)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, 0] = torch.tensor([2.0, -2.0][:n_out])
        lin.bias.zero_()
    return lin.eval()


def _inputs(b: int = 6, f: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, f, generator=g)
    x[:, 0] = torch.where(x[:, 0] >= 0, 1.0, -1.0) * (1.5 + torch.rand(b, generator=g))  # |x0| in [1.5, 2.5]
    return x


def test_occlusion_credits_only_the_feature_the_model_reads():
    model = _one_feature_model(1, 5)
    x = _inputs(4, 5)
    a = Occlusion()(model, x, None)  # defaults: one feature per window on tabular inputs
    want = torch.zeros_like(x)
    want[:, 0] = 2.0 * x[:, 0]  # f(x) − f(x with x0 = 0) on the linear model
    torch.testing.assert_close(a, want)
    assert Occlusion().n_forwards((5,)) == 6
    assert Occlusion().n_forwards((1, 32, 32)) == 226  # images keep window 4, stride 2


def test_meaningful_perturbation_runs_on_tabular_defaults_and_ranks_the_used_feature_first():
    model = _one_feature_model(2)
    x = _inputs()
    t = model(x).argmax(1)
    a = MeaningfulPerturbation()(model, x, t)  # all defaults: deletion game, zeros substrate
    assert a.shape == x.shape
    assert (a.argmax(1) == 0).all(), a
    assert (a[:, 0] > 0.9).all() and (a[:, 1:] < 0.05).all(), a


def test_extremal_perturbation_runs_on_tabular_defaults_and_keeps_the_used_feature():
    model = _one_feature_model(2)
    x = _inputs()
    t = model(x).argmax(1)
    a = build_attributor("extremal_perturbation")(model, x, t)  # area 0.1 of 10 features: one kept
    assert a.shape == x.shape
    assert (a.argmax(1) == 0).all(), a
    assert (a[:, 0] > 0.9).all() and (a[:, 1:] < 0.1).all(), a


def test_the_default_substrate_is_blur_where_the_input_has_positions():
    img = torch.rand(2, 1, 16, 16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 2)).eval()
    t = torch.tensor([0, 1])
    default = MeaningfulPerturbation(n_steps=4, jitter=0)(model, img, t)
    blur = MeaningfulPerturbation(n_steps=4, jitter=0, substrate="blur")(model, img, t)
    assert torch.equal(default, blur)


class _StepModel(nn.Module):
    """A (B, T, D) model (its Linear reads the last dim) that uses only feature 0 of every step."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.lin = _one_feature_model(1, d)

    def forward(self, x):
        return self.lin(x).sum(1)


def test_occlusion_of_a_sequence_slides_over_steps_one_feature_at_a_time():
    model = _StepModel()
    x = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(1))
    a = Occlusion()(model, x, None)
    assert (a[..., 1:] == 0).all()  # features the model never reads get nothing
    assert (a[..., 0] != 0).all()
    torch.testing.assert_close(a, Occlusion(window=(4, 1), stride=(2, 1))(model, x, None))
    assert Occlusion(channels_first=False).n_forwards((12, 5)) == 5 * 5 + 1
    # mean baseline: each feature's mean over time, as the mask methods and metrics
    mean = Occlusion(baseline="mean")(model, x, None)
    torch.testing.assert_close(mean, Occlusion(baseline=x.mean(1, keepdim=True))(model, x, None))
    # (B, C, L) signals keep windows of 4 along L spanning the channels
    conv = nn.Sequential(nn.Conv1d(5, 2, 3), nn.Flatten(), nn.Linear(2 * 10, 1)).eval()
    xs = x.transpose(1, 2).contiguous()
    torch.testing.assert_close(Occlusion()(conv, xs, None), Occlusion(window=4, stride=2)(conv, xs, None))
