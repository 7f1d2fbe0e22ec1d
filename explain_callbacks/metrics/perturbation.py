"""Curve metrics: deletion, insertion, their difference, and ABC for regression (classes)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._internal.batching import BatchSize
from .._internal.registry import METRICS
from .base import CurveStates, ExplanationMetric
from .functional import abc as abc_fn
from .functional import deletion as deletion_fn
from .functional import insertion as insertion_fn
from .functional._utils import Substrate

__all__ = ["ABC", "CurveMixin", "Deletion", "Insertion", "InsertionDeletion"]


class CurveMixin(CurveStates):
    """Keeps ``curve`` (the mean curve of the samples seen since the last reset, (S,)) and ``curve_x``
    (the fractions of features, (S,)) for plotting. The curve is a metric state: after ``compute`` it is
    the mean over every process under DDP (before, the local mean)."""

    curve: Tensor | None
    curve_x: Tensor | None

    def _reset_curve(self) -> None:
        self.curve, self.curve_x = None, None

    def _add_curve(self, curves: Tensor, xs: Tensor) -> None:
        self._add_curve_states("main", curves)
        self.curve = self._mean_curve("main")
        self.curve_x = xs.detach().double()


class _CurveMetric(CurveMixin, ExplanationMetric):
    def __init__(self, batch_size: BatchSize = "auto", **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self._register_curve("main")
        self._reset_curve()

    def reset(self) -> None:
        super().reset()
        self._reset_curve()

    def compute(self) -> Tensor:
        self.curve = self._mean_curve("main")  # states synchronised here under DDP
        return super().compute()


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
        batch_size: BatchSize = "auto",
        ties: str = "random",
        seed: int = 0,
        channels_first: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.substrate, self.n_steps, self.step = substrate, n_steps, step
        self.features, self.output, self.blur_sigma = features, output, blur_sigma
        self.ties, self.seed, self.channels_first = ties, seed, channels_first
        #: (B, n) features that take part (None: all), for the next update: the real tokens of a padded text (set
        #: by the AttributionMonitor on token probes; see ``perturbation_curve``'s ``keep``)
        self.keep: Tensor | None = None

    def _kw(self) -> dict[str, Any]:
        return dict(substrate=self.substrate, n_steps=self.n_steps, step=self.step, features=self.features,
                    output=self.output, blur_sigma=self.blur_sigma, batch_size=self.batch_size, ties=self.ties,
                    seed=self.seed, channels_first=self.channels_first, keep=self.keep)  # fmt: skip

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
class InsertionDeletion(CurveStates, ExplanationMetric):
    """Insertion AUC − deletion AUC (higher is better). ``curves`` holds both mean curves (over every
    process after ``compute`` under DDP)."""

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
        batch_size: BatchSize = "auto",
        ties: str = "random",
        seed: int = 0,
        channels_first: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.channels_first = channels_first
        self.deletion_substrate, self.insertion_substrate = deletion_substrate, insertion_substrate
        self.n_steps, self.step, self.features, self.output = n_steps, step, features, output
        self.blur_sigma, self.ties, self.seed = blur_sigma, ties, seed
        self.keep: Tensor | None = None  # as Deletion.keep
        self.curves: dict[str, Tensor] = {}
        self.curve_x: Tensor | None = None
        for key in ("deletion", "insertion"):
            self._register_curve(key)

    def reset(self) -> None:
        super().reset()
        self.curves, self.curve_x = {}, None

    def _update_curves(self) -> None:
        self.curves = {k: c for k in ("deletion", "insertion") if (c := self._mean_curve(k)) is not None}

    def compute(self) -> Tensor:
        self._update_curves()  # states synchronised here under DDP
        return super().compute()

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        kw = dict(n_steps=self.n_steps, step=self.step, features=self.features, output=self.output,
                  blur_sigma=self.blur_sigma, batch_size=self.batch_size, return_curve=True, ties=self.ties,
                  seed=self.seed, channels_first=self.channels_first, keep=self.keep)  # fmt: skip
        d, dc, xs = deletion_fn(model, inputs, attributions, target, substrate=self.deletion_substrate, **kw)
        i, ic, _ = insertion_fn(model, inputs, attributions, target, substrate=self.insertion_substrate, **kw)
        self._add_curve_states("deletion", dc)
        self._add_curve_states("insertion", ic)
        self._update_curves()
        self.curve_x = xs.detach().double()
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
        batch_size: BatchSize = "auto",
        ties: str = "random",
        seed: int = 0,
        channels_first: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.ties, self.seed, self.channels_first = ties, seed, channels_first
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
            return_curve=True, ties=self.ties, seed=self.seed, channels_first=self.channels_first,
        )  # fmt: skip
        self._add_curve(curve, xs)
        return score
