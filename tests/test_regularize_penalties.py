"""Penalties: closed forms on linear models, gradcheck of the double backprop, masks, registry, mixin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.interaction.cd import cd_logits
from explain_callbacks.regularize import (
    PENALTIES,
    CDEPPenalty,
    EGPrior,
    RegularizerMixin,
    attribution_penalty,
    build_penalty,
    cdep_penalty,
    eg_mask_prior,
    eg_sparsity_prior,
    eg_tv_prior,
    expected_gradients_k,
    gini,
    norm_stats_kept,
    prepare_mask,
    rrr_penalty,
    total_variation,
)

D = torch.float64


def linear(c=2, h=4, w=4, k=3, bias=True, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k, bias=bias)).to(D)


def data(b=5, c=2, h=4, w=4, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=D)
    y = torch.randint(0, k, (b,), generator=g)
    m = torch.zeros(1, 1, h, w, dtype=D)
    m[..., :2, :2] = 1
    return x, y, m


# ------------------------------------------------------------------ CDEP
def test_cdep_bias_free_linear_closed_form():
    model = linear(bias=False)
    x, _y, m = data()
    W = model[1].weight
    beta = (m * x).flatten(1) @ W.T  # a bias-free linear map: β = f(M ⊙ x), γ = f((1 − M) ⊙ x)
    gamma = ((1 - m) * x).flatten(1) @ W.T
    soft = torch.softmax(torch.stack([beta.reshape(-1), gamma.reshape(-1)], 1), 1)[:, 0].mean()  # authors' code
    assert torch.allclose(cdep_penalty(model, x, m), soft, atol=1e-12)
    assert torch.allclose(cdep_penalty(model, x, m, form="l1"), beta.abs().sum(1).mean(), atol=1e-12)


def test_cdep_matches_engine_and_groups_sum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).to(D)
    x, _, _ = data()
    groups = torch.zeros(1, 3, 1, 4, 4, dtype=D)
    groups[0, 0, 0, 0, 0] = groups[0, 1, 0, 3, 3] = groups[0, 2, 0, 1, 2] = 1
    expect = 0.0
    for gi in range(3):
        b, g = cd_logits(model, x, groups[:, gi])
        expect = expect + torch.sigmoid(b - g).mean()
    got = cdep_penalty(model, x, groups)
    assert torch.allclose(got, expect, atol=1e-10)


def test_cdep_has_parameter_gradient():
    model = linear()
    x, _, m = data()
    r = cdep_penalty(model, x, m)
    grads = torch.autograd.grad(r, list(model.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------ RRR
def test_rrr_closed_form_linear_softmax():
    model = linear()
    x, _y, m = data()
    W, b = model[1].weight, model[1].bias
    p = torch.softmax(x.flatten(1) @ W.T + b, 1)
    # ∂/∂x Σ_c log p_c = Σ_c (W_c − Σ_k p_k W_k) = Σ_c W_c − K · (p @ W)
    grad = (W.sum(0) - W.shape[0] * (p @ W)).view_as(x)
    expect = ((m * grad) ** 2).flatten(1).sum(1)
    assert torch.allclose(rrr_penalty(model, x, m), expect.mean(), atol=1e-12)
    assert torch.allclose(rrr_penalty(model, x, m, reduction="sum"), expect.sum(), atol=1e-12)


def _small_net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 4), act, nn.Linear(4, 3)).to(D)


def _as_function_of_params(net: nn.Module, penalty):
    names = [n for n, _ in net.named_parameters()]

    def fn(*ps):
        return penalty(lambda z: torch.func.functional_call(net, dict(zip(names, ps)), (z,)))

    return fn, tuple(p.detach().requires_grad_(True) for p in net.parameters())


def test_rrr_double_backprop_gradcheck():
    net = _small_net(nn.Tanh())
    x, _, m = data(b=3, c=2, h=2, w=2)
    fn, params = _as_function_of_params(net, lambda f: rrr_penalty(f, x, m))
    assert torch.autograd.gradcheck(fn, params, atol=1e-6)


# ------------------------------------------------------------------ EG priors
def test_expected_gradients_zero_reference_linear():
    model = linear()
    x, y, _ = data()
    eg = expected_gradients_k(model, x, y, reference=torch.zeros(1, 2, 4, 4, dtype=D), n_samples=1, seed=3)
    expect = x * model[1].weight[y].view_as(x)  # (x − 0) ⊙ w_y whatever α
    assert torch.allclose(eg, expect, atol=1e-12)


def test_expected_gradients_varies_with_seed_not_global_rng():
    model = linear()
    x, y, _ = data(b=8)
    state = torch.get_rng_state()
    a = expected_gradients_k(model, x, y, seed=0)
    b = expected_gradients_k(model, x, y, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.allclose(a, b)
    assert torch.allclose(a, expected_gradients_k(model, x, y, seed=0))


def test_total_variation_and_gini_closed_forms():
    maps = torch.tensor([[[0.0, 1.0], [3.0, 3.0]]], dtype=D)  # |1-0|+|3-3| + |3-0|+|3-1| = 6
    assert total_variation(maps).item() == pytest.approx(6.0)
    assert total_variation(torch.stack([maps, maps], 1)).item() == pytest.approx(12.0)  # channel-summed
    v = torch.rand(3, 7, dtype=D)
    pairwise = (v[:, :, None] - v[:, None, :]).abs().sum((1, 2)) / (2 * 7 * v.sum(1))
    assert torch.allclose(gini(v), pairwise, atol=1e-12)
    assert gini(torch.ones(5, dtype=D)).item() == pytest.approx(0.0)
    assert gini(torch.tensor([0, 0, 0, 2.0], dtype=D)).item() == pytest.approx(3 / 4)


def test_eg_priors_by_hand_zero_reference(monkeypatch):
    model = linear()
    x, y, m = data()
    ref = torch.zeros(1, 2, 4, 4, dtype=D)
    eg = x * model[1].weight[y].view_as(x)
    import explain_callbacks.regularize.functional as RF

    orig = RF.expected_gradients_k
    monkeypatch.setattr(RF, "expected_gradients_k", lambda *a, **k: orig(*a, **{**k, "reference": ref}))
    assert torch.allclose(eg_tv_prior(model, x, y), total_variation(eg).mean())
    assert torch.allclose(eg_sparsity_prior(model, x, y), -gini(eg.sum(1).abs().flatten(1).mean(0)))
    assert torch.allclose(eg_mask_prior(model, x, y, m), (m * eg).abs().flatten(1).sum(1).mean())


# ------------------------------------------------------------------ generic
def test_attribution_penalty_saliency_closed_form_and_gradcheck():
    model = linear()
    x, y, m = data()
    w = model[1].weight[y].view_as(x)  # saliency of a linear model
    expect = ((m * w) ** 2).flatten(1).sum(1).mean()
    assert torch.allclose(attribution_penalty(model, x, y, m, "saliency"), expect, atol=1e-12)
    expect_ixg = (m * x * w).abs().flatten(1).sum(1).mean()
    assert torch.allclose(attribution_penalty(model, x, y, m, "input_x_gradient", power=1), expect_ixg, atol=1e-12)
    # a nonlinear net: the double backprop of IG matches finite differences
    net = _small_net(nn.Softplus())
    xs, ys, ms = data(b=3, c=2, h=2, w=2)
    ig = {"name": "ig", "n_steps": 4, "completeness": False}
    fn, params = _as_function_of_params(net, lambda f: attribution_penalty(f, xs, ys, ms, ig))
    assert torch.autograd.gradcheck(fn, params, atol=1e-6)


def test_attribution_penalty_refuses_black_box():
    model = linear()
    x, y, m = data()
    with pytest.raises(ValueError, match="not differentiable"):
        attribution_penalty(model, x, y, m, "occlusion")


# ------------------------------------------------------------------ BatchNorm statistics
def test_penalties_keep_batchnorm_running_stats_but_use_batch_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    x, y, m = (t.float() if t.is_floating_point() else t for t in data())
    bn = model[1]
    before = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    for name in ["rrr", "cdep", "eg_mask", "attribution"]:
        r = build_penalty(name)(model, x, y, m)
        r.backward()
    after = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # inside, train-mode batch statistics are used: a different value than in eval mode
    r_train = rrr_penalty(model, x, m)
    model.eval()
    assert not torch.allclose(r_train, rrr_penalty(model, x, m))
    # and without keeping, the stats move
    model.train()
    rrr_penalty(model, x, m, keep_norm_stats=False)
    assert bn.num_batches_tracked.item() == 1
    with norm_stats_kept(model):
        model(x)
    assert bn.num_batches_tracked.item() == 1


# ------------------------------------------------------------------ masks, registry, mixin
def test_prepare_mask_shapes_and_errors():
    x = torch.zeros(3, 2, 4, 4)
    assert prepare_mask(torch.ones(4, 4), x).shape == (4, 4)
    assert prepare_mask(torch.ones(3, 1, 4, 4, dtype=torch.bool), x).dtype == torch.float32
    with pytest.raises(ValueError, match="does not broadcast"):
        prepare_mask(torch.ones(5, 5), x)
    with pytest.raises(ValueError, match="needs a mask"):
        prepare_mask(None, x)
    assert prepare_mask(torch.ones(1, 6, 1, 4, 4), x, groups=True).shape == (1, 6, 1, 4, 4)
    with pytest.raises(ValueError, match="more dimensions"):
        prepare_mask(torch.ones(1, 6, 1, 4, 4), x)


def test_registry_and_errors():
    for n in ["cdep", "rrr", "eg_mask", "eg_tv", "eg_gini", "attribution"]:
        assert n in PENALTIES
    p = build_penalty({"name": "cdep", "form": "l1"})
    assert isinstance(p, CDEPPenalty) and p.form == "l1"
    eg = build_penalty("eg_tv")
    assert isinstance(eg, EGPrior) and eg.name == "eg_tv" and not eg.needs_mask
    x, y, _m = data()
    with pytest.raises(ValueError, match="needs targets"):
        eg(linear(), x, None)
    with pytest.raises(ValueError, match="needs a mask"):
        build_penalty("rrr")(linear(), x, y, None)
    with pytest.raises(KeyError, match="Unknown penalty"):
        build_penalty("nope")
    with pytest.raises(ValueError, match="form"):
        CDEPPenalty(form="l2")


def test_mixin_penalized_loss_equals_hand_sum():
    class M(RegularizerMixin, nn.Module):
        def __init__(self):
            super().__init__()
            self.net = linear()

        def forward(self, x):
            return self.net(x)

    mod = M()
    mod.add_penalty("rrr", weight=0.5)
    mod.add_penalty("cdep", weight=2.0)
    x, y, m = data()
    task = F.cross_entropy(mod(x), y)
    total = mod.penalized_loss(task, x, y, m)
    expect = task + 0.5 * rrr_penalty(mod.net, x, m) + 2.0 * cdep_penalty(mod.net, x, m)
    assert torch.allclose(total, expect, atol=1e-12)
    mod.set_penalty_weight("rrr", 0.0)
    assert torch.allclose(mod.penalized_loss(task, x, y, m), task + 2.0 * cdep_penalty(mod.net, x, m), atol=1e-12)
    with pytest.raises(KeyError, match="already registered"):
        mod.add_penalty("rrr")
