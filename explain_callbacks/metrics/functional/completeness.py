"""Completeness error of a path attribution (Sundararajan, Taly & Yan 2017, arXiv:1703.01365).

Integrated Gradients satisfies Σ_i IG_i = f(x) − f(x'); the relative gap
|Σ A − (f(x) − f(x'))| / |f(x) − f(x')| measures the quadrature error of IG (and how far any other
map is from being complete with respect to the baseline x'). Lower is better.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, resolve_batch_size
from ._guard import model_left_as_found
from ._utils import Substrate, Target, make_substrate, prepare_target, scores_chunked, validate

__all__ = ["completeness_error"]


@model_left_as_found
def completeness_error(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target,
    *,
    baseline: Substrate = "zeros",
    output: str = "logit",
    relative: bool = True,
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    eps: float = 1e-12,
) -> Tensor:
    """|Σ A − Δf| (/ |Δf| when ``relative``) per sample (B,), Δf = f(x) − f(baseline).

    The baseline must be the one the attribution used (IG's default: zeros).
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    target = prepare_target(model, inputs, target)
    validate(inputs, attributions, target, inputs_checked=True)  # prepare_target checked them
    x = inputs.detach()
    base = make_substrate(baseline, x, blur_sigma=blur_sigma).to(x.dtype)
    b = x.shape[0]
    both = torch.cat([x, base])  # one pass over inputs and baselines together
    tgt = None if target is None else torch.cat([target, target])
    scores = scores_chunked(model, both, tgt, output, batch_size)
    delta = scores[:b] - scores[b:]
    gap = (attributions.detach().to(x.device).reshape(b, -1).double().sum(1) - delta).abs()
    return gap / delta.abs().clamp_min(eps) if relative else gap
