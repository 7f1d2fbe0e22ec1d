"""Mask machinery, Occlusion, RISE, Sobol and HSIC: oracles from methods.md section 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks._internal.batching import resolve_batch_size
from explain_callbacks._internal.masks import (
    fit_budget,
    make_substrate,
    mask_layout,
    random_offsets,
    render_masks,
    sample_designs,
)
from explain_callbacks.attribution import ATTRIBUTIONS, HSIC, RISE, Occlusion, Sobol, build_attributor

CHECKER = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)).remainder(2).float() * 2 - 1


class CountingModel(nn.Module):
    """Wraps a model and records the number of rows of every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.inner(x)


class Planted(nn.Module):
    """Reads only the region rows 20:28, cols 4:12 of a 32x32 image: the correlation of the region with a
    checkerboard P (so zeros, mean and blur substrates all destroy the evidence), squashed nonlinearly."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pattern", CHECKER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = (x[:, :, 20:28, 4:12] * self.pattern).mean((1, 2, 3))
        z = 4 * torch.tanh(4 * r)
        return torch.stack([z, -z, torch.zeros_like(z)], 1)


def planted_inputs(b: int, seed: int = 0) -> torch.Tensor:
    """Background 0.5 ± 0.1 noise, and the checkerboard 0.5 + 0.4·P in the region."""
    x = 0.5 + 0.1 * torch.randn(b, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    x[:, :, 20:28, 4:12] = 0.5 + 0.4 * CHECKER
    return x


REGION = torch.zeros(32, 32, dtype=torch.bool)
REGION[20:28, 4:12] = True
NEAR = torch.zeros(32, 32, dtype=torch.bool)
NEAR[16:32, 0:16] = True


def mass_in_region(a: torch.Tensor, region: torch.Tensor = REGION) -> torch.Tensor:
    """Share of the positive part of (map − its median) inside ``region``."""
    a = a.sum(1) if a.ndim == 4 else a
    flat = a.reshape(a.shape[0], -1)
    pos = (flat - flat.median(1, keepdim=True).values).clamp_min(0)
    return (pos * region.flatten()).sum(1) / pos.sum(1).clamp_min(1e-12)


# ---------------------------------------------------------------------------- mask machinery


def test_samplers_are_seeded_and_lhs_is_balanced():
    for sampler in ("bernoulli", "sobol", "lhs"):
        a = sample_designs(64, 9, sampler, torch.Generator().manual_seed(3))
        b = sample_designs(64, 9, sampler, torch.Generator().manual_seed(3))
        c = sample_designs(64, 9, sampler, torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert set(a.unique().tolist()) <= {0.0, 1.0}
    lhs = sample_designs(64, 9, "lhs", torch.Generator().manual_seed(0))
    assert torch.equal(lhs.sum(0), torch.full((9,), 32.0))  # each column visits every stratum once
    u = sample_designs(64, 3, "lhs", torch.Generator().manual_seed(0), binary=False)
    strata = (u * 64).floor().sort(0).values
    assert torch.equal(strata, torch.arange(64.0).unsqueeze(1).expand(64, 3))
    sob = sample_designs(256, 5, "sobol", torch.Generator().manual_seed(0), binary=False)
    assert (sob.mean(0) - 0.5).abs().max() < 0.01  # quasi-random: far better than 1/sqrt(256)


def test_render_shift_and_layouts():
    x = torch.zeros(2, 3, 32, 32)
    lay = mask_layout(x, 7)
    assert lay.grid == (7, 7) and lay.mask_shape == (1, 32, 32)
    g = torch.Generator().manual_seed(0)
    d = sample_designs(5, lay.d, "bernoulli", g)
    off = random_offsets(5, lay, g)
    assert off.shape == (5, 2) and int(off.max()) < 5  # cell = ceil(32/7) = 5
    m = render_masks(d, lay, "bilinear", off)
    assert m.shape == (5, 1, 32, 32) and m.min() >= 0 and m.max() <= 1
    # Zero offset equals the top-left crop of the (g+1)*cell upsampled grid, away from the mirrored border
    # (the first 3 px: cell coordinate (o + 0.5)·7/40 − 0.5 < 0; tests/test_rise_reference.py checks the border).
    big = torch.nn.functional.interpolate(d.view(5, 1, 7, 7), size=(40, 40), mode="bilinear", align_corners=False)
    m0 = render_masks(d, lay, "bilinear", torch.zeros_like(off))
    torch.testing.assert_close(m0[..., 3:, 3:], big[:, :, 3:32, 3:32])
    m3 = render_masks(d, lay, "bilinear", torch.full_like(off, 3))
    torch.testing.assert_close(m3, big[:, :, 3:35, 3:35])
    seq = mask_layout(torch.zeros(2, 4, 50), 10)
    assert render_masks(sample_designs(3, seq.d, "lhs", g), seq, "bicubic").shape == (3, 1, 50)
    assert mask_layout(torch.zeros(2, 6), 7).grid == (6,)
    with pytest.raises(ValueError, match="tabular"):
        mask_layout(torch.zeros(2, 1, 2, 3, 4), 4)


def test_substrates():
    x = torch.rand(2, 3, 16, 16)
    assert make_substrate(x, "zeros").abs().sum() == 0
    torch.testing.assert_close(make_substrate(x, "mean")[:, :, 0, 0], x.mean((2, 3)))
    assert make_substrate(x, "blur").shape == x.shape
    with pytest.raises(ValueError, match="tabular"):
        make_substrate(torch.rand(2, 5), "blur")
    assert fit_budget(4000, budget=1000) == 1000
    assert fit_budget(32, per_unit=66, budget=1000, power_of_two=True) == 8
    with pytest.raises(ValueError, match="budget"):
        fit_budget(32, per_unit=66, budget=100, minimum=2)


# ---------------------------------------------------------------------------- Occlusion vs Captum


@pytest.mark.parametrize(
    ("shape", "window", "stride", "baseline"),
    [
        ((3, 11, 13), 4, 2, 0.0),
        ((3, 11, 13), 3, 3, 0.5),
        ((3, 11, 13), (3, 5, 4), (1, 3, 2), -1.0),
        ((2, 17), 5, 3, 0.25),
        ((9,), 2, 1, 0.0),
    ],
)
def test_occlusion_equals_captum(shape, window, stride, baseline):
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    n_in = int(torch.tensor(shape).prod())
    if len(shape) == 3:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * n_in // 3, 5))
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, 8), nn.Tanh(), nn.Linear(8, 5))
    model = model.double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    t = torch.tensor([0, 2, 4])
    ours = Occlusion(window=window, stride=stride, baseline=baseline, batch_size=7)(model, x, t)
    win = (window,) * (len(shape) - (len(shape) > 1)) if isinstance(window, int) else window
    st = (stride,) * (len(shape) - (len(shape) > 1)) if isinstance(stride, int) else stride
    if len(win) < len(shape):
        win, st = (shape[0], *win), (shape[0], *st)
    ref = captum.Occlusion(model).attribute(x, sliding_window_shapes=win, strides=st, baselines=baseline, target=t)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- planted region


@pytest.mark.parametrize(
    ("method", "exact", "near"),
    [
        # RISE's bilinear masks with random shifts blur the map by about one cell (5 px at s=7) and the
        # uncentred map carries mask-coverage noise f̄·ΣM/(Np): it localises at the grid's resolution.
        (RISE(batch_size=1024), 0.3, 0.6),
        (RISE(n_masks=1000, grid_size=8, center=True, output="logit", batch_size=1024), 0.4, 0.8),
        (Sobol(grid_size=8, n_designs=16, batch_size=1024), 0.6, 0.9),
        (HSIC(grid_size=8, n_designs=400, batch_size=1024), 0.6, 0.85),
        (HSIC(n_designs=400, batch_size=1024), 0.6, 0.85),
        (Occlusion(window=4, stride=4), 0.6, 0.9),
    ],
    ids=["rise", "rise_centered", "sobol", "hsic_g8", "hsic_g7", "occlusion"],
)
def test_planted_region_gets_most_mass(method, exact, near):
    """Share of the map's mass above its median inside the planted region (1/16 of the image) and inside
    the region grown by 4 px (one cell of an 8x8 grid; 1/4 of the image); the peak lies in the region."""
    x = planted_inputs(2)
    t = torch.zeros(2, dtype=torch.long)
    a = method(Planted(), x, t)
    assert (mass_in_region(a, REGION) > exact).all(), mass_in_region(a, REGION)
    assert (mass_in_region(a, NEAR) > near).all(), mass_in_region(a, NEAR)
    peak = a.sum(1).reshape(2, -1).argmax(1)
    assert REGION.flatten()[peak].all()


# ---------------------------------------------------------------------------- Sobol closed form


def test_sobol_matches_closed_form_on_additive_model():
    """f(x·M) = Σ_i w_i · mean_{patch i}(x·M) = Σ_i (w_i c_i) M_i with M_i ~ U(0,1) independent:
    S_i = ST_i = (w_i c_i)² / Σ_j (w_j c_j)²."""
    torch.manual_seed(0)
    w = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 1.0, -2.5, 0.2, 1.5], dtype=torch.float64)

    class Additive(nn.Module):
        def forward(self, x):
            patches = x.reshape(x.shape[0], 3, 4, 3, 4).mean((2, 4)).reshape(x.shape[0], 9)
            return (patches * w).sum(1, keepdim=True)

    x = 0.5 + torch.rand(2, 1, 12, 12, dtype=torch.float64)
    c = x.reshape(2, 3, 4, 3, 4).mean((2, 4)).reshape(2, 9)
    share = (w * c) ** 2 / ((w * c) ** 2).sum(1, keepdim=True)
    idx = Sobol(grid_size=3, n_designs=1024, output="logit", batch_size=4096).indices(Additive(), x, None)
    torch.testing.assert_close(idx["total"].reshape(2, 9), share, atol=0.02, rtol=0)
    torch.testing.assert_close(idx["first_order"].reshape(2, 9), share, atol=0.03, rtol=0)
    # Additive: no interactions, shares sum to one.
    assert (idx["total"].sum((1, 2)) - 1).abs().max() < 0.03


def test_sobol_sees_interactions():
    """f = M_0·M_1 + 0.1·M_2 with M ~ U(0,1): closed-form first-order and total indices of the product."""

    class Product(nn.Module):
        def forward(self, x):
            return x[:, 0] * x[:, 1] + 0.1 * x[:, 2]

    x = torch.ones(1, 4, dtype=torch.float64)
    idx = Sobol(n_designs=1024, output="logit", batch_size=8192).indices(Product(), x, None)
    first, total = idx["first_order"][0], idx["total"][0]
    # Var(M0 M1) = 7/144, first-order part of each = 1/48; Var(0.1 M2) = 1/1200.
    v = 7 / 144 + 0.01 / 12
    s_ref = torch.full((2,), (1 / 48) / v, dtype=torch.float64)
    st_ref = torch.full((2,), (1 / 48 + 1 / 144) / v, dtype=torch.float64)
    torch.testing.assert_close(first[:2], s_ref, atol=0.03, rtol=0)
    torch.testing.assert_close(total[:2], st_ref, atol=0.03, rtol=0)
    assert total[3].abs() < 1e-6


# ---------------------------------------------------------------------------- HSIC estimator


def _hsic_brute(x: torch.Tensor, y: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit p×p kernels with double centring: HSIC_i and HSIC_ij − HSIC_i − HSIC_j (product kernel)."""
    p, d = x.shape
    H = torch.eye(p, dtype=torch.float64) - 1.0 / p
    L = torch.exp(-((y[:, None] - y[None, :]) ** 2) / (2 * w**2))
    Lt = H @ L @ H
    K = 0.5 - (x[:, None, :] - x[None, :, :]) ** 2  # (p, p, d), zero-mean Dirac form
    single = torch.stack([((H @ K[:, :, i] @ H) * Lt).sum() / p**2 for i in range(d)])
    inter = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            if i != j:  # product kernel of the reference code: (1 + K_i)(1 + K_j)
                hij = ((H @ ((1 + K[:, :, i]) * (1 + K[:, :, j])) @ H) * Lt).sum() / p**2
                inter[i, j] = hij - single[i] - single[j]
    return single, inter


def test_hsic_estimator_matches_explicit_kernels():
    torch.manual_seed(0)

    class Tab(nn.Module):
        def forward(self, x):
            return (2 * x[:, 0] * x[:, 1] + x[:, 2] - 0.5 * x[:, 3] * x[:, 4]).unsqueeze(1)

    x = torch.ones(1, 5, dtype=torch.float64)
    h = HSIC(n_designs=48, width=0.7, sampler="sobol", output="logit")
    inter = h.interactions(Tab(), x, None)
    single = h.last_info["hsic"][0]
    # Recompute the designs and outputs exactly as the method did.
    _layout, xd, yd = HSIC(n_designs=48, width=0.7, sampler="sobol", output="logit")._scores(Tab(), x, None)
    ref_single, ref_inter = _hsic_brute(xd, yd[0], 0.7)
    torch.testing.assert_close(single, ref_single, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(inter[0], ref_inter, atol=1e-12, rtol=1e-9)
    # The strongest interaction is the planted pair (0, 1).
    off = inter[0].clone()
    off.fill_diagonal_(-1.0)
    i, j = divmod(int(off.argmax()), 5)
    assert {i, j} == {0, 1}
    # attribute() gives the same per-cell scores.
    a = HSIC(n_designs=48, width=0.7, sampler="sobol", output="logit")(Tab(), x, None)
    torch.testing.assert_close(a[0], ref_single)


# ---------------------------------------------------------------------------- seeds, budgets, chunks


ALL_GRID = [
    lambda bs: RISE(n_masks=64, batch_size=bs),
    lambda bs: Sobol(n_designs=4, grid_size=4, batch_size=bs),
    lambda bs: HSIC(n_designs=50, grid_size=4, batch_size=bs),
    lambda bs: Occlusion(window=8, stride=8, batch_size=bs),
]


@pytest.mark.parametrize("make", ALL_GRID, ids=["rise", "sobol", "hsic", "occlusion"])
def test_seed_determinism_rng_untouched_and_batch_size_invariance(make):
    torch.manual_seed(123)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 3])
    state = torch.get_rng_state()
    a = make(32)(model, x, t)
    b = make(32)(model, x, t)
    c = make(1000)(model, x, t)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    m = make(32)
    m.seed = 7
    if not isinstance(m, Occlusion):
        assert not torch.allclose(m(model, x, t), a)


@pytest.mark.parametrize("make", ALL_GRID, ids=["rise", "sobol", "hsic", "occlusion"])
@pytest.mark.parametrize("batch_size", [5, 64])
def test_chunks_and_forward_counts(make, batch_size):
    inner = nn.Sequential(nn.Flatten(), nn.Linear(2 * 16 * 16, 4))
    model = CountingModel(inner)
    x = torch.rand(3, 2, 16, 16)
    method = make(batch_size)
    method(model, x, torch.tensor([0, 1, 2]))
    n = method.n_forwards(tuple(x.shape[1:]))
    assert max(model.calls) <= batch_size
    assert sum(model.calls) == 1 + 3 * n  # 1 row for the target check of __call__
    assert torch.equal(method.last_info["forwards"], torch.full((3,), n))


def test_budget_lowers_sample_counts_and_is_honoured():
    model = CountingModel(nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10)))
    x = torch.rand(2, 1, 32, 32)
    resolve_batch_size("auto", model, x)  # the one-row probe (auto rows, target check), cached per model
    for method, expect in [
        (RISE(budget=300), 300),
        (HSIC(budget=200), 200),
        (Sobol(budget=1000), 8 * 66),  # largest power of two N with N*(64+2) <= 1000
    ]:
        model.calls.clear()
        method(model, x, 3)
        assert method.n_forwards((1, 32, 32)) == expect
        assert sum(model.calls) == 2 * expect <= 2 * method.budget  # the probe was cached above
    assert Occlusion().n_forwards((1, 32, 32)) == 226
    with pytest.raises(ValueError, match="budget"):
        Occlusion(budget=100)(model, x, 3)
    with pytest.raises(ValueError, match="budget"):
        Sobol(budget=100)(model, x, 3)


def test_errors_are_clear():
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(ValueError, match="black-box"):
        RISE()(model, torch.rand(2, 10), 0, create_graph=True)
    with pytest.raises(ValueError, match="output"):
        RISE(output="probability")
    with pytest.raises(ValueError, match="stride"):
        Occlusion(window=2, stride=3)(model, torch.rand(2, 10), 0)
    with pytest.raises(ValueError, match="several class outputs"):
        RISE(n_masks=4, output="softmax")(nn.Linear(10, 1), torch.rand(2, 10), None)


def test_auto_output_explains_regression_models_and_short_dims():
    """Defaults fit any model: ``auto`` is the softmax for classifiers, the raw output for one-output
    models; an int occlusion window is capped at shorter dims."""
    torch.manual_seed(0)
    reg = nn.Linear(10, 1)
    x = torch.rand(3, 10)
    for method in (RISE(n_masks=64), Sobol(n_designs=8), HSIC(n_designs=64)):
        a = method(reg, x, None)
        assert a.shape[0] == 3 and torch.isfinite(a).all()
        assert method.output == "auto"
    clf = nn.Linear(10, 4)
    t = torch.tensor([0, 1, 2])
    auto = RISE(n_masks=64)(clf, x, t)
    torch.testing.assert_close(auto, RISE(n_masks=64, output="softmax")(clf, x, t))
    seq = torch.rand(2, 12, 3)  # (B, C, T) with T = 3 < the default window 4
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    occ = Occlusion()(net, seq, torch.tensor([0, 1]))
    assert occ.shape == seq.shape and torch.isfinite(occ).all()


def test_registry_and_hydra_configs():
    for name, cls in [("occlusion", Occlusion), ("rise", RISE), ("sobol", Sobol), ("hsic", HSIC)]:
        assert ATTRIBUTIONS.get(name) is cls
        assert isinstance(build_attributor(name), cls)
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "attribution"
    for name, cls in [("occlusion", Occlusion), ("rise", RISE), ("sobol", Sobol), ("hsic", HSIC)]:
        obj = instantiate(OmegaConf.load(conf / f"{name}.yaml"))
        assert isinstance(obj, cls)


def test_rise_estimator_closed_form_on_a_linear_model():
    """Tabular RISE with independent Bernoulli(p) masks on f(x) = w·x: E[1/(N p) Σ f(x⊙M) M_i]
    = w_i x_i + p Σ_{j≠i} w_j x_j. Catches a wrong normalisation or output (scale-free tests cannot)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 1, bias=False).double()
    x = torch.rand(2, 6, dtype=torch.float64) + 0.5
    p = 0.3
    a = RISE(n_masks=40000, p=p, output="logit", batch_size=None)(lin, x, None)
    wx = lin.weight[0].detach() * x
    expected = wx + p * (wx.sum(1, keepdim=True) - wx)
    torch.testing.assert_close(a, expected, atol=0.03 * float(wx.abs().sum(1).max()), rtol=0)


def test_default_costs():
    assert Sobol().n_forwards((1, 32, 32)) == 2112  # N (g² + 2) with g = 8, N = 32
    assert RISE().n_forwards((1, 32, 32)) == 4000
