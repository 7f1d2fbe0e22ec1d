"""Chunked model calls: memory bounded by ``batch_size`` rows, not by n_steps x batch.

``batch_size="auto"`` (the default everywhere) picks the rows per call from the model: on the GPU
:data:`AUTO_ROWS_MAX` rows; on the CPU as many rows as fit :data:`CPU_ELEMENTS_PER_CALL` activation
elements (what the model's leaf modules output for one row, measured once per model and row shape),
between :data:`AUTO_ROWS_MIN` and :data:`AUTO_ROWS_MAX`. Why: on the CPU a call's activations
should stay near the caches. Measured here (2 threads, Xeon with 2 MiB L2 per core, README "Chunk
size"): a 3×64×64 input through a width-64 CNN (1.5 M activation elements per row) costs 2.2 ms per
row in calls of 8 rows and 5.8 ms in calls of 256, while the 8×8 digits CNN (6 k per row) is fastest
at 256 rows per call.
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Callable, Iterator
from typing import Union

import torch
from torch import Tensor, nn

from .checks import not_differentiable, require_graph
from .outputs import model_errors, read_scores
from .target_ops import TargetOperator

__all__ = [
    "AUTO_ROWS_MAX",
    "AUTO_ROWS_MIN",
    "CPU_ELEMENTS_PER_CALL",
    "BatchSize",
    "RowsPerCall",
    "activation_elements",
    "call_facts",
    "check_batch_size",
    "chunks",
    "forward_selected",
    "grad_selected",
    "map_chunks",
    "model_facts",
    "output_width",
    "resolve_batch_size",
    "rows",
    "select_output",
    "twice_differentiable",
]

#: rows per model call: a positive int, ``"auto"`` (chosen from the model, see the module docstring),
#: or None (everything in one call).
BatchSize = Union[int, str, None]
#: activation elements per model call aimed at on the CPU by ``batch_size="auto"`` (32 MiB of float32).
CPU_ELEMENTS_PER_CALL = 1 << 23
#: bounds of the rows per call that ``"auto"`` picks (the upper one is also its GPU choice).
AUTO_ROWS_MIN, AUTO_ROWS_MAX = 8, 256

# (activation elements per row, output width) per model, per (structure, row shape, dtype, device):
# one probe forward each
_activation_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[int, int | None]]] = (
    weakref.WeakKeyDictionary()
)


def check_batch_size(batch_size: BatchSize) -> BatchSize:
    """``batch_size`` if it is a positive int, ``"auto"`` or None; otherwise a ValueError naming the fix."""
    if batch_size is None or batch_size == "auto":
        return batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ValueError(
            f"batch_size (rows per model call) must be a positive int, 'auto' or None; got {batch_size!r}."
        )
    return int(batch_size)


def rows(batch_size: BatchSize) -> int | None:
    """Rows per call for a setting that could not be resolved against a model: ``"auto"`` reads as
    :data:`AUTO_ROWS_MAX` (entry points resolve it with :func:`resolve_batch_size` first)."""
    if batch_size == "auto":
        return AUTO_ROWS_MAX
    return None if not batch_size or batch_size <= 0 else int(batch_size)


def _probe(model: nn.Module, row: Tensor, full: Tensor | None = None) -> tuple[int, int | None]:
    """(Elements output by the leaf modules of ``model`` for the one-row input ``row`` (1, ...), the
    width of the model's output: ``out.shape[1]``, or None for a 1-D or non-tensor output).

    One forward pass without grad, with every module in eval mode (no BatchNorm statistics move, and a
    BatchNorm1d takes one row) and the global RNG forked; modes and hooks are restored, so the model is
    left exactly as found. The model's own errors (a wrong input shape) are re-raised saying the shape
    of ``full`` (the batch ``row`` was taken from; default ``row``) and what the failing layer takes
    (:func:`~explain_callbacks._internal.outputs.model_errors`).
    """
    full = row if full is None else full
    total = [0]

    def count(_m: nn.Module, _i: object, out: object) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                total[0] += t.numel()

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for m in leaves:
            handles.append(m.register_forward_hook(count))
    except RuntimeError:  # a ScriptModule takes no hooks: its output and input stand for the activations
        for h in handles:
            h.remove()
        handles, total[0] = [], 0
    try:
        model.eval()
        cuda = (
            [row.device.index if row.device.index is not None else torch.cuda.current_device()]
            if (row.device.type == "cuda")
            else []
        )  # the CUDA generator of the input's device is forked too (documented use: device indices)
        # the model's own error quotes this one row: say what the caller gave (``full``) instead
        with model_errors(model, full, probe=True), torch.no_grad(), torch.random.fork_rng(devices=cuda):
            out = model(row)
        if total[0] == 0 and isinstance(out, Tensor):  # no leaf modules (functional code) or no hooks
            total[0] = out.numel() + row.numel()
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    width = out.shape[1] if isinstance(out, Tensor) and out.ndim >= 2 else None
    return max(total[0], 1), width


def activation_elements(model: nn.Module, row: Tensor) -> int:
    """Elements output by the leaf modules of ``model`` for the one-row input ``row`` (1, ...); see
    :func:`model_facts` (this one is not cached)."""
    return _probe(model, row)[0]


def model_facts(model: nn.Module, inputs: Tensor, *, refresh: bool = False) -> tuple[int, int | None]:
    """:func:`_probe` of ``inputs[:1]``, cached per model, module structure (the identity of every
    submodule and the shape of every parameter: a replaced head is a new module with new shapes) and row
    shape, dtype and device: one probe forward per model and input kind, not one per call. ``refresh``
    probes again (a freed module's id can be reused by its replacement)."""
    key = (
        tuple(map(id, model.modules())),
        tuple(tuple(p.shape) for p in model.parameters()),
        tuple(inputs.shape[1:]),
        inputs.dtype,
        inputs.device,
    )
    per_model = _activation_cache.setdefault(model, {})
    if refresh or key not in per_model:
        if len(per_model) > 64:  # structures of the past (heads replaced again and again): start afresh
            per_model.clear()
        per_model[key] = _probe(model, inputs[:1].detach(), inputs)
    return per_model[key]


def output_width(model: Callable[[Tensor], object], inputs: Tensor, *, refresh: bool = False) -> int | None:
    """The width of ``model``'s output (classes) for inputs like ``inputs`` (B, ...): ``out.shape[1]``,
    None for a single-output model (1-D output) or a non-tensor output. Cached for modules
    (:func:`model_facts`; ``refresh`` probes again); a plain function is called on one row without grad."""
    if isinstance(model, nn.Module):
        return model_facts(model, inputs, refresh=refresh)[1]
    with model_errors(model, inputs, probe=True), torch.no_grad():
        out = model(inputs[:1])
    return out.shape[1] if isinstance(out, Tensor) and out.ndim >= 2 else None


def _auto_probes(model: object, inputs: Tensor) -> bool:
    """Whether ``"auto"`` rows come from the model's probe (a CPU module and a non-empty batch)."""
    return (
        isinstance(inputs, Tensor)
        and inputs.ndim > 0
        and inputs.shape[0] > 0
        and inputs.device.type == "cpu"
        and isinstance(model, nn.Module)
    )


def resolve_batch_size(
    batch_size: BatchSize, model: object, inputs: Tensor, facts: tuple[int, int | None] | None = None
) -> int | None:
    """The rows per call for ``inputs`` (B, ...) through ``model``: ints and None as given; ``"auto"``
    from the model's activation size on the CPU (see the module docstring), :data:`AUTO_ROWS_MAX` on
    other devices or for models that are not ``nn.Module``s. ``facts``: :func:`model_facts` of this
    model and input when the caller has them already (:func:`call_facts`)."""
    check_batch_size(batch_size)
    if batch_size != "auto":
        return batch_size
    if not _auto_probes(model, inputs):
        return AUTO_ROWS_MAX  # the caller's input checks name a bad input
    if facts is None:
        try:
            facts = model_facts(model, inputs)  # type: ignore[arg-type]
        except Exception:  # the probe is an estimate: the method's own call raises the model's error, if any
            return AUTO_ROWS_MAX
    return int(min(AUTO_ROWS_MAX, max(AUTO_ROWS_MIN, CPU_ELEMENTS_PER_CALL // facts[0])))


def call_facts(
    model: object, inputs: Tensor, batch_size: BatchSize, check_width: bool
) -> tuple[int, int | None] | None:
    """:func:`model_facts` looked up once for a method call that resolves ``batch_size`` and, when
    ``check_width``, checks its target against the output width (the cache key walks every submodule
    and parameter: one walk per call). None when the call needs neither, or the probe fails (each
    consumer then falls back as without facts)."""
    if not isinstance(model, nn.Module) or not (check_width or (batch_size == "auto" and _auto_probes(model, inputs))):
        return None
    try:
        return model_facts(model, inputs)
    except Exception:
        return None


_UNRESOLVED = object()  # a batch_size setting not yet resolved against a model and input


class RowsPerCall:
    """Mixin for methods with a ``batch_size`` setting: the attribute reads as the setting resolved
    by :meth:`_resolve_rows` for the current (last) call's model and input, so method code sees an
    int or None, never ``"auto"``; assigning it sets (and validates) the setting."""

    _batch_size: BatchSize = "auto"
    _rows: int | object | None = _UNRESOLVED

    @property
    def batch_size(self) -> int | None:
        return self._rows if self._rows is not _UNRESOLVED else rows(self._batch_size)

    @batch_size.setter
    def batch_size(self, value: BatchSize) -> None:
        self._batch_size = check_batch_size(value)
        self._rows = _UNRESOLVED

    def _resolve_rows(self, model: object, inputs: Tensor, facts: tuple[int, int | None] | None = None) -> None:
        self._rows = resolve_batch_size(self._batch_size, model, inputs, facts)


def chunks(n: int, batch_size: BatchSize) -> Iterator[slice]:
    """Slices ``[0, n)`` in pieces of at most ``batch_size`` (all at once if None)."""
    step = max(rows(batch_size) or n, 1)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def steps_per_call(batch_size: BatchSize, batch: int, n_steps: int) -> int:
    """How many steps (noise draws, path points) of a ``batch``-row input fit in one call of at most
    ``batch_size`` rows (all ``n_steps`` when ``batch_size`` is None; at least one)."""
    return max(1, (rows(batch_size) or batch * n_steps) // batch)


def select_output(out: Tensor, target: Tensor | TargetOperator | None) -> Tensor:
    """The scalar output per row that an attribution explains.

    ``out`` of shape (N,) or (N, 1) is a regression output (target ignored); (N, K) is gathered at
    ``target`` (N,). Extra trailing dimensions are summed after gathering (e.g. segmentation). A target
    operator (:mod:`~explain_callbacks._internal.target_ops`: a region, a position, a box) maps the
    output, whatever its shape, to its scalar per row itself.
    """
    if isinstance(target, TargetOperator):
        return target(out)
    out = read_scores(out)  # a tuple/dict output: the error naming output_key
    if out.ndim == 1:
        return out
    if target is None:
        if out.shape[1] == 1:
            return out[:, 0].reshape(out.shape[0], -1).sum(1)
        raise ValueError(
            f"The model returns {out.shape[1]} outputs per sample but no target was given; "
            "pass target=<class indices of shape (B,)> or use a target policy ('label', 'prediction')."
        )
    sel = out.gather(1, target.view(-1, *([1] * (out.ndim - 1))).expand(-1, 1, *out.shape[2:]))
    return sel.reshape(out.shape[0], -1).sum(1)


def _expand_target(target: Tensor | TargetOperator | None, n_rows: int) -> Tensor | TargetOperator | None:
    """``target`` for ``n_rows`` rows: as is, or repeated block after block (k copies of the B samples).
    Target operators repeat their rows the same way."""
    if target is None:
        return None
    if target.shape[0] == n_rows:
        return target
    reps = n_rows // target.shape[0]
    return target.repeat(reps)


def forward_selected(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor | None,
    batch_size: BatchSize = None,
) -> Tensor:
    """``select_output(model(x), target)`` computed in chunks; returns (N,)."""
    target = _expand_target(target, x.shape[0])
    outs = []
    for sl in chunks(x.shape[0], batch_size):
        outs.append(select_output(model(x[sl]), None if target is None else target[sl]))
    return torch.cat(outs) if outs else x.new_zeros(0)


@contextlib.contextmanager
def twice_differentiable(enabled: bool = True) -> Iterator[None]:
    """Attention whose graph can be differentiated twice, while ``enabled``: the math kernel of
    ``F.scaled_dot_product_attention`` (used by ``nn.MultiheadAttention`` and the transformer layers).
    Its fused flash / memory-efficient kernels have a backward without a derivative, so a map built with
    ``create_graph=True`` (penalties, EG priors, RRR) or a Hessian-vector product (integrated Hessians)
    through a transformer fails with "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented". Same values to rounding; the previous kernel choice is restored on exit. A no-op
    when not ``enabled`` or on PyTorch < 2.3 (``torch.backends.cuda.sdp_kernel`` covers CUDA only)."""
    if not enabled:
        yield
        return
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def grad_selected(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor | None,
    batch_size: BatchSize = None,
    *,
    create_graph: bool = False,
    return_outputs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-row input gradient of the selected output, ``d f_target(x_n) / d x_n``, chunked.

    Rows must be independent (eval-mode BatchNorm), so the gradient of the sum over a chunk is the
    per-row gradient. ``torch.autograd.grad(..., inputs=...)`` leaves parameter ``.grad`` untouched.
    ``target`` may have B rows for an input of k*B rows (repeated blocks, as built by path methods).
    With ``create_graph`` the forward runs under :func:`twice_differentiable` (the gradient's graph is
    differentiated again, through attention layers too).
    """
    target = _expand_target(target, x.shape[0])
    grads, outs = [], []
    with twice_differentiable(create_graph):
        for sl in chunks(x.shape[0], batch_size):
            xc = x[sl]
            if not xc.requires_grad:
                xc = xc.detach().requires_grad_(True)
            y = select_output(model(xc), None if target is None else target[sl])
            require_graph(y)
            (g,) = torch.autograd.grad(y.sum(), xc, create_graph=create_graph, allow_unused=True)
            if g is None:  # the output depends on the parameters only (no_grad/detach on the input path)
                raise not_differentiable()
            grads.append(g)
            if return_outputs:
                outs.append(y if create_graph else y.detach())
    g = torch.cat(grads) if grads else torch.zeros_like(x)
    if return_outputs:
        return g, torch.cat(outs)
    return g


def map_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: BatchSize) -> Tensor:
    """Apply ``fn`` to row chunks of ``x`` and concatenate."""
    return torch.cat([fn(x[sl]) for sl in chunks(x.shape[0], batch_size)])
