"""Example networks and a generic LightningModule."""

from .lit import LitClassifier
from .nets import MLP, SmallCNN

__all__ = ["MLP", "LitClassifier", "SmallCNN"]
