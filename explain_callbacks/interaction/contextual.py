"""Contextual decomposition as a pairwise interaction method and as an attribution method.

Interaction of groups S₁, S₂ (Singh, Murdoch & Yu 2019, arXiv:1806.05337, eq. 4; methods.md §5):
``I(S₁, S₂) = CD(S₁ ∪ S₂) − CD(S₁) − CD(S₂)`` with ``CD(S) = β_L`` at the target output. All P
singles and P(P−1)/2 unions are evaluated by one batched propagation (chunked by ``batch_size``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize
from .._internal.layout import check_channels_first, reads_channels_first
from .._internal.registry import ATTRIBUTIONS, INTERACTIONS
from ..attribution.base import Attributor
from .base import Groups, InteractionMethod, make_groups, pair_index
from .cd import cd_scores

__all__ = ["CDInteraction", "ContextualDecomposition", "patch_groups"]


@INTERACTIONS.register("cd", "contextual_decomposition")
class CDInteraction(InteractionMethod):
    """Pairwise CD interactions ``CD(S_p ∪ S_q) − CD(S_p) − CD(S_q)``; the diagonal holds the main
    effects ``CD(S_p)`` (also in ``last_info["main_effects"]``).

    Cost: one CD propagation (≈ 2 forward passes) of B·P(P+1)/2 rows, in chunks of ``batch_size``.
    Differentiable with respect to the parameters.
    """

    name = "cd"
    differentiable = True

    def __init__(self, batch_size: BatchSize = "auto", channels_first: bool | None = None) -> None:
        super().__init__(batch_size=batch_size, channels_first=channels_first)

    def interactions(self, model: nn.Module, inputs: Tensor, target: Tensor | None, groups: Groups) -> Tensor:
        m = groups.masks.to(device=inputs.device, dtype=inputs.dtype)
        p = m.shape[0]
        i, j = pair_index(p, inputs.device)
        unions = torch.maximum(m[i], m[j])
        sc = cd_scores(model, inputs, torch.cat([m, unions]), target, batch_size=self.batch_size)  # (B, P + pairs)
        main, joint = sc[:, :p], sc[:, p:]
        inter = joint - main[:, i] - main[:, j]
        out = torch.diag_embed(main)
        out[:, i, j] = inter
        out[:, j, i] = inter
        self.last_info["main_effects"] = main
        return out


def patch_groups(
    inputs: Tensor, patch_size: int | None, per_channel: bool = False, channels_first: bool = False
) -> Groups:
    """Groups of single features / pixels (``patch_size=None``) or square patches / windows; 3-D inputs
    are (B, T, D) sequences, or (B, C, L) signals with ``channels_first`` (steps shared over channels)."""
    shape = tuple(inputs.shape[1:])
    if len(shape) == 2 and channels_first and not per_channel:
        t = shape[1]
        ps = 1 if patch_size is None else int(patch_size)
        return make_groups(inputs, (torch.arange(t) // ps).view(1, t).to(inputs.device))
    if len(shape) == 3 and not per_channel:
        h, w = shape[1:]
        ps = 1 if patch_size is None else int(patch_size)
        gw = math.ceil(w / ps)
        ids = (torch.arange(h).view(h, 1) // ps) * gw + torch.arange(w).view(1, w) // ps
        return make_groups(inputs, ids.view(1, h, w).to(inputs.device))
    if len(shape) == 2 and not per_channel:
        t = shape[0]
        ps = 1 if patch_size is None else int(patch_size)
        return make_groups(inputs, (torch.arange(t) // ps).view(t, 1).to(inputs.device))
    numel = math.prod(shape)
    ps = 1 if patch_size is None else int(patch_size)
    return make_groups(inputs, (torch.arange(numel) // ps).view(shape).to(inputs.device))


@ATTRIBUTIONS.register("cd", "contextual_decomposition")
class ContextualDecomposition(Attributor):
    """CD attribution: each feature, pixel or patch scored by ``CD(S) = β_L`` at the target.

    Args:
        patch_size: None: one group per feature (tabular), per time step (sequences (B, T, D)) or per
            pixel shared over channels (images); an int: square patches / windows of that size.
        per_channel: images: one group per (channel, pixel) instead of per pixel.
        batch_size: decomposed rows per propagation.
        channels_first: how 3-D inputs are read: True (B, C, L) signals, False (B, T, D) sequences, None
            (default) decided from the model's first layer (a ``Conv1d`` reads signals).

    Returns (B, D) for tabular inputs, (B, T, 1) for sequences (B, T, D), (B, 1, L) for signals (B, C, L),
    and (B, 1, H, W) for images (every position of a group carries the group's score; broadcast over
    channels), or the input's shape with ``per_channel=True``. Differentiable with respect to the parameters.
    """

    name = "cd"
    input_shaped = False
    passes = "forward"  # CD propagates decomposed forwards (no backward)

    def __init__(
        self,
        patch_size: int | None = None,
        per_channel: bool = False,
        batch_size: BatchSize = "auto",
        channels_first: bool | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.patch_size = patch_size
        self.per_channel = per_channel
        self.channels_first = check_channels_first(channels_first)

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        cf = reads_channels_first(model, inputs, self.channels_first)
        groups = patch_groups(inputs, self.patch_size, self.per_channel, channels_first=cf)
        sc = cd_scores(model, inputs, groups.masks.to(inputs.dtype), target, batch_size=self.batch_size)
        if not create_graph:
            sc = sc.detach()
        self.last_info["group_scores"] = sc
        return groups.paint(sc)
