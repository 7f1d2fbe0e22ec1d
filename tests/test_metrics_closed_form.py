"""Closed-form and planted cases: on a linear model with known weights the true map wins deletion,
insertion, µ-fidelity and ABC with the exact curves, a random map scores near chance; infidelity,
completeness and sensitivity vanish where the math says so; localisation and the Dabkowski metric on
planted maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from explain_callbacks.attribution import InputXGradient, IntegratedGradients, Saliency
from explain_callbacks.metrics import functional as MF
from explain_callbacks.metrics.functional.dabkowski import crop_resize, largest_component, saliency_boxes

from .references import import_quantus

C, H, W, K = 2, 6, 6, 3


class Linear(nn.Module):
    def __init__(self, k: int = K, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(k, C * H * W, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(k, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def _batch(b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, C, H, W, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (b,), generator=g)
    return x, y


def _true_map(model: Linear, x, y):
    return x * model.weight[y].view(-1, C, H, W)


def test_deletion_and_insertion_curves_match_closed_form_and_true_map_wins():
    model = Linear()
    x, y = _batch()
    a = _true_map(model, x, y)
    fx = model(x).gather(1, y[:, None])[:, 0]
    f0 = model.bias[y]
    for features, contrib in (("element", a.flatten(1)), ("pixel", a.sum(1).flatten(1))):
        top = contrib.sort(1, descending=True).values.cumsum(1)
        top = torch.cat([torch.zeros(x.shape[0], 1, dtype=top.dtype), top], 1)
        d_auc, d_curve, _xs = MF.deletion(model, x, a, y, substrate="zeros", step=1, features=features,
                                         output="logit", return_curve=True)  # fmt: skip
        torch.testing.assert_close(d_curve, fx[:, None] - top, atol=1e-10, rtol=0)
        i_auc, i_curve, _ = MF.insertion(model, x, a, y, substrate="zeros", step=1, features=features,
                                         output="logit", return_curve=True)  # fmt: skip
        torch.testing.assert_close(i_curve, f0[:, None] + top, atol=1e-10, rtol=0)
        # Any other order gives a higher deletion and a lower insertion curve (greedy is optimal).
        g = torch.Generator().manual_seed(7)
        for _ in range(5):
            r = torch.randn(a.shape, generator=g, dtype=torch.float64)
            kw = dict(substrate="zeros", step=1, features=features, output="logit")
            assert (MF.deletion(model, x, r, y, **kw) >= d_auc - 1e-12).all()
            assert (MF.insertion(model, x, r, y, **kw) <= i_auc + 1e-12).all()


def test_random_map_scores_near_chance():
    """E[deletion AUC] under a random order is (f(x) + f(0)) / 2 for an additive model."""
    model = Linear()
    x, y = _batch(b=16)
    fx = model(x).gather(1, y[:, None])[:, 0]
    f0 = model.bias[y]
    g = torch.Generator().manual_seed(3)
    aucs = torch.stack([
        MF.deletion(model, x, torch.randn(x.shape, generator=g, dtype=torch.float64), y, substrate="zeros",
                    features="element", n_steps=72, output="logit")
        for _ in range(20)
    ])  # fmt: skip
    chance = (fx + f0) / 2
    spread = (fx - f0).abs().mean()
    assert (aucs.mean(0) - chance).abs().mean() < 0.1 * spread
    # ABC of random maps is ~0, of the true map positive (insertion and deletion).
    a = _true_map(model, x, y)
    for mode in ("insertion", "deletion"):
        true_abc = MF.abc(model, x, a, y, mode=mode, features="element", n_steps=72)
        rnd = torch.stack([
            MF.abc(model, x, torch.randn(x.shape, generator=g, dtype=torch.float64), y, mode=mode,
                   features="element", n_steps=72)
            for _ in range(10)
        ]).mean(0)  # fmt: skip
        assert (true_abc > 0).all()
        assert rnd.abs().mean() < 0.2 * true_abc.mean()


def test_abc_closed_form_for_regression():
    """Insertion ABC from the zero baseline: ∫ (S(t) − t·S(1)) dt with S the sorted cumulative contributions."""
    model = Linear(k=1)
    x, _ = _batch(b=4)
    a = x * model.weight.view(1, C, H, W)
    score = MF.abc(model, x, a, None, mode="insertion", features="element", step=1)
    contrib = a.flatten(1).sort(1, descending=True).values.cumsum(1)
    s = torch.cat([torch.zeros(4, 1, dtype=contrib.dtype), contrib], 1)
    t = torch.linspace(0, 1, s.shape[1], dtype=s.dtype)
    expected = torch.trapezoid(s - t * s[:, -1:], t, dim=1)
    torch.testing.assert_close(score, expected, atol=1e-10, rtol=0)


def test_mufidelity_is_one_for_the_true_map_and_near_zero_for_random():
    model = Linear()
    x, y = _batch(b=6)
    a = _true_map(model, x, y)
    for kw in ({"correlation": "pearson", "subset_size": 20}, {"grid_size": 3, "drop_prob": 0.3}):
        mu = MF.mufidelity(model, x, a, y, baseline="zeros", output="logit", n_subsets=50, **kw)
        if "grid_size" not in kw:
            torch.testing.assert_close(mu, torch.ones_like(mu), atol=1e-10, rtol=0)
        else:  # grid subsets cover every channel of a cell: Σ_S of the channel-summed map is exact too
            torch.testing.assert_close(mu, torch.ones_like(mu), atol=1e-10, rtol=0)
    # A random map's correlation is that of its values with the true contributions: zero on average.
    g = torch.Generator().manual_seed(9)
    rnd = torch.stack([
        MF.mufidelity(model, x, torch.randn(x.shape, generator=g, dtype=torch.float64), y, n_subsets=100,
                      subset_size=20, output="logit", seed=i)
        for i in range(10)
    ])  # fmt: skip
    assert rnd.mean().abs() < 0.06 and rnd.abs().max() < 0.7
    xpl = MF.mufidelity(model, x, a, y, preset="xplique")  # Spearman of an exact linear relation: 1
    torch.testing.assert_close(xpl, torch.ones_like(xpl), atol=1e-10, rtol=0)


@pytest.mark.parametrize("perturbation", ["gaussian", "square", "patch_sequence"])
def test_infidelity_vanishes_for_the_gradient_of_a_linear_model(perturbation):
    model = Linear()
    x, y = _batch(b=5)
    grad = model.weight[y].view(-1, C, H, W)
    kw = dict(perturbation=perturbation, n_perturb=12, patch_size=3, output="logit")
    assert MF.infidelity(model, x, grad, y, **kw).abs().max() < 1e-20
    wrong = MF.infidelity(model, x, _true_map(model, x, y), y, **kw)
    assert (wrong > 1e-4).all()
    # Optimal rescaling removes a constant factor.
    assert MF.infidelity(model, x, 3.0 * grad, y, normalize=True, **kw).abs().max() < 1e-20
    assert (MF.infidelity(model, x, 3.0 * grad, y, **kw) > 1e-4).all()


def test_gaussian_infidelity_equals_its_definition_whatever_the_chunking():
    """The Gaussian draws (run by run from the seeded generator) and (IᵀA − (f(x) − f(x − I)))² written
    out directly; whatever the calls (all rows, calls cut across runs, parts of a run) the same."""
    model = Linear()
    x, y = _batch(b=5)
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    g = torch.Generator().manual_seed(7)
    noise = torch.stack([torch.empty_like(x).normal_(0.0, 0.1, generator=g) for _ in range(6)], 1)
    fx = model(x).gather(1, y[:, None])[:, 0]
    fxi = torch.stack([model(x - noise[:, r]).gather(1, y[:, None])[:, 0] for r in range(6)], 1)
    ref = ((noise.flatten(2) * a.flatten(1)[:, None]).sum(2) - (fx[:, None] - fxi)).pow(2).mean(1)
    for bs in (None, 12, 5, 3):
        got = MF.infidelity(model, x, a, y, n_perturb=6, noise_std=0.1, seed=7, output="logit", batch_size=bs)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_completeness_error_of_ig_on_a_linear_model_is_zero():
    model = Linear()
    x, y = _batch(b=5)
    ig = IntegratedGradients(n_steps=4)(model, x, y)
    assert MF.completeness_error(model, x, ig, y).max() < 1e-10
    assert (MF.completeness_error(model, x, Saliency()(model, x, y), y) > 1e-3).all()


def test_sensitivity_and_lipschitz_closed_forms():
    model = Linear()
    x, y = _batch(b=5)
    assert MF.max_sensitivity(model, x, y, Saliency(), n_samples=4).max() < 1e-12  # constant gradient
    assert MF.local_lipschitz(model, x, y, Saliency(), n_samples=4).max() < 1e-12
    # A(x) = x: the L-inf change is the noise itself, at most the radius.
    ident = lambda m, inp, t: inp  # noqa: E731
    r = 0.05
    s = MF.max_sensitivity(model, x, y, ident, n_samples=50, radius=r, norm="inf")
    xi = x.flatten(1).abs().amax(1)
    assert (s <= r / xi + 1e-12).all() and (s > 0.9 * r / xi).all()
    # Input x Gradient of a linear model: ‖δ ⊙ w‖ / ‖δ‖ <= max |w|.
    lip = MF.local_lipschitz(model, x, y, InputXGradient(), n_samples=20)
    assert (lip <= model.weight[y].abs().amax(1) + 1e-12).all() and (lip > 0).all()


def test_pointing_game_planted():
    b = 4
    masks = torch.zeros(b, 1, 16, 16)
    masks[:, :, 4:8, 4:8] = 1
    a = torch.zeros(b, 3, 16, 16)
    a[0, :, 5, 5] = 1.0  # inside
    a[1, :, 12, 12] = 1.0  # far outside
    a[2, :, 5, 8] = 1.0  # one pixel right of the mask
    a[3, :, 6, 6] = 1.0
    masks[3] = 0  # empty mask
    hit0 = MF.pointing_game(a, masks, tolerance=0)
    assert hit0[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(hit0[3])
    hit1 = MF.pointing_game(a, masks, tolerance=1)
    assert hit1[:3].tolist() == [1.0, 0.0, 1.0]
    # Default tolerance: 15 px at 224 px, i.e. 1 px at 16 px.
    assert MF.pointing_game(a, masks)[:3].tolist() == [1.0, 0.0, 1.0]


def test_pointing_games_equal_quantus():
    quantus = import_quantus()
    if quantus is None:
        pytest.skip("quantus not installed (the dev extra)")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 1, 10, 10, generator=g)
    m = (torch.rand(6, 1, 10, 10, generator=g) > 0.6).float()
    x = torch.rand(6, 1, 10, 10, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 2)).eval()
    ref = quantus.PointingGame(disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=np.zeros(6, dtype=int), a_batch=a.numpy().copy(),
        s_batch=m.numpy(), device="cpu",
    )  # fmt: skip
    np.testing.assert_allclose(MF.pointing_game(a, m, x, tolerance=0).numpy(), np.array(ref, dtype=float))
    energy = quantus.AttributionLocalisation(disable_warnings=True, abs=False, normalise=False,
                                             positive_attributions=True)  # fmt: skip
    ref = energy(model=model, x_batch=x.numpy(), y_batch=np.zeros(6, dtype=int), a_batch=a.numpy().copy(),
                 s_batch=m.numpy(), device="cpu")  # fmt: skip
    np.testing.assert_allclose(MF.energy_pointing_game(a, m, x).numpy(), np.array(ref, dtype=float), atol=1e-6)


def test_energy_pointing_game_planted():
    a = torch.zeros(2, 2, 8, 8)
    a[:, 0, :4] = 1.0  # 32 positive pixels in the top half, channel 0
    a[:, 1, 4:] = 3.0  # bottom half, channel 1, three times the weight
    a[1, 0, 0, 0] = -100.0  # negative mass is ignored
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, :4] = True
    e = MF.energy_pointing_game(a, masks)
    expected0 = 32.0 / (32.0 + 96.0)
    expected1 = 31.0 / (31.0 + 96.0)
    torch.testing.assert_close(e, torch.tensor([expected0, expected1], dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_largest_component_matches_scipy(backend):
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(4)
    for density in (0.3, 0.45, 0.6, 0.8):
        fg = torch.rand(6, 14, 14, generator=g) < density
        ours = largest_component(fg, backend)
        for i in range(6):  # reference: scipy on each sample alone
            lab, _ = ndimage.label(fg[i].numpy(), structure=np.ones((3, 3)))
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            assert ours[i].sum().item() == sizes.max()
            assert np.array_equal(ours[i].numpy(), lab == sizes.argmax()) or (sizes == sizes.max()).sum() > 1
    snake = torch.zeros(1, 15, 15, dtype=torch.bool)  # one long winding component
    snake[0, ::2, :] = True
    snake[0, 1::4, -1] = True
    snake[0, 3::4, 0] = True
    assert torch.equal(largest_component(snake, backend), snake)
    assert not largest_component(torch.zeros(2, 5, 4, dtype=torch.bool), backend).any()


def test_largest_component_backends_agree_on_ties():
    """The two backends pick the same component, ties included (the first in raster order)."""
    pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(5)
    for h, w, density in ((1, 9, 0.5), (9, 1, 0.5), (7, 11, 0.3), (16, 16, 0.45), (5, 5, 0.2)):
        fg = torch.rand(40, h, w, generator=g) < density
        assert torch.equal(largest_component(fg, "torch"), largest_component(fg, "scipy"))
    ties = torch.zeros(1, 5, 9, dtype=torch.bool)
    ties[0, 3, 5:7] = True  # two components of 2 pixels: the one starting first (row 1) wins
    ties[0, 1, 0:2] = True
    for backend in ("torch", "scipy"):
        assert largest_component(ties, backend)[0, 1, 0:2].all() and largest_component(ties, backend).sum() == 2


def test_dabkowski_metric_planted():
    class Const(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, math.log(3.0)]], dtype=x.dtype).expand(x.shape[0], 2)

    x = torch.rand(3, 3, 16, 16)
    a = torch.zeros(3, 1, 16, 16)
    a[0, 0, 4:12, 6:10] = 1.0  # 8 x 4 box: area 32/256
    a[1, 0, 0:2, 0:2] = 1.0  # 4 px < 5 %: clipped to 0.05
    a[1, 0, 10, 10] = 1.0  # a smaller component elsewhere is ignored
    boxes = saliency_boxes(a, x)
    assert boxes[0].tolist() == [4, 6, 11, 9] and boxes[1].tolist() == [0, 0, 1, 1]
    assert boxes[2].tolist() == [0, 0, 15, 15]  # constant map: the whole image
    s = MF.dabkowski_saliency(Const(), x, a, torch.ones(3, dtype=torch.long))
    p = 0.75
    expected = torch.tensor([math.log(32 / 256) - math.log(p), math.log(0.05) - math.log(p), -math.log(p)])
    torch.testing.assert_close(s, expected.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(crop_resize(x, boxes[2:3].expand(3, 4)), x, atol=1e-6, rtol=0)
    crop = crop_resize(x[:1], torch.tensor([[2, 3, 2, 3]]))  # a single pixel fills the image
    torch.testing.assert_close(crop, x[:1, :, 2:3, 3:4].expand_as(crop), atol=1e-6, rtol=0)
    # Any box: the same as cropping then resizing each sample with F.interpolate.
    boxes = torch.tensor([[1, 2, 9, 14], [0, 0, 4, 3], [5, 7, 15, 8]])
    crops = crop_resize(x, boxes)
    for i, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        ref = torch.nn.functional.interpolate(x[i : i + 1, :, y0 : y1 + 1, x0 : x1 + 1], size=(16, 16),
                                              mode="bilinear", align_corners=False)  # fmt: skip
        torch.testing.assert_close(crops[i : i + 1], ref, atol=1e-5, rtol=0)


def test_saliency_boxes_backends_agree():
    """The boxes computed in NumPy from the scipy labels equal those from the torch component masks:
    random maps, equal values (components tied in size), constant maps (the whole image), thin images."""
    pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(6)
    for h, w in ((16, 16), (7, 11), (1, 9), (9, 1), (2, 2)):
        a = torch.randn(24, 2, h, w, generator=g) * (torch.rand(24, 1, h, w, generator=g) < 0.4)
        a[0] = 0.0
        a[1] = 3.0
        a[2:8] = (torch.rand(6, 1, h, w, generator=g) < 0.3).float()  # 0/1 maps: many equal-size components
        ref = saliency_boxes(a, backend="torch")
        boxes = saliency_boxes(a, backend="scipy")
        assert boxes.dtype == ref.dtype == torch.int64
        assert torch.equal(boxes, ref)
        assert ref[:2].tolist() == [[0, 0, h - 1, w - 1]] * 2  # constant maps: the whole image
    ties = torch.zeros(1, 1, 5, 9)
    ties[0, 0, 3, 5:7] = 1.0  # two components of 2 pixels: the one starting first (row 1) wins
    ties[0, 0, 1, 0:2] = 1.0
    for backend in ("torch", "scipy"):
        assert saliency_boxes(ties, backend=backend).tolist() == [[1, 0, 1, 1]]


def test_crop_resize_equals_interpolate_of_each_crop():
    """Random boxes: the batched matmuls equal cropping each sample and resizing it with F.interpolate
    (float64: to rounding; float32: within 1e-6)."""
    g = torch.Generator().manual_seed(8)
    for h, w in ((16, 16), (7, 12), (1, 5), (13, 1)):
        x = torch.rand(20, 3, h, w, generator=g, dtype=torch.float64)
        y0 = torch.randint(0, h, (20,), generator=g)
        x0 = torch.randint(0, w, (20,), generator=g)
        y1 = y0 + (torch.rand(20, generator=g, dtype=torch.float64) * (h - y0)).long()
        x1 = x0 + (torch.rand(20, generator=g, dtype=torch.float64) * (w - x0)).long()
        boxes = torch.stack([y0, x0, y1, x1], 1)
        crops = crop_resize(x, boxes)
        for i, (a0, b0, a1, b1) in enumerate(boxes.tolist()):
            ref = torch.nn.functional.interpolate(x[i : i + 1, :, a0 : a1 + 1, b0 : b1 + 1], size=(h, w),
                                                  mode="bilinear", align_corners=False)  # fmt: skip
            torch.testing.assert_close(crops[i : i + 1], ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(crop_resize(x.float(), boxes), crops.float(), atol=1e-6, rtol=0)


def test_completeness_soundness_planted_region():
    """A model that reads only the top-left quadrant: a map on that quadrant is complete, a map on
    the opposite quadrant is not."""

    class Quadrant(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = nn.Parameter(torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64) * 10)

        def forward(self, x):
            return (x[:, :1, :4, :4].unsqueeze(1) * self.w).flatten(2).sum(-1)

    model = Quadrant()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    good = torch.zeros_like(x)
    good[:, :, :4, :4] = 1 + torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64)
    bad = torch.zeros_like(x)
    bad[:, :, 4:, 4:] = 1 + torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64)
    bad[:, :, :4, :4] = -1.0  # what the model reads comes last
    calls = []

    def method(m, inp, t):
        calls.append(inp.shape[0])
        return good.repeat(inp.shape[0] // 6, 1, 1, 1)

    c_good, s_good = MF.completeness_soundness(model, x, y, method, good, n_other=None, n_steps=8)
    c_bad, _ = MF.completeness_soundness(model, x, y, method, bad, n_other=2, n_steps=8)
    assert (c_good > c_bad).all()
    assert ((c_good >= 0) & (c_good <= 1) & (s_good >= 0) & (s_good <= 1)).all()
    assert sum(calls) == 6 * (3 + 2)  # K - 1 = 3 other labels, then 2


def test_rankdata_matches_scipy():
    """Average ranks (ties get their mean rank) for every sort path: CPU NumPy sort, float/int, ties,
    constant rows, a tensor with the negative bit set."""
    stats = pytest.importorskip("scipy.stats")
    from explain_callbacks._internal.ops import rankdata, spearman

    g = torch.Generator().manual_seed(0)
    for shape in ((5, 7), (3, 4, 50), (1, 1), (6, 300)):
        for x in (torch.randn(shape, generator=g), torch.randint(0, 4, shape, generator=g).float(), torch.zeros(shape)):
            for xx in (x, x.double(), x.long(), -x.neg()):
                ref = torch.from_numpy(stats.rankdata(xx.numpy(), axis=-1)).double()
                assert torch.equal(rankdata(xx), ref), (shape, xx.dtype)
    a, b = torch.randn(4, 60, generator=g), torch.randn(4, 60, generator=g)
    ref = [stats.spearmanr(a[i].numpy(), b[i].numpy())[0] for i in range(4)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)


def test_rankdata_keyed_sort_matches_scipy():
    """The CPU fast path (one int64 key per float: order-preserving bits above the index) against
    scipy on tied and untied float32/float16/bfloat16 rows: negatives, -0.0 next to +0.0 (one tie), infinities,
    subnormals, long zero runs; and the argsort path on the same values."""
    stats = pytest.importorskip("scipy.stats")
    from explain_callbacks._internal.ops import _sorted_keys_cpu, rankdata

    g = torch.Generator().manual_seed(1)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.0, -3.0, 0.0, -0.0])
    rows = [
        torch.randn(4, 3072, generator=g),
        torch.randint(-3, 4, (5, 257), generator=g).float() * 0.5,
        torch.cat([special, torch.randn(40, generator=g)]).view(2, 25),
        torch.zeros(3, 64),
        torch.randn(2, 3, 33, generator=g).abs(),
        torch.tensor([[1.0, 2.0, 2.0], [2.0, 2.0, 3.0], [5.0, 5.0, 5.0], [4.0, 4.0, 1.0]]),  # runs at row ends
    ]
    for x in rows:
        for xx in (x, x.half(), x.bfloat16(), -x.neg()):
            assert _sorted_keys_cpu(xx) is not None
            ref = torch.from_numpy(stats.rankdata(xx.float().numpy(), axis=-1)).double()
            assert torch.equal(rankdata(xx), ref), (tuple(xx.shape), xx.dtype)
            assert torch.equal(rankdata(xx.double()), ref)  # the argsort path
    nan = torch.tensor([[1.0, float("nan"), 0.5]])
    assert _sorted_keys_cpu(nan) is None  # NaNs: the argsort path, as before
    assert torch.equal(rankdata(nan), rankdata(nan.double()))
    # NaNs of either sign, any payload, in any row, are seen (checked on the sorted rows' ends)
    neg_nan = torch.tensor([-1.0]).view(torch.int32).bitwise_or(0x7FC00001).view(torch.float32)
    for v in (float("nan"), -float("nan"), float(neg_nan), float(-neg_nan)):
        x = torch.tensor([[1.0, 2.0, float("inf")], [-float("inf"), v, 0.0]])
        assert _sorted_keys_cpu(x) is None, v


def test_spearman_to_matches_scipy():
    """Correlation against pre-ranked reference rows (the randomisation check's path: only one side is
    ranked, never scattered) equals scipy's spearmanr on both sort paths, with ties, constant rows, tied
    rows next to untied ones, and signed values."""
    stats = pytest.importorskip("scipy.stats")
    from explain_callbacks._internal.ops import rankdata, spearman_to

    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 500, generator=g)
    b = torch.randn(6, 500, generator=g)
    b[1, :200] = 0.0  # a long tie in one row only
    b[2] = 3.0  # constant: correlation 0 (scipy: nan)
    b[3] = a[3] * 2 + 1  # same order: 1
    b[4] = torch.randint(0, 5, (500,), generator=g).float()  # many ties
    ref = rankdata(a) - 250.5
    ss = torch.linalg.vecdot(ref, ref)
    with np.errstate(invalid="ignore"):
        want = [stats.spearmanr(a[i].numpy(), b[i].numpy())[0] for i in range(6)]
    want = torch.tensor(np.nan_to_num(want, nan=0.0), dtype=torch.float64)
    for bb in (b, b.double(), b[[0, 5]]):  # keyed path, argsort path, no tie in any row
        rows = [0, 5] if bb.shape[0] == 2 else list(range(6))
        torch.testing.assert_close(spearman_to(ref[rows], ss[rows], bb), want[rows], atol=1e-12, rtol=0)


def test_soundness_catches_maps_that_create_evidence():
    """Gupta & Arora's soundness: keeping the top features of a map for a label the input does not
    support must not make the net predict it. On f = W x with label 0 reading features 0-3 and label 1
    features 4-7, inputs bright on 0-3: saliency for label 1 points at 4-7, keeping only those makes
    label 1 likely (unsound); a map that follows the input's own evidence cannot (sound)."""

    w = torch.zeros(2, 8, dtype=torch.float64)
    w[0, :4], w[0, 4:] = 2.0, -2.0
    w[1] = -w[0]
    model = nn.Linear(8, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([1 + 0.2 * torch.rand(5, 4, generator=g), 0.4 + 0.2 * torch.rand(5, 4, generator=g)], 1).double()
    y = torch.zeros(5, dtype=torch.long)

    def saliency(m, inp, t):
        return w[t].expand_as(inp).clone()

    def evidence(m, inp, t):  # the same map whatever the label: the input itself
        return inp.clone()

    comp_s, sound_s = MF.completeness_soundness(model, x, y, saliency, n_other=None, n_steps=8)
    comp_e, sound_e = MF.completeness_soundness(model, x, y, evidence, n_other=None, n_steps=8)
    assert (comp_s > 0.9).all() and (comp_e > 0.9).all()  # both find label 0's evidence
    assert (sound_e > 0.9).all()
    assert (sound_s < 0.5).all()


def test_rank_features_breaks_ties_at_random_but_keeps_the_order():
    from explain_callbacks.metrics.functional._utils import rank_features

    g = torch.Generator().manual_seed(0)
    rel = torch.randint(0, 5, (6, 200), generator=g).float()  # many ties
    r = rank_features(rel)
    assert torch.equal(r.sort(1).values, torch.arange(200).expand(6, -1))  # a permutation per sample
    hi, lo = rel.unsqueeze(2) > rel.unsqueeze(1), r.unsqueeze(2) < r.unsqueeze(1)
    assert lo[hi].all()  # strictly more relevant features always come first
    assert torch.equal(r, rank_features(rel, seed=0)) and not torch.equal(r, rank_features(rel, seed=1))
    idx = rank_features(rel, ties="index")
    assert not torch.equal(r, idx)
    distinct = torch.randn(6, 200, generator=g)  # no ties: the same ranks either way
    assert torch.equal(rank_features(distinct), rank_features(distinct, ties="index"))
    with pytest.raises(ValueError, match="ties"):
        rank_features(rel, ties="first")


def test_an_all_zero_map_deletes_like_a_random_order_not_the_raster_order():
    """f reads only the top rows; an all-zero map has no ranking. Raster-order ties would delete the top
    rows first (a perfect-looking deletion curve); random ties give the random-order expectation, the
    straight line from f(x) to f(0), whose area is their mean (linear f, zero substrate, logits)."""
    h = w = 16
    weight = torch.zeros(1, h, w, dtype=torch.float64)
    weight[:, :4] = 1.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(h * w, 1, bias=False).double())
    with torch.no_grad():
        model[1].weight.copy_(weight.view(1, -1))
    x = torch.ones(8, 1, h, w, dtype=torch.float64)
    zero = torch.zeros_like(x)
    kw = dict(substrate="zeros", n_steps=64, output="logit")
    with torch.no_grad():
        fx = float(model(x[:1]))
    line = MF.deletion(model, x, zero, None, **kw)
    raster = MF.deletion(model, x, zero, None, ties="index", **kw)
    assert raster.max() < 0.2 * fx  # the artefact: the read rows go first
    torch.testing.assert_close(line.mean(), torch.tensor(fx / 2, dtype=torch.float64), rtol=0.08, atol=0)


def test_map_only_metrics_refuse_non_finite_maps():
    a = torch.rand(2, 1, 6, 6)
    a[1, 0, 2, 2] = float("nan")
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[:, :3] = True
    for fn in (lambda: MF.pointing_game(a, masks), lambda: MF.energy_pointing_game(a, masks),
               lambda: MF.sparseness(a), lambda: MF.complexity(a.masked_fill(a.isnan(), float("inf")))):  # fmt: skip
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn()
    assert torch.isfinite(MF.sparseness(a.nan_to_num())).all()
