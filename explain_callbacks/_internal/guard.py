"""The model guard: run an explanation on a live training model without side effects.

Inside Lightning, validation runs under ``torch.no_grad`` (inside ``fit``) or
``torch.inference_mode`` (``trainer.validate``/``test``), possibly under autocast, with the model in
eval mode but about to go back to train mode. An explanation needs gradients, float32 and eval-mode
layers, and must leave behind exactly what it found: module modes, parameter ``.grad`` and
``requires_grad`` flags, and the global RNG state (so a run with monitoring callbacks produces
bit-identical weights to a run without them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ModelState", "detach_clone", "grad_enabled", "model_guard", "normal_tensor", "rng_guard"]


@dataclass
class ModelState:
    """What ``model_guard`` saves, so that it can be restored module by module."""

    training: dict[str, bool] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    grads: dict[str, Tensor | None] = field(default_factory=dict)

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        state = cls()
        for name, module in model.named_modules():
            state.training[name] = module.training
        for name, p in model.named_parameters():
            state.requires_grad[name] = p.requires_grad
            state.grads[name] = p.grad
        return state

    def restore(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if name in self.training:
                module.training = self.training[name]
        for name, p in model.named_parameters():
            if name in self.requires_grad:
                p.requires_grad_(self.requires_grad[name])
                # Re-attach the very same tensor object: optimisers and DDP hooks may hold it.
                p.grad = self.grads[name]


@contextlib.contextmanager
def rng_guard(devices: list[torch.device] | None = None) -> Iterator[None]:
    """Save and restore the global CPU (and CUDA, if initialised) RNG states."""
    cpu_state = torch.get_rng_state()
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


@contextlib.contextmanager
def model_guard(
    model: nn.Module,
    *,
    eval_mode: bool = True,
    freeze_params: bool = True,
    float32: bool = True,
) -> Iterator[nn.Module]:
    """Make ``model`` safe to explain, and restore everything on exit.

    Args:
        model: the (training) model.
        eval_mode: put every module in eval mode (BatchNorm statistics and dropout untouched).
        freeze_params: set ``requires_grad=False`` on parameters while explaining, so no graph is
            built for them (faster, less memory). Regularizers that need parameter gradients of an
            attribution (``create_graph=True``) must not use this guard.
        float32: disable autocast, so attributions are computed in float32.

    Grad mode is enabled and inference mode left; tensors entering the graph must be made normal
    tensors with :func:`detach_clone`.
    """
    state = ModelState.capture(model)
    device_types = {p.device.type for p in model.parameters()} or {"cpu"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(rng_guard())
        if float32:
            for dt in device_types:
                stack.enter_context(_autocast_off(dt))
        try:
            if eval_mode:
                model.eval()
            if freeze_params:
                for p in model.parameters():
                    p.requires_grad_(False)
            yield model
        finally:
            state.restore(model)


def detach_clone(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A normal (non-inference) tensor copy of ``x``, detached, optionally cast."""
    with torch.inference_mode(False):
        y = x.detach().clone()
        if dtype is not None and y.is_floating_point():
            y = y.to(dtype)
        return y


_NO_CONTEXT = contextlib.nullcontext()  # reusable


@contextlib.contextmanager
def _grad_on() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


def grad_enabled() -> contextlib.AbstractContextManager[None]:
    """Grad mode on and inference mode off, whatever the caller's context: a method's own passes
    take input gradients (or optimise a mask) even when it is called inside ``torch.no_grad()`` or
    ``torch.inference_mode()`` (a user's evaluation loop, Lightning's validation and test steps).
    Tensors made in inference mode must still be copied before they enter the graph
    (:func:`normal_tensor`). Where grad is on already (outside inference mode) nothing is switched:
    the context is entered on every method call, and on a cheap model each microsecond shows."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return _NO_CONTEXT
    return _grad_on()


def normal_tensor(x: object) -> object:
    """``x`` itself, or a normal copy when it is an inference tensor (made under
    ``torch.inference_mode``: such tensors cannot be saved for backward). Anything else is returned
    as is; a tensor that requires grad is never an inference tensor, so its graph is kept."""
    if isinstance(x, Tensor) and x.is_inference():
        return detach_clone(x)
    return x
