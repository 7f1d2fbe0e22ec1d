"""Concept relevance propagation: LRP conditioned on channels of a chosen layer.

Achtibat et al. 2023, "From attribution maps to human-understandable explanations through Concept
Relevance Propagation" (Nature Machine Intelligence): the relevance reaching layer L is kept only on
channel c (the "concept") and propagated on to the input, which gives the map of concept c; the
relevance of channel c at L (summed over its positions) is how much the concept carries the
prediction. Many concepts in one batched pass: each sample is repeated once per concept and each
copy masked to its own channel.

Relevance maximisation (§"Relevance maximisation" of the paper) ranks reference samples by a
concept's relevance at the layer (its maximum over positions, or its sum) rather than by its
activation, so the references show what the concept contributes to predictions; the crop is the
input region the top position depends on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..._internal.batching import chunks
from ..._internal.guard import ModelState, grad_enabled
from ..._internal.outputs import OutputSpec, read_scores
from ..layers import find_layer
from .engine import LRP, _output_relevance, lrp_hooks

__all__ = [
    "ConceptAtlas",
    "RelevanceMaximization",
    "concept_atlas",
    "conditional_relevance",
    "layer_relevance",
    "relevance_maximization",
]


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


def layer_relevance(
    lrp: LRP,
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | int | None,
    layer: str | nn.Module,
    *,
    output_key: OutputSpec = None,
) -> Tensor:
    """The LRP relevance of ``layer``'s output neurons, shape of that output (B, C, ...): one
    backward pass per chunk, all concepts at once."""
    with lrp._entry(model, inputs, target, output_key) as (called, x, tgt):
        tgt = lrp._prepare(called, x, tgt)
        mod = find_layer(model, layer)
        found: list[Tensor] = []

        def record(_m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            out.register_hook(lambda g: found.append(g.detach()))

        outs = []
        with lrp_hooks(called, lrp._composite, x[:1].detach(), lrp.canonize) as guard:
            handle = guard.merged.get(mod, mod).register_forward_hook(record)
            try:
                for sl in chunks(x.shape[0], lrp.batch_size):
                    xc = x[sl].detach().clone().requires_grad_(True)
                    with guard:
                        scores = read_scores(called(xc))
                    r0 = _output_relevance(scores, None if tgt is None else tgt[sl])
                    found.clear()
                    torch.autograd.grad(scores, xc, grad_outputs=r0, allow_unused=True)
                    if not found:
                        raise ValueError(f"No relevance reached layer {layer!r}: it is not on the path to the output.")
                    outs.append(found[0])
            finally:
                handle.remove()
        return torch.cat(outs)


@dataclass
class RelevanceMaximization:
    """Top reference samples per concept. ``indices``/``scores`` (top_k, n_concepts): rows of the
    reference set, best first; ``positions`` (top_k, n_concepts, d): the layer position of the
    concept's largest relevance in that sample; ``boxes`` (top_k, n_concepts, d, 2): [start, stop)
    per spatial input dimension of the region that position depends on (its receptive field)."""

    concepts: list[int]
    indices: Tensor
    scores: Tensor
    positions: Tensor
    boxes: Tensor

    def crops(self, reference: Tensor, concept: int) -> list[Tensor]:
        """The reference crops of ``concept`` (one of :attr:`concepts`), best first."""
        j = self.concepts.index(int(concept))
        out = []
        for r in range(self.indices.shape[0]):
            sample = reference[int(self.indices[r, j])]
            index = (slice(None), *(slice(int(a), int(b)) for a, b in self.boxes[r, j]))
            out.append(sample[index])
        return out


def _receptive_box(model: nn.Module, layer: nn.Module, x: Tensor, channel: int, position: Sequence[int]) -> Tensor:
    """[start, stop) per spatial dim of the input entries the layer's neuron (channel, position) depends
    on at this sample: the support of its gradient w.r.t. the input (plain autograd, no LRP)."""
    store: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: store.append(out))
    try:
        xr = x.detach().clone().unsqueeze(0).requires_grad_(True)
        model(xr)
        (g,) = torch.autograd.grad(store[0][(0, channel, *position)], xr, allow_unused=True)
    finally:
        handle.remove()
    spatial = x.shape[1:]
    if g is None or not bool(g.any()):
        return torch.tensor([[0, n] for n in spatial])  # no gradient path at this sample: the whole input
    support = g[0].abs().sum(0) > 0
    box = []
    for d in range(support.ndim):
        other = tuple(i for i in range(support.ndim) if i != d)
        hit = support.any(dim=other) if other else support
        idx = hit.nonzero().flatten()
        box.append([int(idx.min()), int(idx.max()) + 1])
    return torch.tensor(box)


def relevance_maximization(
    lrp: LRP,
    model: nn.Module,
    reference: Tensor,
    target: Tensor | int | None,
    layer: str | nn.Module,
    concepts: Sequence[int] | None = None,
    *,
    top_k: int = 8,
    mode: str = "max",
    output_key: OutputSpec = None,
    relevance: Tensor | None = None,
) -> RelevanceMaximization:
    """Rank the ``reference`` samples (a bounded set, e.g. validation data) for each concept by its
    relevance at ``layer`` for ``target`` (``mode="max"``: the largest over positions, as the paper's
    relevance maximisation; ``"sum"``: the concept relevance), with each top sample's receptive-field box.
    ``relevance``: :func:`layer_relevance` of the same arguments when the caller has it already (saves its pass)."""
    if mode not in ("max", "sum"):
        raise ValueError(f"mode must be 'max' (largest relevance over positions) or 'sum', got {mode!r}.")
    if relevance is not None and relevance.shape[0] != reference.shape[0]:
        raise ValueError(
            f"relevance has {relevance.shape[0]} rows for {reference.shape[0]} reference samples; pass "
            "layer_relevance(lrp, model, reference, target, layer) or None."
        )
    if relevance is None:
        relevance = layer_relevance(lrp, model, reference, target, layer, output_key=output_key)
    rel = relevance
    if rel.ndim < 2:
        raise ValueError(f"layer {layer!r} gives shape {tuple(rel.shape)}: no channels to rank.")
    concepts = list(range(rel.shape[1])) if concepts is None else [int(c) for c in concepts]
    per = rel[:, concepts].flatten(2)  # (N, k, positions)
    flat_max, flat_arg = per.max(2)
    score = flat_max if mode == "max" else per.sum(2)
    k = min(int(top_k), rel.shape[0])
    scores, indices = score.topk(k, dim=0)  # (k, n_concepts)
    spatial = rel.shape[2:]
    arg = flat_arg.gather(0, indices)  # position of each top sample's largest relevance
    positions = torch.stack(torch.unravel_index(arg, spatial), -1) if spatial else arg.new_zeros(*arg.shape, 0)
    mod = find_layer(model, layer)
    with grad_enabled():  # the box passes need gradients, also when called under no_grad / inference_mode
        boxes = torch.zeros(k, len(concepts), max(reference.ndim - 2, 0), 2, dtype=torch.long)
        if reference.ndim > 2:
            state = ModelState.capture(model)  # eval mode for the box passes; modes and flags restored after
            try:
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                for r in range(k):
                    for j, c in enumerate(concepts):
                        pos = positions[r, j].tolist()
                        if len(pos) == 0:  # a dense layer: every input entry feeds it
                            boxes[r, j] = torch.tensor([[0, n] for n in reference.shape[2:]])
                        else:
                            boxes[r, j] = _receptive_box(model, mod, reference[int(indices[r, j])], c, pos)
            finally:
                state.restore(model)
    return RelevanceMaximization(concepts, indices, scores, positions, boxes)


@dataclass
class ConceptAtlas:
    """Per class, the concepts (channels of the layer) that carry it. ``concepts`` and ``relevance``
    (n_classes, top): channel indices, best first, and their mean concept relevance over the class's
    samples as a share of the class's mean total relevance at the layer (shares of all channels sum to 1)."""

    classes: list[int]
    concepts: Tensor
    relevance: Tensor

    def table(self) -> str:
        """A Markdown table: class, then its top concepts with their shares."""
        lines = ["| class | top concepts (share of the class's relevance at the layer) |", "|---|---|"]
        for i, c in enumerate(self.classes):
            cells = ", ".join(f"{int(k)} ({float(r):.0%})" for k, r in zip(self.concepts[i], self.relevance[i]))
            lines.append(f"| {c} | {cells} |")
        return "\n".join(lines)


def concept_atlas(
    lrp: LRP,
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    layer: str | nn.Module,
    *,
    top: int = 5,
    output_key: OutputSpec = None,
) -> ConceptAtlas:
    """Which concepts of ``layer`` carry each class (Achtibat et al. 2023, concept atlas): each sample
    explained for its label, concept relevance (Σ over positions per channel) averaged per class, the
    ``top`` channels kept. Their reference crops come from :func:`relevance_maximization`."""
    labels = torch.as_tensor(labels).long().to(inputs.device)
    rel = layer_relevance(lrp, model, inputs, labels, layer, output_key=output_key)
    per = rel.flatten(2).sum(2) if rel.ndim > 2 else rel  # (N, C) concept relevance
    classes = sorted(int(c) for c in labels.unique())
    k = min(int(top), per.shape[1])
    concepts, shares = [], []
    for c in classes:
        mean = per[labels == c].mean(0)
        share = mean / mean.sum().abs().clamp_min(1e-12)
        vals, idx = share.topk(k)
        concepts.append(idx)
        shares.append(vals)
    return ConceptAtlas(classes, torch.stack(concepts), torch.stack(shares))
