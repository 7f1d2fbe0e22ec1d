"""Area between the curves (ABC) for deletion / insertion tests of regression models.

Hama, Mase & Owen (2023), "Deletion and Insertion Tests in Regression Models", JMLR 24(290),
arXiv:2205.12423. With an anchored decomposition at the baseline c, the expected curve under a
uniformly random order is, for an additive f, the straight line between f(c) and f(x); ABC is the
signed area between the test curve and that line: insertion ∫ (curve − line), deletion
∫ (line − curve). Higher is better (0 = no better than a random order). Raw outputs are used
(regression values, or logits of classifiers).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..._internal.batching import BatchSize, resolve_batch_size
from ._guard import model_left_as_found
from ._utils import Substrate, Target, trapezoid
from .deletion import perturbation_curve

__all__ = ["abc"]


@model_left_as_found
def abc(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Target = None,
    *,
    mode: str = "insertion",
    baseline: Substrate = "zeros",
    n_steps: int = 32,
    step: int | float | None = None,
    features: str = "auto",
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    return_curve: bool = False,
    ties: str = "random",
    seed: int = 0,
    channels_first: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """ABC per sample (B,) for the ``mode`` test (``"insertion"`` or ``"deletion"``) from ``baseline`` c.

    Returns (B,), or ``(abc, curves (B, S), fractions (S,))`` with ``return_curve=True``.
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    curve, xs = perturbation_curve(
        model, inputs, attributions, target, mode=mode, substrate=baseline, n_steps=n_steps, step=step,
        features=features, output="logit", blur_sigma=blur_sigma, batch_size=batch_size, ties=ties, seed=seed,
        channels_first=channels_first,
    )  # fmt: skip
    t = xs.to(curve.dtype).unsqueeze(0)
    start, end = curve[:, :1], curve[:, -1:]
    line = start + t * (end - start)
    diff = curve - line if mode == "insertion" else line - curve
    score = trapezoid(diff, xs)
    return (score, curve, xs) if return_curve else score
