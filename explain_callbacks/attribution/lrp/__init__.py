"""Layer-wise relevance propagation: rules ("what"), composites ("where"), canonizers ("model
surgery" that leaves the model untouched) and the :class:`LRP` attributor, registered as ``"lrp"``."""

from .canonizers import LRPUnsupportedError, Sum
from .composites import (
    COMPOSITES,
    Composite,
    build_composite,
    epsilon_alpha2_beta1,
    epsilon_gamma_box,
    epsilon_only,
    epsilon_plus_flat,
)
from .crp import (
    ConceptAtlas,
    RelevanceMaximization,
    concept_atlas,
    conditional_relevance,
    layer_relevance,
    relevance_maximization,
)
from .engine import LRP, lrp_hooks
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, Rule, WSquare, ZBox, ZPlus, build_rule, stabilize

__all__ = [
    "COMPOSITES",
    "LRP",
    "AlphaBeta",
    "Composite",
    "ConceptAtlas",
    "Epsilon",
    "Flat",
    "Gamma",
    "LRPUnsupportedError",
    "Norm",
    "RelevanceMaximization",
    "Pass",
    "Rule",
    "Sum",
    "WSquare",
    "ZBox",
    "ZPlus",
    "build_composite",
    "build_rule",
    "concept_atlas",
    "conditional_relevance",
    "layer_relevance",
    "epsilon_alpha2_beta1",
    "epsilon_gamma_box",
    "epsilon_only",
    "epsilon_plus_flat",
    "lrp_hooks",
    "relevance_maximization",
    "stabilize",
]
