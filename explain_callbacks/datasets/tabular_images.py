"""Embedded data sets from scikit-learn (no downloads): digits (upsampled) and breast cancer."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "BreastCancerDataModule",
    "DigitsDataModule",
    "TensorDataModule",
    "load_breast_cancer_tensors",
    "load_digits_tensors",
    "split_indices",
]  # fmt: skip


def _sklearn() -> Any:
    try:
        import sklearn.datasets as ds
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The embedded data sets use scikit-learn's bundled data: pip install 'explain_callbacks[examples]'."
        ) from err
    return ds


def load_digits_tensors(size: int = 32) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 handwritten digits, (N,1,size,size) in [0,1] (bilinear upsampling of 8x8), labels."""
    d = _sklearn().load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def load_breast_cancer_tensors() -> tuple[Tensor, Tensor, list[str]]:
    """Wisconsin breast-cancer (569 x 30 features, 2 classes), raw features, labels, feature names."""
    d = _sklearn().load_breast_cancer()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long), list(d.feature_names)


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A deterministic shuffled split into train/val/test index sets."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    n_train = n - n_val - n_test
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


class TensorDataModule(pl.LightningDataModule):
    """A data module over in-memory tensors split train/val/test; batches are tuples of tensors."""

    def __init__(
        self, batch_size: int = 64, val_batch_size: int | None = None, seed: int = 0,
        fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), num_workers: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.fractions = tuple(fractions)
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def load(self) -> tuple[Tensor, ...]:
        """All samples as tensors (inputs first, labels second). Override."""
        raise NotImplementedError

    def transform(self, tensors: tuple[Tensor, ...], train_idx: Tensor) -> tuple[Tensor, ...]:
        """Fit-on-train preprocessing (override; identity by default)."""
        return tensors

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tensors = self.load()
        tr, va, te = split_indices(tensors[0].shape[0], self.fractions, self.seed)
        tensors = self.transform(tensors, tr)
        self.train_set = TensorDataset(*(t[tr] for t in tensors))
        self.val_set = TensorDataset(*(t[va] for t in tensors))
        self.test_set = TensorDataset(*(t[te] for t in tensors))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)  # own generator: shuffling never reads the global RNG
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g,
                          num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.val_batch_size, num_workers=self.num_workers)


class DigitsDataModule(TensorDataModule):
    """scikit-learn digits upsampled to ``size`` x ``size`` (default 32), one channel, batches (x, y)."""

    num_classes = 10

    def __init__(self, size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.input_shape = (1, size, size)

    def load(self) -> tuple[Tensor, ...]:
        return load_digits_tensors(self.size)


class BreastCancerDataModule(TensorDataModule):
    """Breast cancer (30 features standardised with train statistics), batches (x, y).

    ``feature_names`` lists the 30 feature names (for tabular maps and students).
    """

    num_classes = 2
    input_shape = (30,)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature_names: list[str] = []

    def load(self) -> tuple[Tensor, ...]:
        x, y, names = load_breast_cancer_tensors()
        self.feature_names = names
        return x, y

    def transform(self, tensors: tuple[Tensor, ...], train_idx: Tensor) -> tuple[Tensor, ...]:
        x, y = tensors
        mu, sd = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-8)
        return (x - mu) / sd, y
