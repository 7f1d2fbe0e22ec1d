"""Localisation against ground-truth masks: pointing game and energy-based pointing game.

Pointing game (Zhang, Bargal, Lin, Brandt, Shen & Sclaroff 2018, "Top-down Neural Attention by
Excitation Backprop", IJCV, arXiv:1608.00507): a hit if the maximum of the (channel-summed) map lies
within ``tolerance`` pixels of the mask (15 px on their 224-px images). Ties: a hit if any maximal
position qualifies (as Quantus' ``PointingGame``). Empty masks give NaN (skipped by the classes).

Energy-based pointing game (Wang et al. 2020, Score-CAM, arXiv:1910.01279): the share of the positive
(channel-summed) attribution that falls inside the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import check_finite_map, check_masks, feature_relevance

__all__ = ["energy_pointing_game", "pointing_game"]


def _relevance_map(attributions: Tensor, masks: Tensor, inputs: Tensor | None) -> tuple[Tensor, Tensor]:
    """Channel-summed relevance (B, *spatial) or (B, D) and boolean masks of the same shape."""
    check_finite_map(attributions)
    if inputs is None and attributions.ndim == 3 and tuple(masks.shape) == tuple(attributions.shape):
        # a (B,H,W) map with masks of its very shape is a 2-D map (read as (B,C,L) it was collapsed to
        # columns: a maximum in the mask's column but rows away counted as a hit); pass the inputs for
        # (B,C,L) signal maps
        attributions = attributions.unsqueeze(1)
    ref = inputs if inputs is not None else attributions
    m = check_masks(masks, ref).to(ref.device)  # masks, maps and inputs may live on different devices
    if ref.ndim >= 3:
        rel, _ = feature_relevance(attributions, ref if inputs is not None else attributions, "pixel")
        return rel.view(m.shape), m
    return attributions.detach().to(ref.device).reshape(m.shape), m


def _disk(radius: int, ndim: int, device: torch.device) -> Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    grids = torch.meshgrid(*([r] * ndim), indexing="ij")
    return (sum(g**2 for g in grids) <= radius**2 + 1e-6).float()


def pointing_game(
    attributions: Tensor,
    masks: Tensor,
    inputs: Tensor | None = None,
    *,
    tolerance: int | None = None,
) -> Tensor:
    """1.0 for a hit, 0.0 for a miss, NaN for an empty mask, per sample (B,).

    Args:
        attributions: (B,C,H,W), (B,1,H,W), (B,H,W), (B,C,L) or (B,D) maps (channels are summed). Without
            ``inputs``, a 3-D map with masks of the same shape is read as (B,H,W), otherwise as (B,C,L).
        masks: ground truth, (B,H,W), (B,1,H,W) or (B,C,H,W) (and (B,D) for tabular maps).
        inputs: the inputs, only to check shapes (a one-channel map fits a C-channel input).
        tolerance: pixels (Euclidean) around the mask that still count. ``None`` scales the paper's 15 px
            at 224 px to the input: ``round(15 * max(spatial) / 224)`` (2 px at 32 px).
    """
    rel, m = _relevance_map(attributions, masks, inputs)
    b = rel.shape[0]
    is_max = rel.reshape(b, -1) == rel.reshape(b, -1).max(1, keepdim=True).values
    spatial = tuple(m.shape[1:])
    if tolerance is None:
        tolerance = round(15 * max(spatial) / 224) if len(spatial) >= 1 and attributions.ndim >= 3 else 0
    if tolerance > 0 and len(spatial) in (1, 2, 3) and attributions.ndim >= 3:
        k = _disk(int(tolerance), len(spatial), m.device)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]
        area = conv(m.float().unsqueeze(1), k.view(1, 1, *k.shape), padding=int(tolerance)).squeeze(1)
        target_region = area > 0.5
    else:
        target_region = m
    hit = (is_max & target_region.reshape(b, -1)).any(1).to(torch.float64)
    hit[m.reshape(b, -1).sum(1) == 0] = math.nan
    return hit


def energy_pointing_game(attributions: Tensor, masks: Tensor, inputs: Tensor | None = None) -> Tensor:
    """Σ_{mask} A⁺ / Σ A⁺ per sample (B,) on the channel-summed map; NaN for an empty mask or no
    positive attribution."""
    rel, m = _relevance_map(attributions, masks, inputs)
    b = rel.shape[0]
    pos = rel.reshape(b, -1).double().clamp_min(0)
    inside = (pos * m.reshape(b, -1)).sum(1)
    total = pos.sum(1)
    out = inside / total.clamp_min(1e-30)
    out[(total <= 0) | (m.reshape(b, -1).sum(1) == 0)] = math.nan
    return out
