"""Small tensor operations shared across families (blur, normalisation, rank correlation)."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "descending_order",
    "gaussian_blur",
    "gaussian_kernel1d",
    "pearson",
    "rankdata",
    "sorted_last",
    "sorted_ranks",
    "spearman",
    "spearman_to",
    "upsample_to",
]


def gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device, truncate: float = 4.0) -> Tensor:
    radius = max(1, math.ceil(truncate * sigma))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur over the trailing spatial dims of (B,C,L) or (B,C,H,W), reflect padding."""
    if sigma <= 0:
        return x
    if x.ndim not in (3, 4):
        raise ValueError(
            f"Blur needs (B,C,L) or (B,C,H,W) inputs, got shape {tuple(x.shape)}; use a 'zeros' or 'mean' "
            "baseline/substrate for tabular data."
        )
    k = gaussian_kernel1d(sigma, x.dtype, x.device)
    r = k.numel() // 2
    c = x.shape[1]
    if x.ndim == 3:
        pad = min(r, x.shape[-1] - 1)
        k = k[r - pad : r + pad + 1] / k[r - pad : r + pad + 1].sum()
        y = F.pad(x, (pad, pad), mode="reflect") if pad > 0 else x
        return F.conv1d(y, k.view(1, 1, -1).expand(c, 1, -1), groups=c)
    out = x
    for dim in (-1, -2):
        n = x.shape[dim]
        pad = min(r, n - 1)
        kk = k[r - pad : r + pad + 1]
        kk = kk / kk.sum()
        if pad == 0:
            continue
        if dim == -1:
            out = F.conv2d(
                F.pad(out, (pad, pad, 0, 0), mode="reflect"), kk.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c
            )
        else:
            out = F.conv2d(
                F.pad(out, (0, 0, pad, pad), mode="reflect"), kk.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c
            )
    return out


_NUMPY_SORTABLE = (torch.float16, torch.float32, torch.float64, torch.int16, torch.int32, torch.int64, torch.uint8)


def _argsort_last(x: Tensor) -> Tensor:
    """Ascending argsort along the last dim. CPU tensors go through NumPy's SIMD sort (several times
    faster than ``torch.argsort`` there); the order of equal values may differ, which ``rankdata``
    does not see (ties get their mean rank)."""
    if x.device.type == "cpu" and x.dtype in _NUMPY_SORTABLE and not x.requires_grad and x.ndim >= 1:
        return torch.from_numpy(np.argsort(x.detach().resolve_neg().numpy(), axis=-1)).to(torch.long)
    return x.argsort(dim=-1)


_KEYABLE = (torch.float32, torch.float16, torch.bfloat16)
_LITTLE_ENDIAN = sys.byteorder == "little"


def _sorted_keys_cpu(x: Tensor, low: np.ndarray | None = None) -> np.ndarray | None:
    """Sort a CPU float tensor along the last dim by sorting one int64 key per element: the float's
    order-preserving 32-bit pattern (negative values' magnitude bits flipped, -0 made +0) above its
    index (or above ``low``, a permutation of the indices per row: equal floats are then ordered by it).
    NumPy's SIMD sort of int64 values is about twice as fast as its argsort of the floats.
    Returns the sorted keys (``key >> 32``: the patterns in sorted order, ``key & 0xFFFFFFFF``: the
    sorter, or the sorted ``low``), or None when the fast path does not apply (other dtypes or devices,
    NaNs, more than 2^31 elements per row)."""
    if x.device.type != "cpu" or x.dtype not in _KEYABLE or x.requires_grad or x.ndim < 1:
        return None
    n = x.shape[-1]
    if n >= 2**31 or x.numel() == 0:
        return None
    f = x.detach().resolve_neg().float().numpy()
    bits = (f + np.float32(0.0)).view(np.int32)  # -0.0 + 0.0 = +0.0: one pattern for zero
    flip = bits >> 31
    flip &= np.int32(0x7FFFFFFF)
    bits ^= flip  # negative floats: magnitude bits flipped (signed int order = float order)
    del flip
    key = bits.astype(np.int64)
    del bits
    key <<= 32
    key |= np.arange(n, dtype=np.int64) if low is None else low
    key.sort(axis=-1)
    # NaNs sort outside [-inf, +inf]: a negative NaN's pattern below -inf's (0x807FFFFF after the flip), a
    # positive one above +inf's (0x7F800000). Checked on each row's ends, after the sort: no pass over x
    if (key[..., 0] >> 32 < -0x7F800001).any() or (key[..., -1] >> 32 > 0x7F800000).any():
        return None
    return key


def _tie_means_cpu(tied: np.ndarray, rank: np.ndarray) -> None:
    """Give each run of equal values its mean rank, in ``rank`` (B, n, float64, 1..n per row at sorted
    positions) in place; ``tied`` (B, n - 1): is sorted element j equal to element j + 1. Only the tied
    elements are visited: float maps have a few ties at most (a map with many exact zeros: one long run)."""
    n = rank.shape[-1]
    pairs = np.flatnonzero(tied)  # pair (j, j+1) of row r: index r*(n-1) + j
    f = pairs + pairs // (n - 1)  # flat index of the pair's first element in (B, n)
    new_run = np.empty(f.size, dtype=bool)
    new_run[0] = True
    new_run[1:] = f[1:] != f[:-1] + 1  # pairs of one run are consecutive (a row's last and the next row's
    #                                    first element never pair: their flat indices differ by 2)
    starts = np.flatnonzero(new_run)
    first = f[starts]  # first element of each run
    last = f[np.append(starts[1:] - 1, f.size - 1)] + 1  # last element of each run
    mean = (first % n + last % n) * 0.5 + 1.0  # ranks are 1-based
    run = np.cumsum(new_run) - 1
    flat = rank.reshape(-1)
    flat[f] = mean[run]
    flat[f + 1] = mean[run]


def sorted_last(x: Tensor) -> Tensor:
    """The values of ``x`` sorted ascending along the last dim. CPU float rows go through NumPy's SIMD
    sort (about 10x faster than ``torch.sort`` there; NaNs last in both)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad and x.ndim >= 1:
        return torch.from_numpy(np.sort(x.detach().resolve_neg().numpy(), axis=-1))
    return x.sort(dim=-1).values


def descending_order(x: Tensor, ties: str = "index", generator: torch.Generator | None = None) -> Tensor:
    """Indices sorting the rows of ``x`` (B, n) by decreasing value. Equal values keep their index
    order (``ties="index"``: a stable sort), or a random order drawn from ``generator``
    (``ties="random"``: a random permutation per row, then a stable sort; drawn only when a row has
    ties, so maps without ties get the same order either way). CPU float32 rows go through NumPy's
    sort of one int64 key per element (:func:`_sorted_keys_cpu`: one sort instead of torch's stable
    argsorts, about 4x faster)."""
    if ties not in ("index", "random") or (ties == "random" and generator is None):
        raise ValueError(f"ties must be 'index', or 'random' with a generator; got {ties!r}, {generator!r}.")
    n = x.shape[-1]
    neg = x.neg() if x.ndim == 2 else None  # -x ascending = x descending
    key = None if neg is None else _sorted_keys_cpu(neg)
    if key is None:
        order = torch.argsort(x, dim=-1, descending=True, stable=True)
        if ties == "random" and n > 1:
            srt = x.gather(-1, order)
            if bool((srt[..., 1:] == srt[..., :-1]).any()):
                perm = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device).argsort(dim=-1)
                order = perm.gather(-1, torch.argsort(x.gather(-1, perm), dim=-1, descending=True, stable=True))
        return order
    vals = key >> 32
    if ties == "random" and n > 1 and (vals[..., 1:] == vals[..., :-1]).any():
        # the same random permutation as above (up to equal draws), and the position of every element in it
        # as the key's low part: equal values are then ordered by their place in the permutation
        rnd = torch.rand(x.shape, generator=generator, device=generator.device).cpu()
        perm = torch.from_numpy(_sorted_keys_cpu(rnd) & 0xFFFFFFFF)
        place = torch.empty_like(perm).scatter_(-1, perm, torch.arange(n).expand_as(perm))
        return perm.gather(-1, torch.from_numpy(_sorted_keys_cpu(neg, place.numpy()) & 0xFFFFFFFF))
    return torch.from_numpy(key & 0xFFFFFFFF)


def sorted_ranks(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(sorter, rank)`` along the last dim: ``x.gather(-1, sorter)`` is ascending and ``rank`` the average
    ranks (ties: the mean rank, as scipy.stats.rankdata; float64, 1-based) at the sorted positions. When no
    row has ties on the CPU fast path, ``rank`` is ``arange(1, n + 1)`` expanded (no memory).
    :func:`rankdata` scatters it back; a correlation with known ranks can gather those by ``sorter``."""
    n = x.shape[-1] if x.ndim else 1
    key = _sorted_keys_cpu(x)
    if key is not None:  # same ranks: equal floats have equal keys, and the order within a tie does not matter
        rank = torch.arange(1, n + 1, dtype=torch.float64).expand(x.shape)
        if n > 1:
            vals = key.view(np.int32)[..., 1::2] if _LITTLE_ENDIAN else key >> 32  # the patterns, no copy
            tied = vals[..., 1:] == vals[..., :-1]
            if tied.any():
                rank = rank.contiguous()
                _tie_means_cpu(tied, rank.numpy())
        key &= 0xFFFFFFFF  # the sorter, in place
        return torch.from_numpy(key), rank
    sorter = _argsort_last(x)
    xs = x.gather(-1, sorter)
    rank = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand(xs.shape).contiguous()
    if n > 1 and xs.numel():
        # Ties: a run of equal values at sorted positions p..q gets (p + q) / 2. Only the tied elements are
        # visited, as in _tie_means_cpu.
        differs = torch.ones(xs.shape, dtype=torch.bool, device=x.device)  # from the previous element
        differs[..., 1:] = xs[..., 1:] != xs[..., :-1]
        last = torch.ones_like(differs)  # the next element differs (or there is none)
        last[..., :-1] = differs[..., 1:]
        idx = (~(differs & last)).view(-1).nonzero().squeeze(1)  # tied elements, flat sorted positions
        if idx.numel():
            first_of_run, last_of_run = differs.view(-1)[idx], last.view(-1)[idx]
            flat = rank.view(-1)
            run_mean = (flat[idx[first_of_run]] + flat[idx[last_of_run]]) * 0.5
            flat[idx] = run_mean[first_of_run.cumsum(0) - 1]
    return sorter, rank


def rankdata(x: Tensor) -> Tensor:
    """Average ranks along the last dim (ties get the mean rank, as scipy.stats.rankdata), float64."""
    sorter, rank = sorted_ranks(x)
    return torch.empty(rank.shape, dtype=torch.float64, device=rank.device).scatter_(-1, sorter, rank)


def spearman_to(ref: Tensor, ref_ss: Tensor, x: Tensor) -> Tensor:
    """Spearman correlation of each row of ``x`` (..., n) with a reference whose average ranks are known:
    ``ref`` = ranks − (n + 1) / 2 (centred, ``x``'s shape or expanded to it), ``ref_ss`` = ``vecdot(ref, ref)``
    (broadcast against ``x``'s leading dims). Spearman is the Pearson
    correlation of ranks, and average ranks always have the mean (n + 1) / 2, so only ``x`` is ranked and
    its ranks are never scattered: Σ ref·(r − c) = Σ ref[sorter]·rank (Σ ref = 0). 0 where either side is
    constant (as :func:`pearson`). float64."""
    n = x.shape[-1]
    sorter, rank = sorted_ranks(x)
    g = ref.gather(-1, sorter)
    if rank.ndim >= 2 and not any(rank.stride()[:-1]):  # no ties in any row: the expanded arange
        dot = g @ rank[(0,) * (rank.ndim - 1)]
        ss = torch.full_like(dot, n * (n * n - 1) / 12)
    else:
        dot = torch.linalg.vecdot(g, rank)
        centred = rank - (n + 1) / 2
        ss = torch.linalg.vecdot(centred, centred)
    den = (ref_ss * ss).sqrt()
    return torch.where(den > 0, dot / den.clamp_min(1e-300), 0.0)


def pearson(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Pearson correlation along the last dim (0 where either side is constant)."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    num = (a * b).sum(-1)
    den = (a.pow(2).sum(-1) * b.pow(2).sum(-1)).sqrt()
    return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation along the last dim."""
    return pearson(rankdata(a), rankdata(b))


def upsample_to(m: Tensor, size: tuple[int, ...], mode: str = "bilinear") -> Tensor:
    """Resize a (B,C,*spatial) map to ``size`` (spatial dims only)."""
    if tuple(m.shape[2:]) == tuple(size):
        return m
    if mode in ("bilinear", "bicubic", "linear"):
        mode = {1: "linear", 2: mode if mode != "linear" else "bilinear"}.get(len(size), mode)
        return F.interpolate(m, size=size, mode=mode, align_corners=False)
    return F.interpolate(m, size=size, mode=mode)
