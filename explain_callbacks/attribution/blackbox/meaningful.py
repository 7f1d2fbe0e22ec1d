"""Meaningful perturbation (Fong & Vedaldi 2017, arXiv:1704.03296) and its extremal variant
(Fong, Patrick & Vedaldi 2019, "Understanding Deep Networks via Extremal Perturbations and Smooth
Masks", arXiv:1910.08485)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..._internal.batching import chunks
from ..._internal.masks import make_substrate, score_outputs
from ..._internal.registry import ATTRIBUTIONS
from ._common import AdamState, PerturbationAttributor, mask_resolution, total_variation, upsample_mask

__all__ = ["MeaningfulPerturbation", "extremal_perturbation"]

VARIANTS = ("deletion", "extremal")


def _shift(x: Tensor, dy: int, dx: int, j: int) -> Tensor:
    """Translate (B, C, *spatial) by (dy, dx) pixels with replicate padding (jitter); j = max shift."""
    if j == 0 or x.ndim == 2 or (dy == 0 and dx == 0):
        return x
    if x.ndim == 3:
        xp = torch.nn.functional.pad(x, (j, j), mode="replicate")
        return xp[..., j - dx : j - dx + x.shape[-1]]
    xp = torch.nn.functional.pad(x, (j, j, j, j), mode="replicate")
    return xp[..., j - dy : j - dy + x.shape[-2], j - dx : j - dx + x.shape[-1]]


@ATTRIBUTIONS.register("meaningful_perturbation", "meaningful")
class MeaningfulPerturbation(PerturbationAttributor):
    """Learn the smallest, smoothest region whose blurring destroys the class score.

    Deletion game (Fong & Vedaldi 2017): a mask m ∈ [0,1] at low resolution (1/``mask_scale`` of the
    input, at least ``min_mask_size`` cells per side; the paper: 28 for 224 px), upsampled bilinearly,
    perturbs ``Φ(x; m) = m ⊙ x + (1 − m) ⊙ blur(x)``; minimise

        λ1·‖1 − m‖₁ + λ2·TV_β(m) + f_c(Φ(x; m))

    with f the softmax probability, by Adam (lr 0.1, 300 steps) from m = 1, m clipped to [0, 1] after
    every step, the perturbed image jittered by up to ``jitter`` px each step. As in the paper, m lives
    on the pixel lattice: both norms are sums over the pixels of the upsampled mask (the low-resolution
    grid is only its parametrisation), TV_β = Σ |Δm|^β along each axis. The map is ``A = 1 − m``
    (the deleted region).

    Extremal variant (Fong et al. 2019), ``variant="extremal"``: preservation game, maximise
    ``f_c(Φ(x; m))`` subject to the mask keeping an ``area`` fraction, enforced by the penalty
    ``λ_t · ‖sort(m) − r_a‖² / n`` over the n cells of the low-resolution mask (r_a: a sorted vector
    with a·n ones; sorting 49 cells rather than every pixel keeps the step cheap) whose weight grows
    geometrically from 1 to ``area_weight`` over the steps, in place of λ1 (m starts at 0.5; TV as
    above). The map is ``A = m`` (the preserved region). Their smooth-max mask parametrisation is
    replaced by bilinear upsampling.

    Images give (B,1,H,W) maps; sequences (B,C,T) work with a 1-D mask and blur; tabular inputs (B,D)
    get one mask value per feature, with ``substrate="mean"`` or a tensor (no blur, no TV).

    Cost: ``n_steps`` forward and backward passes per sample (300), samples optimised in chunks of
    ``batch_size`` (each sample's optimisation is independent).
    """

    name = "meaningful_perturbation"

    def __init__(
        self,
        variant: str = "deletion",
        n_steps: int = 300,
        lr: float = 0.1,
        l1: float = 1e-4,
        tv: float = 1e-2,
        tv_beta: float = 3.0,
        mask_scale: int = 8,
        min_mask_size: int = 7,
        substrate: str | float | Tensor = "blur",
        blur_sigma: float = 5.0,
        jitter: int = 2,
        area: float = 0.1,
        area_weight: float = 300.0,
        output: str | None = None,
        batch_size: int | None = 256,
        seed: int = 0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        out = output or ("softmax" if variant == "deletion" else "logit")
        super().__init__(output=out, budget=None, batch_size=batch_size, seed=seed)
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}.")
        if not 0 < area < 1:
            raise ValueError(f"area must lie in (0, 1), got {area}.")
        self.variant = variant
        self.n_steps = n_steps
        self.lr = lr
        self.l1 = l1
        self.tv = tv
        self.tv_beta = tv_beta
        self.mask_scale = mask_scale
        self.min_mask_size = min_mask_size
        self.substrate = substrate
        self.blur_sigma = blur_sigma
        self.jitter = jitter
        self.area = area
        self.area_weight = area_weight
        if variant == "extremal":
            self.name = "extremal_perturbation"

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        return self.n_steps

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        x = inputs.detach()
        size = tuple(x.shape[2:]) if x.ndim > 2 else (x.shape[1],)
        low = mask_resolution(size, self.mask_scale, self.min_mask_size) if x.ndim > 2 else size
        sub = make_substrate(x, self.substrate, sigma=self.blur_sigma)
        gen = self.generator(x.device)
        j = self.jitter if x.ndim > 2 else 0
        shifts = torch.randint(-j, j + 1, (self.n_steps, 2), generator=gen, device=gen.device).tolist()
        out = []
        for sl in chunks(x.shape[0], self.batch_size):
            out.append(self._optimise(model, x[sl], sub[sl], None if target is None else target[sl], low, size, shifts))
        self._record_forwards(inputs, self.n_steps)
        return torch.cat(out)

    def _optimise(
        self,
        model: nn.Module,
        x: Tensor,
        sub: Tensor,
        target: Tensor | None,
        low: tuple[int, ...],
        size: tuple[int, ...],
        shifts: list[list[int]],
    ) -> Tensor:
        b = x.shape[0]
        shape = (b, *low) if x.ndim == 2 else (b, 1, *low)
        init = 1.0 if self.variant == "deletion" else 0.5
        m = torch.full(shape, init, device=x.device, dtype=x.dtype, requires_grad=True)
        opt = AdamState(m, self.lr)
        if self.variant == "extremal":
            n_cells = math.prod(low)
            k = round(self.area * n_cells)
            ref = torch.cat([x.new_zeros(n_cells - k), x.new_ones(k)])
            growth = self.area_weight ** (1.0 / max(self.n_steps - 1, 1))
        with torch.enable_grad():
            for t in range(self.n_steps):
                up = upsample_mask(m, size)
                pert = torch.lerp(sub, x, up)  # m ⊙ x + (1 − m) ⊙ blur(x)
                dy, dx = shifts[t]
                pert = _shift(pert, dy, dx, self.jitter)
                f = score_outputs(model(pert), target, self.output)
                smooth = self.tv * total_variation(up, self.tv_beta) if up.ndim > 2 else 0.0
                if self.variant == "deletion":
                    loss = self.l1 * (1 - up).flatten(1).sum(1) + smooth + f  # up in [0, 1]: |1 − up| = 1 − up
                else:
                    srt = m.flatten(1).sort(1).values
                    lam = growth**t
                    loss = lam * (srt - ref).pow(2).mean(1) + smooth - f
                (grad,) = torch.autograd.grad(loss.sum(), m)
                opt.step(grad)
                with torch.no_grad():
                    m.clamp_(0.0, 1.0)
        up = upsample_mask(m.detach(), size)
        return 1 - up if self.variant == "deletion" else up


@ATTRIBUTIONS.register("extremal_perturbation", "extremal")
def extremal_perturbation(**kwargs) -> MeaningfulPerturbation:
    """The extremal variant (Fong et al. 2019) of :class:`MeaningfulPerturbation`."""
    return MeaningfulPerturbation(variant="extremal", **kwargs)
