"""Contextual decomposition through normalisation layers: the reference BatchNorm rule (the ``acd`` package
of Singh, Murdoch & Yu, arXiv:1806.05337) and our GroupNorm / InstanceNorm / LayerNorm rules after it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.interaction import cd_logits
from explain_callbacks.interaction.cd import cd_propagate


def _randomise_norm(mod: nn.Module) -> None:
    with torch.no_grad():
        if getattr(mod, "running_mean", None) is not None:
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
        if getattr(mod, "weight", None) is not None:
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.uniform_(-1, 1)


def _conv_relu_bn() -> nn.Sequential:
    """Conv-ReLU-BN twice: BN sees exact zeros of the true activation (the case the rules disagreed on)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 6, 3),
        nn.MaxPool2d(2),  # on conv outputs: no ties, so the arg-max does not hang on rounding
        nn.ReLU(),
        nn.BatchNorm2d(6),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 3),
    )
    for m in model:
        _randomise_norm(m)
    return model.eval()


def _mask() -> torch.Tensor:
    m = torch.zeros(1, 1, 10, 10)
    m[..., 2:6, 3:8] = 1
    return m


@pytest.mark.parametrize("grad", [True, False])  # the autograd and the in-place arithmetic
def test_batchnorm_matches_the_acd_package(grad):
    acd_cd = pytest.importorskip("acd.scores.cd")
    model = _conv_relu_bn()
    torch.manual_seed(1)
    x = torch.randn(4, 1, 10, 10)
    m = _mask()
    with torch.no_grad():
        ref_rel, ref_irr = acd_cd.cd_generic(list(model.modules()), m * x, (1 - m) * x)
    with torch.set_grad_enabled(grad):
        beta, gamma = cd_logits(model, x, m)
    # 50/50 split of the shift at the post-ReLU zeros differed by up to 0.17 (on logits of ~0.4)
    torch.testing.assert_close(beta, ref_rel, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gamma, ref_irr, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(beta + gamma, model(x), atol=2e-6, rtol=1e-5)


def _reference_bn(rel: torch.Tensor, irr: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``propagate_batchnorm2d`` of the reference, re-derived: bn(β) − bn(0) and bn(γ) − bn(0) share bn(0)
    in proportion to their sizes (0/0 → β gets nothing); γ' = bn(β + γ) − β'."""
    b = bn(torch.zeros_like(irr))
    r, i = bn(rel) - b, bn(irr) - b
    share = r.abs() / (r.abs() + i.abs())
    share[torch.isnan(share)] = 0
    new_rel = r + share * b
    return new_rel, bn(rel + irr) - new_rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_after_relu_gives_the_shift_to_gamma_where_both_streams_vanish(dtype):
    torch.manual_seed(2)
    conv, bn = nn.Conv2d(1, 3, 3).to(dtype), nn.BatchNorm2d(3).to(dtype)
    _randomise_norm(bn)
    model = nn.Sequential(conv, nn.ReLU(), bn).eval()
    x = torch.randn(3, 1, 8, 8, dtype=dtype)
    m = torch.zeros(1, 1, 8, 8, dtype=dtype)
    m[..., :, :4] = 1
    with torch.no_grad():
        w, c = F.conv2d(m * x, conv.weight), F.conv2d((1 - m) * x, conv.weight)
        p = (w.abs() + 1e-20) / (w.abs() + c.abs() + 2e-20)
        rel, irr = w + conv.bias.view(1, -1, 1, 1) * p, c + conv.bias.view(1, -1, 1, 1) * (1 - p)
        rel, irr = F.relu(rel), F.relu(rel + irr) - F.relu(rel)
        want_rel, want_irr = _reference_bn(rel, irr, bn)
        got = cd_propagate(model, m * x, (1 - m) * x)
    dead = (rel.abs() < 1e-15) & (irr.abs() < 1e-15)  # zeroed by the ReLU (ε leftovers): bn(0) belongs to γ
    assert dead.any()
    assert got.rel[dead].abs().max() == 0
    torch.testing.assert_close(got.rel, want_rel)
    torch.testing.assert_close(got.irr, want_irr)


# ----------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm / LayerNorm (our rules, after the reference BatchNorm rule)
# ----------------------------------------------------------------------------------------------


def _centred_reference(rel, irr, dims_view, weight, bias, eps, out):
    """Re-derivation: σ of β + γ over each normalised group, each stream centred by its own mean, the bias
    split as the reference BatchNorm rule splits its shift (via (r + b) − b, 0/0 → 0), γ' = out − β'."""
    t, r0, i0 = dims_view(rel + irr), dims_view(rel), dims_view(irr)
    inv = 1 / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + eps)
    r = ((r0 - r0.mean(-1, keepdim=True)) * inv).reshape(rel.shape) * weight
    i = ((i0 - i0.mean(-1, keepdim=True)) * inv).reshape(rel.shape) * weight
    r, i = (r + bias) - bias, (i + bias) - bias
    share = r.abs() / (r.abs() + i.abs())
    share[torch.isnan(share)] = 0
    new_rel = r + share * bias
    return new_rel, out - new_rel


class _GNNet(nn.Module):
    def __init__(self, norm: nn.Module, functional: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.norm = norm
        self.functional = functional
        self.fc = nn.Linear(6 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # the norm sees exact zeros
        if self.functional == "group_norm":
            h = F.group_norm(h, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
        elif self.functional == "instance_norm":
            h = F.instance_norm(h, weight=self.norm.weight, bias=self.norm.bias, eps=self.norm.eps)
        else:
            h = self.norm(h)
        return self.fc(torch.relu(h).flatten(1))


NORMS = {
    "group_norm": lambda: nn.GroupNorm(3, 6),
    "group_norm_one_group": lambda: nn.GroupNorm(1, 6),
    "instance_norm_affine": lambda: nn.InstanceNorm2d(6, affine=True),
    "instance_norm_plain": lambda: nn.InstanceNorm2d(6),
    "f_group_norm": lambda: nn.GroupNorm(2, 6),
    "f_instance_norm": lambda: nn.InstanceNorm2d(6, affine=True),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_per_sample_norms_are_exact_and_complete(name):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(3)
        norm = NORMS[name]()
        _randomise_norm(norm)
        functional = name[2:] if name.startswith("f_") else None
        model = _GNNet(norm, functional).eval()
        x = torch.randn(5, 2, 8, 8)
        m = torch.zeros(1, 1, 8, 8)
        m[..., 1:5, 2:7] = 1
        beta, gamma = cd_logits(model, x, m)
        logits = model(x)
        torch.testing.assert_close(beta + gamma, logits, atol=1e-12, rtol=0)
        b_all, g_all = cd_logits(model, x, torch.ones(1, 1, 8, 8))  # S = everything: β is the output
        torch.testing.assert_close(b_all, logits, atol=1e-12, rtol=0)
        assert g_all.abs().max() < 1e-12
        b_none, _ = cd_logits(model, x, torch.zeros(1, 1, 8, 8))  # S = nothing: β is the bias split only
        lin = model.fc.bias * 1e-20 / (model.fc.bias.abs() + 2e-20)
        torch.testing.assert_close(b_none, lin.expand_as(b_none), atol=1e-12, rtol=0)
        # the rule at the norm itself, against the re-derivation
        with torch.no_grad():
            pre = nn.Sequential(model.conv, nn.ReLU())
            d = cd_propagate(pre, m * x, (1 - m) * x)
            groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else 6
            out = F.group_norm(d.total, groups, norm.weight, norm.bias, norm.eps)
            w = torch.ones(1, 6, 1, 1) if norm.weight is None else norm.weight.view(1, 6, 1, 1)
            b = torch.zeros(1, 6, 1, 1) if norm.bias is None else norm.bias.view(1, 6, 1, 1)
            want_rel, want_irr = _centred_reference(
                d.rel, d.irr, lambda t: t.reshape(t.shape[0], groups, -1), w, b, norm.eps, out
            )
            got = cd_propagate(nn.Sequential(pre, norm) if functional is None else _Until(model), m * x, (1 - m) * x)
        torch.testing.assert_close(got.rel, want_rel)
        torch.testing.assert_close(got.irr, want_irr)
    finally:
        torch.set_default_dtype(torch.float32)


class _Until(nn.Module):
    """The functional model up to its normalisation."""

    def __init__(self, net: _GNNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        n = self.net
        h = torch.relu(n.conv(x))
        if n.functional == "group_norm":
            return F.group_norm(h, n.norm.num_groups, n.norm.weight, n.norm.bias, n.norm.eps)
        return F.instance_norm(h, weight=n.norm.weight, bias=n.norm.bias, eps=n.norm.eps)


def test_instance_norm_with_running_stats_in_eval_is_the_batchnorm_rule():
    torch.manual_seed(4)
    inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    _randomise_norm(inorm)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(inorm.state_dict())
    conv = nn.Conv2d(1, 4, 3)
    x = torch.randn(3, 1, 8, 8)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:5, :] = 1
    a = cd_propagate(nn.Sequential(conv, nn.ReLU(), inorm).eval(), m * x, (1 - m) * x)
    b = cd_propagate(nn.Sequential(conv, nn.ReLU(), bn).eval(), m * x, (1 - m) * x)
    torch.testing.assert_close(a.rel, b.rel)
    torch.testing.assert_close(a.irr, b.irr)
    before = inorm.running_mean.clone()
    inorm.train()  # training mode: the sample's own statistics, running statistics untouched
    c = cd_propagate(nn.Sequential(conv, nn.ReLU(), inorm), m * x, (1 - m) * x)
    torch.testing.assert_close(inorm.running_mean, before)
    want = F.instance_norm(F.relu(conv(x)), weight=inorm.weight, bias=inorm.bias, eps=inorm.eps)
    torch.testing.assert_close(c.total, want.detach(), atol=1e-6, rtol=1e-5)


def test_layernorm_bias_follows_the_reference_shift_split():
    torch.manual_seed(5)
    ln = nn.LayerNorm(8)
    _randomise_norm(ln)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), ln).eval()
    x = torch.randn(4, 6)
    m = torch.tensor([1, 1, 0, 0, 0, 0.0])
    with torch.no_grad():
        d = cd_propagate(model[:2], m * x, (1 - m) * x)
        got = cd_propagate(model, m * x, (1 - m) * x)
        out = ln(d.total)
        want_rel, want_irr = _centred_reference(d.rel, d.irr, lambda t: t, ln.weight, ln.bias, ln.eps, out)
    torch.testing.assert_close(got.rel, want_rel)
    torch.testing.assert_close(got.irr, want_irr)
    torch.testing.assert_close(got.total, model(x))
