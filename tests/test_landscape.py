"""Energy-landscape conserved weights (Niroomand & Wales 2023): matching, alignment, drivers, no side effects."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.analysis import (
    align_layers,
    basin_hopping,
    conserved_feature_scores,
    deduplicate_minima,
    hungarian,
    landscape_analysis,
    layer_chain,
)
from explain_callbacks.analysis.landscape import _join, _split

DRIVERS = (2, 7, 13)


def _drivers_data(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """20 standard-normal features; the label is the sign of x2 + x7 - x13 (the other 17 are noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = ((x[:, 2] + x[:, 7] - x[:, 13]) > 0).long()
    return x, y


def _trained_mlp(
    act: type[nn.Module] = nn.Tanh, hidden: int = 8, steps: int = 200
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = _drivers_data()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, hidden), act(), nn.Linear(hidden, 2))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m, x, y


# ---------------------------------------------------------------------------------------------- matching
def test_hungarian_is_optimal_against_brute_force_and_scipy():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for _ in range(5):
            c = rng.normal(size=(n, n))
            perm = hungarian(c)
            assert sorted(perm.tolist()) == list(range(n))
            best = min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert c[np.arange(n), perm].sum() == pytest.approx(best, abs=1e-12)
    # ties (integer costs) and a larger case against scipy's linear_sum_assignment (dev dependency)
    sp = pytest.importorskip("scipy.optimize")
    for c in (rng.integers(0, 4, size=(12, 12)).astype(float), rng.normal(size=(40, 40))):
        rows, cols = sp.linear_sum_assignment(c)
        assert c[np.arange(c.shape[0]), hungarian(c)].sum() == pytest.approx(c[rows, cols].sum(), abs=1e-9)
    with pytest.raises(ValueError, match="square"):
        hungarian(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------- alignment
def _layers(model: nn.Module):
    return [(m.weight.detach().double(), m.bias.detach().double()) for m in layer_chain(model)]


def _permuted_copy(model: nn.Module, flip: bool, seed: int = 1) -> nn.Module:
    """The same function with every hidden layer's units permuted (and sign-flipped, for odd activations)."""
    g = torch.Generator().manual_seed(seed)
    twin = copy.deepcopy(model)
    chain = layer_chain(twin)
    with torch.no_grad():
        for a, b in itertools.pairwise(chain):
            units = a.weight.shape[0]
            perm = torch.randperm(units, generator=g)
            sign = torch.where(torch.rand(units, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(units)
            a.weight.copy_(a.weight[perm] * sign.reshape(-1, *([1] * (a.weight.ndim - 1))))
            a.bias.copy_(a.bias[perm] * sign)
            w = b.weight.reshape(b.weight.shape[0], units, -1)
            b.weight.copy_((w[:, perm] * sign[None, :, None]).reshape(b.weight.shape))
    return twin


@pytest.mark.parametrize(
    "build, flip",
    [
        (lambda: nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)), True),
        (lambda: nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), False),
        (
            lambda: nn.Sequential(
                nn.Conv2d(2, 5, 3), nn.Tanh(), nn.Conv2d(5, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)
            ),
            True,
        ),
    ],
    ids=["tanh-mlp", "relu-mlp", "tanh-cnn"],
)
def test_alignment_makes_permuted_copies_identical(build, flip):
    torch.manual_seed(0)
    model = build()
    twin = _permuted_copy(model, flip)
    x = torch.randn(16, 20) if isinstance(model[0], nn.Linear) else torch.randn(16, 2, 6, 6)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)  # the same function
    ref, other = _layers(model), _layers(twin)
    assert not torch.equal(_join(ref), _join(other))  # the copy differs before alignment
    aligned = align_layers(ref, other, sign_flips=flip)
    assert torch.equal(_join(aligned), _join(ref))  # identical after it: indexing and signs only
    if flip:  # without sign flips a sign-flipped copy cannot be aligned
        assert not torch.equal(_join(align_layers(ref, other, sign_flips=False)), _join(ref))


def test_split_join_roundtrip_and_unsupported_layers():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    shapes = [(m.weight.shape, m.bias.shape) for m in layer_chain(model)]
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert torch.equal(_join(_split(vec, shapes)), vec)
    with pytest.raises(ValueError, match=r"BatchNorm1d.*align=False"):
        layer_chain(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="not a chain"):
        layer_chain(nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 2)))


def test_deduplicate_keeps_the_lowest_of_near_copies():
    a = torch.zeros(4, 5, dtype=torch.float64)
    a[1] += 1e-5  # the same minimum as row 0, slightly higher loss
    a[2] += 1.0  # another minimum at the same loss
    a[3] += 1e-5
    losses = torch.tensor([0.3, 0.3 + 1e-8, 0.3, 0.5], dtype=torch.float64)
    assert deduplicate_minima(a, losses, loss_tol=1e-6, dist_tol=1e-3).tolist() == [0, 2, 3]


def test_scores_closed_form():
    # two minima, one hidden unit, three features: conserved-large, varying, near zero
    w = torch.tensor([[[2.0, 1.0, 0.0]], [[2.0, -1.0, 0.0]]], dtype=torch.float64)
    s = conserved_feature_scores(w)
    torch.testing.assert_close(s.score, torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(s.conservation, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(s.magnitude, torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- sampling
def test_three_drivers_rank_first():
    model, x, y = _trained_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    res = landscape_analysis(model, x, y, n_hops=8, weight_decay=1e-3, seed=0)
    assert set(res.ranking[:3].tolist()) == set(DRIVERS)
    assert res.sign_flips  # tanh: sign flips on by "auto"
    assert res.sample.n_minimisations == 9 and bool(res.sample.converged.all())
    assert res.n_unique >= 2 and res.group.numel() >= 2
    assert res.embedding.shape == (res.n_unique, 2)
    # the drivers' weights are the conserved ones
    drivers = torch.tensor(DRIVERS)
    noise = torch.tensor([i for i in range(20) if i not in DRIVERS])
    assert float(res.scores.conservation[drivers].min()) > float(res.scores.conservation[noise].median())
    # the model and the global RNG are untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(p.grad, g) and p.requires_grad for p, g in zip(model.parameters(), grads))


def test_basin_hopping_is_seeded_and_quenches_snapshots():
    model, x, y = _trained_mlp(steps=60)
    snap = torch.nn.utils.parameters_to_vector(model.parameters()).detach() * 0.5
    a = basin_hopping(model, x[:200], y[:200], n_hops=3, seed=5, starts=[snap], weight_decay=1e-3)
    b = basin_hopping(model, x[:200], y[:200], n_hops=3, seed=5, starts=[snap], weight_decay=1e-3)
    c = basin_hopping(model, x[:200], y[:200], n_hops=3, seed=6, weight_decay=1e-3)
    assert torch.equal(a.minima, b.minima) and not torch.equal(a.minima[1:4], c.minima[1:4])
    assert a.origin == ["model", "hop", "hop", "hop", "snapshot"] and a.n_minimisations == 5
    assert bool((a.grad_norms <= 1e-4).all()) and a.n_evaluations >= 5
    assert a.step_sizes.tolist() == [0.0, 0.3, 0.3, 0.3, 0.0]  # adapted after 5 hops only
    # chunked full-batch loss: the same minima with another batch_size
    d = basin_hopping(model, x[:200], y[:200], n_hops=3, seed=5, starts=[snap], weight_decay=1e-3, batch_size=64)
    torch.testing.assert_close(d.losses, a.losses, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="temperature > 0"):
        basin_hopping(model, x, y, temperature=0.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        basin_hopping(model, x, y, loss="hinge")


def test_step_size_adapts_to_the_acceptance_rate():
    model, x, y = _trained_mlp(steps=60)
    x, y = x[:100], y[:100]
    # a huge temperature accepts everything: the step grows by 1/0.9 every 2 hops
    hot = basin_hopping(model, x, y, n_hops=6, seed=0, temperature=1e6, adapt_interval=2, weight_decay=1e-3)
    expected = torch.tensor([0.3, 0.3, 0.3 / 0.9, 0.3 / 0.9, 0.3 / 0.81, 0.3 / 0.81], dtype=torch.float64)
    torch.testing.assert_close(hot.step_sizes[1:], expected)
    fixed = basin_hopping(model, x, y, n_hops=4, seed=0, temperature=1e6, adapt_interval=None, weight_decay=1e-3)
    assert fixed.step_sizes[1:].tolist() == [0.3] * 4


def test_conv_first_layer_scores_per_channel_and_position():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 6, 6, generator=g)
    y = (x[:, 1, 2:4, 2:4].mean((1, 2)) > 0).long()  # channel 1 drives the label
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    res = landscape_analysis(model, x, y, n_hops=3, weight_decay=1e-3, max_iter=300)
    assert res.scores.score.shape == (2, 3, 3)
    assert res.channel_scores.shape == (2,) and float(res.channel_scores[1]) > float(res.channel_scores[0])


def test_a_window_falling_back_into_one_basin_doubles_the_step():
    """A convex landscape (a linear model with L2) has one minimum: every hop falls back into it. The acceptance rule
    alone grew the step by 1/0.9 per window (those hops are accepted), so a basin deeper than the step was never
    left; a window whose every hop fell back doubles the step."""
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(5, 2))
    s = basin_hopping(model, x, y, n_hops=6, seed=0, adapt_interval=2, weight_decay=1e-2)
    torch.testing.assert_close(s.step_sizes[1:], torch.tensor([0.3, 0.3, 0.6, 0.6, 1.2, 1.2], dtype=torch.float64))
    assert float((s.minima - s.minima[0]).pow(2).mean(1).sqrt().max()) <= 1e-3  # one minimum, found by every hop
