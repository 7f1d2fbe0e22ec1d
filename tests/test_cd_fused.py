"""The fused CD rules (hand-written backward passes) against autograd through the plain formulas."""

from __future__ import annotations

import torch

from explain_callbacks.interaction import cd as C


def _away_from_kinks(t: torch.Tensor) -> torch.Tensor:
    return t + 0.05 * torch.sign(t)  # keep |z| and the ReLU inputs off 0, where the rules have kinks


def test_bias_split_gradient_matches_autograd_of_the_formula():
    g = torch.Generator().manual_seed(0)
    both = _away_from_kinks(torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    for eps in ((C._EPS, C._EPS), (0.0, 2 * C._EPS)):
        assert torch.autograd.gradcheck(lambda b, c, e=eps: C._BiasSplit.apply(b, c, e), (both, bias))
    z = both.view(2, 3, 4, 3, 3)
    a = z.abs() + C._EPS
    plain = (z + bias * (a / (a[0] + a[1]))).view(6, 4, 3, 3)
    assert torch.allclose(C._BiasSplit.apply(both, bias, (C._EPS, C._EPS)), plain, atol=1e-15)


def test_bias_split_gradient_is_finite_where_both_streams_vanish():
    # "rest" (ε = 0, 2e-20): D = 2e-20 where both streams are 0; b·Δg/D² overflowed float32 for |b·Δg| > 0.14
    # (a loss scaled by AMP, a large λ) and 0·inf turned the gradient into NaN
    both = torch.zeros(4, 3, requires_grad=True)
    bias = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    out = C._BiasSplit.apply(both, bias, (0.0, 2 * C._EPS))
    out.backward(torch.tensor([[1.0, 2, 3], [4, 5, 6], [1, 1, 1], [2, 2, 2]]) * 1e3)
    assert torch.isfinite(both.grad).all() and torch.isfinite(bias.grad).all()


def test_relu_rule_gradient_matches_autograd_of_the_formula():
    g = torch.Generator().manual_seed(1)
    both = _away_from_kinks(torch.randn(8, 5, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(C._ReluRule.apply, (both,))
    rel, irr = both[:4], both[4:]
    plain = torch.cat([rel.relu(), (rel + irr).relu() - rel.relu()])
    assert torch.equal(C._ReluRule.apply(both), plain)


def test_shift_split_gradient_matches_autograd_of_the_formula_and_zero_streams():
    g = torch.Generator().manual_seed(2)
    z = _away_from_kinks(torch.randn(6, 4, 2, 2, generator=g, dtype=torch.float64))
    z[0, 0] = 0.0  # both streams 0: β gets no share of the shift (0/0 = 0) and no gradient through it
    z[3, 0] = 0.0
    z.requires_grad_()
    shift = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    out = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(C._ShiftSplit.apply, (z, shift, out))
    res = C._ShiftSplit.apply(z, shift, out)
    ref = C._split_shift(z[:3], z[3:], shift, out)
    assert torch.allclose(res, torch.cat([ref.rel, ref.irr]), atol=1e-15)
    assert torch.equal(res[0, 0], z[0, 0].detach())  # nothing of the shift went to β there
