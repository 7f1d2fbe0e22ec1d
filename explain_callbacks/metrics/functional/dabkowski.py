"""The saliency metric of Dabkowski & Gal (2017), "Real Time Image Saliency for Black Box
Classifiers", NeurIPS, arXiv:1705.07857, Sec. 5.1.

The map (channel-summed) is thresholded at its mean; the tightest box around the largest connected
component (8-connectivity) is cropped and resized back to the input size; with a the box's area
fraction and p the probability of the class on the resized crop,
``s = log(max(a, 0.05)) − log(p)``. Lower is better (a small box that keeps the class).
All samples are processed together: the components in one call (``scipy.ndimage.label`` on the
stack for CPU tensors, batched label propagation in torch otherwise), the boxes from the labels
(NumPy) or the masks (torch), the crops by one ``grid_sample``, the crops' probabilities in chunks
of ``batch_size``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._internal.batching import BatchSize, resolve_batch_size
from ._guard import model_left_as_found
from ._utils import Target, broadcast_map, check_finite_map, feature_relevance, prepare_target, scores_chunked

__all__ = ["dabkowski_saliency", "largest_component", "saliency_boxes"]

_HAS_SCIPY = importlib.util.find_spec("scipy") is not None


def _component_labels_torch(fg: Tensor) -> Tensor:
    """8-connected component labels (B, H*W) of boolean (B, H, W) maps: each foreground pixel gets the
    smallest flat index of its component, background gets H*W.

    Batched hooking and pointer jumping (Shiloach & Vishkin 1982): each round the 3 x 3 minimum of the
    labels (four shifted ``minimum`` calls on a padded copy) is taken, the current root of every pixel
    adopts the smallest label seen by its pixels (``scatter_reduce`` with ``amin``), and pointers are
    shortened by ``label[label]``; a few rounds suffice for compact shapes, at most H*W in any case.
    """
    b, h, w = fg.shape
    n = h * w
    dev = fg.device
    flat = fg.reshape(b, n)
    lab = torch.full((b, n + 1), n, device=dev, dtype=torch.long)  # slot n: background
    lab[:, :n] = torch.where(flat, torch.arange(n, device=dev), n)
    bg = (~flat).long() * n  # max(., bg) sends background back to n (cheaper than masked_fill)
    pad = torch.full((b, h + 2, w + 2), n, device=dev, dtype=torch.long)
    inner = pad[:, 1:-1, 1:-1]
    for _ in range(n):
        inner.copy_(lab[:, :n].view(b, h, w))
        r = torch.minimum(pad[:, :, :-2], pad[:, :, 1:-1])
        torch.minimum(r, pad[:, :, 2:], out=r)
        m = torch.minimum(r[:, :-2], r[:, 1:-1])
        torch.minimum(m, r[:, 2:], out=m)
        m = torch.maximum(m.view(b, n), bg)
        new = lab.scatter_reduce(1, lab[:, :n], m, reduce="amin")  # hook the roots
        torch.minimum(new[:, :n], m, out=new[:, :n])
        new = new.gather(1, new)  # shortcut: follow the pointers twice
        new = new.gather(1, new)
        if torch.equal(new, lab):
            break
        lab = new
    return lab[:, :n]


def _largest_component_torch(fg: Tensor) -> Tensor:
    b, h, w = fg.shape
    n = h * w
    lab = _component_labels_torch(fg)
    sizes = torch.zeros(b, n + 1, device=fg.device, dtype=torch.long).scatter_add_(1, lab, torch.ones_like(lab))
    sizes[:, n] = 0
    best = sizes.argmax(1, keepdim=True)  # ties: the component whose first pixel comes first
    return (lab == best).view(b, h, w) & fg


# 8-connectivity within each (H, W) slice of a (B, H, W) stack and none across slices: one
# ``scipy.ndimage.label`` call labels every sample, with labels numbered in raster order over the stack
_SLICE_8 = np.zeros((3, 3, 3), dtype=bool)
_SLICE_8[1] = True


def _largest_labels_scipy(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.ndimage.label`` of the (B, H, W) stack and each sample's largest label (0 if it has none;
    ties: the label seen first in raster order, i.e. the component whose first pixel comes first)."""
    from scipy import ndimage

    b = fg.shape[0]
    lab, _ = ndimage.label(fg, structure=_SLICE_8)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    flat = lab.reshape(b, -1)
    return lab, flat[np.arange(b), np.take(sizes, flat).argmax(1)]


def _largest_component_scipy(fg: Tensor) -> Tensor:
    """The same on CPU with ``scipy.ndimage.label`` on the whole stack (no sample loop)."""
    f = fg.numpy()
    lab, best = _largest_labels_scipy(f)
    return torch.from_numpy((lab == best[:, None, None]) & f)


def largest_component(fg: Tensor, backend: str = "auto") -> Tensor:
    """Mask of the largest 8-connected component of each boolean (B, H, W) map (empty stays empty;
    ties go to the component whose first pixel in raster order comes first).

    ``backend``: ``"scipy"`` (``scipy.ndimage.label`` on the whole stack, CPU only), ``"torch"``
    (batched hooking and pointer jumping, any device) or ``"auto"`` (scipy for CPU tensors when it is
    installed, torch otherwise). Both give the same masks.
    """
    if backend not in ("auto", "scipy", "torch"):
        raise ValueError(f"backend must be 'auto', 'scipy' or 'torch', got {backend!r}.")
    fg = fg.bool()
    if fg.numel() == 0:
        return fg.clone()
    if backend == "auto":
        backend = "scipy" if fg.device.type == "cpu" and _HAS_SCIPY else "torch"
    if backend == "scipy":
        return _largest_component_scipy(fg.cpu()).to(fg.device)
    return _largest_component_torch(fg)


def _boxes_of(comp: Tensor) -> Tensor:
    """First / last occupied row and column of (B, H, W) masks, (B, 4) = (y0, x0, y1, x1); an empty
    mask has no occupied row: 0 and H − 1 (argmax returns the first maximum), the whole image."""
    h, w = comp.shape[1], comp.shape[2]
    rows, cols = comp.any(2).to(torch.uint8), comp.any(1).to(torch.uint8)
    y0, y1 = rows.argmax(1), (h - 1) - rows.flip(1).argmax(1)
    x0, x1 = cols.argmax(1), (w - 1) - cols.flip(1).argmax(1)
    return torch.stack([y0, x0, y1, x1], 1)


def _boxes_scipy(fg: np.ndarray) -> np.ndarray:
    """:func:`_boxes_of` the largest components in NumPy, straight from the scipy labels. An empty map's
    best label is 0, the background, which covers the whole image: the same box."""
    h, w = fg.shape[1], fg.shape[2]
    lab, best = _largest_labels_scipy(fg)
    comp = lab == best[:, None, None]
    rows, cols = comp.any(2), comp.any(1)
    y0, y1 = rows.argmax(1), (h - 1) - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), (w - 1) - cols[:, ::-1].argmax(1)
    return np.stack([y0, x0, y1, x1], 1)


def _foreground(attributions: Tensor, ref: Tensor) -> Tensor:
    """(B, H, W) mask of the map's channel-summed relevance above its mean (float64 mean and comparison)."""
    if ref.ndim != 4:
        raise ValueError(f"the Dabkowski metric needs images (B,C,H,W), got shape {tuple(ref.shape)}.")
    b, h, w = ref.shape[0], ref.shape[2], ref.shape[3]
    if attributions.shape == ref.shape and attributions.device == ref.device:
        rel = attributions.detach().sum(1)  # feature_relevance's "pixel" relevance without its wrappers
    else:
        rel = feature_relevance(attributions, ref, "pixel")[0].view(b, h, w)
    rel = rel.double()
    return rel > rel.mean((1, 2), keepdim=True)


def _use_scipy(fg: Tensor, backend: str) -> bool:
    if backend not in ("auto", "scipy", "torch"):
        raise ValueError(f"backend must be 'auto', 'scipy' or 'torch', got {backend!r}.")
    if backend == "auto":
        backend = "scipy" if fg.device.type == "cpu" and _HAS_SCIPY else "torch"
    return backend == "scipy" and fg.numel() > 0


def saliency_boxes(attributions: Tensor, inputs: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Boxes (B, 4) = (y0, x0, y1, x1), inclusive pixel indices (int64), around the largest component
    of the map thresholded at its mean (the whole image for a constant map).

    ``backend`` as in :func:`largest_component`; both give the same boxes (``"scipy"`` computes them in
    NumPy from the labels, ``"torch"`` from the component mask).
    """
    fg = _foreground(attributions, inputs if inputs is not None else attributions)
    if _use_scipy(fg, backend):
        return torch.from_numpy(_boxes_scipy(fg.cpu().numpy())).to(device=fg.device, dtype=torch.long)
    return _boxes_of(largest_component(fg, backend))


def _crop_axis(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """(B, n) normalised ``grid_sample`` coordinates (align_corners=False) along one axis: output pixel j
    samples the crop [lo, hi] (inclusive) at lo + (j + ½)·size/n − ½, clamped to the crop, as
    ``F.interpolate`` computes its source index."""
    size = (hi - lo + 1).astype(np.float64)[:, None]
    u = np.minimum(np.maximum((np.arange(n) + 0.5) * size / n - 0.5, 0.0), size - 1)
    return (2 * (lo[:, None] + u) + 1) / n - 1


def crop_resize(inputs: Tensor, boxes: Tensor | np.ndarray) -> Tensor:
    """Crop each image to its box (inclusive pixel indices) and resize the crop back to the input size,
    bilinearly, exactly as ``F.interpolate(crop, size, mode="bilinear", align_corners=False)`` per sample
    (samples never leave the crop), all samples in one ``grid_sample`` call. The (B, H) and (B, W)
    sampling coordinates are a few operations on B boxes, done in NumPy on the host (no per-op
    dispatch), and for float32/float64 inputs the whole grid too (one copy to the inputs' device)."""
    b, _, h, w = inputs.shape
    bx = boxes if isinstance(boxes, np.ndarray) else boxes.cpu().numpy()
    gx, gy = _crop_axis(bx[:, 1], bx[:, 3], w), _crop_axis(bx[:, 0], bx[:, 2], h)
    if inputs.dtype in _NUMPY_FLOATS:
        grid_np = np.empty((b, h, w, 2), dtype=_NUMPY_FLOATS[inputs.dtype])  # the casts round as torch's .to
        grid_np[..., 0] = gx[:, None, :]
        grid_np[..., 1] = gy[:, :, None]
        grid = torch.from_numpy(grid_np).to(inputs.device)
    else:
        grid = torch.empty(b, h, w, 2, dtype=inputs.dtype, device=inputs.device)
        grid[..., 0] = torch.from_numpy(gx).to(grid).view(b, 1, w)
        grid[..., 1] = torch.from_numpy(gy).to(grid).view(b, h, 1)
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="border", align_corners=False)


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


@model_left_as_found
def dabkowski_saliency(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target,
    *,
    min_area: float = 0.05,
    batch_size: BatchSize = "auto",
) -> Tensor:
    """s = log(max(a, min_area)) − log p per sample (B,); lower is better."""
    batch_size = resolve_batch_size(batch_size, model, inputs)
    target = prepare_target(model, inputs, target)  # checks the inputs and the target's shape and range
    x = inputs.detach()
    broadcast_map(attributions, x)  # the map's shape (validate() without checking the inputs again)
    check_finite_map(attributions)
    h, w = x.shape[2], x.shape[3]
    fg = _foreground(attributions, x)
    # the boxes stay on the host (NumPy) from the labels to the crops' sampling grid
    bx = _boxes_scipy(fg.cpu().numpy()) if _use_scipy(fg, "auto") else _boxes_of(largest_component(fg)).cpu().numpy()
    area = torch.from_numpy((bx[:, 2:] - bx[:, :2] + 1).prod(1) / (h * w)).to(x.device)  # box area / image
    crops = crop_resize(x, bx)
    p = scores_chunked(model, crops, target, "probability", batch_size)
    return area.clamp_min(min_area).log() - p.clamp_min(1e-30).log()
