"""Interaction scores: contextual decomposition (CD / ACD), integrated Hessians, kernel and variance
interactions, all as ``scores = method(model, inputs, target, groups=...) -> (B, P, P)``."""

from .cd import (
    CDUnsupportedError,
    Decomposition,
    cd_batched,
    cd_logits,
    cd_propagate,
    cd_scores,
    supported_operations,
)

__all__ = [
    "CDUnsupportedError",
    "Decomposition",
    "cd_batched",
    "cd_logits",
    "cd_propagate",
    "cd_scores",
    "supported_operations",
]
