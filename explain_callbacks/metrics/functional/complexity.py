"""Complexity of a map: Gini sparseness (Chalasani et al. 2020) and entropy (Bhatt et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._internal.ops import sorted_last
from ._utils import check_finite_map

__all__ = ["complexity", "sparseness"]


def sparseness(attributions: Tensor, eps: float = 1e-12) -> Tensor:
    """Gini index of |A| per sample (1 = all mass on one feature, 0 = uniform), as Quantus' Sparseness.

    G = Σ_k (2k − n − 1) a_(k) / (n Σ a), a sorted ascending.
    """
    check_finite_map(attributions)
    a = attributions.detach().reshape(attributions.shape[0], -1).abs()
    n = a.shape[1]
    a_sorted = sorted_last(a).double()  # sort in the input's precision (same order), sum in float64
    k = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    num = ((2 * k - n - 1) * a_sorted).sum(1)
    den = n * a_sorted.sum(1)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))


def complexity(attributions: Tensor, eps: float = 1e-12) -> Tensor:
    """Shannon entropy of the normalised |A| per sample (natural log; lower is simpler)."""
    check_finite_map(attributions)
    a = attributions.detach().reshape(attributions.shape[0], -1).abs().double()
    p = a / a.sum(1, keepdim=True).clamp_min(eps)
    return -(p * torch.log(p.clamp_min(eps))).sum(1)
