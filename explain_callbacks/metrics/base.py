"""Base classes of the metric objects: a torchmetrics ``Metric`` that averages per-sample scores.

The math lives in :mod:`explain_callbacks.metrics.functional`; a class only holds the arguments and
the state: ``score_sum`` and ``count`` (both reduced by sum across processes, so the DDP mean is
exact). Non-finite scores (e.g. the pointing game on an empty mask) are left out of both, counted in a
third state, ``dropped``, and warned about once per metric object, saying how many samples were left
out (``warn_dropped=False`` silences it, for callers that warn themselves, as the monitor does);
``compute`` stores the synchronised counts in ``last_counts``.

Two kinds, as Xplique separates them:

- ``kind = "explanation"``: ``update(model, inputs, attributions, target=None, masks=None)`` scores
  given maps;
- ``kind = "explainer"``: ``update(model, inputs, target, method, attributions=None, masks=None)``
  re-runs the method (``method(model, inputs, target) -> map``); ``attributions`` (the maps at the
  inputs) are reused when given.

``update`` runs the model as given (the caller chooses eval mode; the monitor's guard does); the
metric's own forward passes run without gradients, methods re-run with gradients enabled. A model left
in training mode is not changed and the scores are deterministic (BatchNorm statistics move on clones,
dropout draws from a seeded global RNG that is restored afterwards; see
:mod:`explain_callbacks.metrics.functional._guard`). ``target``: class indices (B,), an int (one class for
every sample), a sequence, or None for a single-output model; checked against the model's outputs.
``last_scores`` holds the per-sample scores of the last update. ``output_key`` (every metric takes it)
reads the scores of a model that returns a tuple/dict, as the methods' ``output_key`` does.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .._internal.batching import BatchSize, RowsChoice, check_batch_size, known_rows
from .._internal.outputs import OutputSpec, keyed_output

__all__ = ["CurveStates", "ExplainerMetric", "ExplanationMetric", "ScoreMetric", "update_metric"]


class ScoreMetric(Metric):
    """Mean of per-sample scores with sum-reduced states (``score_sum``, ``count``)."""

    kind: ClassVar[str] = "explanation"
    short_name: ClassVar[str] = "score"
    needs_masks: ClassVar[bool] = False
    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None
    full_state_update: ClassVar[bool] = False

    def __init__(self, batch_size: BatchSize = "auto", output_key: OutputSpec = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = check_batch_size(batch_size)  # "auto" is resolved per update by the functional
        #: where the scores are when the model returns a tuple/dict (a tuple index, a key, or a function)
        self.output_key = output_key
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        # samples whose score was NaN/Inf, left out of the mean (summed across processes like count)
        self.add_state("dropped", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.last_scores: Tensor | None = None
        #: (samples scored, samples dropped) over every process at the last ``compute``
        self.last_counts: tuple[int, int] = (0, 0)
        #: warn (once per object) when samples are dropped; False when the caller reports them itself
        self.warn_dropped = True
        self._warned_dropped = False
        #: set by ``_scores`` when this update's scores are undefined by design (Drift's first period):
        #: left out of the mean, but neither counted as dropped nor warned about
        self._undefined_by_design = False
        self._rows_choice: RowsChoice | None = None

    def _note_rows(self, model: Any, inputs: Tensor) -> None:
        """Keep what ``batch_size`` gave this update's model calls (a cache lookup: the functional chose
        it), shown by ``repr`` (``batch_size=auto -> 128 rows/call (forward measured: ...)``)."""
        self._rows_choice = known_rows(self.batch_size, model, inputs) or self._rows_choice

    def extra_repr(self) -> str:
        choice = self._rows_choice
        shown = choice.describe() if self.batch_size == "auto" and choice is not None else repr(self.batch_size)
        return f"batch_size={shown}"

    def _accumulate(self, scores: Tensor) -> None:
        s = scores.detach().reshape(-1).to(device=self.score_sum.device, dtype=torch.float64)
        ok = torch.isfinite(s)
        n_ok = int(ok.sum())
        self.score_sum += torch.where(ok, s, torch.zeros_like(s)).sum()
        self.count += float(n_ok)
        self.last_scores = s
        if self._undefined_by_design:
            self._undefined_by_design = False
            return
        self.dropped += float(s.numel() - n_ok)
        if n_ok < s.numel() and self.warn_dropped and not self._warned_dropped:
            self._warned_dropped = True
            warnings.warn(
                f"{type(self).__name__} ({self.short_name}): {s.numel() - n_ok} of {s.numel()} samples gave a NaN/Inf "
                "score and are left out of the mean"
                + (" (the value is NaN: no sample scored)" if n_ok == 0 and self.count == 0 else "")
                + "; the maps or the model's outputs there are not finite, or the score is undefined for them "
                "(e.g. an empty mask). Reported once per metric object.",
                stacklevel=3,
            )

    def compute(self) -> Tensor:
        self.last_counts = (int(self.count), int(self.dropped))  # states are synchronised inside compute
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.score_sum.device)
        return self.score_sum / self.count

    def _check_masks(self, masks: Tensor | None) -> Tensor:
        if masks is None:
            raise ValueError(
                f"{type(self).__name__} needs ground-truth masks: pass masks=(B,H,W) or (B,1,H,W) tensors "
                "(the shapes data set provides them; set the callback's mask_key)."
            )
        return masks


class ExplanationMetric(ScoreMetric):
    """A metric of given maps: ``update(model, inputs, attributions, target=None, masks=None)``."""

    kind: ClassVar[str] = "explanation"

    def update(
        self,
        model: nn.Module,
        inputs: Tensor,
        attributions: Tensor,
        target: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> None:
        with keyed_output(model, self.output_key) as called:
            scores = self._scores(called, inputs, attributions, target, masks)
            self._note_rows(called, inputs)
        self._accumulate(scores)

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        raise NotImplementedError


class ExplainerMetric(ScoreMetric):
    """A metric that re-runs the method: ``update(model, inputs, target, method, attributions=None, masks=None)``."""

    kind: ClassVar[str] = "explainer"

    def update(
        self,
        model: nn.Module,
        inputs: Tensor,
        target: Tensor | None,
        method: Any,
        attributions: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> None:
        if not callable(method):
            raise TypeError(
                f"{type(self).__name__} re-runs the attribution method: pass a callable "
                f"method(model, inputs, target), got {type(method).__name__}."
            )
        with torch.enable_grad(), keyed_output(model, self.output_key) as called:  # torchmetrics updates under no_grad
            scores = self._scores(called, inputs, target, method, attributions, masks)
            self._note_rows(called, inputs)
        self._accumulate(scores)

    def _scores(
        self,
        model: nn.Module,
        inputs: Tensor,
        target: Tensor | None,
        method: Any,
        attributions: Tensor | None,
        masks: Tensor | None,
    ) -> Tensor:
        raise NotImplementedError


class CurveStates:
    """Mean curves kept as metric states, so that under DDP ``compute`` returns the mean over every
    process (the summed-state pattern of the scalars, for vectors whose length is known only at the
    first update).

    Each curve ``key`` has three list states reduced by concatenation across processes: the per-update
    sums over samples (S,), the per-update counts of finite values (S,), and the length S. After the
    synchronisation the records are summed position by position; ranks that saw no update add nothing.
    ``_add_curve_states`` is called in ``update``; ``_mean_curve`` in ``compute`` (states synchronised)
    or anywhere else (local states).
    """

    def _register_curve(self, key: str) -> None:
        for part in ("sums", "counts", "lens"):
            self.add_state(f"{key}_curve_{part}", default=[], dist_reduce_fx="cat")  # type: ignore[attr-defined]

    def _add_curve_states(self, key: str, curves: Tensor) -> None:
        """Record (N, S) per-sample curves (non-finite values left out position by position)."""
        c = curves.detach().to(torch.float64)
        ok = torch.isfinite(c)
        getattr(self, f"{key}_curve_sums").append(torch.where(ok, c, torch.zeros_like(c)).sum(0))
        getattr(self, f"{key}_curve_counts").append(ok.sum(0).to(torch.float64))
        getattr(self, f"{key}_curve_lens").append(
            torch.tensor([float(c.shape[1])], dtype=torch.float64, device=c.device)
        )

    def _mean_curve(self, key: str) -> Tensor | None:
        """The mean curve (S,) over every recorded sample, or None before any update."""
        sums, counts, lens = (getattr(self, f"{key}_curve_{part}") for part in ("sums", "counts", "lens"))
        if isinstance(lens, list):
            if not lens:
                return None
            sums, counts, lens = dim_zero_cat(sums), dim_zero_cat(counts), dim_zero_cat(lens)
        if lens.numel() == 0:
            return None
        s = int(lens[0])
        if not bool((lens == s).all()):
            raise ValueError(
                f"{type(self).__name__}: curves of different lengths {sorted(set(lens.tolist()))} were recorded "
                "since the last reset (inputs of another size, or another number of steps); reset between them."
            )
        return sums.view(-1, s).sum(0) / counts.view(-1, s).sum(0)


def update_metric(
    metric: Any, model: Any, inputs: Tensor, maps: Tensor, target: Tensor | None, method: Any,
    masks: Tensor | None = None,
) -> bool:  # fmt: skip
    """Reset ``metric`` and update it on ``maps`` of ``method`` at ``inputs``; False (nothing computed) when it
    does not apply: it needs masks and none are given, or it refuses the method (``applies_to``, e.g. fragility's
    attack needs a gradient method). An explanation metric scores the maps; an explainer metric re-runs the
    method, reusing the maps at the inputs. The per-sample scores are then in ``metric.last_scores``. What the
    monitors and the data-set writer call, so a metric is applied the same way everywhere."""
    if getattr(metric, "needs_masks", False) and masks is None:
        return False
    applies = getattr(metric, "applies_to", None)
    if callable(applies) and not applies(method):
        return False
    metric.reset()
    kw = {"masks": masks} if masks is not None else {}
    if getattr(metric, "kind", "explanation") == "explainer":
        metric.update(model, inputs, target, method, attributions=maps, **kw)
    else:
        metric.update(model, inputs, maps, target, **kw)
    return True
