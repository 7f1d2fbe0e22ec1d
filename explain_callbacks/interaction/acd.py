"""Agglomerative contextual decomposition (ACD; Singh, Murdoch & Yu 2019, "Hierarchical
interpretations for neural network predictions", ICLR, arXiv:1806.05337).

Follows the agglomeration of the authors' reference code (``acd/agglomeration/agg_2d.py``):

1. tile the input (``tile`` pixels or time steps per tile) and score every tile by CD (β at the target);
2. select the tiles whose score is at or above the ``percentile`` of the unselected ones (15 points
   lower once a third of the tiles is selected, 4 points lower until something is selected);
3. for ``num_iters`` iterations: take the 8-connected components of the selected tiles; every
   unselected tile j touching a component C is re-scored by ``CD(C ∪ j) − CD(C)``; select by the
   percentile again and add tiles with at least 3 selected 4-neighbours (the reference smoothing);
4. merge components pairwise, each time the pair maximising ``CD(C₁ ∪ C₂) − max(CD(C₁), CD(C₂))``,
   until one component remains.

The result is a hierarchy: a component label map per level (grown components, then merges) with
the CD score of every component. Every CD evaluation of a step is one batched propagation.
Sequences (B, T, D) use 1-D tiles along T with neighbours t ± 1; tabular inputs are treated as a
sequence of features. Notebook settings of the paper: MNIST tile 1, percentile 99, 5 iterations;
ImageNet tile 14, 95, 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._internal.batching import BatchSize
from .._internal.layout import check_channels_first, reads_channels_first
from .cd import cd_scores

__all__ = ["ACD", "ACDHierarchy", "draw_hierarchy", "hierarchy_levels"]


@dataclass
class ACDHierarchy:
    """An ACD hierarchy for one sample.

    Attributes:
        grid: the tile grid shape ((gh, gw) for images, (L,) for sequences).
        tile: tile size in input positions.
        input_size: spatial size of the input ((H, W) or (T,)).
        tile_scores: CD score of every tile (grid-shaped).
        levels: label maps over the grid, 0 = not selected, k ≥ 1 = component k; first the grown
            components of every iteration, then one level per merge (the last has one component).
        level_scores: per level, ``{component id: CD score}``.
        merges: ``(kept id, merged id, score gain)`` per merge step.
    """

    grid: tuple[int, ...]
    tile: int
    input_size: tuple[int, ...]
    tile_scores: Tensor
    levels: list[Tensor] = field(default_factory=list)
    level_scores: list[dict[int, float]] = field(default_factory=list)
    merges: list[tuple[int, int, float]] = field(default_factory=list)

    def upsample(self, labels: Tensor) -> Tensor:
        """A grid label map at input resolution (nearest, cropped)."""
        lab = labels.float().view(1, 1, *labels.shape)
        if len(self.grid) == 2:
            up = F.interpolate(lab, scale_factor=self.tile, mode="nearest")[0, 0]
            return up[: self.input_size[0], : self.input_size[1]].long()
        up = lab[0, 0].repeat_interleave(self.tile, dim=-1)
        return up[: self.input_size[0]].long()


def _neighbours(grid: tuple[int, ...], diag: bool) -> list[list[int]]:
    out: list[list[int]] = []
    if len(grid) == 1:
        n = grid[0]
        return [[j for j in (i - 1, i + 1) if 0 <= j < n] for i in range(n)]
    h, w = grid
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if diag:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    for r in range(h):
        for c in range(w):
            out.append([(r + dr) * w + (c + dc) for dr, dc in steps if 0 <= r + dr < h and 0 <= c + dc < w])
    return out


def _components(selected: list[bool], nbrs: list[list[int]]) -> list[list[int]]:
    seen = [False] * len(selected)
    comps = []
    for s in range(len(selected)):
        if not selected[s] or seen[s]:
            continue
        stack, comp = [s], []
        seen[s] = True
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in nbrs[i]:
                if selected[j] and not seen[j]:
                    seen[j] = True
                    stack.append(j)
        comps.append(sorted(comp))
    return comps


def _threshold(scores: Tensor, percentile: float, use_abs: bool) -> Tensor:
    """The reference ``threshold_scores`` (NaN = already selected)."""
    s = scores.abs() if use_abs else scores
    valid = ~torch.isnan(s)
    if not bool(valid.any()):
        return torch.zeros_like(valid)
    vals = s[valid].double()
    pct = float(percentile)
    if int((~valid).sum()) > s.numel() / 3:
        pct -= 15
    while True:
        q = torch.quantile(vals, min(max(pct, 0.0), 100.0) / 100.0)
        picked = valid & (s.double() >= q)
        if bool(picked.any()) or pct <= 0:
            return picked
        pct -= 4


class ACD:
    """Build ACD hierarchies.

    Args:
        tile: tile size (pixels per side, or time steps); 1 = single pixels (MNIST setting).
        percentile: selection percentile (99 for MNIST-like inputs, 95 for ImageNet-like).
        num_iters: growth iterations (5).
        use_abs: rank tiles by |score| (the reference default) instead of the signed score.
        max_tiles: refuse tilings with more tiles than this (CD of every tile is computed).
        batch_size: decomposed rows per CD propagation.
        channels_first: how 3-D inputs are tiled: True (B, C, L) signals, tiles of L steps shared over
            channels; False (B, T, D) sequences, tiles of T steps; None (default) decided from the
            model's first layer (a ``Conv1d`` reads signals).
    """

    def __init__(
        self,
        tile: int = 1,
        percentile: float = 99.0,
        num_iters: int = 5,
        use_abs: bool = True,
        max_tiles: int = 4096,
        batch_size: BatchSize = "auto",
        channels_first: bool | None = None,
    ) -> None:
        if tile < 1:
            raise ValueError(f"tile must be >= 1, got {tile}.")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must lie in (0, 100], got {percentile}.")
        self.tile = tile
        self.percentile = percentile
        self.num_iters = num_iters
        self.use_abs = use_abs
        self.max_tiles = max_tiles
        self.batch_size = batch_size
        self.channels_first = check_channels_first(channels_first)

    def _layout(self, inputs: Tensor, channels_first: bool = False) -> tuple[tuple[int, ...], tuple[int, ...], Tensor]:
        """(grid, input_size, tile masks (n_tiles, *mask_shape)); ``channels_first``: 3-D inputs are
        (B, C, L) signals, tiled along L."""
        shape = tuple(inputs.shape[1:])
        t = self.tile
        if len(shape) == 3:
            h, w = shape[1:]
            gh, gw = math.ceil(h / t), math.ceil(w / t)
            ids = (torch.arange(h).view(h, 1) // t) * gw + torch.arange(w).view(1, w) // t
            masks = (ids.view(1, 1, h, w) == torch.arange(gh * gw).view(-1, 1, 1, 1)).float()
            return (gh, gw), (h, w), masks
        if len(shape) in (1, 2):
            n = shape[-1] if len(shape) == 2 and channels_first else shape[0]
            g = math.ceil(n / t)
            ids = torch.arange(n) // t
            masks = (ids.view(1, n) == torch.arange(g).view(-1, 1)).float()
            if len(shape) == 2:
                masks = masks.unsqueeze(1 if channels_first else -1)
            return (g,), (n,), masks
        raise ValueError(f"ACD supports (B,D), (B,T,D), (B,C,L) and (B,C,H,W) inputs, got {tuple(inputs.shape)}.")

    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor | int | None = None) -> list[ACDHierarchy]:
        """One hierarchy per sample of ``inputs``."""
        grid, size, tiles = self._layout(inputs, reads_channels_first(model, inputs, self.channels_first))
        n_tiles = tiles.shape[0]
        if n_tiles > self.max_tiles:
            raise ValueError(
                f"ACD would score {n_tiles} tiles (> max_tiles={self.max_tiles}); use a larger tile or raise max_tiles."
            )
        tiles = tiles.to(inputs.device, inputs.dtype)
        b = inputs.shape[0]
        if isinstance(target, int):
            target = torch.full((b,), target, dtype=torch.long, device=inputs.device)
        nbr8 = _neighbours(grid, diag=True)
        nbr4 = _neighbours(grid, diag=False)
        with torch.no_grad():
            tile_scores = cd_scores(model, inputs, tiles, target, batch_size=self.batch_size)  # (B, n_tiles)
        out = []
        for s in range(b):
            x = inputs[s : s + 1]
            tgt = None if target is None else target[s : s + 1]
            out.append(self._one(model, x, tgt, tiles, tile_scores[s], grid, size, nbr8, nbr4))
        return out

    def _cd(self, model: nn.Module, x: Tensor, tgt: Tensor | None, tiles: Tensor, sets: list[list[int]]) -> Tensor:
        if not sets:
            return x.new_zeros(0)
        masks = torch.stack([tiles[idx].sum(0).clamp(max=1.0) for idx in sets])
        with torch.no_grad():
            return cd_scores(model, x, masks, tgt, batch_size=self.batch_size)[0]

    def _one(
        self,
        model: nn.Module,
        x: Tensor,
        tgt: Tensor | None,
        tiles: Tensor,
        tile_scores: Tensor,
        grid: tuple[int, ...],
        size: tuple[int, ...],
        nbr8: list[list[int]],
        nbr4: list[list[int]],
    ) -> ACDHierarchy:
        n = tiles.shape[0]
        h = ACDHierarchy(grid=grid, tile=self.tile, input_size=size, tile_scores=tile_scores.view(grid).cpu())
        track = tile_scores.detach().clone().double()
        picked = _threshold(track, self.percentile, self.use_abs)
        prev_labels: Tensor | None = None
        comp_ids: dict[int, list[int]] = {}
        for _ in range(self.num_iters):
            if bool(picked.all()):
                break
            comps = _components(picked.tolist(), nbr8)
            labels, comp_ids = self._correspond(comps, prev_labels, n)
            ids = sorted(comp_ids)
            sets = [comp_ids[k] for k in ids]
            # candidates: unselected tiles touching each component
            cand = [(k, j) for k in ids for j in sorted({j for i in comp_ids[k] for j in nbr8[i]}) if not picked[j]]
            scores = self._cd(model, x, tgt, tiles, sets + [comp_ids[k] + [j] for k, j in cand])
            comp_score = {k: float(scores[q]) for q, k in enumerate(ids)}
            gains: dict[int, float] = {}
            for q, (k, j) in enumerate(cand):
                gain = float(scores[len(ids) + q]) - comp_score[k]
                gains[j] = max(gains.get(j, -math.inf), gain)
            for j, gsc in gains.items():
                track[j] = gsc
            h.levels.append(labels.view(grid).cpu())
            h.level_scores.append(comp_score)
            prev_labels = labels
            track[picked] = float("nan")
            new = _threshold(track, self.percentile, self.use_abs)
            both = picked | new
            sel = both.tolist()
            counts = torch.tensor([sum(sel[j] for j in nbr4[i]) for i in range(n)], device=both.device)
            picked = both | ((~both) & (counts >= 3))
        # final components, then pairwise merging
        comps = _components(picked.tolist(), nbr8)
        labels, comp_ids = self._correspond(comps, prev_labels, n)
        ids = sorted(comp_ids)
        cache = {k: float(v) for k, v in zip(ids, self._cd(model, x, tgt, tiles, [comp_ids[k] for k in ids]))}
        h.levels.append(labels.view(grid).cpu())
        h.level_scores.append(dict(cache))
        while len(comp_ids) > 1:
            ids = sorted(comp_ids)
            pairs = [(a, c) for qi, a in enumerate(ids) for c in ids[qi + 1 :]]
            joint = self._cd(model, x, tgt, tiles, [comp_ids[a] + comp_ids[c] for a, c in pairs])
            gain = torch.tensor([float(joint[q]) - max(cache[a], cache[c]) for q, (a, c) in enumerate(pairs)])
            best = int(gain.argmax())
            a, c = pairs[best]
            comp_ids[a] = sorted(comp_ids[a] + comp_ids.pop(c))
            cache[a] = float(joint[best])
            cache.pop(c)
            labels = labels.clone()
            labels[labels == c] = a
            h.levels.append(labels.view(grid).cpu())
            h.level_scores.append(dict(cache))
            h.merges.append((a, c, float(gain[best])))
        return h

    @staticmethod
    def _correspond(comps: list[list[int]], prev: Tensor | None, n: int) -> tuple[Tensor, dict[int, list[int]]]:
        """Label components, keeping the id of the (smallest) previous component they overlap."""
        labels = torch.zeros(n, dtype=torch.long)
        used: set[int] = set()
        fresh = []
        out: dict[int, list[int]] = {}
        for comp in comps:
            old = [] if prev is None else sorted({int(prev[i]) for i in comp if int(prev[i]) > 0} - used)
            if old:
                k = old[0]
                used.add(k)
                out[k] = comp
            else:
                fresh.append(comp)
        k = 1
        for comp in fresh:
            while k in used or k in out:
                k += 1
            out[k] = comp
            used.add(k)
        for k, comp in out.items():
            labels[comp] = k
        return labels, out


def hierarchy_levels(h: ACDHierarchy, max_levels: int = 8) -> list[tuple[Tensor, str]]:
    """The levels of an ACD hierarchy to draw (evenly sampled if more than ``max_levels``): each a label map
    over the input (0 = not selected, k = component k) and its title "level i: k components"."""
    n_levels = len(h.levels)
    pick = list(range(n_levels))
    if n_levels > max_levels:
        pick = sorted({round(i * (n_levels - 1) / (max_levels - 1)) for i in range(max_levels)})
    out = []
    for li in pick:
        lab = h.upsample(h.levels[li])
        out.append((lab.view(1, -1) if lab.ndim == 1 else lab, f"level {li}: {len(h.level_scores[li])} components"))
    return out


def draw_hierarchy(h: ACDHierarchy, image: Tensor | None = None, max_levels: int = 8, min_size: int = 64) -> Tensor:
    """Draw an ACD hierarchy as a plain (3, H, W) image in [0, 1]: one panel per level (evenly sampled if more
    than ``max_levels``), components coloured over the (grayscale) input, panels in level order. For a
    labelled figure use :func:`explain_callbacks.viz.hierarchy_figure` with :func:`hierarchy_levels`."""
    from ..viz import class_colors, make_grid, to_rgb, upscale

    levels = hierarchy_levels(h, max_levels)
    max_id = max((int(lab.max()) for lab, _ in levels), default=0)
    colors = torch.cat([torch.ones(1, 3), class_colors(max(max_id, 1))])
    panels = []
    for lab, _ in levels:
        rgb = colors[lab].permute(2, 0, 1)  # (3, H, W)
        if image is not None and image.ndim == 3 and len(h.grid) == 2:
            gray = to_rgb(image.unsqueeze(0))[0].mean(0, keepdim=True).expand(3, -1, -1)
            sel = (lab > 0).unsqueeze(0)
            rgb = torch.where(sel, 0.55 * rgb + 0.45 * gray, 0.35 * gray + 0.65)
        if rgb.shape[1] < 8:
            rgb = rgb.repeat_interleave(math.ceil(8 / rgb.shape[1]), dim=1)
        panels.append(upscale(rgb.unsqueeze(0), min_size)[0])
    if not panels:
        return torch.ones(3, 8, 8)
    hmax = max(p.shape[1] for p in panels)
    wmax = max(p.shape[2] for p in panels)
    padded = torch.ones(len(panels), 3, hmax, wmax)
    for i, p in enumerate(panels):
        padded[i, :, : p.shape[1], : p.shape[2]] = p
    return make_grid(padded, nrow=min(len(panels), 4)).clamp(0, 1)
