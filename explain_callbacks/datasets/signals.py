"""A procedural 1-D signal data set with a known, localised cause of the label (for AWD).

Each signal of length L is a smooth background (a few wide Gaussian bumps with random centres and
signed amplitudes, irrelevant to the label), an *event* (a short oscillatory burst
``a · exp(−(t − c)² / (2σ²)) · cos(2π f (t − c))`` at a random position c) and white noise:

- ``task="regression"``: the target is the burst amplitude a ~ U(0, 2);
- ``task="classification"``: class 1 has a burst (a ~ U(0.8, 2)), class 0 none.

The burst lives at a fine scale and a random position, so a wavelet model that keeps the largest
coefficient per scale (shift invariant) can predict the label from one or two numbers; the
background lives at coarse scales. ``mask`` marks the burst's support (|t − c| ≤ 2σ), a ground truth
for attributions. Generated from a seeded ``torch.Generator``; no downloads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .tabular_images import TensorDataModule

__all__ = ["SignalDataModule", "make_signals"]


def make_signals(
    n: int,
    length: int = 64,
    task: str = "regression",
    noise: float = 0.1,
    event_width: float = 1.5,
    event_freq: float = 0.25,
    n_background: int = 2,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x (n, L) float32, y, mask (n, L) bool)``; y is float (regression) or long (classification)."""
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}.")
    if length < 16:
        raise ValueError(f"length must be >= 16, got {length}.")
    g = torch.Generator().manual_seed(int(seed))
    t = torch.arange(length, dtype=torch.float64)
    x = torch.zeros(n, length, dtype=torch.float64)
    for _ in range(n_background):
        c = torch.rand(n, 1, generator=g, dtype=torch.float64) * length
        w = 6 + 6 * torch.rand(n, 1, generator=g, dtype=torch.float64)
        a = 2 * torch.rand(n, 1, generator=g, dtype=torch.float64) - 1
        x += a * torch.exp(-0.5 * ((t - c) / w) ** 2)
    margin = 3 * event_width + 1
    c = margin + torch.rand(n, 1, generator=g, dtype=torch.float64) * (length - 2 * margin)
    if task == "regression":
        amp = 2 * torch.rand(n, generator=g, dtype=torch.float64)
        y: Tensor = amp.float()
    else:
        cls = torch.rand(n, generator=g) < 0.5
        amp = torch.where(cls, 0.8 + 1.2 * torch.rand(n, generator=g, dtype=torch.float64), torch.zeros(n).double())
        y = cls.long()
    burst = torch.exp(-0.5 * ((t - c) / event_width) ** 2) * torch.cos(2 * math.pi * event_freq * (t - c))
    x += amp.unsqueeze(1) * burst
    x += noise * torch.randn(n, length, generator=g, dtype=torch.float64)
    mask = (t - c).abs() <= 2 * event_width
    if task == "classification":
        mask &= (amp > 0).unsqueeze(1)
    return x.float(), y, mask


class SignalDataModule(TensorDataModule):
    """Procedural 1-D signals (see :func:`make_signals`); batches ``(x (B, L), y, mask (B, L))``.

    Args:
        n_samples, length, task, noise, event_width, event_freq: of :func:`make_signals`.
        channels: give inputs as (B, 1, L) instead of (B, L).
        batch_size, seed, fractions: of the train/val/test split (see ``TensorDataModule``).
    """

    def __init__(
        self,
        n_samples: int = 2000,
        length: int = 64,
        task: str = "regression",
        noise: float = 0.1,
        event_width: float = 1.5,
        event_freq: float = 0.25,
        channels: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.n_samples = n_samples
        self.length = length
        self.task = task
        self.noise = noise
        self.event_width = event_width
        self.event_freq = event_freq
        self.channels = channels
        self.input_shape = (1, length) if channels else (length,)
        self.num_classes = 2 if task == "classification" else 1

    def load(self) -> tuple[Tensor, ...]:
        x, y, mask = make_signals(
            self.n_samples, self.length, self.task, self.noise, self.event_width, self.event_freq, seed=self.seed
        )
        if self.channels:
            x, mask = x.unsqueeze(1), mask.unsqueeze(1)
        return x, y, mask
