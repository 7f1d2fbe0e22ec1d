"""Example networks and a generic LightningModule."""

from .lit import LitClassifier
from .nets import MLP, SmallCNN
from .text import TokenTransformer

__all__ = ["MLP", "LitClassifier", "SmallCNN", "TokenTransformer"]
