"""Cascading model-parameter randomisation on a small trained CNN (Adebayo et al. 2018)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from explain_callbacks._internal.ops import pearson, rankdata
from explain_callbacks.attribution import Saliency
from explain_callbacks.metrics import Randomisation
from explain_callbacks.metrics import functional as MF
from explain_callbacks.metrics.functional.randomisation import (
    layer_generator,
    randomisable_layers,
    randomise_layer,
    randomised_view,
)


@pytest.fixture(scope="module")
def trained():
    """SmallCNN trained one epoch on scikit-learn's 8x8 digits (well above chance on held-out digits)."""
    datasets = pytest.importorskip("explain_callbacks.datasets.tabular_images")
    from explain_callbacks.models.nets import SmallCNN

    x, y = datasets.load_digits_tensors(8)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # weights and dropout from a fixed seed, whatever ran before
        torch.manual_seed(0)
        model = SmallCNN(1, 10, width=8)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        perm = torch.randperm(1500, generator=g)
        for i in range(0, 1500, 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    acc = (model(x[1500:]).argmax(1) == y[1500:]).float().mean()
    assert acc > 0.4  # chance: 0.1
    return model, x[1500:1532], y[1500:1532]


def test_gradient_maps_of_the_randomised_cnn_decorrelate(trained):
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    names, rows = MF.model_randomisation(model, x, y, Saliency(), return_cascade=True)
    assert names == ["head.3", "features.9", "features.8", "features.5", "features.4", "features.1", "features.0"]
    assert rows.shape == (7, 32)
    assert float(rows[-1].mean()) < 0.3
    full = MF.model_randomisation(model, x, y, Saliency())  # one call: the same fully randomised model
    torch.testing.assert_close(full, rows[-1])
    # The user's model is untouched, and so is the global RNG.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training
    assert torch.equal(rng, torch.get_rng_state())


def test_a_method_blind_to_the_weights_stays_correlated(trained):
    """An 'edge detector' that ignores the model fails the check (correlation 1)."""
    model, x, y = trained
    edge = lambda m, inp, t: (inp - inp.roll(1, -1)).abs()  # noqa: E731
    score = MF.model_randomisation(model, x, y, edge)
    torch.testing.assert_close(score, torch.ones_like(score))


def test_class_reports_the_fully_randomised_value(trained):
    model, x, y = trained
    metric = Randomisation()
    maps = Saliency()(model, x, y)
    metric.update(model, x, y, Saliency(), attributions=maps)
    assert float(metric.compute()) < 0.3
    torch.testing.assert_close(metric.last_scores, MF.model_randomisation(model, x, y, Saliency()))


def test_independent_mode_and_layer_selection():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    names, rows = MF.model_randomisation(model, x, y, Saliency(), mode="independent", return_cascade=True)
    assert names == ["2", "0"] and rows.shape == (2, 8)
    names, rows = MF.model_randomisation(model, x, y, Saliency(), layers=["0"], return_cascade=True)
    assert names == ["0"]
    with pytest.raises(ValueError, match="unknown layers"):
        MF.model_randomisation(model, x, y, Saliency(), layers=["nope"])
    for wrong in (torch.rand(8, 3), torch.rand(4, 12)):  # not the maps this method gives for x
        with pytest.raises(ValueError, match="attributions= has"):
            MF.model_randomisation(model, x, y, Saliency(), attributions=wrong)


def test_randomise_layer_is_seeded_and_leaves_the_model_untouched():
    m = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))
    m[1].running_mean.fill_(3.0)
    w0 = m[0].weight.clone()
    with randomised_view(m) as (view, randomise):
        assert view is m  # no copy
        randomise("0", torch.Generator().manual_seed(1))
        w1 = m[0].weight.clone()
        randomise("0", torch.Generator().manual_seed(1))
        assert torch.equal(w1, m[0].weight) and not torch.equal(w1, w0)
        assert m[0].weight.abs().max() <= 0.5  # U(±1/√fan_in), fan_in = 4
        randomise("1", torch.Generator().manual_seed(1))
        assert torch.equal(m[1].running_mean, torch.zeros(2))
    assert torch.equal(m[0].weight, w0) and float(m[1].running_mean[0]) == 3.0
    assert [n for n, _ in randomisable_layers(m)] == ["0", "1"]


class _TiedLSTM(nn.Module):
    """Tied weights, an LSTM (its weights also listed in ``_flat_weights``), a parametrised layer and
    a BatchNorm: the slots a swap must get right."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.norm = nn.BatchNorm1d(8)
        self.mid = torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
        self.tied = nn.Linear(8, 8, bias=False)
        self.tied.weight = self.mid.parametrizations.weight.original1  # one Parameter in two modules
        self.out = nn.Linear(8, 6)

    def forward(self, x):  # x (B, 5, 6)
        h, _ = self.lstm(self.emb(x))
        h = self.norm(h[:, -1])
        return self.out(self.tied(torch.tanh(self.mid(h))))


def _reference(model, x, y, method, a0, order_names, seed=0, independent=False):
    """The check by the book: a deep copy, randomised in place, layer by layer."""
    layers = randomisable_layers(model)
    index = {n: i for i, (n, _) in enumerate(layers)}
    dev = x.device
    rank = lambda a: rankdata(a.abs().reshape(a.shape[0], -1))  # noqa: E731
    r0 = rank(a0)
    rows, copy_ = [], copy.deepcopy(model)
    for n in order_names:
        if independent:
            copy_ = copy.deepcopy(model)
        randomise_layer(dict(copy_.named_modules())[n], layer_generator(dev, seed, index[n]))
        rows.append(pearson(r0, rank(method(copy_, x, y))))
    return torch.stack(rows)


def _raw_gradient(m, inp, t):
    """A method that runs the model in whatever mode it is in (BatchNorm in training mode updates its
    running statistics in place)."""
    inp = inp.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(m(inp).gather(1, t[:, None]).sum(), inp)[0]


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_swapped_tensors_match_a_deep_copy_and_nothing_of_the_model_moves(train_mode, mode):
    torch.manual_seed(0)
    model = _TiedLSTM().train(train_mode)
    x, y = torch.randn(16, 5, 6), torch.randint(0, 6, (16,))
    # a live graph through the trained weights: in-place randomisation would break its backward
    live = model(x).square().sum()
    a0 = _raw_gradient(copy.deepcopy(model), x, y)  # trained maps (on a copy: training mode moves BN statistics)
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    values = {n: t.clone() for n, t in tensors.items()}
    versions = {n: t._version for n, t in tensors.items()}
    modes = [m.training for m in model.modules()]
    names, rows = MF.model_randomisation(model, x, y, _raw_gradient, a0, mode=mode, return_cascade=True)
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is tensors[n] and t._version == versions[n] and torch.equal(t, values[n]), n
    assert model.tied.weight is model.mid.parametrizations.weight.original1
    assert model.lstm._flat_weights[0] is model.lstm.weight_ih_l0
    assert [m.training for m in model.modules()] == modes
    live.backward()  # still possible: nothing it saved was modified
    assert model.emb.weight.grad is not None
    ref = _reference(model, x, y, _raw_gradient, a0, names, independent=mode == "independent")
    torch.testing.assert_close(rows, ref, rtol=0, atol=0)


def test_a_model_that_cannot_be_deep_copied_is_checked_and_restored_after_an_error():
    import threading

    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.lock = threading.Lock()  # deepcopy raises TypeError on this

        def forward(self, x):
            return self.lin(x)

    model = Locked().eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    w = model.lin.weight
    score = MF.model_randomisation(model, x, y, Saliency())
    assert score.shape == (8,) and model.lin.weight is w

    def failing(m, inp, t):
        assert m.lin.weight is not w  # the randomised tensors are in place during the call
        raise RuntimeError("method failed")

    with pytest.raises(RuntimeError, match="method failed"):
        MF.model_randomisation(model, x, y, failing, attributions=torch.rand(8, 4))
    assert model.lin.weight is w and torch.equal(w, model.lin.weight)


def test_torchscript_models_are_randomised_on_a_copy():
    """Compiled forwards do not see swapped attributes: scripted and traced models (and models holding
    one) get the deep-copy path, with the eager model's results, and are left untouched."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).eval()
    ref = MF.model_randomisation(net, x, y, Saliency(), return_cascade=True)[1]
    holder = nn.Sequential(torch.jit.script(net))
    for model in (torch.jit.script(net), torch.jit.trace(net, x), holder):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rows = MF.model_randomisation(model, x, y, Saliency(), return_cascade=True)[1]
        torch.testing.assert_close(rows, ref, rtol=1e-6, atol=1e-6)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_old_style_weight_norm_and_parameters_in_buffer_slots_are_put_back():
    """The deprecated weight_norm hook recomputes ``weight`` as a plain attribute from the swapped
    parameters: it is put back too. A Parameter registered as a buffer elsewhere stays a buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3)).eval()
    model[2].register_buffer("shared", model[0].weight_g)  # a Parameter in a buffer slot
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    names = sorted(dict(model.named_buffers()))
    maps = Saliency()(model, x, y)
    weight = model[0].weight  # what the hook computed last
    score = MF.model_randomisation(model, x, y, Saliency(), maps)
    assert score.shape == (8,)
    assert model[0].weight is weight and sorted(dict(model.named_buffers())) == names
    assert model[2]._buffers["shared"] is model[0].weight_g


def test_explicit_perturbations_may_require_grad():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([0, 2])
    pert = torch.randn(2, 5, 3, 2, 2, requires_grad=True)
    a = torch.randn(2, 3, 2, 2)
    ref = MF.infidelity(net, x, a, t, perturbation=pert.detach(), batch_size=3)
    torch.testing.assert_close(MF.infidelity(net, x, a, t, perturbation=pert, batch_size=3), ref)


def test_randomisation_during_training_leaves_weights_bit_identical(tmp_path):
    """The check swaps tensors in and out of the live training model every monitored epoch: the run's
    weights, BatchNorm statistics and optimiser state must not notice (and a LightningModule holding a
    lock, which a deep copy refuses, is checked)."""
    import threading

    from explain_callbacks.callbacks import AttributionMonitor
    from tests.helpers_lightning import image_loaders, lit, trainer

    def run(callbacks):
        train, val = image_loaders()
        model = lit()
        model.lock = threading.Lock()
        trainer(tmp_path / str(len(callbacks)), callbacks=callbacks, max_epochs=2, logger=False).fit(model, train, val)
        return {k: v.clone() for k, v in model.state_dict().items()}

    mon = AttributionMonitor(budget=None,
        methods=["saliency"], metrics=[{"name": "randomisation", "cascade": True}], num_samples=8, strict=True
    )
    with_check, without = run([mon]), run([])
    assert with_check.keys() == without.keys()
    for k in without:
        assert torch.equal(with_check[k], without[k]), k
    assert mon.last_scores["saliency"]["randomisation"] < 0.9


@pytest.mark.parametrize("rank_elements", [1, 1 << 23])
def test_steps_ranked_together_or_in_groups_equal_the_step_by_step_reference(monkeypatch, rank_elements):
    """The steps' maps are ranked in groups bounded by _RANK_ELEMENTS (1: one group per step; the default:
    all steps at once); either way each row is the book's per-step correlation, tied maps included (the
    saliency of a ReLU net has exact zeros)."""
    from explain_callbacks.metrics.functional import randomisation as R

    monkeypatch.setattr(R, "_RANK_ELEMENTS", rank_elements)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    a0 = _raw_gradient(model, x, y)
    names, rows = MF.model_randomisation(model, x, y, _raw_gradient, a0, return_cascade=True, abs=True)
    torch.testing.assert_close(rows, _reference(model, x, y, _raw_gradient, a0, names), rtol=0, atol=1e-12)
    full = MF.model_randomisation(model, x, y, _raw_gradient, a0)
    torch.testing.assert_close(full, rows[-1], rtol=0, atol=1e-12)


def test_reset_draws_name_layers_without_reset_parameters():
    """draws="reset_parameters" needs each randomised layer's own initialisation: a layer without one is named."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 2)).eval()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    with pytest.raises(ValueError, match=r"\['1'\] have none"):
        MF.model_randomisation(model, x, y, Saliency(), draws="reset_parameters")
    rho = MF.model_randomisation(model, x, y, Saliency(), draws="reset_parameters", layers=["0", "2"])
    assert rho.shape == (5,) and torch.isfinite(rho).all()


def test_reset_draws_leave_the_users_tensors_untouched_when_a_reset_reaches_children():
    """A layer whose reset_parameters() also re-initialises a child: the child's tensors are clones too, so the
    user's weights keep their values and objects."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.inner = nn.Linear(4, 4)

        def reset_parameters(self) -> None:
            nn.init.ones_(self.scale)
            nn.init.normal_(self.inner.weight)

        def forward(self, x):
            return self.inner(x) * self.scale

    model = nn.Sequential(nn.Linear(3, 4), Block(), nn.Linear(4, 2)).eval()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    MF.model_randomisation(model, x, y, Saliency(), draws="reset_parameters", layers=["0", "1", "2"])
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1]), n
