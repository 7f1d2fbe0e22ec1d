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
- :func:`landscape_analysis`: energy-landscape conserved weights (Niroomand & Wales 2023): basin hopping over
  the loss's minima, aligned for hidden-unit symmetry, ranks inputs by conserved first-layer weights;
  :class:`~explain_callbacks.callbacks.LandscapeMonitor` runs it at the end of fit.
- :func:`signature` / :func:`logsignature`: truncated path signatures of streams (B, T, D), batched and
  differentiable (Lyons & McLeod 2022), with time, basepoint and lead-lag augmentation;
  :class:`~explain_callbacks.distill.SignatureStudent` distils a sequence model onto them.
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
from .landscape import (
    FeatureScores,
    LandscapeResult,
    LandscapeSample,
    align_layers,
    align_minima,
    basin_hopping,
    conserved_feature_scores,
    deduplicate_minima,
    hungarian,
    landscape_analysis,
    layer_chain,
)
from .signatures import (
    augment,
    lead_lag,
    levy_area,
    logsignature,
    lyndon_words,
    signature,
    signature_channels,
    signature_words,
)
from .spray import SpectralClusters, kmeans, spray

__all__ = [
    "FeatureScores",
    "FragilityResult",
    "InfluenceCheckpoint",
    "LandscapeResult",
    "LandscapeSample",
    "ManipulationResult",
    "RandomProjection",
    "SpectralClusters",
    "adam_preconditioner",
    "align_layers",
    "align_minima",
    "augment",
    "basin_hopping",
    "conserved_feature_scores",
    "deduplicate_minima",
    "fragility_attack",
    "hungarian",
    "kmeans",
    "landscape_analysis",
    "layer_chain",
    "layer_parameters",
    "lead_lag",
    "levy_area",
    "logsignature",
    "lyndon_words",
    "manipulation_attack",
    "per_sample_gradients",
    "self_influence",
    "signature",
    "signature_channels",
    "signature_words",
    "spray",
    "tracin_scores",
]
