"""Black-box and learned-mask attribution methods (perturbation family).

Images give maps of shape (B,1,H,W) where the method masks spatially (the masks broadcast over
channels); Occlusion returns the input's shape. See each class for its forward-pass cost.
"""

from ._common import PerturbationAttributor
from .hsic import HSIC
from .occlusion import Occlusion
from .rise import RISE
from .sobol import Sobol

__all__ = [
    "HSIC",
    "RISE",
    "Occlusion",
    "PerturbationAttributor",
    "Sobol",
]
