"""Faithfulness of given maps: µ-fidelity, infidelity, IG completeness error (classes)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._internal.batching import BatchSize
from .._internal.registry import METRICS
from .base import ExplanationMetric
from .functional import completeness_error, infidelity, mufidelity
from .functional._utils import Substrate

__all__ = ["CompletenessError", "Infidelity", "MuFidelity"]


@METRICS.register("mufidelity", "faithfulness_correlation")
class MuFidelity(ExplanationMetric):
    """µ-fidelity / faithfulness correlation (Bhatt et al. 2020), higher is better; presets
    ``"quantus"`` and ``"xplique"``. See :func:`~explain_callbacks.metrics.functional.mufidelity`."""

    short_name = "mufidelity"
    higher_is_better = True

    def __init__(
        self,
        preset: str | None = None,
        correlation: str = "pearson",
        n_subsets: int = 100,
        subset_size: int | float = 0.2,
        grid_size: int | None = None,
        drop_prob: float = 0.2,
        baseline: Substrate = "zeros",
        features: str = "auto",
        output: str = "logit",
        seed: int = 0,
        blur_sigma: float = 5.0,
        batch_size: BatchSize = "auto",
        channels_first: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.channels_first = channels_first
        self.preset, self.correlation, self.n_subsets, self.subset_size = preset, correlation, n_subsets, subset_size
        self.grid_size, self.drop_prob, self.baseline, self.features = grid_size, drop_prob, baseline, features
        self.output, self.seed, self.blur_sigma = output, seed, blur_sigma

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        return mufidelity(
            model, inputs, attributions, target, preset=self.preset, correlation=self.correlation,
            n_subsets=self.n_subsets, subset_size=self.subset_size, grid_size=self.grid_size,
            drop_prob=self.drop_prob, baseline=self.baseline, features=self.features, output=self.output,
            seed=self.seed, blur_sigma=self.blur_sigma, batch_size=self.batch_size, channels_first=self.channels_first,
        )  # fmt: skip


@METRICS.register("infidelity")
class Infidelity(ExplanationMetric):
    """Infidelity (Yeh et al. 2019), lower is better; Gaussian, square or Quantus' patch-sequence
    perturbations, optional optimal rescaling. See :func:`~explain_callbacks.metrics.functional.infidelity`."""

    short_name = "infidelity"
    higher_is_better = False

    def __init__(
        self,
        perturbation: str = "gaussian",
        n_perturb: int = 32,
        noise_std: float = 0.1,
        patch_size: int = 4,
        baseline: Substrate = "zeros",
        normalize: bool = False,
        output: str = "logit",
        seed: int = 0,
        blur_sigma: float = 5.0,
        batch_size: BatchSize = "auto",
        channels_first: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.channels_first = channels_first
        self.perturbation, self.n_perturb, self.noise_std = perturbation, n_perturb, noise_std
        self.patch_size, self.baseline, self.normalize = patch_size, baseline, normalize
        self.output, self.seed, self.blur_sigma = output, seed, blur_sigma

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        return infidelity(
            model, inputs, attributions, target, perturbation=self.perturbation, n_perturb=self.n_perturb,
            noise_std=self.noise_std, patch_size=self.patch_size, baseline=self.baseline, normalize=self.normalize,
            output=self.output, seed=self.seed, blur_sigma=self.blur_sigma, batch_size=self.batch_size,
            channels_first=self.channels_first,
        )  # fmt: skip


@METRICS.register("completeness_error", "ig_completeness")
class CompletenessError(ExplanationMetric):
    """Relative completeness error |Σ A − (f(x) − f(x'))| / |f(x) − f(x')| (Sundararajan et al. 2017);
    lower is better. ``baseline`` must be the one of the path method (zeros for IG's default)."""

    short_name = "completeness_error"
    higher_is_better = False

    def __init__(
        self,
        baseline: Substrate = "zeros",
        output: str = "logit",
        relative: bool = True,
        blur_sigma: float = 5.0,
        batch_size: BatchSize = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.baseline, self.output, self.relative, self.blur_sigma = baseline, output, relative, blur_sigma

    def _scores(
        self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor | None, masks: Tensor | None
    ) -> Tensor:
        return completeness_error(
            model, inputs, attributions, target, baseline=self.baseline, output=self.output, relative=self.relative,
            blur_sigma=self.blur_sigma, batch_size=self.batch_size,
        )  # fmt: skip
