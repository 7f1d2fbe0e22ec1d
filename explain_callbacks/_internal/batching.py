"""Chunked model calls: memory bounded by ``batch_size`` rows, not by n_steps x batch.

``batch_size="auto"`` (the default everywhere) chooses the rows per call by measurement: on the first
use per model, row shape, dtype, device and kind of pass (forward, forward+backward, double backward),
a few candidate rows-per-call are timed with the model's own passes and the fastest is kept (the largest
within :attr:`AutoRows.tolerance` of it; cached per model; :func:`choose_rows`, :class:`AutoRows`). The
candidates start from an activation-count rule, the choice without measurement: on the CPU as many rows
as fit :data:`CPU_ELEMENTS_PER_CALL` activation elements (what the model's leaf modules output for one
row, measured once per model and row shape), between :data:`AUTO_ROWS_MIN` and :data:`AUTO_ROWS_MAX`;
on other devices :data:`AUTO_ROWS_MAX`. From there they double (and, when doubling does not help,
halve) within the memory bound (:attr:`AutoRows.elements_max` activation elements per call,
:attr:`AutoRows.rows_max` rows). Why
measure: the fastest call size depends on the model and the machine. Measured here (2 threads, Xeon
with 2 MiB L2 per core): a 3x64x64 input through a width-64 CNN costs 2.2 ms per row in calls of 8
rows and 5.8 ms in calls of 256, while the 8x8 digits CNN is fastest at 256 rows per call; a rule fitted
to these models mis-sizes others (a small ResNet was reported faster in larger calls than the rule's 16-24
rows on one machine, and flat between 10 and 160 rows on this one), so ``"auto"`` asks the model itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import numbers
import os
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.overrides import has_torch_function

from .checks import not_differentiable, require_graph
from .outputs import model_errors, read_scores
from .target_ops import TargetOperator

__all__ = [
    "AUTO_ROWS",
    "AUTO_ROWS_MAX",
    "AUTO_ROWS_MIN",
    "CPU_ELEMENTS_PER_CALL",
    "PASS_KINDS",
    "SEED_EYE_MAX",
    "AutoRows",
    "BatchSize",
    "Piece",
    "RowsChoice",
    "RowsPerCall",
    "activation_elements",
    "auto_rows",
    "call_facts",
    "call_plan",
    "check_batch_size",
    "choose_rows",
    "chunks",
    "flat_calls",
    "forget_model",
    "forward_selected",
    "forget_rows",
    "grad_of_selected",
    "grad_selected",
    "known_rows",
    "map_chunks",
    "measure_clock",
    "measuring_seconds",
    "model_facts",
    "one_hot_seed",
    "output_width",
    "resolve_batch_size",
    "rows",
    "run_blocks",
    "seeded_grad",
    "select_output",
    "structure_id",
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


# moved by forget_rows / forget_model: every method's remembered last plan (RowsPerCall) is dropped
_plan_epoch = [0]

#: a piece of a model call: (run, its samples, its rows within the call)
Piece = tuple[int, slice, slice]


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


# ----------------------------------------------------------------------------- model structure
# A cached fact of a model (activations per row, output width, the measured rows per call, a method call's
# plan) depends on its structure: which submodules it holds and the shape, dtype and device
# of every parameter. Walking all of them on every call cost more than a cheap model's own forward and
# backward (measured on a 2-core CPU: 40-60 us for a 30-64-64-2 MLP whose 8-row saliency pass takes
# ~180 us; 0.2-0.4 ms for a small ResNet; twice per call), so the walk runs only when the structure may
# have changed: a global counter moves whenever any module registers a submodule or a parameter (torch's
# global registration hooks: attribute assignment, ``add_module``, ``register_parameter``, a container's
# ``append``/``extend``/``__setitem__``), and each call compares the dtype and device of the model's
# first parameter (``.to()``, ``.half()``, ``.cuda()`` move every parameter without registering one).
# Changes that bypass registration (``del model.fc``, ``ModuleList.insert``, ``param.data =`` a tensor of
# another shape, moving part of a model) are seen after :func:`forget_model` (and a target found out of
# range is always checked against a fresh probe before the error).
_ticks = itertools.count(1)
_structure_version = [0]  # [the last tick]: a list, so the hook writes it without a global statement
_registration_hooks: list[Any] = []
# per model: (structure version, weakref to the first parameter or None, its dtype and device, the full
# structure, that structure's id)
_fingerprints: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_structure_ids = itertools.count()


def _structure_changed(*_args: Any) -> None:
    """Global registration hook: a module somewhere registered a submodule or parameter (returns None:
    the registration goes on unchanged)."""
    _structure_version[0] = next(_ticks)


def _install_registration_hooks() -> bool:
    """Install :func:`_structure_changed` as torch's global module and parameter registration hook (once
    per process); False where this torch has no such hooks (then every call walks the structure)."""
    if not _registration_hooks:
        mod = torch.nn.modules.module
        register_module = getattr(mod, "register_module_module_registration_hook", None)
        register_param = getattr(mod, "register_module_parameter_registration_hook", None)
        if register_module is None or register_param is None:
            return False
        _registration_hooks.extend((register_module(_structure_changed), register_param(_structure_changed)))
    return True


def _walk_structure(model: nn.Module) -> tuple:
    """The identity of every submodule and the shape, dtype and device of every parameter, in order."""
    mods = list(model.modules())
    return (
        tuple(map(id, mods)),
        tuple((tuple(p.shape), p.dtype, p.device) for m in mods for p in m._parameters.values() if p is not None),
    )


def structure_id(model: nn.Module, *, walk: bool = False) -> int:
    """A small int naming ``model``'s current structure (see the comment above): the same while no
    submodule or parameter is registered anywhere and the first parameter keeps its dtype and device;
    after a change, the same id again only if the walked structure is unchanged. Costs a dict lookup when
    nothing changed; ``walk`` walks the structure whatever the counter says."""
    hooked = bool(_registration_hooks) or _install_registration_hooks()
    version = _structure_version[0]
    entry = _fingerprints.get(model)
    if entry is not None and hooked and not walk and entry[0] == version:
        p_ref, dtype, device = entry[1], entry[2], entry[3]
        p = p_ref() if p_ref is not None else None
        if p_ref is None or (p is not None and p.dtype == dtype and p.device == device):
            return entry[5]
    structure = _walk_structure(model)
    sid = entry[5] if entry is not None and entry[4] == structure else next(_structure_ids)
    first = next(model.parameters(), None)
    _fingerprints[model] = (
        version,
        None if first is None else weakref.ref(first),
        None if first is None else first.dtype,
        None if first is None else first.device,
        structure,
        sid,
    )
    return sid


def forget_model(model: nn.Module) -> None:
    """Forget everything cached about ``model`` (its structure, probe facts and measured rows per call):
    after a change that bypasses module registration (see the comment above :func:`structure_id`)."""
    _fingerprints.pop(model, None)
    _activation_cache.pop(model, None)
    _plan_epoch[0] += 1  # the methods' remembered plans (RowsPerCall._resolve_call) go too


def _model_key(model: nn.Module, inputs: Tensor, *, walk: bool = False) -> tuple:
    """What a cached fact of ``model`` depends on: its structure (:func:`structure_id`: submodules,
    parameter shapes, dtypes and devices) and the row shape, dtype and device of ``inputs``."""
    return (structure_id(model, walk=walk), tuple(inputs.shape[1:]), inputs.dtype, inputs.device)


def model_facts(model: nn.Module, inputs: Tensor, *, refresh: bool = False) -> tuple[int, int | None]:
    """:func:`_probe` of ``inputs[:1]``, cached per model, module structure (:func:`structure_id`: the
    identity of every submodule and the shape, dtype and device of every parameter; a replaced head is a
    new module with new shapes) and row shape, dtype and device: one probe forward per model and input
    kind, not one per call. ``refresh`` walks the structure and probes again (a freed module's id can be
    reused by its replacement; a change may bypass module registration)."""
    key = _model_key(model, inputs, walk=refresh)
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
    """Whether ``"auto"`` rows come from the model (an ``nn.Module`` and a non-empty tensor batch)."""
    return isinstance(inputs, Tensor) and inputs.ndim > 0 and inputs.shape[0] > 0 and isinstance(model, nn.Module)


def _rule_rows(inputs: Tensor, facts: tuple[int, int | None]) -> int:
    """The activation-count rule: the rows per call without measurement (see the module docstring)."""
    if inputs.device.type != "cpu":
        return AUTO_ROWS_MAX
    return int(min(AUTO_ROWS_MAX, max(AUTO_ROWS_MIN, CPU_ELEMENTS_PER_CALL // facts[0])))


#: the kinds of pass a call makes, each measured on its own: ``"forward"`` (no grad: black-box methods,
#: metrics), ``"grad"`` (a forward and the input-gradient backward: gradient and path methods),
#: ``"double"`` (a backward with ``create_graph`` differentiated again: penalties, Hessians).
PASS_KINDS = ("forward", "grad", "double")
# activations held per row, relative to a forward: a backward keeps the forward's and adds its own
_KIND_MEMORY = {"forward": 1, "grad": 2, "double": 4}
_KIND_WORDS = {"forward": "forward", "grad": "forward+backward", "double": "double backward"}


@dataclasses.dataclass
class AutoRows:
    """How ``batch_size="auto"`` measures (one module-level instance, :data:`AUTO_ROWS`; change it with
    :func:`auto_rows`).

    Attributes:
        measure: time candidate rows per call (True) or take the activation-count rule as is (False: no
            timed calls; the environment variable ``EXPLAIN_CALLBACKS_AUTO_ROWS=rule`` sets it at import).
        clock: the timer (seconds); tests inject one that counts what the model did. None (default):
            :func:`measure_clock`, the calling thread's CPU time for CPU passes on one torch thread
            (immune to the other processes of a busy machine), else wall time.
        repeats: timed calls per candidate; the fastest counts (the first also warms the size up; one
            untimed call precedes them all).
        budget_s: a candidate is timed only while the timed calls so far plus its likely cost (at the
            best rate so far) stay within this many seconds (the first candidate is always timed).
        tolerance: the search goes on past a candidate while it is at most this much slower per row
            than the best so far, and the largest candidate within it of the fastest is kept (timings on
            a busy machine are noisy; fewer calls cost less outside the model).
        min_gain: the search also stops at a candidate that is not at least this much faster per row
            than the one before it (0: no such stop): each further candidate costs twice the rows to time
            for a smaller gain (on a CPU the time per row flattens after a few dozen rows: a small ResNet
            measured 2.18, 2.10, 2.00, 2.42 ms per row at 18, 36, 72, 144 rows, and timing them all cost
            1.3 s, 300 times the one-sample explanation that asked). On a GPU the gains of doubling are
            large and the search goes on.
        rows_max: the largest candidate.
        elements_max: the memory bound: activation elements per call (the leaf modules' outputs, times
            2 for forward+backward, 4 for double backward) no candidate exceeds; 2**27 float32 elements
            are 512 MiB. On a GPU also at most a quarter of the free memory.
    """

    measure: bool = os.environ.get("EXPLAIN_CALLBACKS_AUTO_ROWS", "measure") != "rule"
    clock: Callable[[], float] | None = None
    repeats: int = 2
    budget_s: float = 1.0
    tolerance: float = 0.05
    min_gain: float = 0.02
    rows_max: int = 1024
    elements_max: int = 1 << 27


#: the settings of ``batch_size="auto"`` (see :class:`AutoRows`).
AUTO_ROWS = AutoRows()


@contextlib.contextmanager
def auto_rows(**settings: Any) -> Iterator[AutoRows]:
    """Within the block, ``batch_size="auto"`` runs with the :class:`AutoRows` fields given (e.g.
    ``auto_rows(measure=False)`` for the rule alone, ``auto_rows(clock=fake)`` in tests); choices made
    before or inside the block are forgotten on entry and exit, so each side measures afresh."""
    unknown = set(settings) - {f.name for f in dataclasses.fields(AutoRows)}
    if unknown:
        raise TypeError(f"auto_rows() got unknown settings {sorted(unknown)}; see AutoRows.")
    before = dataclasses.replace(AUTO_ROWS)
    forget_rows()
    for k, v in settings.items():
        setattr(AUTO_ROWS, k, v)
    try:
        yield AUTO_ROWS
    finally:
        for f in dataclasses.fields(AutoRows):
            setattr(AUTO_ROWS, f.name, getattr(before, f.name))
        forget_rows()


def forget_rows() -> None:
    """Forget every measured rows-per-call choice (the next ``"auto"`` call measures again)."""
    for per_model in list(_activation_cache.values()):
        for key in [k for k in per_model if k[0] in ("rows", "plan")]:
            del per_model[key]
    _plan_epoch[0] += 1


@dataclasses.dataclass(frozen=True)
class RowsChoice:
    """Rows per call and why: ``how`` is ``"fixed"`` (an int or None given), ``"measured"``, ``"rule"``
    (measurement off, a single candidate, or it failed: ``reason``) or ``"default"`` (not an
    ``nn.Module``: :data:`AUTO_ROWS_MAX`); ``timings`` holds (rows, seconds per row) per candidate timed."""

    rows: int | None
    how: str
    kind: str = "forward"
    timings: tuple[tuple[int, float], ...] = ()
    reason: str = ""

    def describe(self) -> str:
        """E.g. ``"auto -> 128 rows/call (forward+backward measured: 64: 3.1 ms/row, 128: 2.4 ms/row)"``."""
        if self.how == "fixed":
            return repr(self.rows)
        head = f"auto -> {self.rows} rows/call"
        if self.how == "measured":
            cells = ", ".join(f"{r}: {_ms(t)}/row" for r, t in sorted(self.timings))
            return f"{head} ({_KIND_WORDS[self.kind]} measured: {cells})"
        return f"{head} ({self.reason})" if self.reason else head


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms >= 0.01 else f"{seconds * 1e6:.3g} us"


def _candidates(start: int, upper: int) -> tuple[list[int], list[int]]:
    """(``start`` and its doublings up to ``upper``, its halvings down to :data:`AUTO_ROWS_MIN`)."""
    up, r = [], min(start, upper)
    while r <= upper:
        up.append(r)
        r *= 2
    down, r = [], up[0] // 2
    while r >= AUTO_ROWS_MIN:
        down.append(r)
        r //= 2
    return up, down


def _upper_rows(facts: tuple[int, int | None], inputs: Tensor, kind: str) -> int:
    """The largest candidate: :attr:`AutoRows.rows_max` within the memory bound."""
    per_row = facts[0] * _KIND_MEMORY[kind]
    budget = AUTO_ROWS.elements_max
    if inputs.device.type == "cuda":
        with contextlib.suppress(Exception):  # free memory unknown: the element bound alone
            free, _total = torch.cuda.mem_get_info(inputs.device)
            budget = min(budget, free // (4 * inputs.element_size()))
    return int(max(1, min(AUTO_ROWS.rows_max, budget // max(per_row, 1))))


def _one_pass(model: nn.Module, x: Tensor, kind: str) -> None:
    """One call of the kind measured: a forward without grad; a forward and the input-gradient backward;
    or that backward with ``create_graph`` differentiated again. Gradients only w.r.t. ``x``."""
    if kind == "forward":
        with torch.no_grad():
            model(x)
        return
    x = x.detach().requires_grad_(True)
    with twice_differentiable(kind == "double"):
        y = read_scores(model(x))
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=kind == "double", allow_unused=True)
        if g is None:
            raise not_differentiable()
        if kind == "double" and g.requires_grad:
            torch.autograd.grad(g.square().sum(), x, allow_unused=True)


def measure_clock(device: torch.device) -> Callable[[], float]:
    """The timer of the measured rows per call (unless :attr:`AutoRows.clock` names one): on the CPU with
    one torch thread every pass runs on the calling thread, so its CPU time is the pass's cost, whatever
    else the machine runs (on 2 shared cores a wall clock measured 4.5 ms per ResNet row where the pass
    cost 1 ms, and picked a size by another process's noise); otherwise wall time, which counts what
    several threads or a GPU gain from larger calls."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(model: nn.Module, inputs: Tensor, kind: str, start: int, upper: int) -> RowsChoice:
    """Time candidate rows per call for ``model`` on rows like ``inputs`` (the batch repeated to the
    candidate's size), from ``start`` up while larger calls are not slower (then down from ``start``
    when doubling did not help), within :attr:`AutoRows.budget_s`; keep the fastest per row.

    The model is left as found: every module in eval mode for the timed calls (no BatchNorm statistics
    move, no dropout) and restored module by module; gradients w.r.t. the input only (``.grad`` of the
    parameters untouched); the global CPU (and the input's CUDA) RNG forked; grad enabled and inference
    mode off inside, whatever the caller's context."""
    cfg = AUTO_ROWS
    up, down = _candidates(start, upper)
    x0 = inputs.detach()
    modes = [(m, m.training) for m in model.modules()]
    cuda = (
        [inputs.device.index if inputs.device.index is not None else torch.cuda.current_device()]
        if inputs.device.type == "cuda"
        else []
    )
    per_row: dict[int, float] = {}
    spent = 0.0
    clock = cfg.clock or measure_clock(inputs.device)

    def time_rows(r: int) -> float:
        nonlocal spent
        reps = -(-r // x0.shape[0])
        x = (x0.repeat(reps, *([1] * (x0.ndim - 1))) if reps > 1 else x0)[:r].clone()
        best = float("inf")
        for _ in range(max(1, cfg.repeats)):
            _sync(x.device)
            t = clock()
            _one_pass(model, x, kind)
            _sync(x.device)
            dt = max(clock() - t, 0.0)
            spent += dt
            best = min(best, dt / r)
        per_row[r] = best
        return best

    def walk(sizes: list[int], prev: float) -> bool:
        """Time ``sizes`` in order while each is within tolerance of the best and gains at least
        ``min_gain`` per row on the one before (``prev``: the per-row time of the candidate the walk starts
        from); True if one was better."""
        improved = False
        for r in sizes:
            # its likely cost at the best rate so far: a candidate that would overrun the budget is not timed
            if spent + min(per_row.values()) * r * max(1, cfg.repeats) > cfg.budget_s:
                break
            t = time_rows(r)
            best = min(per_row.values())
            improved |= t == best
            if t > best * (1 + cfg.tolerance) or (cfg.min_gain > 0 and t > prev * (1 - cfg.min_gain)):
                break
            prev = t
        return improved

    try:
        model.eval()
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.random.fork_rng(devices=cuda),
        ):
            x0 = x0.clone()  # a normal tensor (inference-mode inputs cannot enter a graph)
            # one untimed call first: the first pass of a kind pays one-time costs (allocator, kernel
            # setup), measured here at 1.5-2.5x a later call of the same size
            _one_pass(model, x0[: up[0]] if x0.shape[0] >= up[0] else x0, kind)
            first = time_rows(up[0])
            if not walk(up[1:], first):
                walk(down, first)
    finally:
        for m, mode in modes:
            m.training = mode
    # the largest candidate within the tolerance of the fastest: on a busy machine the per-row times of
    # neighbours differ by noise, and fewer, larger calls cost less outside the model
    best = min(per_row.values())
    rows_ = max(r for r, t in per_row.items() if t <= best * (1 + cfg.tolerance))
    return RowsChoice(rows_, "measured", kind, tuple(per_row.items()))


def choose_rows(
    batch_size: BatchSize,
    model: object,
    inputs: Tensor,
    facts: tuple[int, int | None] | None = None,
    kind: str = "forward",
) -> RowsChoice:
    """The rows per call for ``inputs`` (B, ...) through ``model`` and why: ints and None as given;
    ``"auto"`` measured on the first use per model, structure, row shape, dtype, device and ``kind``
    of pass (:data:`PASS_KINDS`), then cached on the model (weakly: a freed model frees its entry).
    ``facts``: :func:`model_facts` of this model and input when the caller has them already
    (:func:`call_facts`)."""
    check_batch_size(batch_size)
    if kind not in PASS_KINDS:
        raise ValueError(f"kind must be one of {PASS_KINDS}, got {kind!r}.")
    if batch_size != "auto":
        return RowsChoice(batch_size, "fixed", kind)  # type: ignore[arg-type]
    if not _auto_probes(model, inputs):  # the caller's input checks name a bad input
        return RowsChoice(AUTO_ROWS_MAX, "default", kind, reason="not an nn.Module: the default")
    try:
        key = ("rows", kind, *_model_key(model, inputs))  # type: ignore[arg-type]
        per_model = _activation_cache.setdefault(model, {})  # type: ignore[arg-type]
        if key in per_model:
            return per_model[key]
        if facts is None:
            facts = model_facts(model, inputs)  # type: ignore[arg-type]
    except Exception:  # the probe is an estimate: the method's own call raises the model's error, if any
        return RowsChoice(AUTO_ROWS_MAX, "default", kind, reason="the probe failed: the default")
    start = _rule_rows(inputs, facts)
    upper = _upper_rows(facts, inputs, kind)
    if not AUTO_ROWS.measure:
        choice = RowsChoice(min(start, upper), "rule", kind, reason="activation rule, measurement off")
    elif _candidates(start, upper) == ([min(start, upper)], []):
        choice = RowsChoice(min(start, upper), "rule", kind, reason="the only candidate within the memory bound")
    else:
        began = time.perf_counter()
        try:
            choice = _measure(model, inputs, kind, start, upper)  # type: ignore[arg-type]
        except Exception as e:  # e.g. out of memory, an output that is not scores: the rule's choice
            choice = RowsChoice(min(start, upper), "rule", kind, reason=f"activation rule; measuring failed: {e}")
        finally:
            _MEASURING[0] += time.perf_counter() - began
    per_model[key] = choice
    return choice


_MEASURING = [0.0]  # wall seconds spent timing candidate rows per call, in this process


def measuring_seconds() -> float:
    """Wall seconds this process has spent measuring rows per call (``batch_size="auto"``): callers that
    report what a method cost subtract the difference over the call, since the measurement happens once."""
    return _MEASURING[0]


def known_rows(batch_size: BatchSize, model: object, inputs: Tensor, kind: str = "forward") -> RowsChoice | None:
    """What :func:`choose_rows` gave for this model, input kind and ``kind`` of pass, if it is known
    without a model call (a fixed setting, or an ``"auto"`` choice in the cache); None otherwise."""
    if batch_size != "auto":
        return RowsChoice(batch_size, "fixed", kind)  # type: ignore[arg-type]
    if not _auto_probes(model, inputs):
        return None
    try:
        per_model = _activation_cache.get(model, {})  # type: ignore[arg-type]
        return per_model.get(("rows", kind, *_model_key(model, inputs)))  # type: ignore[arg-type]
    except Exception:
        return None


def resolve_batch_size(
    batch_size: BatchSize,
    model: object,
    inputs: Tensor,
    facts: tuple[int, int | None] | None = None,
    kind: str = "forward",
) -> int | None:
    """The rows per call for ``inputs`` (B, ...) through ``model``: ints and None as given; ``"auto"``
    chosen by :func:`choose_rows` for the ``kind`` of pass the caller makes (:data:`PASS_KINDS`)."""
    return choose_rows(batch_size, model, inputs, facts, kind).rows


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


def call_plan(
    model: object, inputs: Tensor, batch_size: BatchSize, check_width: bool, kind: str = "forward"
) -> tuple[tuple[int, int | None] | None, RowsChoice]:
    """(:func:`call_facts`, :func:`choose_rows`) of a method call, remembered per model, structure, row
    shape, dtype, device, setting and kind of pass: a repeated call (a monitor's every epoch, a metric
    re-running the method, a user's loop) makes one lookup instead of two, each with its own key (on a
    cheap model each lookup showed: a tabular MLP's 8-row pass takes ~0.2 ms). Plans whose probe or
    measurement failed are not kept (the next call tries again, as without a plan)."""
    key = None
    if isinstance(model, nn.Module) and _auto_probes(model, inputs):
        try:
            key = ("plan", kind, check_width, batch_size, *_model_key(model, inputs))
            plan = _activation_cache.get(model, {}).get(key)
        except Exception:  # an unhashable setting: no plan, each piece looked up
            key = plan = None
        if plan is not None:
            return plan
    facts = call_facts(model, inputs, batch_size, check_width)
    choice = choose_rows(batch_size, model, inputs, facts, kind)
    if key is not None and _keeps_plan(facts, choice, batch_size, check_width):
        _activation_cache.setdefault(model, {})[key] = (facts, choice)  # type: ignore[arg-type]
    return facts, choice


def _keeps_plan(
    facts: tuple[int, int | None] | None, choice: RowsChoice, batch_size: BatchSize, check_width: bool
) -> bool:
    """Whether a call plan is remembered: not when its probe or measurement failed (the next call tries
    again, as without a plan)."""
    return (facts is not None or not (check_width or batch_size == "auto")) and choice.how != "default"


def _plan_memo_key(model: object, inputs: Tensor, check_width: bool, kind: str) -> tuple | None:
    """What a method's remembered last plan (:meth:`RowsPerCall._resolve_call`) holds for: the cache epoch
    (:func:`forget_rows`, :func:`forget_model`), the model and its structure (:func:`structure_id`, unique
    per model), the row shape, dtype and device, whether the width is checked, the kind of pass. None
    where :func:`call_plan` keeps no plan either."""
    if not (isinstance(model, nn.Module) and isinstance(inputs, Tensor) and inputs.ndim and inputs.shape[0]):
        return None  # what _auto_probes refuses
    return (_plan_epoch[0], structure_id(model), inputs.shape[1:], inputs.dtype, inputs.device, check_width, kind)


_NO_CONTEXT = contextlib.nullcontext()  # reusable: the context of calls that need none
_UNRESOLVED = object()  # a batch_size setting not yet resolved against a model and input


class RowsPerCall:
    """Mixin for methods with a ``batch_size`` setting: the attribute reads as the setting resolved
    by :meth:`_resolve_rows` for the current (last) call's model and input, so method code sees an
    int or None, never ``"auto"``; assigning it sets (and validates) the setting. ``rows_choice`` holds
    the last call's :class:`RowsChoice` (what was chosen and why; shown in the method's ``repr``)."""

    _batch_size: BatchSize = "auto"
    _rows: int | object | None = _UNRESOLVED
    _rows_choice: RowsChoice | None = None
    _plan_memo: tuple | None = None  # (key, (facts, choice)) of the last call (see _resolve_call)

    @property
    def rows_choice(self) -> RowsChoice | None:
        """The last call's :class:`RowsChoice` (None before a call or after ``batch_size`` changed)."""
        return self._rows_choice

    @property
    def batch_size(self) -> int | None:
        return self._rows if self._rows is not _UNRESOLVED else rows(self._batch_size)

    @batch_size.setter
    def batch_size(self, value: BatchSize) -> None:
        self._batch_size = check_batch_size(value)
        self._rows = _UNRESOLVED
        self._rows_choice = None
        self._plan_memo = None

    def _resolve_rows(
        self, model: object, inputs: Tensor, facts: tuple[int, int | None] | None = None, kind: str = "forward"
    ) -> None:
        self._rows_choice = choose_rows(self._batch_size, model, inputs, facts, kind)
        self._rows = self._rows_choice.rows

    def _resolve_call(
        self, model: object, inputs: Tensor, check_width: bool, kind: str = "forward"
    ) -> tuple[int, int | None] | None:
        """:func:`call_facts` and :meth:`_resolve_rows` in one remembered lookup (:func:`call_plan`);
        returns the facts. The last call's plan is kept on the method too, so that calls repeated with the
        same model and kind of input (a monitor's probe set every epoch, a user's loop) compare one key
        instead of hashing two (measured on a 2-core CPU: ~10 us of a tabular MLP's ~170 us call)."""
        key = _plan_memo_key(model, inputs, check_width, kind)
        memo = self._plan_memo
        if key is not None and memo is not None and memo[0] == key:
            facts, self._rows_choice = memo[1]
        else:
            facts, self._rows_choice = call_plan(model, inputs, self._batch_size, check_width, kind)
            if key is not None and _keeps_plan(facts, self._rows_choice, self._batch_size, check_width):
                self._plan_memo = (key, (facts, self._rows_choice))
        self._rows = self._rows_choice.rows
        return facts

    def _batch_size_repr(self) -> Any:
        """What ``repr`` shows for ``batch_size``: the setting, and after an ``"auto"`` call the choice
        and its timings (``batch_size=auto -> 128 rows/call (forward+backward measured: ...)``)."""
        choice = self._rows_choice
        if self._batch_size != "auto" or choice is None:
            return self._batch_size
        return _Shown(choice.describe())


class _Shown(str):
    """A string that ``repr`` shows as is (not quoted)."""

    def __repr__(self) -> str:
        return str(self)


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
    if out.ndim == 2 and target is not None:  # (N, K) scores: one gather (the common case, kept short)
        try:
            return out.gather(1, target.view(-1, 1)).view(-1)
        except RuntimeError:  # a target the cached output width let through (see structure_id): say so
            from .targets import check_target  # targets imports this module

            check_target(target, out.shape[1], out.shape[0])
            raise
    if out.ndim == 1:
        return out
    if target is None:
        if out.shape[1] == 1:
            return out[:, 0].reshape(out.shape[0], -1).sum(1)
        raise ValueError(
            f"The model returns {out.shape[1]} outputs per sample but no target was given; "
            "pass target=<class indices of shape (B,)> or use a target policy ('label', 'prediction')."
        )
    try:
        sel = out.gather(1, target.view(-1, *([1] * (out.ndim - 1))).expand(-1, 1, *out.shape[2:]))
    except RuntimeError:  # a target the cached output width let through (see structure_id): say so
        from .targets import check_target

        check_target(target, out.shape[1], out.shape[0])
        raise
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


#: output widths up to which the backward's one-hot seeds are rows of a cached identity matrix (one
#: ``index_select`` per call; 256 classes: 256 KiB per dtype and device); wider outputs build theirs
#: with ``zeros_like`` + ``scatter_`` (their passes dwarf both)
SEED_EYE_MAX = 256
_seed_eyes: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def one_hot_seed(out: Tensor, target: Tensor) -> Tensor:
    """The one-hot rows ``seed[n, target[n]] = 1`` shaped like the (N, K) scores ``out``: rows of a cached
    K x K identity (:data:`SEED_EYE_MAX`), one ``index_select`` instead of a new zero tensor and a scatter
    per call (measured on a 2-core CPU: 2-3 us against 5-13 us, a few percent of a tabular MLP's 8-row
    pass). Both index ops check the bounds on the CPU (an IndexError / RuntimeError for a target outside
    [0, K)); on other devices the entry points check the range first."""
    k = out.shape[1]
    if k > SEED_EYE_MAX:
        return torch.zeros_like(out).scatter_(1, target.view(-1, 1), 1.0)
    key = (k, out.dtype, out.device)
    eye = _seed_eyes.get(key)
    if eye is None:
        if len(_seed_eyes) > 32:  # many dtypes / devices / widths seen: start afresh
            _seed_eyes.clear()
        with torch.inference_mode(False), torch.no_grad():
            eye = _seed_eyes[key] = torch.eye(k, dtype=out.dtype, device=out.device)
    return eye.index_select(0, target)


_UNCHECKED = object()
_engine: Any = _UNCHECKED  # torch's backward entry point without autograd.grad's argument handling


def _checked_engine() -> Callable[..., tuple[Tensor | None, ...]] | None:
    """``torch.autograd.graph._engine_run_backward`` (what ``torch.autograd.grad`` calls after it has
    normalised its arguments: logging hooks and the context for compiled autograd included), if this torch
    has it and it differentiates a test graph as ``autograd.grad`` does; None otherwise (the backward then
    goes through ``torch.autograd.grad``). Checked once per process: the function is internal to torch."""
    global _engine
    if _engine is _UNCHECKED:
        fn = getattr(torch.autograd.graph, "_engine_run_backward", None)
        ok = False
        if fn is not None:
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    a = torch.tensor([1.0, 2.0], requires_grad=True)
                    seed = torch.tensor([1.0, 0.5])
                    (g,) = fn((a * a,), (seed,), False, False, (a,), True, accumulate_grad=False)
                ok = isinstance(g, Tensor) and g.tolist() == [2.0, 2.0] and a.grad is None
            except Exception:
                ok = False
        _engine = fn if ok else None
    return _engine


def seeded_grad(out: Tensor, wrt: Tensor, seed: Tensor, *, create_graph: bool = False) -> Tensor | None:
    """``torch.autograd.grad(out, wrt, grad_outputs=seed, create_graph=create_graph, allow_unused=True)[0]``.

    Where no ``__torch_function__`` override or mode is active (autograd.grad would hand those the call),
    the engine is called directly (:func:`_checked_engine`), without ``autograd.grad``'s argument
    normalisation and ``grad_outputs`` shape checks (``seed`` is built from ``out``'s shape here): measured
    on a 2-core CPU, 10-20 us less per call, 5-10 % of a tabular MLP's 8-row pass and backward. Same
    values (the same engine call)."""
    engine = None if has_torch_function((out, wrt)) else _engine if _engine is not _UNCHECKED else _checked_engine()
    if engine is None:
        (g,) = torch.autograd.grad(out, wrt, grad_outputs=seed, create_graph=create_graph, allow_unused=True)
        return g
    return engine((out,), (seed,), create_graph, create_graph, (wrt,), True, accumulate_grad=False)[0]


def grad_of_selected(
    out: Any,
    target: Tensor | TargetOperator | None,
    wrt: Tensor,
    *,
    create_graph: bool = False,
    return_selected: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(∂ Σ_n s_n / ∂ ``wrt``, s or None) for the selected outputs s = :func:`select_output` (``out``,
    ``target``) of a model call: None for a gradient when the selected outputs do not depend on ``wrt``.

    For (N, K) scores and class indices the backward starts at the scores with a one-hot seed
    (:func:`one_hot_seed`, as ``grad_outputs``; :func:`seeded_grad`) instead of going through gather and
    sum nodes: measured on a 2-core CPU, the one-hot seed costs what a bare ``out[:, c].sum()`` backward
    costs, the gather 4-11 % more on a small MLP and an LSTM. ``s`` is then read without a graph unless
    ``create_graph``. A target outside [0, K) raises the error of
    :func:`~explain_callbacks._internal.targets.check_target` (the seed's index op checks the bounds); an
    output outside the autograd graph raises :func:`~explain_callbacks._internal.checks.not_differentiable`."""
    if isinstance(out, Tensor) and out.ndim == 2 and isinstance(target, Tensor):
        try:
            seed = one_hot_seed(out, target)
        except (IndexError, RuntimeError):  # a target outside [0, K): the error that names the fix
            from .targets import check_target  # targets imports this module

            check_target(target, out.shape[1], out.shape[0])
            raise
        require_graph(out)
        g = seeded_grad(out, wrt, seed, create_graph=create_graph)
        if not return_selected:
            return g, None
        return g, (out if create_graph else out.detach()).gather(1, target.view(-1, 1)).view(-1)
    y = select_output(out, target)
    require_graph(y)
    (g,) = torch.autograd.grad(y.sum(), wrt, create_graph=create_graph, allow_unused=True)
    return g, (y if return_selected else None)


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

    A call of one chunk makes no copy of the rows or the gradient (no slice, no concatenation): on a
    cheap model (a tabular MLP's 8-row pass takes ~0.2 ms) each extra tensor op is a few percent.
    """
    n = x.shape[0]
    step = max(rows(batch_size) or n, 1)
    if step >= n and not (create_graph or return_outputs):  # one call, the common case: the loop's steps inline
        xc = x if x.requires_grad else x.detach().requires_grad_(True)
        g, _ = grad_of_selected(model(xc), _expand_target(target, n), xc)
        if g is None:  # the output depends on the parameters only (no_grad/detach on the input path)
            raise not_differentiable()
        return g
    target = _expand_target(target, n)
    grads, outs = [], []
    with twice_differentiable(create_graph) if create_graph else _NO_CONTEXT:
        for start in range(0, n, step):
            whole = start == 0 and step >= n
            xc = x if whole else x[start : start + step]
            if not xc.requires_grad:
                xc = xc.detach().requires_grad_(True)
            tc = None if target is None else (target if whole else target[start : start + step])
            g, y = grad_of_selected(model(xc), tc, xc, create_graph=create_graph, return_selected=return_outputs)
            if g is None:  # the output depends on the parameters only (no_grad/detach on the input path)
                raise not_differentiable()
            grads.append(g)
            if return_outputs:
                outs.append(y if create_graph else y.detach())
    g = (grads[0] if len(grads) == 1 else torch.cat(grads)) if grads else torch.zeros_like(x)
    if return_outputs:
        return g, (outs[0] if len(outs) == 1 else torch.cat(outs))
    return g


def flat_calls(n_runs: int, batch: int, batch_size: BatchSize) -> Iterator[tuple[slice, list[Piece]]]:
    """Model calls over the ``n_runs * batch`` rows of perturbed copies in run-major order (row k is run
    k // batch of sample k % batch), ``batch_size`` rows per call whatever the run boundaries (every
    call as large as the chunk, not a whole number of runs). Yields, per call, its rows and its pieces
    ``(run, samples, rows within the call)``: a call holds the end of one run and the start of the next.
    """
    n_rows = n_runs * batch
    per_call = min(rows(batch_size) or n_rows, n_rows)
    for start in range(0, n_rows, per_call):
        stop = min(start + per_call, n_rows)
        pieces, k = [], start
        while k < stop:
            r, s = divmod(k, batch)
            e = min(stop, (r + 1) * batch)
            pieces.append((r, slice(s, s + e - k), slice(k - start, e - start)))
            k = e
        yield slice(start, stop), pieces


def run_blocks(pieces: list[Piece], batch: int) -> list[tuple[int, int, slice, slice]]:
    """A call's pieces (:func:`flat_calls`) merged into blocks ``(first run, stop run, samples, rows within
    the call)``: consecutive whole runs (every sample of the run) form one block, so a method builds and
    reduces a call's rows with a few broadcast ops per block instead of a few per run (16 path points of
    an 8-row batch in one call: 3 blocks at most, not 16 pieces). A block of runs ``r0..r1`` over samples
    ``s`` holds rows ``(r1 - r0) x len(s)``, run-major."""
    blocks: list[tuple[int, int, slice, slice]] = []
    for r, s, at in pieces:
        whole = s.start == 0 and s.stop == batch
        if whole and blocks:
            r0, r1, s0, at0 = blocks[-1]
            if r1 == r and s0.start == 0 and s0.stop == batch and at0.stop == at.start:
                blocks[-1] = (r0, r + 1, s0, slice(at0.start, at.stop))
                continue
        blocks.append((r, r + 1, s, at))
    return blocks


def map_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: BatchSize) -> Tensor:
    """Apply ``fn`` to row chunks of ``x`` and concatenate."""
    return torch.cat([fn(x[sl]) for sl in chunks(x.shape[0], batch_size)])
