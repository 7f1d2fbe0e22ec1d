"""Metrics of the maps alone or against masks: pointing games, sparseness, complexity, drift, and the
Dabkowski saliency metric (classes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize
from .._internal.registry import METRICS
from .base import ExplanationMetric
from .functional import (
    complexity,
    dabkowski_saliency,
    energy_pointing_game,
    explanation_drift,
    pointing_game,
    sparseness,
)

__all__ = ["Complexity", "DabkowskiSaliency", "Drift", "EnergyPointingGame", "PointingGame", "Sparseness"]


@METRICS.register("pointing_game")
class PointingGame(ExplanationMetric):
    """Hit rate of the map's maximum inside the ground-truth mask (Zhang et al. 2018), within
    ``tolerance`` px (default: the paper's 15 px at 224 px, scaled to the input). Needs masks."""

    short_name = "pointing_game"
    higher_is_better = True
    needs_masks = True

    def __init__(self, tolerance: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance = tolerance

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        return pointing_game(attributions, self._check_masks(masks), inputs, tolerance=self.tolerance)


@METRICS.register("energy_pointing_game")
class EnergyPointingGame(ExplanationMetric):
    """Share of the positive (channel-summed) attribution inside the mask (Wang et al. 2020). Needs masks."""

    short_name = "energy_pointing_game"
    higher_is_better = True
    needs_masks = True

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        return energy_pointing_game(attributions, self._check_masks(masks), inputs)


@METRICS.register("sparseness", "gini")
class Sparseness(ExplanationMetric):
    """Gini index of |A| (Chalasani et al. 2020; Quantus' ``Sparseness``): higher is sparser."""

    short_name = "sparseness"
    higher_is_better = True

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        return sparseness(attributions)


@METRICS.register("complexity", "entropy")
class Complexity(ExplanationMetric):
    """Entropy of the normalised |A| (Bhatt et al. 2020; Quantus' ``Complexity``): lower is simpler."""

    short_name = "complexity"
    higher_is_better = False

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        return complexity(attributions)


@METRICS.register("drift", "explanation_drift")
class Drift(ExplanationMetric):
    """Per-sample Spearman correlation of this epoch's maps with the previous epoch's (1 = unchanged).

    The metric remembers the maps of each ``update`` call of the previous period (``reset`` closes a
    period), matched by call order, so the probe set must be fed in the same order every epoch (as the
    monitor does). The first period has no previous maps: ``compute`` gives NaN. Use ``update`` and
    ``compute``, not ``forward``. The remembered maps live in ``previous`` (CPU tensors) and are saved
    in ``state_dict`` through ``get_extra_state``.
    """

    short_name = "drift"
    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.previous: list[Tensor] = []
        self._current: list[Tensor] = []

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        cur = attributions.detach()
        i = len(self._current)
        self._current.append(cur.cpu())
        if i < len(self.previous) and self.previous[i].shape == cur.shape:
            return explanation_drift(self.previous[i].to(cur.device), cur)
        self._undefined_by_design = True  # no previous maps yet: NaN by definition, not a dropped sample
        return torch.full((cur.shape[0],), float("nan"), dtype=torch.float64, device=cur.device)

    def reset(self) -> None:
        super().reset()
        if self._current:
            self.previous, self._current = self._current, []

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.update(*args, **kwargs)
        return self.last_scores.nanmean() if self.last_scores is not None else torch.tensor(float("nan"))

    def get_extra_state(self) -> dict[str, Any]:
        return {"previous": list(self.previous), "current": list(self._current)}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.previous = list(state.get("previous", []))
            self._current = list(state.get("current", []))


@METRICS.register("dabkowski", "dabkowski_saliency")
class DabkowskiSaliency(ExplanationMetric):
    """Dabkowski & Gal (2017) saliency metric log(max(a, 0.05)) − log p of the box around the largest
    component of the thresholded map; lower is better. Images and classifiers only."""

    short_name = "dabkowski"
    higher_is_better = False

    def __init__(self, min_area: float = 0.05, batch_size: BatchSize = "auto", **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.min_area = min_area

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        if target is None:
            raise ValueError("the Dabkowski saliency metric needs class targets (a classifier); got target=None.")
        return dabkowski_saliency(
            model, inputs, attributions, target, min_area=self.min_area, batch_size=self.batch_size
        )
