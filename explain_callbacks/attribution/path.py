"""Path methods: Integrated Gradients and Expected Gradients.

Integrated Gradients (Sundararajan, Taly & Yan 2017, arXiv:1703.01365):
``IG_i = (x_i − x'_i) ∫₀¹ ∂f_c(x' + α(x − x'))/∂x_i dα``, with completeness
``Σ_i IG_i = f_c(x) − f_c(x')``. IG is not Lipschitz in x for ReLU networks and its uniqueness needs
an extra axiom (Lundstrom, Huang & Razaviyayn 2022, arXiv:2202.11912): report sensitivity metrics
next to it.

Expected Gradients (Erion et al. 2021, Nature Machine Intelligence, arXiv:1906.10670): the
expectation of the IG integrand over baselines x' ~ D and α ~ U(0, 1).
"""

from __future__ import annotations

import functools
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize, flat_calls, forward_selected, grad_selected, run_blocks
from .._internal.layout import check_channels_first, reads_channels_first
from .._internal.ops import gaussian_blur
from .._internal.registry import ATTRIBUTIONS
from .._internal.softplus import check_beta
from .base import Attributor

__all__ = ["RULES", "ExpectedGradients", "IntegratedGradients", "make_baseline", "quadrature"]

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
Baseline = Union[str, float, Tensor]


def quadrature(n_steps: int, rule: str = "gausslegendre") -> tuple[Tensor, Tensor]:
    """Nodes α in [0, 1] and weights (float64) of a quadrature rule for ∫₀¹.

    ``riemann_trapezoid`` is the true trapezoid rule (weights sum to 1); Captum's version of that
    name uses weights 1/n with halved ends, which sum to (n − 1)/n. Computed once per (n_steps, rule)
    (numpy's Gauss-Legendre nodes take an eigen-decomposition: ~1 ms, more than a cheap model's whole
    explanation); each call gets its own tensors.
    """
    nodes, weights = _quadrature(n_steps, rule)
    return torch.tensor(nodes, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _quadrature(n_steps: int, rule: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}.")
    n = n_steps
    if rule == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(n)
        return tuple(((t + 1) / 2).tolist()), tuple((w / 2).tolist())
    i = torch.arange(n, dtype=torch.float64)
    if rule == "riemann_left":
        a, w = i / n, torch.full((n,), 1 / n, dtype=torch.float64)
    elif rule == "riemann_right":
        a, w = (i + 1) / n, torch.full((n,), 1 / n, dtype=torch.float64)
    elif rule == "riemann_middle":
        a, w = (i + 0.5) / n, torch.full((n,), 1 / n, dtype=torch.float64)
    elif rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2.")
        w = torch.full((n,), 1 / (n - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (n - 1)
        a = i / (n - 1)
    else:
        raise ValueError(f"Unknown integration rule {rule!r}; choose one of {RULES}.")
    return tuple(a.tolist()), tuple(w.tolist())


def make_baseline(
    spec: Baseline,
    inputs: Tensor,
    *,
    sigma: float = 5.0,
    generator: torch.Generator | None = None,
    model: object = None,
    channels_first: bool | None = None,
) -> Tensor:
    """Baseline x' for ``inputs``: ``"zeros"``, ``"blur"`` (Gaussian, ``sigma`` px, along the positions),
    ``"mean"`` (per-sample mean over the positions, per channel; per sample over the features for
    tabular (B, D) inputs), ``"uniform"`` (uniform noise in the sample's [min, max]), a float, or a
    tensor broadcastable to the inputs.

    The positions of 3-D inputs are the last dim of (B, C, L) signals and dim 1 of (B, T, D)
    sequences, as :func:`~explain_callbacks._internal.layout.reads_channels_first` decides from
    ``model`` (or ``channels_first`` True/False); without either, (B, C, L). So a sequence's mean
    baseline is each feature's mean over time, the metrics' ``"mean"`` substrate.
    """
    if (
        isinstance(spec, str)
        and spec in ("mean", "blur")
        and inputs.ndim == 3
        and not reads_channels_first(model, inputs, channels_first)
    ):  # (B, T, D): run along T on the (B, D, T) view
        return make_baseline(spec, inputs.transpose(1, 2), sigma=sigma).transpose(1, 2).contiguous()
    if isinstance(spec, Tensor):
        try:
            return spec.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs)
        except RuntimeError as err:
            raise ValueError(
                f"baseline of shape {tuple(spec.shape)} does not broadcast to inputs {tuple(inputs.shape)}."
            ) from err
    if isinstance(spec, (int, float)):
        return torch.full_like(inputs, float(spec))
    if spec == "zeros":
        return torch.zeros_like(inputs)
    if spec == "blur":
        return gaussian_blur(inputs.detach(), sigma)
    if spec == "mean":
        dims = tuple(range(2, inputs.ndim))
        if not dims:  # tabular: mean over features of each sample
            return inputs.detach().mean(1, keepdim=True).expand_as(inputs).clone()
        return inputs.detach().mean(dims, keepdim=True).expand_as(inputs).clone()
    if spec == "uniform":
        b = inputs.shape[0]
        flat = inputs.detach().reshape(b, -1)
        lo = flat.min(1).values.view(b, *([1] * (inputs.ndim - 1)))
        hi = flat.max(1).values.view(b, *([1] * (inputs.ndim - 1)))
        u = torch.rand(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        return lo + (hi - lo) * u
    raise ValueError(f"Unknown baseline {spec!r}; use 'zeros', 'blur', 'mean', 'uniform', a float, or a tensor.")


@ATTRIBUTIONS.register("ig", "integrated_gradients")
class IntegratedGradients(Attributor):
    """Integrated Gradients with a quadrature rule and a choice of baseline.

    Args:
        n_steps: quadrature nodes (32).
        rule: ``gausslegendre`` (default) or ``riemann_{left,right,middle,trapezoid}``.
        baseline: ``zeros`` | ``blur`` | ``mean`` | ``uniform`` | float | tensor (:func:`make_baseline`;
            ``mean`` and ``blur`` run along the positions: a (B, T, D) sequence's mean baseline is
            each feature's mean over time, as the metrics' ``"mean"`` substrate).
        channels_first: how 3-D inputs are read for ``mean``/``blur``: True (B, C, L), False (B, T, D),
            None (default) decided from the model's first layer.
        completeness: also compute the relative completeness error
            ``|Σ IG − (f(x) − f(x'))| / |f(x) − f(x')|`` (two extra forward passes), stored in
            ``last_info["completeness_error"]`` with ``last_info["delta"]`` the signed gap.
        beta: explain the β-smoothed network, every ReLU evaluated as softplus(β) (Dombrowski et al. 2019;
            the completeness check then refers to that network too). None (default): the network as is.

    Model calls hold at most ``batch_size`` rows: all path points of a chunk of steps go in one call.
    """

    name = "ig"

    def __init__(
        self,
        n_steps: int = 32,
        rule: str = "gausslegendre",
        baseline: Baseline = "zeros",
        blur_sigma: float = 5.0,
        completeness: bool = True,
        channels_first: bool | None = None,
        batch_size: BatchSize = "auto",
        seed: int = 0,
        beta: float | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.beta = check_beta(beta)
        quadrature(n_steps, rule)  # validate early
        self.channels_first = check_channels_first(channels_first)
        self.n_steps = n_steps
        self.rule = rule
        self.baseline = baseline
        self.blur_sigma = blur_sigma
        self.completeness = completeness

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        base = make_baseline(
            self.baseline,
            inputs,
            sigma=self.blur_sigma,
            # a generator only for the random baseline (seeding one costs more than a cheap model's pass)
            generator=self.generator(inputs.device) if _is_random(self.baseline) else None,
            model=model,
            channels_first=self.channels_first,
        )
        alphas, weights = quadrature(self.n_steps, self.rule)
        avg_grad = integrate_path(
            model, inputs, base, target, alphas, weights, self.batch_size, create_graph=create_graph
        )
        attr = (inputs - base) * avg_grad
        if not create_graph:
            attr = attr.detach()  # inputs that require grad: no graph of (x − x') ⊙ ḡ
        if self.completeness:
            self.last_info.update(completeness_info(model, inputs, base, target, attr, self.batch_size))
        return attr


def _is_random(baseline: Baseline) -> bool:
    """Whether :func:`make_baseline` draws ``baseline`` at random (and needs a generator)."""
    return isinstance(baseline, str) and baseline == "uniform"


def integrate_path(
    model: nn.Module,
    inputs: Tensor,
    base: Tensor,
    target: Tensor | None,
    alphas: Tensor,
    weights: Tensor,
    batch_size: int | None,
    *,
    create_graph: bool = False,
) -> Tensor:
    """Σ_k w_k ∂f(x' + α_k (x − x'))/∂x over the ``n_steps * B`` path points, step-major, in calls of
    exactly ``batch_size`` rows (:func:`~explain_callbacks._internal.batching.flat_calls`: a call may
    end one step and start the next, so every call is as large as the chunk ``"auto"`` measured)."""
    alphas = alphas.to(device=inputs.device, dtype=inputs.dtype)
    weights = weights.to(device=inputs.device, dtype=inputs.dtype)
    diff = inputs - base
    total = torch.zeros_like(inputs)
    b, shape = inputs.shape[0], inputs.shape[1:]
    col = (-1,) + (1,) * inputs.ndim  # a value per step, broadcast over (steps, samples, *shape)
    for _, pieces in flat_calls(len(alphas), b, batch_size):
        # the call's points built and its gradients summed per block of steps (run_blocks: whole steps
        # together), a few tensor ops per call instead of a few per step
        blocks = run_blocks(pieces, b)
        pts = [
            (base[s].unsqueeze(0) + alphas[r0:r1].view(col) * diff[s].unsqueeze(0)).reshape(-1, *shape)
            for r0, r1, s, _ in blocks
        ]
        tgt = None if target is None else torch.cat([target[s].repeat(r1 - r0) for r0, r1, s, _ in blocks])
        g = grad_selected(model, pts[0] if len(pts) == 1 else torch.cat(pts), tgt, None, create_graph=create_graph)
        for r0, r1, s, at in blocks:
            total[s] += (weights[r0:r1].view(col) * g[at].view(r1 - r0, -1, *shape)).sum(0)
    return total


@torch.no_grad()
def completeness_info(
    model: nn.Module, inputs: Tensor, base: Tensor, target: Tensor | None, attr: Tensor, batch_size: int | None
) -> dict[str, Tensor]:
    """Relative completeness error of a path attribution against ``f(x) − f(x')``."""
    fx = forward_selected(model, inputs.detach(), target, batch_size)
    fb = forward_selected(model, base.detach(), target, batch_size)
    delta_f = fx - fb
    total = attr.detach().reshape(attr.shape[0], -1).sum(1)
    gap = total - delta_f
    return {
        "delta": gap,
        "completeness_error": gap.abs() / delta_f.abs().clamp_min(1e-12),
        "output_change": delta_f,
    }


@ATTRIBUTIONS.register("expected_gradients", "eg")
class ExpectedGradients(Attributor):
    """Expected Gradients: E_{x'~D, α~U(0,1)} (x − x') ⊙ ∂f_c(x' + α(x − x'))/∂x.

    Args:
        reference: the baseline distribution D, a tensor (N, *input_shape). ``None`` uses the
            batch being explained (each sample draws baselines from the others and itself).
        n_samples: k, the number of (baseline, α) draws per input (Erion et al. use 1 per step
            in training and 100-200 post hoc).

    Completeness holds in expectation: E Σ EG = f_c(x) − E f_c(x').
    ``beta``: softplus(β) for every ReLU (Dombrowski et al. 2019), as for Integrated Gradients.
    """

    name = "expected_gradients"

    def __init__(
        self,
        reference: Tensor | None = None,
        n_samples: int = 32,
        batch_size: BatchSize = "auto",
        seed: int = 0,
        beta: float | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.beta = check_beta(beta)
        self.reference = reference
        self.n_samples = n_samples

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        ref = inputs.detach() if self.reference is None else self.reference.to(inputs.device, inputs.dtype)
        if ref.shape[1:] != inputs.shape[1:]:
            raise ValueError(
                f"reference samples have shape {tuple(ref.shape[1:])} but inputs {tuple(inputs.shape[1:])}; "
                "pass a reference batch of the same per-sample shape."
            )
        b, k = inputs.shape[0], self.n_samples
        gen = self.generator(inputs.device)
        idx = torch.randint(0, ref.shape[0], (k, b), generator=gen, device=inputs.device)
        alpha = torch.rand((k, b), generator=gen, device=inputs.device, dtype=inputs.dtype)
        total = torch.zeros_like(inputs)
        shape = inputs.shape[1:]
        # the k * B points, draw-major, in calls of exactly batch_size rows (a call may span two draws),
        # built and summed per block of whole draws (run_blocks): a few tensor ops per call, not per draw
        for _, pieces in flat_calls(k, b, self.batch_size):
            blocks = run_blocks(pieces, b)
            parts, diffs = [], []
            for r0, r1, s, _ in blocks:
                refs = ref[idx[r0:r1, s]]  # (draws, samples, *shape)
                d = inputs[s].unsqueeze(0) - refs
                a = alpha[r0:r1, s].reshape(*refs.shape[:2], *([1] * len(shape)))
                parts.append((refs + a * d).reshape(-1, *shape))
                diffs.append(d)
            tgt = None if target is None else torch.cat([target[s].repeat(r1 - r0) for r0, r1, s, _ in blocks])
            pts = parts[0] if len(parts) == 1 else torch.cat(parts)
            g = grad_selected(model, pts, tgt, None, create_graph=create_graph)
            for (_, _, s, at), d in zip(blocks, diffs):
                total[s] += (d * g[at].view(d.shape)).sum(0)
        return total / k if create_graph else (total / k).detach()
