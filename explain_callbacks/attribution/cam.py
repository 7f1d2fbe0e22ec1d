"""Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._internal.batching import BatchSize, chunks, grad_of_selected, twice_differentiable
from .._internal.checks import not_differentiable
from .._internal.ops import upsample_to
from .._internal.registry import ATTRIBUTIONS
from .base import Attributor
from .layers import capture_output, captured, find_layer, last_conv_layer

__all__ = ["GradCAM"]


@ATTRIBUTIONS.register("gradcam", "grad_cam")
class GradCAM(Attributor):
    """ReLU(Σ_k w_k A_k) with w_k the spatial mean of ∂f_c/∂A_k at a convolution layer.

    Args:
        layer: module or its name; default the last convolution of the model.
        relu: apply the ReLU of the paper (Captum's ``relu_attributions``).
        upsample: resize the map to the input's spatial size (bilinear). The map has one channel,
            shape (B, 1, *spatial): it broadcasts over the input's channels.
    """

    name = "gradcam"
    input_shaped = True

    def __init__(
        self,
        layer: str | nn.Module | None = None,
        relu: bool = True,
        upsample: bool = True,
        batch_size: BatchSize = "auto",
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.layer = layer
        self.relu = relu
        self.upsample = upsample

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        if inputs.ndim < 3:
            raise ValueError(
                f"Grad-CAM needs spatial inputs (B,C,L) or (B,C,H,W), got {tuple(inputs.shape)}; "
                "use saliency or ig for tabular data."
            )
        layer = last_conv_layer(model) if self.layer is None else find_layer(model, self.layer)
        maps = []
        for sl in chunks(inputs.shape[0], self.batch_size):
            store: list[Tensor] = []
            whole = sl.start == 0 and sl.stop == inputs.shape[0]
            xc = inputs if whole else inputs[sl]
            # the layer's output enters the graph there (leaf=True): with frozen parameters and an input
            # without grad, nothing before the layer is recorded (Captum's LayerGradCam does the same)
            with capture_output(layer, store, leaf=True), twice_differentiable(create_graph):
                out = model(xc)
            act = captured(store, layer)
            if act.ndim != inputs.ndim:
                raise ValueError(
                    f"Grad-CAM needs a layer with spatial activations like the input's (B,C,*spatial); layer "
                    f"{type(layer).__name__} gives shape {tuple(act.shape)}. Pick a convolutional layer "
                    "(layer=None takes the last convolution)."
                )
            tc = None if target is None else (target if whole else target[sl])
            g, _ = grad_of_selected(out, tc, act, create_graph=create_graph)
            if g is None:
                raise not_differentiable(f"layer {type(layer).__name__}'s output")
            w = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
            cam = (w * act).sum(1, keepdim=True)
            if self.relu:
                cam = F.relu(cam)
            if self.upsample:
                cam = upsample_to(cam, tuple(inputs.shape[2:]))
            maps.append(cam if create_graph else cam.detach())  # no forward graph kept past the call
        return maps[0] if len(maps) == 1 else torch.cat(maps)
