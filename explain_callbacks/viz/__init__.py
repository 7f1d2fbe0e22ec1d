"""Turning tensors into images: heatmap overlays, grids, curves, matrices (CHW float in [0, 1])."""

from .colormaps import CMAPS, apply_cmap, colorize
from .font import draw_text
from .images import class_colors, label_image, make_grid, map_to_2d, matrix_image, overlay, plot_curves, to_rgb, upscale

__all__ = [
    "CMAPS",
    "apply_cmap",
    "class_colors",
    "colorize",
    "draw_text",
    "label_image",
    "make_grid",
    "map_to_2d",
    "matrix_image",
    "overlay",
    "plot_curves",
    "to_rgb",
    "upscale",
]
