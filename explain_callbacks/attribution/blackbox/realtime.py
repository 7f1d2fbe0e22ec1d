"""Real-time saliency (Dabkowski & Gal 2017, "Real Time Image Saliency for Black Box Classifiers",
NeurIPS, arXiv:1705.07857): a masking network trained against a frozen classifier, then one forward
pass per map.

This module holds the plain-torch parts (the network, the objective, a training step and the
attribution wrapper); :class:`explain_callbacks.callbacks.SaliencyMasker` trains it alongside a
Lightning classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks
from ..._internal.masks import make_substrate
from ..._internal.registry import ATTRIBUTIONS
from ..base import Attributor

__all__ = ["MaskerObjective", "MaskingNetwork", "RealTimeSaliency", "cw_hinge", "train_masker_step"]

ALTERNATIVES = ("blur", "noise", "zeros", "mean")


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


class MaskingNetwork(nn.Module):
    """A small U-Net g(x, c) → m ∈ [0,1]^{H×W} with a class selector.

    Encoder at full, 1/2 and 1/4 resolution; the class embedding multiplies the bottleneck features
    (the paper's selector); the decoder upsamples with skip connections; a 1×1 convolution and a
    sigmoid give the mask, shape (B,1,H,W). The paper's masker reuses a pretrained ResNet-50 encoder;
    this one is small and learns its own features, which suits the small classifiers trained here.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.enc1 = nn.Sequential(_conv(in_channels, w), _conv(w, w))
        self.enc2 = _conv(w, 2 * w)
        self.enc3 = _conv(2 * w, 4 * w)
        self.embed = nn.Embedding(num_classes, 4 * w)
        nn.init.ones_(self.embed.weight)
        self.dec2 = _conv(4 * w + 2 * w, 2 * w)
        self.dec1 = _conv(2 * w + w, w)
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"MaskingNetwork needs images (B,C,H,W), got shape {tuple(x.shape)}.")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        e3 = self.enc3(F.max_pool2d(e2, 2, ceil_mode=True))
        e3 = e3 * self.embed(target.long()).unsqueeze(-1).unsqueeze(-1)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[2:], mode="nearest"), e1], 1))
        return torch.sigmoid(self.out(d1))


def cw_hinge(logits: Tensor, target: Tensor, margin: float, keep: bool) -> Tensor:
    """Carlini-Wagner style hinge on logits, per sample: ``keep=True`` (preserver) penalises
    ``max_{j≠c} z_j − z_c + margin > 0``; ``keep=False`` (destroyer) penalises ``z_c − max_{j≠c} z_j + margin > 0``."""
    zc = logits.gather(1, target.view(-1, 1)).squeeze(1)
    other = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf")).max(1).values
    return F.relu(other - zc + margin) if keep else F.relu(zc - other + margin)


@dataclass
class MaskerObjective:
    """The masking objective of Dabkowski & Gal (methods.md section 3), per batch:

        λ_a·mean((m + 5e-4)^0.3) + λ_s·TV(m)
        + real·(λ_p·hinge_keep(f(m⊙x + (1−m)⊙alt)) + λ_d·hinge_remove(f((1−m)⊙x + m⊙alt)))

    TV is the mean squared difference of neighbouring mask pixels; the 5e-4 keeps the gradient of the
    power finite at m = 0. The selector: with probability ``fake_prob`` a sample is asked for a wrong
    class (real = 0), for which only the area and smoothness terms act, so the masker learns to return
    an empty mask for classes absent from the image. ``alt``: ``blur`` (σ = ``blur_sigma``), ``noise``
    (uniform in the image's range), ``zeros`` or ``mean``. Defaults follow the spirit of the authors'
    PyTorch code (area 8, smoothness 0.5, preserver 0.3, destroyer 1, power 0.3, margins 2 and 5).
    """

    area: float = 8.0
    smoothness: float = 0.5
    preserver: float = 0.3
    destroyer: float = 1.0
    area_power: float = 0.3
    preserve_margin: float = 2.0
    destroy_margin: float = 5.0
    fake_prob: float = 0.3
    alt: str = "blur"
    blur_sigma: float = 5.0

    def __post_init__(self) -> None:
        if self.alt not in ALTERNATIVES:
            raise ValueError(f"alt must be one of {ALTERNATIVES}, got {self.alt!r}.")
        if not 0 <= self.fake_prob < 1:
            raise ValueError(f"fake_prob must lie in [0, 1), got {self.fake_prob}.")

    def alternative(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.alt == "noise":
            flat = x.reshape(x.shape[0], -1)
            lo = flat.min(1).values.view(-1, *([1] * (x.ndim - 1)))
            hi = flat.max(1).values.view(-1, *([1] * (x.ndim - 1)))
            u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
            return lo + (hi - lo) * u
        return make_substrate(x, self.alt, sigma=self.blur_sigma)

    def selector(self, target: Tensor, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Classes asked of the masker and whether they are real (1) or a wrong class (0)."""
        b = target.shape[0]
        u = torch.rand(b, generator=generator, device=generator.device).to(target.device)
        fake = (u < self.fake_prob) & (num_classes > 1)
        shift = torch.randint(1, max(num_classes, 2), (b,), generator=generator, device=generator.device)
        wrong = (target + shift.to(target.device)) % num_classes
        return torch.where(fake, wrong, target), (~fake).to(torch.float32)

    def __call__(
        self,
        classifier: nn.Module,
        masker: nn.Module,
        x: Tensor,
        target: Tensor,
        generator: torch.Generator,
        num_classes: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        asked, real = self.selector(target, num_classes, generator)
        m = masker(x, asked)
        alt = self.alternative(x, generator)
        preserved = alt + (x - alt) * m
        destroyed = x + (alt - x) * m
        logits = classifier(torch.cat([preserved, destroyed]))
        lp, ld = logits[: x.shape[0]], logits[x.shape[0] :]
        area = (m + 5e-4).pow(self.area_power).flatten(1).mean(1)
        tv = (m.diff(dim=2).pow(2).flatten(1).mean(1) + m.diff(dim=3).pow(2).flatten(1).mean(1)) / 2
        keep = cw_hinge(lp, asked, self.preserve_margin, keep=True)
        remove = cw_hinge(ld, asked, self.destroy_margin, keep=False)
        real = real.to(x.dtype)
        per = self.area * area + self.smoothness * tv + real * (self.preserver * keep + self.destroyer * remove)
        parts = {
            "area": area.mean().detach(),
            "smoothness": tv.mean().detach(),
            "preserver": (real * keep).sum().detach() / real.sum().clamp_min(1),
            "destroyer": (real * remove).sum().detach() / real.sum().clamp_min(1),
        }
        return per.mean(), parts


def train_masker_step(
    classifier: nn.Module,
    masker: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: MaskerObjective,
    x: Tensor,
    target: Tensor,
    generator: torch.Generator,
    num_classes: int,
) -> dict[str, Tensor]:
    """One optimiser step of the masker against a frozen classifier; returns the loss parts.

    The classifier is not changed: only the masker's parameters are given to ``torch.autograd.grad``
    (call it with the classifier in eval mode and frozen, e.g. inside ``model_guard``).
    """
    masker.train()
    params = [p for p in masker.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss, parts = objective(classifier, masker, x, target, generator, num_classes)
        grads = torch.autograd.grad(loss, params)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts["loss"] = loss.detach()
    return parts


@ATTRIBUTIONS.register("realtime_saliency", "real_time_saliency", "masker")
class RealTimeSaliency(Attributor):
    """The map of a trained :class:`MaskingNetwork`: ``m = g(x, c)``, one masker forward per sample,
    shape (B,1,H,W) (broadcast over channels). Train it with
    :class:`~explain_callbacks.callbacks.SaliencyMasker` (alongside a Lightning classifier) or
    :func:`train_masker_step`. The classifier passed to ``__call__`` is only used to check the target."""

    name = "realtime_saliency"
    differentiable = False
    passes = "forward"  # the classifier's calls at explanation time are forwards (the masker's own too)

    def __init__(self, masker: nn.Module | None = None, batch_size: BatchSize = "auto") -> None:
        super().__init__(batch_size=batch_size)
        self.masker = masker

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        """Classifier passes per sample: none (one pass of the masking network instead)."""
        return 0

    @torch.no_grad()
    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        if self.masker is None:
            raise ValueError(
                "RealTimeSaliency has no trained masking network; train one with the SaliencyMasker callback "
                "and pass RealTimeSaliency(masker=callback.masker)."
            )
        if inputs.ndim != 4:
            raise ValueError(f"The real-time masker explains images (B,C,H,W), got shape {tuple(inputs.shape)}.")
        if target is None:
            raise ValueError("The real-time masker needs a class target per sample (its selector input).")
        was = self.masker.training
        self.masker.eval()
        try:
            out = [self.masker(inputs[sl], target[sl]) for sl in chunks(inputs.shape[0], self.batch_size)]
        finally:
            self.masker.train(was)
        return torch.cat(out)
