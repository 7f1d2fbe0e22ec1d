"""Meaningful/extremal perturbation, sound masks, NeFLAG and nonlinear saliency (methods.md section 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.attribution import (
    ATTRIBUTIONS,
    MeaningfulPerturbation,
    NeFLAG,
    NonlinearSaliency,
    Saliency,
    SoundMask,
    build_attributor,
)
from tests.test_blackbox_core import NEAR, REGION, CountingModel, Planted, mass_in_region, planted_inputs

# The planted evidence is a checkerboard, which a 1-px shift turns into its opposite: no jitter here.
MP_FAST = dict(n_steps=120, jitter=0)


def test_meaningful_perturbation_deletes_the_planted_region():
    x = planted_inputs(2)
    t = torch.zeros(2, dtype=torch.long)
    a = MeaningfulPerturbation(**MP_FAST)(Planted(), x, t)
    assert a.shape == (2, 1, 32, 32)
    assert (a[:, 0][:, REGION].mean(1) > 0.9).all()  # the evidence is deleted
    assert (mass_in_region(a, NEAR) > 0.6).all(), mass_in_region(a, NEAR)
    assert (a[:, 0][:, ~NEAR].mean(1) < 0.2).all()  # and little else, far from it


def test_extremal_perturbation_preserves_the_planted_region():
    x = planted_inputs(2)
    t = torch.zeros(2, dtype=torch.long)
    method = build_attributor("extremal_perturbation", area=0.0625, **MP_FAST)
    assert isinstance(method, MeaningfulPerturbation) and method.variant == "extremal"
    a = method(Planted(), x, t)
    inside, outside = a[:, 0][:, REGION].mean(1), a[:, 0][:, ~REGION].mean(1)
    assert (inside > 0.6).all() and (outside < 0.1).all(), (inside, outside)  # a 7x7 mask vs an 8x8 px region
    assert (mass_in_region(a, NEAR) > 0.8).all()


def test_sound_mask_keeps_the_evidence_and_learns_per_label():
    x = planted_inputs(2)
    t = torch.zeros(2, dtype=torch.long)
    background = 0.5 + 0.1 * torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    method = SoundMask(reference=background, n_steps=60, n_fills=4)
    a = method(Planted(), x, t)
    assert (mass_in_region(a, REGION) > 0.5).all() and (mass_in_region(a, NEAR) > 0.9).all()
    both = method.attribute_labels(Planted(), x, torch.tensor([[0, 1], [0, 1]]))
    assert both.shape == (2, 2, 1, 32, 32)
    torch.testing.assert_close(both[:, 0], a)
    # For the wrong label 1 the evidence of class 0 must not be kept.
    assert (both[:, 1, 0][:, REGION].mean(1) < both[:, 0, 0][:, REGION].mean(1)).all()
    with pytest.raises(ValueError, match="at least 2"):
        SoundMask(n_steps=1)(Planted(), x[:1], t[:1])


def test_neflag_linear_model_and_planted_region():
    torch.manual_seed(0)
    lin = nn.Linear(20, 4).double()
    x = torch.randn(5, 20, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, 0])
    m = NeFLAG(n_points=5000, n_iter=0, oversample=3, antithetic=True, coordinates="input")  # uniform
    a = m(lin, x, t)
    # Constant field F = w: exactly the points with w·n < 0 are kept, E[−n | w·n < 0] ∝ w, so A ∝ w².
    w = lin.weight.detach()[t]
    assert (F.cosine_similarity(a, w**2, dim=1) > 0.99).all()
    assert (m.last_info["n_negative"] == 5000).all()
    assert m.last_info["flux"].shape == (5, 15000) and m.n_forwards((20,)) == 15000
    # A model reading one region has zero gradient elsewhere: all of the map lies there.
    xp = planted_inputs(2)
    ap = NeFLAG(n_points=4)(Planted(), xp, torch.zeros(2, dtype=torch.long))
    assert (ap[:, 0][:, ~REGION].abs().sum((1,)) == 0).all() and (ap[:, 0][:, REGION].abs().sum(1) > 0).all()


class Saddle(nn.Module):
    """f_0(x) = −½ Σ_j a_j x_j², a = +1 on the first half of the features and −1 on the rest; f_1 = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.ones(x.shape[1], dtype=x.dtype)
        a[x.shape[1] // 2 :] = -1
        f = -0.5 * (a * x**2).sum(1)
        return torch.stack([f, torch.zeros_like(f)], 1)


def test_neflag_aggregates_only_the_negative_flux():
    # At x = 0 the flux density at ε·n is −ε(Σ_{first half} n_j² − Σ_{second half} n_j²): the
    # negative points are those where the first half dominates. Averaged over the whole sphere the two
    # halves would get maps of equal size and opposite sign; over the negative part only, the first
    # half's must be larger, and the second half's negative (−F_j n_j = −ε n_j² there).
    x = torch.zeros(3, 16, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    m = NeFLAG(n_points=200, n_iter=0, oversample=3, antithetic=True, coordinates="input")  # uniform
    a = m(Saddle(), x, t)
    assert (m.last_info["n_negative"] == 200).all()
    assert (a[:, :8] > 0).all() and (a[:, 8:] < 0).all()
    assert (a[:, :8].abs().mean(1) > 1.5 * a[:, 8:].abs().mean(1)).all()


def test_neflag_descent_finds_more_negative_flux():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(4, 10)
    t = torch.tensor([0, 1, 2, 0])
    random_points = NeFLAG(n_points=8, n_iter=0, oversample=3, antithetic=True, radius=0.3)
    random_points(net, x, t)
    descended = NeFLAG(n_points=8, n_iter=8, oversample=3, antithetic=True, radius=0.3)
    descended(net, x, t)
    assert (descended.last_info["flux"].mean(1) < random_points.last_info["flux"].mean(1)).all()
    assert (descended.last_info["flux"] < 0).float().mean() > 0.9
    assert descended.n_forwards((10,)) == 3 * 8 * 9 and random_points.n_forwards((10,)) == 3 * 8
    assert {"neflag1", "neflag10", "neflag20"} <= set(ATTRIBUTIONS.names())
    assert build_attributor("neflag20").n_points == 20 and build_attributor("neflag1").n_points == 1


def test_nonlinear_saliency_agrees_with_saliency_on_linear_model():
    torch.manual_seed(0)
    lin = nn.Linear(30, 5).double()
    x = torch.randn(6, 30, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    ns = NonlinearSaliency(stop_on_class_change=False)
    a = ns(lin, x, t)
    s = Saliency()(lin, x, t)
    assert (F.cosine_similarity(a, s, dim=1) > 0.99).all()
    # The path integral sums to the change of f_c along the path (exact for a linear model).
    total = ns.last_info["path_integral"].sum(1)
    torch.testing.assert_close(total, ns.last_info["output_change"].to(total.dtype), atol=1e-9, rtol=1e-9)


def test_nonlinear_saliency_path_integral_on_curved_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0])
    ns = NonlinearSaliency(step_size=0.01, max_steps=40, map="path_integral")
    a = ns(net, x, t)
    rel = (a.sum(1) - ns.last_info["output_change"]).abs() / ns.last_info["output_change"].abs().clamp_min(1e-9)
    assert (rel < 0.01).all()  # trapezoid rule along the path
    assert (ns.last_info["steps"] >= 1).all() and (ns.last_info["output_change"] < 0).all()
    assert torch.equal(ns.last_info["forwards"], ns.last_info["steps"] + 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda bs: MeaningfulPerturbation(n_steps=3, batch_size=bs),
        lambda bs: MeaningfulPerturbation(variant="extremal", n_steps=3, batch_size=bs),
        lambda bs: SoundMask(n_steps=3, n_fills=2, batch_size=bs),
        lambda bs: NeFLAG(n_points=3, n_iter=2, batch_size=bs),
        lambda bs: NonlinearSaliency(max_steps=4, drop=1.0, stop_on_class_change=False, batch_size=bs),
    ],
    ids=["meaningful", "extremal", "sound", "neflag", "nonlinear"],
)
def test_chunks_counts_seed_and_rng(make):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 64, 3))
    model = CountingModel(inner)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 0, 1])
    state = torch.get_rng_state()
    m = make(4)
    a = m(model, x, t)
    assert torch.equal(torch.get_rng_state(), state)
    assert max(model.calls) <= 4
    assert sum(model.calls) == 1 + int(m.last_info["forwards"].sum())
    assert int(m.last_info["forwards"].max()) <= m.n_forwards(tuple(x.shape[1:]))
    b = make(1000)(inner, x, t)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # independent of the chunking
    assert torch.equal(make(4)(inner, x, t), a)  # same seed, same map


def test_tabular_and_sequence_inputs():
    torch.manual_seed(0)
    tab = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    xt = torch.randn(3, 6)
    seq = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3))
    xs = torch.randn(3, 2, 16)
    t = torch.tensor([0, 1, 2])
    for m in [NeFLAG(n_points=2, n_iter=1), NonlinearSaliency(max_steps=3)]:
        assert m(tab, xt, t).shape == xt.shape and m(seq, xs, t).shape == xs.shape
    assert MeaningfulPerturbation(n_steps=3, substrate="mean")(tab, xt, t).shape == xt.shape
    assert MeaningfulPerturbation(n_steps=3)(seq, xs, t).shape == (3, 1, 16)
    assert SoundMask(n_steps=2, n_fills=2)(seq, xs, t).shape == (3, 1, 16)
    assert MeaningfulPerturbation(n_steps=3)(tab, xt, t).shape == xt.shape  # default: zeros for tables
    with pytest.raises(ValueError, match="tabular"):
        MeaningfulPerturbation(n_steps=3, substrate="blur")(tab, xt, t)  # blur needs positions


def test_hydra_configs_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "attribution"
    expected = {
        "meaningful_perturbation": MeaningfulPerturbation,
        "extremal_perturbation": MeaningfulPerturbation,
        "sound_mask": SoundMask,
        "neflag": NeFLAG,
        "neflag1": NeFLAG,
        "neflag10": NeFLAG,
        "neflag20": NeFLAG,
        "nonlinear_saliency": NonlinearSaliency,
    }
    for name, cls in expected.items():
        obj = instantiate(OmegaConf.load(conf / f"{name}.yaml"))
        assert isinstance(obj, cls), name
        assert isinstance(ATTRIBUTIONS.build(name), cls)
    assert instantiate(OmegaConf.load(conf / "neflag20.yaml")).n_points == 20
    assert instantiate(OmegaConf.load(conf / "neflag20.yaml")).coordinates == "scale"
    assert instantiate(OmegaConf.load(conf / "extremal_perturbation.yaml")).variant == "extremal"


def test_adam_state_matches_torch_adam():
    from explain_callbacks.attribution.blackbox._common import AdamState

    p1 = torch.randn(7, dtype=torch.float64, requires_grad=True)
    p2 = p1.detach().clone()
    opt, mine = torch.optim.Adam([p1], lr=0.05), AdamState(p2, 0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        g = torch.randn(7, generator=gen, dtype=torch.float64)
        p1.grad = g.clone()
        opt.step()
        mine.step(g)
    torch.testing.assert_close(p1.detach(), p2, rtol=1e-12, atol=1e-12)


def test_upsample_mask_equals_interpolate():
    from explain_callbacks.attribution.blackbox._common import upsample_mask

    m = torch.rand(3, 1, 7, 5, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(m, size=(32, 29), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_mask(m, (32, 29)), ref)
    (g1,) = torch.autograd.grad(upsample_mask(m, (32, 29)).pow(2).sum(), m)
    (g2,) = torch.autograd.grad(ref.pow(2).sum(), m)
    torch.testing.assert_close(g1, g2)
    s = torch.rand(2, 1, 6, dtype=torch.float64)
    torch.testing.assert_close(upsample_mask(s, (20,)), F.interpolate(s, size=20, mode="linear", align_corners=False))


def _objective_as_written(mp, model, x, sub, m, target, t, shift, size):
    """The meaningful/extremal perturbation loss of the docstring, recorded by autograd (reference)."""
    from explain_callbacks._internal.masks import score_outputs
    from explain_callbacks.attribution.blackbox._common import total_variation, upsample_mask
    from explain_callbacks.attribution.blackbox.meaningful import _shift

    up = upsample_mask(m, size)
    pert = _shift(torch.lerp(sub, x, up), shift[0], shift[1], mp.jitter if x.ndim > 2 else 0)
    f = score_outputs(model(pert), target, mp.output)
    smooth = mp.tv * total_variation(up, mp.tv_beta) if up.ndim > 2 else 0.0
    if mp.variant == "deletion":
        return (mp.l1 * (1 - up).flatten(1).sum(1) + smooth + f).sum()
    n = m[0].numel()
    k = round(mp.area * n)
    ref = torch.cat([x.new_zeros(n - k), x.new_ones(k)])
    lam = (mp.area_weight ** (1.0 / (mp.n_steps - 1))) ** t
    return (lam * (m.flatten(1).sort(1).values - ref).pow(2).mean(1) + smooth - f).sum()


@pytest.mark.parametrize("variant", ["deletion", "extremal"])
@pytest.mark.parametrize("beta", [3.0, 2.0, 2.5])
def test_meaningful_perturbation_closed_form_gradient_equals_autograd(variant, beta):
    """The hand-written gradient (jitter through shifted interpolation matrices, TV, L1, area) equals
    autograd of the objective as written, for images, sequences and tabular inputs, at several jitters."""
    from explain_callbacks._internal.masks import make_substrate
    from explain_callbacks.attribution.blackbox.meaningful import _MaskProblem

    torch.manual_seed(0)
    conv2d = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(360, 4))
    cases = [
        ((3, 2, 12, 10), conv2d, (5, 4)),
        ((3, 2, 16), nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)), (6,)),
        ((3, 6), nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), (6,)),
    ]  # fmt: skip
    tgt = torch.tensor([0, 1, 3])
    for shape, model, low in cases:
        model = model.double()
        x = torch.rand(shape, dtype=torch.float64)
        tab = x.ndim == 2
        mp = MeaningfulPerturbation(variant=variant, tv_beta=beta, n_steps=10, substrate="mean" if tab else "blur")
        sub = make_substrate(x, mp.substrate, sigma=1.0)
        size = (x.shape[1],) if tab else tuple(x.shape[2:])
        prob = _MaskProblem(mp, x, sub, low, size)
        for shift in ([0, 0], [1, -2], [-2, 2]):
            m = torch.rand((3, *low) if tab else (3, 1, *low), dtype=torch.float64, requires_grad=True)
            (ref,) = torch.autograd.grad(_objective_as_written(mp, model, x, sub, m, tgt, 4, shift, size), m)
            torch.testing.assert_close(prob.grad(model, m.detach(), tgt, 4, shift), ref, rtol=1e-9, atol=1e-12)
