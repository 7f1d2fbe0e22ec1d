"""Canonizers: make a real network explainable by LRP without changing its function.

Nothing here rewrites the user's model or touches its parameters:

- **BatchNorm merged into the preceding Linear/Conv** (Montavon et al. 2019 §10.3; Guillemot et al.
  2020): a BatchNorm whose input is exactly the output of a Linear/Conv (found by running the model
  on one row and comparing tensor identities, so it works for any module tree, not only
  ``nn.Sequential``) is explained together with it as one affine layer with W' = W·γ/σ,
  b' = (b − μ)·γ/σ + β. The merged parameters exist only inside the rule's computation, hooked on the
  BatchNorm: both layers still compute their own outputs, bit for bit.
- **In-place activations** (``nn.ReLU(inplace=True)``) run out of place during the call (their flag
  restored after), so the pass rule sees their input.
- **Residual additions**: a ``+`` of two tensors that both depend on the input cannot be seen by
  module hooks, and its gradient copies the relevance to both branches (doubling it instead of
  splitting it). Such merges (add, sub, mul, div, matmul, einsum of two input-dependent tensors outside
  a layer with a rule) are detected during the call and refused with :class:`LRPUnsupportedError`,
  naming the fixes: write the addition with the :class:`Sum` module (``self.add = Sum()``,
  ``out = self.add(x, identity)``), which LRP splits in proportion to the summands (the norm rule),
  or explain the model with a gradient method (``ig``, ``input_x_gradient``, ``expected_gradients``).
- **Functional activations** (``torch.relu(x)``, ``F.gelu(x)``, ``x.tanh()``) get the same
  pass-through as their module forms.
- **Flatten / view / reshape / concatenation** need nothing: their gradient moves the relevance
  unchanged.
- **Attention** (``nn.MultiheadAttention``, transformer layers, modules named ``*Attention*``,
  ``F.scaled_dot_product_attention``) is refused by name: AttnLRP (Achtibat et al. 2024) is not
  implemented; the error names the methods that handle transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .rules import _identity, with_relevance

__all__ = ["LRPUnsupportedError", "Sum"]

ALTERNATIVES = "ig, input_x_gradient, expected_gradients, smoothgrad or gradcam"


class LRPUnsupportedError(ValueError):
    """The model holds a construct LRP cannot explain faithfully; the message names the fix."""


class Sum(nn.Module):
    """``Sum()(a, b, ...)`` = a + b + ...: a residual addition LRP can see. Its relevance is split
    in proportion to each summand's contribution (R_i = a_i / s(Σa) · R, the norm rule), so it is
    conserved; a plain ``a + b`` is refused by the LRP engine."""

    def forward(self, *tensors: Tensor) -> Tensor:
        if not tensors:
            raise ValueError("Sum needs at least one tensor.")
        out = tensors[0]
        for t in tensors[1:]:
            out = out + t
        return out


_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer)


def refuse_attention(model: nn.Module) -> None:
    """Raise :class:`LRPUnsupportedError` naming the first attention block of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, _ATTENTION) or "attention" in type(m).__name__.lower():
            raise LRPUnsupportedError(
                f"LRP cannot explain the attention block {name or '<model>'!r} ({type(m).__name__}): AttnLRP "
                f"(Achtibat et al. 2024) is not implemented. Use a gradient method for this model: {ALTERNATIVES}."
            )


@dataclass
class MergePlan:
    """What one probe forward found: the first Linear/Conv reached, and (layer, BatchNorm) pairs."""

    first: nn.Module | None = None
    merges: dict[nn.Module, nn.Module] = field(default_factory=dict)  # BatchNorm -> the layer before it


_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _mergeable(bn: nn.Module, layer: nn.Module) -> bool:
    if bn.running_mean is None or bn.running_var is None:  # no running statistics: batch statistics in eval too
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return bn.num_features == channels


def probe_plan(model: nn.Module, row: Tensor) -> MergePlan:
    """Run ``model`` on one row (no grad) and record the call order of its Linear/Conv/BatchNorm
    layers and which BatchNorm reads exactly the output of which layer."""
    calls: list[tuple[nn.Module, Any, Any]] = []  # (module, input, output): tensors kept alive for `is`
    handles = []

    def record(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        calls.append((m, args[0] if args else None, out))

    try:
        for m in model.modules():
            if isinstance(m, (*_AFFINE, nn.modules.batchnorm._BatchNorm)):
                handles.append(m.register_forward_hook(record))
        with torch.no_grad():
            model(row)
    finally:
        for h in handles:
            h.remove()
    plan = MergePlan()
    counts: dict[nn.Module, int] = {}
    for m, _, _ in calls:
        counts[m] = counts.get(m, 0) + 1
    for i, (m, x, _) in enumerate(calls):
        if plan.first is None and isinstance(m, _AFFINE):
            plan.first = m
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and counts[m] == 1:
            for layer, _, out in reversed(calls[:i]):
                # a Linear's features are its last dim, a BatchNorm's channels dim 1: the same only for 2-D outputs
                same_axis = not isinstance(layer, nn.Linear) or (isinstance(x, Tensor) and x.ndim == 2)
                adjacent = out is x and isinstance(layer, _AFFINE) and counts[layer] == 1
                if adjacent and same_axis and _mergeable(m, layer):
                    plan.merges[m] = layer
                    break
    return plan


def merged_params(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """(W', b') of ``bn(layer(x))`` as one affine layer, computed from detached copies."""
    w = layer.weight.detach()
    scale = (bn.running_var.detach() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else torch.zeros_like(scale)
    b = (b - bn.running_mean.detach()) * scale
    if bn.bias is not None:
        b = b + bn.bias.detach()
    return w * scale.view(-1, *([1] * (w.ndim - 1))), b


@dataclass
class InplaceOff:
    """Set ``inplace=False`` on every module that has the flag; :meth:`restore` puts them back."""

    saved: list[tuple[nn.Module, bool]] = field(default_factory=list)

    def apply(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(getattr(m, "inplace", None), bool) and m.inplace:
                self.saved.append((m, True))
                m.inplace = False

    def restore(self) -> None:
        for m, flag in self.saved:
            m.inplace = flag
        self.saved.clear()


def _fns(*candidates: Any) -> frozenset:
    return frozenset(c for c in candidates if c is not None)


_ACTIVATION_FUNCS = _fns(
    torch.relu, Tensor.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu, F.mish,
    torch.tanh, Tensor.tanh, F.tanh, torch.sigmoid, Tensor.sigmoid, F.sigmoid, F.softplus, F.softsign, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.logsigmoid, F.tanhshrink, getattr(torch.special, "expit", None),
)  # fmt: skip
_MERGE_FUNCS = _fns(
    torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.add_,
    torch.sub, Tensor.sub, Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__, Tensor.sub_,
    torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__, Tensor.mul_,
    torch.div, Tensor.div, Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__itruediv__, Tensor.div_,
    torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm, torch.einsum, torch.mm, Tensor.mm,
)  # fmt: skip


def _graph_tensors(args: tuple[Any, ...]) -> list[Tensor]:
    out: list[Tensor] = []
    for a in args:
        if isinstance(a, Tensor) and a.requires_grad:
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, Tensor) and t.requires_grad)
    return out


class FunctionGuard(TorchFunctionMode):
    """While the model runs under LRP: pass-through for functional activations, and a clear refusal
    of merges of two input-dependent tensors and of attention (parameters are frozen during the call,
    so ``requires_grad`` means "depends on the input"). Operations inside a layer whose output a rule
    replaces are not looked at (``depth`` > 0: their graph is cut by the rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.merged: dict[nn.Module, nn.Module] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.depth == 0:
            if func in _ACTIVATION_FUNCS and not kwargs.get("inplace", False):
                x = args[0] if args else None
                out = func(*args, **kwargs)
                if isinstance(x, Tensor) and x.requires_grad and isinstance(out, Tensor) and out.shape == x.shape:
                    return with_relevance(_identity, out, x)
                return out
            if func in _MERGE_FUNCS and len(_graph_tensors(args)) >= 2:
                raise LRPUnsupportedError(
                    f"LRP met '{getattr(func, '__name__', func)}' of two tensors that both depend on the input "
                    "(a residual addition, a gate or a product) outside any layer with a rule: its gradient would "
                    "copy the relevance to both branches instead of splitting it. Write residual additions with "
                    "explain_callbacks.attribution.lrp.Sum (out = self.add(x, identity)), or use a gradient method "
                    f"for this model: {ALTERNATIVES}."
                )
            if func is F.scaled_dot_product_attention:
                raise LRPUnsupportedError(
                    "LRP cannot explain scaled_dot_product_attention: AttnLRP (Achtibat et al. 2024) is not "
                    f"implemented. Use a gradient method for this model: {ALTERNATIVES}."
                )
        return func(*args, **kwargs)

