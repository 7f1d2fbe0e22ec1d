"""Input validation with messages that name the problem and the fix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "check_floating",
    "check_inputs",
    "check_map",
    "finite_rows",
    "not_differentiable",
    "require_graph",
]


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf: one reduction first (NaN/Inf anywhere makes the sum non-finite),
    the element test only when the sum is not finite (it may just have overflowed)."""
    total = (t.detach() if t.requires_grad else t).sum()
    return math.isfinite(float(total)) or bool(torch.isfinite(t).all())


def check_inputs(inputs: Tensor, *, min_ndim: int = 2, max_ndim: int | None = None, name: str = "inputs") -> None:
    """Raise a clear error for inputs that are not a batch of finite floating-point values (each message
    names the problem and the fix)."""
    if (
        isinstance(inputs, Tensor)
        and min_ndim <= inputs.ndim
        and (max_ndim is None or inputs.ndim <= max_ndim)
        and inputs.is_floating_point()
        and inputs.shape[0]
        and all_finite(inputs)
    ):
        return  # the common case in one expression: every check below passes (a few us less per call)
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}.")
    if inputs.ndim < min_ndim or (max_ndim is not None and inputs.ndim > max_ndim):
        rng = f"{min_ndim}" if max_ndim == min_ndim else f"{min_ndim}..{max_ndim or 'any'}"
        raise ValueError(
            f"{name} must be batched with {rng} dimensions (B,D), (B,T,D) or (B,C,H,W); got shape "
            f"{tuple(inputs.shape)}. Add a batch dimension with x.unsqueeze(0) for a single sample."
        )
    check_floating(inputs, name)
    if inputs.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch size 0).")
    if not all_finite(inputs):
        bad = (~torch.isfinite(inputs.reshape(inputs.shape[0], -1))).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} contains NaN or Inf in samples {bad[:10]}; clean the data or drop those samples "
            "(the monitor skips them with a warning)."
        )


def check_floating(inputs: Tensor, name: str = "inputs") -> None:
    """Refuse integer inputs (token ids, uint8 images) with the fix for each."""
    if not inputs.is_floating_point():
        raise TypeError(
            f"{name} must be floating point to take gradients or perturb them, got {inputs.dtype}: use .float() "
            "for integer-coded images or features (in a callback whose model converts uint8 images itself: "
            "input_key= a function of the batch giving the float images, model_attr= the network taking them). "
            "Token ids (an nn.Embedding model) cannot be attributed "
            "directly: explain the embedded sequence instead, with a module that takes the embeddings "
            "(B,T,D) (model_attr=...) and input_key= a function of the batch that embeds the tokens."
        )


def finite_rows(x: Tensor) -> Tensor:
    """Boolean mask (B,) of samples without NaN/Inf."""
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(1)


def check_map(attr: Tensor, name: str = "attribution") -> None:
    if not all_finite(attr):
        raise FloatingPointError(
            f"{name} contains NaN or Inf; the model may produce non-finite gradients (check for log(0), "
            "division by zero, or a too-large learning rate)."
        )


def not_differentiable(wrt: str = "inputs") -> RuntimeError:
    """The error for a model output that does not depend differentiably on ``wrt``."""
    return RuntimeError(
        f"The model's output does not depend differentiably on its {wrt}: its forward runs (part of) the "
        "network under torch.no_grad()/inference_mode, calls .detach(), or goes through integer "
        "operations. Gradient methods cannot explain it: take the no_grad/detach out of forward (the "
        "explaining callbacks leave the weights untouched anyway), or use a perturbation method "
        "(occlusion, rise, sobol, hsic)."
    )


def require_graph(output: Tensor, wrt: str = "inputs") -> None:
    """Raise :func:`not_differentiable` when ``output`` is outside the autograd graph (instead of
    autograd's "element 0 of tensors does not require grad")."""
    if not output.requires_grad:
        raise not_differentiable(wrt)
