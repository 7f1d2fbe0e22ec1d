"""The metric classes: protocol attributes, every map shape, functional twins, chunking and seeding,
states, drift, curves, errors, Hydra configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import GradCAM, Saliency
from explain_callbacks.metrics import (
    METRICS,
    CompletenessSoundness,
    Deletion,
    Drift,
    ExplainerMetric,
    ExplanationMetric,
    Insertion,
    InsertionDeletion,
    MuFidelity,
    PointingGame,
    Randomisation,
)
from explain_callbacks.metrics import functional as MF

ROOT = Path(__file__).resolve().parents[1]
NAMES = [
    "deletion", "insertion", "insertion_deletion", "abc", "mufidelity", "infidelity", "pointing_game",
    "energy_pointing_game", "sparseness", "complexity", "completeness_error", "drift", "dabkowski",
    "max_sensitivity", "avg_sensitivity", "local_lipschitz", "completeness_soundness", "randomisation", "fragility",
]  # fmt: skip
FAST = {
    "deletion": {"n_steps": 4}, "insertion": {"n_steps": 4}, "insertion_deletion": {"n_steps": 4},
    "abc": {"n_steps": 4}, "mufidelity": {"n_subsets": 8}, "infidelity": {"n_perturb": 4},
    "max_sensitivity": {"n_samples": 2}, "avg_sensitivity": {"n_samples": 2}, "local_lipschitz": {"n_samples": 2},
    "completeness_soundness": {"n_other": 1, "n_steps": 4}, "fragility": {"steps": 2},
}  # fmt: skip


class CNN(nn.Module):
    def __init__(self, c: int = 3, k: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, k))

    def forward(self, x):
        return self.head(self.act(self.conv(x)))


class Seq(nn.Module):
    """(B, T, D) -> logits."""

    def __init__(self, t: int = 5, d: int = 3, k: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(t * d, k)

    def forward(self, x):
        return self.lin(x.flatten(1))


def _image_batch(b: int = 5, c: int = 3, s: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, c, s, s, generator=g)
    y = torch.randint(0, 4, (b,), generator=g)
    m = torch.zeros(b, 1, s, s)
    m[:, :, 2:6, 2:6] = 1
    return x, y, m


def _run(metric, model, x, maps, y, method, masks=None):
    metric.reset()
    kw = {"masks": masks} if masks is not None else {}
    if metric.kind == "explainer":
        metric.update(model, x, y, method, attributions=maps, **kw)
    else:
        metric.update(model, x, maps, y, **kw)
    return metric.compute()


@pytest.mark.parametrize("name", NAMES)
def test_protocol_attributes_and_states(name):
    metric = METRICS.build(name, **FAST.get(name, {}))
    assert metric.kind in ("explanation", "explainer")
    assert isinstance(metric, ExplainerMetric if metric.kind == "explainer" else ExplanationMetric)
    assert isinstance(metric.needs_masks, bool)
    assert metric.higher_is_better in (True, False, None)
    assert metric.is_differentiable is False and metric.full_state_update is False
    assert metric.short_name == name
    assert hasattr(metric, "batch_size")
    assert set(metric._reductions) >= {"score_sum", "count"}
    for fx in metric._reductions.values():
        assert fx is not None  # every state declares its DDP reduction


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("maps_kind", ["full", "gradcam"])
def test_every_metric_runs_on_image_maps(name, maps_kind):
    torch.manual_seed(0)
    model = CNN().eval()
    x, y, m = _image_batch()
    method = Saliency() if maps_kind == "full" else GradCAM()
    maps = method(model, x, y)
    assert maps.shape == ((5, 3, 8, 8) if maps_kind == "full" else (5, 1, 8, 8))
    metric = METRICS.build(name, **FAST.get(name, {}))
    rng = torch.get_rng_state()
    value = _run(metric, model, x, maps, y, method, m)
    assert torch.equal(rng, torch.get_rng_state()), "a metric touched the global RNG"
    if name == "drift":
        assert math.isnan(float(value))  # no previous epoch yet
        value = _run(metric, model, x, maps * 2, y, method, m)  # same ranking: 1
        assert float(value) == pytest.approx(1.0)
    assert value.ndim == 0 and math.isfinite(float(value)), (name, value)
    assert metric.last_scores is not None and metric.last_scores.shape == (5,)


TABULAR = ["deletion", "insertion", "insertion_deletion", "abc", "mufidelity", "infidelity", "sparseness",
           "complexity", "completeness_error", "drift", "max_sensitivity", "avg_sensitivity", "local_lipschitz",
           "completeness_soundness", "randomisation", "pointing_game", "energy_pointing_game", "fragility"]  # fmt: skip


@pytest.mark.parametrize("name", TABULAR)
@pytest.mark.parametrize("shape", [(6, 10), (6, 5, 3)])
def test_tabular_and_sequence_maps(name, shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape[1:]), 3)).eval() if len(shape) == 2 else Seq()
    x = torch.randn(*shape)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    masks = torch.zeros(shape, dtype=torch.bool)
    masks[:, :2] = True
    method = Saliency()
    maps = method(model, x, y)
    metric = METRICS.build(name, **FAST.get(name, {}))
    value = _run(metric, model, x, maps, y, method, masks if metric.needs_masks else None)
    if name == "drift":
        value = _run(metric, model, x, maps, y, method)
    assert math.isfinite(float(value)), (name, value)


def test_class_value_is_the_mean_of_the_functional_twin():
    torch.manual_seed(0)
    model = CNN().eval()
    x, y, m = _image_batch()
    maps = Saliency()(model, x, y)
    cases = [
        (Deletion(n_steps=5), MF.deletion(model, x, maps, y, n_steps=5)),
        (Insertion(n_steps=5), MF.insertion(model, x, maps, y, n_steps=5)),
        (InsertionDeletion(n_steps=5), MF.insertion_deletion(model, x, maps, y, n_steps=5)),
        (MuFidelity(n_subsets=10, seed=3), MF.mufidelity(model, x, maps, y, n_subsets=10, seed=3)),
        (PointingGame(tolerance=0), MF.pointing_game(maps, m, x, tolerance=0)),
    ]
    for metric, ref in cases:
        metric.update(model, x, maps, y, masks=m)
        torch.testing.assert_close(metric.compute(), ref.mean())
        torch.testing.assert_close(metric.last_scores, ref)
    sal = Saliency()
    ms = METRICS.build("max_sensitivity", n_samples=3)
    ms.update(model, x, y, sal)
    torch.testing.assert_close(ms.compute(), MF.max_sensitivity(model, x, y, sal, n_samples=3).mean())


def test_curves_are_exposed_for_plotting():
    torch.manual_seed(0)
    model = CNN().eval()
    x, y, _ = _image_batch()
    maps = Saliency()(model, x, y)
    d = Deletion(n_steps=8)
    d.update(model, x[:2], maps[:2], y[:2])
    d.update(model, x[2:], maps[2:], y[2:])
    _, curves, _xs = MF.deletion(model, x, maps, y, n_steps=8, return_curve=True)
    assert d.curve.shape == (9,) and d.curve_x.shape == (9,)
    torch.testing.assert_close(d.curve, curves.mean(0))  # mean over every sample since the reset
    assert float(d.curve_x[0]) == 0.0 and float(d.curve_x[-1]) == 1.0
    assert float(d.curve[0]) > float(d.curve[-1]) - 1.0
    d.reset()
    assert d.curve is None
    both = InsertionDeletion(n_steps=4)
    both.update(model, x, maps, y)
    assert set(both.curves) == {"insertion", "deletion"}
    r = Randomisation(cascade=True)
    r.update(model, x, y, Saliency())
    assert r.curve.shape == (len(r.layer_names),) and r.layer_names == ["head.2", "conv"]
    torch.testing.assert_close(r.compute(), r.last_scores.mean())


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, x, a, y, bs: MF.mufidelity(m, x, a, y, n_subsets=7, batch_size=bs),
        lambda m, x, a, y, bs: MF.mufidelity(m, x, a, y, n_subsets=7, grid_size=3, batch_size=bs),
        lambda m, x, a, y, bs: MF.infidelity(m, x, a, y, n_perturb=7, batch_size=bs),
        lambda m, x, a, y, bs: MF.infidelity(m, x, a, y, n_perturb=7, perturbation="square", batch_size=bs),
        lambda m, x, a, y, bs: MF.deletion(m, x, a, y, n_steps=6, batch_size=bs),
        lambda m, x, a, y, bs: MF.max_sensitivity(m, x, y, Saliency(), n_samples=4, batch_size=bs),
        lambda m, x, a, y, bs: MF.local_lipschitz(m, x, y, Saliency(), n_samples=4, batch_size=bs),
        lambda m, x, a, y, bs: MF.completeness_soundness(m, x, y, Saliency(), n_other=2, n_steps=4, batch_size=bs)[1],
    ],
)
def test_results_do_not_depend_on_batch_size_and_are_seeded(fn):
    torch.manual_seed(0)
    model = CNN().double().eval()
    x, y, _ = _image_batch()
    x = x.double()
    a = Saliency()(model, x, y)
    ref = fn(model, x, a, y, 256)
    for bs in (1, 3, 7):
        torch.testing.assert_close(fn(model, x, a, y, bs), ref, atol=1e-10, rtol=1e-9)
    torch.manual_seed(123)  # the global RNG plays no role
    torch.testing.assert_close(fn(model, x, a, y, 4), ref, atol=1e-10, rtol=1e-9)


def test_model_calls_hold_at_most_batch_size_rows():
    torch.manual_seed(0)
    model = CNN().eval()
    sizes = []
    model.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    x, y, _ = _image_batch()
    maps = Saliency()(model, x, y)
    sizes.clear()
    MF.deletion(model, x, maps, y, n_steps=16, batch_size=12)
    assert max(sizes) <= 12 and sum(sizes) == 5 * 17
    sizes.clear()
    MF.mufidelity(model, x, maps, y, n_subsets=20, batch_size=12)
    assert max(sizes) <= 12 and sum(sizes) == 5 * 21
    for perturbation in ("gaussian", "square"):  # x and its 7 perturbed copies, full calls across runs
        sizes.clear()
        MF.infidelity(model, x, maps, y, n_perturb=7, perturbation=perturbation, batch_size=12)
        assert sizes == [12, 12, 12, 4]


def test_random_subsets_are_uniform_and_exact():
    from explain_callbacks.metrics.functional.mufidelity import random_subsets, sample_without_replacement

    g = torch.Generator().manual_seed(0)
    m = sample_without_replacement(5, 2, (40_000,), generator=g)
    assert (m.sum(1) == 2).all()
    pairs = torch.bincount((m.nonzero()[:, 1].view(-1, 2) * torch.tensor([5, 1])).sum(1), minlength=25)
    counts = pairs[pairs > 0].double()
    assert counts.numel() == 10 and (counts / 4000 - 1).abs().max() < 0.08  # every pair equally likely
    for k in (3, 70, 97):  # k > n/2 draws the complement
        assert (random_subsets(4, 100, 3, subset_size=k, generator=g).sum(-1) == k).all()
    grid = random_subsets(4, 64, 50, grid_size=4, drop_prob=0.25, spatial=(8, 8), generator=g)
    assert abs(float(grid.float().mean()) - 0.25) < 0.03
    cells = grid.view(50, 4, 4, 2, 4, 2)  # constant within each 2 x 2 cell
    assert torch.equal(cells.amax((3, 5)), cells.amin((3, 5)))


def test_drift_compares_with_the_previous_period():
    d = Drift()
    a = torch.randn(4, 1, 5, 5)
    d.update(None, None, a)
    assert math.isnan(float(d.compute()))
    d.reset()
    d.update(None, None, a)
    assert float(d.compute()) == pytest.approx(1.0)
    d.reset()
    d.update(None, None, -a)
    assert float(d.compute()) == pytest.approx(-1.0)
    state = d.state_dict()
    d2 = Drift()
    d2.load_state_dict(state)
    d2.reset()
    d2.update(None, None, -a)
    assert float(d2.compute()) == pytest.approx(1.0)


def test_completeness_soundness_reports():
    torch.manual_seed(0)
    model = CNN().eval()
    x, y, _ = _image_batch()
    both = CompletenessSoundness(report="both", n_other=2, n_steps=4)
    both.update(model, x, y, Saliency())
    out = both.compute()
    assert set(out) == {"completeness", "soundness"}
    sound = CompletenessSoundness(n_other=2, n_steps=4)
    sound.update(model, x, y, Saliency())
    torch.testing.assert_close(sound.compute(), out["soundness"])
    with pytest.raises(ValueError, match="report"):
        CompletenessSoundness(report="nope")


def test_clear_errors():
    torch.manual_seed(0)
    model = CNN().eval()
    x, y, _ = _image_batch()
    maps = Saliency()(model, x, y)
    with pytest.raises(ValueError, match="masks"):
        PointingGame().update(model, x, maps, y)
    with pytest.raises(ValueError, match="do not match inputs"):
        Deletion().update(model, x, maps[:, :, :4], y)
    with pytest.raises(ValueError, match="substrate"):
        Deletion(substrate="nope").update(model, x, maps, y)
    with pytest.raises(ValueError, match="preset"):
        MF.mufidelity(model, x, maps, y, preset="nope")
    with pytest.raises(ValueError, match="subset_size"):
        MF.mufidelity(model, x, maps, y, subset_size=10_000)
    with pytest.raises(TypeError, match="callable"):
        METRICS.build("max_sensitivity").update(model, x, y, "saliency")
    with pytest.raises(ValueError, match="batch_size"):
        Deletion(batch_size=0)
    with pytest.raises(ValueError, match=r"target=None"):
        MF.completeness_soundness(model, x, None, Saliency())


def test_merged_states_equal_one_pass():
    """Two 'ranks' updated on halves and merged (sum reduction) give the mean over all samples; for the
    deterministic metrics that is the one-pass value on the whole batch."""
    torch.manual_seed(0)
    model = CNN().eval()
    x, y, m = _image_batch(b=6)
    maps = Saliency()(model, x, y)
    m[1] = 0  # an empty mask: NaN left out on one rank
    for name in ("deletion", "pointing_game", "sparseness", "mufidelity", "infidelity"):
        a = METRICS.build(name, **FAST.get(name, {}))
        b = METRICS.build(name, **FAST.get(name, {}))
        a.update(model, x[:2], maps[:2], y[:2], masks=m[:2])
        b.update(model, x[2:], maps[2:], y[2:], masks=m[2:])
        both = torch.cat([a.last_scores, b.last_scores])
        a.merge_state(b)
        torch.testing.assert_close(a.compute(), both.nanmean())
        if name in ("deletion", "pointing_game", "sparseness"):
            whole = METRICS.build(name, **FAST.get(name, {}))
            whole.update(model, x, maps, y, masks=m)
            torch.testing.assert_close(a.compute(), whole.compute())


def test_nan_scores_are_left_out():
    metric = PointingGame(tolerance=0)
    a = torch.zeros(2, 1, 4, 4)
    a[:, 0, 1, 1] = 1
    m = torch.zeros(2, 1, 4, 4)
    m[0, 0, 1, 1] = 1  # sample 1 has an empty mask
    metric.update(None, torch.zeros(2, 1, 4, 4), a, None, masks=m)
    assert float(metric.compute()) == 1.0 and float(metric.count) == 1.0


def test_hydra_configs_instantiate():
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    files = sorted((ROOT / "conf" / "metric").glob("*.yaml"))
    assert {f.stem for f in files} >= set(NAMES)
    for f in files:
        cfg = omegaconf.OmegaConf.load(f)
        metric = hydra_utils.instantiate(cfg)
        assert isinstance(metric, METRICS.get(f.stem)), f.name
        assert metric.short_name == f.stem
