"""ReLU → softplus(β): the smoothed network of Dombrowski et al. 2019 ("Explanations can be manipulated
and geometry is to blame", NeurIPS), also the second-derivative surrogate of Ghorbani et al. 2019 and of
Integrated Hessians (Janizek et al. 2021).

A ReLU network has a zero Hessian almost everywhere, so its gradient maps are piecewise constant with
jumps; evaluating each ReLU as ``softplus(x, β) = log(1 + e^{βx}) / β`` bounds the maps' curvature by
O(β) and tends to the ReLU as β → ∞. The swap is a :class:`~torch.overrides.TorchFunctionMode`: it
catches ``nn.ReLU`` modules (their forward calls ``F.relu``) and functional ``F.relu`` / ``torch.relu`` /
``Tensor.relu`` (and the in-place forms, which then return a new tensor) only while the context is
open, on the current thread, and touches neither the modules nor their parameters: nothing to restore.

Denormals: softplus(x, β) = log1p(e^{βx}) / β and its derivative sigmoid(βx) underflow into float32's
subnormal range (below 1.2e-38) for βx between about -87 and -103, which a trained network's negative
pre-activations reach at β = 10. Subnormal operands take a slow path in the CPU's arithmetic: on a small
ResNet the double backward of a fragility attack step took 18 % longer on real images than on random ones
(oneDNN convolutions). Inside the context the current thread flushes subnormals to zero
(``torch.set_flush_denormal``, restored on exit): values change by less than 1.2e-38 per element.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["check_beta", "flush_denormals", "relu_as_softplus"]

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


def _flushing_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero now (torch has no getter: a subnormal float32
    times one is zero exactly when it does)."""
    return bool(torch.tensor(1e-39, dtype=torch.float32).mul(1.0).item() == 0.0)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero on this thread inside the context (CPU arithmetic; the state found is
    restored on exit). A no-op where the CPU cannot (``torch.set_flush_denormal`` returns False)."""
    if _flushing_denormals() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


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
    With a β, subnormal floats are flushed to zero on this thread inside the context (see the module's
    docstring; backward passes run inside it are flushed too).

    Nested contexts: the innermost β applies."""
    beta = check_beta(beta)
    if beta is None:
        yield
        return
    with flush_denormals(), _SoftplusForRelu(beta):
        yield
