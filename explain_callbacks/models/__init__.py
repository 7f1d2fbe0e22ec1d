"""Example networks and a generic LightningModule."""

from .lit import LitClassifier
from .nets import MLP, DecoyCNN, SmallCNN

__all__ = ["MLP", "DecoyCNN", "LitClassifier", "SmallCNN"]
