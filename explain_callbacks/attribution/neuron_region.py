"""Neuron-to-region Integrated Gradients (Lundstrom, Huang & Razaviyayn 2022, arXiv:2202.11912).

For f = g ∘ h with h a hidden layer and S a region of the input, the share of neuron j in the IG of
region S along the straight path γ(α) = x' + α(x − x') is

    IG_{S,j} = ∫₀¹ ∂g/∂h_j(h(γ(α))) · [J_h(γ(α)) · ((x − x') ⊙ 1_S)]_j dα,

and Σ_j IG_{S,j} = Σ_{i∈S} IG_i. The Jacobian-vector product comes from forward-mode AD (one dual
forward up to the layer per step); ∂g/∂h from one reverse pass.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .._internal.batching import BatchSize, select_output, steps_per_call
from .._internal.registry import ATTRIBUTIONS
from .base import Attributor
from .layers import _Stop, capture_output, captured, find_layer
from .path import Baseline, make_baseline, quadrature

__all__ = ["NeuronRegionIG"]


@ATTRIBUTIONS.register("neuron_region_ig", "neuron_ig")
class NeuronRegionIG(Attributor):
    """Each neuron's share of the IG of an input region.

    Args:
        layer: the hidden layer h (module or name).
        region: boolean mask broadcastable to the input (the region S); ``None`` = the whole input.

    Returns a tensor of the layer's output shape (B, *h_shape), not the input's shape.
    """

    name = "neuron_region_ig"
    input_shaped = False

    def __init__(
        self,
        layer: str | nn.Module,
        region: Tensor | None = None,
        n_steps: int = 32,
        rule: str = "gausslegendre",
        baseline: Baseline = "zeros",
        batch_size: BatchSize = "auto",
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.layer = layer
        self.region = region
        self.n_steps = n_steps
        self.rule = rule
        self.baseline = baseline

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        layer = find_layer(model, self.layer)
        base = make_baseline(self.baseline, inputs, model=model)  # mean/blur along the positions
        mask = (
            torch.ones_like(inputs)
            if self.region is None
            else self.region.to(inputs.device, inputs.dtype).expand_as(inputs)
        )
        direction = (inputs - base) * mask
        alphas, weights = quadrature(self.n_steps, self.rule)
        b = inputs.shape[0]
        per_call = steps_per_call(self.batch_size, b, self.n_steps)
        total: Tensor | None = None
        for s in range(0, self.n_steps, per_call):
            a = alphas[s : s + per_call].to(inputs.device, inputs.dtype)
            w = weights[s : s + per_call].to(inputs.device, inputs.dtype)
            k = a.numel()
            shape = (k,) + (1,) * inputs.ndim
            pts = (base.unsqueeze(0) + a.view(shape) * (inputs - base).unsqueeze(0)).reshape(k * b, *inputs.shape[1:])
            tangent = direction.unsqueeze(0).expand(k, *inputs.shape).reshape(k * b, *inputs.shape[1:])
            jvp = self._layer_jvp(model, layer, pts, tangent, keep_graph=create_graph)
            store: list[Tensor] = []
            pts_g = pts if create_graph and pts.requires_grad else pts.detach().requires_grad_(True)
            with capture_output(layer, store):
                y = select_output(model(pts_g), None if target is None else target.repeat(k))
            (dg_dh,) = torch.autograd.grad(y.sum(), captured(store, layer), create_graph=create_graph)
            contrib = (dg_dh * jvp).view(k, b, *jvp.shape[1:])
            contrib = (w.view((k,) + (1,) * (contrib.ndim - 1)) * contrib).sum(0)
            total = contrib if total is None else total + contrib
        assert total is not None
        return total

    @staticmethod
    def _layer_jvp(model: nn.Module, layer: nn.Module, x: Tensor, v: Tensor, keep_graph: bool = False) -> Tensor:
        """J_h(x)·v by forward-mode AD. With ``keep_graph`` the tangent stays a function of the
        parameters (reverse-over-forward), so penalties on the map get a parameter gradient."""
        store: list[Tensor] = []
        try:
            with fwAD.dual_level():
                dual = fwAD.make_dual(x if keep_graph else x.detach(), v if keep_graph else v.detach())
                with capture_output(layer, store, stop=True), contextlib.suppress(_Stop):
                    model(dual)
                if not store:
                    raise RuntimeError("The chosen layer was not called in the forward pass; pick a layer on the path.")
                tangent = fwAD.unpack_dual(store[-1]).tangent
        except NotImplementedError:  # an operation without forward-mode AD (e.g. nn.LSTM/GRU on CPU)
            return NeuronRegionIG._layer_jvp_double_vjp(model, layer, x, v, keep_graph)
        if tangent is None:
            return torch.zeros_like(store[-1])
        return tangent if keep_graph else tangent.detach()

    @staticmethod
    def _layer_jvp_double_vjp(model: nn.Module, layer: nn.Module, x: Tensor, v: Tensor, keep_graph: bool) -> Tensor:
        """J_h(x)·v as ∂/∂u ⟨Jᵀu, v⟩ (two reverse passes), for layers whose operations have no
        forward-mode derivative; the same value as the forward-mode JVP."""
        store: list[Tensor] = []
        xg = x if keep_graph and x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            with capture_output(layer, store, stop=True), contextlib.suppress(_Stop):
                model(xg)
            if not store:
                raise RuntimeError("The chosen layer was not called in the forward pass; pick a layer on the path.")
            h = store[-1]
            if not h.requires_grad:
                return torch.zeros_like(h)
            u = torch.zeros_like(h, requires_grad=True)
            (g,) = torch.autograd.grad(h, xg, u, create_graph=True, allow_unused=True)
            if g is None or not g.requires_grad:
                return torch.zeros_like(h)
            (jv,) = torch.autograd.grad(g, u, v, create_graph=keep_graph, allow_unused=True)
        if jv is None:
            return torch.zeros_like(h)
        return jv if keep_graph else jv.detach()
