"""Saliency's paper map (Simonyan, Vedaldi & Zisserman 2013, §3.1): M_ij = max_c |∂f_c/∂x_{c,i,j}|."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import Saliency, build_attributor


def _grad(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, t.view(-1, 1)).sum(), x)
    return g


def test_reduce_max_is_the_papers_map_on_images():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 4])
    m = Saliency(reduce="max")(model, x, t)
    assert m.shape == (2, 1, 8, 8)  # one channel, broadcast over the input's, as Grad-CAM and RISE
    torch.testing.assert_close(m, _grad(model, x, t).abs().amax(1, keepdim=True))
    assert torch.equal(Saliency(abs=True, reduce="max")(model, x, t), m)
    assert torch.equal(build_attributor("saliency", reduce="max")(model, x, t), m)
    torch.testing.assert_close(Saliency()(model, x, t), _grad(model, x, t))  # the default is unchanged


def test_reduce_max_on_signals_sequences_and_tables():
    torch.manual_seed(1)
    t = torch.tensor([0, 1])
    conv = nn.Sequential(nn.Conv1d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 8, 2)).eval()
    xs = torch.randn(2, 3, 10)
    torch.testing.assert_close(Saliency(reduce="max")(conv, xs, t), _grad(conv, xs, t).abs().amax(1, keepdim=True))
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(10 * 4, 2)).eval()  # reads (B, T, D)
    xq = torch.randn(2, 10, 3)
    got = Saliency(reduce="max")(seq, xq, t)
    assert got.shape == (2, 10, 1)
    torch.testing.assert_close(got, _grad(seq, xq, t).abs().amax(2, keepdim=True))
    tab = nn.Linear(5, 2)
    xt = torch.randn(2, 5)
    torch.testing.assert_close(Saliency(reduce="max")(tab, xt, t), _grad(tab, xt, t).abs())


def test_reduce_max_is_differentiable_and_validated():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softplus(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(2, 2, 6, 6)
    m = Saliency(reduce="max")(model, x, torch.tensor([0, 1]), create_graph=True)
    (gw,) = torch.autograd.grad(m.sum(), model[0].weight)
    assert gw.abs().sum() > 0
    with pytest.raises(ValueError, match="reduce"):
        Saliency(reduce="mean")
