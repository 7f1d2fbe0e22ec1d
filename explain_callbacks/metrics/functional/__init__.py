"""Functional metrics: one score per sample, (B,), on plain tensors and an ``nn.Module``."""

from .abc import abc
from .completeness import completeness_error
from .completeness_soundness import completeness_soundness
from .complexity import complexity, sparseness
from .dabkowski import dabkowski_saliency
from .deletion import deletion, insertion, insertion_deletion, perturbation_curve
from .drift import explanation_drift
from .fragility import fragility
from .infidelity import infidelity
from .localisation import energy_pointing_game, pointing_game
from .mufidelity import MUFIDELITY_PRESETS, mufidelity, random_subsets
from .randomisation import model_randomisation
from .sensitivity import avg_sensitivity, local_lipschitz, max_sensitivity, sensitivity

__all__ = [
    "MUFIDELITY_PRESETS",
    "abc",
    "avg_sensitivity",
    "completeness_error",
    "completeness_soundness",
    "complexity",
    "dabkowski_saliency",
    "deletion",
    "energy_pointing_game",
    "explanation_drift",
    "fragility",
    "infidelity",
    "insertion",
    "insertion_deletion",
    "local_lipschitz",
    "max_sensitivity",
    "model_randomisation",
    "mufidelity",
    "perturbation_curve",
    "pointing_game",
    "random_subsets",
    "sensitivity",
    "sparseness",
]
