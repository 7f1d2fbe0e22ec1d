"""µ-fidelity / faithfulness correlation (Bhatt, Weller & Moura 2020, IJCAI, arXiv:2005.00631).

For random subsets S of features, correlate Σ_{i∈S} A_i with f(x) − f(x_{S→baseline}) over the
subsets (higher is better). Two ways of drawing S:

- fixed size: ``subset_size`` features chosen uniformly without replacement (Quantus'
  ``FaithfulnessCorrelation``: Pearson, 100 subsets of 224 features of the flattened input,
  baseline = per-sample minimum, logits; ``preset="quantus"``);
- grid: the spatial grid of ``grid_size`` × ``grid_size`` cells, each cell dropped with probability
  ``drop_prob`` (Xplique's ``MuFidelity``: Spearman, 9 × 9 grid, p = 0.2, 200 subsets, baseline 0;
  ``preset="xplique"``).

Subsets come from a seeded ``torch.Generator`` (one draw per subset index, so results do not depend
on ``batch_size``), or are passed explicitly (``subsets``) to reproduce another implementation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, resolve_batch_size
from ..._internal.layout import StepsLast
from ..._internal.ops import pearson, spearman
from ...attribution.base import make_generator
from ._guard import model_left_as_found
from ._utils import (
    Substrate,
    Target,
    expand_feature_mask,
    feature_relevance,
    flat_call_scores,
    is_layout_substrate,
    make_substrate,
    prepare_target,
    resize_nearest,
    steps_last,
    transposed_sequence,
    validate,
)

__all__ = ["MUFIDELITY_PRESETS", "mufidelity", "random_subsets", "sample_without_replacement"]

MUFIDELITY_PRESETS: dict[str, dict[str, Any]] = {
    "quantus": {
        "correlation": "pearson",
        "n_subsets": 100,
        "subset_size": 224,
        "grid_size": None,
        "baseline": "min",
        "features": "element",
        "output": "logit",
    },
    "xplique": {
        "correlation": "spearman",
        "n_subsets": 200,
        "grid_size": 9,
        "drop_prob": 0.2,
        "baseline": 0.0,
        "features": "pixel",
        "output": "logit",
    },
}


#: subset-mask elements summed in one operation (Σ_S A of many subsets at once)
_SUM_ELEMENTS = 1 << 22

_DEFAULTS: dict[str, Any] = {
    "correlation": "pearson",
    "n_subsets": 100,
    "subset_size": 0.2,
    "grid_size": None,
    "drop_prob": 0.2,
    "baseline": "zeros",
    "features": "auto",
    "output": "logit",
}


def _is_default(value: Any, default: Any) -> bool:
    if isinstance(value, Tensor) or isinstance(default, Tensor):
        return value is default
    return type(value) is type(default) and value == default


def random_subsets(
    batch: int,
    n_features: int,
    n_subsets: int,
    *,
    subset_size: int | float = 0.2,
    grid_size: int | None = None,
    drop_prob: float = 0.2,
    spatial: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Boolean subset masks (R, B, n): True = feature in S (set to the baseline).

    Fixed size: exactly ``subset_size`` features (an int, or a fraction of n) per subset. Grid: cells of a
    ``grid_size`` grid over ``spatial`` dropped independently with probability ``drop_prob``, resized
    (nearest) to the spatial size; then n must equal prod(spatial) (pixel features).
    """
    if grid_size is not None:
        if spatial is None or int(torch.tensor(spatial).prod()) != n_features:
            raise ValueError(
                "grid subsets need spatial inputs with pixel features (features='pixel'); "
                "use subset_size for tabular data."
            )
        cells = (grid_size,) * len(spatial)
        u = torch.rand((n_subsets * batch, *cells), generator=generator, device=device)
        return (resize_nearest((u < drop_prob).float(), spatial) > 0.5).view(n_subsets, batch, n_features)
    k = round(subset_size * n_features) if isinstance(subset_size, float) else int(subset_size)
    if not 1 <= k < n_features:  # all n features in every subset: identical subsets, no correlation
        raise ValueError(f"subset_size must give between 1 and {n_features - 1} features, got {subset_size}.")
    complement = k > n_features // 2  # draw the smaller side
    out = sample_without_replacement(
        n_features, n_features - k if complement else k, (n_subsets, batch), generator=generator, device=device
    )
    return ~out if complement else out


def sample_without_replacement(
    n: int,
    k: int,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Uniform random k-subsets of range(n), one per row of ``shape``, as boolean masks (*shape, n).

    Floyd's algorithm (Bentley & Floyd 1987, "Programming pearls: a sample of brilliance"), vectorised
    over rows: for j = n−k .. n−1 draw t uniform in [0, j] and add t, or j if t is already taken. Exactly
    uniform, k random integers per row (not n random keys), k vectorised steps.
    """
    rows = math.prod(shape)
    table = torch.zeros(rows, n, dtype=torch.bool, device=device)
    ar = torch.arange(rows, device=device)
    for j in range(n - k, n):
        t = torch.randint(0, j + 1, (rows,), generator=generator, device=device)
        taken = table[ar, t]
        table[ar, torch.where(taken, torch.full_like(t, j), t)] = True
    return table.view(*shape, n)


def _as_subset_masks(subsets: Tensor, batch: int, n: int) -> Tensor:
    """Explicit subsets, long indices (B, R, k) or booleans (B, R, n), as booleans (R, B, n)."""
    if subsets.dtype == torch.bool:
        if subsets.ndim != 3 or subsets.shape[0] != batch or subsets.shape[2] != n:
            raise ValueError(f"boolean subsets must have shape (B={batch}, R, n={n}), got {tuple(subsets.shape)}.")
        return subsets.transpose(0, 1)
    if subsets.ndim != 3 or subsets.shape[0] != batch:
        raise ValueError(f"index subsets must have shape (B={batch}, R, k), got {tuple(subsets.shape)}.")
    m = torch.zeros(subsets.shape[0], subsets.shape[1], n, dtype=torch.bool, device=subsets.device)
    m.scatter_(2, subsets.long(), True)
    return m.transpose(0, 1)


@model_left_as_found
def mufidelity(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target,
    *,
    preset: str | None = None,
    correlation: str = "pearson",
    n_subsets: int = 100,
    subset_size: int | float = 0.2,
    grid_size: int | None = None,
    drop_prob: float = 0.2,
    baseline: Substrate = "zeros",
    features: str = "auto",
    output: str = "logit",
    subsets: Tensor | None = None,
    seed: int = 0,
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    channels_first: bool | None = None,
) -> Tensor:
    """Correlation (B,) over random subsets between the summed attribution and the output drop.

    Args:
        preset: ``"quantus"`` or ``"xplique"`` (see the module docstring): fills in the arguments left at
            their defaults (e.g. ``preset="quantus", subset_size=24`` for a small input).
        correlation: ``"pearson"`` or ``"spearman"``.
        n_subsets: number of subsets R.
        subset_size: features per subset (int) or fraction of features (float).
        grid_size: use grid-cell subsets instead (cells dropped with ``drop_prob``).
        baseline: value of the features in S (a substrate spec: zeros, min, mean, blur, a float...).
        features: ``"element"`` (every input entry) or ``"pixel"`` (positions, channel-summed map).
        output: ``"logit"`` (Quantus, Xplique), ``"probability"`` or ``"sigmoid"`` (multi-label).
        subsets: explicit subsets, indices (B, R, k) or booleans (B, R, n) over the features (of the inputs
            as given, in any layout).
        channels_first: how 3-D inputs are read when a setting runs along positions (blur or mean baselines,
            ``features="pixel"``, grid cells): None decides from the model's first layer (a recurrent,
            attention or linear layer reads (B,T,D) sequences: positions are the T steps), True (B,C,L),
            False (B,T,D).
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    if preset is not None:
        if preset not in MUFIDELITY_PRESETS:
            raise ValueError(f"preset must be one of {sorted(MUFIDELITY_PRESETS)}, got {preset!r}.")
        given = dict(correlation=correlation, n_subsets=n_subsets, subset_size=subset_size, grid_size=grid_size,
                     drop_prob=drop_prob, baseline=baseline, features=features, output=output)  # fmt: skip
        for key, value in MUFIDELITY_PRESETS[preset].items():
            if _is_default(given[key], _DEFAULTS[key]):
                given[key] = value
        correlation, n_subsets, subset_size = given["correlation"], given["n_subsets"], given["subset_size"]
        grid_size, drop_prob, baseline = given["grid_size"], given["drop_prob"], given["baseline"]
        features, output = given["features"], given["output"]
    if correlation not in ("pearson", "spearman"):
        raise ValueError(f"correlation must be 'pearson' or 'spearman', got {correlation!r}.")
    if subsets is None and grid_size is not None and (grid_size < 1 or not 0 < drop_prob < 1):
        raise ValueError(f"grid subsets need grid_size >= 1 and drop_prob in (0, 1), got {grid_size} and {drop_prob}.")
    if grid_size is not None and features == "auto":
        features = "pixel"
    validate(inputs, attributions)
    layout = is_layout_substrate(baseline) or features == "pixel"
    if subsets is None and steps_last(model, inputs, channels_first, layout):
        return mufidelity(
            StepsLast(model), inputs.transpose(1, 2), transposed_sequence(attributions, inputs), target,
            correlation=correlation, n_subsets=n_subsets, subset_size=subset_size, grid_size=grid_size,
            drop_prob=drop_prob, features=features, output=output, seed=seed, blur_sigma=blur_sigma,
            baseline=transposed_sequence(baseline, inputs) if isinstance(baseline, Tensor) else baseline,
            batch_size=batch_size, channels_first=True,
        )  # fmt: skip
    target = prepare_target(model, inputs, target)
    validate(inputs, None, target)  # the map was checked above
    x = inputs.detach()
    rel, fmode = feature_relevance(attributions, x, features)
    b, n = rel.shape
    if subsets is not None:
        masks = _as_subset_masks(subsets.to(x.device), b, n)
    else:
        masks = random_subsets(
            b, n, n_subsets, subset_size=subset_size, grid_size=grid_size, drop_prob=drop_prob,
            spatial=tuple(x.shape[2:]) if fmode == "pixel" else None,
            generator=make_generator(x.device, seed), device=x.device,
        )  # fmt: skip
    r_total = masks.shape[0]
    if r_total < 2:
        raise ValueError(f"µ-fidelity correlates over subsets: it needs at least 2 (n_subsets), got {r_total}.")
    base = make_substrate(baseline, x, blur_sigma=blur_sigma).to(x.dtype)
    rel = rel.double()
    # Σ_S A of every subset, in groups of at most _SUM_ELEMENTS mask elements (a few operations for all
    # subsets instead of a few per subset)
    sums = torch.empty(r_total, b, dtype=torch.float64, device=x.device)
    per = max(1, _SUM_ELEMENTS // max(1, b * n))
    for r in range(0, r_total, per):
        sums[r : r + per] = torch.where(masks[r : r + per], rel, 0.0).sum(-1)

    # run 0: x itself (f(x), in the first call), run k: x with subset k − 1 at the baseline
    def fill(run: int, sm: slice, out: Tensor) -> None:
        if run == 0:
            out.copy_(x[sm])
        else:
            torch.where(expand_feature_mask(masks[run - 1, sm], x.shape, fmode), base[sm], x[sm], out=out)

    def fill_runs(runs: slice, out: Tensor) -> None:  # whole runs: one selection for all of them
        if runs.start == 0:
            out[0].copy_(x)
            out, runs = out[1:], slice(1, runs.stop)
        if runs.stop > runs.start:
            torch.where(expand_feature_mask(masks[runs.start - 1 : runs.stop - 1], x.shape, fmode), base, x, out=out)

    # the (1 + r_total) x B rows in calls of exactly batch_size rows (a call may span two subsets)
    scores = flat_call_scores(model, x, target, r_total + 1, output, batch_size, fill, fill_runs)
    drops = scores[:b].unsqueeze(0) - scores[b:].view(r_total, b)
    corr = pearson if correlation == "pearson" else spearman
    return corr(sums.T, drops.T)
