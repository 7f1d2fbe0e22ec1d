"""Explainer metrics (they re-run the method): sensitivity, local Lipschitz estimate, fragility under an
attack, completeness and soundness, model-randomisation sanity check (classes)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize
from .._internal.registry import METRICS
from .base import CurveStates, ExplainerMetric
from .functional import completeness_soundness, fragility, local_lipschitz, model_randomisation, sensitivity
from .functional._utils import Substrate
from .functional.randomisation import check_draws

__all__ = [
    "AvgSensitivity", "CompletenessSoundness", "Fragility", "LocalLipschitz", "MaxSensitivity", "Randomisation",
]


@METRICS.register("max_sensitivity")
class MaxSensitivity(ExplainerMetric):
    """Max-sensitivity (Yeh et al. 2019): max over the L∞ ball of radius r of ‖A(y) − A(x)‖ / ‖A(x)‖;
    lower is better. Defaults are Captum's (10 draws, r = 0.02); Quantus uses 200 and 0.2."""

    short_name = "max_sensitivity"
    higher_is_better = False
    _reduction = "max"

    def __init__(
        self,
        n_samples: int = 10,
        radius: float = 0.02,
        norm: float | str = "fro",
        seed: int = 0,
        batch_size: BatchSize = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.n_samples, self.radius, self.norm, self.seed = n_samples, radius, norm, seed

    def _scores(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, method: Any, attributions: Tensor | None,
        masks: Tensor | None,
    ) -> Tensor:  # fmt: skip
        return sensitivity(
            model, inputs, target, method, attributions, reduction=self._reduction, n_samples=self.n_samples,
            radius=self.radius, norm=self.norm, seed=self.seed, batch_size=self.batch_size,
        )  # fmt: skip


@METRICS.register("avg_sensitivity")
class AvgSensitivity(MaxSensitivity):
    """Avg-sensitivity (Yeh et al. 2019): the mean instead of the max; lower is better."""

    short_name = "avg_sensitivity"
    _reduction = "mean"


@METRICS.register("local_lipschitz", "lipschitz")
class LocalLipschitz(ExplainerMetric):
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): max ‖A(x) − A(x')‖ / ‖x − x'‖ over
    x' = x + N(0, σ²); lower is better."""

    short_name = "local_lipschitz"
    higher_is_better = False

    def __init__(
        self,
        n_samples: int = 10,
        noise_std: float = 0.1,
        norm: float | str = "fro",
        seed: int = 0,
        batch_size: BatchSize = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.n_samples, self.noise_std, self.norm, self.seed = n_samples, noise_std, norm, seed

    def _scores(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, method: Any, attributions: Tensor | None,
        masks: Tensor | None,
    ) -> Tensor:  # fmt: skip
        return local_lipschitz(
            model, inputs, target, method, attributions, n_samples=self.n_samples, noise_std=self.noise_std,
            norm=self.norm, seed=self.seed, batch_size=self.batch_size,
        )  # fmt: skip


@METRICS.register("fragility")
class Fragility(ExplainerMetric):
    """Fragility of the maps (Ghorbani, Abid & Zou 2019): the maps of an input attacked within an L∞
    budget ε, its prediction kept, compared with the maps of the input (see
    :func:`~explain_callbacks.metrics.functional.fragility`).

    All three comparisons are kept as states (sums over samples, reduced by sum across processes):
    top-k intersection (higher is more robust), Spearman rank correlation (higher is more robust) and
    centre-of-mass shift in pixels/positions (lower is more robust). ``compute`` returns the mean top-k
    intersection and leaves the other two, synchronised, in ``extra_values`` (``{"spearman": ...,
    "shift": ...}``), which the monitor logs as ``robustness/fragility_<name>/<method>``. Cost per update:
    ``steps`` double-backward passes of the method plus ``steps`` scoring passes and one forward pass per
    step (``benchmarks/bench_robustness.py``).
    """

    short_name = "fragility"
    higher_is_better = True
    REPORTS = ("topk", "spearman", "shift")  # the reported value first
    #: the direction of each comparison (the monitor's ranking table reads it for ``extra_values``)
    extra_higher_is_better: ClassVar[dict[str, bool]] = {"topk": True, "spearman": True, "shift": False}

    def __init__(
        self,
        objective: str = "topk",
        epsilon: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        top_k: int | float = 0.05,
        softplus_beta: float | None = 10.0,
        clamp: tuple[float, float] | None = None,
        seed: int = 0,
        batch_size: BatchSize = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if objective not in ("topk", "mass_centre", "random"):
            raise ValueError(f"objective must be 'topk', 'mass_centre' or 'random', got {objective!r}.")
        self.objective, self.epsilon, self.steps, self.step_size = objective, epsilon, steps, step_size
        self.top_k, self.softplus_beta, self.seed = top_k, softplus_beta, seed
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))  # a Hydra ListConfig too
        for part in ("topk", "spearman", "shift"):
            self.add_state(f"{part}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{part}_count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        #: the other comparisons at the last ``compute`` (mean over every process), by name
        self.extra_values: dict[str, float] = {}

    @staticmethod
    def applies_to(method: Any) -> bool:
        """Whether the attack can run on ``method``: it differentiates the map w.r.t. the input, so gradient
        and path methods (``differentiable``) only; the monitor skips the others silently."""
        return bool(getattr(method, "differentiable", False)) and callable(method)

    def _scores(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, method: Any, attributions: Tensor | None,
        masks: Tensor | None,
    ) -> Tensor:  # fmt: skip
        parts = dict(zip(self.REPORTS, fragility(
            model, inputs, target, method, attributions, objective=self.objective, epsilon=self.epsilon,
            steps=self.steps, step_size=self.step_size, top_k=self.top_k, softplus_beta=self.softplus_beta,
            clamp=self.clamp, seed=self.seed,
        )))  # fmt: skip
        for part, s in parts.items():
            s = s.detach().to(device=self.topk_sum.device, dtype=torch.float64)
            ok = torch.isfinite(s)  # Spearman of a constant map is NaN: left out, as the base class does
            getattr(self, f"{part}_sum").add_(torch.where(ok, s, torch.zeros_like(s)).sum())
            getattr(self, f"{part}_count").add_(ok.sum().to(torch.float64))
        return parts["topk"]

    def compute(self) -> Tensor:
        value = super().compute()  # states synchronised here under DDP
        self.extra_values = {
            part: float(getattr(self, f"{part}_sum") / getattr(self, f"{part}_count"))
            if getattr(self, f"{part}_count") > 0 else float("nan")
            for part in self.REPORTS[1:]
        }  # fmt: skip
        return value


@METRICS.register("completeness_soundness")
class CompletenessSoundness(ExplainerMetric):
    """Completeness and soundness (Gupta et al. 2022; **reconstruction**, see
    :func:`~explain_callbacks.metrics.functional.completeness_soundness`); higher is better.

    Args:
        report: what ``compute`` returns: ``"soundness"`` (default), ``"completeness"`` (both scalars),
            or ``"both"`` (a dict ``{"completeness": ..., "soundness": ...}``). Both are always kept,
            in the states ``score_sum``/``count`` (completeness) and ``sound_sum``/``sound_count``.
    """

    short_name = "completeness_soundness"
    higher_is_better = True

    def __init__(
        self,
        report: str = "soundness",
        n_other: int | None = 4,
        substrate: Substrate = "zeros",
        n_steps: int = 16,
        features: str = "auto",
        batch_size: BatchSize = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if report not in ("soundness", "completeness", "both"):
            raise ValueError(f"report must be 'soundness', 'completeness' or 'both', got {report!r}.")
        self.report, self.n_other, self.substrate, self.n_steps, self.features = (
            report, n_other, substrate, n_steps, features,
        )  # fmt: skip
        self.add_state("sound_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sound_count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.last_soundness: Tensor | None = None

    def _scores(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, method: Any, attributions: Tensor | None,
        masks: Tensor | None,
    ) -> Tensor:  # fmt: skip
        comp, sound = completeness_soundness(
            model, inputs, target, method, attributions, n_other=self.n_other, substrate=self.substrate,
            n_steps=self.n_steps, features=self.features, batch_size=self.batch_size,
        )  # fmt: skip
        s = sound.detach().to(device=self.sound_sum.device, dtype=torch.float64)
        ok = torch.isfinite(s)
        self.sound_sum += torch.where(ok, s, torch.zeros_like(s)).sum()
        self.sound_count += ok.sum().to(torch.float64)
        self.last_soundness = s
        return comp

    def compute(self) -> Tensor | dict[str, Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.score_sum.device)
        comp = self.score_sum / self.count if self.count > 0 else nan
        sound = self.sound_sum / self.sound_count if self.sound_count > 0 else nan
        if self.report == "both":
            return {"completeness": comp, "soundness": sound}
        return comp if self.report == "completeness" else sound


@METRICS.register("randomisation", "randomization", "mprt")
class Randomisation(CurveStates, ExplainerMetric):
    """Cascading model-parameter randomisation check (Adebayo et al. 2018): Spearman correlation of the
    maps of the fully randomised model (the user's model is left untouched) with the trained model's; lower is better.

    With ``cascade=True`` every step of the cascade is computed (one method call per layer): ``curve``
    holds the mean correlation after each layer (top-down; over every process after ``compute`` under
    DDP), ``curve_x`` the fraction of layers randomised and ``layer_names`` their names; the reported
    value is still the last step. ``draws="reset_parameters"`` re-draws each layer as Quantus' ``MPRT`` does
    (its own ``reset_parameters()`` after ``torch.manual_seed(seed + 1)``, the global RNG left as found): with
    ``seed=`` Quantus' seed the values are equal.
    """

    short_name = "randomisation"
    higher_is_better = False

    def __init__(
        self,
        cascade: bool = False,
        abs: bool = True,
        layers: list[str] | None = None,
        seed: int = 0,
        draws: str = "seeded",
        batch_size: BatchSize = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.cascade, self.abs, self.layers, self.seed = cascade, abs, layers, seed
        self.draws = check_draws(draws)  # at construction: a config's typo fails before training
        self.curve: Tensor | None = None
        self.curve_x: Tensor | None = None
        self.layer_names: list[str] = []
        self._register_curve("cascade")

    def reset(self) -> None:
        super().reset()
        self.curve, self.curve_x = None, None

    def compute(self) -> Tensor:
        if self.cascade:
            self.curve = self._mean_curve("cascade")  # states synchronised here under DDP
        return super().compute()

    def _scores(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, method: Any, attributions: Tensor | None,
        masks: Tensor | None,
    ) -> Tensor:  # fmt: skip
        kw = dict(abs=self.abs, layers=self.layers, seed=self.seed, draws=self.draws, batch_size=self.batch_size)
        if not self.cascade:
            return model_randomisation(model, inputs, target, method, attributions, **kw)
        names, rows = model_randomisation(model, inputs, target, method, attributions, return_cascade=True, **kw)
        self.layer_names = list(names)
        self._add_curve_states("cascade", rows.T)  # (B, L): NaN correlations left out per layer
        self.curve = self._mean_curve("cascade")
        self.curve_x = torch.arange(1, len(names) + 1, dtype=torch.float64) / len(names)
        return rows[-1]
