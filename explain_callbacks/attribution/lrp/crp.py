"""Concept relevance propagation: LRP conditioned on channels of a chosen layer.

Achtibat et al. 2023, "From attribution maps to human-understandable explanations through Concept
Relevance Propagation" (Nature Machine Intelligence): the relevance reaching layer L is kept only on
channel c (the "concept") and propagated on to the input, which gives the map of concept c; the
relevance of channel c at L (summed over its positions) is how much the concept carries the
prediction. Many concepts in one batched pass: each sample is repeated once per concept and each
copy masked to its own channel.

Relevance maximisation, reference crops and the ConceptMonitor are not part of this module yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..._internal.batching import chunks
from ..._internal.outputs import OutputSpec, read_scores
from ..layers import find_layer
from .engine import LRP, _output_relevance, lrp_hooks

__all__ = ["conditional_relevance"]


def conditional_relevance(
    lrp: LRP,
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | int | None,
    layer: str | nn.Module,
    concepts: Sequence[int],
    *,
    output_key: OutputSpec = None,
) -> tuple[Tensor, Tensor]:
    """CRP maps and concept relevances of ``concepts`` (channel indices of ``layer``'s output).

    Returns ``(maps, relevance)``: ``maps`` (B, k, *input shape), the input relevance with the layer's
    relevance restricted to each concept; ``relevance`` (B, k), each concept's relevance at the layer
    (Σ over its positions). The B·k rows go through the model in chunks of ``lrp.batch_size``.
    Summed over all channels of the layer the maps give the unconditional LRP map.
    """
    concepts = [int(c) for c in concepts]
    if not concepts:
        raise ValueError("concepts must name at least one channel of the layer.")
    with lrp._entry(model, inputs, target, output_key) as (called, x, tgt):
        tgt = lrp._prepare(called, x, tgt)
        b, k = x.shape[0], len(concepts)
        mod = find_layer(model, layer)
        rows = x.detach().repeat_interleave(k, 0)
        row_tgt = None if tgt is None else tgt.repeat_interleave(k)
        row_concept = torch.tensor(concepts, device=x.device).repeat(b)
        maps, rels = [], []
        current: dict[str, Any] = {}

        def mask(_m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            sl = current["slice"]
            channels = out.shape[1] if out.ndim > 1 else 0
            cs = row_concept[sl]
            if out.ndim < 2 or int(cs.max()) >= channels or int(cs.min()) < 0:
                raise ValueError(
                    f"concepts {concepts} are not channels of layer {layer!r}, whose output has shape "
                    f"{tuple(out.shape)} ({channels} channels in dim 1)."
                )
            onehot = torch.zeros(out.shape[:2], dtype=out.dtype, device=out.device)
            onehot[torch.arange(out.shape[0], device=out.device), cs] = 1
            onehot = onehot.view(*out.shape[:2], *([1] * (out.ndim - 2)))

            def keep(grad: Tensor) -> Tensor:
                current["relevance"] = (grad * onehot).flatten(1).sum(1)
                return grad * onehot

            out.register_hook(keep)

        with lrp_hooks(called, lrp._composite, x[:1].detach(), lrp.canonize) as guard:
            # after the rule's hook: masks the relevance it receives. A layer explained merged with its BatchNorm
            # hands relevance on from the BatchNorm's output (same channels): the mask goes there.
            handle = guard.merged.get(mod, mod).register_forward_hook(mask)
            try:
                for sl in chunks(rows.shape[0], lrp.batch_size):
                    current["slice"] = sl
                    xc = rows[sl].clone().requires_grad_(True)
                    with guard:
                        scores = read_scores(called(xc))
                    r0 = _output_relevance(scores, None if row_tgt is None else row_tgt[sl])
                    (rel,) = torch.autograd.grad(scores, xc, grad_outputs=r0, allow_unused=True)
                    maps.append(torch.zeros_like(xc) if rel is None else rel.detach())
                    rels.append(current.pop("relevance", torch.zeros(xc.shape[0], device=xc.device)).detach())
            finally:
                handle.remove()
        return torch.cat(maps).view(b, k, *x.shape[1:]), torch.cat(rels).view(b, k)
