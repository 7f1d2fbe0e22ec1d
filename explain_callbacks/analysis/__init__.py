"""Analyses over many samples' explanations (methods.md section 8).

- :func:`spray`: spectral relevance analysis (Lapuschkin et al. 2019): how many prediction strategies
  a class's attribution maps show, and what each looks at; :class:`~explain_callbacks.callbacks.SpRAyMonitor`
  runs it during training.
- :func:`fragility_attack`: the iterative feature-importance attack of Ghorbani et al. 2019: how much
  a map changes under an imperceptible perturbation that keeps the prediction (monitored per epoch by the
  ``fragility`` metric); :func:`manipulation_attack`: the targeted attack of Dombrowski et al. 2019 (the map
  moved towards a chosen one, the output kept).
- :func:`tracin_scores` / :func:`self_influence`: TracIn training-data attribution (Pruthi et al. 2020): which
  training samples made a prediction, and which ones the model keeps fighting (mislabelled);
  :class:`~explain_callbacks.callbacks.InfluenceMonitor` tracks it during training.
"""

from .attack import FragilityResult, ManipulationResult, fragility_attack, manipulation_attack
from .influence import (
    InfluenceCheckpoint,
    RandomProjection,
    adam_preconditioner,
    layer_parameters,
    per_sample_gradients,
    self_influence,
    tracin_scores,
)
from .spray import SpectralClusters, kmeans, spray

__all__ = [
    "FragilityResult",
    "ManipulationResult",
    "InfluenceCheckpoint",
    "RandomProjection",
    "SpectralClusters",
    "adam_preconditioner",
    "fragility_attack",
    "manipulation_attack",
    "kmeans",
    "layer_parameters",
    "per_sample_gradients",
    "self_influence",
    "spray",
    "tracin_scores",
]
