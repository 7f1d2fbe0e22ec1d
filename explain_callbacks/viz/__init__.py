"""Pictures of explanations.

``figures``: labelled matplotlib figures (matplotlib is optional: ``pip install explain_callbacks[viz]``);
each returns a plain image grid without labels when matplotlib is missing. ``images`` and ``colormaps``:
tensors to plain CHW images in [0, 1] (no matplotlib needed).
"""

from .colormaps import CMAPS, apply_cmap, colorize
from .figures import (
    DIVERGING,
    SEQUENTIAL,
    attribution_figure,
    colorize_tiles,
    concept_figure,
    curves_figure,
    figure_to_array,
    figure_to_tensor,
    has_matplotlib,
    hierarchy_figure,
    is_figure,
    map_scale,
    matrix_figure,
    sequence_figure,
    tabular_figure,
    tiles_figure,
    token_figure,
    token_markdown,
)
from .images import class_colors, make_grid, map_to_2d, matrix_image, overlay, to_rgb, upscale

__all__ = [
    "CMAPS",
    "DIVERGING",
    "SEQUENTIAL",
    "apply_cmap",
    "attribution_figure",
    "class_colors",
    "colorize",
    "colorize_tiles",
    "concept_figure",
    "curves_figure",
    "figure_to_array",
    "figure_to_tensor",
    "has_matplotlib",
    "hierarchy_figure",
    "is_figure",
    "make_grid",
    "map_scale",
    "map_to_2d",
    "matrix_figure",
    "matrix_image",
    "overlay",
    "sequence_figure",
    "tabular_figure",
    "tiles_figure",
    "to_rgb",
    "token_figure",
    "token_markdown",
    "upscale",
]
