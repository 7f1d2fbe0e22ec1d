"""Attribution methods: one family per module, all called as ``method(model, inputs, target)``."""

from .._internal.registry import ATTRIBUTIONS
from . import blackbox
from .base import Attributor, make_generator
from .blackbox import *  # noqa: F403
from .cam import GradCAM
from .captum_adapter import CaptumAttributor
from .embedding import TOKEN_REDUCTIONS, EmbeddingView, TokenProbe, find_embedding, token_scores
from .gradient import InputXGradient, Saliency, SmoothGrad
from .lrp import LRP
from .neuron_region import NeuronRegionIG
from .path import ExpectedGradients, IntegratedGradients, make_baseline, quadrature

__all__ = [
    "ATTRIBUTIONS",
    "Attributor",
    "CaptumAttributor",
    "EmbeddingView",
    "ExpectedGradients",
    "GradCAM",
    "InputXGradient",
    "IntegratedGradients",
    "LRP",
    "NeuronRegionIG",
    "Saliency",
    "SmoothGrad",
    "TOKEN_REDUCTIONS",
    "TokenProbe",
    "build_attributor",
    "find_embedding",
    "make_baseline",
    "make_generator",
    "quadrature",
    "token_scores",
]


def build_attributor(spec, **overrides) -> Attributor:
    """A method from a short name, a ``{"name": ..., **kwargs}`` mapping, an instance, or a Captum
    attribution class/instance (wrapped in :class:`CaptumAttributor`)."""
    if isinstance(spec, Attributor):
        return spec
    mod = type(spec).__module__ if not isinstance(spec, type) else spec.__module__
    if mod.startswith("captum."):
        return CaptumAttributor(spec)
    obj = ATTRIBUTIONS.build(spec, **overrides)
    if not callable(obj):
        raise TypeError(f"{spec!r} did not give a callable attribution method.")
    return obj
