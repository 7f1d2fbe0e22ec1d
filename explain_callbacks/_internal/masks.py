"""Mask machinery shared by the perturbation (black-box) attribution methods.

- **designs**: low-resolution masks, one value per grid cell, drawn by a sampler: i.i.d.
  ``bernoulli``, scrambled ``sobol`` (:class:`torch.quasirandom.SobolEngine`) or a binary ``lhs``
  (Latin hypercube), binary or continuous in [0, 1];
- **layouts**: how a design of ``d`` cells maps onto an input: images (B,C,H,W) get a g×g grid
  broadcast over channels, sequences (B,C,T) a grid of g cells along T, tabular (B,D) one cell per
  feature;
- **rendering**: upsampling a design to the input (nearest, bilinear, bicubic), optionally at
  (g+1)·cell and cropped at a random shift of up to one cell (RISE);
- **substrates**: what fills the masked-out part: zeros, the per-sample mean, a separable Gaussian
  blur, a constant or a tensor;
- **a forward-pass budget**: :func:`fit_budget` lowers a method's sample count to fit;
- **chunked evaluation**: :func:`masked_scores` runs ``f_c(s + (x − s)·M)`` for every sample and
  mask with at most ``batch_size`` rows per model call, rendering full-resolution masks one chunk
  at a time (memory bounded by ``batch_size``, not by the number of masks).

All randomness is drawn from the ``torch.Generator`` passed in, never from the global RNG, and all
random draws happen up front, so the result does not depend on ``batch_size``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batching import BatchSize, chunks, select_output
from .ops import gaussian_blur
from .outputs import read_scores
from .target_ops import TargetOperator

__all__ = [
    "OUTPUTS",
    "SAMPLERS",
    "SUBSTRATES",
    "UPSAMPLING",
    "MaskLayout",
    "base_scores",
    "fit_budget",
    "make_substrate",
    "mask_layout",
    "masked_scores",
    "random_offsets",
    "render_masks",
    "resize_map",
    "sample_designs",
    "score_outputs",
    "score_seed",
    "score_seeder",
    "sobol_points",
]

SAMPLERS = ("bernoulli", "sobol", "lhs")
UPSAMPLING = ("nearest", "bilinear", "bicubic")
SUBSTRATES = ("zeros", "mean", "blur")
#: mask elements rendered at a time by :func:`masked_scores` (16 MiB of float32)
RENDER_ELEMENTS = 1 << 22
#: input elements of the perturbed rows :func:`masked_scores` builds at a time (16 MiB of float32)
ROW_ELEMENTS = 1 << 22
#: model-output elements held by :func:`masked_scores` before scoring them in one go
SCORE_ELEMENTS = 1 << 20
OUTPUTS = ("auto", "logit", "softmax", "log_softmax", "sigmoid")


# ----------------------------------------------------------------------------------------------
# Designs
# ----------------------------------------------------------------------------------------------


def _int_seed(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator`` (for engines that take an int seed)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def sobol_points(n: int, d: int, generator: torch.Generator, *, device=None, dtype=torch.float32) -> Tensor:
    """``n`` points of a scrambled Sobol sequence in [0, 1)^d (Owen scrambling seeded from ``generator``).

    :class:`torch.quasirandom.SobolEngine` falls back to the global RNG when no seed is given; the
    seed is always drawn from ``generator`` here. Balance properties hold for ``n`` a power of 2.
    """
    if d > torch.quasirandom.SobolEngine.MAXDIM:
        raise ValueError(
            f"A Sobol sequence supports at most {torch.quasirandom.SobolEngine.MAXDIM} dimensions, got {d}; "
            "use a coarser grid (smaller grid_size) or sampler='lhs'."
        )
    pts = _scrambled_sobol(n, d, _int_seed(generator) % (2**31 - 1))
    return pts.to(device=device, dtype=dtype, copy=True)


@functools.lru_cache(maxsize=32)
def _scrambled_sobol(n: int, d: int, seed: int) -> Tensor:
    """The first n points of the scrambled sequence of (d, seed), float64 on the CPU; cached, because a method
    seeded per call draws the same sequence every call, and scrambling costs ~d·31² random draws (on a tabular
    MLP as much as Sobol's whole set of forward passes). Callers get a copy."""
    with torch.inference_mode(False):
        eng = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed)
        return eng.draw(n, dtype=torch.float64)


def sample_designs(
    n: int,
    d: int,
    sampler: str,
    generator: torch.Generator,
    *,
    p: float = 0.5,
    binary: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` designs of ``d`` cells, shape (n, d).

    Args:
        sampler: ``bernoulli`` (i.i.d. uniform), ``sobol`` (scrambled Sobol), ``lhs`` (Latin hypercube:
            each column visits the ``n`` strata of [0, 1] once, in a random order).
        p: keep probability of a binary design: cell = 1 where u < p (for ``lhs`` exactly
            round(p·n) ones per column).
        binary: threshold at ``p``; otherwise the continuous values u in [0, 1).
    """
    if n < 1 or d < 1:
        raise ValueError(f"Need n >= 1 designs of d >= 1 cells, got n={n}, d={d}.")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"The keep probability p must lie in (0, 1], got {p}.")
    gdev = generator.device
    if sampler == "bernoulli":
        u = torch.rand((n, d), generator=generator, device=gdev, dtype=torch.float64)
    elif sampler == "sobol":
        u = sobol_points(n, d, generator, device=gdev, dtype=torch.float64)
    elif sampler == "lhs":
        perm = torch.rand((n, d), generator=generator, device=gdev).argsort(0)
        jitter = torch.rand((n, d), generator=generator, device=gdev, dtype=torch.float64)
        u = (perm.to(torch.float64) + jitter) / n
    else:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    if binary:
        u = (u < p).to(torch.float64)
    return u.to(device=device if device is not None else gdev, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Layouts and rendering
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskLayout:
    """How ``d`` grid cells map onto one input sample.

    ``kind``: ``image`` (B,C,H,W), ``sequence`` (B,C,T) or ``tabular`` (B,D); ``grid``: the low
    resolution shape ((g, g), (g,) or (D,)); ``size``: the input's spatial shape; masks broadcast over
    channels, so a rendered mask has shape ``(1, *size)`` (image, sequence) or ``(D,)`` (tabular).
    """

    kind: str
    grid: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def d(self) -> int:
        return math.prod(self.grid)

    @property
    def mask_shape(self) -> tuple[int, ...]:
        return self.size if self.kind == "tabular" else (1, *self.size)

    def map_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of an attribution map at input resolution: (B,1,H,W), (B,1,T) or (B,D)."""
        return (batch, *self.mask_shape)


def mask_layout(inputs: Tensor, grid_size: int | tuple[int, ...], method: str = "this method") -> MaskLayout:
    """The layout for ``inputs``: a grid of ``grid_size`` cells per spatial side (ignored for tabular)."""
    if inputs.ndim == 2:
        return MaskLayout("tabular", (inputs.shape[1],), (inputs.shape[1],))
    if inputs.ndim == 3:
        g = grid_size[0] if isinstance(grid_size, tuple) else grid_size
        g = min(int(g), inputs.shape[2])
        return MaskLayout("sequence", (g,), (inputs.shape[2],))
    if inputs.ndim == 4:
        gs = grid_size if isinstance(grid_size, tuple) else (grid_size, grid_size)
        if len(gs) != 2:
            raise ValueError(f"grid_size for images must be an int or a pair, got {grid_size!r}.")
        g = (min(int(gs[0]), inputs.shape[2]), min(int(gs[1]), inputs.shape[3]))
        return MaskLayout("image", g, (inputs.shape[2], inputs.shape[3]))
    raise ValueError(
        f"{method} handles tabular (B,D), sequence (B,C,T) and image (B,C,H,W) inputs, got shape "
        f"{tuple(inputs.shape)}; reshape the input (e.g. fold extra dims into channels)."
    )


def random_offsets(n: int, layout: MaskLayout, generator: torch.Generator) -> Tensor:
    """Random shifts in [0, cell) per spatial dim, shape (n, ndim), cell = ceil(size / grid)."""
    cells = [math.ceil(s / g) for s, g in zip(layout.size, layout.grid)]
    cols = [torch.randint(0, c, (n,), generator=generator, device=generator.device) for c in cells]
    return torch.stack(cols, 1)


def _interp(m: Tensor, size: tuple[int, ...], mode: str) -> Tensor:
    """Interpolate (k, 1, *grid) to ``size``; 1-D bilinear/bicubic done as 2-D on a height-1 image."""
    if mode not in UPSAMPLING:
        raise ValueError(f"Unknown upsampling {mode!r}; choose one of {UPSAMPLING}.")
    if tuple(m.shape[2:]) == tuple(size) and mode == "nearest":
        return m
    if m.ndim == 3:  # sequence
        if mode == "nearest":
            return F.interpolate(m, size=size, mode="nearest")
        out = F.interpolate(m.unsqueeze(2), size=(1, size[0]), mode=mode, align_corners=False)
        return out.squeeze(2)
    if mode == "nearest":
        return F.interpolate(m, size=size, mode="nearest")
    return F.interpolate(m, size=size, mode=mode, align_corners=False)


def _mirror_linear(g: int, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The (size, g) matrix of linear interpolation from g cells to ``size`` pixels with the pixel-centre
    mapping ``c = (o + 0.5)·g/size − 0.5`` (``align_corners=False``) and mirrored borders: a coordinate
    c < 0 reads −c, c > g − 1 reads 2(g − 1) − c (numpy's and scikit-image's ``mode="reflect"``,
    scipy's ``"mirror"``), where ``F.interpolate`` clamps to the edge cell."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) * (g / size) - 0.5
    lo = c.floor()
    w = c - lo
    lo = lo.long()

    def mirror(i: Tensor) -> Tensor:
        if g == 1:
            return torch.zeros_like(i)
        period = 2 * (g - 1)
        i = i.remainder(period)
        return torch.where(i > g - 1, period - i, i)

    rows = torch.arange(size)
    mat = torch.zeros(size, g, dtype=torch.float64)
    mat.index_put_((rows, mirror(lo)), 1 - w, accumulate=True)
    mat.index_put_((rows, mirror(lo + 1)), w, accumulate=True)
    return mat.to(device=device, dtype=dtype)


def render_masks(
    designs: Tensor,
    layout: MaskLayout,
    mode: str = "nearest",
    offsets: Tensor | None = None,
) -> Tensor:
    """Full-resolution masks (k, *layout.mask_shape) from designs (k, d).

    Without ``offsets`` the grid is resized to the input's size. With ``offsets`` (k, ndim) it is
    resized to (g+1)·cell and cropped at the offsets (RISE's random shifts, cell = ceil(size/g)); a
    ``bilinear`` resize then mirrors at the borders, as the authors' ``generate_masks`` (Petsiuk et al.,
    ``skimage.transform.resize(grid, up_size, order=1, mode="reflect")``) does, rather than clamping to
    the edge cell (which changed ~13 % of the pixels of a 7×7 grid on 32×32 masks).
    Bicubic overshoot is clipped to [0, 1]. Tabular layouts are returned unchanged.
    """
    k = designs.shape[0]
    if layout.kind == "tabular":
        return designs.reshape(k, *layout.size)
    m = designs.reshape(k, 1, *layout.grid)
    if offsets is not None and mode == "bilinear":
        return _render_shifted_bilinear(m, layout, offsets)
    if offsets is None:
        out = _interp(m, layout.size, mode)
    else:
        cells = [math.ceil(s / g) for s, g in zip(layout.size, layout.grid)]
        big = tuple((g + 1) * c for g, c in zip(layout.grid, cells))
        up = _interp(m, big, mode)[:, 0]
        offsets = offsets.to(up.device)
        if layout.kind == "sequence":
            idx = offsets[:, :1] + torch.arange(layout.size[0], device=up.device)
            out = up.gather(1, idx).unsqueeze(1)
        else:
            h, w = layout.size
            rows = offsets[:, 0:1] + torch.arange(h, device=up.device)  # (k, h)
            cols = offsets[:, 1:2] + torch.arange(w, device=up.device)  # (k, w)
            up = up.gather(1, rows.unsqueeze(-1).expand(k, h, up.shape[-1]))
            out = up.gather(2, cols.unsqueeze(1).expand(k, h, w)).unsqueeze(1)
    if mode == "bicubic":
        out = out.clamp(0.0, 1.0)
    return out


def _render_shifted_bilinear(m: Tensor, layout: MaskLayout, offsets: Tensor) -> Tensor:
    """RISE's masks: each grid resized bilinearly (mirrored borders) to (g+1)·cell and cropped at its
    offset; only the cropped rows of the interpolation matrices are formed, (k, size, g) per axis."""
    k = m.shape[0]
    offsets = offsets.to(m.device)
    mats = []
    for a, (g, size) in enumerate(zip(layout.grid, layout.size)):
        cell = math.ceil(size / g)
        full = _mirror_linear(g, (g + 1) * cell, m.device, m.dtype)
        idx = offsets[:, a : a + 1] + torch.arange(size, device=m.device)  # (k, size)
        mats.append(full[idx])  # (k, size, g)
    if layout.kind == "sequence":
        return (mats[0] @ m.reshape(k, -1, 1)).reshape(k, 1, layout.size[0])
    return (mats[0] @ m[:, 0] @ mats[1].transpose(1, 2)).unsqueeze(1)


def resize_map(lowres: Tensor, layout: MaskLayout, mode: str = "bicubic") -> Tensor:
    """Resize per-cell scores (B, d) or (B, *grid) to the input: (B,1,H,W), (B,1,T) or (B,D).

    Unlike :func:`render_masks`, bicubic results are not clipped (scores are not in [0, 1]).
    """
    b = lowres.shape[0]
    if layout.kind == "tabular":
        return lowres.reshape(b, *layout.size)
    m = lowres.reshape(b, 1, *layout.grid)
    if mode not in UPSAMPLING:
        raise ValueError(f"Unknown upsampling {mode!r}; choose one of {UPSAMPLING}.")
    return _interp(m, layout.size, mode)


# ----------------------------------------------------------------------------------------------
# Substrates, outputs, budget
# ----------------------------------------------------------------------------------------------


def make_substrate(inputs: Tensor, kind: str | float | Tensor = "zeros", *, sigma: float = 5.0) -> Tensor:
    """What fills the masked-out part of ``inputs``.

    ``zeros``; ``mean`` (per sample and channel over the spatial dims; per sample over the features
    for tabular inputs); ``blur`` (separable Gaussian of ``sigma`` pixels, reflect padding; images and
    sequences only); a float; or a tensor broadcastable to the inputs (e.g. a data-set mean).
    """
    x = inputs.detach()
    if isinstance(kind, Tensor):
        try:
            return kind.to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError as err:
            raise ValueError(
                f"substrate of shape {tuple(kind.shape)} does not broadcast to inputs {tuple(x.shape)}."
            ) from err
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        return torch.full_like(x, float(kind))
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "mean":
        dims = tuple(range(2, x.ndim)) if x.ndim > 2 else (1,)
        return x.mean(dims, keepdim=True).expand_as(x)
    if kind == "blur":
        if x.ndim not in (3, 4):
            raise ValueError(
                f"A blur substrate needs (B,C,T) or (B,C,H,W) inputs, got {tuple(x.shape)}; "
                "use substrate='zeros', 'mean', a float or a tensor for tabular data."
            )
        return gaussian_blur(x, sigma)
    raise ValueError(f"Unknown substrate {kind!r}; use one of {SUBSTRATES}, a float, or a tensor.")


def score_outputs(out: Tensor, target: Tensor | None, output: str = "logit") -> Tensor:
    """The explained scalar per row: the target's logit (raw output), softmax/log-softmax
    probability, or sigmoid of the raw output. Single-output models accept ``logit``/``sigmoid``;
    ``auto`` is the softmax probability for classifiers and the raw output for single-output
    (regression) models."""
    if output not in OUTPUTS:
        raise ValueError(f"Unknown output {output!r}; choose one of {OUTPUTS}.")
    if isinstance(target, TargetOperator):  # softmax/sigmoid over the operator's own class dim
        return target(out, output)
    out = read_scores(out)  # a tuple/dict output: the error naming output_key
    if output == "auto":
        output = "logit" if out.ndim == 1 or out.shape[1] == 1 else "softmax"
    if output == "logit":
        return select_output(out, target)
    if output == "sigmoid":
        return torch.sigmoid(select_output(out, target))
    if out.ndim == 1 or out.shape[1] == 1:
        raise ValueError(
            f"output={output!r} needs a model with several class outputs, but it returns one per sample; "
            "use output='logit' (raw) or 'sigmoid' for single-output models."
        )
    if out.ndim == 2 and target is not None and not out.requires_grad:
        # The target's probability without the (N, C) softmax: p_t = 1 / Σ_j exp(z_j − z_t) and
        # log p_t = z_t − logsumexp(z). Equal up to rounding, and 3-6x faster on the CPU for few classes
        # (softmax along a short dim is slow), where the perturbation methods score 10⁴-10⁵ rows per call.
        zt = out.gather(1, target.view(-1, 1))
        if output == "softmax":
            return (out - zt).exp_().sum(1).reciprocal_()
        return zt[:, 0] - out.logsumexp(1)
    z = out.softmax(1) if output == "softmax" else out.log_softmax(1)
    return select_output(z, target)


def score_seed(out: object, target: object, output: str, onehot: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """The explained scalar f per row of a (N, K > 1) class-score output at class indices ``target`` (N,),
    and its gradient ∂f/∂out, both outside autograd: ``torch.autograd.grad(out, x, seed)`` then gives
    ∂f/∂x with the model's own backward pass alone, without the nodes of the softmax, the gather and the
    sum of :func:`score_outputs` (on a small MLP they cost a quarter of its forward+backward).

    Equal bit for bit to differentiating ``score_outputs(out, target, output).sum()``: ``logit`` seeds the
    one-hot e_t (what the gather's backward scatters); ``softmax`` seeds ``(e_t − p_t)·p``, the softmax
    backward of a one-hot, ``(g − Σ g·p)·p`` with Σ g·p = p_t exactly. None for every other case (target
    operators, single-output or dense outputs, ``log_softmax``, ``sigmoid``): the caller differentiates
    :func:`score_outputs`. ``onehot``: e_t of these rows when the caller holds it (a loop over steps with
    fixed targets builds it once).
    """
    seed = score_seeder(out, target, output, onehot)
    return None if seed is None else seed(out.detach())  # type: ignore[union-attr]


def score_seeder(
    out: object, target: object, output: str, onehot: Tensor | None = None
) -> Callable[[Tensor], tuple[Tensor, Tensor]] | None:
    """:func:`score_seed` as a function of the (detached) output alone, for outputs shaped like ``out`` and
    the same ``target``: a loop over steps with fixed targets checks the case and builds the one-hot rows
    once, then pays only the seed's own tensor operations per step. None where :func:`score_seed` is."""
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[1] < 2:
        return None
    if not isinstance(target, Tensor) or target.ndim != 1 or target.shape[0] != out.shape[0]:
        return None
    if output == "auto":
        output = "softmax"  # score_outputs' choice for a classifier
    if output not in ("logit", "softmax"):
        return None
    idx = target.view(-1, 1)
    if onehot is None or onehot.shape != out.shape:
        onehot = torch.zeros(out.shape, dtype=out.dtype, device=out.device).scatter_(1, idx, 1.0)
    e_t = onehot

    if output == "logit":

        def seed(z: Tensor) -> tuple[Tensor, Tensor]:
            return z.gather(1, idx).view(-1), e_t

        return seed

    def seed_softmax(z: Tensor) -> tuple[Tensor, Tensor]:
        p = z.softmax(1)
        pt = p.gather(1, idx)
        return pt.view(-1), torch.sub(e_t, pt).mul_(p)

    return seed_softmax


def fit_budget(
    requested: int,
    *,
    per_unit: int = 1,
    fixed: int = 0,
    budget: int | None = None,
    minimum: int = 1,
    power_of_two: bool = False,
    what: str = "samples",
    method: str = "this method",
) -> int:
    """The number of units (masks, designs, ...) to use under a forward-pass budget.

    A method needs ``fixed + per_unit · n`` forward passes per explained sample. Without a budget
    ``requested`` is returned; with one, ``n`` is lowered (to a power of two if asked) so the total
    fits. Raises if even ``minimum`` units do not fit.
    """
    n = int(requested)
    if budget is not None:
        cap = (int(budget) - fixed) // per_unit
        if cap < minimum:
            raise ValueError(
                f"{method} needs at least {fixed + per_unit * minimum} forward passes per sample "
                f"({fixed} fixed + {per_unit} per unit of {what}, at least {minimum}), but the budget is {budget}; "
                "raise the budget or use a coarser grid."
            )
        n = min(n, cap)
    if power_of_two and n >= 1:
        n = 1 << (n.bit_length() - 1)
    return max(n, minimum)


# ----------------------------------------------------------------------------------------------
# Chunked evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def masked_scores(
    model: nn.Module | Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Tensor | None,
    n_masks: int,
    render: Callable[[slice], Tensor],
    substrate: Tensor | None = None,
    *,
    batch_size: BatchSize = "auto",
    output: str = "logit",
    accumulate: Callable[[slice, slice, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Scores ``f_c(s + (x − s) ⊙ M_k)`` for every sample x (B) and mask M_k (n_masks): (B, n_masks).

    The n_masks·B (mask, sample) rows are one flat, mask-major sequence (all samples for mask k, then
    mask k+1), cut into model calls of exactly ``batch_size`` rows (the last one shorter), whatever B:
    a call may span masks, or part of a mask's samples, so it is never smaller than asked for (B = 8 and
    ``batch_size=18`` gives calls of 18 rows, not 16) nor larger (B = 32 and ``batch_size=18``: calls of
    18 rows, not 32), and calls far larger than B are possible.
    Calls are grouped in blocks of about :data:`ROW_ELEMENTS` input elements: each block renders its
    masks once and builds its rows in a few tensor operations into one buffer reused by every block
    (memory bounded by the block, not by the number of masks).

    Args:
        render: ``render(mask_slice)`` returns the full-resolution masks of that slice, shape
            (k, *per-sample mask shape) broadcastable to one input sample (e.g. (k,1,H,W) for images).
            It is called once per block (at most about :data:`RENDER_ELEMENTS` mask elements, a whole
            number of calls), so rendering costs a few tensor operations per block rather than per call.
            It must treat masks independently (the masks of a slice do not depend on how the range is
            cut); neighbouring blocks may both render a mask whose samples they share.
        substrate: (B, ...) fill of the masked-out part; zeros when None (x ⊙ M).
        batch_size: at most this many rows per model call (None: all rows in one call).
        accumulate: optional ``accumulate(sample_slice, mask_slice, masks, scores)`` called with the
            rendered masks of ``mask_slice`` and their (samples, masks) scores, once for every (sample,
            mask) pair, in rectangles of consecutive rows (one group of calls of at most
            :data:`SCORE_ELEMENTS` output elements, scored together), e.g. to sum f · M (RISE).
    """
    b = inputs.shape[0]
    n_rows = n_masks * b
    x = inputs.detach()
    out = torch.empty((n_masks, b), device=x.device, dtype=x.dtype)  # mask-major, as the flat rows
    if n_rows == 0:
        return out.t().contiguous()
    bs = n_rows if not batch_size else max(1, min(n_rows, int(batch_size)))
    zero_fill = substrate is None or not bool(substrate.detach().any())  # x ⊙ M: one multiply per block
    s = None if zero_fill else substrate.detach()
    diff = x if s is None else x - s
    per_row = max(1, x[0].numel())
    per_mask = max(1, math.prod(x.shape[2:]) if x.ndim > 2 else x.shape[1])
    # A block: a whole number of calls, about ROW_ELEMENTS input elements and RENDER_ELEMENTS mask
    # elements (its masks: rows / B, plus the partial masks at its two ends).
    calls = min(ROW_ELEMENTS // (bs * per_row), (RENDER_ELEMENTS // per_mask - 2) * b // bs)
    block = min(n_rows, bs * max(1, calls))
    buf = torch.empty((block, *x.shape[1:]), device=x.device, dtype=x.dtype)
    flat_out = out.view(-1)
    for r0 in range(0, n_rows, block):
        r1 = min(r0 + block, n_rows)
        m0, m1 = r0 // b, -(-r1 // b)
        rendered = render(slice(m0, m1)).to(device=x.device, dtype=x.dtype)
        rows = buf[: r1 - r0]
        for msl, ssl, rsl in _rectangles(r0, r1, b):
            m = rendered[msl.start - m0 : msl.stop - m0].unsqueeze(1)  # (k, 1, ...)
            d_s = diff[ssl]
            dst = rows[rsl].view(msl.stop - msl.start, ssl.stop - ssl.start, *x.shape[1:])
            if s is None:
                torch.mul(d_s, m, out=dst)
            else:
                torch.addcmul(s[ssl], d_s, m, out=dst)
        raw: list[Tensor] = []  # raw outputs of consecutive calls, scored together
        g0, held = r0, 0  # first row of the group, output elements held in raw
        for c0 in range(r0, r1, bs):
            c1 = min(c0 + bs, r1)
            raw.append(read_scores(model(rows[c0 - r0 : c1 - r0])))
            held += raw[-1].numel()
            if held >= SCORE_ELEMENTS or c1 == r1:  # the target's score once per group of calls, not per call
                _score_group(raw, rendered, m0, target, g0, c1, b, output, flat_out, accumulate)
                raw, g0, held = [], c1, 0
    return out.t().contiguous()


def _rectangles(r0: int, r1: int, b: int) -> list[tuple[slice, slice, slice]]:
    """The flat mask-major rows [r0, r1) of B samples per mask as at most three rectangles
    (masks, samples, their rows relative to r0): a partial first mask, whole masks, a partial last mask."""
    rects = []
    m, i = divmod(r0, b)
    r = r0
    if i:  # the rest of mask m's samples
        j = min(b, i + r1 - r0)
        rects.append((slice(m, m + 1), slice(i, j), slice(0, j - i)))
        r, m = r + j - i, m + 1
    k = (r1 - r) // b
    if k:
        rects.append((slice(m, m + k), slice(0, b), slice(r - r0, r - r0 + k * b)))
        r, m = r + k * b, m + k
    if r < r1:
        rects.append((slice(m, m + 1), slice(0, r1 - r), slice(r - r0, r1 - r0)))
    return rects


def _score_group(
    raw: list[Tensor],
    rendered: Tensor,
    m0: int,
    target: Tensor | None,
    g0: int,
    g1: int,
    b: int,
    output: str,
    flat_out: Tensor,
    accumulate: Callable[[slice, slice, Tensor, Tensor], None] | None,
) -> None:
    """Scores of the outputs ``raw`` of consecutive calls (the flat rows [g0, g1), mask-major) into
    ``flat_out`` (the (n_masks, B) scores, flattened), and the ``accumulate`` callback on them; ``rendered``
    holds the masks from ``m0`` on."""
    z = raw[0] if len(raw) == 1 else torch.cat(raw)
    tgt = None
    if target is not None and g0 % b == 0 and g1 % b == 0:  # whole masks: the targets repeated
        tgt = target.repeat((g1 - g0) // b)
    elif target is not None:  # a target operator indexes its rows with a CPU index
        idx = torch.arange(g0, g1, device=target.device if isinstance(target, Tensor) else "cpu") % b
        tgt = target[idx]
    sc = score_outputs(z, tgt, output).reshape(-1)
    flat_out[g0:g1] = sc
    if accumulate is not None:
        for msl, ssl, rsl in _rectangles(g0, g1, b):
            k, nb = msl.stop - msl.start, ssl.stop - ssl.start
            masks = rendered[msl.start - m0 : msl.stop - m0]
            accumulate(ssl, msl, masks, sc[rsl].view(k, nb).t())


@torch.no_grad()
def base_scores(
    model: nn.Module | Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Tensor | None,
    *,
    batch_size: BatchSize = "auto",
    output: str = "logit",
) -> Tensor:
    """``f_c(x)`` for each sample (B,), chunked."""
    outs = []
    for sl in chunks(inputs.shape[0], batch_size):
        outs.append(score_outputs(model(inputs[sl].detach()), None if target is None else target[sl], output))
    return torch.cat(outs)
