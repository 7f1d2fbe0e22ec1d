"""explain_callbacks: a PyTorch Lightning plugin that makes a network explain itself while it trains."""

from . import attribution
from .attribution import build_attributor

__version__ = "0.1.0"

__all__ = ["attribution", "build_attributor"]
