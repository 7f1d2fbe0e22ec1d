"""How fragile are the maps? The iterative feature-importance attack of Ghorbani, Abid & Zou 2019
("Interpretation of neural networks is fragile", AAAI).

An input x is moved inside the L∞ ball ‖x̃ − x‖∞ ≤ ε by signed-gradient steps that keep the predicted
label but change the map: the *top-k* attack lowers the share of the map's mass on the k features
that were most important for x, the *mass-centre* attack moves the map's centre of mass away. The
map of x̃ is then compared with the map of x (top-k intersection, Spearman rank correlation,
centre-of-mass shift); a random sign perturbation of the same size is the reference. For ReLU
networks the gradient of a gradient map w.r.t. the input is zero almost everywhere, so, as in the
paper, the attack direction is computed with every ReLU evaluated as softplus(β·) (the maps that are
scored use the real network). The same substitution is the defence of Dombrowski et al. 2019
(explanations of a softplus-β network are smoother): the gradient and path methods take ``beta=``.

:func:`manipulation_attack` is the *targeted* attack of Dombrowski, Alber, Anders, Ackermann, Müller &
Kessel 2019 ("Explanations can be manipulated and geometry is to blame", NeurIPS): x̃ is moved so that
its map h(x̃) approaches a chosen target map h_t while the output g stays fixed, minimising
``‖h(x̃) − h_t‖² + γ ‖g(x̃) − g(x)‖²`` inside the L∞ ball, with the same softplus-β surrogate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._internal.guard import model_guard
from .._internal.ops import rankdata, spearman_to
from .._internal.outputs import read_scores
from .._internal.softplus import flush_denormals, relu_as_softplus
from .._internal.targets import as_target_tensor
from ..attribution import build_attributor
from ..attribution.base import Attributor

__all__ = ["FragilityResult", "ManipulationResult", "fragility_attack", "manipulation_attack"]


@dataclass
class FragilityResult:
    """Per-sample outcome of :func:`fragility_attack`.

    Attributes:
        adversarial: the perturbed inputs x̃ (x where no step kept the label).
        topk_intersection: share of the k most important features of x still among the k of x̃ (B,).
        spearman: rank correlation of the two importance maps (B,).
        mass_centre_shift: distance between the maps' centres of mass, in pixels/positions (B,).
        found: whether a perturbed input that keeps the prediction of x was found (else x̃ = x).
    """

    adversarial: Tensor
    topk_intersection: Tensor
    spearman: Tensor
    mass_centre_shift: Tensor
    found: Tensor


def _importance(maps: Tensor) -> Tensor:
    """Per-feature importance (B, *spatial): |A| summed over channels for images/sequences."""
    a = maps.abs()
    return a.sum(1) if a.ndim >= 3 else a


def _centre(imp: Tensor) -> Tensor:
    """Centre of mass (B, n_spatial_dims) of non-negative maps (B, *spatial)."""
    total = imp.flatten(1).sum(1).clamp_min(1e-12)
    coords = []
    for d in range(1, imp.ndim):
        pos = torch.arange(imp.shape[d], dtype=imp.dtype, device=imp.device)
        other = [i for i in range(1, imp.ndim) if i != d]
        marginal = imp.sum(other) if other else imp
        coords.append((marginal * pos).sum(1) / total)
    return torch.stack(coords, 1)


def _box(x: Tensor, epsilon: float, clamp: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """Per-element bounds (lo, hi) of the L∞ ball around x intersected with ``clamp``: clamping to them
    equals clamping to the ball, then to ``clamp`` (clamps compose: clamp(clamp(v, a, b), c, d) =
    clamp(v, clamp(a, c, d), clamp(b, c, d)) for a <= b, c <= d)."""
    lo, hi = x - epsilon, x + epsilon
    if clamp is not None:
        lo, hi = lo.clamp(*clamp), hi.clamp(*clamp)
    return lo, hi


def _input_grad(loss: Tensor, xg: Tensor) -> Tensor:
    """∂loss/∂x, zero where the map does not depend on the input (a linear model's gradient map is constant:
    nothing to attack, the candidates equal x)."""
    if not loss.requires_grad:
        return torch.zeros_like(xg)
    (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
    return torch.zeros_like(xg) if grad is None else grad


def _topk_mask(imp: Tensor, k: int) -> Tensor:
    flat = imp.flatten(1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(k, dim=1).indices, True)
    return mask


def fragility_attack(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | int | None = None,
    method: str | Attributor = "saliency",
    *,
    objective: str = "topk",
    epsilon: float = 8 / 255,
    steps: int = 30,
    step_size: float | None = None,
    top_k: int | float = 0.05,
    softplus_beta: float | None = 10.0,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    attributions: Tensor | None = None,
) -> FragilityResult:
    """Attack the maps of ``method`` on ``inputs`` (Ghorbani et al. 2019, Algorithm 1), batched.

    Args:
        method: a differentiable attribution method (short name or instance); saliency by default.
        objective: ``"topk"`` (lower the original top-k features' share), ``"mass_centre"`` (move the
            centre of mass) or ``"random"`` (one random sign perturbation of size ε: the reference).
        epsilon: L∞ radius. steps: signed-gradient steps; step_size: default ε/steps·2.
        top_k: k as a count or as a share of the features (default 5 %).
        softplus_beta: ReLU → softplus(β) for the attack direction only (None: the network as is).
        clamp: valid input range kept by x̃ (None: unbounded).
        target: the explained class; default (None) the model's prediction on ``inputs``.
        attributions: the method's maps at ``inputs`` if already computed (saves one call).

    Every step's candidate is scored with the real network; per sample the candidate that keeps the
    label and has the smallest top-k intersection (top-k objective) or the largest centre shift is
    kept. Model state and the global RNG are left as they were.
    """
    if objective not in ("topk", "mass_centre", "random"):
        raise ValueError(f"objective must be 'topk', 'mass_centre' or 'random', got {objective!r}.")
    attributor = build_attributor(method) if isinstance(method, str) else method
    if not getattr(attributor, "differentiable", False) and objective != "random":
        raise ValueError(f"{type(attributor).__name__} is not differentiable; the attack needs a gradient method.")
    step_size = 2 * epsilon / max(steps, 1) if step_size is None else step_size
    with model_guard(model):
        x = inputs.detach()
        with torch.no_grad():
            label = read_scores(model(x)).argmax(1)
        tgt = label if target is None else as_target_tensor(target, x.shape[0], x.device)
        a0 = attributor(model, x, tgt) if attributions is None else attributions.to(x.device)
        imp0 = _importance(a0.detach())
        n_feat = imp0[0].numel()
        k = max(1, min(n_feat, round(top_k * n_feat) if isinstance(top_k, float) else int(top_k)))
        flat0 = imp0.flatten(1)
        top0 = _topk_mask(imp0, k)
        centre0 = _centre(imp0)
        lo, hi = _box(x, epsilon, clamp)

        def project(xa: Tensor) -> Tensor:
            # clamp(clamp(v, x - ε, x + ε), c0, c1) = clamp(v, clamp(x - ε, c0, c1), clamp(x + ε, c0, c1)): one op
            return torch.clamp(xa, lo, hi)

        def scored(xa: Tensor) -> tuple[Tensor, Tensor]:
            """(importance map of x̃ flattened (B, N), whether x̃ keeps the output)."""
            flat = _importance(attributor(model, xa, tgt).detach()).flatten(1)
            with torch.no_grad():
                # the output kept: the same class, or for a dense output (segmentation) the same class at every
                # output position
                kept = (read_scores(model(xa)).argmax(1) == label).reshape(xa.shape[0], -1).all(1)
            return flat, kept

        def intersection(flat: Tensor) -> Tensor:
            """Share of x's top-k features among the top-k of each row of ``flat``."""
            return top0.gather(1, flat.topk(k, dim=1).indices).sum(1).to(x.dtype) / k

        def shift_of(flat: Tensor) -> Tensor:
            return (_centre(flat.view(imp0.shape)) - centre0).norm(dim=1)

        def outcome(flat: Tensor, kept: Tensor, inter: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
            """(intersection, Spearman, shift) of the maps ``flat``; a sample whose output was not kept scores
            as unchanged (1, 1, 0). The ranks of x's map are computed once (each map is ranked alone,
            ops.spearman_to)."""
            r0 = rankdata(flat0).sub_((n_feat + 1) / 2)
            rho = spearman_to(r0, torch.linalg.vecdot(r0, r0), flat).to(x.dtype)
            inter = intersection(flat) if inter is None else inter
            one = torch.ones_like(inter)
            return (
                torch.where(kept, inter, one), torch.where(kept, rho, one),
                torch.where(kept, shift_of(flat), torch.zeros_like(inter)),
            )  # fmt: skip

        if objective == "random":
            g = torch.Generator(device=x.device).manual_seed(seed)
            sign = torch.randint(0, 2, x.shape, generator=g, device=x.device).to(x.dtype) * 2 - 1
            best = project(x + epsilon * sign)
            flat, kept = scored(best)
            best = torch.where(kept.view(-1, *[1] * (x.ndim - 1)), best, x)
            return FragilityResult(best, *outcome(flat, kept), kept)

        # Per step only what picks the best candidate is computed (its top-k intersection, or its centre shift);
        # the Spearman correlation and the other scores of the kept candidates once, after the last step.
        best = x.clone()
        best_flat = flat0.clone()
        best_score = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)  # intersection, or -shift
        if objective == "mass_centre":
            best_score.zero_()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        top0_w = top0.to(flat0.dtype)
        xa = x.clone()
        for _ in range(steps):
            xg = xa.detach().requires_grad_(True)
            with relu_as_softplus(softplus_beta):  # the attack direction on the softplus network
                maps = attributor(model, xg, tgt, create_graph=True)
            # the loss and the double backward outside the function mode (it dispatches every tensor op and
            # attribute read through Python), with subnormals flushed as inside it
            with flush_denormals() if softplus_beta is not None else contextlib.nullcontext():
                imp = _importance(maps).flatten(1)
                if objective == "topk":  # lower the share of the original top-k features
                    share = (imp * top0_w).sum(1) / imp.sum(1).clamp_min(1e-12)
                    loss = -share.sum()
                else:
                    loss = (_centre(imp.view(imp0.shape)) - centre0).norm(dim=1).sum()
                grad = _input_grad(loss, xg)
            xa = project(xa.add(grad.sign(), alpha=step_size))  # = xa + step_size·sign: the product is exact
            flat, kept = scored(xa)
            score = intersection(flat) if objective == "topk" else -shift_of(flat)
            better = kept & (score < best_score)
            best = torch.where(better.view(-1, *[1] * (x.ndim - 1)), xa, best)
            best_flat = torch.where(better.view(-1, 1), flat, best_flat)
            best_score = torch.where(better, score, best_score)
            found |= better
        best_inter, best_rho, best_shift = outcome(
            best_flat, found, best_score if objective == "topk" else None
        )  # fmt: skip
    return FragilityResult(best.detach(), best_inter, best_rho, best_shift, found)


@dataclass
class ManipulationResult:
    """Per-sample outcome of :func:`manipulation_attack`.

    Attributes:
        adversarial: the perturbed inputs x̃ (x where no step kept the label).
        distance_before: ‖h(x) − h_t‖² of the unit-sum importance maps (B,).
        distance_after: ‖h(x̃) − h_t‖², measured on the real network (B,).
        output_change: max over classes of |p(x̃) − p(x)| (softmax probabilities) (B,).
        found: whether a perturbed input keeping the prediction and nearer the target was found.
    """

    adversarial: Tensor
    distance_before: Tensor
    distance_after: Tensor
    output_change: Tensor
    found: Tensor


def _unit(imp: Tensor) -> Tensor:
    """Importance maps flattened (B, N) and scaled to unit sum (Dombrowski et al. compare normalised maps)."""
    flat = imp.flatten(1)
    return flat / flat.sum(1, keepdim=True).clamp_min(1e-12)


def manipulation_attack(
    model: nn.Module,
    inputs: Tensor,
    target_maps: Tensor,
    target: Tensor | int | None = None,
    method: str | Attributor = "saliency",
    *,
    epsilon: float = 8 / 255,
    steps: int = 100,
    step_size: float | None = None,
    gamma: float = 10.0,
    softplus_beta: float | None = 10.0,
    clamp: tuple[float, float] | None = (0.0, 1.0),
) -> ManipulationResult:
    """Move the maps of ``method`` towards ``target_maps`` with the output kept (Dombrowski et al. 2019).

    Minimises ``L = ‖h(x̃) − h_t‖² + γ ‖g(x̃) − g(x)‖²`` by signed-gradient steps projected on the L∞
    ball ‖x̃ − x‖∞ ≤ ε (and ``clamp``), where h is the importance map (|A| summed over channels, scaled
    to unit sum, so the scale of h_t does not matter), g the softmax probabilities. The gradient of L
    needs the map's derivative w.r.t. the input, zero almost everywhere for ReLU networks: every ReLU is
    evaluated as softplus(β) for the attack direction (``softplus_beta``, the paper's surrogate; None:
    the network as is), while every candidate is scored on the real network; per sample the candidate
    that keeps the predicted label and is nearest the target is returned.

    Args:
        target_maps: the maps h_t to approach, (B, *map) or one map (*map) for every sample, in the shape
            of the method's importance map (channels summed) or of its attributions (summed here).
        gamma: weight of the output term (larger keeps the probabilities closer).
        step_size: default 2ε/steps·4 (signed steps; the ball is reached in a quarter of the steps).

    Model state and the global RNG are left as they were.
    """
    attributor = build_attributor(method) if isinstance(method, str) else method
    if not getattr(attributor, "differentiable", False):
        raise ValueError(f"{type(attributor).__name__} is not differentiable; the attack needs a gradient method.")
    step_size = 8 * epsilon / max(steps, 1) if step_size is None else step_size
    with model_guard(model):
        x = inputs.detach()
        with torch.no_grad():
            p0 = torch.softmax(read_scores(model(x)).float(), 1)
        label = p0.argmax(1)
        tgt = label if target is None else as_target_tensor(target, x.shape[0], x.device)
        imp0 = _importance(attributor(model, x, tgt).detach())
        ht = target_maps.detach().to(device=x.device, dtype=imp0.dtype)
        b, n = imp0.shape[0], imp0[0].numel()
        if ht.numel() == n:  # one map for every sample
            ht = ht.reshape(1, n).expand(b, n)
        elif ht.numel() == b * n:
            ht = ht.reshape(b, n)
        elif ht.ndim >= 3 and ht.shape[0] == b and _importance(ht)[0].numel() == n:  # attributions: sum channels
            ht = _importance(ht).reshape(b, n)
        else:
            raise ValueError(
                f"target_maps of shape {tuple(target_maps.shape)} do not match the method's importance maps "
                f"{tuple(imp0.shape)} (or its attributions); pass (B, *map) or one map for every sample."
            )
        ht = _unit(ht.abs())  # (B, N)

        def distance(imp: Tensor) -> Tensor:
            return (_unit(imp) - ht).pow(2).sum(1)

        def project(xa: Tensor) -> Tensor:
            xa = torch.maximum(torch.minimum(xa, x + epsilon), x - epsilon)
            return xa.clamp(*clamp) if clamp is not None else xa

        d0 = distance(imp0)
        best, best_d = x.clone(), d0.clone()
        best_change = torch.zeros_like(d0)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        xa = x.clone()
        for _ in range(steps):
            xg = xa.detach().requires_grad_(True)
            with relu_as_softplus(softplus_beta):
                imp = _importance(attributor(model, xg, tgt, create_graph=True))
                p = torch.softmax(read_scores(model(xg)).float(), 1)
            loss = distance(imp).sum() + gamma * (p - p0).pow(2).sum()
            grad = _input_grad(loss, xg)
            xa = project(xa - step_size * grad.sign())
            imp = _importance(attributor(model, xa, tgt).detach())
            with torch.no_grad():
                pa = torch.softmax(read_scores(model(xa)).float(), 1)
            d = distance(imp)
            better = (pa.argmax(1) == label) & (d < best_d)
            best = torch.where(better.view(-1, *[1] * (x.ndim - 1)), xa, best)
            best_d = torch.where(better, d, best_d)
            best_change = torch.where(better, (pa - p0).abs().amax(1).to(best_change.dtype), best_change)
            found |= better
    return ManipulationResult(best.detach(), d0, best_d, best_change, found)
