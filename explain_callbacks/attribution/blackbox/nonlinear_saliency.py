"""Nonlinear saliency (after Rosenzweig et al. 2021, "When saliency goes off on a tangent") — a
**reconstruction**.

The paper's own algorithm could not be read when this was written; this follows methods.md section 2:
plain saliency is the tangent (first-order) view; here the model's own steepest-descent path is
followed instead, and the map summarises that curved path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize
from ..._internal.registry import ATTRIBUTIONS
from ._common import PerturbationAttributor, grad_scores

__all__ = ["NonlinearSaliency"]

MAPS = ("secant", "path_integral", "displacement")


@ATTRIBUTIONS.register("nonlinear_saliency")
class NonlinearSaliency(PerturbationAttributor):
    """Saliency along the model's own steepest-descent flow (**reconstruction**).

    Follow ``dx/dt = −∇f_c/‖∇f_c‖`` from x in steps of length ``h = step_size · ‖x‖₂`` (√D when
    x = 0) until the predicted class changes (``stop_on_class_change``, multi-class models), f_c has
    fallen by ``drop · |f_c(x)|``, or ``max_steps`` were taken; each sample stops on its own. Three maps
    of the path x(0) → x(T) (``map=``):

    - ``secant`` (default): ``(x(0) − x(T)) · (f_c(x(0)) − f_c(x(T))) / ‖x(T) − x(0)‖²``, the slope of
      f_c along the chord of the path. On a linear model the path is straight along the gradient and
      this equals the plain saliency exactly (methods.md's oracle); on a curved model it is the
      finite-difference view that replaces the tangent.
    - ``path_integral``: ``∫ ∂_i f_c dx_i`` along the path (trapezoid rule), which sums to
      f_c(x(T)) − f_c(x(0)) (like IG, but on the model's own curved path; negative where features
      carried the class).
    - ``displacement``: x(T) − x(0).

    All three are also stored in ``last_info`` (with ``steps`` (B,) and ``output_change`` (B,)).

    Cost: ``steps + 1`` forward+backward passes per sample, at most ``max_steps + 1`` (51); only the
    samples still moving go through the model, in chunks of ``batch_size`` rows.
    Not differentiable.
    """

    passes = "grad"  # its model calls take input gradients (batch_size="auto" is measured so)

    name = "nonlinear_saliency"

    def __init__(
        self,
        step_size: float = 0.02,
        max_steps: int = 50,
        drop: float = 0.5,
        stop_on_class_change: bool = True,
        map: str = "secant",
        output: str = "logit",
        batch_size: BatchSize = "auto",
    ) -> None:
        super().__init__(output=output, budget=None, batch_size=batch_size, seed=0)
        if map not in MAPS:
            raise ValueError(f"map must be one of {MAPS}, got {map!r}.")
        if step_size <= 0 or max_steps < 1 or not 0 < drop <= 1:
            raise ValueError(
                f"need step_size > 0, max_steps >= 1, 0 < drop <= 1; got {step_size}, {max_steps}, {drop}."
            )
        self.step_size = step_size
        self.max_steps = max_steps
        self.drop = drop
        self.stop_on_class_change = stop_on_class_change
        self.map = map

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        return self.max_steps + 1

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        x0 = inputs.detach()
        b = x0.shape[0]
        flat0 = x0.reshape(b, -1)
        d = flat0.shape[1]
        norm = flat0.norm(dim=1)
        h = self.step_size * torch.where(norm > 0, norm, torch.full_like(norm, math.sqrt(d)))
        g, f0, pred0 = grad_scores(model, x0, target, self.output, self.batch_size, return_argmax=True)
        classify = self.stop_on_class_change and bool((pred0 >= 0).all())
        g = g.reshape(b, -1)
        # Outputs, written when a sample stops; the state of the samples still moving is kept compact
        # (re-indexed only on the steps where some sample stops).
        x, f = flat0.clone(), f0.clone()
        integral = torch.zeros_like(flat0)
        steps = torch.zeros(b, dtype=torch.long, device=x0.device)
        act = torch.arange(b, device=x0.device)
        xa, ga, fa, ia = flat0, g, f0, torch.zeros_like(flat0)
        gna = ga.norm(dim=1, keepdim=True)
        state = {
            "thr": f0 - self.drop * f0.abs(),
            "p0": pred0,
            "h": h.unsqueeze(1),
            "tgt": target,
        }
        done = gna.squeeze(1) <= 1e-12  # no gradient: nowhere to go
        for step in range(self.max_steps + 1):
            if step == self.max_steps:
                done = torch.ones_like(done)
            if bool(done.any()):
                fin = done.nonzero().squeeze(1)
                ids = act[fin]
                x[ids], f[ids], integral[ids], steps[ids] = xa[fin], fa[fin], ia[fin], step
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                act, xa, ga, gna, fa, ia = act[keep], xa[keep], ga[keep], gna[keep], fa[keep], ia[keep]
                state = {k: None if v is None else v[keep] for k, v in state.items()}
            dx = ga * (-state["h"] / gna)
            xa = xa + dx
            g_new, fa, pred = grad_scores(
                model, xa.reshape(-1, *x0.shape[1:]), state["tgt"], self.output, self.batch_size, return_argmax=True
            )
            g_new = g_new.reshape(act.numel(), -1)
            ia = ia.addcmul(ga + g_new, dx, value=0.5)  # trapezoid rule: ½ (g_k + g_k+1) · Δx
            ga = g_new
            gna = ga.norm(dim=1, keepdim=True)
            done = (fa <= state["thr"]) | (gna.squeeze(1) <= 1e-12)
            if classify:
                done = done | (pred != state["p0"])
        disp = x - flat0
        dist2 = disp.pow(2).sum(1, keepdim=True)
        secant = torch.where(dist2 > 0, -disp * (f0 - f).unsqueeze(1) / dist2.clamp_min(1e-30), torch.zeros_like(disp))
        shape = x0.shape
        self.last_info.update(
            secant=secant.reshape(shape),
            path_integral=integral.reshape(shape),
            displacement=disp.reshape(shape),
            steps=steps.cpu(),
            output_change=(f - f0).cpu(),
        )
        self.last_info["forwards"] = (steps + 1).cpu()
        return self.last_info[self.map]
