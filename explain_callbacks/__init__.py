"""explain_callbacks: a PyTorch Lightning plugin that makes a network explain itself while it trains.

Public surface (each package documents more):

- ``attribution``: attribution methods, ``method(model, inputs, target) -> map`` (gradient, path, CAM,
  perturbation and learned-mask families).
- ``interaction``: contextual decomposition, ACD, integrated Hessians, HSIC/Sobol interactions.
- ``metrics``: faithfulness, robustness and sanity metrics (torchmetrics classes; ``metrics.functional``).
- ``regularize``: attribution penalties (CDEP, RRR, expected-gradients priors).
- ``distill``: students, fidelity and adaptive wavelet distillation.
- ``analysis``: analyses over many samples' maps (SpRAy) training-data attribution (TracIn) and
  energy-landscape conserved weights.
- ``callbacks``: the Lightning callbacks that orchestrate all of the above.
- ``predict``: a whole data set explained through ``trainer.predict`` (``ExplainWriter``), read back with
  ``ExplainReader`` / ``read_maps``.
- ``viz``: tensors to images.
- ``targets``: what is explained besides a class score: regions, positions, boxes, several at once.
"""

from . import (
    analysis,
    attribution,
    callbacks,
    datasets,
    distill,
    interaction,
    metrics,
    models,
    predict,
    regularize,
    targets,
    viz,
)
from ._internal.registry import ATTRIBUTIONS, INTERACTIONS, METRICS, PENALTIES, STUDENTS
from .attribution import Attributor, CaptumAttributor, build_attributor
from .callbacks import (
    AttributionMonitor,
    AttributionRegularizer,
    ConceptMonitor,
    Distiller,
    InfluenceMonitor,
    InteractionMonitor,
    LandscapeMonitor,
    ProbeCallback,
    SaliencyMasker,
    SpRAyMonitor,
)
from .predict import ExplainReader, ExplainWriter, read_maps
from .targets import BoxTarget, ClassTarget, MultiTarget, PositionTarget, PredictedRegion, RegionTarget, TargetOperator

__version__ = "0.1.0"

__all__ = [
    "ATTRIBUTIONS",
    "INTERACTIONS",
    "METRICS",
    "PENALTIES",
    "STUDENTS",
    "AttributionMonitor",
    "AttributionRegularizer",
    "Attributor",
    "BoxTarget",
    "CaptumAttributor",
    "ClassTarget",
    "ConceptMonitor",
    "Distiller",
    "ExplainReader",
    "ExplainWriter",
    "InfluenceMonitor",
    "InteractionMonitor",
    "LandscapeMonitor",
    "MultiTarget",
    "PositionTarget",
    "PredictedRegion",
    "ProbeCallback",
    "RegionTarget",
    "SaliencyMasker",
    "SpRAyMonitor",
    "TargetOperator",
    "analysis",
    "attribution",
    "build_attributor",
    "callbacks",
    "datasets",
    "distill",
    "interaction",
    "metrics",
    "models",
    "predict",
    "read_maps",
    "regularize",
    "targets",
    "viz",
]
