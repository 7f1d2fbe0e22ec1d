"""Example networks and generic LightningModules (classification/regression, segmentation)."""

from .lit import LitClassifier
from .nets import MLP, DecoyCNN, SmallCNN
from .segmentation import LitSegmenter, SegNet
from .text import TokenTransformer

__all__ = ["MLP", "DecoyCNN", "LitClassifier", "LitSegmenter", "SegNet", "SmallCNN", "TokenTransformer"]
