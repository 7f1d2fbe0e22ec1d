"""Composites: which LRP rule goes on which layer ("where", kept apart from the rules' "what").

The built-in composites follow Montavon et al. 2019 (§10.3) and Kohlbrenner et al. 2020 ("Towards
best practice in explaining neural network predictions with LRP", IJCNN): the epsilon rule on dense
layers, a positive-contribution rule (z⁺, γ or α2β1) on convolutions, a dedicated rule on the input
layer (flat or z^B), and on every composite: pass-through on elementwise activations and unmerged
BatchNorm, the norm rule (average pooling as the linear map it is, :class:`~.canonizers.Sum` split
in proportion to its summands). Layers without a rule (max pooling, dropout and identity in eval
mode, flatten/view, concatenation) carry relevance as their gradient: max pooling gives it all to
the window's winner, reshapes and concatenations move it unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from torch import nn

from .canonizers import Sum
from .rules import AlphaBeta, Epsilon, Flat, Gamma, LSTMRule, Norm, Pass, Rule, ZBox, ZPlus, build_rule

__all__ = [
    "COMPOSITES",
    "Composite",
    "build_composite",
    "epsilon_alpha2_beta1",
    "epsilon_gamma_box",
    "epsilon_only",
    "epsilon_plus_flat",
]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR = (nn.Linear,)
ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold,
)  # fmt: skip
AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
#: layer groups a user mapping may name instead of a class
GROUPS: dict[str, tuple[type, ...]] = {
    "conv": CONV,
    "linear": LINEAR,
    "dense": LINEAR,
    "activation": ACTIVATIONS,
    "avgpool": AVGPOOL,
    "batchnorm": BATCHNORM,
    "sum": (Sum,),
}

LayerKey = Union[type, tuple, str]
RuleSpec = Union[Rule, str, Mapping[str, Any]]


def _matches(key: LayerKey, module: nn.Module) -> bool:
    if isinstance(key, str):
        if key.lower() in GROUPS:
            return isinstance(module, GROUPS[key.lower()])
        return any(cls.__name__ == key for cls in type(module).__mro__)  # a class name, e.g. "Conv2d"
    return isinstance(module, key)


class Composite:
    """Rules by layer name, by first layer, and by layer type (first match wins, in that order).

    Args:
        layer_map: ``[(layer type | tuple of types | class name | group, rule), ...]``; groups are
            ``conv``, ``linear``/``dense``, ``activation``, ``avgpool``, ``batchnorm``, ``sum``.
        first_map: the same, for the first Linear/Conv layer the input reaches (found by running
            the model, so it is the first in execution order, not in definition order).
        name_map: ``{qualified module name: rule}`` (names as in ``model.named_modules()``).
        name: how the composite reads in reprs and logs.

    Rules are given as instances, names or ``{"name": ..., **kwargs}`` (:func:`~.rules.build_rule`).
    """

    def __init__(
        self,
        layer_map: Sequence[tuple[LayerKey, RuleSpec]] = (),
        first_map: Sequence[tuple[LayerKey, RuleSpec]] = (),
        name_map: Mapping[str, RuleSpec] | None = None,
        name: str = "custom",
    ) -> None:
        self.layer_map = [(k, build_rule(r)) for k, r in layer_map]
        self.first_map = [(k, build_rule(r)) for k, r in first_map]
        self.name_map = {k: build_rule(r) for k, r in (name_map or {}).items()}
        self.name = name
        #: the LRP engine's per-model setups under this composite (which rule on which module), kept while the
        #: model lives
        self._setups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def rule(self, name: str, module: nn.Module, first: bool) -> Rule | None:
        """The rule for ``module`` (None: its gradient)."""
        if name in self.name_map:
            return self.name_map[name]
        if first:
            for key, rule in self.first_map:
                if _matches(key, module):
                    return rule
        for key, rule in self.layer_map:
            if _matches(key, module):
                return rule
        return None

    def with_user_maps(
        self, layer_map: Mapping[LayerKey, RuleSpec] | Sequence | None, name_map: Mapping[str, RuleSpec] | None
    ) -> Composite:
        """A copy whose user mappings come before the composite's own."""
        items = list(layer_map.items()) if isinstance(layer_map, Mapping) else list(layer_map or ())
        out = Composite(name=self.name)
        out.layer_map = [(k, build_rule(r)) for k, r in items] + self.layer_map
        out.first_map = list(self.first_map)
        out.name_map = {**self.name_map, **{k: build_rule(r) for k, r in (name_map or {}).items()}}
        return out

    def __repr__(self) -> str:
        return f"Composite({self.name!r})"


def _base(stabilizer: float) -> list[tuple[LayerKey, Rule]]:
    return [(ACTIVATIONS, Pass()), (Sum, Norm(stabilizer)), (AVGPOOL, Norm(stabilizer)), (BATCHNORM, Pass()),
            (nn.LSTM, LSTMRule(stabilizer))]  # fmt: skip


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """Flat on the input layer, z⁺ on convolutions, ε on dense layers (Kohlbrenner et al. 2020's
    recommended "LRP-CMP" for CNNs; needs no bounds of the input, hence the default)."""
    return Composite(
        layer_map=[*_base(stabilizer), (CONV, ZPlus(stabilizer)), (LINEAR, Epsilon(epsilon))],
        first_map=[(CONV + LINEAR, Flat(stabilizer))],
        name="epsilon_plus_flat",
    )


def epsilon_gamma_box(
    low: Any = None, high: Any = None, epsilon: float = 1e-6, gamma: float = 0.25, stabilizer: float = 1e-6
) -> Composite:
    """z^B on the first convolution (inputs bounded by ``[low, high]``), γ on the other
    convolutions, ε on dense layers (Montavon et al. 2019, §10.3)."""
    if low is None or high is None:
        raise ValueError(
            "epsilon_gamma_box needs the input's bounds: low=... and high=... (numbers, or per-channel (1, C, 1, 1) "
            "tensors, e.g. the normalised images of 0 and 1); or use composite='epsilon_plus_flat', which needs none."
        )
    return Composite(
        layer_map=[*_base(stabilizer), (CONV, Gamma(gamma, stabilizer)), (LINEAR, Epsilon(epsilon))],
        first_map=[(CONV, ZBox(low, high, stabilizer))],
        name="epsilon_gamma_box",
    )


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """α2β1 on convolutions, ε on dense layers (Bach et al. 2015; Montavon et al. 2019)."""
    return Composite(
        layer_map=[*_base(stabilizer), (CONV, AlphaBeta(2.0, 1.0, stabilizer)), (LINEAR, Epsilon(epsilon))],
        name="epsilon_alpha2_beta1",
    )


def epsilon_only(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """ε on every Linear/Conv layer (with ``epsilon=0`` and zero biases on a ReLU net: gradient × input)."""
    return Composite(layer_map=[*_base(stabilizer), (CONV + LINEAR, Epsilon(epsilon))], name="epsilon")


COMPOSITES: dict[str, Callable[..., Composite]] = {
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_gamma_box": epsilon_gamma_box,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon": epsilon_only,
}


def build_composite(spec: Composite | str | Mapping[str, Any], **kwargs: Any) -> Composite:
    """A composite from an instance, a name (``epsilon_plus_flat``, ``epsilon_gamma_box``,
    ``epsilon_alpha2_beta1``, ``epsilon``) with its keyword arguments, or ``{"name": ..., **kwargs}``."""
    if isinstance(spec, Composite):
        if kwargs:
            raise TypeError(f"Composite arguments {sorted(kwargs)} given with a Composite instance; set them on it.")
        return spec
    if isinstance(spec, Mapping):
        kwargs = {**spec, **kwargs}
        spec = kwargs.pop("name", None)
    if not isinstance(spec, str) or spec.lower() not in COMPOSITES:
        raise KeyError(f"Unknown LRP composite {spec!r}. Available: {', '.join(COMPOSITES)}, or a Composite instance.")
    return COMPOSITES[spec.lower()](**kwargs)
