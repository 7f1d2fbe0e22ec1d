"""HSIC attribution (Novello, Fel & Vigouroux 2022, "Making Sense of Dependence: Efficient Black-box
Explanations Using Dependence Measure", NeurIPS, arXiv:2206.06219)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize
from ..._internal.layout import check_channels_first
from ..._internal.masks import (
    MaskLayout,
    fit_budget,
    make_substrate,
    mask_layout,
    masked_scores,
    render_masks,
    resize_map,
    sample_designs,
)
from ..._internal.outputs import OutputSpec
from ..._internal.registry import ATTRIBUTIONS
from ._common import PerturbationAttributor

__all__ = ["HSIC"]

EPS = 1e-12
#: the series factor of the output Gram is used while its K terms are at most p / SERIES_FRACTION
SERIES_FRACTION = 4
#: rows of the dense Gram built at a time (a 128 × p float64 block stays in a core's L2 cache)
DENSE_ROWS = 128
#: float64 elements of series factors held at a time (32 MiB)
GRAM_ELEMENTS = 1 << 22
#: the Poisson tail (in units of (Σ|a_u|)²) the series may leave out
SERIES_TOL = 1e-15
WIDTHS = ("median", "median_distance", "std")


def _series_terms(lam: float, tol: float = SERIES_TOL, limit: int = 100_000) -> int | None:
    """The smallest K >= λ with P(Poisson(λ) > K) <= ``tol``, bounded by the geometric series
    ``pmf(K+1) / (1 − λ/(K+2))``; None beyond ``limit`` terms or for a non-finite λ."""
    if not math.isfinite(lam):
        return None
    if lam <= 0.0:
        return 0
    k = max(1, math.ceil(lam))
    log_lam = math.log(lam)
    while k <= limit:
        log_pmf = -lam + (k + 1) * log_lam - math.lgamma(k + 2)
        if log_pmf - math.log1p(-lam / (k + 2)) <= math.log(tol):
            return k
        k += 1
    return None


@ATTRIBUTIONS.register("hsic")
class HSIC(PerturbationAttributor):
    """Hilbert-Schmidt independence between each grid cell's on/off state and the model output.

    p binary designs X (p×d, one column per grid cell: a binary Latin hypercube by default, or a
    scrambled Sobol sequence / Bernoulli thresholded at 1/2), p forward passes whatever d is (the
    source of its speed over Sobol's N·(d+2)). For each explained sample, with outputs y (p,):

    - input kernel per cell: the Dirac kernel, in the zero-mean form of the reference code
      ``K_i(u, v) = 0.5 − (x_ui − x_vi)²``;
    - output kernel ``L(u, v) = exp(−(y_u − y_v)² / (2w²))``; the width w is, per sample, the median of
      the outputs (``width="median"``, default: the reference code's choice, ``percentile(Y, 50)``), the
      median of |y_u − y_v| (``"median_distance"``, the usual median heuristic), their standard deviation
      (``"std"``) or a float; a width of zero (more than half the outputs exactly 0) falls back on the
      standard deviation. With probabilities most masked copies of a digit score near 0, so the median
      is tiny and the Gram matrix almost diagonal, yet on all 270 validation digits of the benchmark's
      CNN (p = 528) it gave a lower deletion AUC than the standard deviation: paired difference
      −0.011 ± 0.004 (median distance: −0.010 ± 0.006);
    - ``HSIC_i = (1/p²) Σ_{u,v} (K̃_i ⊙ L̃)``, tilde = double centring by H = I − 11ᵀ/p. Since H is
      idempotent this equals ``(2/p²) · (H x_i)ᵀ L (H x_i)``, computed for all cells at once.

    The map is the g×g scores resized bicubically: (B,1,H,W) for images (broadcast over channels),
    (B,1,T) for (B,C,T) signals, (B,T,1) for (B,T,D) sequences, (B,D) for tabular inputs (one cell per feature).
    :meth:`interactions` gives pairwise scores with the product kernel.

    Args:
        grid_size: g (7). n_designs: p (1500, the paper's setting; its budget study goes down to a
            few hundred). sampler: ``lhs`` (the paper), ``sobol`` or ``bernoulli``.
        substrate: ``zeros`` (x ⊙ M, default), ``mean``, ``blur``, float or tensor.
        output: ``auto`` (default: the target's softmax probability, the quantity deletion/insertion
            score; the raw output of single-output models)
            or ``logit`` (the raw output: the reference code explains whatever the model returns).
        width: the output kernel's width, see above.
        budget: forward passes per sample; p is lowered to fit.
        channels_first: how 3-D inputs are read: True (B, C, L) signals, masks along L; False (B, T, D)
            sequences, masks over the T steps and a (B, T, 1) map; None (default) decided from the
            model's first layer (``_internal.layout.reads_channels_first``).

    Cost: p forward passes per sample (1500 by default), plus O(p²·d) per sample for the estimator.
    """

    name = "hsic"
    step_masks = True

    def __init__(
        self,
        grid_size: int = 7,
        n_designs: int = 1500,
        sampler: str = "lhs",
        width: str | float = "median",
        substrate: str | float | Tensor = "zeros",
        blur_sigma: float = 5.0,
        upsample: str = "nearest",
        map_upsample: str = "bicubic",
        output: str = "auto",
        budget: int | None = None,
        channels_first: bool | None = None,
        batch_size: BatchSize = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(output=output, budget=budget, batch_size=batch_size, seed=seed)
        self.channels_first = check_channels_first(channels_first)
        if n_designs < 4:
            raise ValueError(f"n_designs must be >= 4, got {n_designs}.")
        if isinstance(width, str) and width not in WIDTHS:
            raise ValueError(f"width must be one of {WIDTHS} or a positive float, got {width!r}.")
        self.grid_size = grid_size
        self.n_designs = n_designs
        self.sampler = sampler
        self.width = width
        self.substrate = substrate
        self.blur_sigma = blur_sigma
        self.upsample = upsample
        self.map_upsample = map_upsample

    @classmethod
    def monitor_settings(cls, forwards_per_sample: int) -> dict[str, int]:
        """The design count a monitor uses when none is given: ``forwards_per_sample`` designs, at least 64."""
        return {"n_designs": max(64, int(forwards_per_sample))}

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        return fit_budget(self.n_designs, budget=self.budget, minimum=4, what="designs", method="HSIC")

    def _scores(self, model: nn.Module, inputs: Tensor, target: Tensor | None) -> tuple[MaskLayout, Tensor, Tensor]:
        """Designs X (p, d) and outputs y (B, p), in the input's dtype."""
        layout = mask_layout(inputs, self.grid_size, "HSIC")
        p = self.n_forwards(tuple(inputs.shape[1:]))
        gen = self.generator(inputs.device)
        x = sample_designs(p, layout.d, self.sampler, gen, p=0.5, binary=True, device=inputs.device)
        sub = make_substrate(inputs, self.substrate, sigma=self.blur_sigma)
        y = masked_scores(
            model,
            inputs,
            target,
            p,
            lambda msl: render_masks(x[msl], layout, self.upsample),
            sub,
            batch_size=self.batch_size,
            output=self.output,
        )
        self._record_forwards(inputs, p)
        return layout, x.to(y.dtype), y

    def _width(self, y: Tensor) -> Tensor:
        """Bandwidth w per sample of outputs y (b, p)."""
        if isinstance(self.width, (int, float)):
            w = torch.full((y.shape[0],), float(self.width), dtype=y.dtype, device=y.device)
        elif self.width == "median":
            w = y.median(dim=1).values.abs()
        elif self.width == "std":
            w = y.std(dim=1)
        else:
            iu = torch.triu_indices(y.shape[1], y.shape[1], 1, device=y.device)
            w = (y[:, iu[0]] - y[:, iu[1]]).abs().median(dim=1).values
        return torch.where(w > EPS, w, y.std(dim=1).clamp_min(EPS))

    def _output_gram(self, y: Tensor) -> Tensor:
        """RBF Gram matrices L (b, p, p) of outputs y (b, p), built in place (one p×p buffer per sample)."""
        w = self._width(y)
        L = y.unsqueeze(2) - y.unsqueeze(1)
        # Clamping the exponent at -80 keeps exp's results out of the denormal range (x86 handles
        # denormals ~5x slower); it changes entries below 2e-35 only.
        return L.square_().mul_((-0.5 / w.pow(2)).view(-1, 1, 1)).clamp_(min=-80.0).exp_()

    def _gram_factor(self, y: Tensor) -> Tensor | None:
        """V (b, K, p) with ``L = VᵀV`` up to 1e-15 per unit of the forms it enters, or None when the
        series is longer than the dense p×p Gram is expensive (outputs spread over many widths).

        Why: the output kernel is one-dimensional, so with ``s_u = (y_u − y₀)/w`` (y₀ the midrange)
        ``L_uv = e^{−s_u²/2} e^{−s_v²/2} Σ_k (s_u s_v)^k / k!``: rows ``V_k(u) = e^{−s_u²/2} s_u^k / √k!``.
        Every term of ``aᵀLa = Σ_k (V_k·a)²`` is non-negative, and for k ≥ S² (S = max |s_u|) a term is
        at most ``(Σ|a_u|)² · Poisson(S²)(k)``, so K terms leave a tail of at most ``(Σ|a_u|)²`` times a
        Poisson tail, held below 1e-15 here. The quadratic forms then cost O(K·p·d) instead of
        O(p²·d) plus p² exponentials: on a cheap tabular model the dense Gram cost 7-14× the model's
        own forward passes (benchmarks/bench_blackbox.py)."""
        y = y.double()
        w = self._width(y)
        y0 = (y.amax(1) + y.amin(1)) / 2
        s = (y - y0.unsqueeze(1)) / w.unsqueeze(1)
        k = _series_terms(float(s.abs().amax()) ** 2)
        if k is None or k > y.shape[1] // SERIES_FRACTION:
            return None
        v = torch.empty((y.shape[0], k + 1, y.shape[1]), dtype=y.dtype, device=y.device)
        v[:, 0] = (-0.5 * s * s).exp()
        for j in range(1, k + 1):  # V_j = V_{j-1} · s / √j
            torch.mul(v[:, j - 1], s, out=v[:, j]).div_(math.sqrt(j))
        return v

    def estimate(self, x: Tensor, y: Tensor) -> Tensor:
        """HSIC_i (B, d) from binary designs x (p, d) and outputs y (B, p), in y's dtype, computed in
        float64.

        ``HSIC_i = (2/p²) · x̃_iᵀ L x̃_i`` (x̃ the centred designs): through the series factor of L
        (:meth:`_gram_factor`) for all cells and a block of samples in one batched matrix product,
        else from the dense Gram built in row blocks of its upper triangle (half the exponentials;
        each block stays in cache)."""
        p = x.shape[0]
        x = x.double()  # the column means k/p in float64: in float32 their rounding shifted every x̃_i
        xc = x - x.mean(0, keepdim=True)
        out = torch.empty((y.shape[0], x.shape[1]), dtype=torch.float64, device=y.device)
        dense = []
        step = max(1, GRAM_ELEMENTS // (p * 64))
        for s0 in range(0, y.shape[0], step):
            sl = slice(s0, min(s0 + step, y.shape[0]))
            v = self._gram_factor(y[sl])
            if v is None:
                dense += range(sl.start, sl.stop)
                continue
            out[sl] = (v @ xc).square_().sum(1)  # Σ_k (V_k · x̃_i)²
        for i in dense:
            out[i] = self._dense_form(y[i].double(), xc)
        return (out * (2.0 / p**2)).to(y.dtype)

    def _dense_form(self, y: Tensor, xc: Tensor) -> Tensor:
        """``diag(x̃ᵀ L x̃)`` (d,) from one sample's outputs (p,): L's upper triangle in row blocks."""
        p = y.shape[0]
        c = float(-0.5 / self._width(y.unsqueeze(0))[0].pow(2))
        acc = torch.zeros(xc.shape[1], dtype=y.dtype, device=y.device)
        for r0 in range(0, p, DENSE_ROWS):
            r1 = min(p, r0 + DENSE_ROWS)
            blk = (y[r0:r1, None] - y[None, r0:]).square_().mul_(c).clamp_(min=-80.0).exp_()
            a = xc[r0:r1]
            acc += (a * (blk[:, : r1 - r0] @ a)).sum(0)
            if r1 < p:  # the block right of the diagonal stands for itself and its mirror image
                acc += 2 * (a * (blk[:, r1 - r0 :] @ xc[r1:])).sum(0)
        return acc

    @torch.no_grad()
    def interactions(
        self, model: nn.Module, inputs: Tensor, target: Tensor | int | None = None, *, output_key: OutputSpec = None
    ) -> Tensor:
        """Pairwise interactions ``HSIC_ij − HSIC_i − HSIC_j`` between grid cells, shape (B, d, d), float64.

        ``HSIC_ij`` uses the product kernel of the reference code, ``(1 + K_i)(1 + K_j)`` with K the
        zero-mean Dirac form 0.5 − (u − v)²; since K has mean zero under balanced binary designs this is
        the HSIC-ANOVA decomposition (Da Veiga 2021) and the difference is ``HSIC(K_i ⊙ K_j)``, the
        pure interaction term. Expanded, with a = x_i, b = x_j (binary columns) and L̃ = HLH:
        ``p²·(HSIC_ij − HSIC_i − HSIC_j) = aᵀL̃a + bᵀL̃b + 2aᵀL̃b − 4(a⊙b)ᵀL̃(a + b) + 4(a⊙b)ᵀL̃(a⊙b)``.
        With an RBF output kernel an additive model still shows small positive values between its
        influential cells; true interactions stand out above them. The diagonal is set to 0. Cells are
        numbered row-major over the grid (d = g² for images). Costs the same p forward passes as the
        attribution, plus O(p²·d²) per sample. ``last_info["hsic"]`` holds HSIC_i (B, *grid).
        """
        with self._entry(model, inputs, target, output_key) as (model, inputs, target):
            tgt = self._prepare(model, inputs, target)
            layout, x, y = self._scores(model, inputs, tgt)
        x, y = x.double(), y.double()  # the expansion subtracts large terms: keep float64
        p, d = x.shape
        xc = x - x.mean(0, keepdim=True)
        z = x.unsqueeze(2) * x.unsqueeze(1)  # (p, d, d)
        zc = (z - z.mean(0, keepdim=True)).reshape(p, d * d)
        res = []
        for bi in range(y.shape[0]):
            L = self._output_gram(y[bi : bi + 1])[0]
            lx = L @ xc  # (p, d)
            t1 = xc.t() @ lx  # aᵀL̃b
            zc3 = zc.view(p, d, d)
            t2 = (zc3 * lx.unsqueeze(2)).sum(0)  # (ab)ᵀL̃a
            t3 = (zc3 * lx.unsqueeze(1)).sum(0)  # (ab)ᵀL̃b
            t4 = (zc * (L @ zc)).sum(0).view(d, d)
            dg = t1.diagonal()
            inter = (dg.unsqueeze(1) + dg.unsqueeze(0) + 2 * t1 - 4 * (t2 + t3) + 4 * t4) / p**2
            inter.fill_diagonal_(0.0)
            res.append(inter)
        self.last_info["hsic"] = self.estimate(x, y).reshape(y.shape[0], *layout.grid)
        return torch.stack(res)

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        layout, x, y = self._scores(model, inputs, target)
        h = self.estimate(x, y)
        self.last_info["hsic"] = h.reshape(inputs.shape[0], *layout.grid)
        return resize_map(h.to(inputs.dtype), layout, self.map_upsample)
