"""The model guard leaves everything exactly as found."""

from __future__ import annotations

import torch
from torch import nn

from explain_callbacks._internal import detach_clone, model_guard
from explain_callbacks.attribution import IntegratedGradients, SmoothGrad


def test_guard_restores_modes_flags_grads_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model[2].eval()  # mixed modes must come back module by module
    model[0].weight.requires_grad_(False)
    model[4].weight.grad = torch.ones_like(model[4].weight)
    grad_obj = model[4].weight.grad
    stats = model[1].running_mean.clone()
    x = torch.randn(5, 4)
    rng = torch.get_rng_state()
    with model_guard(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        a = SmoothGrad(n_samples=4)(model, x, torch.zeros(5, dtype=torch.long))
        torch.rand(3)  # even global draws inside the guard are undone
    assert a.shape == x.shape
    assert [m.training for m in model] == [True, True, False, True, True]
    assert model[0].weight.requires_grad is False and model[4].weight.requires_grad is True
    assert model[4].weight.grad is grad_obj and torch.equal(grad_obj, torch.ones_like(grad_obj))
    assert model[0].bias.grad is None
    assert torch.equal(model[1].running_mean, stats)
    assert torch.equal(rng, torch.get_rng_state())


def test_guard_enables_grad_inside_inference_mode_and_autocast():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.inference_mode():
        x = torch.randn(4, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16), model_guard(model):
            xi = detach_clone(x)
            a = IntegratedGradients(n_steps=4)(model, xi, torch.zeros(4, dtype=torch.long))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, xi * model[0].weight[0].detach())


def test_guard_restores_on_exception():
    model = nn.Sequential(nn.Linear(3, 2)).train()
    try:
        with model_guard(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert model.training and model[0].weight.requires_grad
