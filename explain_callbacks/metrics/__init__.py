"""Faithfulness, robustness, localisation and sanity metrics of attribution maps.

Classes are torchmetrics ``Metric`` objects (states reduced by sum across processes) registered by
short name in :data:`METRICS`; their math lives in :mod:`explain_callbacks.metrics.functional`
(one score per sample). ``kind = "explanation"`` metrics score given maps,
``update(model, inputs, attributions, target=None, masks=None)``; ``kind = "explainer"`` metrics
re-run the method, ``update(model, inputs, target, method, attributions=None, masks=None)``.
"""

from .._internal.registry import METRICS
from . import functional
from .base import ExplainerMetric, ExplanationMetric, ScoreMetric
from .explainer import (
    AvgSensitivity,
    CompletenessSoundness,
    Fragility,
    LocalLipschitz,
    MaxSensitivity,
    Randomisation,
)
from .faithfulness import CompletenessError, Infidelity, MuFidelity
from .maps import Complexity, DabkowskiSaliency, Drift, EnergyPointingGame, PointingGame, Sparseness
from .perturbation import ABC, Deletion, Insertion, InsertionDeletion

__all__ = [
    "ABC",
    "METRICS",
    "AvgSensitivity",
    "CompletenessError",
    "CompletenessSoundness",
    "Complexity",
    "DabkowskiSaliency",
    "Deletion",
    "Drift",
    "EnergyPointingGame",
    "ExplainerMetric",
    "ExplanationMetric",
    "Fragility",
    "Infidelity",
    "Insertion",
    "InsertionDeletion",
    "LocalLipschitz",
    "MaxSensitivity",
    "MuFidelity",
    "PointingGame",
    "Randomisation",
    "ScoreMetric",
    "Sparseness",
    "build_metric",
    "functional",
]


def build_metric(spec, **overrides):
    """A metric from a short name, a ``{"name": ..., **kwargs}`` mapping, or an instance (returned as is)."""
    return METRICS.build(spec, **overrides)
