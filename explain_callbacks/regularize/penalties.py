"""Registered penalty objects: thin, configurable wrappers of the functions in :mod:`.functional`.

Every penalty is called as ``penalty(model, inputs, targets, mask, *, step=None, output_key=None) -> scalar
Tensor`` (``output_key``: where the scores are when the model returns a tuple/dict)
and registered in ``PENALTIES`` under a short name, so configs and the
:class:`~explain_callbacks.callbacks.regularizer.AttributionRegularizer` accept ``"cdep"``,
``{"name": "eg_tv", "n_samples": 1}`` or an instance. ``step`` seeds the random penalties (Expected
Gradients draws); without it an internal counter advances per call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from .._internal.checks import check_floating
from .._internal.outputs import OutputSpec, keyed_output
from .._internal.registry import PENALTIES
from . import functional as RF

__all__ = [
    "PENALTIES",
    "AttributionPenalty",
    "CDEPPenalty",
    "EGPrior",
    "MapStabilityPenalty",
    "Penalty",
    "RRRPenalty",
    "build_penalty",
]


class Penalty(ABC):
    """Base class: ``R(model, inputs, targets, mask)``, a scalar differentiable in the parameters.

    Attributes:
        name: the short name used in logs (``regularizers/penalty/<name>``).
        needs_mask: whether a mask of the penalised features is required.
        needs_targets: whether class targets (labels) are required.
    """

    name: ClassVar[str] = "penalty"
    needs_mask: ClassVar[bool] = True
    needs_targets: ClassVar[bool] = False
    #: whether :meth:`with_output` gives the model's output of the batch from the penalty's own pass
    serves_forward: ClassVar[bool] = False

    def __init__(self, keep_norm_stats: bool = True, seed: int = 0) -> None:
        self.keep_norm_stats = keep_norm_stats
        self.seed = seed
        self._calls = 0

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        step: int | None = None,
        output_key: OutputSpec = None,
    ) -> Tensor:
        if self.needs_mask and mask is None:
            raise ValueError(
                f"The {self.name} penalty needs a mask of the penalised features; pass mask= (in the callback: "
                "a batch index or key, a fixed tensor, or a callable of the batch)."
            )
        if self.needs_targets and targets is None:
            raise ValueError(
                f"The {self.name} penalty explains the labelled class and needs targets; set label_key in the "
                "callback or pass targets=."
            )
        check_floating(inputs)  # token ids would fail deep inside torch (uniform bounds, requires_grad)
        if step is None:
            step = self._calls
        self._calls += 1
        with keyed_output(model, output_key) as called:
            return self.compute(called, inputs, targets, mask, seed=self.seed + int(step))

    def with_output(
        self, model: nn.Module, inputs: Tensor, targets: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Any, list, int]:
        """``(penalty, output, norm_stats, replicas)``: the penalty and the model's output for ``inputs`` from the
        same pass, with the BatchNorm statistics that pass recorded (see
        :func:`~explain_callbacks.interaction.cd.update_norm_stats`); only where :attr:`serves_forward`."""
        raise NotImplementedError(f"The {self.name} penalty does not compute the model's output.")

    @abstractmethod
    def compute(
        self, model: nn.Module, inputs: Tensor, targets: Tensor | None, mask: Tensor | None, *, seed: int
    ) -> Tensor:
        """The penalty value (subclasses)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


@PENALTIES.register("cdep")
class CDEPPenalty(Penalty):
    """CDEP (Rieger et al. 2020, arXiv:1909.13584): penalise the contextual-decomposition share of
    the masked features in the logits. ``form="softmax"`` (default, the authors' code):
    mean of σ(β_c − γ_c); ``form="l1"`` (the paper's equation): ‖β‖₁. ``compiled=True``: the decomposition's
    rules as ``torch.compile`` kernels (faster steps after a one-off compilation; needs a C++ compiler; eager
    fallback with a warning). See :func:`~explain_callbacks.regularize.functional.cdep_penalty`."""

    name = "cdep"
    serves_forward = True

    def __init__(
        self, form: str = "softmax", keep_norm_stats: bool = True, bias_at_zero: str = "rest", compiled: bool = False
    ) -> None:
        super().__init__(keep_norm_stats=keep_norm_stats)
        if form not in ("softmax", "l1"):
            raise ValueError(f"form must be 'softmax' or 'l1', got {form!r}.")
        from ..interaction.cd import BIAS_AT_ZERO

        if bias_at_zero not in BIAS_AT_ZERO:
            raise ValueError(f"bias_at_zero must be one of {BIAS_AT_ZERO}, got {bias_at_zero!r}.")
        self.form = form
        self.bias_at_zero = bias_at_zero
        self.compiled = bool(compiled)

    def compute(self, model, inputs, targets, mask, *, seed):
        return RF.cdep_penalty(
            model, inputs, mask, form=self.form, keep_norm_stats=self.keep_norm_stats, bias_at_zero=self.bias_at_zero,
            compiled=self.compiled,
        )  # fmt: skip

    def with_output(self, model, inputs, targets=None, mask=None):
        """The penalty and the model's output of ``inputs`` from one CD pass (:func:`RF.cdep_terms`)."""
        if mask is None:
            raise ValueError(f"The {self.name} penalty needs a mask of the penalised features; pass mask=.")
        RF.check_penalty_inputs(inputs, "CDEP penalty")
        check_floating(inputs)
        self._calls += 1
        if inputs.ndim > 0 and inputs.shape[0] == 0:  # no pass to serve: the caller runs the model's forward
            return RF.zero_penalty(model, inputs), None, [], 1
        return RF.cdep_terms(
            model, inputs, mask, form=self.form, keep_norm_stats=self.keep_norm_stats,
            bias_at_zero=self.bias_at_zero, streams="total", stats=True, compiled=self.compiled,
        )  # fmt: skip


@PENALTIES.register("rrr", "right_reasons")
class RRRPenalty(Penalty):
    """Right for the Right Reasons (Ross et al. 2017, arXiv:1703.03717): squared input gradients of
    Σ_c log p_c on the masked features. See :func:`~explain_callbacks.regularize.functional.rrr_penalty`."""

    name = "rrr"

    def __init__(self, reduction: str = "mean", keep_norm_stats: bool = True) -> None:
        super().__init__(keep_norm_stats=keep_norm_stats)
        self.reduction = reduction

    def compute(self, model, inputs, targets, mask, *, seed):
        return RF.rrr_penalty(model, inputs, mask, reduction=self.reduction, keep_norm_stats=self.keep_norm_stats)


class EGPrior(Penalty):
    """Expected-gradients attribution priors (Erion et al. 2021, arXiv:1906.10670), k draws per step.

    Args:
        kind: ``"tv"`` (pixel smoothness: total variation of the channel-summed map), ``"gini"``
            (sparsity: −Gini of the batch's mean |EG|), ``"mask"`` (Σ over the mask of |EG|^power).
        n_samples: k (baseline, α) draws per input and step (1, as Erion et al. train).
        power: exponent of the region prior.
        seed: base seed; the draws of a step use ``seed + step``.
    """

    KINDS = ("tv", "gini", "mask")
    needs_targets = True

    def __init__(
        self,
        kind: str = "mask",
        n_samples: int = 1,
        power: float = 1.0,
        seed: int = 0,
        keep_norm_stats: bool = True,
    ) -> None:
        super().__init__(keep_norm_stats=keep_norm_stats, seed=seed)
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        self.kind = kind
        self.n_samples = n_samples
        self.power = power

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"eg_{self.kind}"

    @property
    def needs_mask(self) -> bool:  # type: ignore[override]
        return self.kind == "mask"

    def compute(self, model, inputs, targets, mask, *, seed):
        kw: dict[str, Any] = {"n_samples": self.n_samples, "seed": seed, "keep_norm_stats": self.keep_norm_stats}
        if self.kind == "tv":
            return RF.eg_tv_prior(model, inputs, targets, **kw)
        if self.kind == "gini":
            return RF.eg_sparsity_prior(model, inputs, targets, **kw)
        return RF.eg_mask_prior(model, inputs, targets, mask, power=self.power, **kw)


@PENALTIES.register("eg_mask", "eg", "eg_region")
def eg_mask(**kwargs: Any) -> EGPrior:
    """EG region prior: Σ over the mask of |EG| (k=1 draw per step)."""
    return EGPrior(kind="mask", **kwargs)


@PENALTIES.register("eg_tv", "eg_smooth")
def eg_tv(**kwargs: Any) -> EGPrior:
    """EG pixel-smoothness prior: total variation of the EG map."""
    return EGPrior(kind="tv", **kwargs)


@PENALTIES.register("eg_gini", "eg_sparse")
def eg_gini(**kwargs: Any) -> EGPrior:
    """EG sparsity prior: −Gini of the mean |EG| per feature."""
    return EGPrior(kind="gini", **kwargs)


@PENALTIES.register("attribution", "attribution_mask")
class AttributionPenalty(Penalty):
    """Σ over the mask of |A|^power for any differentiable attribution method A
    (``saliency``, ``input_x_gradient``, ``ig``, ``expected_gradients`` or an Attributor instance),
    computed with ``create_graph=True``. ``target`` selects the explained class: the labels
    (``"label"``) or ``None`` for single-output models."""

    needs_targets = True

    def __init__(
        self,
        method: Any = "saliency",
        power: float = 2.0,
        reduction: str = "mean",
        seed: int = 0,
        keep_norm_stats: bool = True,
    ) -> None:
        super().__init__(keep_norm_stats=keep_norm_stats, seed=seed)
        self.method = _differentiable_method(method)
        self.power = power
        self.reduction = reduction

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"attr_{getattr(self.method, 'name', type(self.method).__name__)}"

    def compute(self, model, inputs, targets, mask, *, seed):
        _reseed(self.method, seed)
        return RF.attribution_penalty(
            model,
            inputs,
            targets,
            mask,
            self.method,
            power=self.power,
            reduction=self.reduction,
            keep_norm_stats=self.keep_norm_stats,
        )


@PENALTIES.register("map_stability", "robust_maps", "attributional_robustness")
class MapStabilityPenalty(Penalty):
    """Attributional-robustness penalty: the mean squared change of the (unit-mean) importance map under
    adversarial L∞ perturbations of size ``radius`` (a defence against manipulated and fragile maps, Dombrowski
    et al. 2019; Ghorbani et al. 2019). See
    :func:`~explain_callbacks.regularize.functional.map_stability_penalty`. Needs no mask; explains the
    labels when the callback gives them, else the prediction. The perturbations start random and take
    ``attack_steps`` ascent steps on the map distance (attributional robustness training; 0: random only).
    Costs one double-backward of the method on (1 + ``n_samples``) × the batch per step, plus one per attack
    step on ``n_samples`` × the batch."""

    name = "map_stability"
    needs_mask = False

    def __init__(
        self,
        method: Any = "saliency",
        radius: float = 8 / 255,
        n_samples: int = 1,
        softplus_beta: float | None = None,
        attack_steps: int = 1,
        attack_beta: float | None = 10.0,
        reduction: str = "mean",
        seed: int = 0,
        keep_norm_stats: bool = True,
    ) -> None:
        super().__init__(keep_norm_stats=keep_norm_stats, seed=seed)
        from .._internal.softplus import check_beta

        self.method = _differentiable_method(method)
        if not radius > 0:
            raise ValueError(f"radius must be > 0 (the L∞ size of the random perturbations), got {radius}.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        if reduction not in RF.REDUCTIONS:
            raise ValueError(f"reduction must be one of {RF.REDUCTIONS}, got {reduction!r}.")
        self.radius, self.n_samples, self.reduction = float(radius), int(n_samples), reduction
        self.softplus_beta = check_beta(softplus_beta, "softplus_beta")
        if isinstance(attack_steps, bool) or not isinstance(attack_steps, int) or attack_steps < 0:
            raise ValueError(f"attack_steps must be an int >= 0 (0: random perturbations only), got {attack_steps!r}.")
        self.attack_steps, self.attack_beta = attack_steps, check_beta(attack_beta, "attack_beta")

    def compute(self, model, inputs, targets, mask, *, seed):
        _reseed(self.method, seed)
        return RF.map_stability_penalty(
            model, inputs, targets, method=self.method, radius=self.radius, n_samples=self.n_samples,
            softplus_beta=self.softplus_beta, attack_steps=self.attack_steps, attack_beta=self.attack_beta,
            seed=seed, reduction=self.reduction,
            keep_norm_stats=self.keep_norm_stats,
        )  # fmt: skip


def _differentiable_method(method: Any) -> Any:
    """The attribution method of an attribution-based penalty: one whose maps have parameter gradients."""
    from ..attribution import build_attributor

    built = build_attributor(method)
    if not getattr(built, "differentiable", False):
        raise ValueError(
            f"{built!r} cannot give parameter gradients; use saliency, input_x_gradient, ig or expected_gradients."
        )
    return built


def _reseed(method: Any, seed: int) -> None:
    if hasattr(method, "seed"):
        method.seed = seed  # random methods (EG) draw afresh each step


def build_penalty(spec: Any, **overrides: Any) -> Penalty | Any:
    """A penalty from a registered name, a ``{"name": ..., **kwargs}`` mapping, an instance, or any
    callable ``(model, inputs, targets, mask) -> scalar``."""
    obj = PENALTIES.build(spec, **overrides)
    if not callable(obj):
        raise TypeError(
            f"{spec!r} did not give a callable penalty; pass a name from {PENALTIES.names()}, a mapping with "
            "'name', a Penalty instance, or a function (model, inputs, targets, mask) -> scalar."
        )
    return obj
