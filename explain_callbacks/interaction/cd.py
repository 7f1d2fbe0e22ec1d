"""Contextual decomposition (CD) following the model's real dataflow.

Contextual decomposition (Murdoch, Liu & Yu 2018, "Beyond word importance", arXiv:1801.05453, for
LSTMs; Singh, Murdoch & Yu 2019, "Hierarchical interpretations for neural network predictions",
arXiv:1806.05337, for CNNs) carries two tensors through the network: β, the part of every
activation that comes from a feature group S, and γ, the rest, with β + γ equal to the true
activation at every layer. At the input ``β₀ = M ⊙ x`` and ``γ₀ = (1 − M) ⊙ x``; at the output
``β_L + γ_L`` equals the logits, and ``β_L`` is the contribution of S.

The propagation rules are those of the authors' reference code (``acd/scores/cd_propagate.py``),
not the Shapley average of the paper's appendix:

- Linear / Conv / ConvTranspose: ``b = layer(0)``, ``r = layer(β) − b``, ``i = layer(γ) − b``; the bias is split in
  proportion to ``|r| + 1e-20`` and ``|i| + 1e-20``: ``β' = r + b·p``, ``γ' = i + b·(1 − p)``.
- ReLU and every other elementwise activation σ: ``β' = σ(β)``, ``γ' = σ(β + γ) − σ(β)``.
- Max-pool: the arg-max of ``β + γ``; both streams are gathered there.
- Avg-pool, adaptive avg-pool, dropout (eval), flatten / view / reshape / permute, slicing,
  concatenation, sums and means: each stream alone (linear, bias-free maps).
- BatchNorm (eval, ``propagate_batchnorm2d``): ``y = s·x + t``; ``r = bn(β) − bn(0)``, ``i = bn(γ) − bn(0)``,
  ``β' = r + t·|r|/(|r| + |i|)``, ``γ' = bn(β + γ) − β'``. Unlike the linear rule the share has no
  ``+1e-20``: where both streams vanish (after a ReLU, where the ~1e-20 leftovers of the linear rule's ε
  round away in ``bn(β) − bn(0)``) β gets nothing and the whole shift t goes to γ. We follow this
  exactly (checked against the ``acd`` package); one consequence is that S = everything leaves
  ``γ = t`` at the units a ReLU zeroed before a BatchNorm, so ``γ_L = 0`` there holds only for
  networks without that pattern.
- LSTM: the gate linearisation of Murdoch et al. 2018 (the reference ``cd_text``): each gate
  pre-activation is split into (relevant, irrelevant, bias) parts and the sigmoid/tanh is split by
  the two-ordering Shapley average of ``propagate_three``; the cell keeps ``β_c·(rf + bf)`` and the
  output ``h = o ⊙ tanh(c)`` uses the full output gate and the two-part tanh split.

Extensions beyond the reference code (documented as ours):

- Residual additions of two decomposed tensors add the streams; adding a constant (a tensor that
  does not depend on the input) splits it like a bias.
- LayerNorm, GroupNorm, InstanceNorm (per-sample statistics; modules and ``F.layer_norm``,
  ``F.group_norm``, ``F.instance_norm``): the reference BatchNorm rule with the statistics of the true
  activation. The deviation σ is that of ``β + γ`` over each normalised group; the mean, a linear
  function of the input, is taken from each stream separately, ``r = (β − mean β)·w/σ``,
  ``i = (γ − mean γ)·w/σ`` (exact: centring is linear); the affine bias, the only constant, is split
  as the BatchNorm rule splits its shift (0/0 gives β nothing), and ``γ' = norm(β + γ) − β'``. So
  β + γ is the true activation, S = everything gives γ = 0 after these layers even behind a ReLU,
  and S = nothing gives β = 0. InstanceNorm with running statistics in eval mode is the BatchNorm
  rule itself; running statistics are never updated.
- A product of two decomposed tensors keeps ``β₁ ⊙ β₂`` in β; every cross term goes to γ.
- LSTM bias-by-bias term ``b_i ⊙ b_g``: the reference code gives it to β when the word at step t
  belongs to the phrase. Here the layer input at step t may be only partly in S, so the term is
  split in proportion to ``Σ|β_t| : Σ|γ_t|`` (which reproduces the reference for whole-word masks).
- In training mode BatchNorm normalises with the batch statistics of ``β + γ`` (running statistics
  are not updated) and Dropout applies one mask to both streams, so ``β + γ`` still equals the
  training-mode activation; with chunking the statistics are those of the chunk.

The model is traced with :mod:`torch.fx` (standard ``torch.nn`` layers, including ``nn.LSTM``, are
leaves), so functional calls (``F.relu``, ``torch.flatten``), ``view``/``reshape``, residual adds
and ``torch.cat`` inside ``forward`` are followed. A ``forward`` that branches on *shapes*
(``if x.ndim > 2``) is traced again with concrete values of the first input (the graph is then
specialised to that per-sample shape); branching on tensor *values* cannot be decomposed. Any
operation without a rule raises :class:`CDUnsupportedError` naming the operation, the module and
the source line. The traced graph is cached per module instance.

Cost: the two streams go through each linear/conv layer as one stacked batch (about two forward
passes of the ``B × G`` decomposed rows) plus the elementwise rules, written in place when autograd
is off; many groups are evaluated in one batched pass by :func:`cd_batched`.

Two equivalent forms (``streams=``): ``"pair"`` carries β and γ as the reference does; ``"total"`` carries the
true activation z = β + γ and β, with γ = z − β formed only where a rule needs it. In the second form ReLU,
max-pooling and BatchNorm act on z as the model itself does, so z at the output is the model's forward pass
(:func:`cd_forward`: a CDEP training step takes its task logits from it), and the rules of the linear layers and
BatchNorm are single hand-differentiated operations over cache-sized pieces (a BatchNorm followed by a ReLU in one
pass); with ``compiled=True`` (:func:`cd_forward`) those rules run as ``torch.compile`` kernels, one pass each, with an
eager fallback where compilation is unavailable. Both forms agree to float rounding
(tested to 1e-10 in float64 on every architecture family above). Measured on a 2-core
CPU: 64 groups of one input cost 2.7-3.1x one forward of 64 inputs on SmallCNN and 3.3-5x on the
NID MLP, whose tiny layers are dominated by per-operation overhead.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import os
import re
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._internal.batching import BatchSize
from .._internal.batching import rows as rows_per_call
from .._internal.guard import rng_guard
from .._internal.target_ops import TargetOperator

__all__ = [
    "CDUnsupportedError",
    "Decomposition",
    "cd_batched",
    "cd_forward",
    "cd_logits",
    "cd_propagate",
    "cd_scores",
    "supported_operations",
    "update_norm_stats",
]

_EPS = 1e-20
BIAS_AT_ZERO = ("half", "rest")
# Stabilisers (ε_β, ε_γ) of the linear rule's bias split ``p = (|r| + ε_β)/(|r| + |i| + ε_β + ε_γ)``:
# "half" (the acd reference): ε on both, so where both streams are exactly 0 each gets half the bias;
# "rest": the bias goes to γ there (and wherever r = 0), so β stays exactly 0 where S has no influence.
_BIAS_EPS: contextvars.ContextVar[tuple[float, float]] = contextvars.ContextVar("cd_bias_eps", default=(_EPS, _EPS))
STREAMS = ("pair", "total")
# BatchNorm layers in training mode normalise with the batch statistics of β + γ; when a list is set here
# each such layer appends (module, mean, biased var, values per channel), so that a caller whose task
# forward *is* this pass can update the running statistics once (:func:`update_norm_stats`).
NormStats = list[tuple[nn.modules.batchnorm._BatchNorm, Tensor, Tensor, int]]
_NORM_STATS: contextvars.ContextVar[NormStats | None] = contextvars.ContextVar("cd_norm_stats", default=None)
# The (z, β) rules of linear layers and BatchNorm as kernels compiled by torch.compile (cd_forward(compiled=True))
_COMPILED: contextvars.ContextVar[bool] = contextvars.ContextVar("cd_compiled", default=False)


class CDUnsupportedError(NotImplementedError):
    """Raised for an operation that contextual decomposition has no rule for."""


@dataclass
class Decomposition:
    """A tensor split as ``rel + irr`` (β: from the feature group S, γ: from the rest).

    ``both`` optionally holds the two streams stacked along the batch dimension (rel = both[:N],
    irr = both[N:]), so that the next linear layer needs no concatenation.
    """

    rel: Tensor
    irr: Tensor
    both: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def total(self) -> Tensor:
        if self.both is not None:  # a sum over the stacked pair: its backward is a broadcast, not two
            return self.both.view(2, -1, *self.both.shape[1:]).sum(0)  # zero-filled slice gradients
        return self.rel + self.irr

    @property
    def stacked(self) -> Tensor:
        return self.both if self.both is not None else torch.cat([self.rel, self.irr], 0)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Decomposition:
        return Decomposition(fn(self.rel), fn(self.irr))


# ----------------------------------------------------------------------------------------------
# Elementary rules
# ----------------------------------------------------------------------------------------------


def _split_bias(r: Tensor, i: Tensor, bias: Tensor | None) -> Decomposition:
    """``β' = r + b·p``, ``γ' = i + b·(1 − p)`` with ``p = (|r| + ε)/(|r| + |i| + 2ε)``."""
    if bias is None:
        return Decomposition(r, i)
    e_rel, e_irr = _BIAS_EPS.get()
    ar = r.abs() + e_rel
    p = ar / (ar + i.abs() + e_irr)
    bp = bias * p
    return Decomposition(r + bp, i + (bias - bp))


def _stacked(both: Tensor) -> Decomposition:
    n = both.shape[0] // 2
    return Decomposition(both[:n], both[n:], both)


def _pair(t: Tensor) -> Tensor:
    """View stacked streams (2N, ...) as (2, N, ...)."""
    return t.view(2, t.shape[0] // 2, *t.shape[1:])


def _abs_eps(z: Tensor, eps: tuple[float, float]) -> Tensor:
    """``a_k = |z_k| + ε_k`` for stacked streams ``z`` (2, N, ...)."""
    a = z.abs()
    for k, e in enumerate(eps):
        if e:
            a[k].add_(e)
    return a


def _bias_split_values(both: Tensor, bias: Tensor, eps: tuple[float, float]) -> Tensor:
    """``z + b·a/(a₀ + a₁)`` with ``a_k = |z_k| + ε_k`` on stacked streams, in place: two allocations."""
    z = _pair(both)
    a = _abs_eps(z, eps)
    den = a[0] + a[1]
    return a.mul_(bias).div_(den).add_(z).view(both.shape)


class _BiasSplit(torch.autograd.Function):
    """The linear rule's bias split with a hand-written backward: autograd through the six elementwise
    operations and the two stream slices would allocate and fill full-size gradient buffers per operation.

    With ``a_k = |z_k| + ε_k``, ``D = a₀ + a₁``, ``out_k = z_k + b·a_k/D`` and ``q = b·(g₀ − g₁)/D²``:
    ``∂z₀ = g₀ + q·sgn(z₀)·a₁``, ``∂z₁ = g₁ − q·sgn(z₁)·a₀``, ``∂b = Σ (g₀a₀ + g₁a₁)/D``."""

    @staticmethod
    def forward(ctx: Any, both: Tensor, bias: Tensor, eps: tuple[float, float]) -> Tensor:
        ctx.save_for_backward(both, bias)
        ctx.eps = eps
        return _bias_split_values(both, bias, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        both, bias = ctx.saved_tensors
        z, g = _pair(both), _pair(grad)
        a = _abs_eps(z, ctx.eps)
        den = a[0] + a[1]
        # q = b·(g₀ − g₁)/D times the shares a_k/D ≤ 1: where both streams are 0 (D = ε) the zero signs give 0;
        # b·(g₀ − g₁)/D² there overflowed to inf for gradients above ~0.1, and inf·0 made the gradient NaN
        q = (g[0] - g[1]).mul_(bias).div_(den)
        dz = torch.empty_like(z)
        torch.addcmul(g[0], q * a[1].div(den), z[0].sign(), out=dz[0])
        torch.addcmul(g[1], q.mul_(a[0].div(den)), z[1].sign(), value=-1.0, out=dz[1])
        dbias = None
        if ctx.needs_input_grad[1]:
            dbias = torch.addcmul(g[0] * a[0], g[1], a[1]).div_(den).sum_to_size(bias.shape)
        return dz.view(both.shape), dbias, None


def _split_stacked(both: Tensor, bias: Tensor | None) -> Decomposition:
    """The bias split of :func:`_split_bias` on stacked streams (2N, ...), fused (:class:`_BiasSplit`)."""
    if bias is None:
        return _stacked(both)
    eps = _BIAS_EPS.get()
    if torch.is_grad_enabled() and (both.requires_grad or bias.requires_grad):
        return _stacked(_BiasSplit.apply(both, bias, eps))
    return _stacked(_bias_split_values(both, bias, eps))


def _affine(x: Decomposition, lin: Callable[[Tensor], Tensor], bias: Tensor | None) -> Decomposition:
    """Linear/conv rule. Both streams go through ``lin`` (bias-free) as one stacked batch."""
    if isinstance(x, _Led):
        return _led_affine(x, lin, bias)
    return _split_stacked(lin(x.stacked), bias)


def _elementwise(x: Decomposition, act: Callable[[Tensor], Tensor]) -> Decomposition:
    """``β' = σ(β)``, ``γ' = σ(β + γ) − σ(β)`` (the reference ``propagate_relu``); for ``(z, β)``: σ(z), σ(β)."""
    if isinstance(x, _Led):
        return _Led(act(x.z), act(x.rel))
    rel = act(x.rel)
    return Decomposition(rel, act(x.total) - rel)


def _relu_values(rel_in: Tensor, irr_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ReLU rule written in place into one stacked buffer; also the masks β > 0 and β + γ > 0."""
    n = rel_in.shape[0]
    out = torch.empty((2 * n, *rel_in.shape[1:]), dtype=rel_in.dtype, device=rel_in.device)
    rel, irr = out[:n], out[n:]
    torch.clamp(rel_in, min=0, out=rel)
    torch.add(rel_in, irr_in, out=irr)
    irr.relu_()
    pos_total = irr > 0
    irr.sub_(rel)
    return out, rel > 0, pos_total


class _ReluRule(torch.autograd.Function):
    """The ReLU rule ``β' = relu(β)``, ``γ' = relu(β + γ) − relu(β)`` on stacked streams with a
    hand-written backward (two boolean masks saved): ``∂γ = g_γ·[β+γ > 0]``,
    ``∂β = ∂γ + (g_β − g_γ)·[β > 0]``."""

    @staticmethod
    def forward(ctx: Any, both: Tensor) -> Tensor:
        z = _pair(both)
        out, pos_rel, pos_total = _relu_values(z[0], z[1])
        ctx.save_for_backward(pos_rel, pos_total)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        pos_rel, pos_total = ctx.saved_tensors
        g = _pair(grad)
        d = torch.empty_like(g)
        torch.mul(g[1], pos_total, out=d[1])
        torch.sub(g[0], g[1], out=d[0])
        d[0].mul_(pos_rel).add_(d[1])
        return d.view(grad.shape)


def _relu(x: Decomposition) -> Decomposition:
    """The ReLU rule; on stacked streams one fused operation (:class:`_ReluRule`), without autograd
    written in place into one stacked buffer. For ``(z, β)`` the model's own ReLU on both."""
    if isinstance(x, _Led):
        return _Led(led=torch.relu(x.zb)) if x.zb is not None else _Led(torch.relu(x.z), torch.relu(x.rel))
    if torch.is_grad_enabled() and (x.rel.requires_grad or x.irr.requires_grad):
        if x.both is None:
            return _elementwise(x, torch.relu)
        return _stacked(_ReluRule.apply(x.both))
    return _stacked(_relu_values(x.rel, x.irr)[0])


def _each(x: Decomposition, fn: Callable[[Tensor], Any]) -> Any:
    """Apply a linear, bias-free map to each stream; tuples of outputs become tuples of Decs. For
    ``(z, β)`` the map applies to z and β (it maps β + γ to the sum of the images)."""
    led = isinstance(x, _Led)
    make: Callable[[Tensor, Tensor], Decomposition] = _Led if led else Decomposition
    a, b = (fn(x.z), fn(x.rel)) if led else (fn(x.rel), fn(x.irr))
    if led and isinstance(a, (tuple, list)):
        return type(a)(make(u, v) for u, v in zip(a, b))
    if isinstance(a, Tensor):
        return make(a, b)
    if isinstance(a, (tuple, list)):
        return type(a)(make(u, v) for u, v in zip(a, b))
    return a  # sizes, dtypes, ...


def _gather_pool(x: Decomposition, idx: Tensor) -> Decomposition:
    """Gather both streams at the arg-max indices of a max-pool of ``β + γ``."""
    flat_idx = idx.flatten(2)
    return Decomposition(
        x.rel.flatten(2).gather(2, flat_idx).view_as(idx),
        x.irr.flatten(2).gather(2, flat_idx).view_as(idx),
    )


def _maxpool(x: Decomposition, pool_with_indices: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Decomposition:
    with torch.no_grad():  # only the arg-max positions are needed
        total = x.total
        if total.ndim == 4 and total.device.type == "cpu":
            # the same indices (first maximum of each window, row-major): the CPU kernel is ~10x faster on a
            # channels-last copy than on the NCHW layout, copy included (measured on SmallCNN's activations)
            total = total.contiguous(memory_format=torch.channels_last)
        _, idx = pool_with_indices(total)
        idx = idx.contiguous()
    led = isinstance(x, _Led)
    both = x.led if led else x.both
    if both is None:
        return _gather_pool(x, idx)
    # (2, N, C, L): one gather for both streams (for (z, β): the model's own max-pool of z, and β at its arg-max)
    z = _pair(both).flatten(3)
    flat = idx.flatten(2).unsqueeze(0).expand(2, *idx.shape[:2], -1)
    out = z.gather(3, flat).view(2 * idx.shape[0], *idx.shape[1:])
    return _Led(led=out) if led else _stacked(out)


def _split_shift(r: Tensor, i: Tensor, shift: Tensor | None, out: Tensor) -> Decomposition:
    """The reference ``propagate_batchnorm2d`` split of a normalisation's constant shift t.

    With ``r``, ``i`` the streams through the normalisation's linear part: ``r̃ = (r + t) − t`` (the
    reference's ``bn(β) − bn(0)``), ``ĩ`` likewise, ``β' = r̃ + t·|r̃|/(|r̃| + |ĩ|)`` and ``γ' = out − β'``
    (``out`` the true activation, so β + γ is exact). Unlike the linear rule there is no ``+1e-20``:
    where both streams vanish the share of β is 0 (the reference replaces 0/0 = NaN by 0) and the whole
    shift goes to γ. After a ReLU both streams hold only the ~1e-20 leftovers of the linear rule's ε
    there, which ``(r + t) − t`` rounds to exactly 0, as in the reference. The division is guarded so
    that autograd sees no 0/0 either.
    """
    if shift is None:
        return Decomposition(r, out - r)
    if not torch.is_grad_enabled():  # same arithmetic in place (0/0 = NaN -> 0, as the reference)
        r = (r + shift).sub_(shift)
        ar = r.abs()
        den = (i + shift).sub_(shift).abs_().add_(ar)
        rel = ar.div_(den).nan_to_num_(nan=0.0).mul_(shift).add_(r)
        return Decomposition(rel, torch.sub(out, rel))
    r = (r + shift) - shift
    i = (i + shift) - shift
    ar = r.abs()
    den = ar + i.abs()
    pos = den > 0
    p = torch.where(pos, ar / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(den))
    rel = r + shift * p
    return Decomposition(rel, out - rel)


def _batchnorm(x: Decomposition, bn: nn.modules.batchnorm._BatchNorm, relu: bool = False) -> Decomposition:
    """BatchNorm as an affine map ``y = s·x + t`` (eval: running statistics), the reference rule. ``relu``: the
    ReLU rule that follows it, fused into the same pass (only for ``(z, β)``, where the ReLU rule is the model's
    own ReLU on each stream; the caller checks ``isinstance(x, _Led)``)."""
    use_batch_stats = bn.training or bn.running_mean is None
    if isinstance(x, _Led):
        return _led_batchnorm(x, bn, use_batch_stats, relu)
    total = x.total
    shape = [1, -1] + [1] * (total.ndim - 2)
    if use_batch_stats:
        dims = [0, *range(2, total.ndim)]
        var, mean = torch.var_mean(total, dims, unbiased=False)
        pending = _NORM_STATS.get()
        if pending is not None and bn.training and bn.track_running_stats and bn.running_mean is not None:
            pending.append((bn, mean.detach(), var.detach(), total.numel() // max(1, total.shape[1])))
    else:
        mean, var = bn.running_mean, bn.running_var
    return _affine_norm(x, mean, var, bn.weight, bn.bias, bn.eps, shape, total)


def _led_batchnorm(x: _Led, bn: nn.modules.batchnorm._BatchNorm, use_batch_stats: bool, relu: bool = False) -> _Led:
    """BatchNorm for ``(z, β)`` in one operation on the stacked streams (:class:`_LedNorm`), with the ReLU that
    follows it when ``relu``."""
    z = x.z
    if use_batch_stats:
        with torch.no_grad():  # two passes over (N, C, L): torch.var_mean over dims (0, 2, 3) is ~15x slower on CPU
            flat = z.reshape(z.shape[0], z.shape[1], -1)
            mean = flat.mean((0, 2))
            var = (flat - mean.view(1, -1, 1)).square_().mean((0, 2))
        pending = _NORM_STATS.get()
        if pending is not None and bn.training and bn.track_running_stats and bn.running_mean is not None:
            pending.append((bn, mean, var, z.numel() // max(1, z.shape[1])))
    else:
        mean, var = bn.running_mean, bn.running_var
    both = x.led
    params = [t for t in (bn.weight, bn.bias) if t is not None]
    if torch.is_grad_enabled() and (both.requires_grad or any(t.requires_grad for t in params)):
        return _Led(led=_LedNorm.apply(both, bn.weight, bn.bias, mean, var, bn.eps, use_batch_stats, relu))
    with torch.no_grad():
        return _Led(
            led=_LedNorm.forward(_NoCtx(), both, bn.weight, bn.bias, mean, var, bn.eps, use_batch_stats, relu)
        )


class _NoCtx:
    """A stand-in for an autograd context when a Function's forward runs without autograd."""

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass


def _affine_norm(
    x: Decomposition,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shape: list,
    total: Tensor | None = None,
) -> Decomposition:
    """A normalisation with fixed per-channel statistics, ``y = s·x + t``: ``r = s·β``, ``i = s·γ``, the
    shift ``t`` split by :func:`_split_shift` (the reference BatchNorm rule)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    scale, shift = scale.view(shape), shift.view(shape)
    if isinstance(x, _Led):  # (InstanceNorm with running statistics) the pair form: β and γ = z − β
        x = Decomposition(x.rel, x.irr)
    z = x.stacked * scale  # both streams in one operation
    out = torch.addcmul(shift, x.total if total is None else total, scale)
    if torch.is_grad_enabled() and (z.requires_grad or shift.requires_grad or out.requires_grad):
        return _stacked(_ShiftSplit.apply(z, shift, out))
    n = x.rel.shape[0]
    return _split_shift(z[:n], z[n:], shift, out)


def _shift_shares(z: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For stacked ``z`` (2, N, ...): the rounded streams ``(z + t) − t`` (the reference's
    ``bn(β) − bn(0)``), their absolute values and the share ``|r̃|/(|r̃| + |ĩ|)`` of β (0/0 = 0)."""
    zt = (z + shift).sub_(shift)
    a = zt.abs()
    den = a[0] + a[1]
    p = torch.where(den > 0, a[0] / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
    return zt, a, p


class _ShiftSplit(torch.autograd.Function):
    """The BatchNorm rule (:func:`_split_shift`) on stacked streams, ``(z, t, out) -> (β', out − β')``
    with ``β' = r̃ + t·p``, with a hand-written backward (``G = g_β − g_γ``, ``D = |r̃| + |ĩ|``,
    ``q = t·G/D²`` where D > 0, else 0): ``∂r = G + q·sgn(r̃)·|ĩ|``, ``∂i = −q·sgn(ĩ)·|r̃|``,
    ``∂t = Σ G·p``, ``∂out = g_γ`` (``r̃ = (r + t) − t`` has derivative 1 in r and 0 in t)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, shift: Tensor, out: Tensor) -> Tensor:
        zt, _, p = _shift_shares(_pair(z), shift)
        res = torch.empty_like(zt)
        torch.addcmul(zt[0], shift, p, out=res[0])
        torch.sub(out, res[0], out=res[1])
        ctx.save_for_backward(z, shift)
        return res.view(z.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        z, shift = ctx.saved_tensors
        zt, a, p = _shift_shares(_pair(z), shift)
        g = _pair(grad)
        big = g[0] - g[1]
        den = a[0] + a[1]
        q = torch.where(den > 0, big * shift / den.square().clamp_min(torch.finfo(den.dtype).tiny), 0.0)
        dz = torch.empty_like(zt)
        torch.addcmul(big, q * a[1], zt[0].sign(), out=dz[0])
        torch.mul(q.mul_(a[0]), zt[1].sign(), out=dz[1]).neg_()
        dshift = (big * p).sum_to_size(shift.shape) if ctx.needs_input_grad[1] else None
        return dz.view(z.shape), dshift, g[1]


def _centred_norm(
    x: Decomposition,
    flat: Callable[[Tensor], Tensor],
    out: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    channel_shape: list | None,
) -> Decomposition:
    """LayerNorm / GroupNorm / InstanceNorm with per-sample statistics (our rule, after the reference
    BatchNorm rule): the deviation σ is that of the true activation β + γ; the mean, a linear function of
    the input, is taken from each stream separately (``r = (β − mean β)·w/σ``, ``i = (γ − mean γ)·w/σ``,
    exact since the centring is linear), and the affine bias, the only constant, is split by
    :func:`_split_shift`; ``γ' = norm(β + γ) − β'``. ``flat(t)`` views t as (..., normalised group)."""
    ft = flat(x.total)
    inv = torch.rsqrt(ft.var(-1, unbiased=False, keepdim=True) + eps)
    fr, fi = flat(x.rel), flat(x.irr)
    r = ((fr - fr.mean(-1, keepdim=True)) * inv).reshape(x.rel.shape)
    i = ((fi - fi.mean(-1, keepdim=True)) * inv).reshape(x.irr.shape)
    if weight is not None:
        w = weight if channel_shape is None else weight.view(channel_shape)
        r, i = r * w, i * w
    b = bias if bias is None or channel_shape is None else bias.view(channel_shape)
    return _split_shift(r, i, b, out)


def _layernorm(
    x: Decomposition, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Decomposition:
    """LayerNorm with the statistics of ``β + γ``; each stream centred by its own mean (our rule)."""
    n = len(normalized_shape)
    out = F.layer_norm(x.total, tuple(normalized_shape), weight, bias, eps)
    return _centred_norm(x, lambda t: t.flatten(-n), out, weight, bias, eps, None)


def _groupnorm(
    x: Decomposition, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Decomposition:
    """GroupNorm: :func:`_centred_norm` over each sample's channel groups (our rule)."""
    total = x.total
    n, c = total.shape[:2]
    out = F.group_norm(total, num_groups, weight, bias, eps)
    shape = [1, c] + [1] * (total.ndim - 2)
    return _centred_norm(x, lambda t: t.reshape(n, num_groups, -1), out, weight, bias, eps, shape)


def _instancenorm(
    x: Decomposition,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    eps: float,
) -> Decomposition:
    """InstanceNorm: per-sample statistics are GroupNorm with one channel per group (our rule); with
    running statistics (eval, ``track_running_stats``) it is the reference BatchNorm rule. Running
    statistics are never updated."""
    total = x.total
    if use_input_stats or running_mean is None:
        return _groupnorm(x, total.shape[1], weight, bias, eps)
    return _affine_norm(x, running_mean, running_var, weight, bias, eps, [1, -1] + [1] * (total.ndim - 2))


def _dropout(x: Decomposition, p: float, training: bool) -> Decomposition:
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x.rel).bernoulli_(1.0 - p) / (1.0 - p)
    if isinstance(x, _Led):
        return _Led(x.z * keep, x.rel * keep)
    return Decomposition(x.rel * keep, x.irr * keep)


def _three(a: Tensor, b: Tensor, c: Tensor, act: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The reference ``propagate_three``: contributions of a, b and the bias c to ``act(a + b + c)``."""
    ac, bc, abc = act(a + c), act(b + c), act(a + b + c)
    cc = act(c)
    return 0.5 * (ac - cc + abc - bc), 0.5 * (bc - cc + abc - ac), cc


def _lstm(mod: nn.LSTM, x: Decomposition, hx: Any) -> tuple[Decomposition, tuple[Decomposition, Decomposition]]:
    """Murdoch et al. 2018 CD through a (multi-layer, optionally bidirectional) ``nn.LSTM``."""
    if hx is not None:
        raise CDUnsupportedError(
            "CD through nn.LSTM supports zero initial states only (the module called with hx); "
            "call the LSTM without (h0, c0)."
        )
    if getattr(mod, "proj_size", 0):
        raise CDUnsupportedError("CD through nn.LSTM with proj_size > 0 is not supported.")
    rel, irr = x.rel, x.irr
    if rel.ndim != 3:
        raise CDUnsupportedError(f"CD through nn.LSTM needs batched 3-D input, got {tuple(rel.shape)}.")
    if mod.batch_first:
        rel, irr = rel.transpose(0, 1), irr.transpose(0, 1)
    hs, cs = [], []
    num_dirs = 2 if mod.bidirectional else 1
    for layer in range(mod.num_layers):
        outs_r, outs_i = [], []
        for d in range(num_dirs):
            sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
            w_ih, w_hh = getattr(mod, "weight_ih" + sfx), getattr(mod, "weight_hh" + sfx)
            b = None
            if mod.bias:
                b = getattr(mod, "bias_ih" + sfx) + getattr(mod, "bias_hh" + sfx)
            seq_r, seq_i = (rel, irr) if d == 0 else (rel.flip(0), irr.flip(0))
            hr, hi, cr, ci = _lstm_direction(seq_r, seq_i, w_ih, w_hh, b)
            if d == 1:
                hr, hi = hr.flip(0), hi.flip(0)
                hs.append(Decomposition(hr[0], hi[0]))
            else:
                hs.append(Decomposition(hr[-1], hi[-1]))
            cs.append(Decomposition(cr, ci))
            outs_r.append(hr)
            outs_i.append(hi)
        rel = torch.cat(outs_r, -1) if num_dirs > 1 else outs_r[0]
        irr = torch.cat(outs_i, -1) if num_dirs > 1 else outs_i[0]
        if layer < mod.num_layers - 1 and mod.training and mod.dropout > 0:
            y = _dropout(Decomposition(rel, irr), mod.dropout, True)
            rel, irr = y.rel, y.irr
    if mod.batch_first:
        rel, irr = rel.transpose(0, 1), irr.transpose(0, 1)
    h_n = Decomposition(torch.stack([h.rel for h in hs]), torch.stack([h.irr for h in hs]))
    c_n = Decomposition(torch.stack([c.rel for c in cs]), torch.stack([c.irr for c in cs]))
    return Decomposition(rel, irr), (h_n, c_n)


def _lstm_direction(
    xr: Tensor, xi: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One direction of one layer; xr, xi are (T, N, D). Returns h streams (T, N, H) and final c."""
    t_len, n, _ = xr.shape
    hdim = w_hh.shape[1]
    proj = F.linear(torch.cat([xr, xi], 1), w_ih)  # (T, 2N, 4H): the inputs' gate parts, one matmul
    pr, pi = proj[:, :n], proj[:, n:]
    # share of the bias-by-bias term per step: |β_t| : |γ_t| (whole-word masks give Murdoch's 0/1)
    ar = xr.abs().sum(-1, keepdim=True) + _EPS
    share = ar / (ar + xi.abs().sum(-1, keepdim=True) + _EPS)
    zeros_g = xr.new_zeros(n, 4 * hdim)
    bias = zeros_g if b is None else b.expand(n, 4 * hdim)
    bi, bf, bg, bo = bias.chunk(4, 1)
    hr = xr.new_zeros(n, hdim)
    hi = xr.new_zeros(n, hdim)
    cr = xr.new_zeros(n, hdim)
    ci = xr.new_zeros(n, hdim)
    out_r, out_i = [], []
    sig, tanh = torch.sigmoid, torch.tanh
    for t in range(t_len):
        rec = F.linear(torch.cat([hr, hi], 0), w_hh)
        gr = pr[t] + rec[:n]
        gi = pi[t] + rec[n:]
        ri, rf, rg, ro = gr.chunk(4, 1)
        ii, if_, ig, io = gi.chunk(4, 1)
        rc_i, ic_i, bc_i = _three(ri, ii, bi, sig)
        rc_g, ic_g, bc_g = _three(rg, ig, bg, tanh)
        rc_f, ic_f, bc_f = _three(rf, if_, bf, sig)
        bb = bc_i * bc_g
        w = share[t]
        new_cr = rc_i * (rc_g + bc_g) + bc_i * rc_g + w * bb + (rc_f + bc_f) * cr
        new_ci = (
            ic_i * (rc_g + ic_g + bc_g) + (rc_i + bc_i) * ic_g + (bb - w * bb) + (rc_f + ic_f + bc_f) * ci + ic_f * cr
        )
        cr, ci = new_cr, new_ci
        o = sig(ro + io + bo)
        tc, tr, ti = tanh(cr + ci), tanh(cr), tanh(ci)
        hr = o * (0.5 * (tr + tc - ti))
        hi = o * (0.5 * (ti + tc - tr))
        out_r.append(hr)
        out_i.append(hi)
    return torch.stack(out_r), torch.stack(out_i), cr, ci


# ----------------------------------------------------------------------------------------------
# Streams led by the total: (z, β), γ = z − β
# ----------------------------------------------------------------------------------------------
#
# The same decomposition carried as the true activation z and β instead of β and γ (γ = z − β at every
# layer). A linear layer needs no second stream for γ (W·γ = W·z − W·β), ReLU and max-pooling are the
# model's own operations on z and on β, and z is the forward pass of the task itself: a training step that
# takes its logits from z needs no separate forward. The rules below are the reference rules rewritten for
# this pair (equal to rounding); every other rule reads γ = z − β and carries β and γ.


class _Led(Decomposition):
    """``(z, β)`` with ``z = β + γ`` the true activation; optionally stacked ``[z; β]`` (2N, ...) for the next
    linear layer. ``irr`` (γ = z − β) is formed only where a rule without a ``(z, β)`` form asks for it."""

    def __init__(self, total: Tensor | None = None, rel: Tensor | None = None, led: Tensor | None = None) -> None:
        if led is not None:
            n = led.shape[0] // 2
            total, rel = led[:n], led[n:]
        assert total is not None and rel is not None
        self.z = total
        self.rel = rel
        self.zb = led
        self.both = None  # the stacked (β, γ) pair of the other form: never
        self._irr: Tensor | None = None

    @property
    def irr(self) -> Tensor:  # type: ignore[override]
        if self._irr is None:
            self._irr = self.z - self.rel
        return self._irr

    @property
    def total(self) -> Tensor:
        return self.z

    @property
    def led(self) -> Tensor:
        """``[z; β]`` stacked along the batch dimension."""
        return self.zb if self.zb is not None else torch.cat([self.z, self.rel], 0)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Decomposition:
        return _Led(fn(self.z), fn(self.rel))


# Rows per piece of the elementwise rules: a rule's dozen passes over one piece stay in the core's cache, where
# passes over a whole layer's activation each go to memory (measured: about 1.5x faster per rule on SmallCNN).
_PIECE = 1 << 16


def _pieces(t: Tensor) -> Iterator[slice]:
    """Row slices of ``t`` holding about ``_PIECE`` elements each (one slice off the CPU: on a GPU each piece would
    cost a dozen kernel launches and save nothing)."""
    n = t.shape[0]
    if t.device.type != "cpu":
        yield slice(0, n)
        return
    step = max(1, _PIECE // max(1, t[:1].numel()))
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


def _led_bias_piece(c: Tensor, r: Tensor, bias: Tensor, eps: tuple[float, float], oz: Tensor, ob: Tensor) -> None:
    """One piece of the linear rule for ``(z, β)``: ``oz = c + b``, ``ob = r + b·A/D`` (see :class:`_LedBiasSplit`)."""
    e_rel, e_irr = eps
    a = r.abs()
    if e_rel:
        a.add_(e_rel)
    den = torch.sub(c, r).abs_().add_(a)
    if e_irr:
        den.add_(e_irr)
    torch.add(c, bias, out=oz)
    torch.addcdiv(r, a.mul_(bias), den, out=ob)


def _led_bias_values(both: Tensor, bias: Tensor, eps: tuple[float, float]) -> Tensor:
    """``[c + b; r + b·a_r/(a_r + a_i)]`` from the bias-free layer outputs ``[c; r]`` of ``[z; β]``, with
    ``i = c − r`` (the layer applied to γ) and ``a_k = |·| + ε_k``: the linear rule's bias split."""
    c, r = _pair(both)
    out = torch.empty_like(both)
    oz, ob = _pair(out)
    for sl in _pieces(c):
        _led_bias_piece(c[sl], r[sl], bias, eps, oz[sl], ob[sl])
    return out


class _LedBiasSplit(torch.autograd.Function):
    """The linear rule on ``[c; r]`` (bias-free outputs of ``[z; β]``) with a hand-written backward.

    ``out_z = c + b``, ``out_β = r + b·A/D`` with ``i = c − r``, ``A = |r| + ε_β``, ``I = |i| + ε_γ``,
    ``D = A + I``; with ``w = b·g_β``: ``∂r = g_β + w·(sgn(r)·I/D + sgn(i)·A/D)/D``,
    ``∂c = g_z − w·sgn(i)·(A/D)/D``, ``∂b = Σ g_z + g_β·A/D``. The shares A/D, I/D ≤ 1 are formed before the
    last division by D, so that where both streams vanish (D = ε) the zero signs give 0, never 0·∞. The three
    local derivatives (A/D and the two bracketed factors over D) are kept from the forward pass."""

    @staticmethod
    def forward(ctx: Any, both: Tensor, bias: Tensor, eps: tuple[float, float]) -> Tensor:
        e_rel, e_irr = eps
        res = _run_kernel("_k_bias_fwd", _COMPILED.get(), both, bias, float(e_rel), float(e_irr))
        ctx.compiled = res is not None
        if res is not None:
            ctx.save_for_backward(bias, res[1])
            return res[0]
        c_all, r_all = _pair(both)
        out = torch.empty_like(both)
        oz_all, ob_all = _pair(out)
        local = torch.empty((3, *c_all.shape), dtype=both.dtype, device=both.device)
        for sl in _pieces(c_all):
            c, r = c_all[sl], r_all[sl]
            i = torch.sub(c, r)
            a = r.abs()
            if e_rel:
                a.add_(e_rel)
            ai = i.abs()
            if e_irr:
                ai.add_(e_irr)
            den = torch.add(a, ai)
            torch.add(c, bias, out=oz_all[sl])
            pa = torch.div(a, den, out=local[0][sl])  # A/D
            torch.addcmul(r, pa, bias, out=ob_all[sl])
            sa = i.sign_().mul_(pa)  # sgn(i)·A/D
            torch.addcmul(sa, ai.div_(den), r.sign(), out=local[1][sl]).div_(den)  # (sgn(r)·I/D + sgn(i)·A/D)/D
            torch.div(sa, den, out=local[2][sl])  # sgn(i)·(A/D)/D
        ctx.save_for_backward(bias, local)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        bias, local = ctx.saved_tensors
        lead = grad.ndim - bias.ndim
        dims = (*range(lead), *(lead + k for k, n in enumerate(bias.shape) if n == 1 and grad.shape[lead + k] != 1))
        res = _run_kernel("_k_bias_bwd", ctx.compiled, grad.contiguous(), bias, local, dims)
        if res is not None:
            return res[0], res[1].view(bias.shape) if ctx.needs_input_grad[1] else None, None
        gz_all, gb_all = _pair(grad)
        d = torch.empty_like(grad)
        dz_all, dr_all = _pair(d)
        dbias = torch.zeros_like(bias) if ctx.needs_input_grad[1] else None
        for sl in _pieces(gz_all):
            gz, gb = gz_all[sl], gb_all[sl]
            w = gb * bias  # b·g_β
            torch.addcmul(gz, w, local[2][sl], value=-1.0, out=dz_all[sl])
            torch.addcmul(gb, w, local[1][sl], out=dr_all[sl])
            if dbias is not None:
                dbias += _sum_to(torch.addcmul(gz, gb, local[0][sl]), bias.shape)
        return d, dbias, None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """``t.sum_to_size(shape)`` as one reduction over explicit dimensions (``sum_to_size`` is ~10x slower on CPU)."""
    lead = t.ndim - len(shape)
    dims = [*range(lead), *(lead + k for k, n in enumerate(shape) if n == 1 and t.shape[lead + k] != 1)]
    return t.sum(dims, keepdim=True).view(shape) if dims else t


def _led_affine(x: _Led, lin: Callable[[Tensor], Tensor], bias: Tensor | None) -> _Led:
    """The linear rule for ``(z, β)``: the layer (bias-free) on ``[z; β]`` in one call, then the bias split."""
    both = lin(x.led)
    if bias is None:
        return _Led(led=both)
    eps = _BIAS_EPS.get()
    if torch.is_grad_enabled() and (both.requires_grad or bias.requires_grad):
        return _Led(led=_LedBiasSplit.apply(both, bias, eps))
    return _Led(led=_led_bias_values(both, bias, eps))


def _led_norm_piece(
    z: Tensor, b: Tensor, scale: Tensor, shift: Tensor, oz: Tensor, ob: Tensor, ep: Tensor | None,
    eu: Tensor | None, ev: Tensor | None,
) -> None:  # fmt: skip
    """One piece of the BatchNorm rule for ``(z, β)``: ``oz = s·z + t`` and ``ob = β' = r̃ + t·p`` with ``r = s·β``,
    the reference's rounded streams ``r̃ = (r + t) − t`` (its ``bn(β) − bn(0)``) and ``ĩ = (oz − r) − t`` (γ
    through the normalisation's linear part), ``p = |r̃|/D``, ``D = |r̃| + |ĩ|`` (clamped to the smallest normal
    number: 0/0 = 0 as in the reference); for the backward (when given) the local derivatives ``ep = p``,
    ``eu = sgn(r̃)·(1 − p)/D`` and ``ev = sgn(ĩ)·p/D`` (0 where D = 0: both signs are 0 there)."""
    torch.addcmul(shift, z, scale, out=oz)
    r = b * scale
    rt = (r + shift).sub_(shift)
    it = torch.sub(oz, r).sub_(shift)
    a = rt.abs()
    den = it.abs().add_(a).clamp_min_(torch.finfo(a.dtype).tiny)
    if ep is None or eu is None or ev is None:
        torch.addcmul(rt, a.div_(den), shift, out=ob)
        return
    p = torch.div(a, den, out=ep)
    torch.addcmul(rt, p, shift, out=ob)
    sr = rt.sign_()
    torch.addcmul(sr, sr, p, value=-1.0, out=eu).div_(den)
    torch.mul(it.sign_(), p, out=ev).div_(den)


_threshold_backward = torch.ops.aten.threshold_backward  # ReLU's own backward: g where the output > 0, else 0


class _LedNorm(torch.autograd.Function):
    """A whole BatchNorm layer for stacked ``[z; β]``: ``[s·z + t; β']`` with ``s = w/√(var + ε)``,
    ``t = b − μ·s`` (batch statistics of z, or the running ones) and β' the reference's share of the shift
    (:func:`_split_shift`, with ``ĩ = out − r − t`` = s·γ), with a
    hand-written backward including the batch statistics' own gradient (as ``nn.BatchNorm``'s backward),
    piece by piece. With ``h = g_β·t``, ``u = h·sgn(r̃)·(1 − p)/D``, ``v' = h·sgn(ĩ)·p/D`` (``ĩ = s·γ``),
    ``a = g_z − v'`` and ``c = g_β + u + v'``: ``∂z = s·a``, ``∂β = s·c``, ``∂s = Σ z·a + β·c``,
    ``∂t = Σ g_z + g_β·p``; then ``∂w = (∂s − μ·∂t)/σ``, ``∂b = ∂t`` and, with batch statistics,
    ``∂z += (−s·∂t + 2·∂var·(z − μ))/M`` with ``∂var = −w·(∂s − μ·∂t)/(2σ³)``. The local derivatives are
    kept from the forward pass (three tensors of z's size) rather than recomputed.

    ``relu``: the ReLU rule of the next layer in the same pass (``[relu(s·z + t); relu(β')]``, the model's ReLU on
    each stream); its backward (ReLU's own, the gradient where the output is positive) opens the backward of
    each piece. Fused, the two streams are not read and written once more by a separate ReLU and its backward."""

    @staticmethod
    def forward(
        ctx: Any, both: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float,
        batch_stats: bool, relu: bool = False,
    ) -> Tensor:  # fmt: skip
        z_all, b_all = _pair(both)
        shape = [1, -1] + [1] * (z_all.ndim - 2)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        scale, shift = scale.view(shape), shift.view(shape)
        res = None if isinstance(ctx, _NoCtx) else _run_kernel("_k_norm_fwd", _COMPILED.get(), both, scale, shift, relu)
        ctx.compiled = res is not None
        ctx.batch_stats = batch_stats
        if res is not None:
            out, local = res
            ctx.save_for_backward(both, weight, mean, invstd, scale, shift, local, out if relu else None)
            return out
        out = torch.empty_like(both)
        oz_all, ob_all = _pair(out)
        local = None  # the local derivatives, only when autograd will call backward
        if not isinstance(ctx, _NoCtx):
            local = torch.empty((3, *z_all.shape), dtype=z_all.dtype, device=z_all.device)
        for sl in _pieces(z_all):
            ep, eu, ev = (local[0][sl], local[1][sl], local[2][sl]) if local is not None else (None, None, None)
            _led_norm_piece(z_all[sl], b_all[sl], scale, shift, oz_all[sl], ob_all[sl], ep, eu, ev)
            if relu:
                oz_all[sl].relu_()
                ob_all[sl].relu_()
        ctx.save_for_backward(both, weight, mean, invstd, scale, shift, local, out if relu else None)
        ctx.batch_stats = batch_stats
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        both, weight, mean, invstd, scale, shift, local, out = ctx.saved_tensors
        z_all = _pair(both)[0]
        dims = [0, *range(2, z_all.ndim)]
        res = _run_kernel("_k_norm_bwd", ctx.compiled, grad.contiguous(), both, out, local, scale, shift, tuple(dims))
        d, ds, dt = res if res is not None else _led_norm_backward_pieces(grad, both, out, local, scale, shift, dims)
        dz_all = _pair(d)[0]
        centred = ds - mean * dt  # ∂L/∂(w·σ⁻¹) up to the factor w
        dweight = centred * invstd if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dt if ctx.needs_input_grad[2] else None
        if ctx.batch_stats:
            m = z_all.numel() // z_all.shape[1]
            w = 1.0 if weight is None else weight
            dvar = -0.5 * w * centred * invstd.pow(3)
            shape = [1, -1] + [1] * (z_all.ndim - 2)
            k = (2.0 * dvar / m).view(shape)
            c0 = ((-scale.flatten() * dt) / m - 2.0 * dvar * mean / m).view(shape)
            for sl in _pieces(z_all):
                dz_all[sl].addcmul_(z_all[sl], k).add_(c0)
        return d, dweight, dbias, None, None, None, None, None


def _led_norm_backward_pieces(
    grad: Tensor, both: Tensor, out: Tensor | None, local: Tensor, scale: Tensor, shift: Tensor, dims: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`_LedNorm`'s backward up to the batch statistics' term, piece by piece: ``[s·a; s·c]``, ``∂s``, ``∂t``."""
    z_all, b_all = _pair(both)
    gz_all, gb_all = _pair(grad)
    oz_all, ob_all = _pair(out) if out is not None else (None, None)
    d = torch.empty_like(both)
    dz_all, db_all = _pair(d)
    ds = torch.zeros(scale.numel(), dtype=scale.dtype, device=scale.device)
    dt = torch.zeros_like(ds)
    for sl in _pieces(z_all):
        z, b, gz, gb = z_all[sl], b_all[sl], gz_all[sl], gb_all[sl]
        if oz_all is not None and ob_all is not None:  # the fused ReLU's backward
            gz, gb = _threshold_backward(gz, oz_all[sl], 0), _threshold_backward(gb, ob_all[sl], 0)
        p, eu, ev = local[0][sl], local[1][sl], local[2][sl]
        dt += torch.addcmul(gz, gb, p).sum(dims)
        h = gb * shift
        v = ev * h  # v' (the saved derivatives stay as they are: a retained graph may run backward again)
        ga = torch.sub(gz, v)
        gc = torch.addcmul(gb, eu, h).add_(v)
        ds += torch.addcmul(z * ga, b, gc).sum(dims)
        torch.mul(ga, scale, out=dz_all[sl])
        torch.mul(gc, scale, out=db_all[sl])
    return d, ds, dt


# ----------------------------------------------------------------------------------------------
# The same rules compiled (optional: ``cd_forward(compiled=True)``)
# ----------------------------------------------------------------------------------------------
#
# Each rule above makes a dozen passes over its piece of the streams, and its local derivatives go to memory and
# back. Compiled by torch.compile (inductor: one C++ loop per kernel on the CPU, which needs a C++ compiler at run
# time), a rule is one pass that reads its inputs once and writes its outputs once. The formulas are those of the
# eager rules; the arithmetic may differ in rounding (fused multiply-adds, the compiler's order), so the values
# agree with the eager rules to float rounding, not bit for bit. Compiled on first use per shape and dtype; when
# compilation fails (no compiler, an unsupported platform) a warning says so once and the eager rules run.


def _k_bias_fwd(both: Tensor, bias: Tensor, e_rel: float, e_irr: float) -> tuple[Tensor, Tensor]:
    """:class:`_LedBiasSplit`'s forward: the stacked output and the three local derivatives (stacked)."""
    n = both.shape[0] // 2
    c, r = both[:n], both[n:]
    i = c - r
    a = r.abs() + e_rel
    ai = i.abs() + e_irr
    den = a + ai
    pa = a / den
    sa = torch.sign(i) * pa
    l1 = (sa + (ai / den) * torch.sign(r)) / den
    return torch.cat([c + bias, r + pa * bias]), torch.stack([pa, l1, sa / den])


def _k_bias_bwd(grad: Tensor, bias: Tensor, local: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """:class:`_LedBiasSplit`'s backward: the stacked input gradient and the bias gradient summed over ``dims``."""
    n = grad.shape[0] // 2
    gz, gb = grad[:n], grad[n:]
    w = gb * bias
    d = torch.cat([gz - w * local[2], gb + w * local[1]])
    return d, (gz + gb * local[0]).sum(dims, keepdim=True)


def _k_norm_fwd(both: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    """:class:`_LedNorm`'s forward (:func:`_led_norm_piece` on the whole layer, then the ReLU when ``relu``)."""
    n = both.shape[0] // 2
    z, b = both[:n], both[n:]
    oz = shift + z * scale
    r = b * scale
    rt = (r + shift) - shift
    # ĩ = s·γ rounded as the reference rounds bn(γ) − bn(0), from γ = z − β itself: exactly 0 where γ is. The eager
    # rule's (oz − r) − t is the same number up to rounding, which here (no fused multiply-add in oz) would leave
    # noise of either sign where γ = 0 and flip the |ĩ| kink: float32 gradients 10 % off their float64 value
    it = ((z - b) * scale + shift) - shift
    a = rt.abs()
    den = (it.abs() + a).clamp_min(torch.finfo(a.dtype).tiny)
    p = a / den
    ob = rt + p * shift
    sr = torch.sign(rt)
    eu = (sr - sr * p) / den
    ev = torch.sign(it) * p / den
    if relu:
        oz, ob = torch.relu(oz), torch.relu(ob)
    return torch.cat([oz, ob]), torch.stack([p, eu, ev])


def _k_norm_bwd(
    grad: Tensor, both: Tensor, out: Tensor | None, local: Tensor, scale: Tensor, shift: Tensor, dims: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`_LedNorm`'s backward up to the batch statistics' term: ``[s·a; s·c]``, ``∂s`` and ``∂t``."""
    n = grad.shape[0] // 2
    z, b = both[:n], both[n:]
    gz, gb = grad[:n], grad[n:]
    if out is not None:  # the fused ReLU's backward
        gz = torch.where(out[:n] > 0, gz, 0.0)
        gb = torch.where(out[n:] > 0, gb, 0.0)
    p, eu, ev = local[0], local[1], local[2]
    h = gb * shift
    v = ev * h
    ga = gz - v
    gc = gb + eu * h + v
    return torch.cat([ga * scale, gc * scale]), (z * ga + b * gc).sum(dims), (gz + gb * p).sum(dims)


_KERNELS: dict[str, Callable[..., Any]] = {}
_COMPILE_FAILED: list[str] = []  # the first compilation error, once


def _run_kernel(name: str, enabled: bool, *args: Any) -> Any:
    """Call the compiled kernel ``name`` when ``enabled`` (a forward: the pass's ``compiled``; a backward: whether
    its forward ran compiled); None when not, or when compilation failed: then a warning, once, and compilation
    stays off for the process (the caller runs the eager rule)."""
    if not enabled or _COMPILE_FAILED:
        return None
    fn = _KERNELS.get(name)
    if fn is None:
        fn = _KERNELS[name] = torch.compile(globals()[name], dynamic=None)
    try:
        return fn(*args)
    except Exception as err:  # torch.compile raises backend-specific errors (no C++ compiler, codegen, ...)
        _COMPILE_FAILED.append(f"{type(err).__name__}: {err}")
        warnings.warn(
            "cd_forward(compiled=True): torch.compile could not compile the contextual-decomposition rules "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the eager rules run instead "
            "(same values, slower). A C++ compiler (gcc/clang) on the PATH is what inductor needs on the CPU.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# ----------------------------------------------------------------------------------------------
# Dispatch tables
# ----------------------------------------------------------------------------------------------

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.PReLU,
    nn.Tanhshrink,
    nn.Softsign,
    nn.LogSigmoid,
)
_EACH_MODULES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)

_ELEMENTWISE_FUNCS: set[Any] = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.gelu,
    torch.tanh,
    F.tanh,
    torch.sigmoid,
    F.sigmoid,
    F.elu,
    F.selu,
    torch.selu,
    F.celu,
    F.silu,
    F.mish,
    F.softplus,
    F.hardtanh,
    F.relu6,
    F.hardswish,
    F.hardsigmoid,
    F.logsigmoid,
    F.softsign,
    F.tanhshrink,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}
_EACH_FUNCS: set[Any] = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.movedim,
    torch.mean,
    torch.sum,
    torch.narrow,
    torch.select,
    torch.roll,
    torch.flip,
    torch.chunk,
    torch.split,
    torch.unbind,
    torch.t,
    torch.neg,
    operator.neg,
    operator.pos,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.interpolate,
    F.pixel_shuffle,
    F.pixel_unshuffle,
}
_EACH_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "clone",
    "float",
    "double",
    "to",
    "type_as",
    "view_as",
    "reshape_as",
    "expand",
    "expand_as",
    "repeat",
    "mean",
    "sum",
    "narrow",
    "select",
    "roll",
    "flip",
    "chunk",
    "split",
    "unbind",
    "movedim",
    "neg",
    "__neg__",
}
_META_METHODS = {"size", "dim", "numel", "type", "get_device"}
_MAXPOOL_FUNCS: dict[Any, Callable[..., Any]] = {
    F.max_pool1d: F.max_pool1d_with_indices,
    F.max_pool2d: F.max_pool2d_with_indices,
    F.max_pool3d: F.max_pool3d_with_indices,
    F.adaptive_max_pool1d: F.adaptive_max_pool1d_with_indices,
    F.adaptive_max_pool2d: F.adaptive_max_pool2d_with_indices,
    F.adaptive_max_pool3d: F.adaptive_max_pool3d_with_indices,
}
_NOT_DECOMPOSABLE_HINT = {
    "softmax": "CD decomposes logits; explain the model without its final softmax/log_softmax",
    "log_softmax": "CD decomposes logits; explain the model without its final softmax/log_softmax",
}


def supported_operations() -> dict[str, list[str]]:
    """Names of the modules, functions and methods CD has rules for (for docs and error messages)."""
    mods = [
        "Linear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d/2d/3d",
        "BatchNorm1d/2d/3d",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm1d/2d/3d",
        "MaxPool1d/2d/3d",
        "AdaptiveMaxPool1d/2d/3d",
        "LSTM",
        *[m.__name__ for m in _ELEMENTWISE_MODULES + _EACH_MODULES + _DROPOUT_MODULES],
    ]
    funcs = sorted(
        {getattr(f, "__name__", str(f)) for f in _ELEMENTWISE_FUNCS | _EACH_FUNCS | set(_MAXPOOL_FUNCS)}
        | {"add", "sub", "mul", "truediv", "cat", "stack", "linear", "conv1d/2d/3d", "matmul", "getitem", "pad"}
        | {"batch_norm", "layer_norm", "group_norm", "instance_norm", "dropout"}
    )
    return {"modules": sorted(mods), "functions": funcs, "methods": sorted(_EACH_METHODS | _ELEMENTWISE_METHODS)}


# ----------------------------------------------------------------------------------------------
# Tracing and interpretation
# ----------------------------------------------------------------------------------------------


class _CDTracer(fx.Tracer):
    """Standard torch.nn layers (and nn.LSTM) are leaves; user modules are traced through."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.RNNBase):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def _filter_traceback_frames(self, user_stack_summary: traceback.StackSummary) -> traceback.StackSummary:
        """The frames from the first ``forward`` on (:func:`_user_frame` picks the user's among them).
        torch.fx's own filter also calls ``symbolic_shapes.uninteresting_files()``, whose first call imports
        torch's compiler packages: 0.5-0.8 s of a monitor's first, budgeted explanation."""
        frames = list(user_stack_summary)
        first = next((i for i, f in enumerate(frames) if f.name == "forward"), len(frames))
        return traceback.StackSummary.from_list(frames[first:])


_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
_META_CALLS = {"size", "dim", "numel", "get_device"}


class _ConcreteTracer(_CDTracer):
    """A tracer that also runs every node on an example input, so that Python control flow on
    *shapes* (``if x.ndim > 2``, ``for i in range(x.size(1))``) is resolved with the example's
    concrete values. Control flow on tensor *values* still fails: such branches depend on the data
    and a CD graph specialised to one example would be wrong for the others.

    Leaf modules run in eval mode on the example (no BatchNorm statistics update, no dropout), under
    ``no_grad``; the global RNG is restored by the caller.
    """

    def __init__(self, example: Tensor) -> None:
        super().__init__()
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.meta_only: dict[fx.Node, bool] = {}
        self._first_placeholder = True

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        vals = fx.node.map_arg(node.args, lambda n: self.values.get(n))
        kvals = fx.node.map_arg(node.kwargs, lambda n: self.values.get(n))
        deps = [self.meta_only.get(n, False) for n in node.all_input_nodes]
        meta = False
        with torch.no_grad(), _unpatched_modules():
            if kind == "placeholder":
                if self._first_placeholder:
                    value = self.example
                    self._first_placeholder = False
                else:
                    value = node.args[0] if node.args else None
            elif kind == "get_attr":
                value = _resolve_attr(self.root, str(target))
            elif kind == "call_module":
                mod = self.root.get_submodule(str(target))
                flags = [(m, m.training) for m in mod.modules()]
                mod.eval()
                try:
                    value = mod(*vals, **kvals)
                finally:
                    for m, flag in flags:
                        m.training = flag
            elif kind == "call_function":
                value = target(*vals, **kvals)
                meta = (target is getattr and vals[1] in _META_ATTRS) or (bool(deps) and all(deps))
            else:  # call_method
                value = getattr(vals[0], target)(*vals[1:], **kvals)
                meta = target in _META_CALLS or (bool(deps) and all(deps) and not isinstance(value, Tensor))
        self.values[node] = value
        self.meta_only[node] = meta
        return proxy

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.meta_only.get(obj.node, False):
            return bool(self.values[obj.node])
        return super().to_bool(obj)


@contextlib.contextmanager
def _unpatched_modules() -> Iterator[None]:
    """Run real module code while fx is tracing: fx patches ``Module.__call__``/``__getattr__`` to
    record calls and parameter reads; the example values need the original methods."""
    from torch.fx import _symbolic_trace as st

    call, get = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__ = st._orig_module_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = st._orig_module_getattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = call  # type: ignore[method-assign]
        nn.Module.__getattr__ = get  # type: ignore[method-assign]


def _resolve_attr(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` without ``Module.__getattr__`` (which fx patches while tracing)."""
    value: Any = root
    for part in target.split("."):
        if isinstance(value, nn.Module):
            for store in (value._parameters, value._buffers, value._modules, value.__dict__):
                if part in store:
                    value = store[part]
                    break
            else:
                raise AttributeError(f"{type(value).__name__} has no attribute {part!r}")
        else:
            value = getattr(value, part)
    return value


_GRAPH_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, fx.Graph]] = weakref.WeakKeyDictionary()
_MODULES: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def _trace(model: nn.Module, example: Tensor) -> fx.Graph:
    """The CD graph of ``model`` (cached per module, forward and training flag).

    Plain symbolic tracing first; if ``forward`` branches on shapes, a concrete trace on ``example``
    (specialised to its per-sample shape, cached under that shape).
    """
    key = (getattr(type(model), "forward", None), model.__dict__.get("forward"), model.training)
    cache = _GRAPH_CACHE.setdefault(model, {})
    shaped_key = (*key, tuple(example.shape[1:]))
    for k in (key, shaped_key):
        if k in cache:
            return cache[k]
    try:
        graph = _CDTracer().trace(model)
        cache[key] = graph
        return graph
    except Exception as err:  # torch.fx raises TraceError, TypeError, RuntimeError, ...
        first_err = err
    try:
        with rng_guard():
            graph = _ConcreteTracer(example[:2].detach()).trace(model)
    except Exception as err:
        attn = next((n for n, m in model.named_modules() if isinstance(m, _ATTENTION_MODULES)), None)
        if attn is not None:
            raise CDUnsupportedError(
                f"Contextual decomposition could not trace {type(model).__name__}.forward, which holds attention "
                f"({attn!r}; torch.fx: {type(first_err).__name__}: {first_err}). " + _ATTENTION_HINT + "."
            ) from err
        raise CDUnsupportedError(
            f"Contextual decomposition could not trace {type(model).__name__}.forward with torch.fx: "
            f"{type(first_err).__name__}: {first_err}. Data-dependent control flow (if/for on tensor values) "
            "cannot be traced; pass the inner network (e.g. pl_module.net) or move the branching out of forward."
        ) from err
    cache[shaped_key] = graph
    return graph


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    where = ""
    if stack:
        path, cls = list(stack.values())[-1] if isinstance(stack, dict) else (None, None)
        if path is not None:
            where = f" in module {path!r} ({getattr(cls, '__name__', cls)})"
    trace = node.stack_trace or node.meta.get("stack_trace")
    frame = _user_frame(trace) if trace else None
    if frame:
        where += f" at {frame}"
    return where


_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(trace: str) -> str | None:
    """The innermost frame of an fx stack trace outside torch itself (``File ..., line n, in f / code``),
    or None: the traces of recent torch versions end in torch.fx's own ``create_node``, which names no
    user code."""
    frames: list[list[str]] = []
    for ln in trace.strip().splitlines():
        ln = ln.strip()
        if not ln:
            continue
        if ln.startswith("File ") or not frames:
            frames.append([ln])
        else:
            frames[-1].append(ln)
    for fr in reversed(frames):
        m = re.match(r'File "([^"]+)"', fr[0])
        if m is None or not os.path.abspath(m.group(1)).startswith(_TORCH_DIR + os.sep):
            return " / ".join(fr)
    return None  # torch's own frames only (e.g. nn.Sequential): the module path says where


def _unsupported(node: fx.Node, what: str, hint: str = "") -> CDUnsupportedError:
    msg = (
        f"Contextual decomposition has no rule for {what} (fx node {node.name!r}){_where(node)}. "
        + (hint + ". " if hint else "")
        + "Supported: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, BatchNorm, LayerNorm, GroupNorm, InstanceNorm, "
        "elementwise activations, "
        "max/avg pooling, "
        "dropout, flatten/view/reshape/permute/slicing, cat/stack, residual add, LSTM; see "
        "explain_callbacks.interaction.cd.supported_operations()."
    )
    return CDUnsupportedError(msg)


def _has_dec(obj: Any) -> bool:
    if isinstance(obj, Decomposition):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_dec(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_dec(o) for o in obj.values())
    return False


def _pick(obj: Any, which: str) -> Any:
    """Replace every Decomposition in a nested structure by one of its streams."""
    if isinstance(obj, Decomposition):
        return getattr(obj, which)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_pick(o, which) for o in obj)
    if isinstance(obj, dict):
        return {k: _pick(v, which) for k, v in obj.items()}
    return obj


def _load(arg: Any, env: dict[str, Any]) -> Any:
    return fx.node.map_arg(arg, lambda n: env[n.name])


def _fn_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{mod}.{name}" if mod else name


def _add(a: Any, b: Any) -> Any:
    da, db = isinstance(a, Decomposition), isinstance(b, Decomposition)
    if isinstance(a, _Led) and isinstance(b, _Led):
        return _Led(a.z + b.z, a.rel + b.rel)
    if da and db:
        return Decomposition(a.rel + b.rel, a.irr + b.irr)
    if da:
        return _split_bias(a.rel, a.irr, torch.as_tensor(b, dtype=a.rel.dtype, device=a.rel.device))
    return _split_bias(b.rel, b.irr, torch.as_tensor(a, dtype=b.rel.dtype, device=b.rel.device))


def _neg(a: Any) -> Any:
    return Decomposition(-a.rel, -a.irr) if isinstance(a, Decomposition) else -a


def _mul(a: Any, b: Any) -> Any:
    da, db = isinstance(a, Decomposition), isinstance(b, Decomposition)
    if da and db:  # β₁β₂ stays relevant; all cross terms (and γ₁γ₂) go to the rest
        rel = a.rel * b.rel
        return Decomposition(rel, a.total * b.total - rel)
    if da:
        return Decomposition(a.rel * b, a.irr * b)
    return Decomposition(a * b.rel, a * b.irr)


def _cat(tensors: Sequence[Any], *args: Any, stack: bool = False, **kwargs: Any) -> Decomposition:
    fn = torch.stack if stack else torch.cat
    rels = [t.rel if isinstance(t, Decomposition) else torch.zeros_like(t) for t in tensors]
    irrs = [t.irr if isinstance(t, Decomposition) else t for t in tensors]  # constants belong to the rest
    return Decomposition(fn(rels, *args, **kwargs), fn(irrs, *args, **kwargs))


def _pad(x: Decomposition, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Decomposition:
    if mode != "constant":
        return _each(x, lambda t: F.pad(t, pad, mode=mode))  # reflect/replicate/circular are linear copies
    v = 0.0 if value is None else float(value)
    return Decomposition(F.pad(x.rel, pad, value=0.0), F.pad(x.irr, pad, value=v))


def _call_module(node: fx.Node, mod: nn.Module, args: tuple, kwargs: dict) -> Any:
    x = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(x, Decomposition):
        if isinstance(mod, nn.RNNBase) and _has_dec(args[1:]):
            raise _unsupported(node, f"{type(mod).__name__} with decomposed initial states")
        return mod(*_pick(args, "total"), **_pick(kwargs, "total"))
    if isinstance(mod, nn.Linear):
        return _affine(x, lambda t: F.linear(t, mod.weight), mod.bias)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        bias = None if mod.bias is None else mod.bias.view(1, -1, *([1] * (x.rel.ndim - 2)))
        return _affine(x, lambda t: mod._conv_forward(t, mod.weight, None), bias)
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return _conv_transpose(x, mod, args[1] if len(args) > 1 else kwargs.get("output_size"))
    if type(mod) is nn.ReLU:
        return _relu(x)
    if isinstance(mod, _ELEMENTWISE_MODULES):
        if getattr(mod, "inplace", False):
            return _elementwise(x, lambda t: _call_not_inplace(mod, t))
        return _elementwise(x, mod)
    if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        fn = {nn.MaxPool1d: F.max_pool1d_with_indices, nn.MaxPool2d: F.max_pool2d_with_indices}.get(
            type(mod), F.max_pool3d_with_indices
        )
        return _maxpool(
            x,
            lambda t: fn(t, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode, True),
        )
    if isinstance(mod, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        fn = {
            nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d_with_indices,
            nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d_with_indices,
        }.get(type(mod), F.adaptive_max_pool3d_with_indices)
        return _maxpool(x, lambda t: fn(t, mod.output_size, True))
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return _batchnorm(x, mod)
    if isinstance(mod, nn.LayerNorm):
        return _layernorm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
    if isinstance(mod, nn.GroupNorm):
        return _groupnorm(x, mod.num_groups, mod.weight, mod.bias, mod.eps)
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        if x.rel.ndim == mod._get_no_batch_dim():
            raise _unsupported(node, f"{type(mod).__name__} on an unbatched input")
        use_input = mod.training or not mod.track_running_stats
        return _instancenorm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, use_input, mod.eps)
    if isinstance(mod, _DROPOUT_MODULES):
        return _dropout(x, mod.p, mod.training)
    if isinstance(mod, _EACH_MODULES):
        return _each(x, mod)
    if isinstance(mod, nn.LSTM):
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        return _lstm(mod, x, hx)
    hint = ""
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        hint = _NOT_DECOMPOSABLE_HINT["softmax"]
    elif isinstance(mod, _ATTENTION_MODULES):
        hint = _ATTENTION_HINT
    raise _unsupported(node, f"module {node.target!r} of type {type(mod).__name__}", hint)


def _conv_transpose(x: Decomposition, mod: nn.modules.conv._ConvTransposeNd, output_size: Any) -> Decomposition:
    """Transposed convolution: linear, so the linear/conv rule (bias split) applies."""
    nd = x.rel.ndim - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d}.get(nd, F.conv_transpose3d)
    out_pad = mod._output_padding(
        x.rel,
        output_size,
        list(mod.stride),
        list(mod.padding),
        list(mod.kernel_size),
        nd,
        list(mod.dilation),
    )
    bias = None if mod.bias is None else mod.bias.view(1, -1, *([1] * nd))
    return _affine(
        x,
        lambda t: fn(t, mod.weight, None, mod.stride, mod.padding, out_pad, mod.groups, mod.dilation),
        bias,
    )


_ATTENTION_MODULES = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)
_ATTENTION_HINT = (
    "CD has no rule for attention; for transformers use a gradient or path method (saliency, ig) or a "
    "black-box one (occlusion, rise, sobol, hsic), and 'integrated_hessians', 'sobol' or 'hsic' for interactions"
)


def _call_not_inplace(mod: nn.Module, t: Tensor) -> Tensor:
    mod.inplace = False
    try:
        return mod(t)
    finally:
        mod.inplace = True


def _call_function(node: fx.Node, fn: Any, args: tuple, kwargs: dict) -> Any:
    if fn in (operator.add, torch.add, operator.iadd):
        if "alpha" in kwargs:
            raise _unsupported(node, "torch.add with alpha")
        return _add(args[0], args[1])
    if fn in (operator.sub, torch.sub, operator.isub):
        return _add(args[0], _neg(args[1]))
    if fn in (operator.mul, torch.mul, operator.imul):
        return _mul(args[0], args[1])
    if fn in (operator.truediv, torch.div, torch.true_divide, operator.itruediv):
        if isinstance(args[1], Decomposition) or kwargs.get("rounding_mode"):
            raise _unsupported(node, "a division by a decomposed tensor")
        return _mul(args[0], 1.0 / args[1] if not isinstance(args[1], Tensor) else args[1].reciprocal())
    if fn is operator.getitem:
        obj, idx = args
        if isinstance(obj, Decomposition):
            if _has_dec(idx):
                raise _unsupported(node, "indexing with a decomposed tensor")
            if isinstance(obj, _Led):
                return _Led(obj.z[idx], obj.rel[idx])
            return Decomposition(obj.rel[idx], obj.irr[idx])
        return obj[idx]
    if fn is getattr:
        obj, name = args
        if isinstance(obj, Decomposition) and name in ("shape", "dtype", "device", "ndim", "is_cuda"):
            return getattr(obj.rel, name)
        raise _unsupported(node, f"attribute {name!r} of a decomposed tensor")
    if fn in (torch.cat, torch.concat, torch.stack):
        return _cat(args[0], *args[1:], stack=fn is torch.stack, **kwargs)
    if fn in (F.relu, torch.relu) and len(args) == 1 and isinstance(args[0], Decomposition):
        return _relu(args[0])
    if fn in _ELEMENTWISE_FUNCS:
        x, rest = args[0], args[1:]
        kw = {k: v for k, v in kwargs.items() if k != "inplace"}
        if not isinstance(x, Decomposition) or _has_dec(rest) or _has_dec(kw):
            raise _unsupported(node, f"{_fn_name(fn)} with a decomposed non-input argument")
        return _elementwise(x, lambda t: fn(t, *rest, **kw))
    if fn in _MAXPOOL_FUNCS:
        x, rest = args[0], args[1:]
        kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
        return _maxpool(x, lambda t: _MAXPOOL_FUNCS[fn](t, *rest, **kw))
    if fn is F.linear:
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if not isinstance(x, Decomposition) or _has_dec((w, b)):
            raise _unsupported(node, "F.linear with a decomposed weight")
        return _affine(x, lambda t: F.linear(t, w), b)
    if fn in (F.conv1d, F.conv2d, F.conv3d):
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else kwargs.pop("bias", None)
        rest = args[3:]
        if not isinstance(x, Decomposition) or _has_dec((w, b)):
            raise _unsupported(node, f"{_fn_name(fn)} with a decomposed weight")
        bias = None if b is None else b.view(1, -1, *([1] * (x.rel.ndim - 2)))
        return _affine(x, lambda t: fn(t, w, None, *rest, **kwargs), bias)
    if fn in (torch.matmul, operator.matmul, torch.mm, torch.bmm):
        a, b = args[0], args[1]
        if isinstance(a, Decomposition) and isinstance(b, Decomposition):
            rel = fn(a.rel, b.rel)
            return Decomposition(rel, fn(a.total, b.total) - rel)
        if isinstance(a, Decomposition):
            return _each(a, lambda t: fn(t, b))
        return _each(b, lambda t: fn(a, t))
    if fn is F.pad:
        return _pad(*args, **kwargs)
    if fn is F.dropout:
        x = args[0]
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        return _dropout(x, p, training)
    if fn is F.batch_norm:
        raise _unsupported(node, "functional F.batch_norm", "use nn.BatchNorm modules")
    if fn is F.layer_norm:
        x, shape = args[0], args[1]
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        return _layernorm(x, shape, w, b, eps)
    if fn is F.group_norm:
        x, groups = args[0], args[1] if len(args) > 1 else kwargs["num_groups"]
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        if not isinstance(x, Decomposition) or _has_dec((w, b)):
            raise _unsupported(node, "F.group_norm with a decomposed weight")
        return _groupnorm(x, int(groups), w, b, eps)
    if fn is F.instance_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
        defaults = {"running_mean": None, "running_var": None, "weight": None, "bias": None}
        a = {**defaults, "use_input_stats": True, "eps": 1e-5, **dict(zip(names, args)), **kwargs}
        if not isinstance(a["input"], Decomposition) or _has_dec(tuple(a[k] for k in defaults)):
            raise _unsupported(node, "F.instance_norm with a decomposed weight or statistic")
        stats = (a["running_mean"], a["running_var"], a["weight"], a["bias"])
        return _instancenorm(a["input"], *stats, bool(a["use_input_stats"]), a["eps"])
    if fn in _EACH_FUNCS:
        x = args[0]
        if not isinstance(x, Decomposition) or _has_dec(args[1:]) or _has_dec(kwargs):
            raise _unsupported(node, f"{_fn_name(fn)} with several decomposed arguments")
        return _each(x, lambda t: fn(t, *args[1:], **kwargs))
    name = _fn_name(fn)
    hint = next((h for k, h in _NOT_DECOMPOSABLE_HINT.items() if k in name), "")
    raise _unsupported(node, f"function {name}", hint)


def _call_method(node: fx.Node, name: str, args: tuple, kwargs: dict) -> Any:
    self_obj = args[0]
    if not isinstance(self_obj, Decomposition):
        # a constant's method with a decomposed argument, e.g. const.add(x)
        if name in ("add", "__add__", "__radd__"):
            return _add(self_obj, args[1])
        if name in ("mul", "__mul__", "__rmul__"):
            return _mul(self_obj, args[1])
        raise _unsupported(node, f"method .{name}() of a constant with a decomposed argument")
    rest = args[1:]
    if name in _META_METHODS:
        return getattr(self_obj.rel, name)(*rest, **kwargs)
    if name in ("add", "add_", "__add__", "__iadd__"):
        return _add(self_obj, rest[0])
    if name in ("sub", "sub_", "__sub__", "__isub__"):
        return _add(self_obj, _neg(rest[0]))
    if name in ("mul", "mul_", "__mul__", "__imul__"):
        return _mul(self_obj, rest[0])
    if name in ("div", "div_", "__truediv__") and not isinstance(rest[0], Decomposition) and not kwargs:
        return _mul(self_obj, 1.0 / rest[0] if not isinstance(rest[0], Tensor) else rest[0].reciprocal())
    if name in ("matmul", "__matmul__"):
        return _call_function(node, torch.matmul, args, kwargs)
    if name in _ELEMENTWISE_METHODS or name.rstrip("_") in _ELEMENTWISE_METHODS:
        base = name.rstrip("_")
        if _has_dec(rest) or _has_dec(kwargs):
            raise _unsupported(node, f"method .{name}() with a decomposed argument")
        return _elementwise(self_obj, lambda t: getattr(t, base)(*rest, **kwargs))
    if name in _EACH_METHODS:
        if name in ("view_as", "reshape_as", "expand_as", "type_as"):
            rest = _pick(rest, "rel")  # only the other tensor's shape / dtype is used
        elif _has_dec(rest) or _has_dec(kwargs):
            raise _unsupported(node, f"method .{name}() with a decomposed argument")
        return _each(self_obj, lambda t: getattr(t, name)(*rest, **kwargs))
    hint = _NOT_DECOMPOSABLE_HINT.get(name, "")
    raise _unsupported(node, f"method .{name}()", hint)


def cd_propagate(
    model: nn.Module,
    rel: Tensor,
    irr: Tensor,
    *,
    bias_at_zero: str = "half",
    streams: str = "pair",
    norm_stats: NormStats | None = None,
) -> Decomposition:
    """Propagate given input streams (β₀, γ₀) through ``model``; returns the output decomposition.

    The model is traced once with torch.fx and cached per module instance. The first positional
    input of ``forward`` receives the decomposition; other inputs must have defaults.

    ``bias_at_zero``: how the linear rule splits a bias where both streams are exactly 0 (e.g. a
    convolution over zero background): ``"half"`` (the acd reference's ``+1e-20`` on both shares)
    or ``"rest"`` (all of it to γ, so β is exactly 0 wherever the group S has no influence; the
    CDEP penalty's choice). Elsewhere the two agree to ~1e-20 relative.

    ``streams``: ``"pair"`` carries β and γ (the reference's form); ``"total"`` carries the true
    activation z = β + γ and β, with γ = z − β: the same rules rewritten for that pair (equal to float
    rounding), where z goes through the model's own operations (ReLU, max-pooling, the normalisation),
    a linear layer needs one extra batch (β) instead of two, and the returned decomposition's ``total``
    is the model's forward pass itself (what a training step that takes its logits from the CD pass
    uses; see :func:`~explain_callbacks.regularize.functional.cdep_penalty`).

    ``norm_stats``: a list that receives the batch statistics of every BatchNorm layer in training
    mode (running statistics are never updated by the pass itself); :func:`update_norm_stats` applies
    them as the model's own forward would have.
    """
    return cd_forward(model, rel, irr, bias_at_zero=bias_at_zero, streams=streams, norm_stats=norm_stats)[0]


def cd_forward(
    model: nn.Module,
    rel: Tensor,
    irr: Tensor,
    *,
    bias_at_zero: str = "half",
    streams: str = "total",
    norm_stats: NormStats | None = None,
    compiled: bool = False,
) -> tuple[Decomposition, Any]:
    """:func:`cd_propagate`, and the model's output as its ``forward`` returns it (the same structure, every
    decomposed tensor replaced by its total β + γ): the CD pass and the forward pass in one. With
    ``streams="total"`` (default here) the totals are the model's own operations on z.

    ``compiled``: run the ``(z, β)`` rules of the linear/convolution layers and of BatchNorm (with the ReLU after
    it) as kernels compiled by ``torch.compile`` (one pass each instead of a dozen; compiled on first use per shape
    and dtype, which takes tens of seconds; inductor needs a C++ compiler on the CPU). The values equal the eager
    rules' to float rounding, not bit for bit. Where compilation fails, a warning says so once and the eager
    rules run. Off by default: no compiler is assumed."""
    if bias_at_zero not in BIAS_AT_ZERO:
        raise ValueError(f"bias_at_zero must be one of {BIAS_AT_ZERO}, got {bias_at_zero!r}.")
    if streams not in STREAMS:
        raise ValueError(f"streams must be one of {STREAMS}, got {streams!r}.")
    token = _BIAS_EPS.set((_EPS, _EPS) if bias_at_zero == "half" else (0.0, 2 * _EPS))
    stats_token = _NORM_STATS.set(norm_stats)
    compiled_token = _COMPILED.set(bool(compiled))
    try:
        first = _Led(rel + irr, rel) if streams == "total" else Decomposition(rel, irr)
        raw = _run(model, first)
        return _output(model, raw), _pick(raw, "total")
    finally:
        _COMPILED.reset(compiled_token)
        _NORM_STATS.reset(stats_token)
        _BIAS_EPS.reset(token)


def update_norm_stats(norm_stats: NormStats, replicas: int = 1) -> None:
    """Update the running statistics of the BatchNorm layers recorded by :func:`cd_propagate` (``norm_stats=``)
    once, as ``nn.BatchNorm`` does in a training-mode forward: ``num_batches_tracked += 1`` and the running
    mean/variance moved by ``momentum`` (or the cumulative average when it is None) towards the batch mean and
    the unbiased batch variance. ``replicas``: how many times each sample was repeated in the decomposed rows
    (G feature groups per sample), so that the unbiased variance counts the samples of the batch once."""
    with torch.no_grad():
        for bn, mean, var, count in norm_stats:
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0.0
            else:
                factor = bn.momentum
            n = count // max(1, replicas)
            unbiased = var * (n / (n - 1)) if n > 1 else var
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _propagate(model: nn.Module, rel: Tensor, irr: Tensor) -> Decomposition:
    return _output(model, _run(model, Decomposition(rel, irr)))


def _module(model: nn.Module, modules: dict[str, nn.Module], node: fx.Node) -> nn.Module:
    mod = modules.get(node.name)
    if mod is None:
        mod = modules[node.name] = model.get_submodule(str(node.target))
    return mod


def _is_relu_of(node: fx.Node, src: fx.Node, model: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a plain ReLU of ``src`` alone (module, ``F.relu``/``torch.relu`` or ``.relu()``)."""
    if not node.args or node.args[0] is not src or any(k != "inplace" for k in node.kwargs):
        return False
    if node.op == "call_module":
        return len(node.args) == 1 and type(_module(model, modules, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and len(node.args) <= 2
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _norm_relu_pairs(graph: fx.Graph, model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, fx.Node]:
    """BatchNorm module nodes whose only user is a ReLU of their output: {BatchNorm node: its ReLU node}. For
    ``(z, β)`` the two rules run as one pass (:class:`_LedNorm` with ``relu``)."""
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        if not isinstance(_module(model, modules, node), nn.modules.batchnorm._BatchNorm):
            continue
        (user,) = node.users
        if _is_relu_of(user, node, model, modules):
            pairs[node.name] = user
    return pairs


def _run(model: nn.Module, dec: Decomposition) -> Any:
    """Interpret the traced graph of ``model`` on ``dec``; the raw output (Decompositions in place of tensors)."""
    graph = _trace(model, dec.total)
    modules = _MODULES.setdefault(model, {})
    pairs = _norm_relu_pairs(graph, model, modules) if isinstance(dec, _Led) else {}
    fused: set[fx.Node] = set()  # ReLU nodes already applied by the BatchNorm before them
    env: dict[str, Any] = {}
    first = True
    out: Any = None
    for node in graph.nodes:
        op = node.op
        if node in fused:
            env[node.name] = env[node.args[0].name]  # type: ignore[union-attr]
            continue
        if op == "placeholder":
            if first:
                env[node.name] = dec
                first = False
            elif node.args:
                env[node.name] = node.args[0]
            else:
                raise CDUnsupportedError(
                    f"{type(model).__name__}.forward has a second required input {node.target!r}; CD "
                    "decomposes a single-input model. Wrap it: lambda-free nn.Module whose forward takes x."
                )
            continue
        if op == "get_attr":
            obj: Any = model
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            env[node.name] = obj
            continue
        if op == "output":
            out = _load(node.args[0], env)
            break
        args = _load(node.args, env)
        kwargs = _load(node.kwargs, env)
        if op == "call_module":
            mod = _module(model, modules, node)
            relu = pairs.get(node.name)
            if relu is not None and len(args) == 1 and not kwargs and isinstance(args[0], _Led):
                env[node.name] = _batchnorm(args[0], mod, relu=True)  # type: ignore[arg-type]
                fused.add(relu)
            else:
                env[node.name] = _call_module(node, mod, args, kwargs)
        elif not _has_dec(args) and not _has_dec(kwargs):
            # input-independent computation (shapes, constants): run it as is
            if op == "call_function":
                env[node.name] = node.target(*args, **kwargs)
            else:
                env[node.name] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif op == "call_function":
            env[node.name] = _call_function(node, node.target, args, kwargs)
        elif op == "call_method":
            env[node.name] = _call_method(node, str(node.target), args, kwargs)
        else:  # pragma: no cover - fx has no other op kinds
            raise _unsupported(node, f"fx op {op}")
    return out


def _output(model: nn.Module, out: Any) -> Decomposition:
    """The decomposition of the scores in a raw output (a tensor, a tuple's first entry or ``"logits"``)."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Decomposition):
        out = out[0]
    elif isinstance(out, Mapping) and isinstance(out.get("logits"), Decomposition):
        out = out["logits"]  # {"logits": ...} outputs, as pick_output reads them
    if not isinstance(out, Decomposition):
        raise CDUnsupportedError(
            f"{type(model).__name__}.forward returns {type(out).__name__}, not a tensor computed from the "
            "input; CD needs a model returning one tensor of logits."
        )
    return out


def cd_logits(
    model: nn.Module, inputs: Tensor, mask: Tensor, *, bias_at_zero: str = "half", streams: str = "pair"
) -> tuple[Tensor, Tensor]:
    """Contextual decomposition of ``model(inputs)`` for the feature group ``mask``.

    Args:
        model: the network (traced with torch.fx, see the module docstring for the rules).
        inputs: (B, *input_shape).
        mask: broadcastable to ``inputs``; 1 marks the feature group S (fractional values are
            allowed: ``β₀ = M ⊙ x``, ``γ₀ = (1 − M) ⊙ x``).
        bias_at_zero: ``"half"`` (acd) or ``"rest"``, see :func:`cd_propagate`.
        streams: ``"pair"`` (β and γ, the reference's form) or ``"total"`` (β + γ and β), see
            :func:`cd_propagate`; equal to float rounding.

    Returns:
        ``(beta, gamma)``, each of the model's output shape, with ``beta + gamma = model(inputs)``
        (to float rounding) and beta the contribution of S. Differentiable with respect to the
        model parameters (and the inputs), so it can sit inside a training loss (CDEP).
    """
    mask = mask.to(device=inputs.device, dtype=inputs.dtype)
    try:
        torch.broadcast_shapes(mask.shape, inputs.shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to inputs {tuple(inputs.shape)}; "
            "pass a mask of the input's shape, its per-sample shape, or a broadcastable one."
        ) from err
    rel = (mask * inputs).expand_as(inputs)
    irr = ((1 - mask) * inputs).expand_as(inputs)
    out = cd_propagate(model, rel, irr, bias_at_zero=bias_at_zero, streams=streams)
    return out.rel, out.irr


def cd_batched(
    model: nn.Module,
    inputs: Tensor,
    masks: Tensor,
    *,
    batch_size: BatchSize = None,
) -> tuple[Tensor, Tensor]:
    """CD of many feature groups in one batched pass.

    Args:
        inputs: (B, *S).
        masks: (G, *S) shared by all samples, or (B, G, *S) per sample; each broadcastable in S
            (e.g. (G, 1, H, W) for a channel-shared image mask).
        batch_size: rows (sample × group pairs) per propagation; ``None``: all B·G at once.

    Returns:
        ``(beta, gamma)`` of shape (B, G, *out_shape), e.g. (B, G, K) for K logits.
    """
    b = inputs.shape[0]
    sample_shape = inputs.shape[1:]
    masks = masks.to(device=inputs.device, dtype=inputs.dtype)
    per_sample = masks.ndim == inputs.ndim + 1
    if not per_sample and masks.ndim != inputs.ndim:
        raise ValueError(
            f"masks must have shape (G, *{tuple(sample_shape)}) or (B, G, *{tuple(sample_shape)}) "
            f"(broadcastable in the per-sample dims), got {tuple(masks.shape)}."
        )
    if per_sample and masks.shape[0] not in (1, b):
        raise ValueError(f"per-sample masks have {masks.shape[0]} rows for a batch of {b}.")
    g = masks.shape[1] if per_sample else masks.shape[0]
    n = b * g
    step = max(1, rows_per_call(batch_size) or n)
    if step >= n:  # one propagation: build the rows by broadcasting
        xg = inputs.unsqueeze(1)
        m = masks if per_sample else masks.unsqueeze(0)
        rel0 = (m * xg).expand(b, g, *sample_shape).reshape(n, *sample_shape)
        irr0 = ((1 - m) * xg).expand(b, g, *sample_shape).reshape(n, *sample_shape)
        out = cd_propagate(model, rel0, irr0)
        return out.rel.view(b, g, *out.rel.shape[1:]), out.irr.view(b, g, *out.irr.shape[1:])
    rels, irrs = [], []
    for s in range(0, n, step):
        rows = torch.arange(s, min(s + step, n), device=inputs.device)
        bi, gi = rows // g, rows % g
        x = inputs[bi]
        m = masks[bi if masks.shape[0] == b else torch.zeros_like(bi), gi] if per_sample else masks[gi]
        out = cd_propagate(model, (m * x).expand_as(x), ((1 - m) * x).expand_as(x))
        rels.append(out.rel)
        irrs.append(out.irr)
    rel, irr = torch.cat(rels), torch.cat(irrs)
    return rel.view(b, g, *rel.shape[1:]), irr.view(b, g, *irr.shape[1:])


def cd_scores(
    model: nn.Module,
    inputs: Tensor,
    masks: Tensor,
    target: Tensor | None = None,
    *,
    batch_size: BatchSize = None,
) -> Tensor:
    """β at the target output for each group: (B, G). ``target`` (B,) class indices, or None for a
    single-output model (the output is summed over trailing dimensions)."""
    rel, _ = cd_batched(model, inputs, masks, batch_size=batch_size)
    if isinstance(target, TargetOperator):  # a region/position/box: the operator (a weighted sum) of each β
        b, g = rel.shape[:2]
        rows = target[torch.arange(b, device=target.device).repeat_interleave(g)]  # row b*G + k: sample b
        return rows(rel.reshape(b * g, *rel.shape[2:])).view(b, g)
    if rel.ndim == 2:
        return rel
    if target is None:
        if rel.shape[2] != 1:
            raise ValueError(f"The model returns {rel.shape[2]} outputs per sample; pass target=<class indices (B,)>.")
        return rel.reshape(rel.shape[0], rel.shape[1], -1).sum(-1)
    idx = target.view(-1, 1, 1, *([1] * (rel.ndim - 3))).expand(-1, rel.shape[1], 1, *rel.shape[3:])
    return rel.gather(2, idx).reshape(rel.shape[0], rel.shape[1], -1).sum(-1)
