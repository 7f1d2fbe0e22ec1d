"""Small example networks: a CNN with BatchNorm and Dropout, the CDEP paper's MNIST CNN, and an MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "DecoyCNN", "SmallCNN"]


class SmallCNN(nn.Module):
    """Three conv blocks (conv, BatchNorm, ReLU, max-pool), average pooling to 4x4, dropout, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, dropout: float = 0.25) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DecoyCNN(nn.Module):
    """The small CNN of the CDEP DecoyMNIST/ColorMNIST experiments (Rieger et al. 2020, arXiv:1909.13584):
    conv 5×5 (20) → ReLU → max-pool 2 → conv 5×5 (50) → ReLU → max-pool 2 → linear (``hidden``) → ReLU →
    linear; no BatchNorm, no dropout. The paper trains it on 28×28 images (``size=28``: 4×4×50 features
    before the first linear layer) with ``hidden=256`` (DecoyMNIST; 500 for ColorMNIST). The four
    parameterised layers are attributes ``conv1, conv2, fc1, fc2`` in this order, as in the authors' code."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 28, hidden: int = 256) -> None:
        super().__init__()
        side = ((size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"DecoyCNN needs images of at least 16x16 (two 5x5 convs, two 2x pools), got size={size}.")
        self.conv1 = nn.Conv2d(in_channels, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(50 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """Fully connected ReLU network; ``num_classes=1`` gives a regression output."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (64, 64), dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:  # fmt: skip
        super().__init__()
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}.")
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), acts[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1) if x.ndim > 2 else x)
