"""explain_callbacks: a PyTorch Lightning plugin that makes a network explain itself while it trains.

Public surface (see each package for more):

- ``explain_callbacks.attribution``: attribution methods, ``method(model, inputs, target) -> map``.
- ``explain_callbacks.callbacks``: Lightning callbacks (``AttributionMonitor``, ...).
- ``explain_callbacks.viz``: tensors to images.
"""

from . import attribution, callbacks, viz
from .attribution import Attributor, CaptumAttributor, build_attributor
from .callbacks import AttributionMonitor, ProbeCallback

__version__ = "0.1.0"

__all__ = [
    "AttributionMonitor", "Attributor", "CaptumAttributor", "ProbeCallback", "attribution", "build_attributor",
    "callbacks", "viz",
]
