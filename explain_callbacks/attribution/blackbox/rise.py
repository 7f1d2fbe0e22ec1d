"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko 2018, arXiv:1806.07421)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks
from ..._internal.layout import check_channels_first
from ..._internal.masks import (
    RENDER_ELEMENTS,
    fit_budget,
    make_substrate,
    mask_layout,
    masked_scores,
    random_offsets,
    render_masks,
    sample_designs,
)
from ..._internal.registry import ATTRIBUTIONS
from ._common import PerturbationAttributor

__all__ = ["RISE"]


@ATTRIBUTIONS.register("rise")
class RISE(PerturbationAttributor):
    """``A(λ) = 1/(N·p) Σ_i f_c(x ⊙ M_i) · M_i(λ)`` over N random masks.

    Each mask is a binary s×s grid with keep-probability p, upsampled bilinearly to (s+1)·cell
    (cell = ceil(H/s)) with mirrored borders, shifted by a random offset of up to one cell and cropped
    to the input: the authors' ``generate_masks`` (github.com/eclique/RISE, ``explanations.py``:
    ``skimage.transform.resize(grid, up_size, order=1, mode="reflect")``), which
    ``tests/test_rise_reference.py`` checks mask by mask with the same random draws. ``f`` is the
    softmax probability of the target by default.

    Args:
        n_masks: N (the paper: 4000 for ImageNet; the authors' notebooks 2000-6000).
        grid_size: s (7).
        p: keep probability (0.5).
        sampler: ``bernoulli`` (the paper), ``sobol`` or ``lhs`` for the binary grids.
        upsample: ``bilinear`` (the paper; mirrored borders as the authors' code), ``nearest`` or
            ``bicubic`` (edge-clamped borders, clipped to [0, 1]).
        shift: the random shifts (True in the paper).
        substrate: the fill where M = 0: ``zeros`` (the paper's x ⊙ M), ``mean``, ``blur``, float, tensor.
        output: ``auto`` (default: ``softmax`` as in the paper for classifiers, the raw output for
            single-output models) or ``softmax``, ``logit``, ``log_softmax``, ``sigmoid``.
        center: subtract the mean score over the masks, ``1/(N·p) Σ_i (f_i − f̄) M_i`` (a covariance
            map whose level outside the evidence is ~0 instead of ~E f). Default False: the paper's map.
        budget: a forward-pass budget per sample; N is lowered to fit.
        channels_first: how 3-D inputs are read: True (B, C, L) signals, masks along L; False (B, T, D)
            sequences, masks over the T steps and a (B, T, 1) map; None (default) decided from the
            model's first layer (``_internal.layout.reads_channels_first``).

    Images give a (B,1,H,W) map (masks are spatial and broadcast over channels); signals (B,C,T)
    give (B,1,T) with a 1-D grid, (B,T,D) sequences (B,T,1) (``channels_first``); tabular (B,D) masks
    each feature independently (no upsampling) and gives (B,D).

    Cost: N forward passes per sample (default 4000 as in methods.md; pass ``n_masks=1000`` or a
    ``budget`` for a per-epoch monitor: on a 32×32 digits CNN 1000 masks already give stable maps).
    """

    name = "rise"
    step_masks = True

    def __init__(
        self,
        n_masks: int = 4000,
        grid_size: int = 7,
        p: float = 0.5,
        sampler: str = "bernoulli",
        upsample: str = "bilinear",
        shift: bool = True,
        substrate: str | float | Tensor = "zeros",
        blur_sigma: float = 5.0,
        output: str = "auto",
        center: bool = False,
        budget: int | None = None,
        channels_first: bool | None = None,
        batch_size: BatchSize = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(output=output, budget=budget, batch_size=batch_size, seed=seed)
        self.channels_first = check_channels_first(channels_first)
        if n_masks < 1:
            raise ValueError(f"n_masks must be >= 1, got {n_masks}.")
        if not 0 < p <= 1:
            raise ValueError(f"p must lie in (0, 1], got {p}.")
        self.n_masks = n_masks
        self.grid_size = grid_size
        self.p = p
        self.sampler = sampler
        self.upsample = upsample
        self.shift = shift
        self.substrate = substrate
        self.blur_sigma = blur_sigma
        self.center = center

    @classmethod
    def monitor_settings(cls, forwards_per_sample: int) -> dict[str, int]:
        """The mask count a monitor uses when none is given: ``forwards_per_sample`` masks, at least 64."""
        return {"n_masks": max(64, int(forwards_per_sample))}

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        return fit_budget(self.n_masks, budget=self.budget, what="masks", method="RISE")

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        layout = mask_layout(inputs, self.grid_size, "RISE")
        n = self.n_forwards(tuple(inputs.shape[1:]))
        gen = self.generator(inputs.device)
        designs = sample_designs(n, layout.d, self.sampler, gen, p=self.p, binary=True, device=inputs.device)
        shifted = self.shift and layout.kind != "tabular"
        offsets = random_offsets(n, layout, gen) if shifted else None

        def render(msl: slice) -> Tensor:
            return render_masks(designs[msl], layout, self.upsample, None if offsets is None else offsets[msl])

        b = inputs.shape[0]
        # Σ_i f_i M_i in float64: a sum of thousands of masks, which the centred map then differences
        total = torch.zeros((b, math.prod(layout.mask_shape)), device=inputs.device, dtype=torch.float64)

        def accumulate(ssl: slice, msl: slice, masks: Tensor, sc: Tensor) -> None:
            total[ssl] += sc.double() @ masks.reshape(masks.shape[0], -1).double()

        sub = make_substrate(inputs, self.substrate, sigma=self.blur_sigma)
        scores = masked_scores(
            model, inputs, target, n, render, sub, batch_size=self.batch_size, output=self.output, accumulate=accumulate
        )
        self._record_forwards(inputs, n)
        if self.center:  # Σ (f_i − f̄) M_i = Σ f_i M_i − f̄ Σ M_i; Σ M_i summed over blocks of rendered masks
            msum = torch.zeros_like(total[0])
            for sl in chunks(n, max(1, RENDER_ELEMENTS // max(1, msum.numel()))):
                msum += render(sl).reshape(sl.stop - sl.start, -1).double().sum(0)
            total -= scores.double().mean(1, keepdim=True) * msum
        return (total / (n * self.p)).to(inputs.dtype).reshape(layout.map_shape(b))
