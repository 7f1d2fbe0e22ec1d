"""CDEP's decomposition: β is 0 where the penalised region has no influence, and a hand-computed case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks.interaction.cd import cd_logits
from explain_callbacks.models import DecoyCNN
from explain_callbacks.regularize.functional import cdep_penalty
from explain_callbacks.regularize.penalties import build_penalty


def _zero_background_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 8:20, 8:20] = torch.rand(4, 1, 12, 12, generator=g)  # a "digit" on zero background
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :5, :5] = 1  # an empty corner: it cannot influence the output
    return x, mask


def test_beta_is_zero_where_the_region_has_no_influence():
    torch.manual_seed(0)
    net = DecoyCNN(size=28)
    x, mask = _zero_background_batch()
    beta, gamma = cd_logits(net, x, mask, bias_at_zero="rest")
    assert torch.equal(beta, torch.zeros_like(beta))
    assert torch.allclose(beta + gamma, net(x), atol=1e-5)
    # the acd convention hands half of every bias over zero background to β
    beta_half, _ = cd_logits(net, x, mask, bias_at_zero="half")
    assert beta_half.abs().max() > 1e-3
    assert float(cdep_penalty(net, x, mask, form="l1").detach()) == 0.0
    assert float(cdep_penalty(net, x, mask, form="l1", bias_at_zero="half").detach()) > 1e-3


def test_penalty_and_gradients_equal_a_hand_computed_linear_case():
    torch.manual_seed(1)
    lin = nn.Linear(6, 3)
    x = torch.randn(5, 6)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    r = (x * mask) @ lin.weight.T
    i = (x * (1 - mask)) @ lin.weight.T
    p = r.abs() / (r.abs() + i.abs())  # the bias share of β (no stream is 0 here)
    beta, gamma = r + lin.bias * p, i + lin.bias * (1 - p)
    for form, expect in (("softmax", torch.sigmoid(beta - gamma).mean()), ("l1", beta.abs().sum(1).mean())):
        got = cdep_penalty(lin, x, mask, form=form)
        assert torch.allclose(got, expect, atol=1e-6)
        g_got = torch.autograd.grad(got, [lin.weight, lin.bias])
        g_exp = torch.autograd.grad(expect, [lin.weight, lin.bias], retain_graph=True)
        for a, b in zip(g_got, g_exp):
            assert torch.allclose(a, b, atol=1e-6)


def test_bias_at_zero_is_validated():
    with pytest.raises(ValueError, match="bias_at_zero"):
        build_penalty({"name": "cdep", "bias_at_zero": "third"})
