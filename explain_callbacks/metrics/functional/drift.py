"""Explanation drift across training: rank correlation of this epoch's map with the previous one."""

from __future__ import annotations

from torch import Tensor

from ..._internal.ops import spearman
from ._utils import check_finite_map

__all__ = ["explanation_drift"]


def explanation_drift(previous: Tensor, current: Tensor) -> Tensor:
    """Per-sample Spearman correlation between two maps of the same probe set (1 = unchanged ranking)."""
    if previous.shape != current.shape:
        raise ValueError(f"maps differ in shape: {tuple(previous.shape)} vs {tuple(current.shape)}.")
    check_finite_map(previous)
    check_finite_map(current)
    b = current.shape[0]
    # ranks in the maps' precision (the same order), the correlation itself in float64
    return spearman(previous.detach().reshape(b, -1), current.detach().reshape(b, -1).to(previous.dtype))
