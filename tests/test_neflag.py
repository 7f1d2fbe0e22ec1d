"""NeFLAG: projected-descent point search (default), antithetic uniform sampling, scale (default) and input
coordinates (blackbox/neflag.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks._internal.batching import output_width
from explain_callbacks.attribution import NeFLAG
from tests.test_blackbox_core import CountingModel


class Bowl(nn.Module):
    """f_0(z) = g·z − ½ c ‖z‖², f_1 = 0: at z = 0 the field on the sphere of radius ε is F = g − cε·n."""

    def __init__(self, g: torch.Tensor, c: float) -> None:
        super().__init__()
        self.register_buffer("g", g)
        self.c = c

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        f = z @ self.g - 0.5 * self.c * (z * z).sum(1)
        return torch.stack([f, torch.zeros_like(f)], 1)


def test_linear_model_one_negative_point_per_pair_and_map_w_squared():
    torch.manual_seed(0)
    lin = nn.Linear(12, 3).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0])
    m = NeFLAG(n_points=7, oversample=2, n_iter=0, antithetic=True, coordinates="input")  # 7 pairs
    m(lin, x, t)
    flux = m.last_info["flux"]
    assert flux.shape == (4, 14) and m.n_forwards((12,)) == 14
    # F = w everywhere: the two members of a pair have opposite flux, so each pair gives exactly one
    # negative-flux point (the reflection of the positive one), and 7 pairs give exactly 7 points.
    torch.testing.assert_close(flux[:, 0::2], -flux[:, 1::2])
    assert ((flux[:, 0::2] < 0) ^ (flux[:, 1::2] < 0)).all()
    assert (m.last_info["n_negative"] == 7).all()
    # Many pairs: E[−n | w·n < 0] ∝ w, so the map ∝ w².
    a = NeFLAG(n_points=4000, oversample=2, n_iter=0, antithetic=True, coordinates="input")(lin, x, t)
    w = lin.weight.detach()[t]
    assert (F.cosine_similarity(a, w**2, dim=1) > 0.99).all()


def test_antithetic_pairs_cancel_the_linear_term_where_both_members_are_negative():
    # On the bowl the flux density at ε·n is g·n − cε, negative wherever g·n < cε: in D = 256 dimensions
    # g·n is about ±‖g‖/16, so with cε = 0.3‖g‖ every candidate is kept. −F_j n_j = −g_j n_j + cε n_j²;
    # a pair (n, −n) sums to 2cε n_j², so the antithetic map does not depend on g at all (the zero-mean
    # term g_j n_j, the larger part of the noise here, cancels exactly), while independent points keep it.
    d = 256
    x = torch.zeros(2, d, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    eps = 0.05 * d**0.5  # radius 0.05 · √D where ‖x‖ = 0
    g1 = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g1 = g1 / g1.norm()
    g2 = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g2 = g2 / g2.norm()
    c = 0.3 / eps  # cε = 0.3, ‖g‖ = 1
    maps = {}
    for anti in (True, False):
        for name, g in (("g1", g1), ("g2", g2)):
            m = NeFLAG(n_points=20, n_iter=0, oversample=3, antithetic=anti, coordinates="input")
            maps[anti, name] = m(Bowl(g, c), x, t)
            assert (m.last_info["n_negative"] == 20).all() and (m.last_info["flux"] < 0).all()
    torch.testing.assert_close(maps[True, "g1"], maps[True, "g2"])
    assert (maps[False, "g1"] - maps[False, "g2"]).abs().max() > 1e-3
    # and the antithetic map is closer to the estimand, cε/D for every feature.
    err = {anti: (maps[anti, "g1"] - c * eps / d).pow(2).mean() for anti in (True, False)}
    assert err[True] < 0.5 * err[False], err


def test_counts_seed_rng_and_model_state():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
    inner.eval()
    model = CountingModel(inner)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 0, 1])
    bn = inner[1].running_mean.clone()
    state = torch.get_rng_state()
    output_width(model, x)  # the one-row probe behind the target check, cached per model: not counted below
    assert model.calls == [1]
    cases = [(3, 3, True, 0, 10), (3, 3, False, 0, 9), (20, 3, True, 0, 60), (1, 3, True, 0, 4), (20, 1, False, 5, 120)]
    for n, over, anti, it, expect in cases:
        model.calls.clear()
        m = NeFLAG(n_points=n, oversample=over, antithetic=anti, n_iter=it, batch_size=7)
        a = m(model, x, t)
        assert m.n_forwards((1, 8, 8)) == expect == m.last_info["flux"].shape[1] * (it + 1)
        # every model row is counted: n_forwards per sample
        assert sum(model.calls) == 5 * expect and max(model.calls) <= 7
        assert torch.equal(m.last_info["forwards"], torch.full((5,), expect))
        kw = dict(n_points=n, oversample=over, antithetic=anti, n_iter=it)
        assert torch.equal(NeFLAG(**kw)(inner, x, t), a)  # same seed
        assert not torch.equal(NeFLAG(**kw, seed=1)(inner, x, t), a)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(inner[1].running_mean, bn) and not inner.training
    assert all(p.grad is None and p.requires_grad for p in inner.parameters())


def test_default_descent_on_linear_model_finds_n_negative_points_and_map_w_squared():
    # The default (n_iter=5 projected descent steps of 0.3 rad from 20 uniform starts, 120 passes): on a
    # linear model every point moves towards −w/‖w‖, so all 20 have negative flux close to −‖w‖ (uniform
    # points in 256 dimensions have flux about ±‖w‖/16, half of them positive) and the map tends to
    # w²/‖w‖; 20 uniform points give a map far from w².
    torch.manual_seed(0)
    lin = nn.Linear(256, 3).double()
    x = torch.randn(4, 256, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0])
    w = lin.weight.detach()[t]
    assert (NeFLAG().n_points, NeFLAG().n_iter, NeFLAG().oversample, NeFLAG().antithetic) == (20, 5, 1, False)
    assert NeFLAG().coordinates == "scale"
    m = NeFLAG(coordinates="input")
    assert m.n_forwards((256,)) == 120
    a = m(lin, x, t)
    assert (m.last_info["n_negative"] == 20).all()
    assert (m.last_info["flux"] < -0.9 * w.norm(dim=1, keepdim=True)).all()
    assert (F.cosine_similarity(a, w**2, dim=1) > 0.99).all()
    uniform = NeFLAG(n_iter=0, coordinates="input")(lin, x, t)
    assert (F.cosine_similarity(uniform, w**2, dim=1) < 0.5).all()


class Recorder(nn.Module):
    """Wraps a model and keeps every input row it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.detach().clone())
        return self.inner(x)


def test_scale_coordinates_on_linear_model_tend_to_squared_gradient_times_input():
    # g(z) = f_c(x ⊙ z) has the constant field G = w ⊙ x on a linear model, so the descended points
    # move towards −G/‖G‖ and the map tends to G²/‖G‖ = (w_j x_j)² / ‖w ⊙ x‖: a function of w_j x_j,
    # zero on the features that are exactly 0 (scaling them changes nothing). The input-coordinate map
    # is w²/‖w‖ instead, which does not see x.
    torch.manual_seed(0)
    lin = nn.Linear(256, 3).double()
    x = torch.randn(4, 256, dtype=torch.float64)
    x[:, ::4] = 0.0  # a quarter of the features exactly zero
    t = torch.tensor([0, 1, 2, 0])
    w = lin.weight.detach()[t]
    G = w * x
    m = NeFLAG()  # coordinates="scale", the default
    assert m.n_forwards((256,)) == 120  # same cost as input coordinates
    a = m(lin, x, t)
    assert (a[:, ::4] == 0).all()
    assert (m.last_info["n_negative"] == 20).all()
    assert (m.last_info["flux"] < -0.9 * G.norm(dim=1, keepdim=True)).all()  # flux of G through the z-sphere
    expect = G**2 / G.norm(dim=1, keepdim=True)
    assert (F.cosine_similarity(a, expect, dim=1) > 0.99).all()
    torch.testing.assert_close(a.sum(1), expect.sum(1), rtol=0.05, atol=0)
    # the input-coordinate map is a different function: w², not (w x)²
    assert (F.cosine_similarity(NeFLAG(coordinates="input")(lin, x, t), expect, dim=1) < 0.9).all()


def test_scale_coordinates_move_each_nonzero_feature_relatively_and_leave_zeros():
    # The points are x ⊙ (1 + ε·u) with u on the unit sphere of the non-zero features and
    # ε = radius · √(their count): the relative change (x' − x)/x has norm radius·√k on the support
    # and zero features stay exactly 0 (their attribution is 0).
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4)).double()
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    x[0, 0, :2] = 0.0
    x[1, 0, :, 3] = 0.0
    x[2] = 0.0  # nothing to scale: an all-zero map
    t = torch.tensor([0, 1, 2])
    rec = Recorder(inner)
    m = NeFLAG(n_points=5, coordinates="scale", radius=0.2, batch_size=1000)
    a = m(rec, x, t)
    pts = torch.cat(rec.rows[1:]).reshape(-1, 3, 36)  # the probe row first; then (points, B, D) per call
    assert pts.shape[0] == 5 * 6
    flat = x.reshape(3, 36)
    support = flat != 0
    assert (pts[:, ~support] == 0).all()
    rel = (pts[:, :2] - flat[:2]) / flat[:2].where(support[:2], torch.ones(()))
    k = support[:2].sum(1).double()
    torch.testing.assert_close(rel.norm(dim=2), (0.2 * k.sqrt()).expand(30, 2))
    assert (a.reshape(3, 36)[~support] == 0).all()
    assert (a.reshape(3, 36)[:2][support[:2]] != 0).any()
    assert torch.equal(a[2], torch.zeros_like(a[2])) and m.last_info["n_negative"][2] == 0


def test_coordinates_are_checked():
    with pytest.raises(ValueError, match="coordinates"):
        NeFLAG(coordinates="log")
