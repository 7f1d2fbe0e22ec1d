"""Infidelity (Yeh, Hsieh, Suggala, Inouye & Ravikumar 2019, NeurIPS, arXiv:1901.09392).

INFD(A, f, x) = E_I[(Iᵀ A − (f(x) − f(x − I)))²], lower is better. Perturbations I:

- ``"gaussian"``: I ~ N(0, σ²) on every entry (the paper's noisy baseline);
- ``"square"``: a random ``patch_size`` square set to the baseline, I = (x − x₀) ⊙ 1_square (the paper's
  square removal), one square per draw;
- ``"patch_sequence"``: Quantus' ``Infidelity`` (deterministic): the image is cut into
  ``patch_size`` blocks in raster order and perturbation k sets blocks 1..k to the baseline
  (cumulative); ``n_perturb`` is then the number of blocks;
- an explicit tensor of perturbations I (B, R, *input_shape), e.g. to reproduce Captum's
  ``infidelity`` with the same noise.

``normalize=True`` rescales A by the optimal β = E[IᵀA·Δf] / E[(IᵀA)²] first (Captum's
``normalize``; Yeh et al. Sec. 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, resolve_batch_size
from ...attribution.base import make_generator
from ._utils import RunDraws, Substrate, broadcast_map, make_substrate, output_scores, row_blocks, validate

__all__ = ["PERTURBATIONS", "infidelity"]

PERTURBATIONS = ("gaussian", "square", "patch_sequence")


def _square_masks(b: int, spatial: tuple[int, ...], size: int, g: torch.Generator, device: torch.device) -> Tensor:
    """One random square per sample, (B, *spatial) booleans (clipped to the image)."""
    grids = torch.meshgrid(*[torch.arange(s, device=device) for s in spatial], indexing="ij")
    m = torch.ones(b, *spatial, dtype=torch.bool, device=device)
    for d, s in enumerate(spatial):
        lo = torch.randint(0, max(1, s - size + 1), (b,), generator=g, device=device)
        shape = (b,) + (1,) * len(spatial)
        m &= (grids[d].unsqueeze(0) >= lo.view(shape)) & (grids[d].unsqueeze(0) < (lo + size).view(shape))
    return m


def _block_index(spatial: tuple[int, ...], size: int, device: torch.device) -> tuple[Tensor, int]:
    """Raster index of the ``size`` block holding each position (*spatial), and the number of blocks."""
    idx = torch.zeros(spatial, dtype=torch.long, device=device)
    nb = [math.ceil(s / size) for s in spatial]
    grids = torch.meshgrid(*[torch.arange(s, device=device) for s in spatial], indexing="ij")
    for d in range(len(spatial)):
        idx = idx * nb[d] + grids[d] // size
    return idx, int(math.prod(nb))


def infidelity(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor | None,
    *,
    perturbation: str | Tensor = "gaussian",
    n_perturb: int = 32,
    noise_std: float = 0.1,
    patch_size: int = 4,
    baseline: Substrate = "zeros",
    normalize: bool = False,
    output: str = "logit",
    seed: int = 0,
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
) -> Tensor:
    """Infidelity per sample (B,), mean over the perturbations of (IᵀA − Δf)².

    Args:
        perturbation: ``"gaussian"``, ``"square"``, ``"patch_sequence"`` or a tensor I (B, R, *input_shape).
        n_perturb: number of draws (random kinds).
        noise_std: σ of the Gaussian perturbation.
        patch_size: side of the squares / blocks.
        baseline: what squares and blocks are set to (substrate spec; Quantus' default is ``"min"``).
        normalize: optimal rescaling of A before the error.
        output: ``"logit"`` (Captum, Quantus) or ``"probability"``.
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    validate(inputs, attributions, target)
    x = inputs.detach()
    a = broadcast_map(attributions.detach(), x)
    b = x.shape[0]
    spatial = tuple(x.shape[2:])
    g = make_generator(x.device, seed)
    if isinstance(perturbation, Tensor):
        pert = perturbation.to(device=x.device, dtype=x.dtype)
        if pert.ndim != x.ndim + 1 or pert.shape[0] != b or tuple(pert.shape[2:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"explicit perturbations must have shape (B, R, *input_shape) = ({b}, R, "
                f"{', '.join(map(str, x.shape[1:]))}), got {tuple(pert.shape)}."
            )
        n_runs = pert.shape[1]
        draws = RunDraws(lambda r: pert[:, r])
    elif perturbation == "gaussian":
        n_runs = n_perturb
        draws = RunDraws(lambda r: torch.empty_like(x).normal_(0.0, noise_std, generator=g))  # = randn * std
    elif perturbation in ("square", "patch_sequence"):
        if not spatial:
            raise ValueError(f"perturbation={perturbation!r} needs spatial inputs (B,C,...); use 'gaussian'.")
        delta = x - make_substrate(baseline, x, blur_sigma=blur_sigma).to(x.dtype)
        if perturbation == "square":
            n_runs = n_perturb
            draws = RunDraws(lambda r: delta * _square_masks(b, spatial, patch_size, g, x.device).unsqueeze(1))
        else:
            block, n_runs = _block_index(spatial, patch_size, x.device)
            draws = RunDraws(lambda r: delta * (block <= r).view(1, 1, *spatial))
    else:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS} or a tensor, got {perturbation!r}.")

    fx = output_scores(model, x, target, output).double()
    a_dot = torch.empty(n_runs, b, dtype=torch.float64, device=x.device)
    drops = torch.empty(n_runs, b, dtype=torch.float64, device=x.device)
    a_flat = a.flatten(1).to(x.dtype)
    gaussian = isinstance(perturbation, str) and perturbation == "gaussian"
    buf: Tensor | None = None
    for rs, bs in row_blocks(n_runs, b, batch_size):
        nr = rs.stop - rs.start
        fused = gaussian and bs == slice(0, b)
        if fused:
            # whole runs per block: draw straight into one buffer (the same numbers, run by run, as
            # RunDraws) and turn it into x − I in place, instead of stacking the draws and subtracting
            if buf is None or buf.shape[0] < nr:
                buf = torch.empty((nr, *x.shape), dtype=x.dtype, device=x.device)
            pert_rb = buf[:nr]
            for i in range(nr):
                pert_rb[i].normal_(0.0, noise_std, generator=g)
        else:
            pert_rb = draws.get(rs)[:, bs]  # (nr, nb, *shape)
        nb = pert_rb.shape[1]
        a_dot[rs, bs] = torch.einsum("rbn,bn->rb", pert_rb.flatten(2), a_flat[bs]).double()
        rows = pert_rb.neg_().add_(x) if fused else x[bs].unsqueeze(0) - pert_rb
        tgt = None if target is None else target[bs].repeat(nr)
        scores = output_scores(model, rows.flatten(0, 1), tgt, output).view(nr, nb).double()
        drops[rs, bs] = fx[bs].unsqueeze(0) - scores
    if normalize:
        beta = (a_dot * drops).sum(0) / (a_dot * a_dot).sum(0).clamp_min(1e-30)
        a_dot = a_dot * beta.unsqueeze(0)
    return ((a_dot - drops) ** 2).mean(0)
