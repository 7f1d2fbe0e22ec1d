"""The black-box methods' work besides model calls (issue 22, item 2): block-rendered masks and grouped
scoring in ``masked_scores``, HSIC's series factor of the output Gram, Sobol's estimators and RISE's
float64 sums, each against a naive reference (explicit loops over masks and explicit p×p kernels)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from explain_callbacks._internal import masks as masks_mod
from explain_callbacks._internal.masks import (
    make_substrate,
    mask_layout,
    masked_scores,
    render_masks,
    score_outputs,
    sobol_points,
)
from explain_callbacks.attribution import HSIC, RISE, Sobol
from explain_callbacks.attribution.blackbox.hsic import SERIES_TOL, _series_terms


def _mlp(d: int = 6, k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, k)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)
    ).eval()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    """Equal to ``rel`` of the largest magnitude (float32 model calls differ by rounding only)."""
    a, b = a.double(), b.double()
    scale = max(float(b.abs().max()), 1e-30)
    assert float((a - b).abs().max()) <= rel * scale, (float((a - b).abs().max()), scale)


# ------------------------------------------------------------------------------- masked_scores


def _naive_scores(model, x, target, all_masks, s, output):
    """One model call per (sample, mask): f(s + (x − s)·M)."""
    out = torch.empty(x.shape[0], all_masks.shape[0], dtype=x.dtype)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for k in range(all_masks.shape[0]):
                row = (s[i] + (x[i] - s[i]) * all_masks[k]).unsqueeze(0)
                out[i, k] = score_outputs(model(row), None if target is None else target[i : i + 1], output)[0]
    return out


@pytest.mark.parametrize("substrate", ["zeros", "mean"])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_masked_scores_equal_one_call_per_mask(monkeypatch, substrate, small_blocks):
    if small_blocks:  # several render blocks and several scoring groups per block
        monkeypatch.setattr(masks_mod, "RENDER_ELEMENTS", 40)
        monkeypatch.setattr(masks_mod, "SCORE_ELEMENTS", 20)
    model = _cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 2, 8, 8, generator=g)
    t = torch.tensor([0, 4, 2, 1, 3])
    layout = mask_layout(x, 3)
    designs = torch.rand(23, layout.d, generator=g)
    s = make_substrate(x, substrate)
    seen: list[tuple[slice, slice]] = []
    total = torch.zeros(5, 64, dtype=torch.float64)

    def accumulate(ssl, msl, m, sc):
        seen.append((ssl, msl))
        total[ssl] += sc.double() @ m.reshape(m.shape[0], -1).double()

    render = lambda sl: render_masks(designs[sl], layout, "bilinear")  # noqa: E731
    got = masked_scores(model, x, t, 23, render, s, batch_size=7, output="softmax", accumulate=accumulate)
    all_masks = render(slice(0, 23))
    want = _naive_scores(model, x, t, all_masks, s, "softmax")
    _close(got, want)
    # every (sample, mask) pair reached accumulate exactly once, with its own masks
    hits = torch.zeros(5, 23, dtype=torch.long)
    for ssl, msl in seen:
        hits[ssl, msl] += 1
    assert bool((hits == 1).all())
    _close(total, want.double() @ all_masks.reshape(23, -1).double())
    if small_blocks:
        assert len({msl.start for _, msl in seen}) > 3


@pytest.mark.parametrize(("b", "bs", "zero"), [(8, 18, True), (5, 3, False), (6, 6, True), (4, 1000, False)])
def test_masked_scores_flat_calls_of_exactly_batch_size_rows(monkeypatch, b, bs, zero):
    # the (mask, sample) rows are one flat sequence cut into calls of batch_size rows: B = 8 and
    # batch_size=18 give calls of 18 rows (whole masks would give 16), B = 5 and 3 rows cut masks apart
    monkeypatch.setattr(masks_mod, "ROW_ELEMENTS", 200)  # several blocks, each a whole number of calls
    model = _mlp()
    sizes: list[int] = []
    h = model.register_forward_pre_hook(lambda _m, a: sizes.append(a[0].shape[0]))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, 6, generator=g)
    t = torch.arange(b) % 3
    n = 11
    all_masks = torch.rand(n, 6, generator=g)
    s = torch.zeros_like(x) if zero else make_substrate(x, "mean")
    seen = torch.zeros(b, n, dtype=torch.long)
    fm = torch.zeros(b, 6, dtype=torch.float64)

    def accumulate(ssl, msl, m, sc):
        assert m.shape[0] == msl.stop - msl.start and sc.shape == (ssl.stop - ssl.start, m.shape[0])
        seen[ssl, msl] += 1
        fm[ssl] += sc.double() @ m.double()

    got = masked_scores(model, x, t, n, lambda sl: all_masks[sl], s, batch_size=bs, output="softmax",
                        accumulate=accumulate)  # fmt: skip
    h.remove()
    rows = n * b
    assert sizes == [min(bs, rows)] * (rows // min(bs, rows)) + ([rows % bs] if rows % min(bs, rows) else [])
    want = _naive_scores(model, x, t, all_masks, s, "softmax")
    _close(got, want)
    assert bool((seen == 1).all())
    _close(fm, want.double() @ all_masks.double())


def test_masked_scores_with_a_target_operator_cut_across_masks():
    from explain_callbacks.targets import ClassTarget

    model = _mlp()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([2, 0, 1, 1, 0])
    masks = torch.rand(7, 6, generator=torch.Generator().manual_seed(6))
    op = ClassTarget(t).bind(5)
    got = masked_scores(model, x, op, 7, lambda sl: masks[sl], None, batch_size=4, output="softmax")
    _close(got, _naive_scores(model, x, t, masks, torch.zeros_like(x), "softmax"))


def test_masked_scores_render_masks_once_per_block_not_per_call():
    model = _mlp()
    x = torch.rand(4, 6)
    calls: list[int] = []

    def render(sl):
        calls.append(sl.stop - sl.start)
        return torch.ones(sl.stop - sl.start, 6)

    masked_scores(model, x, torch.zeros(4, dtype=torch.long), 400, render, None, batch_size=8, output="logit")
    assert calls == [400]  # 200 model calls of 2 masks, one render


# ------------------------------------------------------------------------------- HSIC


def _hsic_naive(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """HSIC_i = (1/p²) Σ (HK_iH) ⊙ (HLH) with explicit p×p kernels, float64; y (B, p), w (B,)."""
    p, d = x.shape
    x = x.double()
    H = torch.eye(p, dtype=torch.float64) - 1.0 / p
    K = 0.5 - (x[:, None, :] - x[None, :, :]) ** 2
    out = torch.empty(y.shape[0], d, dtype=torch.float64)
    for b in range(y.shape[0]):
        yb = y[b].double()
        Lt = H @ torch.exp(-((yb[:, None] - yb[None, :]) ** 2) / (2 * float(w[b]) ** 2)) @ H
        for i in range(d):
            out[b, i] = ((H @ K[:, :, i] @ H) * Lt).sum() / p**2
    return out


@pytest.mark.parametrize(
    "spread, width, series",
    [
        (0.05, "median", True),  # probabilities near 0.5: a few terms of the series
        (0.3, "std", True),  # outputs about two widths apart: tens of terms
        (2.0, 0.01, False),  # outputs hundreds of widths apart: the dense Gram
        (0.2, "median_distance", False),  # K about p/4 at p = 160: the dense Gram
    ],
)
def test_hsic_estimate_equals_explicit_kernels(spread, width, series):
    g = torch.Generator().manual_seed(3)
    p, d = 160, 7
    x = (torch.rand(p, d, generator=g) < 0.5).float()
    y = (0.5 + spread * torch.randn(3, p, generator=g, dtype=torch.float64)).float()
    h = HSIC(width=width)
    assert (h._gram_factor(y) is not None) == series
    got = h.estimate(x, y)
    assert got.dtype == y.dtype
    want = _hsic_naive(x, y, h._width(y.double()))
    _close(got, want)
    _close(h.estimate(x, y.double()), want, rel=1e-9)  # float64 all through: to float64 rounding


def test_hsic_attribution_equals_the_explicit_estimator_on_a_tabular_model():
    model = _mlp(d=6, k=2)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 1, 0])
    h = HSIC(n_designs=120, seed=5)
    a = h(model, x, t)
    _, xd, yd = HSIC(n_designs=120, seed=5)._scores(model, x, t)
    want = _hsic_naive(xd, yd, h._width(yd.double()))
    _close(a, want)


def test_series_terms_leave_a_poisson_tail_below_the_tolerance():
    scipy_stats = pytest.importorskip("scipy.stats")
    for lam in (0.0, 1e-3, 0.5, 3.0, 40.0, 300.0):
        k = _series_terms(lam)
        assert k is not None and k >= math.ceil(lam)
        if lam > 0:
            assert scipy_stats.poisson.sf(k, lam) <= SERIES_TOL
            assert k == math.ceil(lam) or scipy_stats.poisson.sf(k - 3, lam) > SERIES_TOL  # not far too long
    assert _series_terms(float("inf")) is None
    assert _series_terms(1e7) is None  # beyond the limit: the dense Gram


# ------------------------------------------------------------------------------- Sobol, RISE


def _sobol_naive(model, x, t, n, grid, seed):
    """Jansen total / Saltelli first-order indices, one model call per sample and design."""
    layout = mask_layout(x, grid)
    d = layout.d
    gen = Sobol(seed=seed).generator(x.device)
    ab = sobol_points(n, 2 * d, gen, dtype=x.dtype)
    a, b = ab[:, :d], ab[:, d:]

    def f(design):
        m = render_masks(design.unsqueeze(0), layout, "nearest")[0]
        return _naive_scores(model, x, t, m.unsqueeze(0), torch.zeros_like(x), "auto")[:, 0].double()

    fa = torch.stack([f(a[j]) for j in range(n)], 1)
    fb = torch.stack([f(b[j]) for j in range(n)], 1)
    total = torch.empty(x.shape[0], d, dtype=torch.float64)
    first = torch.empty_like(total)
    var = fa.var(1, correction=1).clamp_min(1e-12)
    for i in range(d):
        c = a.clone()
        c[:, i] = b[:, i]
        fc = torch.stack([f(c[j]) for j in range(n)], 1)
        total[:, i] = ((fa - fc) ** 2).sum(1) / (2 * n * var)
        first[:, i] = (fb * (fc - fa)).sum(1) / (n * var)
    return total, first


@pytest.mark.parametrize("image", [False, True])
def test_sobol_equals_a_loop_over_designs(image):
    # float64 model and inputs: the variance of 8 designs amplifies float32 rounding of single-row calls
    model, x = (_cnn(), torch.rand(2, 2, 8, 8)) if image else (_mlp(), torch.randn(3, 6))
    model, x = model.double(), x.double()
    t = torch.arange(x.shape[0])
    s = Sobol(n_designs=8, grid_size=3, seed=2, batch_size=13)
    s(model, x, t)
    total, first = _sobol_naive(model, x, t, 8, 3, 2)
    _close(s.last_info["total"].reshape(x.shape[0], -1), total)
    _close(s.last_info["first_order"].reshape(x.shape[0], -1), first)


def test_centred_rise_equals_a_float64_loop_over_masks():
    model = _cnn().double()  # float64: centring amplifies float32 rounding of single-row calls
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([1, 0, 3])
    r = RISE(n_masks=50, grid_size=3, center=True, substrate="mean", seed=1, batch_size=16)
    got = r(model, x, t)
    # the same masks, drawn as the method draws them (a render of all 50 at once)
    rec: list[torch.Tensor] = []
    orig = masks_mod.masked_scores

    def spy(model_, inputs, target, n, render, sub, **kw):
        rec.append(render(slice(0, n)))
        return orig(model_, inputs, target, n, render, sub, **kw)

    import explain_callbacks.attribution.blackbox.rise as rise_mod

    rise_mod.masked_scores, saved = spy, rise_mod.masked_scores
    try:
        RISE(n_masks=50, grid_size=3, center=True, substrate="mean", seed=1, batch_size=16)(model, x, t)
    finally:
        rise_mod.masked_scores = saved
    m = rec[0].double()
    f = _naive_scores(model, x, t, rec[0], make_substrate(x, "mean"), "auto").double()
    want = ((f - f.mean(1, keepdim=True)) @ m.reshape(50, -1)) / (50 * 0.5)
    _close(got.reshape(3, -1), want)


def test_target_probability_without_the_softmax_equals_the_softmax():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 4, generator=g) * 10
    z[0] = torch.tensor([200.0, -200.0, 0.0, 0.0])  # probabilities of 1 and 0
    t = torch.randint(0, 4, (500,), generator=g)
    t[0] = 0
    for output, ref in (("softmax", z.softmax(1)), ("log_softmax", z.log_softmax(1))):
        want = ref.gather(1, t[:, None])[:, 0]
        got = score_outputs(z, t, output)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.enable_grad():  # differentiable callers keep the softmax itself
        zg = z.clone().requires_grad_(True)
        assert score_outputs(zg, t, "softmax").grad_fn is not None


def test_cached_sobol_points_equal_a_fresh_engine_and_are_copies():
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    a = sobol_points(16, 12, g1)
    seed = int(torch.randint(0, 2**62, (1,), generator=g2).item()) % (2**31 - 1)
    fresh = torch.quasirandom.SobolEngine(12, scramble=True, seed=seed).draw(16, dtype=torch.float64)
    torch.testing.assert_close(a, fresh.float(), rtol=0, atol=0)
    a.zero_()  # the caller's copy: the cache is untouched
    b = sobol_points(16, 12, torch.Generator().manual_seed(11))
    torch.testing.assert_close(b, fresh.float(), rtol=0, atol=0)
