"""Curve metrics: deletion, insertion, their difference, and ABC for regression (classes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._internal.registry import METRICS
from .base import ExplanationMetric
from .functional import abc as abc_fn
from .functional import deletion as deletion_fn
from .functional import insertion as insertion_fn
from .functional._utils import Substrate

__all__ = ["ABC", "CurveMixin", "Deletion", "Insertion", "InsertionDeletion"]


class CurveMixin:
    """Keeps ``curve`` (the mean curve of the samples seen since the last reset, (S,)) and ``curve_x``
    (the fractions of features, (S,)) for plotting. Local to the process (not synchronised)."""

    curve: Tensor | None
    curve_x: Tensor | None

    def _reset_curve(self) -> None:
        self.curve, self.curve_x = None, None
        self._curve_sum: Tensor | None = None
        self._curve_n = 0

    def _add_curve(self, curves: Tensor, xs: Tensor) -> None:
        c = curves.detach().double()
        if self._curve_sum is None or self._curve_sum.shape[0] != c.shape[1]:
            self._curve_sum, self._curve_n = torch.zeros(c.shape[1], dtype=torch.float64, device=c.device), 0
        self._curve_sum = self._curve_sum + c.sum(0)
        self._curve_n += c.shape[0]
        self.curve = self._curve_sum / self._curve_n
        self.curve_x = xs.detach().double()


class _CurveMetric(CurveMixin, ExplanationMetric):
    def __init__(self, batch_size: int | None = 256, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self._reset_curve()

    def reset(self) -> None:
        super().reset()
        self._reset_curve()


@METRICS.register("deletion")
class Deletion(_CurveMetric):
    """Deletion AUC (RISE, Petsiuk et al. 2018): lower is better; see
    :func:`~explain_callbacks.metrics.functional.deletion`. ``curve`` / ``curve_x`` hold the mean curve."""

    short_name = "deletion"
    higher_is_better = False

    def __init__(
        self,
        substrate: Substrate = "zeros",
        n_steps: int = 32,
        step: int | float | None = None,
        features: str = "auto",
        output: str = "probability",
        blur_sigma: float = 5.0,
        batch_size: int | None = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.substrate, self.n_steps, self.step = substrate, n_steps, step
        self.features, self.output, self.blur_sigma = features, output, blur_sigma

    def _kw(self) -> dict[str, Any]:
        return dict(substrate=self.substrate, n_steps=self.n_steps, step=self.step, features=self.features,
                    output=self.output, blur_sigma=self.blur_sigma, batch_size=self.batch_size)  # fmt: skip

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        auc, curve, xs = deletion_fn(model, inputs, attributions, target, return_curve=True, **self._kw())
        self._add_curve(curve, xs)
        return auc


@METRICS.register("insertion")
class Insertion(Deletion):
    """Insertion AUC (RISE): higher is better, starting from a blurred copy (images) or zeros by default; see
    :func:`~explain_callbacks.metrics.functional.insertion`."""

    short_name = "insertion"
    higher_is_better = True

    def __init__(self, substrate: Substrate = "auto", **kwargs: Any) -> None:
        super().__init__(substrate=substrate, **kwargs)

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        auc, curve, xs = insertion_fn(model, inputs, attributions, target, return_curve=True, **self._kw())
        self._add_curve(curve, xs)
        return auc


@METRICS.register("insertion_deletion", "neflag")
class InsertionDeletion(ExplanationMetric):
    """Insertion AUC − deletion AUC (higher is better). ``curves`` holds both mean curves."""

    short_name = "insertion_deletion"
    higher_is_better = True

    def __init__(
        self,
        deletion_substrate: Substrate = "zeros",
        insertion_substrate: Substrate = "auto",
        n_steps: int = 32,
        step: int | float | None = None,
        features: str = "auto",
        output: str = "probability",
        blur_sigma: float = 5.0,
        batch_size: int | None = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.deletion_substrate, self.insertion_substrate = deletion_substrate, insertion_substrate
        self.n_steps, self.step, self.features, self.output = n_steps, step, features, output
        self.blur_sigma = blur_sigma
        self.curves: dict[str, Tensor] = {}
        self.curve_x: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.curves, self.curve_x = {}, None

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        kw = dict(n_steps=self.n_steps, step=self.step, features=self.features, output=self.output,
                  blur_sigma=self.blur_sigma, batch_size=self.batch_size, return_curve=True)  # fmt: skip
        d, dc, xs = deletion_fn(model, inputs, attributions, target, substrate=self.deletion_substrate, **kw)
        i, ic, _ = insertion_fn(model, inputs, attributions, target, substrate=self.insertion_substrate, **kw)
        self.curves = {"deletion": dc.mean(0), "insertion": ic.mean(0)}
        self.curve_x = xs
        return i - d


@METRICS.register("abc")
class ABC(_CurveMetric):
    """Area between the test curve and the straight line (Hama, Mase & Owen 2023) for regression and
    raw outputs; higher is better. See :func:`~explain_callbacks.metrics.functional.abc`."""

    short_name = "abc"
    higher_is_better = True

    def __init__(
        self,
        mode: str = "insertion",
        baseline: Substrate = "zeros",
        n_steps: int = 32,
        step: int | float | None = None,
        features: str = "auto",
        blur_sigma: float = 5.0,
        batch_size: int | None = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if mode not in ("insertion", "deletion"):
            raise ValueError(f"mode must be 'insertion' or 'deletion', got {mode!r}.")
        self.mode, self.baseline, self.n_steps, self.step = mode, baseline, n_steps, step
        self.features, self.blur_sigma = features, blur_sigma

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        score, curve, xs = abc_fn(
            model, inputs, attributions, target, mode=self.mode, baseline=self.baseline, n_steps=self.n_steps,
            step=self.step, features=self.features, blur_sigma=self.blur_sigma, batch_size=self.batch_size,
            return_curve=True,
        )  # fmt: skip
        self._add_curve(curve, xs)
        return score
