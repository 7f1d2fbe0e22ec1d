"""Black-box and learned-mask attribution methods (perturbation family).

Images give maps of shape (B,1,H,W) where the method masks spatially (the masks broadcast over
channels): RISE, Sobol, HSIC, meaningful/extremal perturbation, sound masks and the real-time
masker. Occlusion, NeFLAG and nonlinear saliency return the input's shape. NeFLAG and nonlinear
saliency are reconstructions (see their docstrings). Each class documents its forward-pass cost and
has ``n_forwards(input_shape)``.
"""

from ._common import PerturbationAttributor
from .hsic import HSIC
from .meaningful import MeaningfulPerturbation, extremal_perturbation
from .neflag import NeFLAG, neflag1, neflag10, neflag20
from .nonlinear_saliency import NonlinearSaliency
from .occlusion import Occlusion
from .realtime import MaskerObjective, MaskingNetwork, RealTimeSaliency, cw_hinge, train_masker_step
from .rise import RISE
from .sobol import Sobol
from .sound_mask import SoundMask

__all__ = [
    "HSIC",
    "RISE",
    "MaskerObjective",
    "MaskingNetwork",
    "MeaningfulPerturbation",
    "NeFLAG",
    "NonlinearSaliency",
    "Occlusion",
    "PerturbationAttributor",
    "RealTimeSaliency",
    "Sobol",
    "SoundMask",
    "cw_hinge",
    "extremal_perturbation",
    "neflag1",
    "neflag10",
    "neflag20",
    "train_masker_step",
]
