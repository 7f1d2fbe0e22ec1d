"""The interaction contract and feature groups.

Every pairwise interaction method is called as ``scores = method(model, inputs, target, groups=...)``
and returns a (B, P, P) matrix per sample for P feature groups: off-diagonal entries are the
interaction of groups p and q (symmetric), the diagonal holds a per-group quantity documented by
each method (its main effect or its interaction share).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize, RowsPerCall
from .._internal.checks import check_inputs
from .._internal.guard import grad_enabled, normal_tensor
from .._internal.layout import check_channels_first, reads_channels_first
from .._internal.outputs import model_errors
from .._internal.registry import INTERACTIONS
from .._internal.targets import as_target_tensor, check_model_target

__all__ = [
    "INTERACTIONS",
    "GroupSpec",
    "Groups",
    "InteractionMethod",
    "build_interaction",
    "make_groups",
    "pair_auc",
    "top_pairs",
]

GroupSpec = Union[None, int, Tensor, Sequence[Sequence[int]], "Groups"]


@dataclass
class Groups:
    """P feature groups of one input sample.

    Attributes:
        masks: (P, *mask_shape) float 0/1 masks, ``mask_shape`` broadcastable to one sample (e.g.
            (1, H, W) for image patches shared by all channels).
        ids: group id of every position of ``mask_shape`` (long), -1 where no group, or None when
            groups overlap.
        grid: the layout of the groups when they form a grid ((gh, gw) patches, (g,) windows), else None.
        names: a short label per group (for tables).
    """

    masks: Tensor
    ids: Tensor | None = None
    grid: tuple[int, ...] | None = None
    names: list[str] | None = None

    @property
    def n(self) -> int:
        return int(self.masks.shape[0])

    def label(self, p: int) -> str:
        return self.names[p] if self.names else str(p)

    def paint(self, values: Tensor) -> Tensor:
        """Spread per-group values (B, P) onto the mask shape: (B, *mask_shape) (overlaps summed)."""
        return torch.einsum("bp,p...->b...", values, self.masks.to(device=values.device, dtype=values.dtype))


def _grid_ids(size: int, g: int) -> Tensor:
    """Cell index along one axis for ``g`` near-equal cells."""
    g = max(1, min(g, size))
    return (torch.arange(size) * g) // size


def make_groups(inputs: Tensor, groups: GroupSpec = None, *, channels_first: bool = False) -> Groups:
    """Build feature groups for ``inputs`` (B, *S).

    ``groups`` may be:

    - ``None``: one group per feature for tabular (B, D) inputs; one per position of dim 1 for
      (B, T, D) sequences (of dim 2, shared over channels, for (B, C, L) signals with
      ``channels_first=True``); a 4×4 grid of patches (shared over channels) for (B, C, H, W) images.
    - an int g: a g×g grid of patches (images), g windows along the time dim (sequences), g contiguous
      blocks of features (tabular).
    - a long tensor of group ids with the per-sample shape (or one broadcastable to it, e.g. (H, W)
      for an image segmentation); ids < 0 belong to no group.
    - a float/bool tensor (P, *S') of masks, S' broadcastable to the per-sample shape.
    - a sequence of index lists (tabular inputs, or flat indices into the per-sample shape).
    - a :class:`Groups` instance (returned as is).
    """
    if isinstance(groups, Groups):
        return groups
    shape = tuple(inputs.shape[1:])
    dev = inputs.device
    if groups is None or isinstance(groups, int):
        if len(shape) == 1:
            d = shape[0]
            g = d if groups is None else int(groups)
            ids = _grid_ids(d, g)
            return _from_ids(ids.to(dev), names=[f"x{i}" for i in range(d)] if g == d else None, grid=(g,))
        if len(shape) == 2 and channels_first:
            c, t = shape
            g = t if groups is None else int(groups)
            ids = _grid_ids(t, g).view(1, t).expand(c, t)
            return _from_ids(ids.to(dev), grid=(min(g, t),), mask_shape=(1, t))
        if len(shape) == 2:
            t = shape[0]
            g = t if groups is None else int(groups)
            ids = _grid_ids(t, g).view(t, 1).expand(t, shape[1])
            return _from_ids(ids.to(dev), grid=(min(g, t),), mask_shape=(t, 1))
        if len(shape) == 3:
            h, w = shape[1:]
            g = 4 if groups is None else int(groups)
            gh, gw = min(g, h), min(g, w)
            ids = _grid_ids(h, gh).view(h, 1) * gw + _grid_ids(w, gw).view(1, w)
            return _from_ids(
                ids.view(1, h, w).to(dev),
                grid=(gh, gw),
                names=[f"({r},{c})" for r in range(gh) for c in range(gw)],
            )
        raise ValueError(f"No default groups for inputs of shape {tuple(inputs.shape)}; pass groups explicitly.")
    if isinstance(groups, Tensor):
        if not groups.is_floating_point() and groups.dtype != torch.bool:
            ids = groups.to(dev).long()
            try:
                torch.broadcast_shapes(ids.shape, shape)
            except RuntimeError as err:
                raise ValueError(
                    f"A group-id map must broadcast to the per-sample shape {shape}, got {tuple(ids.shape)}."
                ) from err
            if ids.ndim < len(shape):
                ids = ids.view((1,) * (len(shape) - ids.ndim) + tuple(ids.shape))
            return _from_ids(ids)
        masks = groups.to(dev).float()
        if masks.ndim == len(shape):  # a single mask
            masks = masks.unsqueeze(0)
        try:
            torch.broadcast_shapes(masks.shape[1:], shape)
        except RuntimeError as err:
            raise ValueError(
                f"Group masks must have shape (P, *S) with S broadcastable to {shape}, got {tuple(masks.shape)}."
            ) from err
        return Groups(masks=masks)
    if isinstance(groups, Sequence):
        numel = math.prod(shape)
        masks = torch.zeros(len(groups), numel, device=dev)
        for p, idx in enumerate(groups):
            idx_t = torch.as_tensor(list(idx), dtype=torch.long)
            if idx_t.numel() and (int(idx_t.min()) < 0 or int(idx_t.max()) >= numel):
                raise ValueError(f"group {p} has indices outside [0, {numel}).")
            masks[p, idx_t.to(dev)] = 1.0
        names = ["{" + ",".join(str(i) for i in idx) + "}" for idx in groups]
        return Groups(masks=masks.view(len(groups), *shape), names=names)
    raise TypeError(
        f"groups must be None, an int, a tensor of ids or masks, a list of index lists or Groups; got {type(groups)}."
    )


def _from_ids(
    ids: Tensor,
    names: list[str] | None = None,
    grid: tuple[int, ...] | None = None,
    mask_shape: tuple[int, ...] | None = None,
) -> Groups:
    uniq = torch.unique(ids[ids >= 0])
    if uniq.numel() == 0:
        raise ValueError("The group-id map has no non-negative id: no group to score.")
    # relabel to 0..P-1 keeping the order of the ids
    remap = torch.full((int(uniq.max()) + 1,), -1, dtype=torch.long, device=ids.device)
    remap[uniq] = torch.arange(uniq.numel(), device=ids.device)
    dense = torch.where(ids >= 0, remap[ids.clamp_min(0)], ids.new_full((), -1))
    masks = (dense.unsqueeze(0) == torch.arange(uniq.numel(), device=ids.device).view(-1, *([1] * ids.ndim))).float()
    if mask_shape is not None:
        masks = masks[(slice(None), *[slice(0, s) for s in mask_shape])]
        dense = dense[tuple(slice(0, s) for s in mask_shape)]
    return Groups(masks=masks, ids=dense, grid=grid, names=names)


def pair_index(p: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Upper-triangle pairs (i < j) of P groups, in row-major order."""
    iu = torch.triu_indices(p, p, offset=1, device=device)
    return iu[0], iu[1]


def top_pairs(scores: Tensor, k: int = 5, absolute: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The k strongest off-diagonal pairs of (B, P, P) (or (P, P)) matrices.

    Returns ``(i, j, value)`` each (B, k) (or (k,)), ranked by |value| if ``absolute``.
    """
    squeeze = scores.ndim == 2
    s = scores.unsqueeze(0) if squeeze else scores
    p = s.shape[-1]
    i, j = pair_index(p, s.device)
    vals = s[:, i, j]
    key = vals.abs() if absolute else vals
    k = min(k, vals.shape[1])
    order = key.topk(k, dim=1).indices
    out = (i[order], j[order], vals.gather(1, order))
    return tuple(t[0] for t in out) if squeeze else out  # type: ignore[return-value]


def pair_auc(scores: Tensor, truth: Tensor) -> float:
    """ROC AUC of ranking the off-diagonal pairs of a (P, P) score matrix against a (P, P) boolean
    ground truth (ties count half; the Mann-Whitney statistic)."""
    p = scores.shape[-1]
    i, j = pair_index(p)
    s = scores.detach().double().cpu()[i, j]
    t = truth.bool().cpu()[i, j]
    pos, neg = s[t], s[~t]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    diff = pos.view(-1, 1) - neg.view(1, -1)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


class InteractionMethod(RowsPerCall, ABC):
    """Base class of pairwise interaction methods.

    Args:
        batch_size: rows per model call (memory bound): ``"auto"`` (default) times a few candidate
            sizes with the model's own passes on first use and keeps the fastest
            (``_internal.batching.choose_rows``; shown in ``repr`` and ``rows_choice``); an int fixes
            them; ``None``: everything at once.
        seed: seed of the per-call generator (random methods only).
        channels_first: how 3-D inputs are read by the default groups: True (B, C, L) signals, one
            group per step of L shared over channels; False (B, T, D) sequences, one per step of T;
            None (default) decided from the model's first layer
            (:func:`~explain_callbacks._internal.layout.reads_channels_first`).

    Subclasses implement :meth:`interactions`. ``last_info`` holds side results of the last call
    (always ``groups``; methods add e.g. ``main_effects``).
    """

    name: ClassVar[str] = "interaction"
    #: whether scores can be differentiated w.r.t. the parameters
    differentiable: ClassVar[bool] = False
    #: whether the method takes input gradients (callers must not disable grad mode)
    needs_grad: ClassVar[bool] = False
    #: the kind of pass the method's model calls make (``_internal.batching.PASS_KINDS``), what
    #: ``batch_size="auto"`` is measured with
    passes: ClassVar[str] = "forward"

    def __init__(self, batch_size: BatchSize = "auto", seed: int = 0, channels_first: bool | None = None) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.channels_first = check_channels_first(channels_first)
        self.last_info: dict[str, Any] = {}

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        target: Tensor | int | None = None,
        *,
        groups: GroupSpec = None,
    ) -> Tensor:
        # as the attribution methods: grad on whatever the caller's context (inference tensors copied), and
        # errors of the model's forward re-raised with the input shape given
        with model_errors(model, inputs), grad_enabled():
            inputs, target = normal_tensor(inputs), normal_tensor(target)
            check_inputs(inputs)
            tgt = as_target_tensor(target, inputs.shape[0], inputs.device)
            facts = self._resolve_call(model, inputs, tgt is not None, self.passes)  # one remembered lookup per call
            check_model_target(model, tgt, inputs, facts)
            grp = make_groups(inputs, groups, channels_first=reads_channels_first(model, inputs, self.channels_first))
            self.last_info = {"groups": grp}
            return self.interactions(model, inputs, tgt, grp)

    @abstractmethod
    def interactions(self, model: nn.Module, inputs: Tensor, target: Tensor | None, groups: Groups) -> Tensor:
        """The (B, P, P) matrix for validated inputs; ``target`` is (B,) long or None."""

    def generator(self, device: torch.device) -> torch.Generator:
        try:
            g = torch.Generator(device=device)
        except RuntimeError:
            g = torch.Generator()
        g.manual_seed(int(self.seed))
        return g

    def __repr__(self) -> str:
        kept = {"batch_size": self._batch_size_repr()}
        kept.update(
            (k, v)
            for k, v in vars(self).items()
            if not k.startswith("_") and k != "last_info" and not isinstance(v, Tensor)
        )
        args = ", ".join(f"{k}={v!r}" for k, v in kept.items())
        return f"{type(self).__name__}({args})"


def build_interaction(spec: Any, **overrides: Any) -> InteractionMethod:
    """An interaction method from a short name, a ``{"name": ..., **kwargs}`` mapping, or an instance."""
    obj = INTERACTIONS.build(spec, **overrides)
    if not callable(obj):
        raise TypeError(f"{spec!r} did not give a callable interaction method.")
    return obj
