"""Labelled figures drawn with matplotlib (an optional dependency), with a plain image grid as fallback.

Every function returns a ``matplotlib.figure.Figure`` when matplotlib is installed, and otherwise a
(3, H, W) image in [0, 1] (no text: the fallback has no labels) or ``None`` where a picture without
labels would mislead (curves). Figures are made with the object API (``Figure`` + the Agg canvas),
never through ``pyplot``: nothing is registered in pyplot's figure manager, the user's backend and
global state are untouched, and a figure is freed as soon as it is rendered and dropped.

Conventions (shared by the monitors): signed maps use a diverging colormap centred at zero with a
symmetric range ±s; unsigned maps a sequential one from 0 (or the minimum) to s; ``s`` is the 99.5th
percentile of |values| over every sample of one method, so the tiles of a method share one scale
and one colour bar, and one outlying pixel does not wash the rest out.
"""

from __future__ import annotations

import contextlib
import functools
import math
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .colormaps import apply_cmap
from .images import class_colors, make_grid, matrix_image, to_rgb, upscale

__all__ = [
    "DIVERGING",
    "SEQUENTIAL",
    "attribution_figure",
    "colorize_tiles",
    "concept_figure",
    "curves_figure",
    "figure_to_array",
    "figure_to_tensor",
    "has_matplotlib",
    "hierarchy_figure",
    "is_figure",
    "map_scale",
    "matrix_figure",
    "sequence_figure",
    "tabular_figure",
    "tiles_figure",
    "token_figure",
    "token_markdown",
]

DIVERGING = "RdBu_r"  # signed maps: blue negative, white zero, red positive
SEQUENTIAL = "inferno"  # unsigned maps: black (none) to yellow (most)
TILE_INCHES = 1.35  # at 100 dpi a tile's image area stays >= 96 px after titles and colour bars
DPI = 100
_STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 9,
    "image.interpolation": "nearest",
}
_MATPLOTLIB: bool | None = None


def has_matplotlib() -> bool:
    """Whether matplotlib can be imported (checked each call while it is missing, so a test may hide it)."""
    global _MATPLOTLIB
    if _MATPLOTLIB:
        import sys

        # a test hides it with sys.modules["matplotlib"] = None
        return sys.modules.get("matplotlib", True) is not None
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    _MATPLOTLIB = True
    return True


def is_figure(obj: Any) -> bool:
    """Whether ``obj`` is a matplotlib Figure (without importing matplotlib when it is not loaded)."""
    return type(obj).__name__ == "Figure" and type(obj).__module__.startswith("matplotlib")


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """Our font sizes for the duration of the block; the user's rcParams are restored afterwards."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def _styled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Build the figure inside :func:`_style`: fonts and image settings are read when artists are made."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not has_matplotlib():
            return fn(*args, **kwargs)
        with _style():
            return fn(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float, constrained: bool = True) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: rendering needs no backend selection
    return fig


def figure_to_array(fig: Any) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 RGB array (Agg), then clear it so its memory is freed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    with _style():
        canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return rgb


def figure_to_tensor(fig: Any) -> Tensor:
    """Render a figure to a (3, H, W) float image in [0, 1]."""
    return torch.from_numpy(figure_to_array(fig)).permute(2, 0, 1).float() / 255.0


# ---------------------------------------------------------------------------------------------- scales
def map_scale(maps: Tensor, signed: bool, q: float = 0.995) -> tuple[float, float]:
    """The colour range (vmin, vmax) shared by all samples of one method (see the module docstring)."""
    v = maps.detach().float().cpu().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return (-1.0, 1.0) if signed else (0.0, 1.0)
    if v.numel() > 1_000_000:  # quantile's limit; a strided sample is as good for a colour range
        v = v[:: math.ceil(v.numel() / 1_000_000)]
    if signed:
        s = float(torch.quantile(v.abs(), q))
        s = s if s > 0 else float(v.abs().max()) or 1.0
        return -s, s
    lo = min(float(v.min()), 0.0)
    hi = float(torch.quantile(v, q))
    if hi <= lo:
        hi = lo + (float(v.max()) - lo or 1.0)
    return lo, hi


def _image_hw(x: Tensor) -> np.ndarray:
    """A (C,H,W) input as an (H,W) grey or (H,W,3) RGB array in [0,1] (min-max over the image)."""
    rgb = to_rgb(x.unsqueeze(0))[0]
    if x.shape[0] != 3:
        return rgb[0].numpy()
    return rgb.permute(1, 2, 0).numpy()


def _hide_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------- attribution maps
@_styled
def attribution_figure(
    inputs: Tensor,
    maps: Mapping[str, Tensor],
    signed: Mapping[str, bool] | None = None,
    captions: Sequence[str] | None = None,
    wrong: Sequence[bool] | None = None,
    title: str | None = None,
    regions: Tensor | None = None,
) -> Any:
    """One row per probe sample: the input, then one map per method (image data).

    Args:
        inputs: (N, C, H, W) images.
        maps: ``{method: (N, H, W)}`` maps (channels already reduced; another resolution than the
            input is drawn stretched over the same tile, e.g. Grad-CAM's).
        signed: per method, whether its maps are signed (default: any value < 0).
        captions: one per sample (true class, prediction and probability), drawn above its input; a
            caption wider than the tile is broken at " · " onto lines.
        wrong: per sample, whether the prediction is wrong (caption drawn in red).
        title: the figure's title.
        regions: (N, H, W) masks of the explained output region (a target operator's region, in the input's
            resolution), outlined over the input and over every map; None: nothing drawn.

    Each method's column shares one colour scale and has one colour bar under it.
    """
    signed = dict(signed or {}) | {k: bool((v < 0).any()) for k, v in maps.items() if k not in (signed or {})}
    n = int(inputs.shape[0])
    names = list(maps)
    if not has_matplotlib():
        cols = [to_rgb(inputs)]
        for k in names:
            lo, hi = map_scale(maps[k], signed[k])
            m = _fit(maps[k], inputs.shape[-2:])
            cols.append(_colorize_range(m, lo, hi, signed[k]))
        if regions is not None:  # the region's outline in cyan over the input tiles
            edge = _outline(regions.float().cpu()).unsqueeze(1)
            cols[0] = torch.where(edge, torch.tensor([0.0, 0.9, 1.0]).view(1, 3, 1, 1), cols[0])
        tiles = torch.stack(cols, 1).reshape(-1, 3, *inputs.shape[-2:])
        return make_grid(upscale(tiles, 96), nrow=len(cols))
    ncol = 1 + len(names)
    # a fixed grid (no layout solver: constrained layout took seconds for 16 rows of 4 tiles)
    # room above each row for its caption's lines (7 pt: about 0.12 in a line): a third line ("explains <class>")
    # ran into the row above
    lines = max((_wrap(c).count("\n") + 1 for c in captions), default=1) if captions is not None else 1
    gap, head, left = 0.14, 0.12 + 0.12 * max(lines, 2), 0.12
    top, bottom = (0.4 if title else 0.1), 0.75
    fig, axes, box, height = _panel_grid(n, ncol, TILE_INCHES, TILE_INCHES, head, gap, left, left, top, bottom)
    for i in range(n):
        ax = axes[i, 0]
        img = _image_hw(inputs[i].detach().float().cpu())
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        _draw_region(ax, regions, i)
        _hide_ticks(ax)
        if captions is not None:
            ax.set_title(_wrap(captions[i]), color="#c0392b" if wrong is not None and wrong[i] else "black",
                         fontsize=7)  # fmt: skip
        if i == n - 1:
            ax.set_xlabel("input")
    for j, k in enumerate(names, start=1):
        lo, hi = map_scale(maps[k], signed[k])
        cmap = DIVERGING if signed[k] else SEQUENTIAL
        im = None
        for i in range(n):
            ax = axes[i, j]
            im = ax.imshow(maps[k][i].detach().float().cpu().numpy(), cmap=cmap, vmin=lo, vmax=hi)
            _draw_region(ax, regions, i, maps[k].shape[-2:])  # a lower-resolution map (Grad-CAM): resized
            _hide_ticks(ax)
            if i == 0:
                ax.set_title(k, fontweight="bold")
        cax = fig.add_axes(box(left + j * (TILE_INCHES + gap) + 0.1, bottom - 0.33, TILE_INCHES - 0.2, 0.1))
        _colorbar(fig, im, [], "signed (0 = white)" if signed[k] else "unsigned (≥ 0)", cax=cax)
    if title:
        fig.suptitle(title, y=1 - 0.12 / height, va="top")
    return fig


REGION_COLOUR = "#00c8ff"


def _outline(regions: Tensor) -> Tensor:
    """The boundary pixels (N, H, W) bool of (N, H, W) masks: set pixels with an unset 4-neighbour."""
    m = regions > 0.5
    pad = torch.nn.functional.pad(m.float().unsqueeze(1), (1, 1, 1, 1))[:, 0] > 0.5
    inner = pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
    return m & ~inner


def _draw_region(ax: Any, regions: Tensor | None, i: int, size: Sequence[int] | None = None) -> None:
    """Outline sample ``i``'s region (a contour at 0.5) on ``ax``, resized to ``size`` (the tile's pixels)."""
    if regions is None or i >= regions.shape[0]:
        return
    r = regions[i].detach().float().cpu()
    if size is not None and tuple(r.shape) != tuple(size):
        r = torch.nn.functional.interpolate(r[None, None], size=tuple(size), mode="nearest")[0, 0]
    if float(r.max()) <= 0.5 or float(r.min()) > 0.5:  # empty or everything: no contour to draw
        return
    ax.contour(r.numpy(), levels=[0.5], colors=REGION_COLOUR, linewidths=1.2)


def _panel_grid(
    n: int, ncol: int, panel_w: float, panel_h: float, head: float, gap: float, left: float, right: float,
    top: float, bottom: float,
) -> tuple[Any, np.ndarray, Callable[[float, float, float, float], list[float]], float]:
    """A figure with an ``n`` x ``ncol`` grid of panels placed in inches (no layout solver: constrained layout took
    seconds for 16 rows), ``head`` inches above each row for captions. Returns the figure, the axes, ``box`` (inches
    to figure fractions, for further axes such as colour bars) and the figure's height in inches."""
    width = left + ncol * panel_w + (ncol - 1) * gap + right
    height = top + n * (head + panel_h) + bottom
    fig = _figure(width, height, constrained=False)

    def box(x0: float, y0: float, w: float, h: float) -> list[float]:
        return [x0 / width, y0 / height, w / width, h / height]

    axes = np.empty((n, ncol), dtype=object)
    for i in range(n):
        for j in range(ncol):
            y0 = height - top - (i + 1) * (head + panel_h)
            axes[i, j] = fig.add_axes(box(left + j * (panel_w + gap), y0, panel_w, panel_h))
    return fig, axes, box, height


def _fit_title(fig: Any, title: str) -> str:
    """``title`` broken into lines as wide as the figure (about 11 characters an inch at the title's size): a
    one-tile figure cut a long title off at both edges."""
    width = max(12, int(fig.get_figwidth() * 11))
    return textwrap.fill(title, width=width, break_long_words=False)


def _wrap(caption: str, width: int = 24) -> str:
    """Break a caption at " · " where it would be wider than a tile (about ``width`` characters)."""
    if len(caption) <= width:
        return caption
    return caption.replace(" · ", "\n")


def _colorbar(fig: Any, im: Any, axes: list[Any], label: str, location: str = "bottom", cax: Any = None) -> Any:
    """One colour bar for ``axes`` (which share ``im``'s scale), or in ``cax``, with few, short tick labels."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if cax is not None:
        cax.set_label("<colorbar>")  # matplotlib's own name for the axes of a colour bar
        cb = fig.colorbar(im, cax=cax, orientation="horizontal")
    else:
        cb = fig.colorbar(im, ax=axes, location=location, shrink=0.9, aspect=15 if location == "bottom" else 25,
                          pad=0.02)  # fmt: skip
    # 3 bins and short labels: a tile-wide bar of small values ("0 8e-05 0.00016 0.00024") ran its labels together
    cb.locator = MaxNLocator(nbins=3, symmetric=im.norm.vmin == -im.norm.vmax)
    cb.formatter = FuncFormatter(lambda v, _: tick_label(v))
    cb.update_ticks()
    cb.ax.tick_params(labelsize=6)
    cb.set_label(label, fontsize=7)
    return cb


def tick_label(v: float) -> str:
    """A short tick label: two significant digits, powers of ten as ``2.4e-4`` below 0.01 and from 10,000 on."""
    if v == 0:
        return "0"
    if abs(v) < 1e-2 or abs(v) >= 1e4:
        mantissa, exp = f"{v:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exp)}"
    return f"{v:.2g}"


def _fit(maps: Tensor, size: Sequence[int]) -> Tensor:
    m = maps.detach().float().cpu()
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m.unsqueeze(1), size=tuple(size), mode="nearest").squeeze(1)
    return m


def _colorize_range(m: Tensor, lo: float, hi: float, signed: bool) -> Tensor:
    """(N,H,W) values to (N,3,H,W) RGB on a fixed range (the fallback's shared scale)."""
    if signed:
        v = 0.5 + 0.5 * m / max(hi, 1e-12)
        return apply_cmap(v, "diverging").permute(0, 3, 1, 2).contiguous()
    v = (m - lo) / max(hi - lo, 1e-12)
    return apply_cmap(v, "heat").permute(0, 3, 1, 2).contiguous()


@_styled
def tabular_figure(
    maps: Mapping[str, Tensor],
    feature_names: Sequence[str] | None = None,
    sample_labels: Sequence[str] | None = None,
    signed: Mapping[str, bool] | None = None,
    max_features: int = 40,
    title: str | None = None,
) -> Any:
    """Tabular maps: per method a feature × sample heatmap (features named on the y-axis), with one
    colour bar per method. More than ``max_features`` features: the ones with the largest mean |map|
    over all methods are shown, in the same order for every method."""
    signed = dict(signed or {}) | {k: bool((v < 0).any()) for k, v in maps.items() if k not in (signed or {})}
    names = list(maps)
    first = next(iter(maps.values()))
    n, d = int(first.shape[0]), int(first.shape[1])
    given = feature_names is not None and len(feature_names) == d
    feats = list(feature_names) if given else [f"x{i}" for i in range(d)]
    order = torch.arange(d)
    if d > max_features:
        score = sum(m.detach().float().cpu().abs().mean(0) / m.abs().max().clamp_min(1e-12) for m in maps.values())
        order = score.argsort(descending=True)[:max_features]
    rows = [feats[int(i)] for i in order]
    if not has_matplotlib():
        cell = max(2, min(12, 480 // max(n, 1)))
        pics = []
        for k in names:
            lo, hi = map_scale(maps[k], signed[k])
            m = maps[k].detach().float().cpu()[:, order].T  # features × samples
            rgb = _colorize_range(m.unsqueeze(0), lo, hi, signed[k])[0]
            pics.append(F.interpolate(rgb.unsqueeze(0), scale_factor=cell, mode="nearest")[0])
        return make_grid(torch.stack(pics), nrow=len(pics))
    width = max(2.2, 0.22 * n + 1.0)
    fig = _figure(width * len(names) + 1.6, 0.17 * len(rows) + 1.9 + (0.3 if title else 0))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for j, k in enumerate(names):
        ax = axes[j]
        lo, hi = map_scale(maps[k], signed[k])
        m = maps[k].detach().float().cpu()[:, order].T.numpy()
        im = ax.imshow(m, cmap=DIVERGING if signed[k] else SEQUENTIAL, vmin=lo, vmax=hi, aspect="auto")
        ax.set_title(k, fontweight="bold")
        ax.set_yticks(range(len(rows)), rows if j == 0 else [""] * len(rows), fontsize=6)
        ax.set_xticks(range(n), sample_labels if sample_labels is not None else [str(i) for i in range(n)],
                      rotation=90, fontsize=6)  # fmt: skip
        ax.set_xlabel("probe sample")
        if j == 0:
            ax.set_ylabel("feature")
        _colorbar(fig, im, [ax], "signed (0 = white)" if signed[k] else "unsigned (≥ 0)")
    if title:
        fig.suptitle(title)
    return fig


@_styled
def sequence_figure(
    inputs: Tensor,
    maps: Mapping[str, Tensor],
    signed: Mapping[str, bool] | None = None,
    captions: Sequence[str] | None = None,
    wrong: Sequence[bool] | None = None,
    feature_names: Sequence[str] | None = None,
    max_rows: int = 32,
    title: str | None = None,
) -> Any:
    """Sequences and signals: one row per sample, the input then one map per method, time on the x-axis.

    Args:
        inputs: (N, F, T) inputs, features (channels) by time.
        maps: ``{method: (N, F', T)}`` maps, F' = F or 1 (one value per step, e.g. mask methods).
            More than ``max_rows`` features are summed into one row ("sum over features").
    """
    signed = dict(signed or {}) | {k: bool((v < 0).any()) for k, v in maps.items() if k not in (signed or {})}
    names = list(maps)
    n = int(inputs.shape[0])
    shown = {k: _rows(v, max_rows) for k, v in maps.items()}
    if not has_matplotlib():
        cols = []
        for k in names:
            lo, hi = map_scale(maps[k], signed[k])
            cols.append(upscale(_colorize_range(shown[k], lo, hi, signed[k]), 48))
        hmax = max(c.shape[-2] for c in cols)
        wmax = max(c.shape[-1] for c in cols)
        tiles = torch.ones(n, len(cols), 3, hmax, wmax)
        for j, c in enumerate(cols):
            tiles[:, j, :, : c.shape[-2], : c.shape[-1]] = c
        return make_grid(tiles.reshape(-1, 3, hmax, wmax), nrow=len(cols))
    x = inputs.detach().float().cpu()
    nfeat = int(x.shape[1])
    # a fixed grid in inches (a layout solver took seconds for 16 rows); room for tick labels left of each panel
    panel_w, panel_h, head, gap, left = 2.3, 0.85, 0.3, 0.55, 0.5
    top, bottom = (0.45 if title else 0.15), 0.95
    ncol = 1 + len(names)
    fig, axes, box, height = _panel_grid(n, ncol, panel_w, panel_h, head, gap, left, 0.15, top, bottom)
    steps = int(x.shape[-1])
    for i in range(n):
        ax = axes[i, 0]
        if nfeat <= 8:  # a few channels: lines over time
            for c in range(nfeat):
                label = feature_names[c] if feature_names is not None and c < len(feature_names) else f"ch {c}"
                ax.plot(np.arange(steps), x[i, c].numpy(), lw=0.8, label=label)
            ax.set_xlim(0, steps - 1)
            if i == 0 and nfeat > 1:
                ax.legend(loc="upper right", fontsize=5, ncol=min(nfeat, 4))
        else:
            ax.imshow(_rows(x[i : i + 1], max_rows)[0].numpy(), aspect="auto", cmap="gray", interpolation="nearest")
            ax.set_ylabel("feature")
        if captions is not None:
            ax.set_title(captions[i], color="#c0392b" if wrong is not None and wrong[i] else "black", fontsize=7)
        if i < n - 1:
            ax.set_xticklabels([])
        else:
            ax.set_xlabel("time step")
    for j, k in enumerate(names, start=1):
        lo, hi = map_scale(maps[k], signed[k])
        im = None
        for i in range(n):
            ax = axes[i, j]
            m = shown[k][i].numpy()
            im = ax.imshow(m, cmap=DIVERGING if signed[k] else SEQUENTIAL, vmin=lo, vmax=hi, aspect="auto",
                           extent=(-0.5, steps - 0.5, m.shape[0] - 0.5, -0.5))  # fmt: skip
            if m.shape[0] == 1:
                ax.set_yticks([])
            else:  # one row per channel / feature, named like the input's legend
                rows = range(m.shape[0])
                names = [feature_names[r] if feature_names is not None and r < len(feature_names) else f"ch {r}"
                         for r in rows]  # fmt: skip
                ax.set_yticks(list(rows), names if m.shape[0] <= 16 else [""] * m.shape[0], fontsize=6)
            if i == 0:
                ax.set_title(k, fontweight="bold")
            if i < n - 1:
                ax.set_xticklabels([])
            else:
                ax.set_xlabel("time step")
        cax = fig.add_axes(box(left + j * (panel_w + gap) + 0.2, bottom - 0.55, panel_w - 0.4, 0.1))
        _colorbar(fig, im, [], "signed (0 = white)" if signed[k] else "unsigned (≥ 0)", cax=cax)
    if title:
        fig.suptitle(title, y=1 - 0.12 / height, va="top")
    return fig


# ------------------------------------------------------------------------------------------------ tokens
TOKEN_SEQUENTIAL = "Reds"  # unsigned token scores: white (none) to red (most); text stays readable on it
_CHAR_INCHES = 0.6 * 8 / 72  # width of one character of the 8 pt monospace font


def _token_rgba(values: Tensor, lo: float, hi: float, signed: bool) -> np.ndarray:
    """Token scores (T,) to background colours (T, 4) on the method's shared range."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    cmap = colormaps[DIVERGING if signed else TOKEN_SEQUENTIAL]
    return cmap(Normalize(vmin=lo, vmax=hi, clip=True)(values.detach().float().cpu().numpy()))


@_styled
def token_figure(
    tokens: Sequence[Sequence[str]],
    scores: Mapping[str, Tensor],
    signed: Mapping[str, bool] | None = None,
    captions: Sequence[str] | None = None,
    wrong: Sequence[bool] | None = None,
    title: str | None = None,
    width: float = 8.0,
) -> Any:
    """Token heatmaps as text: for each sample its caption, then one line of its tokens per method, each token on a
    background coloured by its score (lines wrap at ``width`` inches).

    Args:
        tokens: per sample, the words of its real tokens (padding left out), in order.
        scores: ``{method: (N, T)}`` token scores; sample i uses its first ``len(tokens[i])`` scores.
        signed: per method, whether its scores are signed (default: any value < 0): signed scores on a diverging
            colormap centred at zero (blue negative, white zero, red positive), unsigned ones from white to red.
        captions / wrong: per sample, the caption (true class, prediction, score) and whether the prediction is
            wrong (caption in red).
        title: the figure's title.

    Each method's tokens share one colour scale over every sample (see the module docstring), drawn as one colour
    bar per method under the text. Without matplotlib: a (3, H, W) image, one row of coloured cells per sample and
    method (no words).
    """
    names = list(scores)
    signed = dict(signed or {}) | {k: bool((v < 0).any()) for k, v in scores.items() if k not in (signed or {})}
    n = len(tokens)
    scales = {}
    for k in names:  # the method's range over the real tokens only
        real = [scores[k][i, : len(tokens[i])] for i in range(n)]
        scales[k] = map_scale(torch.cat(real) if real else scores[k].flatten(), signed[k])
    if not has_matplotlib():
        length = max((len(t) for t in tokens), default=1) or 1
        rows = []
        for i in range(n):
            for k in names:
                lo, hi = scales[k]
                m = torch.full((1, 1, length), float("nan"))
                m[0, 0, : len(tokens[i])] = scores[k][i, : len(tokens[i])].detach().float().cpu()
                rows.append(_colorize_range(m.nan_to_num(0.0), lo, hi, signed[k])[0])
        return make_grid(upscale(torch.stack(rows), 16), nrow=1)
    label_w = max((len(k) for k in names), default=4) * _CHAR_INCHES + 0.25
    left, right, line_h, gap = 0.15, 0.15, 0.24, 0.12
    text_w = width - left - right - label_w
    # lay the words out first: (sample, method) -> lines of (x offset, word, score)
    layout: list[list[tuple[str, list[list[tuple[float, str, float]]]]]] = []
    n_lines = 0
    for i in range(n):
        per_method = []
        for k in names:
            lines: list[list[tuple[float, str, float]]] = [[]]
            xoff = 0.0
            for t, word in enumerate(tokens[i]):
                w = (len(word) + 1) * _CHAR_INCHES + 0.04
                if xoff + w > text_w and lines[-1]:
                    lines.append([])
                    xoff = 0.0
                lines[-1].append((xoff, word, float(scores[k][i, t])))
                xoff += w
            per_method.append((k, lines))
            n_lines += len(lines)
        layout.append(per_method)
    top = 0.45 if title else 0.15
    cbar_h = 0.8
    height = top + n * (line_h + gap) + n_lines * line_h + cbar_h
    fig = _figure(width, height, constrained=False)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # inches from the top
    ax.set_axis_off()
    y = top
    for i, per_method in enumerate(layout):
        y += gap
        if captions is not None:
            ax.text(left, y + line_h / 2, captions[i], va="center", fontsize=7, fontweight="bold",
                    color="#c0392b" if wrong is not None and wrong[i] else "black")  # fmt: skip
        y += line_h
        for k, lines in per_method:
            lo, hi = scales[k]
            ax.text(left, y + line_h / 2, k, va="center", fontsize=7, color="#555555")
            for line in lines:
                values = torch.tensor([v for _, _, v in line])
                colours = _token_rgba(values, lo, hi, signed[k]) if line else []
                for (xoff, word, _), rgba in zip(line, colours):
                    dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                    ax.text(left + label_w + xoff, y + line_h / 2, word, va="center", ha="left", family="monospace",
                            fontsize=8, color="white" if dark else "black",
                            bbox={"facecolor": rgba, "edgecolor": "none", "pad": 1.2})  # fmt: skip
                y += line_h
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar_w = min(2.2, (width - left - right) / max(len(names), 1) - 0.3)
    for j, k in enumerate(names):
        lo, hi = scales[k]
        sm = ScalarMappable(Normalize(lo, hi), DIVERGING if signed[k] else TOKEN_SEQUENTIAL)
        x0 = left + j * (bar_w + 0.3)
        cax = fig.add_axes([x0 / width, 0.45 / height, bar_w / width, 0.1 / height])
        _colorbar(fig, sm, [], f"{k}: " + ("signed (0 = white)" if signed[k] else "unsigned (≥ 0)"), cax=cax)
    if title:
        fig.suptitle(title, y=1 - 0.12 / height, va="top")
    return fig


def token_markdown(
    tokens: Sequence[Sequence[str]], scores: Mapping[str, Tensor], captions: Sequence[str] | None = None, top: int = 3
) -> str:
    """Token heatmaps as Markdown (TensorBoard's text tab shows no colours): per sample its caption, then per method
    the sentence with each token's score as a subscript-like ``word·+0.42`` and the ``top`` highest-scoring tokens
    in bold."""
    out = []
    for i, words in enumerate(tokens):
        out.append(f"**{i}: {captions[i]}**" if captions is not None else f"**sample {i}**")
        out.append("")
        for k, s in scores.items():
            vals = [float(v) for v in s[i, : len(words)]]
            best = set(sorted(range(len(vals)), key=lambda t: -vals[t])[:top])
            parts = [(f"**{w}**" if t in best else w) + f"`{vals[t]:+.2g}`" for t, w in enumerate(words)]
            out.append(f"- {k}: " + " ".join(parts))
        out.append("")
    return "\n".join(out).strip() + "\n"


def _rows(maps: Tensor, max_rows: int) -> Tensor:
    m = maps.detach().float().cpu()
    return m.sum(1, keepdim=True) if m.shape[1] > max_rows else m


# ------------------------------------------------------------------------------------ curves and matrices
@_styled
def curves_figure(
    curves: Mapping[str, Tensor],
    x: Tensor | None = None,
    title: str | None = None,
    xlabel: str = "fraction of features perturbed",
    ylabel: str = "model output",
    scores: Mapping[str, float] | None = None,
    score_name: str = "AUC",
) -> Any:
    """Line plot of named curves on shared axes (one line per method, a legend with its score).

    Returns None without matplotlib: unlabelled lines would not say which method is which (the
    monitors log the curve values as a table as well).
    """
    if not curves or not has_matplotlib():
        return None
    fig = _figure(5.0, 3.4)
    ax = fig.subplots()
    for name, y in curves.items():
        yv = y.detach().float().cpu().flatten().numpy()
        xv = np.linspace(0, 1, yv.size) if x is None else x.detach().float().cpu().flatten().numpy()
        label = name if scores is None or name not in scores else f"{name} ({score_name} {scores[name]:.3g})"
        ax.plot(xv, yv, lw=1.6, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return fig


@_styled
def matrix_figure(
    panels: Sequence[tuple[str, Tensor, bool]],
    labels: Sequence[str] | None = None,
    title: str | None = None,
    axis_label: str = "feature",
    shared: bool = True,
    ncols: int = 5,
) -> Any:
    """Square matrices (interaction scores) as heatmaps with axis labels and colour bars.

    Args:
        panels: ``(title, (P, P) matrix, signed)`` each. Signed panels use a diverging colormap centred
            at zero; with ``shared`` all signed panels share one scale and one colour bar (so samples
            compare), unsigned ones get their own.
        labels: the P feature (group) names on both axes (thinned when P is large).
    """
    if not panels:
        raise ValueError("matrix_figure needs at least one panel.")
    if not has_matplotlib():
        pics = []
        cell = max(2, min(16, 160 // max(panels[0][1].shape[-1], 1)))
        for _, m, s in panels:
            pics.append(matrix_image(m, "diverging" if s else "heat", cell=cell))
        hmax, wmax = max(p.shape[1] for p in pics), max(p.shape[2] for p in pics)
        out = torch.ones(len(pics), 3, hmax, wmax)
        for i, p in enumerate(pics):
            out[i, :, : p.shape[1], : p.shape[2]] = p
        return make_grid(out, nrow=min(ncols + 1, len(pics)))
    p = int(panels[0][1].shape[-1])
    ncol = min(ncols, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    side = max(2.4, min(4.5, 0.16 * p + 1.4))
    fig = _figure(side * ncol + 0.6, side * nrow + 0.6 + (0.3 if title else 0))
    axes = fig.subplots(nrow, ncol, squeeze=False).flatten()
    signed_all = [m for _, m, s in panels if s]
    shared_s = max((abs(map_scale(m, True)[1]) for m in signed_all), default=1.0) if shared else None
    names = list(labels) if labels is not None and len(labels) == p else [str(i) for i in range(p)]
    step = max(1, math.ceil(p / 24))
    signed_ims = []
    for ax, (name, m, s) in zip(axes, panels):
        arr = m.detach().float().cpu().numpy()
        if s:
            vmax = shared_s if shared_s is not None else map_scale(m, True)[1]
            im = ax.imshow(arr, cmap=DIVERGING, vmin=-vmax, vmax=vmax)
            signed_ims.append((ax, im))
            if not shared:
                fig.colorbar(im, ax=ax, shrink=0.8).set_label("score (signed)")
        else:
            lo, hi = map_scale(m, False)
            im = ax.imshow(arr, cmap=SEQUENTIAL, vmin=lo, vmax=hi)
            fig.colorbar(im, ax=ax, shrink=0.8).set_label("score")
        ticks = list(range(0, p, step))
        ax.set_xticks(ticks, [names[t] for t in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=6)
        ax.set_xlabel(axis_label)
        ax.set_ylabel(axis_label)
        ax.set_title(name)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if shared and signed_ims:
        cb = fig.colorbar(signed_ims[-1][1], ax=[a for a, _ in signed_ims], shrink=0.8)
        cb.set_label("interaction (signed, shared scale)")
    if title:
        fig.suptitle(_fit_title(fig, title))
    return fig


# ------------------------------------------------------------------------------------------ tiles
@_styled
def tiles_figure(
    tiles: Sequence[Tensor],
    titles: Sequence[str] | None = None,
    signed: bool | None = None,
    ncols: int = 6,
    title: str | None = None,
    colorbar_label: str = "attribution",
) -> Any:
    """Maps (H, W) on one shared colour scale (with one colour bar), or RGB pictures (3, H, W) as they
    are, each tile with its title: cluster means, coefficient images, masks."""
    if not tiles:
        raise ValueError("tiles_figure needs at least one tile.")
    rgb = all(t.ndim == 3 and t.shape[0] == 3 for t in tiles)
    stack = None if rgb else torch.stack([t.detach().float().cpu().reshape(t.shape[-2:]) for t in tiles])
    if signed is None and stack is not None:
        signed = bool((stack < 0).any())
    if not has_matplotlib():
        if rgb:
            pics = torch.stack([t.detach().float().cpu() for t in tiles])
        else:
            lo, hi = map_scale(stack, bool(signed))
            pics = _colorize_range(stack, lo, hi, bool(signed))
        return make_grid(upscale(pics, 96), nrow=min(ncols, len(tiles)))
    ncol = min(ncols, len(tiles))
    nrow = math.ceil(len(tiles) / ncol)
    fig = _figure(TILE_INCHES * ncol + (0.8 if not rgb else 0.2), TILE_INCHES * nrow + 0.5 + (0.3 if title else 0))
    axes = fig.subplots(nrow, ncol, squeeze=False).flatten()
    im = None
    if stack is not None:
        lo, hi = map_scale(stack, bool(signed))
    for i, ax in enumerate(axes):
        _hide_ticks(ax)
        if i >= len(tiles):
            ax.set_visible(False)
            continue
        if rgb:
            ax.imshow(tiles[i].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
        else:
            im = ax.imshow(stack[i].numpy(), cmap=DIVERGING if signed else SEQUENTIAL, vmin=lo, vmax=hi)
        if titles is not None:
            ax.set_title(titles[i])
    if im is not None:
        cb = fig.colorbar(im, ax=list(axes), shrink=0.8)
        cb.set_label(f"{colorbar_label} (signed, 0 = white)" if signed else colorbar_label)
    if title:
        fig.suptitle(_fit_title(fig, title))
    return fig


@_styled
def concept_figure(
    leads: Sequence[Tensor | None],
    lead_captions: Sequence[str],
    groups: Sequence[Sequence[tuple[Tensor | None, str, Sequence[Tensor]]]],
    n_crops: int,
    title: str | None = None,
    colorbar_label: str = "concept relevance (signed, 0 = white)",
    wrong: Sequence[bool] | None = None,
) -> Any:
    """Concepts (CRP, Achtibat et al. 2023), one row per sample or class: a lead picture (the input, RGB
    (3, H, W) in [0, 1]; None for a text-only cell) with its caption, then per concept a group: its
    conditional map (H, W) (or None), the group's caption above it ("channel 7: 42 %") and up to
    ``n_crops`` reference crops (RGB (3, h, w), any size, drawn stretched over a tile). Every map of the
    figure shares one signed colour scale and one colour bar, so concepts compare across rows. ``wrong``: per
    row, whether its prediction is wrong (caption drawn in red).

    Without matplotlib: the tiles in the same order (blank where missing), each resized to the first
    lead's size, as one grid without labels."""
    if not groups or not any(groups):
        raise ValueError("concept_figure needs at least one row with one concept.")
    n = len(groups)
    width_groups = max(len(g) for g in groups)
    ncol = 1 + width_groups * (1 + n_crops)
    maps = [m.detach().float().cpu() for row in groups for (m, _, _) in row if m is not None]
    lo, hi = map_scale(torch.cat([m.flatten() for m in maps]), True) if maps else (-1.0, 1.0)
    if not has_matplotlib():
        size = next((tuple(t.shape[-2:]) for t in leads if t is not None), None)
        if size is None:
            size = next(tuple(c.shape[-2:]) for row in groups for (_, _, cs) in row for c in cs)
        blank = torch.ones(3, *size)

        def fit(t: Tensor) -> Tensor:
            return F.interpolate(t.detach().float().cpu()[None], size=size, mode="nearest")[0]

        tiles = []
        for i in range(n):
            tiles.append(blank if leads[i] is None else fit(leads[i]))
            for j in range(width_groups):
                m, _, crops = groups[i][j] if j < len(groups[i]) else (None, "", [])
                tiles.append(blank if m is None else _colorize_range(fit(m[None])[None, 0], lo, hi, True)[0])
                tiles += [fit(crops[r]) if r < len(crops) else blank for r in range(n_crops)]
        return make_grid(upscale(torch.stack(tiles), 64), nrow=ncol)
    tile, crop, gap, head, left = TILE_INCHES, 0.75 * TILE_INCHES, 0.08, 0.5, 0.1
    top, bottom = (0.4 if title else 0.1), (0.7 if maps else 0.1)
    # a map tile per group only where some group has a map (the atlas rows have crops only)
    map_w = tile + gap if any(m is not None for row in groups for (m, _, _) in row) else 0.0
    group_w = map_w + n_crops * (crop + gap)
    width = 2 * left + tile + 3 * gap + width_groups * (group_w + 2 * gap) + 0.4
    height = top + n * (head + tile) + bottom
    fig = _figure(width, height, constrained=False)

    def box(x0: float, y0: float, w: float, h: float) -> list[float]:
        return [x0 / width, y0 / height, w / width, h / height]

    im = None
    for i in range(n):
        y0 = height - top - (i + 1) * (head + tile)
        ax = fig.add_axes(box(left, y0, tile, tile))
        _hide_ticks(ax)
        if leads[i] is not None:
            ax.imshow(leads[i].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy(), vmin=0, vmax=1)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, lead_captions[i], ha="center", va="center", fontsize=9, fontweight="bold")
        if leads[i] is not None:
            red = wrong is not None and wrong[i]
            ax.set_title(_wrap(lead_captions[i]), fontsize=7, color="#c0392b" if red else "black")
        x = left + tile + 3 * gap
        for m, caption, crops in groups[i]:
            if map_w:
                ax = fig.add_axes(box(x, y0, tile, tile))
                _hide_ticks(ax)
                if m is not None:
                    im = ax.imshow(m.detach().float().cpu().numpy(), cmap=DIVERGING, vmin=lo, vmax=hi)
                else:
                    ax.set_axis_off()
                ax.set_title(caption, fontsize=7, fontweight="bold", loc="left")
            if crops:
                # the crops side by side in one picture: one axes per group (axes cost ~15 ms each to make and clear)
                strip_w = n_crops * crop + (n_crops - 1) * gap
                ax = fig.add_axes(box(x + map_w, y0 + (tile - crop) / 2, strip_w, crop))
                ax.set_axis_off()
                ax.imshow(_crop_strip(crops[:n_crops], n_crops, gap / crop), vmin=0, vmax=1, aspect="auto")
                if not map_w:  # crops only (atlas): the concept's caption above its crops
                    ax.set_title(f"{caption} · reference crops", fontsize=7, fontweight="bold", loc="left")
                elif i == 0:
                    ax.set_title("reference crops (best first)", fontsize=6)
            x += group_w + 2 * gap
    if im is not None:
        cax = fig.add_axes(box(left + tile + 3 * gap, bottom - 0.35, min(2.5, width - 2 * left - tile), 0.1))
        _colorbar(fig, im, [], colorbar_label, cax=cax)
    if title:
        fig.suptitle(title, y=1 - 0.12 / height, va="top")
    return fig


def _crop_strip(crops: Sequence[Tensor], n: int, gap: float, px: int = 48) -> np.ndarray:
    """``n`` slots of ``px`` x ``px`` on white, ``gap`` (a fraction of a slot) apart; each RGB crop (3, h, w)
    scaled (nearest) to fit its slot with its aspect ratio kept, centred."""
    g = round(gap * px)
    out = np.ones((px, n * px + (n - 1) * g, 3), dtype=np.float32)
    for r, c in enumerate(crops):
        c = c.detach().float().cpu().clamp(0, 1)
        h, w = c.shape[-2:]
        f = px / max(h, w)
        hh, ww = max(1, int(h * f)), max(1, int(w * f))
        img = F.interpolate(c[None], size=(hh, ww), mode="nearest")[0].permute(1, 2, 0).numpy()
        y0, x0 = (px - hh) // 2, r * (px + g) + (px - ww) // 2
        out[y0 : y0 + hh, x0 : x0 + ww] = img
    return out


@_styled
def hierarchy_figure(
    levels: Sequence[tuple[Tensor, str]], image: Tensor | None = None, title: str | None = None
) -> Any:
    """ACD hierarchy levels: per level a label map (H, W) of components (0 = not selected), drawn in
    one colour per component over the grey input (when given), titled with the level and its size."""
    if not levels:
        raise ValueError("hierarchy_figure needs at least one level.")
    max_id = max(int(lab.max()) for lab, _ in levels)
    colors = torch.cat([torch.ones(1, 3), class_colors(max(max_id, 1))])
    tiles = []
    for lab, _ in levels:
        lab = lab.long()
        if lab.ndim == 1:
            lab = lab.view(1, -1)
        rgb = colors[lab].permute(2, 0, 1)
        if image is not None and image.ndim == 3 and lab.shape == image.shape[-2:]:
            gray = to_rgb(image.unsqueeze(0))[0].mean(0, keepdim=True).expand(3, -1, -1)
            sel = (lab > 0).unsqueeze(0)
            rgb = torch.where(sel, 0.55 * rgb + 0.45 * gray, 0.35 * gray + 0.65)
        tiles.append(rgb)
    if not has_matplotlib():
        hmax, wmax = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
        out = torch.ones(len(tiles), 3, hmax, wmax)
        for i, t in enumerate(tiles):
            out[i, :, : t.shape[1], : t.shape[2]] = t
        return make_grid(upscale(out, 96), nrow=min(4, len(tiles)))
    return tiles_figure(tiles, [t for _, t in levels], ncols=4, title=title)


def colorize_tiles(maps: Tensor, signed: bool) -> Tensor:
    """(N, H, W) maps to (N, 3, H, W) RGB on one shared scale (no labels)."""
    lo, hi = map_scale(maps, signed)
    return _colorize_range(maps.detach().float().cpu(), lo, hi, signed)

