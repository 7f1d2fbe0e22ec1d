"""Functional metrics: one score per sample."""

from .complexity import complexity, sparseness
from .drift import explanation_drift

__all__ = ["complexity", "explanation_drift", "sparseness"]
