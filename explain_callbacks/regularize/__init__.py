"""Attribution regularizers: penalties on explanations added to the training loss.

Plain functions of (model, inputs, targets, mask) returning a scalar (:mod:`.functional`), registered
penalty objects (``PENALTIES``: ``cdep``, ``rrr``, ``eg_mask``, ``eg_tv``, ``eg_gini``,
``attribution``, ``map_stability``), and a LightningModule mixin. The Lightning callback that adds a penalty to any
module's loss is :class:`explain_callbacks.callbacks.regularizer.AttributionRegularizer`.
"""

from .._internal.registry import PENALTIES
from .functional import (
    attribution_penalty,
    cdep_penalty,
    eg_mask_prior,
    eg_sparsity_prior,
    eg_tv_prior,
    expected_gradients_k,
    gini,
    map_stability_penalty,
    norm_stats_kept,
    prepare_mask,
    rrr_penalty,
    total_variation,
)
from .mixin import RegularizerMixin
from .penalties import (
    AttributionPenalty,
    CDEPPenalty,
    EGPrior,
    MapStabilityPenalty,
    Penalty,
    RRRPenalty,
    build_penalty,
)

__all__ = [
    "PENALTIES",
    "AttributionPenalty",
    "CDEPPenalty",
    "EGPrior",
    "MapStabilityPenalty",
    "Penalty",
    "RRRPenalty",
    "RegularizerMixin",
    "attribution_penalty",
    "build_penalty",
    "cdep_penalty",
    "eg_mask_prior",
    "eg_sparsity_prior",
    "eg_tv_prior",
    "expected_gradients_k",
    "gini",
    "map_stability_penalty",
    "norm_stats_kept",
    "prepare_mask",
    "rrr_penalty",
    "total_variation",
]
