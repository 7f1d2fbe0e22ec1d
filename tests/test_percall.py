"""What a one-pass gradient call does besides the model's own passes, and the guarantees it keeps: the
one-hot seeds (rows of a cached identity, bounds-checked), the backward through torch's engine entry
(``autograd.grad`` where a torch-function override or mode must see it), the call plan remembered on the
method (dropped whenever the cached facts may be stale), and the one-step checks of the inputs and the
class indices (same errors as before)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from explain_callbacks._internal import batching
from explain_callbacks._internal.batching import (
    SEED_EYE_MAX,
    forget_model,
    forget_rows,
    grad_of_selected,
    one_hot_seed,
    seeded_grad,
)
from explain_callbacks._internal.guard import model_guard
from explain_callbacks.attribution import ExpectedGradients, InputXGradient, IntegratedGradients, Saliency


def _mlp(k: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, k)).eval()


def _reference_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂ f_y(x) / ∂x per row, through the public API alone."""
    xb = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xb).gather(1, y.view(-1, 1)).sum(), xb)
    return g


@pytest.mark.parametrize("k", [1, 3, SEED_EYE_MAX + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_hot_seed_is_the_scattered_one_hot(k, dtype):
    out = torch.randn(5, k, dtype=dtype)
    target = torch.randint(0, k, (5,))
    seed = one_hot_seed(out, target)
    assert seed.dtype == dtype and seed.shape == out.shape
    assert torch.equal(seed, torch.zeros_like(out).scatter_(1, target.view(-1, 1), 1.0))
    seed[0, 0] = 7.0  # the cached identity is not handed out: a caller's write does not reach the next seed
    assert torch.equal(one_hot_seed(out, target), torch.zeros_like(out).scatter_(1, target.view(-1, 1), 1.0))


@pytest.mark.parametrize("bad", [[0, 3], [-1, 0], [2, 5]])
def test_seed_of_an_out_of_range_target_raises_the_target_error(bad):
    # the seed's own bounds check (a target a stale cached width let through) is translated into the error
    # that names the fix, not the index op's "index out of range in self"
    x = torch.randn(2, 6, requires_grad=True)
    out = _mlp()(x)
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 2\]"):
        grad_of_selected(out, torch.tensor(bad), x)


@pytest.mark.parametrize("bad", [3, -1])
def test_method_rejects_class_indices_out_of_range(bad):
    model, x = _mlp(), torch.randn(4, 6)
    y = torch.tensor([0, 1, 2, bad])
    for method in (Saliency(), InputXGradient()):
        with pytest.raises(ValueError, match=r"target values must lie in \[0, 2\] \(the model has 3 outputs\)"):
            method(model, x, y)
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 2\]"):
        Saliency()(model, x, bad)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.tensor([[0.0, float("nan")] * 3, [1.0] * 6]), ValueError, r"NaN or Inf in samples \[0\]"),
        (torch.tensor([[1.0] * 6, [float("inf")] * 6]), ValueError, r"inputs contains NaN or Inf in samples \[1\]"),
        (torch.ones(2, 6, dtype=torch.long), TypeError, "must be floating point"),
        (torch.ones(6), ValueError, "must be batched"),
        (torch.ones(0, 6), ValueError, "empty"),
    ],
)
def test_bad_inputs_keep_their_errors(x, error, match):
    with pytest.raises(error, match=match):
        Saliency()(_mlp(), x, 0)


def test_gradient_does_not_go_through_autograd_grad(monkeypatch):
    model, x = _mlp(), torch.randn(5, 6)
    y = torch.tensor([0, 1, 2, 1, 0])
    expected = _reference_grad(model, x, y)

    def refused(*args, **kwargs):
        raise AssertionError("torch.autograd.grad called")

    monkeypatch.setattr(torch.autograd, "grad", refused)
    assert torch.equal(Saliency()(model, x, y), expected)
    assert torch.equal(InputXGradient()(model, x, y), x * expected)


class _Recording(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[object] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_torch_function_modes_see_the_backward():
    # where autograd.grad hands the call to a torch-function mode, the mode still gets it
    model, x = _mlp(), torch.randn(5, 6)
    y = torch.tensor([0, 1, 2, 1, 0])
    expected = _reference_grad(model, x, y)
    with _Recording() as mode:
        g = Saliency()(model, x, y)
    assert torch.autograd.grad in mode.seen
    assert torch.equal(g, expected)


@pytest.mark.parametrize("engine", ["missing", "broken", "wrong"])
def test_backward_falls_back_to_autograd_grad(monkeypatch, engine):
    # the engine entry is torch-internal: a torch without it, or with another signature or meaning, gets
    # autograd.grad (checked once per process on a small graph)
    def broken(*args, **kwargs):
        raise TypeError("another signature")

    def wrong(t_outputs, grads, *args, **kwargs):
        return tuple(torch.zeros_like(t) for t in args[2])

    if engine == "missing":
        monkeypatch.delattr(torch.autograd.graph, "_engine_run_backward")
    else:
        monkeypatch.setattr(torch.autograd.graph, "_engine_run_backward", broken if engine == "broken" else wrong)
    monkeypatch.setattr(batching, "_engine", batching._UNCHECKED)
    assert batching._checked_engine() is None
    model, x = _mlp(), torch.randn(5, 6)
    y = torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(Saliency()(model, x, y), _reference_grad(model, x, y))


def test_seeded_grad_equals_autograd_grad_with_create_graph():
    torch.manual_seed(1)
    w = torch.randn(6, 3, requires_grad=True)
    x = torch.randn(4, 6, requires_grad=True)
    seed = torch.randn(4, 3)
    g = seeded_grad(torch.tanh(x @ w), x, seed, create_graph=True)
    (ref,) = torch.autograd.grad(torch.tanh(x @ w), x, seed, create_graph=True)
    assert torch.equal(g, ref)
    assert torch.allclose(torch.autograd.grad(g.square().sum(), w)[0], torch.autograd.grad(ref.square().sum(), w)[0])


def test_penalty_map_is_differentiable_in_the_parameters():
    # create_graph=True: the map's graph reaches the weights, as through autograd.grad
    model, x = _mlp(), torch.randn(5, 6)
    y = torch.tensor([0, 1, 2, 1, 0])
    weight = model[3].weight
    got = torch.autograd.grad(Saliency()(model, x, y, create_graph=True).square().sum(), weight)[0]
    xb = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xb).gather(1, y.view(-1, 1)).sum(), xb, create_graph=True)
    assert torch.allclose(got, torch.autograd.grad(g.square().sum(), weight)[0], atol=1e-6)


@pytest.fixture
def plans(monkeypatch):
    """The number of call-plan lookups so far (a list, appended to per lookup)."""
    seen: list[int] = []
    real = batching.call_plan

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batching, "call_plan", counting)
    return seen


def test_repeated_calls_reuse_the_remembered_plan(plans):
    model, x = _mlp(), torch.randn(4, 6)
    method = Saliency(batch_size=2)
    for _ in range(4):
        method(model, x, 1)
    assert len(plans) == 1


@pytest.mark.parametrize(
    "change", ["forget_rows", "forget_model", "batch_size", "row shape", "dtype", "module appended", "other model"]
)
def test_remembered_plan_is_dropped_when_facts_may_change(plans, change):
    model, x = _mlp(), torch.randn(4, 6)
    method = Saliency(batch_size=2)
    method(model, x, 1)
    if change == "forget_rows":
        forget_rows()
    elif change == "forget_model":
        forget_model(model)
    elif change == "batch_size":
        method.batch_size = 4
    elif change == "row shape":
        model = nn.Sequential(nn.Flatten(), _mlp())
        x = torch.randn(4, 2, 3)
    elif change == "dtype":
        model.double()
        x = x.double()
    elif change == "module appended":
        model.append(nn.Linear(3, 5))
    else:
        model = _mlp(k=5)
    g = method(model, x, 4 if change in ("module appended", "other model") else 1)
    assert len(plans) == 2
    y = torch.full((4,), 4 if change in ("module appended", "other model") else 1)
    assert torch.allclose(g, _reference_grad(model, x, y))


def test_a_wider_head_after_the_remembered_plan_takes_its_classes():
    # the target check reads the width of the plan's probe: a head replaced (registered) is probed again
    model, x = _mlp(), torch.randn(4, 6)
    method = Saliency()
    method(model, x, 2)
    model[3] = nn.Linear(8, 6)
    assert torch.allclose(method(model, x, 5), _reference_grad(model, x, torch.full((4,), 5)))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        method(model, x, 6)


@pytest.mark.parametrize("method", [IntegratedGradients(n_steps=4, completeness=False), ExpectedGradients(n_samples=4)])
def test_path_methods_keep_their_values(method):
    # path methods take their gradients through the same seeded backward, several calls per map
    model, x = _mlp(), torch.randn(4, 6)
    y = torch.tensor([0, 1, 2, 0])
    method.batch_size = 8
    got = method(model, x, y)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batching, "_engine", None)  # the autograd.grad path
        assert torch.allclose(method(model, x, y), got, atol=1e-7)


def test_guard_state_restored_around_a_call():
    model, x = _mlp(), torch.randn(4, 6)
    model.train()
    model[0].weight.grad = g0 = torch.ones_like(model[0].weight)
    stats = model[1].running_mean.clone()
    with model_guard(model):
        Saliency()(model, x, torch.tensor([0, 1, 2, 0]))
    assert model.training and model[1].training
    assert model[0].weight.grad is g0 and model[0].weight.requires_grad
    assert torch.equal(model[1].running_mean, stats)


class _Dense(nn.Module):
    """(B, 6) -> (B, 3, 2, 2) dense scores."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).view(-1, 3, 2, 2)


class _Logits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


@pytest.mark.parametrize(
    "model, bad, match",
    [
        (nn.Linear(6, 1), 1, r"\[0, 0\] \(the model has 1 outputs\).*takes target=None"),
        (_Dense(), 3, r"target values must lie in \[0, 2\]"),
        (_Dense(), -1, r"target values must lie in \[0, 2\]"),
        (_Logits(), 3, r"target values must lie in \[0, 2\]"),
    ],
)
@pytest.mark.parametrize("method", [Saliency, InputXGradient])
def test_out_of_range_class_indices_for_every_output_kind(model, bad, match, method):
    # the one-step check of CPU class indices and the index ops of the pass: every output kind gives the
    # target error (a single output with its hint, dense scores, dict logits, negative indices)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=match):
        method()(model, x, torch.tensor([0, 0, bad, 0]))


@pytest.mark.parametrize("bad", [3, -1])
def test_dense_gather_of_an_out_of_range_target_raises_the_target_error(bad):
    # a target a stale cached width let through reaches select_output's gather: the error names the fix
    from explain_callbacks._internal.batching import select_output

    with pytest.raises(ValueError, match=r"target values must lie in \[0, 2\]"):
        select_output(torch.randn(2, 3, 2, 2), torch.tensor([0, bad]))
