"""The gradient methods among the black-box ones (nonlinear saliency, meaningful / extremal perturbation,
NeFLAG) seed the explained scalar's gradient in closed form (``score_seed``) instead of recording the
softmax, gather and sum in autograd: bit-identical to differentiating ``score_outputs``, checked per call
and for whole methods against the same method with the seed switched off (the autograd path)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks._internal.masks import score_outputs, score_seed
from explain_callbacks.attribution import MeaningfulPerturbation, NeFLAG, NonlinearSaliency
from explain_callbacks.attribution.blackbox import _common
from explain_callbacks.attribution.blackbox._common import score_grad
from explain_callbacks.targets import ClassTarget


def _mlp(d: int = 6, k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, k)).eval()


def _autograd(model: nn.Module, x: torch.Tensor, target, output: str) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.detach().requires_grad_(True)
    y = score_outputs(model(xr), target, output)
    (g,) = torch.autograd.grad(y.sum(), xr)
    return g, y.detach()


@pytest.mark.parametrize("output", ["logit", "softmax", "auto"])
def test_seeded_gradient_is_bit_identical_to_autograd_of_the_score(output):
    model = _mlp()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1)) * 3
    t = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    assert score_seed(model(x), t, output) is not None
    with torch.enable_grad():
        g, y, _ = score_grad(model, x.clone().requires_grad_(True), t, output)
    g_ref, y_ref = _autograd(model, x, t, output)
    assert torch.equal(g, g_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize(
    ("k", "output", "target"),
    [(3, "log_softmax", "idx"), (3, "sigmoid", "idx"), (1, "logit", None), (3, "softmax", "op")],
)
def test_other_scores_fall_back_to_autograd(k, output, target):
    model = _mlp(k=k)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    t = None if target is None else torch.tensor([0, 2, 1, 1])
    tgt = ClassTarget(t).bind(4) if target == "op" else t
    assert score_seed(model(x), tgt, output) is None
    with torch.enable_grad():
        g, y, _ = score_grad(model, x.clone().requires_grad_(True), tgt, output)
    g_ref, y_ref = _autograd(model, x, tgt, output)
    assert torch.equal(g, g_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NonlinearSaliency(max_steps=12, output="softmax", batch_size=3),
        lambda: NonlinearSaliency(max_steps=12, map="path_integral"),
        lambda: MeaningfulPerturbation(n_steps=15, batch_size=2),
        lambda: MeaningfulPerturbation(variant="extremal", n_steps=15),
        lambda: NeFLAG(n_points=2, batch_size=5),
    ],
)
@pytest.mark.parametrize("image", [False, True])
def test_methods_equal_their_autograd_path(monkeypatch, make, image):
    if image:
        torch.manual_seed(3)
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
        ).eval()
        x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    else:
        model, x = _mlp(), torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([2, 0, 1, 2])
    got = make()(model, x, t)
    monkeypatch.setattr(_common, "score_seed", lambda *a, **k: None)  # the autograd path
    want = make()(model, x, t)
    assert torch.equal(got, want)
