"""Deletion and insertion (Petsiuk, Das & Saenko 2018, RISE, arXiv:1806.07421) and their difference.

Features are ordered by the map (channel-summed per pixel for images), then removed (deletion:
replaced by a substrate, zeros by default) or revealed (insertion: starting from the substrate, a
blurred copy for images by default) ``step`` features at a time; the curve is the class probability (or logit)
after each step, its area is taken by the trapezoid rule on the fraction of features in [0, 1].
Insertion − deletion is the score of NeFLAG (Li et al. 2023).

``keep`` (B, n) restricts a sample's curve to some of its features (the real tokens of a padded text: the
padding is never removed nor revealed, stays as it is, and each sample's fractions count its own features).

Features of equal relevance are taken in a seeded random order (``ties="random"``, the default; a
stable raster order credited all-zero maps on centred digits with background-first deletion), or in
raster order (``ties="index"``). With ``features="element"``, ``step=1``, ``substrate="min"`` and
probabilities, ``curve[:, 1:]`` is Quantus' ``PixelFlipping`` curve (which omits the unperturbed point)
for maps without ties (NumPy's sort orders ties arbitrarily).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, resolve_batch_size
from ..._internal.layout import StepsLast
from ._guard import model_left_as_found
from ._utils import (
    Substrate,
    Target,
    expand_feature_mask,
    feature_relevance,
    flat_call_scores,
    is_layout_substrate,
    make_substrate,
    n_steps_of,
    prepare_target,
    rank_features,
    steps_last,
    transposed_sequence,
    trapezoid,
    validate,
)

__all__ = ["deletion", "insertion", "insertion_deletion", "perturbation_curve"]


@model_left_as_found
def perturbation_curve(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target,
    *,
    mode: str = "deletion",
    substrate: Substrate = "zeros",
    n_steps: int = 32,
    step: int | float | None = None,
    features: str = "auto",
    output: str = "probability",
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    ties: str = "random",
    seed: int = 0,
    channels_first: bool | None = None,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Deletion or insertion curves, (B, S) with S = steps + 1, and the fractions (S,) in [0, 1].

    Point k holds ``min(k * step, n)`` removed (deletion) or revealed (insertion) features; point 0 is
    the intact input (deletion) or the substrate (insertion). The ``S * B`` perturbed copies are built
    call by call, ``batch_size`` rows per model call (a call may end one step and start the next).

    Args:
        mode: ``"deletion"`` or ``"insertion"``.
        substrate: see :func:`~explain_callbacks.metrics.functional._utils.make_substrate`.
        n_steps: number of steps (ignored when ``step`` is given).
        step: features per step (int) or a fraction of the features (float in (0, 1]).
        features: ``"pixel"`` (channel-summed, images' default), ``"element"`` or ``"auto"``.
        output: ``"probability"`` (softmax at the target, RISE), ``"logit"``, or ``"sigmoid"`` (multi-label
            models and one-logit binary classifiers: the label's own probability).
        ties: order of equally relevant features: ``"random"`` (seeded by ``seed``; default) or
            ``"index"`` (raster order); see :func:`~explain_callbacks.metrics.functional._utils.rank_features`.
        channels_first: how 3-D inputs are read when a setting runs along positions (blur or mean substrates,
            ``features="pixel"``): None decides from the model's first layer (a recurrent, attention or
            linear layer reads (B,T,D) sequences: positions are the T steps), True (B,C,L), False (B,T,D).
        keep: (B, n) bool over the features (n as ranked: positions for ``"pixel"``, elements otherwise), or None
            (all). Features outside it keep their input value at every point; sample i's point k holds
            ``ceil(k · n_i / S)`` of its ``n_i`` kept features removed (revealed), so every curve spans its own
            features and the fractions are ``k / S`` (S = the number of steps of ``n`` features).
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}.")
    validate(inputs, attributions)
    if steps_last(model, inputs, channels_first, is_layout_substrate(substrate) or features == "pixel"):
        return perturbation_curve(
            StepsLast(model), inputs.transpose(1, 2), transposed_sequence(attributions, inputs), target, mode=mode,
            substrate=transposed_sequence(substrate, inputs) if isinstance(substrate, Tensor) else substrate,
            n_steps=n_steps, step=step, features=features, output=output, blur_sigma=blur_sigma,
            batch_size=batch_size, ties=ties, seed=seed, channels_first=True, keep=keep,
        )  # fmt: skip
    target = prepare_target(model, inputs, target)
    validate(inputs, None, target)  # the map was checked above
    x = inputs.detach()
    rel, fmode = feature_relevance(attributions, x, features)
    b, n = rel.shape
    step_, n_st = n_steps_of(n, n_steps, step)
    counts = (torch.arange(n_st + 1, device=x.device) * step_).clamp_max(n)
    fractions = counts.to(torch.float64) / n
    sub = make_substrate(substrate, x, blur_sigma=blur_sigma).to(x.dtype)
    if keep is None:
        ranks = rank_features(rel, ties, seed)
        # the step from which each feature is removed (deletion) / revealed (insertion): rank // step + 1
        steps = ranks // step_ + 1
    else:
        steps, fractions = _kept_steps(rel, keep, n_st, mode, ties, seed)
    first_step = expand_feature_mask(steps.to(torch.int32), x.shape, fmode)
    kept, other = (x, sub) if mode == "deletion" else (sub, x)

    def fill(step_k: int, sm: slice, out: Tensor) -> None:
        torch.where(first_step[sm] <= step_k, other[sm], kept[sm], out=out)

    def fill_runs(ks: slice, out: Tensor) -> None:  # the points ks of every sample in one selection
        k = torch.arange(ks.start, ks.stop, device=x.device, dtype=torch.int32).view(-1, *[1] * x.ndim)
        torch.where(first_step.unsqueeze(0) <= k, other, kept, out=out)

    scores = flat_call_scores(model, x, target, n_st + 1, output, batch_size, fill, fill_runs)
    return scores.view(n_st + 1, b).T.contiguous(), fractions


def _kept_steps(rel: Tensor, keep: Tensor, n_st: int, mode: str, ties: str, seed: int) -> tuple[Tensor, Tensor]:
    """The first step of each feature when only ``keep`` takes part, and the fractions ``k / n_st``: kept features
    are ranked among themselves (the others after them), sample i's feature of rank r goes at step
    ``floor(r · n_st / n_i) + 1``; the others never (deletion: step n_st + 1) or from the start (insertion: step 0),
    so they hold their input value at every point."""
    b, n = rel.shape
    keep = keep.to(rel.device).reshape(b, -1).bool()
    if keep.shape[1] != n:
        raise ValueError(
            f"keep has {keep.shape[1]} features per sample, the map {n} (features='pixel' ranks positions, "
            "'element' every element)."
        )
    # kept features first: the others below every kept one (a finite value: the sort takes float keys)
    low = rel.detach().min() - 1
    ranks = rank_features(torch.where(keep, rel.detach(), low), ties, seed)
    n_i = keep.sum(1, keepdim=True).clamp_min(1)
    steps = torch.div(ranks * n_st, n_i, rounding_mode="floor") + 1
    steps = torch.where(keep, steps, torch.full_like(steps, n_st + 1 if mode == "deletion" else 0))
    return steps, torch.arange(n_st + 1, dtype=torch.float64, device=rel.device) / n_st


@model_left_as_found
def deletion(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target,
    *,
    substrate: Substrate = "zeros",
    n_steps: int = 32,
    step: int | float | None = None,
    features: str = "auto",
    output: str = "probability",
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    return_curve: bool = False,
    ties: str = "random",
    seed: int = 0,
    channels_first: bool | None = None,
    keep: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Deletion AUC per sample (lower is better): the most relevant features are removed first.

    Returns (B,), or ``(auc, curves (B, S), fractions (S,))`` with ``return_curve=True``. ``keep``: see
    :func:`perturbation_curve`.
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    curve, xs = perturbation_curve(
        model, inputs, attributions, target, mode="deletion", substrate=substrate, n_steps=n_steps, step=step,
        features=features, output=output, blur_sigma=blur_sigma, batch_size=batch_size, ties=ties, seed=seed,
        channels_first=channels_first, keep=keep,
    )  # fmt: skip
    auc = trapezoid(curve, xs)
    return (auc, curve, xs) if return_curve else auc


@model_left_as_found
def insertion(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target,
    *,
    substrate: Substrate = "auto",
    n_steps: int = 32,
    step: int | float | None = None,
    features: str = "auto",
    output: str = "probability",
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    return_curve: bool = False,
    ties: str = "random",
    seed: int = 0,
    channels_first: bool | None = None,
    keep: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Insertion AUC per sample (higher is better): the most relevant features are revealed first,
    starting from the substrate (``"auto"``: a blurred copy for images, as RISE; zeros otherwise). Returns as
    :func:`deletion`."""
    batch_size = resolve_batch_size(batch_size, model, inputs)
    curve, xs = perturbation_curve(
        model, inputs, attributions, target, mode="insertion", substrate=substrate, n_steps=n_steps, step=step,
        features=features, output=output, blur_sigma=blur_sigma, batch_size=batch_size, ties=ties, seed=seed,
        channels_first=channels_first, keep=keep,
    )  # fmt: skip
    auc = trapezoid(curve, xs)
    return (auc, curve, xs) if return_curve else auc


@model_left_as_found
def insertion_deletion(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target,
    *,
    deletion_substrate: Substrate = "zeros",
    insertion_substrate: Substrate = "auto",
    n_steps: int = 32,
    step: int | float | None = None,
    features: str = "auto",
    output: str = "probability",
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    ties: str = "random",
    seed: int = 0,
    channels_first: bool | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """Insertion AUC − deletion AUC per sample (higher is better; NeFLAG's summary score)."""
    batch_size = resolve_batch_size(batch_size, model, inputs)
    kw = dict(n_steps=n_steps, step=step, features=features, output=output, blur_sigma=blur_sigma,
              batch_size=batch_size, ties=ties, seed=seed, channels_first=channels_first, keep=keep)  # fmt: skip
    ins = insertion(model, inputs, attributions, target, substrate=insertion_substrate, **kw)
    dele = deletion(model, inputs, attributions, target, substrate=deletion_substrate, **kw)
    return ins - dele
