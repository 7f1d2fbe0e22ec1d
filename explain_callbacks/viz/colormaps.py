"""Colormaps as piecewise-linear lookup tables in torch (no matplotlib at run time)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CMAPS", "apply_cmap", "colorize"]

# Anchor colours sampled from matplotlib's RdBu_r (diverging) and inferno (sequential).
CMAPS: dict[str, list[tuple[float, float, float]]] = {
    "diverging": [
        (0.020, 0.188, 0.380),
        (0.129, 0.400, 0.675),
        (0.573, 0.773, 0.871),
        (0.969, 0.969, 0.969),
        (0.957, 0.647, 0.510),
        (0.839, 0.376, 0.302),
        (0.404, 0.000, 0.122),
    ],
    "heat": [
        (0.001, 0.000, 0.014),
        (0.258, 0.039, 0.406),
        (0.576, 0.149, 0.404),
        (0.865, 0.317, 0.226),
        (0.988, 0.645, 0.040),
        (0.988, 1.000, 0.644),
    ],
    "gray": [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)],
}


def apply_cmap(values: Tensor, cmap: str = "heat") -> Tensor:
    """Map values in [0, 1] of any shape (...) to RGB (..., 3) by linear interpolation of the anchors."""
    if cmap not in CMAPS:
        raise KeyError(f"Unknown colormap {cmap!r}; choose one of {sorted(CMAPS)}.")
    lut = torch.tensor(CMAPS[cmap], dtype=torch.float32, device=values.device)
    v = values.float().clamp(0, 1).nan_to_num(0.5) * (lut.shape[0] - 1)
    lo = v.floor().long().clamp(max=lut.shape[0] - 2)
    frac = (v - lo.float()).unsqueeze(-1)
    return lut[lo] * (1 - frac) + lut[lo + 1] * frac


def colorize(maps: Tensor, cmap: str = "diverging", symmetric: bool = True, q: float = 0.995) -> Tensor:
    """(N,H,W) maps to (N,3,H,W) RGB in [0,1], each map scaled on its own.

    ``symmetric``: zero maps to the centre colour and ±(q-quantile of |m|) to the ends (signed maps);
    otherwise min..max goes to 0..1.
    """
    if maps.ndim != 3:
        raise ValueError(f"colorize expects (N,H,W) maps, got shape {tuple(maps.shape)}.")
    m = maps.detach().float().cpu()
    flat = m.reshape(m.shape[0], -1)
    if symmetric:
        scale = torch.quantile(flat.abs(), q, dim=1).clamp_min(1e-12).view(-1, 1, 1)
        v = 0.5 + 0.5 * (m / scale)
    else:
        lo = flat.min(1).values.view(-1, 1, 1)
        hi = flat.max(1).values.view(-1, 1, 1)
        v = (m - lo) / (hi - lo).clamp_min(1e-12)
    return apply_cmap(v, cmap).permute(0, 3, 1, 2).contiguous()
