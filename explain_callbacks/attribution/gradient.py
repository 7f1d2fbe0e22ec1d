"""Local gradient methods: Saliency, Input x Gradient, SmoothGrad (and SmoothGrad², VarGrad)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize, grad_selected, steps_per_call
from .._internal.layout import check_channels_first, reads_channels_first
from .._internal.registry import ATTRIBUTIONS
from .._internal.softplus import check_beta
from .base import Attributor

__all__ = ["InputXGradient", "Saliency", "SmoothGrad"]


@ATTRIBUTIONS.register("saliency", "gradient")
class Saliency(Attributor):
    """Vanilla gradient ∂f_c/∂x (Simonyan, Vedaldi & Zisserman 2013, arXiv:1312.6034).

    The paper's saliency map (§3.1) is ``M_ij = max_c |∂f_c/∂x_{c,i,j}|``, one value per position:
    ``reduce="max"``.

    Args:
        abs: return |∂f_c/∂x| per input element (Captum's ``Saliency`` default). Default False keeps
            the sign.
        reduce: ``None`` (default): the gradient at the input's shape. ``"max"``: the paper's map,
            the maximum over channels of |∂f_c/∂x| (whatever ``abs``), returned like the other
            lower-resolution maps (Grad-CAM, RISE) with one channel that broadcasts over the input's:
            (B, 1, H, W) for images, (B, 1, L) for (B, C, L) signals, (B, T, 1) for (B, T, D)
            sequences (the max over the D features of each step); tabular (B, D) inputs have no
            channels and give |∂f_c/∂x| (B, D).
        channels_first: how 3-D inputs are read for ``reduce="max"``: True (B, C, L), False (B, T, D),
            None (default) decided from the model's first layer.
        beta: explain the β-smoothed network, every ReLU evaluated as softplus(β) (Dombrowski et al. 2019:
            the maps' curvature is bounded by O(β), so small input changes cannot move them far; they tend
            to the plain map as β → ∞). None (default): the network as is.
    """

    name = "saliency"
    REDUCTIONS = (None, "max")

    def __init__(
        self,
        abs: bool = False,
        reduce: str | None = None,
        channels_first: bool | None = None,
        batch_size: BatchSize = "auto",
        beta: float | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.beta = check_beta(beta)
        if reduce not in self.REDUCTIONS:
            raise ValueError(
                f"reduce must be None (the gradient) or 'max' (Simonyan et al.'s max over channels of |grad|), "
                f"got {reduce!r}."
            )
        self.abs = abs
        self.reduce = reduce
        self.channels_first = check_channels_first(channels_first)

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        g = grad_selected(model, inputs, target, self.batch_size, create_graph=create_graph)
        if self.reduce == "max":
            if g.ndim == 2:  # tabular: no channels to reduce
                return g.abs()
            dim = 1 if g.ndim != 3 or reads_channels_first(model, inputs, self.channels_first) else 2
            return g.abs().amax(dim, keepdim=True)
        return g.abs() if self.abs else g


@ATTRIBUTIONS.register("input_x_gradient", "ixg", "inputxgradient")
class InputXGradient(Attributor):
    """x ⊙ ∂f_c/∂x (Shrikumar et al. 2016, arXiv:1605.01713).

    Args:
        beta: explain the β-smoothed network, every ReLU evaluated as softplus(β) (Dombrowski et al. 2019:
            the maps' curvature is bounded by O(β), so small input changes cannot move them far; they tend
            to the plain map as β → ∞). None (default): the network as is.
    """

    name = "input_x_gradient"

    def __init__(self, batch_size: BatchSize = "auto", beta: float | None = None) -> None:
        super().__init__(batch_size=batch_size)
        self.beta = check_beta(beta)

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        attr = inputs * grad_selected(model, inputs, target, self.batch_size, create_graph=create_graph)
        return attr.detach() if attr.requires_grad and not create_graph else attr  # inputs with grad: no graph of x ⊙ g


@ATTRIBUTIONS.register("smoothgrad")
class SmoothGrad(Attributor):
    """SmoothGrad (Smilkov et al. 2017, arXiv:1706.03825) and its variants.

    Gradients at n noisy copies x + ε, ε ~ N(0, σ²), σ = noise_level · (max x − min x) per sample.
    ``variant``: ``"smoothgrad"`` (mean), ``"smoothgrad_sq"`` (mean of squares, Hooker et al. 2019),
    ``"vargrad"`` (variance, Adebayo et al. 2018). All noisy copies of a chunk go through the model
    in one call of at most ``batch_size`` rows.
    ``beta``: as :class:`Saliency` (softplus(β) for every ReLU).
    """

    name = "smoothgrad"
    VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")

    def __init__(
        self,
        n_samples: int = 25,
        noise_level: float = 0.15,
        variant: str = "smoothgrad",
        stdev: float | None = None,
        batch_size: BatchSize = "auto",
        seed: int = 0,
        beta: float | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.beta = check_beta(beta)
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        self.n_samples = n_samples
        self.noise_level = noise_level
        self.variant = variant
        self.stdev = stdev
        self.name = variant

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        b = inputs.shape[0]
        flat = inputs.detach().reshape(b, -1)
        if self.stdev is not None:
            sigma = torch.full((b,), float(self.stdev), device=inputs.device, dtype=inputs.dtype)
        else:
            sigma = self.noise_level * (flat.max(1).values - flat.min(1).values)
        sigma = sigma.view(b, *([1] * (inputs.ndim - 1)))
        gen = self.generator(inputs.device)
        # Steps grouped so that one model call holds at most batch_size rows.
        per_call = steps_per_call(self.batch_size, b, self.n_samples)
        s1 = torch.zeros_like(inputs)
        s2 = torch.zeros_like(inputs)
        done = 0
        while done < self.n_samples:
            k = min(per_call, self.n_samples - done)
            noise = torch.randn((k, *inputs.shape), generator=gen, device=inputs.device, dtype=inputs.dtype)
            noisy = (inputs.unsqueeze(0) + sigma.unsqueeze(0) * noise).reshape(k * b, *inputs.shape[1:])
            g = grad_selected(model, noisy, target, self.batch_size, create_graph=create_graph).view(k, *inputs.shape)
            s1 = s1 + g.sum(0)
            if self.variant != "smoothgrad":
                s2 = s2 + g.pow(2).sum(0)
            done += k
        n = self.n_samples
        if self.variant == "smoothgrad":
            return s1 / n
        if self.variant == "smoothgrad_sq":
            return s2 / n
        return s2 / n - (s1 / n).pow(2)  # population variance, as in Captum's NoiseTunnel


@ATTRIBUTIONS.register("smoothgrad_sq", "smoothgrad2")
def smoothgrad_sq(**kwargs) -> SmoothGrad:
    """SmoothGrad² (mean of squared noisy gradients)."""
    return SmoothGrad(variant="smoothgrad_sq", **kwargs)


@ATTRIBUTIONS.register("vargrad")
def vargrad(**kwargs) -> SmoothGrad:
    """VarGrad (variance of noisy gradients)."""
    return SmoothGrad(variant="vargrad", **kwargs)
