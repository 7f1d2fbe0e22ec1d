"""Embedded (scikit-learn) and procedural data sets with Lightning data modules; nothing is downloaded."""

from .decoy import (
    ColorDigitsDataModule,
    DecoyDigitsDataModule,
    RandomPixelGroups,
    corner_masks,
    make_color_digits,
    make_decoy_digits,
)
from .nid import NIDDataModule, make_nid_data, nid_function, nid_pair_truth
from .shapes import SHAPES, ShapesData, ShapesDataModule, make_shapes
from .signals import SignalDataModule, make_signals
from .tabular_images import (
    BreastCancerDataModule,
    DigitsDataModule,
    TensorDataModule,
    load_breast_cancer_tensors,
    load_digits_tensors,
    split_indices,
)
from .text import KEYWORDS, TEXT_VOCAB, TextKeywordDataModule, make_keyword_text

__all__ = [
    "SHAPES",
    "BreastCancerDataModule",
    "ColorDigitsDataModule",
    "DecoyDigitsDataModule",
    "DigitsDataModule",
    "NIDDataModule",
    "RandomPixelGroups",
    "ShapesData",
    "ShapesDataModule",
    "SignalDataModule",
    "TensorDataModule",
    "TextKeywordDataModule",
    "KEYWORDS",
    "TEXT_VOCAB",
    "make_keyword_text",
    "corner_masks",
    "load_breast_cancer_tensors",
    "load_digits_tensors",
    "make_color_digits",
    "make_decoy_digits",
    "make_nid_data",
    "make_shapes",
    "make_signals",
    "nid_function",
    "nid_pair_truth",
    "split_indices",
]
