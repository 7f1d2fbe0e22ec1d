"""Explanation robustness: max- and avg-sensitivity, local Lipschitz estimate (explainer metrics).

Max-/avg-sensitivity (Yeh, Hsieh, Suggala, Inouye & Ravikumar 2019, arXiv:1901.09392): the maximum
/ mean over y drawn uniformly from the L∞ ball of radius r around x of ‖A(y) − A(x)‖ / ‖A(x)‖
(Captum's ``sensitivity_max``: 10 draws, r = 0.02; Quantus: 200 draws, r = 0.2). Local Lipschitz
estimate (Alvarez-Melis & Jaakkola 2018, arXiv:1806.08049): max over x' = x + N(0, σ²) of
‖A(x) − A(x')‖ / ‖x − x'‖ (Quantus: σ = 0.1, 200 draws). Lower is better for all three.

The method is re-run on all R × B perturbed copies, ``batch_size`` rows per call (row order: draw
then sample). Noise comes from a seeded generator, or is passed explicitly as (B, R, *input_shape).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, resolve_batch_size
from ..._internal.checks import all_finite
from ...attribution.base import make_generator
from ._guard import model_left_as_found
from ._utils import (
    MethodRuns,
    RunDraws,
    Target,
    check_finite_map,
    method_inputs,
    prepare_target,
    row_blocks,
    tile_rows,
    validate,
)

__all__ = ["avg_sensitivity", "local_lipschitz", "max_sensitivity", "sensitivity"]

Method = Callable[..., Tensor]


class _GivenDraws:
    """Explicit perturbations (B, R, *input_shape): runs ``rs`` as (len(rs), B, ...), one view of them (what
    :class:`RunDraws` of ``lambda r: p[:, r]`` stacks run by run)."""

    def __init__(self, p: Tensor) -> None:
        self.p = p

    def get(self, rs: slice) -> Tensor:
        return self.p[:, rs].transpose(0, 1)


def _draws(
    x: Tensor, n: int, kind: str, scale: float, perturbations: Tensor | None, seed: int
) -> tuple[RunDraws | _GivenDraws, int]:
    if perturbations is None and n < 1:
        raise ValueError(f"n_samples must be >= 1 (draws per sample), got {n}.")
    if perturbations is not None:
        p = perturbations.to(device=x.device, dtype=x.dtype)
        if p.ndim != x.ndim + 1 or p.shape[0] != x.shape[0] or tuple(p.shape[2:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"perturbations must have shape (B, R, *input_shape) with B={x.shape[0]} and input_shape="
                f"{tuple(x.shape[1:])}, got {tuple(p.shape)}."
            )
        if p.shape[1] < 1:
            raise ValueError("perturbations hold no draw (R = 0); pass at least one per sample.")
        if not all_finite(p):  # checked here once: the method's re-runs on x + δ do not check their inputs again
            raise ValueError("perturbations contain NaN or Inf; pass finite noise δ (B, R, *input_shape).")
        return _GivenDraws(p), p.shape[1]
    g = make_generator(x.device, seed)
    if kind == "uniform":
        return RunDraws(lambda r: (torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * scale), n
    return RunDraws(lambda r: torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * scale), n


def _ratios(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    method: Method,
    attributions: Tensor | None,
    *,
    n_samples: int,
    kind: str,
    scale: float,
    lipschitz: bool,
    perturbations: Tensor | None,
    norm: float | str,
    seed: int,
    batch_size: int | None,
) -> Tensor:
    """(R, B) ratios ‖A(y) − A(x)‖ / ‖A(x)‖ (or / ‖y − x‖ when ``lipschitz``)."""
    target = prepare_target(model, inputs, target)
    validate(inputs, None, target, inputs_checked=True)  # prepare_target checked them
    x = method_inputs(inputs)
    b = x.shape[0]
    runs = MethodRuns(method)  # checked once, then re-run without repeating the checks
    a0 = runs(model, x, target) if attributions is None else attributions.detach().to(x.device)
    if a0.shape[0] != b:
        raise ValueError(f"attributions have {a0.shape[0]} samples, inputs {b}.")
    check_finite_map(a0)  # a NaN map has no distance to anything: every ratio would be NaN
    a0f = a0.reshape(b, -1).double()
    draws, n_runs = _draws(x, n_samples, kind, scale, perturbations, seed)
    out = torch.empty(n_runs, b, dtype=torch.float64, device=x.device)
    for rs, bs in row_blocks(n_runs, b, batch_size):
        noise = draws.get(rs)[:, bs]
        nr, nb = noise.shape[:2]
        y = (x[bs].unsqueeze(0) + noise).flatten(0, 1)
        tgt = None if target is None else tile_rows(target[bs], nr)
        ay = runs(model, y, tgt)
        if attributions is not None and ay.shape[1:] != a0.shape[1:]:
            raise ValueError(
                f"attributions of shape {tuple(a0.shape)} are not this method's maps (it gives "
                f"{tuple(ay.shape[1:])} per sample); pass the maps the same method produced, or attributions=None."
            )
        ay = ay.reshape(nr, nb, -1).double()
        num = torch.linalg.vector_norm(ay - a0f[bs].unsqueeze(0), ord=_ord(norm), dim=-1)
        if lipschitz:
            den = torch.linalg.vector_norm(noise.reshape(nr, nb, -1), ord=_ord(norm), dim=-1, dtype=torch.float64)
        else:
            den = torch.linalg.vector_norm(a0f[bs], ord=_ord(norm), dim=-1).unsqueeze(0)
            den = torch.where(den == 0, torch.ones_like(den), den)  # Captum's convention
        out[rs, bs] = num / den.clamp_min(1e-30)
    return out


def _ord(norm: float | str) -> float:
    if norm in ("fro", 2, 2.0):
        return 2.0
    if norm in ("inf", float("inf")):
        return float("inf")
    return float(norm)


@model_left_as_found
def sensitivity(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    method: Method,
    attributions: Tensor | None = None,
    *,
    reduction: str = "max",
    n_samples: int = 10,
    radius: float = 0.02,
    norm: float | str = "fro",
    perturbations: Tensor | None = None,
    seed: int = 0,
    batch_size: BatchSize = "auto",
) -> Tensor:
    """Max (``reduction="max"``) or mean (``"mean"``) relative change of the map over the L∞ ball, (B,).

    Args:
        method: an attribution method ``method(model, inputs, target) -> map``.
        attributions: the map at x if already computed (saves one call).
        n_samples: draws per sample (Captum 10, Quantus 200).
        radius: L∞ radius r (Captum 0.02, Quantus 0.2).
        norm: vector norm of the flattened maps (Frobenius by default).
        perturbations: explicit noise δ (B, R, *input_shape); y = x + δ.
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    if reduction not in ("max", "mean"):
        raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}.")
    r = _ratios(
        model, inputs, target, method, attributions, n_samples=n_samples, kind="uniform", scale=radius,
        lipschitz=False, perturbations=perturbations, norm=norm, seed=seed, batch_size=batch_size,
    )  # fmt: skip
    return r.max(0).values if reduction == "max" else r.mean(0)


def max_sensitivity(
    model: nn.Module, inputs: Tensor, target: Target, method: Method, attributions: Tensor | None = None,
    **kwargs,
) -> Tensor:  # fmt: skip
    """Max-sensitivity (Yeh et al. 2019) per sample (B,); see :func:`sensitivity`."""
    return sensitivity(model, inputs, target, method, attributions, reduction="max", **kwargs)


def avg_sensitivity(
    model: nn.Module, inputs: Tensor, target: Target, method: Method, attributions: Tensor | None = None,
    **kwargs,
) -> Tensor:  # fmt: skip
    """Avg-sensitivity (Yeh et al. 2019) per sample (B,); see :func:`sensitivity`."""
    return sensitivity(model, inputs, target, method, attributions, reduction="mean", **kwargs)


@model_left_as_found
def local_lipschitz(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    method: Method,
    attributions: Tensor | None = None,
    *,
    n_samples: int = 10,
    noise_std: float = 0.1,
    norm: float | str = "fro",
    perturbations: Tensor | None = None,
    seed: int = 0,
    batch_size: BatchSize = "auto",
) -> Tensor:
    """Local Lipschitz estimate max ‖A(x) − A(x')‖ / ‖x − x'‖, x' = x + N(0, σ²), per sample (B,)."""
    batch_size = resolve_batch_size(batch_size, model, inputs)
    r = _ratios(
        model, inputs, target, method, attributions, n_samples=n_samples, kind="gaussian", scale=noise_std,
        lipschitz=True, perturbations=perturbations, norm=norm, seed=seed, batch_size=batch_size,
    )  # fmt: skip
    return r.max(0).values
