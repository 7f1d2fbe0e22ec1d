"""Black-box pairwise interactions: variance-based (Sobol) and kernel-based (HSIC).

Both perturb the input with masks ``x ⊙ M`` (or a substrate for the masked-out part) and read the
model output only, so they work on any model (no gradients, not differentiable).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize
from .._internal.layout import StepsLast, reads_channels_first
from .._internal.masks import make_substrate, masked_scores, sobol_points
from .._internal.registry import INTERACTIONS
from ..attribution.blackbox.hsic import HSIC
from ..attribution.blackbox.sobol import Sobol
from .base import Groups, InteractionMethod, pair_index

__all__ = ["HSICInteraction", "SobolInteraction"]


@INTERACTIONS.register("sobol")
class SobolInteraction(InteractionMethod):
    """Second-order Sobol indices between feature groups, and each group's interaction share.

    Variables are the groups' mask values u ∈ [0, 1]^P (continuous masks as in Sobol attribution,
    Fel et al. 2021, arXiv:2111.04138; methods.md §2): the model is evaluated on
    ``s + (x − s) ⊙ M(u)`` with ``M(u) = Σ_p u_p 1_p`` (positions outside every group kept). Designs
    A, B (N×P) are the two halves of a scrambled Sobol sequence of dimension 2P; ``A_B⁽ⁱ⁾`` is A with
    column i from B and ``B_A⁽ⁱ⁾`` is B with column i from A (Saltelli 2002, "Making best use of model
    evaluations to compute sensitivity indices", Comput. Phys. Commun. 145): N·(2P + 2) forwards.

    - first-order S_i (Saltelli 2010) and total ST_i (Jansen 1999): :meth:`Sobol.estimate`;
    - closed second-order variance, Jansen form, from the rows that share exactly columns {i, j}:
      ``V^c_ij = V − (1/2N) Σ_n (f(B_A⁽ⁱ⁾)_n − f(A_B⁽ʲ⁾)_n)²``;
    - second-order index ``S_ij = (V^c_ij − V_i − V_j) / V`` (off-diagonal entries).

    The diagonal holds the interaction share ``ST_i − S_i`` (the part of group i's variance that
    lives in interactions, methods.md §2). ``last_info`` has ``first_order``, ``total`` (B, P).

    Args:
        n_designs: N (64; a power of two keeps the Sobol sequence balanced).
        substrate: ``zeros`` (x ⊙ M, default), ``mean``, ``blur``, float or tensor.
        output: ``logit`` (default), ``softmax``, ``log_softmax`` or ``sigmoid``.
    """

    name = "sobol"

    def __init__(
        self,
        n_designs: int = 64,
        substrate: str | float | Tensor = "zeros",
        output: str = "logit",
        batch_size: BatchSize = "auto",
        seed: int = 0,
        channels_first: bool | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, channels_first=channels_first)
        if n_designs < 2:
            raise ValueError(f"n_designs must be >= 2, got {n_designs}.")
        self.n_designs = n_designs
        self.substrate = substrate
        self.output = output

    @torch.no_grad()
    def interactions(self, model: nn.Module, inputs: Tensor, target: Tensor | None, groups: Groups) -> Tensor:
        x = inputs.detach()
        b = x.shape[0]
        m = groups.masks.to(x.device, x.dtype)  # (P, *ms)
        p = m.shape[0]
        n = self.n_designs
        ab = sobol_points(n, 2 * p, self.generator(x.device), device=x.device, dtype=x.dtype)
        a, bm = ab[:, :p], ab[:, p:]
        n_rows = n * (2 * p + 2)
        covered = m.sum(0).clamp(max=1.0)

        def design_rows(sl: slice) -> Tensor:
            # rows: A (N), B (N), A_B^(i) for i < P (N each), then B_A^(i) for i < P (N each)
            r = torch.arange(sl.start, sl.stop, device=x.device)
            blk, j = r // n, r % n
            rows = torch.where((blk == 1).unsqueeze(1) | (blk >= 2 + p).unsqueeze(1), bm[j], a[j])
            is_ab = (blk >= 2) & (blk < 2 + p)
            is_ba = blk >= 2 + p
            col = torch.where(is_ab, blk - 2, blk - 2 - p).clamp(0, p - 1)
            swap = is_ab | is_ba
            if bool(swap.any()):
                rs = swap.nonzero().flatten()
                src = torch.where(is_ab[rs], bm[j[rs], col[rs]], a[j[rs], col[rs]])
                rows[rs, col[rs]] = src
            return rows

        def render(sl: slice) -> Tensor:
            u = design_rows(sl)
            return torch.einsum("kp,p...->k...", u, m) + (1.0 - covered)

        sub = None
        if not (isinstance(self.substrate, str) and self.substrate == "zeros"):
            if (
                isinstance(self.substrate, str)
                and x.ndim == 3
                and not reads_channels_first(model, x, self.channels_first)
            ):
                # (B, T, D): blur and mean run along the T steps, as for the mask methods
                sub = make_substrate(x.transpose(1, 2), self.substrate).transpose(1, 2)
            else:
                sub = make_substrate(x, self.substrate)
        y = masked_scores(
            model, x, target, n_rows, render, sub, batch_size=self.batch_size, output=self.output
        ).double()
        fa, fb = y[:, :n], y[:, n : 2 * n]
        fab = y[:, 2 * n : (2 + p) * n].reshape(b, p, n)
        fba = y[:, (2 + p) * n :].reshape(b, p, n)
        est = Sobol.estimate(fa, fb, fab)
        var = fa.var(dim=-1, correction=1).clamp_min(1e-12)  # (B,)
        vi = est["first_order"] * var.unsqueeze(1)  # (B, P)
        i, j = pair_index(p, x.device)
        vc = var.unsqueeze(1) - (fba[:, i] - fab[:, j]).pow(2).mean(-1) / 2  # (B, pairs)
        s2 = (vc - vi[:, i] - vi[:, j]) / var.unsqueeze(1)
        out = torch.diag_embed(est["total"] - est["first_order"])
        out[:, i, j] = s2
        out[:, j, i] = s2
        self.last_info.update(first_order=est["first_order"], total=est["total"], forwards=n_rows)
        return out.to(x.dtype)


@INTERACTIONS.register("hsic")
class HSICInteraction(InteractionMethod):
    """Pairwise HSIC interactions ``HSIC_ij − HSIC_i − HSIC_j`` with the product kernel (Novello, Fel
    & Vigouroux 2022, arXiv:2206.06219), wrapping :meth:`HSIC.interactions` of the black-box package.

    Groups are HSIC's layout: one per feature (tabular inputs, ``groups=None``), a g×g grid of
    patches (images, ``groups=g``; default 4) or g windows along the steps of (B, C, L) signals or
    (B, T, D) sequences (``channels_first``; ``groups=None`` gives one per step). The
    diagonal holds the per-group HSIC_i. Other group shapes raise a ValueError. Keyword arguments go
    to :class:`HSIC` (``n_designs``, ``sampler``, ``width``, ``substrate``); ``output`` defaults
    to the raw ``logit`` (regression models too).
    """

    name = "hsic"

    def __init__(
        self,
        n_designs: int = 1500,
        output: str = "logit",
        batch_size: BatchSize = "auto",
        seed: int = 0,
        channels_first: bool | None = None,
        **hsic_kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, channels_first=channels_first)
        self.n_designs = n_designs
        self.output = output
        self.hsic_kwargs = hsic_kwargs

    def interactions(self, model: nn.Module, inputs: Tensor, target: Tensor | None, groups: Groups) -> Tensor:
        shape = tuple(inputs.shape[1:])
        grid = groups.grid
        windows = len(shape) == 2 and grid is not None and len(grid) == 1 and groups.n == grid[0]
        steps_first = False
        if len(shape) == 1 and grid == (shape[0],) and groups.n == shape[0]:
            g = 1
        elif len(shape) == 3 and grid is not None and len(grid) == 2 and grid[0] == grid[1]:
            g = grid[0]
        elif windows and tuple(groups.masks.shape[1:]) == (1, shape[1]):
            g = grid[0]  # windows along the last dim, shared over channels: HSIC's 1-D mask layout
        elif windows and tuple(groups.masks.shape[1:]) == (shape[0], 1):
            g, steps_first = grid[0], True  # windows over the T steps of (B, T, D): the same, transposed
        else:
            raise ValueError(
                "HSIC interactions use HSIC's own layout: one group per feature for tabular inputs "
                "(groups=None), a g x g grid of patches for images (groups=g), or g windows along the steps "
                "of (B, C, L) signals or (B, T, D) sequences (groups=None or g); got groups "
                f"{groups.n} with grid {grid} for inputs of shape {tuple(inputs.shape)}. For other groups "
                "use 'sobol', 'cd' or 'integrated_hessians'."
            )
        hsic = HSIC(
            grid_size=g,
            n_designs=self.n_designs,
            output=self.output,
            batch_size=self.batch_size,
            seed=self.seed,
            **self.hsic_kwargs,
        )
        if steps_first:  # HSIC masks the last dim: explain the model through a (B, D, T) view
            hsic = hsic._steps_last_view(inputs)
            model, inputs = StepsLast(model), inputs.transpose(1, 2)
        out = hsic.interactions(model, inputs, target)
        main = hsic.last_info["hsic"].reshape(inputs.shape[0], -1)
        out = out + torch.diag_embed(main)
        self.last_info["main_effects"] = main
        return out.to(inputs.dtype)
