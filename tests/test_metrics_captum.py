"""Agreement with Captum (float64): infidelity and sensitivity_max with the same perturbations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import IntegratedGradients, Saliency
from explain_callbacks.metrics import functional as MF

captum_metrics = pytest.importorskip("captum.metrics")
captum_attr = pytest.importorskip("captum.attr")


def _setup(b: int = 4, r: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=g)
    noise = torch.randn(b, r, 2, 5, 5, generator=g, dtype=torch.float64) * 0.1
    return model, x, y, noise


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_equals_captum(normalize):
    model, x, y, noise = _setup()
    b, r = noise.shape[:2]
    attr = IntegratedGradients(n_steps=8)(model, x, y)

    def perturb(inputs):  # Captum expands inputs with repeat_interleave: sample-major rows
        pert = noise.reshape(b * r, *x.shape[1:])
        return pert, inputs - pert

    ref = captum_metrics.infidelity(model, perturb, x, attr, target=y, n_perturb_samples=r, normalize=normalize)
    ours = MF.infidelity(model, x, attr, y, perturbation=noise, normalize=normalize, output="logit", batch_size=5)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-7)


def test_sensitivity_max_equals_captum():
    model, x, y, noise = _setup()
    b, r = noise.shape[:2]
    delta = (noise / noise.abs().amax()) * 0.02  # inside the L-inf ball of radius 0.02

    def perturb(inputs, radius):
        return inputs + delta.reshape(b * r, *x.shape[1:])

    sal = captum_attr.Saliency(model)

    def explain(inputs, target):
        return sal.attribute(inputs, target=target, abs=False)

    ref = captum_metrics.sensitivity_max(explain, x, perturb_func=perturb, n_perturb_samples=r, target=y)
    ours = MF.max_sensitivity(model, x, y, Saliency(), perturbations=delta, batch_size=7)
    torch.testing.assert_close(ours, ref.double(), atol=1e-10, rtol=1e-7)
    avg = MF.avg_sensitivity(model, x, y, Saliency(), perturbations=delta)
    assert (avg <= ours + 1e-12).all() and (avg > 0).all()
