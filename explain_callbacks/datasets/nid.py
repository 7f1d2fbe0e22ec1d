"""The ten synthetic functions of Tsang, Cheng & Liu 2018 ("Detecting statistical interactions from
neural network weights", ICLR, arXiv:1705.04977, Table 1), with their ground-truth interactions.

Ten input variables x1..x10 (0-based here: x[:, 0] is x1). All variables are uniform on [-1, 1]
except for F1, where x4, x5, x8, x10 ~ U(0.6, 1) and the others ~ U(0, 1) (the paper's setting).

Reconstruction notes (the printed formulas take roots, logs or powers of possibly negative numbers
on the stated domain): F2 uses ``sqrt(|x7| / (1 + |x8|))`` and F3, F4 use ``|x3| ** (2|x4|)``;
these keep the interacting sets of the paper unchanged. Pairwise ground truth: a pair interacts when
both variables belong to one of the function's interacting sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .tabular_images import TensorDataModule

__all__ = [
    "NID_FUNCTIONS",
    "NID_INTERACTIONS",
    "NIDDataModule",
    "make_nid_data",
    "nid_function",
    "nid_pair_truth",
]


def _f1(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, _, x7, x8, x9, x10 = x.unbind(1)
    return (
        math.pi ** (x1 * x2) * torch.sqrt(2 * x3)
        - torch.asin(x4)
        + torch.log(x3 + x5)
        - (x9 / x10) * torch.sqrt(x7 / x8)
        - x2 * x7
    )


def _f2(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, _, x7, x8, x9, x10 = x.unbind(1)
    return (
        math.pi ** (x1 * x2) * torch.sqrt(2 * x3.abs())
        - torch.asin(0.5 * x4)
        + torch.log((x3 + x5).abs() + 1)
        + (x9 / (1 + x10.abs())) * torch.sqrt(x7.abs() / (1 + x8.abs()))
        - x2 * x7
    )


def _f3(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, _, x7, x8, x9, x10 = x.unbind(1)
    return (
        torch.exp((x1 - x2).abs())
        + (x2 * x3).abs()
        - x3.abs() ** (2 * x4.abs())
        + torch.log(x4**2 + x5**2 + x7**2 + x8**2)
        + x9
        + 1 / (1 + x10**2)
    )


def _f4(x: Tensor) -> Tensor:
    x1, x4 = x[:, 0], x[:, 3]
    return _f3(x) + (x1 * x4) ** 2


def _f5(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return 1 / (1 + x1**2 + x2**2 + x3**2) + torch.sqrt(torch.exp(x4 + x5)) + (x6 + x7).abs() + x8 * x9 * x10


def _f6(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, x6, _, x8, x9, x10 = x.unbind(1)
    return (
        torch.exp((x1 * x2).abs() + 1)
        - torch.exp((x3 + x4).abs() + 1)
        + torch.cos(x5 + x6 - x8)
        + torch.sqrt(x8**2 + x9**2 + x10**2)
    )


def _f7(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, x6, x7, x8, x9, _ = x.unbind(1)
    return (
        (torch.atan(x1) + torch.atan(x2)) ** 2
        + torch.clamp(x3 * x4 + x6, min=0)
        - 1 / (1 + (x4 * x5 * x6 * x7 * x8) ** 2)
        + (x7.abs() / (1 + x9.abs())) ** 5
        + x.sum(1)
    )


def _f8(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (
        x1 * x2
        + 2 ** (x3 + x5 + x6)
        + 2 ** (x3 + x4 + x5 + x7)
        + torch.sin(x7 * torch.sin(x8 + x9))
        + torch.acos(0.9 * x10)
    )


def _f9(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, x6, x7, x8, x9, x10 = x.unbind(1)
    return (
        torch.tanh(x1 * x2 + x3 * x4) * torch.sqrt(x5.abs())
        + torch.exp(x5 + x6)
        + torch.log((x6 * x7 * x8) ** 2 + 1)
        + x9 * x10
        + 1 / (1 + x10.abs())
    )


def _f10(x: Tensor) -> Tensor:
    x1, x2, x3, x4, x5, _, x7, _, x9, _ = x.unbind(1)
    return torch.sinh(x1 + x2) + torch.acos(torch.tanh(x3 + x5 + x7)) + torch.cos(x4 + x5) + 1 / torch.cos(x7 * x9)


#: F1..F10 as functions of a (N, 10) tensor.
NID_FUNCTIONS: dict[int, Callable[[Tensor], Tensor]] = {
    1: _f1,
    2: _f2,
    3: _f3,
    4: _f4,
    5: _f5,
    6: _f6,
    7: _f7,
    8: _f8,
    9: _f9,
    10: _f10,
}

#: Ground-truth interacting sets (0-based variable indices), from Table 1 of the paper.
NID_INTERACTIONS: dict[int, list[tuple[int, ...]]] = {
    k: [tuple(i - 1 for i in s) for s in sets]
    for k, sets in {
        1: [(1, 2, 3), (2, 7), (3, 5), (7, 8, 9, 10)],
        2: [(1, 2, 3), (2, 7), (3, 5), (7, 8, 9, 10)],
        3: [(1, 2), (2, 3), (3, 4), (4, 5, 7, 8)],
        4: [(1, 2), (1, 4), (2, 3), (3, 4), (4, 5, 7, 8)],
        5: [(1, 2, 3), (4, 5), (6, 7), (8, 9, 10)],
        6: [(1, 2), (3, 4), (5, 6, 8), (8, 9, 10)],
        7: [(1, 2), (3, 4, 6), (4, 5, 6, 7, 8), (7, 9)],
        8: [(1, 2), (3, 5, 6), (3, 4, 5, 7), (7, 8, 9)],
        9: [(1, 2, 3, 4, 5), (5, 6), (6, 7, 8), (9, 10)],
        10: [(1, 2), (3, 5, 7), (4, 5), (7, 9)],
    }.items()
}


def _check(k: int) -> None:
    if k not in NID_FUNCTIONS:
        raise ValueError(f"NID function index must be 1..10, got {k}.")


def nid_function(k: int, x: Tensor) -> Tensor:
    """F_k(x) for x of shape (N, 10); returns (N,)."""
    _check(k)
    if x.ndim != 2 or x.shape[1] != 10:
        raise ValueError(f"NID functions take inputs of shape (N, 10), got {tuple(x.shape)}.")
    return NID_FUNCTIONS[k](x)


def nid_pair_truth(k: int) -> Tensor:
    """(10, 10) boolean matrix: True where variables i != j share an interacting set of F_k."""
    _check(k)
    truth = torch.zeros(10, 10, dtype=torch.bool)
    for s in NID_INTERACTIONS[k]:
        idx = torch.tensor(s)
        truth[idx.view(-1, 1), idx.view(1, -1)] = True
    truth.fill_diagonal_(False)
    return truth


def nid_domain(k: int) -> tuple[Tensor, Tensor]:
    """Per-variable lower and upper bounds of the sampling domain of F_k."""
    _check(k)
    if k == 1:
        lo = torch.tensor([0, 0, 0, 0.6, 0.6, 0, 0, 0.6, 0, 0.6])
        return lo, torch.ones(10)
    return -torch.ones(10), torch.ones(10)


def make_nid_data(k: int, n: int, seed: int = 0, noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """``n`` samples (x (n, 10), y (n,)) of F_k drawn from a seeded generator (global RNG untouched);
    ``noise`` adds Gaussian noise of that standard deviation to y."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = nid_domain(k)
    x = lo + (hi - lo) * torch.rand(n, 10, generator=g, dtype=torch.float64)
    y = nid_function(k, x)
    if noise > 0:
        y = y + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x.float(), y.float()


class NIDDataModule(TensorDataModule):
    """A data module for F_k: batches (x (B, 10), y (B,)) for regression; y is standardised with the
    training statistics (``y_mean``, ``y_std`` keep them).

    Args:
        function: k in 1..10. n_samples: total samples (split by ``fractions``). noise: σ of y noise.
    """

    num_classes = 1
    input_shape = (10,)

    def __init__(self, function: int = 1, n_samples: int = 10000, noise: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check(function)
        self.function = function
        self.n_samples = n_samples
        self.noise = noise
        self.y_mean = 0.0
        self.y_std = 1.0

    @property
    def truth(self) -> Tensor:
        return nid_pair_truth(self.function)

    def load(self) -> tuple[Tensor, ...]:
        return make_nid_data(self.function, self.n_samples, seed=self.seed, noise=self.noise)

    def transform(self, tensors: tuple[Tensor, ...], train_idx: Tensor) -> tuple[Tensor, ...]:
        x, y = tensors
        self.y_mean = float(y[train_idx].mean())
        self.y_std = float(y[train_idx].std().clamp_min(1e-8))
        return x, (y - self.y_mean) / self.y_std
