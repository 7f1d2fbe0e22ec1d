"""Interaction scores: contextual decomposition (CD / ACD), integrated Hessians, kernel (HSIC) and
variance (Sobol) interactions, all as ``scores = method(model, inputs, target, groups=...) -> (B, P, P)``.

Registered in ``INTERACTIONS``: ``"cd"``, ``"integrated_hessians"`` (``"ih"``), ``"hsic"``, ``"sobol"``.
CD is also an attribution method (``ATTRIBUTIONS["cd"]``).
"""

from .._internal.registry import INTERACTIONS
from .acd import ACD, ACDHierarchy, draw_hierarchy
from .base import Groups, InteractionMethod, build_interaction, make_groups, pair_auc, top_pairs
from .blackbox import HSICInteraction, SobolInteraction
from .cd import (
    CDUnsupportedError,
    Decomposition,
    cd_batched,
    cd_forward,
    cd_logits,
    cd_propagate,
    cd_scores,
    supported_operations,
    update_norm_stats,
)
from .contextual import CDInteraction, ContextualDecomposition, patch_groups
from .integrated_hessians import IntegratedHessians, relu_as_softplus

__all__ = [
    "ACD",
    "INTERACTIONS",
    "ACDHierarchy",
    "CDInteraction",
    "CDUnsupportedError",
    "ContextualDecomposition",
    "Decomposition",
    "Groups",
    "HSICInteraction",
    "IntegratedHessians",
    "InteractionMethod",
    "SobolInteraction",
    "build_interaction",
    "cd_batched",
    "cd_forward",
    "cd_logits",
    "cd_propagate",
    "cd_scores",
    "draw_hierarchy",
    "make_groups",
    "pair_auc",
    "patch_groups",
    "relu_as_softplus",
    "supported_operations",
    "top_pairs",
    "update_norm_stats",
]
