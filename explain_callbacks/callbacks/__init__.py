"""Lightning callbacks: orchestration only (when, on what, where to log)."""

from .attribution_monitor import AttributionMonitor
from .base import ProbeCallback
from .concept_monitor import ConceptMonitor
from .distiller import Distiller
from .influence_monitor import InfluenceMonitor
from .interaction_monitor import InteractionMonitor
from .landscape_monitor import LandscapeMonitor
from .regularizer import AttributionRegularizer
from .saliency_masker import SaliencyMasker
from .spray_monitor import SpRAyMonitor

__all__ = [
    "AttributionMonitor",
    "AttributionRegularizer",
    "ConceptMonitor",
    "Distiller",
    "InfluenceMonitor",
    "InteractionMonitor",
    "LandscapeMonitor",
    "ProbeCallback",
    "SaliencyMasker",
    "SpRAyMonitor",
]
