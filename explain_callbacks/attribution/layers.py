"""Finding and hooking layers by name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["capture_output", "captured", "find_layer", "last_conv_layer"]


def find_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n][:20]
        raise KeyError(f"No layer named {layer!r} in {type(model).__name__}; some names: {names}.")
    return modules[layer]


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The last Conv1d/Conv2d/Conv3d registered in ``model`` (the usual Grad-CAM layer)."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError(
            f"{type(model).__name__} has no convolution layer, so Grad-CAM has nothing to look at; "
            "pass layer='<module name>' or use a gradient method (saliency, ig) instead."
        )
    return convs[-1]


class _Stop(Exception):
    pass


@contextmanager
def capture_output(module: nn.Module, store: list[Tensor], stop: bool = False, *, leaf: bool = False) -> Iterator[None]:
    """Forward hook appending ``module``'s output to ``store`` (raising ``_Stop`` after if ``stop``).

    ``leaf``: the stored tensor is the layer's output as the layer returned it, and the forward goes on
    from a copy (as Captum's layer methods do): an in-place operation after the layer (a VGG's
    ``ReLU(inplace=True)``) changes the copy, not the stored activations, and gradients w.r.t. the stored
    tensor flow through the copy. When grad mode is on and the output is outside the autograd graph
    (nothing before the layer requires grad: frozen parameters and an input without grad, as inside the
    model guard), the stored tensor is a detached leaf that requires grad (the same storage), so autograd
    records the network from the layer on only; without it the input must require grad and the forward
    records every layer before this one for nothing (a small ResNet's Grad-CAM: ~20 % of the call). An
    output already in the graph keeps it, so maps built with ``create_graph`` stay differentiable w.r.t.
    whatever required grad."""

    def hook(_m: nn.Module, _inp: object, out: Tensor) -> Tensor | None:
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Layer {type(_m).__name__} returns {type(out).__name__}, not a Tensor; pick another layer."
            )
        replaced = None
        if leaf and torch.is_grad_enabled() and out.is_floating_point():
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            replaced = out.clone()
        store.append(out)
        if stop:
            raise _Stop
        return replaced

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def captured(store: list[Tensor], layer: nn.Module) -> Tensor:
    """The layer output a :func:`capture_output` hook stored during the forward pass, checked to be part of
    the autograd graph (clear errors for a layer the forward never calls or runs under ``no_grad``)."""
    if not store:
        raise ValueError(
            f"Layer {type(layer).__name__} was not called by the model's forward pass, so it has no activations "
            "to explain; pass layer='<name>' of a module the forward uses."
        )
    act = store[-1]
    if not act.requires_grad:
        raise RuntimeError(
            f"The output of layer {type(layer).__name__} is not part of the autograd graph (the forward runs it "
            "under torch.no_grad() or detaches it); pick a layer after that part of the network, or take the "
            "no_grad/detach out of forward."
        )
    return act
