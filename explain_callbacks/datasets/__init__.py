"""Embedded and procedural data sets (no downloads) with Lightning data modules."""

from .tabular_images import (
    BreastCancerDataModule,
    DigitsDataModule,
    TensorDataModule,
    load_breast_cancer_tensors,
    load_digits_tensors,
    split_indices,
)

__all__ = [
    "BreastCancerDataModule",
    "DigitsDataModule",
    "TensorDataModule",
    "load_breast_cancer_tensors",
    "load_digits_tensors",
    "split_indices",
]
