"""Analyses over many samples' explanations (methods.md section 8).

- :func:`spray`: spectral relevance analysis (Lapuschkin et al. 2019): how many prediction strategies
  a class's attribution maps show, and what each looks at; :class:`~explain_callbacks.callbacks.SpRAyMonitor`
  runs it during training.
- :func:`fragility_attack`: the iterative feature-importance attack of Ghorbani et al. 2019: how much
  a map changes under an imperceptible perturbation that keeps the prediction.
- :func:`tracin_scores` / :func:`self_influence`: TracIn training-data attribution (Pruthi et al. 2020): which
  training samples made a prediction, and which ones the model keeps fighting (mislabelled);
  :class:`~explain_callbacks.callbacks.InfluenceMonitor` tracks it during training.
- :func:`signature` / :func:`logsignature`: truncated path signatures of streams (B, T, D), batched and
  differentiable (Lyons & McLeod 2022), with time, basepoint and lead-lag augmentation;
  :class:`~explain_callbacks.distill.SignatureStudent` distils a sequence model onto them.
"""

from .attack import FragilityResult, fragility_attack
from .influence import (
    InfluenceCheckpoint,
    RandomProjection,
    adam_preconditioner,
    layer_parameters,
    per_sample_gradients,
    self_influence,
    tracin_scores,
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
    "FragilityResult",
    "InfluenceCheckpoint",
    "RandomProjection",
    "SpectralClusters",
    "adam_preconditioner",
    "augment",
    "fragility_attack",
    "kmeans",
    "layer_parameters",
    "lead_lag",
    "levy_area",
    "logsignature",
    "lyndon_words",
    "per_sample_gradients",
    "self_influence",
    "signature",
    "signature_channels",
    "signature_words",
    "spray",
    "tracin_scores",
]
