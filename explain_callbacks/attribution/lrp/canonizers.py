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
- **Residual additions** written ``a + b``, ``torch.add(a, b)``, ``a += b`` or ``a - b`` of two tensors
  that both depend on the input cannot be seen by module hooks, and their gradient would copy the
  relevance to both branches (doubling it instead of splitting it). They get the rule of a
  :class:`Sum` (the norm rule of the composite: R_i = a_i / s_ε(Σa) · R, each summand in proportion
  to its contribution, as Zennit's ResNet canonizer does by rewriting the block with its ``Sum``
  layer), applied by the torch-function mode while the model runs: the same map as the model
  rewritten with :class:`Sum`, without rewriting it.
- **Gates**: a product ``g * s`` of two input-dependent tensors where exactly one factor is a gate
  (the output of a sigmoid or hard sigmoid, as a function or a module, or a view or chunk of one;
  ``F.glu`` / ``nn.GLU``, whose second half gates the first) gets the signal-take-all rule of Arras
  et al. 2017 ("Explaining recurrent neural network predictions in sentiment analysis"): all
  relevance goes to the signal ``s``, none to the gate.
  Other products and quotients of two input-dependent tensors (``x * x``, ``a / b``, matmul, einsum
  outside a layer with a rule) are refused with :class:`LRPUnsupportedError`: no rule says how to
  split their relevance; the error names the gradient methods that explain such a model.
- **Functional activations** (``torch.relu(x)``, ``F.gelu(x)``, ``x.tanh()``) get the same
  pass-through as their module forms.
- **Flatten / view / reshape / concatenation** need nothing: their gradient moves the relevance
  unchanged.
- **Attention** through ``F.scaled_dot_product_attention`` (in an attention module of the user's own)
  gets AttnLRP (Achtibat et al. 2024): the uniform rule on its two bilinear products and the softmax
  rule, see :meth:`FunctionGuard._attention`. ``nn.MultiheadAttention`` and the transformer layers are
  refused by type: their fused forward hides its products from the torch-function mode.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .rules import LRPUnsupportedError, Norm, Rule, _identity, _over_stab, with_relevance

__all__ = ["LRPUnsupportedError", "Sum"]

ALTERNATIVES = "ig, input_x_gradient, expected_gradients, smoothgrad or gradcam"


class Sum(nn.Module):
    """``Sum()(a, b, ...)`` = a + b + ...: a residual addition as a module, so that a composite can map
    it by type or name. Its relevance is split in proportion to each summand's contribution
    (R_i = a_i / s(Σa) · R, the norm rule), so it is conserved; a plain ``a + b`` of two input-dependent
    tensors gets the same rule from the LRP engine."""

    def forward(self, *tensors: Tensor) -> Tensor:
        if not tensors:
            raise ValueError("Sum needs at least one tensor.")
        out = tensors[0]
        for t in tensors[1:]:
            out = out + t
        return out


def refuse_unsupported(model: nn.Module) -> None:
    """Raise :class:`LRPUnsupportedError` naming the first fused recurrent layer without LRP rules (``nn.GRU``,
    ``nn.RNN``) of ``model``: their forward runs as one fused kernel whose gates and products the torch-function
    mode cannot see, so their gradient would pass for relevance. (``nn.LSTM`` gets :class:`~.rules.LSTMRule`; a cell
    written from ``nn.Linear`` and ``torch.sigmoid`` gates gets the signal-take-all rule of Arras et al. 2017.)"""
    for name, m in model.named_modules():
        if isinstance(m, nn.RNNBase) and not isinstance(m, nn.LSTM):
            raise LRPUnsupportedError(
                f"LRP cannot explain the recurrent layer {name or '<model>'!r} ({type(m).__name__}): its fused kernel "
                "hides the gate products that LRP's LSTM rules (Arras et al. 2017) need; write the cell from "
                "nn.Linear and torch.sigmoid/torch.tanh (its gates then get the signal-take-all rule), or explain this "
                f"model with a gradient method: {ALTERNATIVES}."
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
            if isinstance(m, (*_AFFINE, nn.RNNBase, nn.modules.batchnorm._BatchNorm)):
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
        if plan.first is None and isinstance(m, (*_AFFINE, nn.RNNBase)):  # an LSTM first: the input layer
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
        self.apply_to(model.modules())

    def apply_to(self, modules: Any) -> None:
        """The same, for the given modules (e.g. a list already walked)."""
        for m in modules:
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
_SUM_FUNCS = _fns(
    torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, torch.sub, Tensor.sub, Tensor.__sub__, Tensor.__rsub__,
)  # fmt: skip
_MUL_FUNCS = _fns(torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__)
#: in-place forms: computed out of place on a clone, then copied into the tensor (aliases see the new value)
_INPLACE = {
    Tensor.__iadd__: torch.add, Tensor.add_: torch.add, Tensor.__isub__: torch.sub, Tensor.sub_: torch.sub,
    Tensor.__imul__: torch.mul, Tensor.mul_: torch.mul,
}  # fmt: skip
_OTHER_MERGES = _fns(
    torch.div, Tensor.div, Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__itruediv__, Tensor.div_,
    torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm, Tensor.bmm, torch.einsum, torch.mm,
    Tensor.mm, torch.baddbmm, Tensor.baddbmm, torch.addbmm, torch.addmm, Tensor.addmm, torch.tensordot, torch.outer,
    torch.bilinear, F.bilinear,
)  # fmt: skip
#: functions whose output is a gate (values in [0, 1] that scale another signal: Arras et al. 2017)
_GATE_FUNCS = _fns(torch.sigmoid, Tensor.sigmoid, F.sigmoid, F.hardsigmoid, getattr(torch.special, "expit", None))
GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
#: functions whose outputs are views or pieces of their first argument: a gate's stay gates
_SHAPE_FUNCS = _fns(
    Tensor.view, Tensor.view_as, Tensor.reshape, Tensor.reshape_as, torch.reshape, Tensor.flatten, torch.flatten,
    Tensor.unsqueeze, torch.unsqueeze, Tensor.squeeze, torch.squeeze, Tensor.expand, Tensor.expand_as,
    Tensor.__getitem__, Tensor.chunk, torch.chunk, Tensor.split, torch.split, Tensor.unbind, torch.unbind,
    Tensor.permute, torch.permute, Tensor.transpose, torch.transpose, Tensor.contiguous, Tensor.narrow,
)  # fmt: skip


class _FunctionSum(Sum):
    """The function of an addition met in the model's forward (``torch.add``, ``+``, ``-``), as a
    :class:`Sum` module: the composite's rule for sums applies to it, by type or by the ``sum`` group."""

    def __init__(self, func: Any, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.func, self.kwargs = func, kwargs

    def forward(self, *args: Any) -> Tensor:
        return self.func(*args, **self.kwargs)


_PLAIN_ADDS = _fns(torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)


def _plain_sum(a: Tensor, b: Tensor, out: Tensor, stabilizer: float) -> Tensor:
    """The norm rule on ``a + b`` of one shape (a residual addition), written out: q = R / s(a + b), R_a = a ⊙ q,
    R_b = b ⊙ q; the values of the general form (which differentiates the addition again), without its graph."""
    ad, bd = a.detach(), b.detach()

    def backward(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor]:
        q = _over_stab(grad, ad + bd, stabilizer)  # a + b recomputed: the model may modify `out` in place
        return [ad * q, bd * q]

    return with_relevance(backward, out, a, b, keep=False)


class _TensorSet:
    """Tensors by identity, without keeping them alive (``in`` on a WeakSet would compare tensors with ``==``)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: Any) -> None:
        for x in t if isinstance(t, (tuple, list)) else (t,):
            if isinstance(x, Tensor):
                self._refs[id(x)] = weakref.ref(x)

    def __contains__(self, t: Any) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


def _graph_tensors(args: tuple[Any, ...]) -> list[Tensor]:
    out: list[Tensor] = []
    for a in args:
        if isinstance(a, Tensor) and a.requires_grad:
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, Tensor) and t.requires_grad)
    return out


_MHA_ARGS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
    "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias",
)  # fmt: skip


def _mha_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, causal: bool, batch: int, heads: int,
              tgt: int, src: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:  # fmt: skip
    """``nn.MultiheadAttention``'s masks as one additive float mask (B, H, T, S): a boolean entry True means
    "not attended" (−inf) there, unlike in ``scaled_dot_product_attention``."""

    def additive(m: Tensor) -> Tensor:
        m = m.detach()
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    total = None
    if attn_mask is None and causal:
        attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        m = additive(attn_mask)
        total = m.reshape(batch, heads, tgt, src) if m.ndim == 3 else m.expand(batch, heads, tgt, src)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).reshape(batch, 1, 1, src)
        total = kp if total is None else total + kp
    return None if total is None else total.expand(batch, heads, tgt, src)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float | None
) -> tuple[float, Tensor, Tensor, Tensor, Tensor]:
    """(scale, raw = scale·QKᵀ, S = raw + M, A = softmax(S), O = A V) of detached q, k, v."""
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    raw = sc * (q @ k.transpose(-2, -1))
    s = raw
    if causal:
        keep = torch.ones(raw.shape[-2:], dtype=torch.bool, device=raw.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.detach()
    attn = torch.softmax(s, -1)
    return sc, raw, s, attn, attn @ v


def attention_relevance(
    q: Tensor, k: Tensor, v: Tensor, grad: Tensor, mask: Tensor | None, causal: bool, scale: float | None, eps: float,
    live_in: list[int],
    fwd: tuple[float, Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """AttnLRP (Achtibat et al. 2024) of O = softmax(scale · QKᵀ + M) V for the relevance ``grad`` of O, from
    detached q, k, v (..., L, E): (R_q, R_k, R_v). ``live_in``: which of q, k, v depend on the input (the
    uniform rule halves a bilinear product's relevance only between two input-dependent factors).

    - O = A V and QKᵀ, bilinear: the uniform rule, each factor half of the ε-rule's relevance
      (R_A = ½ A ⊙ (R_O / s(O)) Vᵀ, R_V = ½ V ⊙ Aᵀ (R_O / s(O)), likewise Q and K);
    - A = softmax(S): R_S = S ⊙ (R_A − A · Σ_j R_A), row by row (the softmax's Taylor expansion at S; the
      constant term is absorbed);
    - the mask M (additive, or −inf where masked) is a bias: R_raw = scale·QKᵀ / s(S) · R_S, masked entries 0.

    ``fwd``: :func:`attention_forward` of the same arguments, when the caller has it already.
    """
    sc, raw, s, attn, o = fwd if fwd is not None else attention_forward(q, k, v, mask, causal, scale)
    dep_a, dep_v = 0 in live_in or 1 in live_in, 2 in live_in
    c = _over_stab(grad, o, eps) / (2 if dep_a and dep_v else 1)
    r_a = attn * (c @ v.transpose(-2, -1))
    r_v = v * (attn.transpose(-2, -1) @ c)
    live = attn > 0
    s_safe = torch.where(live, s, torch.zeros_like(s))
    r_s = torch.where(live, s_safe * (r_a - attn * r_a.sum(-1, keepdim=True)), torch.zeros_like(s))
    r_raw = r_s if (mask is None or mask.dtype == torch.bool) else raw * _over_stab(r_s, s_safe, eps)
    c2 = sc * _over_stab(r_raw, raw, eps) / (2 if 0 in live_in and 1 in live_in else 1)  # ∂raw/∂q = sc·k
    return q * (c2 @ k), k * (c2.transpose(-2, -1) @ q), r_v


class FunctionGuard(TorchFunctionMode):
    """While the model runs under LRP (parameters are frozen during the call, so ``requires_grad``
    means "depends on the input"):

    - functional activations get the pass rule, like their module forms;
    - additions of two input-dependent tensors get the composite's rule for :class:`Sum` (``sum_rule``);
    - products of a gate and a signal give all relevance to the signal (Arras et al. 2017);
    - other merges of two input-dependent tensors and ``scaled_dot_product_attention`` are refused.

    Operations inside a layer whose output a rule replaces are not looked at (``depth`` > 0: their
    graph is cut by the rule)."""

    def __init__(self, sum_rule: Rule | None = None) -> None:
        super().__init__()
        self.depth = 0
        self.merged: dict[nn.Module, nn.Module] = {}
        self.sum_rule = sum_rule
        self.gates = _TensorSet()
        self.attention_epsilon = 1e-6

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.depth > 0:
            return func(*args, **kwargs)
        if func in _ACTIVATION_FUNCS and not kwargs.get("inplace", False):
            x = args[0] if args else None
            out = func(*args, **kwargs)
            if isinstance(x, Tensor) and x.requires_grad and isinstance(out, Tensor) and out.shape == x.shape:
                out = with_relevance(_identity, out, x, keep=False)
            if func in _GATE_FUNCS:
                self.gates.add(out)
            return out
        if func is F.glu and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            return self._glu(args, kwargs)
        if func in _SHAPE_FUNCS:
            out = func(*args, **kwargs)
            if args and args[0] in self.gates:
                self.gates.add(out)
            return out
        if len(_graph_tensors(args)) >= 2:
            if func in _INPLACE:
                return self._inplace(func, args, kwargs)
            if func in _SUM_FUNCS:
                return self._sum(func, args, kwargs)
            if func in _MUL_FUNCS:
                return self._gate(func, args, kwargs)
            if func in _OTHER_MERGES:
                raise LRPUnsupportedError(
                    f"LRP met '{_name(func)}' of two tensors that both depend on the input (a quotient, a matrix "
                    "product or an einsum, e.g. attention scores or a hand-written normalisation) outside any layer "
                    "with a rule: no LRP rule here says how to split its relevance between the two. Explain this "
                    f"model with a gradient method: {ALTERNATIVES}."
                )
        if func is F.scaled_dot_product_attention and _graph_tensors(args[:3]):
            return self._attention(args, kwargs)
        if func is F.multi_head_attention_forward and _graph_tensors(args[:3]):
            return self._mha(args, kwargs)
        if func is F.layer_norm and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            return self._layer_norm(args, kwargs)
        return func(*args, **kwargs)

    def _attention(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """AttnLRP (Achtibat et al. 2024, "AttnLRP: attention-aware layer-wise relevance propagation for
        transformers", ICML) for O = softmax(scale · QKᵀ + M) V, the forward value the fused kernel's:

        - O = A V and QKᵀ, bilinear in two input-dependent factors: the uniform rule, each factor half of the
          ε-rule's relevance (R_A = ½ A ⊙ (R_O / s(O)) Vᵀ, R_V = ½ V ⊙ Aᵀ (R_O / s(O)), likewise Q and K);
        - A = softmax(S): R_S = S ⊙ (R_A − A · Σ_j R_A), row by row (the softmax's Taylor expansion at S; the
          constant term is absorbed);
        - the mask M (additive, or −inf where masked) is a bias: R_raw = scale·QKᵀ / s(S) · R_S, masked entries 0.
        """
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if float(a.get("dropout_p") or 0.0) > 0 or a.get("enable_gqa"):
            raise LRPUnsupportedError(
                "LRP's attention rule (AttnLRP) needs scaled_dot_product_attention without dropout (dropout_p=0 in "
                f"eval) and without enable_gqa (repeat key/value heads first), or a gradient method: {ALTERNATIVES}."
            )
        out = F.scaled_dot_product_attention(*args, **kwargs)
        mask, causal, scale = a.get("attn_mask"), bool(a.get("is_causal")), a.get("scale")
        eps = self.attention_epsilon
        live_in = [i for i, t in enumerate((q, k, v)) if isinstance(t, Tensor) and t.requires_grad]

        def backward(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor | None]:
            qd, kd, vd = (t.detach() for t in (q, k, v))
            rel = attention_relevance(qd, kd, vd, grad, mask, causal, scale, eps, live_in)
            return [rel[i] for i in live_in]  # q, k and v may be one tensor: autograd sums its three parts

        return with_relevance(backward, out, *((q, k, v)[i] for i in live_in), keep=False)

    def _mha(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``F.multi_head_attention_forward`` (``nn.MultiheadAttention`` and the transformer layers): AttnLRP
        (Achtibat et al. 2024) on its own parameters. The forward is the function's own (its values unchanged);
        the backward recomputes the projections and hands the relevance back through the ε rule on the output
        projection, :func:`attention_relevance` on the heads, and the ε rule on the q/k/v projections (biases
        absorb their share). Attention weights it returns (``need_weights=True``) carry no relevance."""
        a = dict(zip(_MHA_ARGS, args))
        a.update(kwargs)
        unsupported = [n for n in ("bias_k", "bias_v", "static_k", "static_v") if a.get(n) is not None]
        if a.get("add_zero_attn"):
            unsupported.append("add_zero_attn")
        if a.get("training", True) and float(a.get("dropout_p") or 0.0) > 0:
            unsupported.append("dropout in training mode")
        if unsupported:
            raise LRPUnsupportedError(
                f"LRP's attention rule (AttnLRP) does not cover nn.MultiheadAttention with {', '.join(unsupported)}; "
                f"build the attention without it, or explain this model with a gradient method: {ALTERNATIVES}."
            )
        out, weights = F.multi_head_attention_forward(*args, **kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        live_in = [i for i, t in enumerate((query, key, value)) if isinstance(t, Tensor) and t.requires_grad]
        if not live_in:
            return out, weights
        eps, heads = self.attention_epsilon, int(a["num_heads"])
        if a.get("use_separate_proj_weight"):
            w_q, w_k, w_v = (a[f"{n}_proj_weight"].detach() for n in "qkv")
        else:
            w_q, w_k, w_v = a["in_proj_weight"].detach().chunk(3)
        b_in = a.get("in_proj_bias")
        b_q, b_k, b_v = (None, None, None) if b_in is None else b_in.detach().chunk(3)
        w_o = a["out_proj_weight"].detach()
        b_o = None if a.get("out_proj_bias") is None else a["out_proj_bias"].detach()
        batched = query.ndim == 3
        tgt, src = query.shape[0], key.shape[0]
        batch = query.shape[1] if batched else 1
        mask = _mha_mask(a.get("attn_mask"), a.get("key_padding_mask"), bool(a.get("is_causal")), batch, heads,
                         tgt, src, query.dtype, query.device)  # fmt: skip
        qd, kd, vd = (t.detach() for t in (query, key, value))

        def backward(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor | None]:
            xq, xk, xv, r_out = (t if batched else t.unsqueeze(1) for t in (qd, kd, vd, grad))  # (L, B, E)

            def heads_first(t: Tensor) -> Tensor:  # (L, B, E) -> (B, H, L, E/H)
                return t.reshape(t.shape[0], batch, heads, -1).permute(1, 2, 0, 3)

            q, k, v = F.linear(xq, w_q, b_q), F.linear(xk, w_k, b_k), F.linear(xv, w_v, b_v)
            qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
            fwd = attention_forward(qh, kh, vh, mask, False, None)
            h = fwd[-1].permute(2, 0, 1, 3).reshape(tgt, batch, -1)  # the heads concatenated: (T, B, E)
            r_h = h * (_over_stab(r_out, F.linear(h, w_o, b_o), eps) @ w_o)  # ε on the output projection
            dep = (0 in live_in, 1 in live_in, 2 in live_in)
            r_q, r_k, r_v = attention_relevance(qh, kh, vh, heads_first(r_h), mask, False, None, eps,
                                                [i for i in range(3) if dep[i]], fwd)  # fmt: skip

            def tokens_first(t: Tensor) -> Tensor:  # (B, H, L, E/H) -> (L, B, E)
                return t.permute(2, 0, 1, 3).reshape(t.shape[2], batch, -1)

            rel = []
            for i, (x, z, r, w) in enumerate(((xq, q, r_q, w_q), (xk, k, r_k, w_k), (xv, v, r_v, w_v))):
                if dep[i]:  # ε on the projection: R_x = x ⊙ Wᵀ (R_z / s(z))
                    rx = x * (_over_stab(tokens_first(r), z, eps) @ w)
                    rel.append(rx if batched else rx.squeeze(1))
            return rel

        wrapped = with_relevance(backward, out, *((query, key, value)[i] for i in live_in), keep=False)
        return wrapped, None if weights is None else weights.detach()

    def _layer_norm(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """``F.layer_norm`` (``nn.LayerNorm``) by AttnLRP's rule (Achtibat et al. 2024, §3.3; Ali et al. 2022):
        the division by the standard deviation σ is taken as a constant (the identity rule on the
        normalisation), which leaves y = γ ⊙ (x − mean(x)) / σ + β linear in x, explained by the ε rule:
        R_x = x ⊙ Jᵀ (R_y / s(y)) with Jᵀu = γ/σ ⊙ u − mean(γ/σ ⊙ u). Conservative up to what β and ε absorb."""
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        a = dict(zip(names, args))
        a.update(kwargs)
        x, shape = a["input"], tuple(a["normalized_shape"])
        weight, ln_eps = a.get("weight"), float(a.get("eps", 1e-5))
        out = F.layer_norm(*args, **kwargs)
        dims = tuple(range(-len(shape), 0))
        eps = self.attention_epsilon
        xd = x.detach()
        gamma = None if weight is None else weight.detach()

        def backward(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor]:
            y = F.layer_norm(xd, shape, weight, a.get("bias"), ln_eps).detach()  # recomputed: not modified in place
            u = _over_stab(grad, y, eps) * (xd.var(dims, unbiased=False, keepdim=True) + ln_eps).rsqrt()
            if gamma is not None:
                u = u * gamma
            return [xd * (u - u.mean(dims, keepdim=True))]

        return with_relevance(backward, out, x, keep=False)

    def _sum(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """``a + b`` as if written with :class:`Sum`: the composite's sum rule on the function itself."""
        out = func(*args, **kwargs)
        if self.sum_rule is None:  # a composite without a rule for Sum: what a Sum module would get (its gradient)
            return out
        rule = self.sum_rule
        if (type(rule) is Norm and func in _PLAIN_ADDS and not kwargs and len(args) == 2
                and all(isinstance(t, Tensor) and t.requires_grad and t.shape == out.shape for t in args)):  # fmt: skip
            return _plain_sum(args[0], args[1], out, rule.stabilizer)
        return rule.apply(_FunctionSum(func, kwargs), args, out)

    def _gate(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """Signal-take-all (Arras et al. 2017): the relevance of ``gate * signal`` all goes to the signal."""
        a, b = args[0], args[1]
        if (a in self.gates) == (b in self.gates):
            which = "both factors are gates" if a in self.gates else "neither factor is a gate (a sigmoid's output)"
            raise LRPUnsupportedError(
                f"LRP met '{_name(func)}' of two tensors that both depend on the input, and {which}: LRP gives a "
                "gate's product all relevance to the other factor (Arras et al. 2017), but for this product no rule "
                "says how to split it. Compute gates with torch.sigmoid / nn.Sigmoid, or explain this model with a "
                f"gradient method: {ALTERNATIVES}."
            )
        signal = b if a in self.gates else a
        out = func(*args, **kwargs)

        shape = signal.shape

        def to_signal(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor]:
            return [grad.sum_to_size(shape)]  # a broadcast signal collects the relevance of its copies

        return with_relevance(to_signal, out, signal, keep=False)

    def _glu(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """GLU (Dauphin et al. 2017), a ⊙ σ(b) of the two halves of x: a gate, all relevance to the signal a."""
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
        out = F.glu(*args, **kwargs)

        def to_signal(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor]:
            return [torch.cat([grad, torch.zeros_like(grad)], dim)]

        return with_relevance(to_signal, out, x, keep=False)

    def _inplace(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """``a += b`` (and ``-=``, ``*=``, ``add_``...): the out-of-place rule on a clone of ``a``, whose
        result is copied into ``a``: aliases of ``a`` see the new value, and the relevance reaches
        ``a``'s old value through the clone (the copy gives that old value a zero gradient)."""
        op = _INPLACE[func]
        a = args[0]
        new = self.__torch_function__(op, (), (a.clone(), *args[1:]), kwargs)
        a.copy_(new)
        return a


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))
