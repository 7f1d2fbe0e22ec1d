"""Turning tensors into images: overlays, grids, line plots and matrices (CHW float in [0, 1])."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .colormaps import apply_cmap, colorize
from .font import draw_text

__all__ = ["label_image", "make_grid", "map_to_2d", "matrix_image", "overlay", "plot_curves", "to_rgb"]


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


def _draw_line(img: Tensor, x0: float, y0: float, x1: float, y1: float, color: Tensor, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) * 2 + 2
    t = torch.linspace(0, 1, n)
    xs = (x0 + (x1 - x0) * t).round().long()
    ys = (y0 + (y1 - y0) * t).round().long()
    h, w = img.shape[1:]
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            xx = (xs + dx).clamp(0, w - 1)
            yy = (ys + dy).clamp(0, h - 1)
            img[:, yy, xx] = color.view(3, 1)


def plot_curves(
    curves: dict[str, Tensor],
    x: Tensor | None = None,
    title: str | None = None,
    height: int = 240,
    width: int = 320,
    ylim: tuple[float, float] | None = None,
) -> Tensor:
    """A line plot (3,H,W) of named curves on shared axes, with a legend and axis range labels."""
    img = torch.ones(3, height, width)
    if not curves:
        return img
    left, right, top, bottom = 40, 10, 22 if title else 10, 22
    ys = [c.detach().float().cpu().flatten() for c in curves.values()]
    lo = min(float(y.min()) for y in ys) if ylim is None else ylim[0]
    hi = max(float(y.max()) for y in ys) if ylim is None else ylim[1]
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pw, ph = width - left - right, height - top - bottom
    axis = torch.tensor([0.2, 0.2, 0.2])
    _draw_line(img, left, top + ph, left + pw, top + ph, axis, 1)
    _draw_line(img, left, top, left, top + ph, axis, 1)
    for i, (name, y) in enumerate(zip(curves, ys)):
        xv = torch.linspace(0, 1, y.numel()) if x is None else x.detach().float().cpu().flatten()
        xmin, xmax = float(xv.min()), float(xv.max())
        px = left + (xv - xmin) / max(xmax - xmin, 1e-12) * pw
        py = top + ph - (y - lo) / (hi - lo) * ph
        color = _PALETTE[i % len(_PALETTE)]
        for j in range(y.numel() - 1):
            _draw_line(img, float(px[j]), float(py[j]), float(px[j + 1]), float(py[j + 1]), color)
        draw_text(img, name[:24], left + 6, top + 4 + 10 * i, color)
    draw_text(img, f"{hi:.3g}", 2, top, axis)
    draw_text(img, f"{lo:.3g}", 2, top + ph - 7, axis)
    if x is not None:
        draw_text(img, f"{float(x.min()):.3g}", left, top + ph + 6, axis)
        draw_text(img, f"{float(x.max()):.3g}", left + pw - 30, top + ph + 6, axis)
    if title:
        draw_text(img, title[:48], left, 6, axis)
    return img


def matrix_image(mat: Tensor, cmap: str = "heat", cell: int = 8, symmetric: bool | None = None) -> Tensor:
    """A (R,C) matrix as a (3, R*cell, C*cell) heatmap; diverging colours centre zero."""
    m = mat.detach().float().cpu()
    if m.ndim != 2:
        raise ValueError(f"matrix_image expects a 2-D matrix, got shape {tuple(m.shape)}.")
    symmetric = (cmap == "diverging") if symmetric is None else symmetric
    rgb = colorize(m.unsqueeze(0), cmap, symmetric=symmetric)[0]
    return F.interpolate(rgb.unsqueeze(0), scale_factor=cell, mode="nearest")[0]


def label_image(image: Tensor, text: str, color: tuple[float, float, float] = (0.1, 0.1, 0.1)) -> Tensor:
    """Add a white band with ``text`` above a (3,H,W) image."""
    band = torch.ones(3, 12, image.shape[-1])
    draw_text(band, text, 2, 2, torch.tensor(color))
    return torch.cat([band, image], dim=1)


def class_colors(n: int) -> Tensor:
    """n distinct RGB colours (repeating the 10-colour palette, darkened on each cycle)."""
    idx = torch.arange(n)
    return _PALETTE[idx % len(_PALETTE)] * (0.85 ** (idx // len(_PALETTE))).unsqueeze(1)


def values_to_rgb(values: Tensor, cmap: str = "heat") -> Tensor:
    return apply_cmap(values, cmap)
