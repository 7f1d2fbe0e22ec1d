"""Turning tensors into plain images without labels (CHW float in [0, 1]): the fallback when matplotlib is
missing, and the pixels that labelled figures are made of."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .colormaps import colorize

__all__ = ["class_colors", "make_grid", "map_to_2d", "matrix_image", "overlay", "to_rgb", "upscale"]


def to_rgb(images: Tensor) -> Tensor:
    """(N,C,H,W) images of any range to RGB in [0,1] (per-image min-max; 1 channel repeated)."""
    x = images.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x.mean(1, keepdim=True)
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(1).values.view(-1, 1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1, 1)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def map_to_2d(attributions: Tensor) -> Tensor:
    """Reduce a map to one 2-D picture per sample: (B,C,H,W) summed over channels; (B,T,D) as T×D;
    (B,C,L) as C×L; (B,D) as 1×D."""
    a = attributions.detach().float()
    if a.ndim == 4:
        return a.sum(1)
    if a.ndim == 3:
        return a
    if a.ndim == 2:
        return a.unsqueeze(1)
    raise ValueError(f"Cannot draw a map of shape {tuple(attributions.shape)}.")


def overlay(images: Tensor, maps: Tensor, alpha: float = 0.7, signed: bool = True) -> Tensor:
    """Blend (N,H,W) heatmaps over (N,C,H,W) images shown in grey.

    The colour's opacity grows with |attribution| (up to ``alpha``), so unimportant pixels show the
    image and important ones the colour: diverging blue/red for signed maps, heat otherwise.
    """
    base = to_rgb(images)
    if maps.shape[-2:] != base.shape[-2:]:
        maps = F.interpolate(maps.unsqueeze(1).float(), size=base.shape[-2:], mode="bilinear").squeeze(1)
    heat = colorize(maps, "diverging" if signed else "heat", symmetric=signed)
    m = maps.detach().float().cpu()
    flat = m.reshape(m.shape[0], -1)
    if signed:
        scale = torch.quantile(flat.abs(), 0.995, dim=1).clamp_min(1e-12).view(-1, 1, 1)
        weight = (m.abs() / scale).clamp(0, 1)
    else:
        lo = flat.min(1).values.view(-1, 1, 1)
        weight = ((m - lo) / (flat.max(1).values.view(-1, 1, 1) - lo).clamp_min(1e-12)).clamp(0, 1)
    weight = (alpha * weight.sqrt()).unsqueeze(1)  # sqrt: faint evidence stays visible
    gray = 0.25 + 0.5 * base.mean(1, keepdim=True).expand_as(base)  # mid-grey range keeps colours readable
    return ((1 - weight) * gray + weight * heat).clamp(0, 1)


def make_grid(images: Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile (N,3,H,W) images into one (3,H',W') image."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, dtype=images.dtype)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = images[
            i
        ]
    return grid


def upscale(images: Tensor, min_size: int = 64) -> Tensor:
    """Nearest-neighbour upscaling of small images so TensorBoard shows them crisp."""
    h = images.shape[-2]
    factor = max(1, math.ceil(min_size / max(h, 1)))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


_PALETTE = torch.tensor(
    [
        [0.122, 0.467, 0.706],
        [1.000, 0.498, 0.055],
        [0.173, 0.627, 0.173],
        [0.839, 0.153, 0.157],
        [0.580, 0.404, 0.741],
        [0.549, 0.337, 0.294],
        [0.890, 0.467, 0.761],
        [0.498, 0.498, 0.498],
        [0.737, 0.741, 0.133],
        [0.090, 0.745, 0.812],
    ]
)


def matrix_image(mat: Tensor, cmap: str = "heat", cell: int = 8, symmetric: bool | None = None) -> Tensor:
    """A (R,C) matrix as a (3, R*cell, C*cell) heatmap; diverging colours centre zero."""
    m = mat.detach().float().cpu()
    if m.ndim != 2:
        raise ValueError(f"matrix_image expects a 2-D matrix, got shape {tuple(m.shape)}.")
    symmetric = (cmap == "diverging") if symmetric is None else symmetric
    rgb = colorize(m.unsqueeze(0), cmap, symmetric=symmetric)[0]
    return F.interpolate(rgb.unsqueeze(0), scale_factor=cell, mode="nearest")[0]


def class_colors(n: int) -> Tensor:
    """n distinct RGB colours (repeating the 10-colour palette, darkened on each cycle)."""
    idx = torch.arange(n)
    return _PALETTE[idx % len(_PALETTE)] * (0.85 ** (idx // len(_PALETTE))).unsqueeze(1)

