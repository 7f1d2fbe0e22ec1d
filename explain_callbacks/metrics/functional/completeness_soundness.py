"""Completeness and soundness of saliency maps (explainer metric).

Gupta, Saunshi, Yu, Lyu & Arora (2022), "New Definitions and Evaluations for Saliency Methods:
Staying Intrinsic, Complete and Sound", NeurIPS, arXiv:2211.02912.

**Reconstruction** (the simplified form of ``methods.md`` §4, not the paper's full protocol): for a
label ℓ with map A_ℓ, a_ℓ is the mean probability of ℓ along the insertion curve of A_ℓ (the top-k
features of A_ℓ kept, the rest zero, k swept over [0, n]; the trapezoid mean over the fractions) and
p_ℓ the probability of ℓ on x. Then

- completeness = min(max(0.1, a_ℓ) / min(1, p_ℓ), 1) at the explained label ℓ = target;
- soundness = mean over other labels ℓ' of min(max(0.1, p_ℓ') / a_ℓ', 1): a sound method cannot make
  the net predict a label the input does not support by keeping a few pixels.

Both in [0, 1], higher is better. The method is re-run for the other labels (the ``n_other`` most
probable ones, or all), ``batch_size`` rows per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks, resolve_batch_size
from ..._internal.outputs import read_scores
from ._guard import model_left_as_found
from ._utils import (
    MethodRuns,
    Substrate,
    Target,
    method_inputs,
    prepare_target,
    row_blocks,
    tile_rows,
    trapezoid,
    validate,
)
from .deletion import perturbation_curve

__all__ = ["completeness_soundness"]


@model_left_as_found
def completeness_soundness(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    method: Callable[..., Tensor],
    attributions: Tensor | None = None,
    *,
    n_other: int | None = 4,
    substrate: Substrate = "zeros",
    n_steps: int = 16,
    features: str = "auto",
    batch_size: BatchSize = "auto",
) -> tuple[Tensor, Tensor]:
    """(completeness (B,), soundness (B,)).

    Args:
        target: the explained labels (B,); classification models only.
        method: attribution method ``method(model, inputs, target) -> map``.
        attributions: the map of ``target`` if already computed.
        n_other: other labels checked for soundness: the most probable ones (``None``: all).
        substrate: value of the removed features (zeros as in the definition).
        n_steps: points of the insertion curve (plus the empty one).
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    if target is None:
        raise ValueError("completeness/soundness need class targets (a classifier); got target=None.")
    target = prepare_target(model, inputs, target)
    if target is None:  # an int or a sequence of None is not a class either
        raise ValueError("completeness/soundness need class targets (a classifier); got target=None.")
    if not isinstance(target, Tensor):  # a region, position or box: there are no "other labels" to rank
        raise TypeError(
            f"completeness/soundness compare the explained class with the other classes of a classifier; got the "
            f"target operator {target!r}. Use deletion/insertion, mufidelity or infidelity for such targets."
        )
    validate(inputs, attributions, target, inputs_checked=True)  # prepare_target checked them
    x = method_inputs(inputs)
    b = x.shape[0]
    with torch.no_grad():
        outs = [read_scores(model(x[sl])) for sl in chunks(b, batch_size)]  # tuple/dict: the error naming output_key
    probs = torch.cat(outs).softmax(1).double() if outs[0].ndim >= 2 else torch.cat(outs).new_ones(b, 1)
    k = probs.shape[1]
    if k < 2:
        raise ValueError("completeness/soundness need a model with at least 2 classes.")
    m = k - 1 if n_other is None else max(1, min(int(n_other), k - 1))
    others = probs.scatter(1, target.view(-1, 1), -1.0).topk(m, dim=1).indices  # (B, m), excludes target
    labels = torch.cat([target.view(-1, 1), others], dim=1).T.contiguous()  # (1 + m, B)
    first = 1 if attributions is not None else 0
    maps = []
    if attributions is not None:
        maps.append(attributions.detach().to(x.device).unsqueeze(0).expand(1, *attributions.shape))
    n_runs = labels.shape[0] - first
    runs = MethodRuns(method)  # checked once, then re-run without repeating the checks
    for rs, bs in row_blocks(n_runs, b, batch_size):
        nr = rs.stop - rs.start
        rows = tile_rows(x[bs], nr)
        tgt = labels[first + rs.start : first + rs.stop, bs].reshape(-1)
        a = runs(model, rows, tgt)
        if attributions is not None and a.shape[1:] != attributions.shape[1:]:
            raise ValueError(
                f"attributions of shape {tuple(attributions.shape)} are not this method's maps (it gives "
                f"{tuple(a.shape[1:])} per sample); pass the maps the same method produced, or attributions=None."
            )
        maps.append(a.view(nr, bs.stop - bs.start, *a.shape[1:]))
    if all(m.shape[1] == b for m in maps):  # blocks of whole runs (batch_size >= B): in label order already
        maps_t = maps[0] if len(maps) == 1 else torch.cat([m.to(maps[0].dtype) for m in maps])  # as _assemble
    else:
        maps_t = _assemble(maps, n_runs + first, b, rows_first=first, batch_size=batch_size)
    flat_x = tile_rows(x, labels.shape[0])
    # the undecorated curve: this call already runs under the metrics' guard (model_left_as_found), on its view
    curve, fr = perturbation_curve.__wrapped__(
        model, flat_x, maps_t.flatten(0, 1), labels.reshape(-1), mode="insertion", substrate=substrate,
        n_steps=n_steps, features=features, output="probability", batch_size=batch_size,
    )  # fmt: skip
    a_l = trapezoid(curve, fr).view(labels.shape[0], b)
    p_l = probs.gather(1, labels.T).T  # (1 + m, B)
    completeness = (a_l[0].clamp_min(0.1) / p_l[0].clamp_max(1.0)).clamp_max(1.0)
    soundness = (p_l[1:].clamp_min(0.1) / a_l[1:].clamp_min(1e-12)).clamp_max(1.0).mean(0)
    return completeness, soundness


def _assemble(parts: list[Tensor], n_labels: int, b: int, rows_first: int, batch_size: int | None) -> Tensor:
    """Blocks of maps (nr, nb, ...) in row-block order as one (n_labels, B, ...) tensor."""
    shape = parts[0].shape[2:]
    out = parts[0].new_empty(n_labels, b, *shape)
    i = 0
    if rows_first:
        out[0] = parts[0][0]
        i = 1
    for rs, bs in row_blocks(n_labels - rows_first, b, batch_size):
        out[rows_first + rs.start : rows_first + rs.stop, bs] = parts[i]
        i += 1
    return out
