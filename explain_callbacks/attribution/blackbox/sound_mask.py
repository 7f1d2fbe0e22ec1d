"""Sound masks (Gupta, Saunshi, Yu, Lyu & Arora 2022, "New Definitions and Evaluations for Saliency
Methods: Staying Intrinsic, Complete and Sound", NeurIPS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks
from ..._internal.checks import require_graph
from ..._internal.layout import check_channels_first
from ..._internal.outputs import read_scores
from ..._internal.registry import ATTRIBUTIONS
from ._common import AdamState, PerturbationAttributor, mask_resolution, total_variation, upsample_mask

__all__ = ["SoundMask"]


@ATTRIBUTIONS.register("sound_mask", "soundmask")
class SoundMask(PerturbationAttributor):
    """A mask that keeps just enough of x for the model to still say label ℓ when the rest is replaced
    by other images of the data set.

    ``m = sigmoid(w)`` at 1/``mask_scale`` resolution (1/4), upsampled bilinearly; the removed pixels
    are filled with other images x̃ (a fresh random draw each step, ``n_fills`` of them, the loss
    averaged over the fills); minimise with Adam (lr 0.05)

        CE(f(m ⊙ x + (1 − m) ⊙ x̃), ℓ) + λ_a·area(m) + λ_tv·TV₂(m)

    with TV₂ the sum of squared neighbour differences of the low-resolution mask. The paper's area
    term 2e-5·Σm is a sum over 224×224 pixels; it is written here as ``area · mean(m)`` with
    ``area = 2e-5 · 224² ≈ 1.0`` so that it carries over to other image sizes. The map is ``A = m``
    (the kept evidence), (B,1,H,W) for images, (B,1,T) for (B,C,T) signals,
    (B,T,1) for (B,T,D) sequences, (B,D) for tabular inputs.

    A cross-entropy against ℓ: it takes class indices of a classifier, not target operators (regions, boxes).

    Soundness (methods.md section 4) needs masks for several labels, wrong ones included:
    :meth:`attribute_labels` learns one mask per label column.

    Args:
        reference: the fill images, a tensor (N, *input_shape) of data samples. ``None`` draws the fills
            from the other samples of the batch being explained (needs B ≥ 2).
        n_steps: optimisation steps (100). n_fills: fills per step (10, as the paper's ~10).
        channels_first: how 3-D inputs are read: True (B, C, L) signals, masks along L; False (B, T, D)
            sequences, masks over the T steps and a (B, T, 1) map; None (default) decided from the
            model's first layer (``_internal.layout.reads_channels_first``).

    Cost: ``n_steps · n_fills`` forward and backward passes per sample (1000 by default); samples are
    optimised in chunks of ``batch_size // n_fills``.
    """

    passes = "grad"  # its model calls take input gradients (batch_size="auto" is measured so)

    name = "sound_mask"
    takes_target_operators = False
    step_masks = True

    def __init__(
        self,
        reference: Tensor | None = None,
        n_steps: int = 100,
        n_fills: int = 10,
        lr: float = 0.05,
        area: float = 2e-5 * 224 * 224,
        tv: float = 0.01,
        mask_scale: int = 4,
        min_mask_size: int = 4,
        channels_first: bool | None = None,
        batch_size: BatchSize = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(output="logit", budget=None, batch_size=batch_size, seed=seed)
        self.channels_first = check_channels_first(channels_first)
        if n_steps < 1 or n_fills < 1:
            raise ValueError(f"n_steps and n_fills must be >= 1, got {n_steps}, {n_fills}.")
        self.reference = reference
        self.n_steps = n_steps
        self.n_fills = n_fills
        self.lr = lr
        self.area = area
        self.tv = tv
        self.mask_scale = mask_scale
        self.min_mask_size = min_mask_size

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        return self.n_steps * self.n_fills

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        if target is None:
            raise ValueError("SoundMask needs class targets (B,): its loss is the cross-entropy of label ℓ.")
        x = inputs.detach()
        b = x.shape[0]
        if self.reference is None:
            if b < 2:
                raise ValueError(
                    "SoundMask fills the removed pixels with other images: with no reference set it draws "
                    "them from the batch, which needs at least 2 samples; pass reference=<data samples>."
                )
            ref, exclude_self = x, True
        else:
            ref = self.reference.to(device=x.device, dtype=x.dtype)
            if ref.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"reference samples have shape {tuple(ref.shape[1:])} but inputs {tuple(x.shape[1:])}."
                )
            exclude_self = False
        gen = self.generator(x.device)
        n_ref = ref.shape[0]
        if exclude_self:  # draw among the B-1 others: index k >= i is shifted by one
            idx = torch.randint(0, n_ref - 1, (self.n_steps, self.n_fills, b), generator=gen, device=gen.device)
            idx = idx.to(x.device)
            idx = idx + (idx >= torch.arange(b, device=x.device)).long()
        else:
            idx = torch.randint(0, n_ref, (self.n_steps, self.n_fills, b), generator=gen, device=gen.device)
            idx = idx.to(x.device)
        size = tuple(x.shape[2:]) if x.ndim > 2 else (x.shape[1],)
        low = mask_resolution(size, self.mask_scale, self.min_mask_size) if x.ndim > 2 else size
        per = max(1, (self.batch_size or b * self.n_fills) // self.n_fills)
        out = [self._optimise(model, x, ref, idx, target, sl, low, size) for sl in chunks(b, per)]
        self._record_forwards(inputs, self.n_forwards(tuple(x.shape[1:])))
        return torch.cat(out)

    def _optimise(
        self,
        model: nn.Module,
        x: Tensor,
        ref: Tensor,
        idx: Tensor,
        target: Tensor,
        sl: slice,
        low: tuple[int, ...],
        size: tuple[int, ...],
    ) -> Tensor:
        xb, tb = x[sl], target[sl]
        nb = xb.shape[0]
        shape = (nb, *low) if x.ndim == 2 else (nb, 1, *low)
        w = torch.zeros(shape, device=x.device, dtype=x.dtype, requires_grad=True)
        opt = AdamState(w, self.lr)
        k = self.n_fills
        with torch.enable_grad():
            for t in range(self.n_steps):
                m = torch.sigmoid(w)
                up = upsample_mask(m, size)
                fills = ref[idx[t, :, sl]]  # (k, nb, ...)
                rows = (fills + (xb.unsqueeze(0) - fills) * up.unsqueeze(0)).reshape(k * nb, *x.shape[1:])
                ce = F.cross_entropy(read_scores(model(rows)), tb.repeat(k), reduction="none").view(k, nb).mean(0)
                require_graph(ce)  # else the mask would follow its regularisers only, silently
                smooth = self.tv * total_variation(m, 2.0) if m.ndim > 2 else 0.0
                loss = ce + self.area * up.flatten(1).mean(1) + smooth
                (g,) = torch.autograd.grad(loss.sum(), w)
                opt.step(g)
        return upsample_mask(torch.sigmoid(w.detach()), size)

    def _steps_last_view(self, inputs: Tensor) -> SoundMask:
        view = super()._steps_last_view(inputs)
        if isinstance(self.reference, Tensor) and self.reference.ndim == 3:  # (N, T, D) samples, read as the inputs
            view.reference = self.reference.transpose(1, 2)
        return view

    def attribute_labels(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
        """Masks for several labels per sample: ``labels`` (B, L) gives (B, L, *map_shape[1:])."""
        if labels.ndim != 2 or labels.shape[0] != inputs.shape[0]:
            raise ValueError(f"labels must have shape (B, L) with B={inputs.shape[0]}, got {tuple(labels.shape)}.")
        maps = [self(model, inputs, labels[:, j]) for j in range(labels.shape[1])]
        return torch.stack(maps, 1)
