"""ReLU → softplus(β): the smoothed network of Dombrowski et al. 2019 ("Explanations can be manipulated
and geometry is to blame", NeurIPS), also the second-derivative surrogate of Ghorbani et al. 2019 and of
Integrated Hessians (Janizek et al. 2021).

A ReLU network has a zero Hessian almost everywhere, so its gradient maps are piecewise constant with
jumps; evaluating each ReLU as ``softplus(x, β) = log(1 + e^{βx}) / β`` bounds the maps' curvature by
O(β) and tends to the ReLU as β → ∞. The swap is a :class:`~torch.overrides.TorchFunctionMode`: it
catches ``nn.ReLU`` modules (their forward calls ``F.relu``) and functional ``F.relu`` / ``torch.relu`` /
``Tensor.relu`` (and the in-place forms, which then return a new tensor) only while the context is
open, on the current thread, and touches neither the modules nor their parameters: nothing to restore.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["check_beta", "relu_as_softplus"]

_RELU_FUNCS = {F.relu, torch.relu, torch.Tensor.relu, torch.relu_, F.relu_, torch.Tensor.relu_}


class _SoftplusForRelu(TorchFunctionMode):
    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCS:
            return F.softplus(args[0], beta=self.beta)
        return func(*args, **kwargs)


def check_beta(beta: float | None, what: str = "beta") -> float | None:
    """``beta`` as a float (or None), or a ValueError naming the problem: it must be positive and finite."""
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(
            f"{what} must be a positive finite number (softplus(β) replaces ReLU; larger is closer to ReLU) "
            f"or None (the network as is), got {beta!r}."
        )
    return float(beta)


@contextlib.contextmanager
def relu_as_softplus(beta: float | None) -> Iterator[None]:
    """Evaluate every ReLU (module or functional) as ``softplus(x, beta)`` inside the context; None: as is.

    Nested contexts: the innermost β applies."""
    beta = check_beta(beta)
    if beta is None:
        yield
        return
    with _SoftplusForRelu(beta):
        yield
