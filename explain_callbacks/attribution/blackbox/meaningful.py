"""Meaningful perturbation (Fong & Vedaldi 2017, arXiv:1704.03296) and its extremal variant
(Fong, Patrick & Vedaldi 2019, "Understanding Deep Networks via Extremal Perturbations and Smooth
Masks", arXiv:1910.08485)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks
from ..._internal.layout import check_channels_first
from ..._internal.masks import make_substrate, score_seeder
from ..._internal.registry import ATTRIBUTIONS
from ._common import (
    AdamState,
    PerturbationAttributor,
    _interp_matrix,
    mask_resolution,
    score_grad,
    target_onehot,
)

__all__ = ["MeaningfulPerturbation", "extremal_perturbation"]

VARIANTS = ("deletion", "extremal")


def _shift(x: Tensor, dy: int, dx: int, j: int) -> Tensor:
    """Translate (B, C, *spatial) by (dy, dx) pixels with replicate padding (jitter); j = max shift.

    The jitter as written in the objective; the optimisation applies it through shifted interpolation
    matrices and views of padded tensors (:class:`_MaskProblem`), and the tests compare the two."""
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

    Images give (B,1,H,W) maps; signals (B,C,T) work with a 1-D mask and blur
    along T (B,1,T), and so do (B,T,D) sequences ((B,T,1); ``channels_first=None`` reads the layout from
    the model's first layer, True/False fix it); tabular inputs (B,D) get one mask value per feature
    (no TV, no jitter).

    Substrate (``substrate="auto"``, the default): the blur of the paper where the input has positions
    (images, signals, sequences), zeros for tabular inputs. Fong & Vedaldi (§3.2) name three ways to
    delete evidence, a constant, noise and blur; blur assumes neighbouring positions, which the
    features of a table do not have, so tabular inputs get the paper's constant perturbation with the
    constant 0: the mean of standardised features, the same for every sample whatever else is in the
    batch (a batch mean would make a sample's map depend on its batch-mates and delete nothing for a
    batch of one). Pass ``substrate=<tensor>`` (e.g. the training-set mean) for unstandardised data,
    or ``"zeros"``, ``"mean"``, ``"blur"``, a float.

    Cost: ``n_steps`` forward and backward passes per sample (300), samples optimised in chunks of
    ``batch_size`` (each sample's optimisation is independent). Only the model's backward pass goes
    through autograd: the gradient of the mask terms is written out (:class:`_MaskProblem`), and Adam
    is one fused kernel call per step.
    """

    passes = "grad"  # its model calls take input gradients (batch_size="auto" is measured so)

    name = "meaningful_perturbation"
    step_masks = True

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
        substrate: str | float | Tensor = "auto",
        blur_sigma: float = 5.0,
        jitter: int = 2,
        area: float = 0.1,
        area_weight: float = 300.0,
        output: str | None = None,
        channels_first: bool | None = None,
        batch_size: BatchSize = "auto",
        seed: int = 0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        out = output or ("auto" if variant == "deletion" else "logit")
        super().__init__(output=out, budget=None, batch_size=batch_size, seed=seed)
        self.channels_first = check_channels_first(channels_first)
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
        spec = self.substrate
        if isinstance(spec, str) and spec == "auto":  # blur needs positions; a table's features have none
            spec = "blur" if x.ndim > 2 else "zeros"
        sub = make_substrate(x, spec, sigma=self.blur_sigma)
        j = self.jitter if x.ndim > 2 else 0
        if j:
            gen = self.generator(x.device)
            shifts = torch.randint(-j, j + 1, (self.n_steps, 2), generator=gen, device=gen.device).tolist()
        else:  # no jitter (tabular inputs, or jitter=0): no draw
            shifts = [[0, 0]] * self.n_steps
        out = [
            self._optimise(model, x[sl], sub[sl], None if target is None else target[sl], low, size, shifts)
            for sl in chunks(x.shape[0], self.batch_size)
        ]
        self._record_forwards(inputs, self.n_steps)
        return out[0] if len(out) == 1 else torch.cat(out)

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
        prob = _MaskProblem(self, x, sub, low, size)
        b = x.shape[0]
        shape = (b, *low) if x.ndim == 2 else (b, 1, *low)
        init = 1.0 if self.variant == "deletion" else 0.5
        m = torch.full(shape, init, device=x.device, dtype=x.dtype)
        opt = AdamState(m, self.lr)
        for t in range(self.n_steps):
            opt.step(prob.grad(model, m, target, t, shifts[t]))
            m.clamp_(0.0, 1.0)
        up = prob.upsample(m)
        return 1 - up if self.variant == "deletion" else up


class _MaskProblem:
    """One chunk's objective of :class:`MeaningfulPerturbation` with its gradient in closed form.

    Everything but the model is linear in the low-resolution mask m or elementwise, so the gradient
    is written out instead of recorded by autograd (whose bookkeeping cost about a fifth of a small
    CNN's forward+backward step): with ``R_a`` the (side × cells) bilinear interpolation matrix of
    spatial axis a, the upsampled mask is ``U = R_0 · m · R_1ᵀ``; a jitter by (dy, dx) pixels with
    replicate padding selects clamped rows of ``R_a`` (``S_a = P_a R_a``), so the jittered image is
    ``Φ = P s + P(x − s) ⊙ (S_0 m S_1ᵀ)`` with ``P s``, ``P(x − s)`` views of padded copies made once.
    Then, with g = ∂f_c/∂Φ from the model's own backward pass:

    - ∂f_c/∂m = S_0ᵀ (Σ_channels g ⊙ P(x − s)) S_1;
    - ∂TV_β/∂m = R_0ᵀ G R_1, G the adjoint of the finite differences applied to β·|ΔU|^(β−1)·sign(ΔU);
    - ∂(λ1 Σ(1 − U))/∂m = −λ1 R_0ᵀ 1 1ᵀ R_1 (a constant, folded into G's initial value);
    - extremal area term λ_t‖sort(m) − r_a‖²/n: 2λ_t (sort(m) − r_a)/n scattered back to the sorted
      cells.

    ``tests/test_blackbox_learned.py`` checks this gradient against autograd of the objective as written.
    """

    def __init__(
        self, mp: MeaningfulPerturbation, x: Tensor, sub: Tensor, low: tuple[int, ...], size: tuple[int, ...]
    ) -> None:
        self.mp = mp
        self.onehot: Tensor | None = None  # the targets' one-hot rows for the seeded score gradient
        self.seed: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None  # (y, ∂y/∂out) of an output
        self.k = k = x.ndim - 2 if x.ndim > 2 else 0  # spatial axes
        self.j = j = mp.jitter if k else 0
        self.size = size
        dev, dt = x.device, x.dtype
        self.sign = 1.0 if mp.variant == "deletion" else -1.0  # deletion minimises f_c, extremal maximises it
        # The interpolation matrices (made once per shape, jitter, sign, device and dtype, and cached).
        mats = _mask_matrices(k, tuple(low), tuple(size), j, self.sign, dev, dt) if k else ([], [], [], [], None, None)
        self.R, self.Rt, self.S, self.St, self.back, dr = mats
        diff = x - sub
        if j:
            pad = (j, j) * k
            sub = F.pad(sub, pad, mode="replicate")
            diff = F.pad(diff, pad, mode="replicate")
        self.sub, self.diff = sub, diff
        self._windows: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        # Gradient of λ1·Σ(1 − U) with respect to U: the constant −λ1 (deletion only).
        self.l1 = -mp.l1 if mp.variant == "deletion" else 0.0
        if k == 0:  # tabular: ∂/∂m = sign · g ⊙ (x − s) − λ1, one addcmul from this constant
            self.l1_const = torch.tensor(self.l1, device=dev, dtype=dt)
        if k == 1:
            # Sequences: U = m R_0ᵀ, so the finite differences are ΔU = m (D R_0)ᵀ, one product with the
            # precomputed (cells × (T − 1)) matrix DR_0ᵀ, and ∂TV_β/∂m = (β|ΔU|^(β−1) sign ΔU) · DR_0; the L1
            # term's gradient is the constant row −λ1 · 1ᵀ R_0.
            # (T − 1, cells) with the TV slope's constant factor β·λ2 folded in, and (cells, T − 1)
            self.dr, self.drt = dr[0] * (mp.tv_beta * mp.tv), dr[1]
            self.l1_row = (self.l1 * self.R[0].sum(0)).unsqueeze(0)  # (1, cells)
        if mp.variant == "extremal":
            n_cells = math.prod(low)
            kk = round(mp.area * n_cells)
            self.ref = torch.cat([x.new_zeros(n_cells - kk), x.new_ones(kk)])
            self.growth = mp.area_weight ** (1.0 / max(mp.n_steps - 1, 1))
            self.n_cells = n_cells

    def upsample(self, m: Tensor) -> Tensor:
        """U = R_0 m R_1ᵀ (images), m R_0ᵀ (sequences), m (tabular)."""
        if self.k == 2:
            return self.R[0] @ m @ self.Rt[1]
        if self.k == 1:
            return m @ self.Rt[0]
        return m

    def _window(self, t: Tensor, dy: int, dx: int) -> Tensor:
        """The jittered view P t of a padded tensor."""
        j = self.j
        if not j:
            return t
        if self.k == 1:
            return t[..., j - dx : j - dx + self.size[0]]
        return t[..., j - dy : j - dy + self.size[0], j - dx : j - dx + self.size[1]]

    def _smooth_grad(self, up: Tensor) -> Tensor:
        """∂(λ2·TV_β(U) + λ1·Σ(1 − U))/∂U as a (B, 1, *size) tensor."""
        mp = self.mp
        G = torch.full_like(up, self.l1)
        beta = mp.tv_beta
        for a in range(self.k):
            dim = 2 + a
            n = up.shape[dim]
            if n < 2 or not mp.tv:
                continue
            d = up.diff(dim=dim)
            if beta == 2:
                q = d.mul(2.0 * mp.tv)
            elif beta == 3:
                q = d.abs().mul_(d).mul_(3.0 * mp.tv)
            else:
                q = d.abs().pow_(beta - 1).mul_(d.sign()).mul_(beta * mp.tv)
            G.narrow(dim, 0, n - 1).sub_(q)
            G.narrow(dim, 1, n - 1).add_(q)
        return G

    def grad(self, model: nn.Module, m: Tensor, target: Tensor | None, t: int, shift: list[int]) -> Tensor:
        """∂loss/∂m at step t (one forward and one input-gradient backward pass of the model)."""
        mp, k = self.mp, self.k
        dy, dx = shift if self.j else (0, 0)
        iy, ix = dy + self.j, dx + self.j
        win = self._windows.get((dy, dx))
        if win is None:  # the jittered views of the padded substrate and x − s, made once per shift
            win = self._windows[(dy, dx)] = (self._window(self.sub, dy, dx), self._window(self.diff, dy, dx))
        sub, diff = win
        if k == 2:
            ups = self.S[0][iy] @ m @ self.St[1][ix]
        elif k == 1:
            ups = m @ self.St[0][ix]
        else:
            ups = m
        pert = torch.addcmul(sub, diff, ups).requires_grad_(True)  # Φ = P s + P(x − s) ⊙ (S_0 m S_1ᵀ)
        seed = self.seed
        if seed is not None and torch.is_grad_enabled():  # a later step: the checks were made on the first
            raw = model(pert)
            (g,) = torch.autograd.grad(raw, pert, seed(raw.detach())[1])
        else:
            with torch.enable_grad():
                g, _, raw = score_grad(model, pert, target, mp.output, read=False, onehot=self.onehot)
            if self.onehot is None and t == 0:  # the same targets every step: their one-hot built once
                self.onehot = target_onehot(raw, target)
                # score_grad's closed-form seed as a function of the output alone (None: differentiated)
                self.seed = score_seeder(raw, target, mp.output, self.onehot)
        if k == 2:
            gd = torch.linalg.vecdot(g, diff, dim=1).unsqueeze(1)  # Σ_channels g ⊙ P(x − s)
            grad = self.back[iy] @ gd @ self.S[1][ix]
            up = ups if (dy, dx) == (0, 0) else self.upsample(m)
            grad.add_(self.Rt[0] @ self._smooth_grad(up) @ self.R[1])
        elif k == 1:
            b = m.shape[0]
            m2 = m.view(b, -1)
            grad = torch.addmm(self.l1_row, torch.linalg.vecdot(g, diff, dim=1), self.back[ix])
            if mp.tv and self.dr.shape[0]:
                d = m2 @ self.drt  # ΔU of the unjittered mask
                beta = mp.tv_beta  # |ΔU|^(β−1)·sign(ΔU), times β·λ2 D R_0
                slope = d if beta == 2 else d.abs().mul_(d) if beta == 3 else d.abs().pow_(beta - 1).mul_(d.sign())
                grad.addmm_(slope, self.dr)
            grad = grad.view(m.shape)
        else:  # tabular: sign · g ⊙ (x − s) − λ1 (the sign is ±1)
            grad = torch.addcmul(self.l1_const, g, diff, value=self.sign)
        if mp.variant == "extremal":
            flat = m.reshape(m.shape[0], -1)
            srt, idx = flat.sort(1)
            gs = srt.sub_(self.ref).mul_(2.0 * self.growth**t / self.n_cells)
            grad.view(m.shape[0], -1).scatter_add_(1, idx, gs)
        return grad


@functools.lru_cache(maxsize=64)
def _mask_matrices(
    k: int, low: tuple[int, ...], size: tuple[int, ...], j: int, sign: float, device: torch.device, dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor | None, tuple[Tensor, Tensor] | None]:
    """The matrices of :class:`_MaskProblem` for masks of ``low`` cells on inputs of ``size`` with ``k``
    spatial axes (2: images, 1: sequences; 0: tabular inputs, which have none): R_a (side × cells) per
    spatial axis and Rᵀ, the jittered S[a][s + j] = P_s R_a for shifts s in [−j, j] and their transposes,
    the back-projection of the f_c term with ``sign`` on its first factor, and for sequences the
    differenced (D R_0, (D R_0)ᵀ).
    Cached (read-only to their users), and always normal tensors (never inference-mode ones)."""
    with torch.inference_mode(False), torch.no_grad():
        R = [_interp_matrix(lo, n, device, dtype) for lo, n in zip(low, size)] if k else []
        Rt = [r.t().contiguous() for r in R]
        S: list[Tensor] = []
        St: list[Tensor] = []
        for a, r in enumerate(R):
            n = size[a]
            s = torch.stack([r[(torch.arange(n, device=device) - sh).clamp_(0, n - 1)] for sh in range(-j, j + 1)])
            S.append(s)
            St.append(s.transpose(1, 2).contiguous())
        back = St[0] * sign if k == 2 else S[0] * sign if k == 1 else None
        dr = None
        if k == 1:
            d = (R[0][1:] - R[0][:-1]).contiguous()
            dr = (d, d.t().contiguous())
    return R, Rt, S, St, back, dr


@ATTRIBUTIONS.register("extremal_perturbation", "extremal")
def extremal_perturbation(**kwargs) -> MeaningfulPerturbation:
    """The extremal variant (Fong et al. 2019) of :class:`MeaningfulPerturbation`."""
    return MeaningfulPerturbation(variant="extremal", **kwargs)
