"""Shared fixtures: tiny models and data, float64 where references are compared."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("PYTHONHASHSEED", "0")
# batch_size="auto" by the activation rule alone (no timed calls): each test's fresh model would otherwise be
# measured (up to 3 s each), and call counts stay deterministic; tests/test_batching_measured.py measures
os.environ.setdefault("EXPLAIN_CALLBACKS_AUTO_ROWS", "rule")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
torch.set_num_threads(1)  # tiny models: threads cost more than they give on 2 cores


class TinyCNN(nn.Module):
    def __init__(self, c: int = 3, k: int = 5, h: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * h * h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = TinyCNN().double().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture
def smooth_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 3)).double()


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)
