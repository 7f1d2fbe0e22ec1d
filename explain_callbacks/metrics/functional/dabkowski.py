"""The saliency metric of Dabkowski & Gal (2017), "Real Time Image Saliency for Black Box
Classifiers", NeurIPS, arXiv:1705.07857, Sec. 5.1.

The map (channel-summed) is thresholded at its mean; the tightest box around the largest connected
component (8-connectivity) is cropped and resized back to the input size; with a the box's area
fraction and p the probability of the class on the resized crop,
``s = log(max(a, 0.05)) − log(p)``. Lower is better (a small box that keeps the class).
All samples are processed together: the components by batched label propagation, the crops by one
``grid_sample``, the crops' probabilities in chunks of ``batch_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import feature_relevance, scores_chunked, validate

__all__ = ["dabkowski_saliency", "largest_component", "saliency_boxes"]


def largest_component(fg: Tensor) -> Tensor:
    """Mask of the largest 8-connected component of each boolean (B, H, W) map (empty stays empty).

    Batched connected components by hooking and pointer jumping (Shiloach & Vishkin 1982): every
    foreground pixel points to a smaller pixel index of its component; each round a 3 x 3 min-pool finds
    the smallest neighbouring label, the current root of the pixel adopts it (``scatter_reduce`` with
    ``amin``), and pointers are shortened by ``label[label]``; a few rounds suffice for compact shapes.
    """
    b, h, w = fg.shape
    n = h * w
    dev = fg.device
    flat_fg = fg.reshape(b, n)
    idx = torch.arange(n, device=dev).expand(b, n)
    lab = torch.cat([torch.where(flat_fg, idx, n), torch.full((b, 1), n, device=dev)], 1)  # slot n: background
    dt = torch.float32 if n < 2**24 else torch.float64
    for _ in range(n):
        grid = lab[:, :n].to(dt).view(b, 1, h, w)
        m = (-F.max_pool2d(-grid, 3, stride=1, padding=1)).view(b, n).long()
        m = torch.where(flat_fg, m, n)
        new = lab.scatter_reduce(1, lab[:, :n], m, reduce="amin")  # hook the roots
        new = torch.minimum(new, lab)
        for _ in range(4):  # shortcut: follow the pointers
            new = new.gather(1, new)
        if torch.equal(new, lab):
            break
        lab = new
    lab_i = lab[:, :n]
    sizes = torch.zeros(b, n + 1, device=dev, dtype=torch.long).scatter_add_(1, lab_i, torch.ones_like(lab_i))
    sizes[:, n] = 0
    best = sizes.argmax(1, keepdim=True)
    return ((lab_i == best) & flat_fg).view(b, h, w)


def saliency_boxes(attributions: Tensor, inputs: Tensor | None = None) -> Tensor:
    """Boxes (B, 4) = (y0, x0, y1, x1), inclusive pixel indices, around the largest component of the
    map thresholded at its mean (the whole image for a constant map)."""
    ref = inputs if inputs is not None else attributions
    if ref.ndim != 4:
        raise ValueError(f"the Dabkowski metric needs images (B,C,H,W), got shape {tuple(ref.shape)}.")
    rel, _ = feature_relevance(attributions, ref, "pixel")
    b, h, w = ref.shape[0], ref.shape[2], ref.shape[3]
    rel = rel.view(b, h, w).double()
    fg = rel > rel.mean((1, 2), keepdim=True)
    comp = largest_component(fg)
    empty = ~comp.view(b, -1).any(1)
    comp[empty] = True
    rows, cols = comp.any(2), comp.any(1)
    ar_h = torch.arange(h, device=ref.device)
    ar_w = torch.arange(w, device=ref.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values
    return torch.stack([y0, x0, y1, x1], 1)


def crop_resize(inputs: Tensor, boxes: Tensor) -> Tensor:
    """Crop each image to its box (inclusive pixel indices) and resize the crop back to the input size,
    bilinearly, exactly as ``F.interpolate(crop, size, mode="bilinear", align_corners=False)`` per sample
    (samples never leave the crop), all samples in one ``grid_sample`` call."""
    b, _, h, w = inputs.shape
    dt, dev = inputs.dtype, inputs.device

    def axis(lo: Tensor, hi: Tensor, n: int) -> Tensor:
        size = (hi - lo + 1).to(dt).view(b, 1)
        j = torch.arange(n, dtype=dt, device=dev).view(1, n)
        u = ((j + 0.5) * size / n - 0.5).clamp_min(0.0)
        u = torch.minimum(u, size - 1)
        return (2 * (lo.to(dt).view(b, 1) + u) + 1) / n - 1  # normalised, align_corners=False

    gy, gx = axis(boxes[:, 0], boxes[:, 2], h), axis(boxes[:, 1], boxes[:, 3], w)
    grid = torch.stack([gx.view(b, 1, w).expand(b, h, w), gy.view(b, h, 1).expand(b, h, w)], dim=-1)
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="border", align_corners=False)


def dabkowski_saliency(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    *,
    min_area: float = 0.05,
    batch_size: int | None = 256,
) -> Tensor:
    """s = log(max(a, min_area)) − log p per sample (B,); lower is better."""
    validate(inputs, attributions, target)
    x = inputs.detach()
    boxes = saliency_boxes(attributions, x)
    h, w = x.shape[2], x.shape[3]
    area = ((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)).double() / (h * w)
    crops = crop_resize(x, boxes)
    p = scores_chunked(model, crops, target, "probability", batch_size)
    return area.clamp_min(min_area).log() - p.clamp_min(1e-30).log()
