"""Shared plumbing of the metrics: feature grouping, substrates, chunked scoring, row blocks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks, flat_calls, rows, select_output
from ..._internal.checks import all_finite, check_inputs
from ..._internal.layout import check_channels_first, reads_channels_first
from ..._internal.ops import descending_order
from ..._internal.outputs import read_scores
from ..._internal.target_ops import MultiTarget, TargetOperator
from ..._internal.targets import as_target_tensor, check_model_target, check_target
from ...attribution.base import Attributor, make_generator

__all__ = [
    "FEATURES",
    "OUTPUTS",
    "MethodRuns",
    "RunDraws",
    "ScoreRows",
    "Substrate",
    "Target",
    "broadcast_map",
    "check_finite_map",
    "check_masks",
    "expand_feature_mask",
    "feature_relevance",
    "flat_call_scores",
    "flat_calls",
    "is_layout_substrate",
    "make_substrate",
    "method_grad",
    "method_inputs",
    "output_scores",
    "prepare_target",
    "rank_features",
    "row_blocks",
    "score_outputs",
    "scores_chunked",
    "steps_last",
    "tile_rows",
    "transposed_sequence",
    "validate",
]

Substrate = Union[str, float, Tensor]
#: what a metric takes as the explained output: class indices (B,), one class for all, None (one output), or
#: a target operator (a region, a position, a box of a dense or multi-output model)
Target = Union[Tensor, int, Sequence[int], TargetOperator, None]
FEATURES = ("auto", "pixel", "element")
OUTPUTS = ("probability", "logit", "sigmoid")


def validate(
    inputs: Tensor, attributions: Tensor | None = None, target: Tensor | None = None, *, inputs_checked: bool = False
) -> None:
    """Check inputs, the map's shape (input-shaped, or one channel broadcast over channels) and target.
    ``inputs_checked``: :func:`prepare_target` has checked the inputs already (not again: a pass over them)."""
    if not inputs_checked:
        check_inputs(inputs)
    if attributions is not None:
        broadcast_map(attributions, inputs)
        check_finite_map(attributions)
    if target is not None and (target.ndim != 1 or target.shape[0] != inputs.shape[0]):
        raise ValueError(
            f"target must have shape ({inputs.shape[0]},) (one class index per sample) or be None for a "
            f"single-output model, got {tuple(target.shape)}."
        )


def tile_rows(t: Tensor, n: int) -> Tensor:
    """``n`` copies of ``t`` one after the other along dim 0 (``t.repeat(n, 1, ...)``): one ``cat``, whose
    dispatch costs a fraction of ``repeat``'s on small tensors (measured: 1.5 us against 9.7 us for 8 x 30)."""
    return t if n == 1 else torch.cat([t] * n)


def method_inputs(inputs: Tensor) -> Tensor:
    """``inputs`` detached, as a normal tensor: an inference tensor (made under ``torch.inference_mode``, as
    in Lightning's ``validate``/``test`` steps) is cloned, since a method cannot take gradients of it."""
    if inputs.is_inference():
        with torch.inference_mode(False):
            return inputs.detach().clone()
    return inputs.detach()


@contextlib.contextmanager
def method_grad() -> Iterator[None]:
    """Gradients on for a method re-run by an explainer metric, also under ``torch.inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class MethodRuns:
    """The runs of an attribution method inside one call of an explainer metric (randomisation's re-runs,
    the perturbed copies of sensitivity, the other labels of soundness), all on one model and inputs of
    one row shape: ``runs(model, x, target)`` gives the detached map, with gradients on.

    The first run goes through the method's public entry: it validates the inputs and the target against
    the model's output width and resolves the rows per call for this model and row shape. The later runs
    take the same model and rows the metric built from inputs it validated itself, with class indices
    it checked (or None), so those checks would only repeat: an :class:`Attributor` that does not
    override its entry (``__call__``, ``_call``, ``_prepare``) is then run through what its ``_call`` runs
    after the checks (``last_info`` reset, the ``smoothed`` context, :meth:`Attributor.attribute`), with
    the rows per call the first run resolved (they depend on the row shape, which does not change). On a
    cheap model the checks cost as much as a third of the method's own passes, and after randomisation
    swaps a layer's weights, the model's structure is walked again on every checked run. Any other method
    (a function, a Captum adapter, a method with its own entry) and target operators go through the
    public entry every time.
    """

    def __init__(self, method: Callable[..., Tensor]) -> None:
        self.method = method
        cls = type(method)
        self._direct = (
            isinstance(method, Attributor)
            and cls.__call__ is Attributor.__call__
            and cls._call is Attributor._call
            and cls._prepare is Attributor._prepare
        )
        self._checked = False

    def __call__(self, model: Any, x: Tensor, target: Tensor | None) -> Tensor:
        with method_grad():
            if self._checked and (target is None or isinstance(target, Tensor)):
                m: Attributor = self.method  # type: ignore[assignment]
                m.last_info = {}
                with m.smoothed():
                    return m.attribute(model, x, target).detach()
            a = self.method(model, x, target).detach()
            self._checked = self._direct
            return a


def check_finite_map(attributions: Tensor) -> None:
    """Raise if a map holds NaN or Inf (one reduction first; the element test only when it is not finite)."""
    if not all_finite(attributions):
        raise ValueError(
            "attributions contain NaN or Inf, so no ordering, share or correlation of them means anything; "
            "check the method's output (the monitor skips such maps with a warning)."
        )


def prepare_target(model: object, inputs: Tensor, target: Target) -> Tensor | None:
    """The target as the attribution methods take it, checked against the model: an int (that class for
    every sample), a sequence or tensor of B class indices, or None (a single-output model). Returns a
    long tensor (B,) on the inputs' device or None; a float target, a wrong shape, or a class outside the
    model's outputs raises an error that names the fix (instead of an index error inside ``gather``)."""
    check_inputs(inputs)
    if isinstance(target, MultiTarget):
        raise TypeError(
            "The metrics score one target per sample; score each target of a MultiTarget on its own (the maps "
            "of a MultiTarget call are (B, K, ...): pass maps[:, k] with target=multi.targets[k])."
        )
    tgt = as_target_tensor(target, inputs.shape[0], inputs.device)  # type: ignore[arg-type]
    if tgt is None or isinstance(tgt, TargetOperator):
        return tgt
    if tgt.is_inference():  # made under torch.inference_mode: a method's gather could not save it for backward
        tgt = method_inputs(tgt)
    check_target(tgt, None, inputs.shape[0])  # shape and dtype first: the probe below needs neither
    if model is not None:
        check_model_target(model, tgt, inputs)  # the range, from the cached eval-mode probe of the model
    return tgt


def _one_channel_view(attributions: Tensor, inputs: Tensor) -> Tensor:
    """(B,*spatial) maps of images or volumes (B,C,*spatial) as (B,1,*spatial); other maps unchanged."""
    if (
        inputs.ndim >= 4
        and attributions.ndim == inputs.ndim - 1
        and attributions.shape[0] == inputs.shape[0]
        and attributions.shape[1:] == inputs.shape[2:]
    ):
        return attributions.unsqueeze(1)
    return attributions


def broadcast_map(attributions: Tensor, inputs: Tensor) -> Tensor:
    """The map expanded to the input's shape. Besides input-shaped maps: maps with a size-1 dim where the
    input has several that broadcast over it ((B,1,*S) Grad-CAM and mask maps of images and signals; (B,T,1)
    mask maps of (B,T,D) sequences), and (B,*S) maps of images and volumes (B,C,*S) (read as (B,1,*S))."""
    if attributions.shape == inputs.shape:
        return attributions
    a = _one_channel_view(attributions, inputs)
    ok = (
        a.ndim == inputs.ndim
        and a.shape[0] == inputs.shape[0]
        and a.ndim >= 3
        and all(s in (1, t) for s, t in zip(a.shape[1:], inputs.shape[1:]))
    )
    if not ok:
        raise ValueError(
            f"attributions of shape {tuple(attributions.shape)} do not match inputs {tuple(inputs.shape)}; "
            "metrics need input-shaped maps, maps with size-1 dims that broadcast over the input ((B,1,*spatial) "
            "over channels, (B,T,1) over the features of a sequence) or (B,*spatial) maps of images "
            "(upsample lower-resolution maps first)."
        )
    return a.expand_as(inputs)


def _resolve_features(features: str, inputs: Tensor) -> str:
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}.")
    if features == "auto":
        return "pixel" if inputs.ndim == 4 else "element"
    if features == "pixel" and inputs.ndim < 3:
        raise ValueError(
            f"features='pixel' needs (B,C,L) or (B,C,H,W) inputs, got {tuple(inputs.shape)}; use 'element'."
        )
    return features


def feature_relevance(attributions: Tensor, inputs: Tensor, features: str = "auto") -> tuple[Tensor, str]:
    """Relevance per feature, (B, n): channel-summed per position (``pixel``) or per element.

    Returns the relevance and the resolved feature mode.
    """
    mode = _resolve_features(features, inputs)
    a = _one_channel_view(attributions.detach().to(inputs.device), inputs)  # maps may live elsewhere
    b = inputs.shape[0]
    if mode == "pixel":
        full = broadcast_map(a, inputs)
        # a one-channel map is the position's relevance itself (not C times it); others are channel-summed
        a = full[:, :1] if a.ndim == inputs.ndim and a.shape[1] == 1 else full.sum(1, keepdim=True)
        return a.reshape(b, -1), mode
    return broadcast_map(a, inputs).reshape(b, -1), mode


def expand_feature_mask(mask: Tensor, inputs_shape: torch.Size | tuple[int, ...], mode: str) -> Tensor:
    """A (..., n) feature mask viewed so it broadcasts to (..., *input_shape[1:])."""
    lead = tuple(mask.shape[:-1])
    if mode == "pixel":
        return mask.view(*lead, 1, *inputs_shape[2:])
    return mask.view(*lead, *inputs_shape[1:])


TIES = ("random", "index")


def rank_features(relevance: Tensor, ties: str = "random", seed: int = 0) -> Tensor:
    """Rank of each feature in descending order of relevance (0 = most relevant).

    ``ties``: how features of equal relevance are ordered. ``"random"`` (default): a seeded random order
    per sample, so a map gets no credit for features it does not rank (an all-zero map scores as a
    random one, not as the raster order; IG's exact zeros on a black background are not swept
    top-row-first); ``"index"``: raster order (a stable sort; what other implementations' sorts
    usually do). Maps without ties rank identically either way, and skip the random draw.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}.")
    g = make_generator(relevance.device, seed) if ties == "random" else None
    order = descending_order(relevance.detach(), ties, g)
    ranks = torch.empty_like(order)
    ar = torch.arange(relevance.shape[1], device=relevance.device).expand_as(order)
    return ranks.scatter_(1, order, ar)


#: substrates computed along the positions of the input (the rest are the same in any layout)
LAYOUT_SUBSTRATES = ("blur", "mean")


def steps_last(model: object, inputs: Tensor, channels_first: bool | None, layout_dependent: bool) -> bool:
    """Whether a metric should run on the transposed view of (B,T,D) sequences: only when a setting depends
    on which dim holds the positions (``layout_dependent``: blur or mean substrates, position features,
    grid cells, squares and blocks) and the model reads (B,T,D) (:func:`reads_channels_first`, or
    ``channels_first=False``). The metric then scores ``StepsLast(model)`` on (B,D,T) inputs and maps, so
    those settings run along the T steps (shared over the D features), as the mask methods do; the
    per-sample scores are those of the original model and inputs."""
    check_channels_first(channels_first)
    return layout_dependent and inputs.ndim == 3 and not reads_channels_first(model, inputs, channels_first)


def transposed_sequence(t: Tensor | None, inputs: Tensor) -> Tensor | None:
    """A (B,T,D)-shaped (or broadcastable) tensor as (B,D,T): maps (B,T,1) become one-channel maps (B,1,T)."""
    if t is None:
        return None
    if t.ndim == inputs.ndim:
        return t.transpose(1, 2)
    return t.expand_as(inputs).transpose(1, 2)  # broadcastable substrates: (D,), (T, D), ...


def is_layout_substrate(spec: Substrate) -> bool:
    return isinstance(spec, str) and spec in LAYOUT_SUBSTRATES


def make_substrate(
    spec: Substrate, inputs: Tensor, *, blur_sigma: float = 5.0, generator: torch.Generator | None = None
) -> Tensor:
    """What removed features are replaced with, input-shaped.

    ``"zeros"``; ``"blur"`` (Gaussian, ``blur_sigma`` px, RISE's insertion start); ``"auto"`` (blur for
    images (B,C,H,W), zeros otherwise); ``"mean"`` (per-sample,
    per-channel mean); ``"min"`` / ``"max"`` (per-sample minimum / maximum, Quantus' ``"black"`` /
    ``"white"``); ``"uniform"`` (noise in the sample's range, from ``generator``); a float; or a tensor
    broadcastable to the inputs.
    """
    if isinstance(spec, str) and spec == "auto":
        spec = "blur" if inputs.ndim == 4 else "zeros"
    if isinstance(spec, str) and spec in ("min", "max"):
        b = inputs.shape[0]
        flat = inputs.detach().reshape(b, -1)
        v = flat.min(1).values if spec == "min" else flat.max(1).values
        return v.view(b, *([1] * (inputs.ndim - 1))).expand_as(inputs).clone()
    from ...attribution.path import make_baseline

    try:
        return make_baseline(spec, inputs.detach(), sigma=blur_sigma, generator=generator).detach()
    except ValueError as err:
        if not str(err).startswith("Unknown baseline"):
            raise
        raise ValueError(
            f"Unknown substrate {spec!r}; use 'zeros', 'blur', 'auto', 'mean', 'min', 'max', 'uniform', a float or "
            "a tensor."
        ) from err


def output_scores(
    model: nn.Module,
    rows: Tensor,
    target: Tensor | None,
    output: str = "probability",
) -> Tensor:
    """The scored output per row, without gradients, at ``target``: the softmax probability
    (``"probability"``), the raw output (``"logit"``), or the sigmoid of the raw output (``"sigmoid"``: the
    probability of a label of a multi-label model, or of a one-logit binary classifier).

    Single-output models (regression) are scored by their raw output under ``"probability"``.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    with torch.no_grad():
        out = model(rows)
        if not isinstance(target, TargetOperator):  # an operator reads the raw output (its own key, class dim)
            out = read_scores(out)  # a tuple/dict output: the error naming output_key
        return score_outputs(out, target, output)


def score_outputs(out: Tensor, target: Tensor | None, output: str) -> Tensor:
    """:func:`output_scores` of model outputs ``out`` already computed (each row scored on its own)."""
    if isinstance(target, TargetOperator):  # softmax/sigmoid over the operator's own class dim
        return target(out, output).detach()
    if output == "probability" and out.ndim >= 2 and out.shape[1] > 1:
        out = out.softmax(1)
    elif output == "sigmoid":
        out = out.sigmoid()
    return select_output(out, target).detach()


def _leading_rows(out: Any) -> int:
    """The number of rows of a raw model output: a tensor, or the first tensor in a dict, tuple or object."""
    if isinstance(out, Tensor):
        return out.shape[0]
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else vars(out).values()
    for v in values:
        if isinstance(v, Tensor):
            return v.shape[0]
    raise TypeError(f"a model output of type {type(out).__name__} holds no tensor to count its rows.")


class ScoreRows:
    """Scores (float64, (N,)) of N rows whose model outputs arrive call by call, in row order.

    Scoring one call's output takes a handful of small tensor operations (softmax, gather, cast, copy
    into the result): on a cheap model as many as the model's own. Outputs are therefore kept and
    scored together, one set of operations for up to :attr:`CAP` output elements (then scored and
    dropped, so memory stays bounded for many rows or many classes). Outputs with more than two dims
    (segmentation maps, summed after gathering) are scored call by call.
    """

    CAP = 1 << 22  # output elements held before they are scored (16 MiB of float32)

    def __init__(self, n_rows: int, target: Tensor | None, output: str, device: torch.device) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        self.scores = torch.empty(n_rows, dtype=torch.float64, device=device)
        self.target, self.output = target, output
        self._pending: list[Tensor] = []
        self._start = self._next = self._elements = 0

    def add(self, out: Any, held: Tensor | None = None) -> None:
        """The model's raw output for the next rows. ``held``: a buffer the caller refills for its next call;
        an output sharing its memory (a model returning a view of its input) is copied before it is kept.
        Outputs for a target operator (which reads the raw output: its key, its class dim) and outputs
        with more than two dims are scored call by call."""
        if isinstance(self.target, TargetOperator):
            n = _leading_rows(out)
            self._flush()
            self._score(out, self._next, n)
            self._start = self._next = self._next + n
            return
        out = read_scores(out).detach()  # a tuple/dict output: the error naming output_key
        n = out.shape[0]
        if out.ndim > 2:
            self._flush()
            self._score(out, self._next, n)
            self._start = self._next = self._next + n
            return
        if held is not None and out.untyped_storage().data_ptr() == held.untyped_storage().data_ptr():
            out = out.clone()
        self._pending.append(out)
        self._next += n
        self._elements += out.numel()
        if self._elements >= self.CAP:
            self._flush()

    def result(self) -> Tensor:
        """The scores of every row added (all N rows must have been added)."""
        self._flush()
        if self._next != self.scores.shape[0]:
            raise RuntimeError(f"ScoreRows got {self._next} rows, expected {self.scores.shape[0]}.")
        return self.scores

    def _score(self, out: Tensor, start: int, n: int) -> None:
        tgt = None if self.target is None else self.target[start : start + n]
        self.scores[start : start + n] = score_outputs(out, tgt, self.output)

    def _flush(self) -> None:
        if self._pending:
            out = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
            self._score(out, self._start, out.shape[0])
        self._pending, self._start, self._elements = [], self._next, 0


def row_blocks(n_runs: int, batch: int, batch_size: BatchSize) -> Iterator[tuple[slice, slice]]:
    """Blocks of (run, sample) rows, run-major, each holding at most ``batch_size`` rows.

    With ``batch_size >= batch`` a block holds whole runs; otherwise one run and a slice of samples.
    """
    bs = rows(batch_size) or n_runs * batch
    if bs >= batch:
        per = max(1, bs // batch)
        for r in range(0, n_runs, per):
            yield slice(r, min(r + per, n_runs)), slice(0, batch)
    else:
        for r in range(n_runs):
            for s in range(0, batch, bs):
                yield slice(r, r + 1), slice(s, min(s + bs, batch))


def flat_call_scores(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    n_runs: int,
    output: str,
    batch_size: BatchSize,
    fill: Callable[[int, slice, Tensor], None],
    fill_runs: Callable[[slice, Tensor], None] | None = None,
) -> Tensor:
    """Scores (``n_runs * B``,) float64, run-major, of ``n_runs`` perturbed copies of ``x`` (B, ...) sent in
    the calls of :func:`flat_calls`: ``fill(run, samples, out)`` writes run ``run``'s copies of
    ``x[samples]`` into ``out``, in run order; one buffer of ``batch_size`` rows is reused.

    ``fill_runs(runs, out)``, when given, writes whole runs at once (``out``: (len(runs), B, ...)): the
    consecutive runs a call holds all of are then filled by one call of it instead of one ``fill`` per run
    (on a cheap model a fill's few tensor operations per run cost as much as the model's forward). The
    runs a call holds part of still go through ``fill``, in run order."""
    b = x.shape[0]
    tgt = None if target is None else tile_rows(target, n_runs)
    scores = ScoreRows(n_runs * b, tgt, output, x.device)
    buf: Tensor | None = None
    with torch.no_grad():
        for call, pieces in flat_calls(n_runs, b, batch_size):
            n = call.stop - call.start
            if buf is None:
                buf = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
            i = 0
            while i < len(pieces):
                run, samples, at = pieces[i]
                j = i
                if fill_runs is not None:  # the whole runs from here on: one fill_runs call
                    while j < len(pieces) and pieces[j][1].stop - pieces[j][1].start == b:
                        j += 1
                if j > i:
                    start, stop = at.start, pieces[j - 1][2].stop
                    fill_runs(slice(run, run + j - i), buf[start:stop].view(j - i, b, *x.shape[1:]))
                    i = j
                else:
                    fill(run, samples, buf[at])
                    i += 1
            scores.add(model(buf[:n]), held=buf)  # the outputs scored together (ScoreRows)
    return scores.result()


def check_masks(masks: Tensor, inputs: Tensor) -> Tensor:
    """Ground-truth masks as booleans (B, *spatial) for spatial inputs or (B, D...) for tabular ones.

    Accepts (B,*spatial), (B,1,*spatial) and (B,C,*spatial) (a position counts if any channel is set).
    """
    b = inputs.shape[0]
    if masks.shape[0] != b:
        raise ValueError(f"masks have {masks.shape[0]} samples but inputs have {b}; pass one mask per sample.")
    m = masks.detach()
    m = m.bool() if m.dtype == torch.bool else m > 0.5 if m.is_floating_point() else m != 0
    if inputs.ndim >= 3:
        spatial = tuple(inputs.shape[2:])
        if tuple(m.shape[1:]) == spatial:
            return m
        if m.ndim == inputs.ndim and tuple(m.shape[2:]) == spatial:
            return m.any(1)
    elif tuple(m.shape) == tuple(inputs.shape):
        return m
    raise ValueError(
        f"masks of shape {tuple(masks.shape)} do not fit inputs {tuple(inputs.shape)}; expected (B,*spatial), "
        "(B,1,*spatial) or (B,C,*spatial) for images and (B,D) for tabular inputs."
    )


def trapezoid(curve: Tensor, x: Tensor) -> Tensor:
    """Area under (B, S) curves on the grid x (S,) by the trapezoid rule."""
    return torch.trapezoid(curve, x=x.to(curve.dtype), dim=-1)


def n_steps_of(n_features: int, n_steps: int | None, step: int | float | None) -> tuple[int, int]:
    """(features per step, number of steps) from either ``step`` (int count or float fraction) or ``n_steps``."""
    if step is not None:
        if isinstance(step, float) and 0 < step <= 1:
            step = max(1, round(step * n_features))
        step = int(step)
        if step < 1:
            raise ValueError(f"step must be a positive int (features per step) or a fraction in (0, 1], got {step}.")
    else:
        if n_steps is None or n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}.")
        step = max(1, math.ceil(n_features / n_steps))
    return step, math.ceil(n_features / step)


def resize_nearest(m: Tensor, size: tuple[int, ...]) -> Tensor:
    """Nearest-neighbour resize of a (N, *grid) float tensor to (N, *size)."""
    return F.interpolate(m.unsqueeze(1), size=size, mode="nearest").squeeze(1)


class RunDraws:
    """Per-run random draws ``fn(r) -> (B, ...)`` made in run order and cached, so that the random
    stream, and hence the result, does not depend on how rows are blocked by ``batch_size``."""

    def __init__(self, fn: Callable[[int], Tensor]) -> None:
        self.fn = fn
        self._cache: dict[int, Tensor] = {}

    def get(self, rs: slice) -> Tensor:
        for r in list(self._cache):
            if r < rs.start:
                del self._cache[r]
        for r in range(rs.start, rs.stop):
            if r not in self._cache:
                self._cache[r] = self.fn(r)
        return torch.stack([self._cache[r] for r in range(rs.start, rs.stop)])


def scores_chunked(
    model: nn.Module, x: Tensor, target: Tensor | None, output: str = "probability", batch_size: BatchSize = "auto"
) -> Tensor:
    """:func:`output_scores` of every row of ``x`` (float64, (N,)), at most ``batch_size`` rows per call."""
    if (rows(batch_size) or x.shape[0]) >= x.shape[0] and not isinstance(target, TargetOperator):
        # one call (completeness error: f(x) and f(baseline) together): scored as ScoreRows scores one
        # call's output, without its buffer and bookkeeping (on a cheap model as costly as the call itself)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        with torch.no_grad():
            return score_outputs(read_scores(model(x)).detach(), target, output).to(torch.float64)
    scores = ScoreRows(x.shape[0], target, output, x.device)
    with torch.no_grad():
        for sl in chunks(x.shape[0], batch_size):
            scores.add(model(x[sl]))
    return scores.result()
