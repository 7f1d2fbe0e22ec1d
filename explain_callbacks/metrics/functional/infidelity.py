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
from ..._internal.layout import StepsLast
from ...attribution.base import make_generator
from ._guard import model_left_as_found
from ._utils import (
    Substrate,
    Target,
    broadcast_map,
    flat_call_scores,
    make_substrate,
    prepare_target,
    steps_last,
    transposed_sequence,
    validate,
)

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


@model_left_as_found
def infidelity(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target,
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
    channels_first: bool | None = None,
) -> Tensor:
    """Infidelity per sample (B,), mean over the perturbations of (IᵀA − Δf)².

    Args:
        perturbation: ``"gaussian"``, ``"square"``, ``"patch_sequence"`` or a tensor I (B, R, *input_shape).
        n_perturb: number of draws (random kinds).
        noise_std: σ of the Gaussian perturbation.
        patch_size: side of the squares / blocks.
        baseline: what squares and blocks are set to (substrate spec; Quantus' default is ``"min"``).
        normalize: optimal rescaling of A before the error.
        output: ``"logit"`` (Captum, Quantus), ``"probability"`` or ``"sigmoid"`` (multi-label).
        channels_first: how 3-D inputs are read by squares and blocks: None decides from the model's first
            layer (a recurrent, attention or linear layer reads (B,T,D) sequences: windows of T steps
            over all D features), True (B,C,L), False (B,T,D).
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    validate(inputs, attributions)
    layout = isinstance(perturbation, str) and perturbation in ("square", "patch_sequence")
    if steps_last(model, inputs, channels_first, layout):
        return infidelity(
            StepsLast(model), inputs.transpose(1, 2), transposed_sequence(attributions, inputs), target,
            perturbation=perturbation, n_perturb=n_perturb, noise_std=noise_std, patch_size=patch_size,
            baseline=transposed_sequence(baseline, inputs) if isinstance(baseline, Tensor) else baseline,
            normalize=normalize, output=output, seed=seed, blur_sigma=blur_sigma, batch_size=batch_size,
            channels_first=True,
        )  # fmt: skip
    target = prepare_target(model, inputs, target)
    validate(inputs, attributions, target)
    if not isinstance(perturbation, Tensor) and (n_perturb < 1 or patch_size < 1):
        raise ValueError(f"n_perturb and patch_size must be >= 1, got {n_perturb} and {patch_size}.")
    x = inputs.detach()
    a = broadcast_map(attributions.detach().to(x.device), x)
    b = x.shape[0]
    spatial = tuple(x.shape[2:])
    g = make_generator(x.device, seed)
    # draw(r): the perturbations I (B, *input_shape) of run r, called once per run, in run order
    if isinstance(perturbation, Tensor):
        pert = perturbation.detach().to(device=x.device, dtype=x.dtype)
        if pert.ndim != x.ndim + 1 or pert.shape[0] != b or tuple(pert.shape[2:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"explicit perturbations must have shape (B, R, *input_shape) = ({b}, R, "
                f"{', '.join(map(str, x.shape[1:]))}), got {tuple(pert.shape)}."
            )
        n_runs = pert.shape[1]
        if n_runs < 1:
            raise ValueError("explicit perturbations hold no draw (R = 0); pass at least one per sample.")

        def draw(r: int) -> Tensor:
            return pert[:, r]

    elif perturbation == "gaussian":
        n_runs = n_perturb
        # one contiguous buffer, redrawn in place per run: an in-place draw fills memory order, so a buffer
        # shaped like a channels_last or transposed x (empty_like keeps strides) would put other values at
        # each index than for the same x stored contiguously (as the other metrics, draw in logical order)
        noise = torch.empty(x.shape, dtype=x.dtype, device=x.device)

        def draw(r: int) -> Tensor:
            return noise.normal_(0.0, noise_std, generator=g)  # = randn * std

    elif perturbation in ("square", "patch_sequence"):
        if not spatial:
            raise ValueError(f"perturbation={perturbation!r} needs spatial inputs (B,C,...); use 'gaussian'.")
        delta = x - make_substrate(baseline, x, blur_sigma=blur_sigma).to(x.dtype)
        if perturbation == "square":
            n_runs = n_perturb

            def draw(r: int) -> Tensor:
                return delta * _square_masks(b, spatial, patch_size, g, x.device).unsqueeze(1)

        else:
            block, n_runs = _block_index(spatial, patch_size, x.device)

            def draw(r: int) -> Tensor:
                return delta * (block <= r).view(1, 1, *spatial)

    else:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS} or a tensor, got {perturbation!r}.")

    a_flat = a.flatten(1).to(x.dtype)
    a_dot = torch.empty(n_runs, b, dtype=torch.float64, device=x.device)
    # The rows x, x − I₀, x − I₁, … in run-major order, batch_size rows per call whatever the run
    # boundaries (the calls of the bare passes); each run's I is drawn once, in run order, so the random
    # stream does not depend on batch_size, and its IᵀA is taken when drawn.
    cur, drawn = x, -1  # the perturbations I of run `drawn`

    def fill(k: int, sm: slice, out: Tensor) -> None:  # k = 0: x itself; k > 0: x − I of run k − 1
        nonlocal cur, drawn
        if k == 0:
            out.copy_(x[sm])
            return
        if k - 1 != drawn:
            cur, drawn = draw(k - 1), k - 1
            a_dot[drawn] = torch.linalg.vecdot(cur.flatten(1), a_flat).double()
        torch.sub(x[sm], cur[sm], out=out)

    scores = flat_call_scores(model, x, target, n_runs + 1, output, batch_size, fill)
    fx = scores[:b]
    drops = fx.unsqueeze(0) - scores[b:].view(n_runs, b)
    if normalize:
        beta = (a_dot * drops).sum(0) / (a_dot * a_dot).sum(0).clamp_min(1e-30)
        a_dot = a_dot * beta.unsqueeze(0)
    return ((a_dot - drops) ** 2).mean(0)
