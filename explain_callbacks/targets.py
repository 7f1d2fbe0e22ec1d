"""Target operators: explain any scalar of a model's output, not only a class score.

``method(model, x, target)`` and every metric take, besides class indices, an operator that maps the
model's output to one scalar per sample: a region of a segmentation output (:class:`RegionTarget`), one
position of a sequence output (:class:`PositionTarget`), one box of a detector-style output
(:class:`BoxTarget`), or several of them per sample at once (:class:`MultiTarget`: maps (B, K, ...)). The
monitors take an operator as ``target=``, or a factory ``(model, inputs, labels) -> target`` such as
:class:`PredictedRegion` (the region the model predicts). See docs/dense.md.
"""

from ._internal.target_ops import (
    BoxTarget,
    ClassTarget,
    MultiTarget,
    PositionTarget,
    PredictedRegion,
    RegionTarget,
    TargetOperator,
)

__all__ = [
    "BoxTarget",
    "ClassTarget",
    "MultiTarget",
    "PositionTarget",
    "PredictedRegion",
    "RegionTarget",
    "TargetOperator",
]
