"""Fragility of the maps under an adversarial perturbation that keeps the prediction (Ghorbani, Abid & Zou
2019, "Interpretation of neural networks is fragile", AAAI), per sample.

The iterative feature-importance attack (:func:`~explain_callbacks.analysis.fragility_attack`) moves x inside
the L∞ ball of radius ε, keeping the predicted label, so that the map changes most; the map of x̃ is then
compared with the map of x: share of the top-k features kept (top-k intersection, higher is more robust),
Spearman rank correlation of the importances (higher is more robust) and shift of the centre of mass in
pixels/positions (lower is more robust). ``objective="random"``: one random sign perturbation of the same
ε, the reference an attack is judged against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._guard import model_left_as_found
from ._utils import Target, check_finite_map, method_inputs, prepare_target, validate

__all__ = ["fragility"]


@model_left_as_found
def fragility(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    method: Callable[..., Tensor] | str,
    attributions: Tensor | None = None,
    *,
    objective: str = "topk",
    epsilon: float = 8 / 255,
    steps: int = 10,
    step_size: float | None = None,
    top_k: int | float = 0.05,
    softplus_beta: float | None = 10.0,
    clamp: tuple[float, float] | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k intersection, Spearman correlation, centre-of-mass shift), each (B,) float64.

    Args:
        method: a differentiable attribution method (an Attributor, or a registered name); the attack
            differentiates its map with ``create_graph=True``.
        attributions: the method's maps at ``inputs`` (saves one call).
        objective: ``"topk"`` | ``"mass_centre"`` | ``"random"`` (see :func:`fragility_attack`).
        epsilon: L∞ budget, in input units. steps: signed-gradient steps (each: one double-backward and
            one scoring pass of the method). top_k: k as a count or a share of the features.
        softplus_beta: ReLU → softplus(β) for the attack direction (Ghorbani et al.'s surrogate of
            the ReLU network's zero second derivative); the scored maps use the network as is.
        clamp: valid input range kept by x̃; None (default here: inputs of a monitor are often
            normalised) leaves it unbounded.

    A sample for which no step kept the label scores as unchanged (intersection 1, correlation 1,
    shift 0), as the attack then returns x itself.
    """
    from ...analysis.attack import fragility_attack  # analysis imports the metrics' helpers

    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0 (the L∞ budget), got {epsilon}.")
    tgt = prepare_target(model, inputs, target)
    validate(inputs, None, tgt)
    x = method_inputs(inputs)
    if attributions is not None:
        if attributions.shape[0] != x.shape[0]:
            raise ValueError(f"attributions have {attributions.shape[0]} samples, inputs {x.shape[0]}.")
        check_finite_map(attributions)
    res = fragility_attack(
        model, x, tgt, method, objective=objective, epsilon=epsilon, steps=steps, step_size=step_size,
        top_k=top_k, softplus_beta=softplus_beta, clamp=clamp, seed=seed, attributions=attributions,
    )  # fmt: skip
    return (
        res.topk_intersection.to(torch.float64),
        res.spearman.to(torch.float64),
        res.mass_centre_shift.to(torch.float64),
    )
