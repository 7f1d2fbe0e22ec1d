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
    "seeded_loader",
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
    """A deterministic shuffled split into train/val/test index sets (``fractions``: train, val, test shares
    summing to 1; the training split takes what validation and test leave after rounding)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions are (train, val, test) shares: non-negative, a positive training share, summing to 1; "
            f"got {tuple(fractions)}."
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    n_train = n - n_val - n_test
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def seeded_loader(
    dataset: Any, batch_size: int, seed: int, *, shuffle: bool = False, num_workers: int = 0,
    module: pl.LightningDataModule | None = None,
) -> DataLoader:  # fmt: skip
    """A ``DataLoader`` that never reads the global RNG.

    Shuffling and the base seed every iterator draws (for worker seeds) come from a generator seeded with
    ``seed``: without a generator PyTorch draws that base seed from the global RNG at every pass over an
    evaluation loader too, so the validation schedule would move the training's dropout masks. A loader
    rebuilt in a later epoch (``reload_dataloaders_every_n_epochs``, read from ``module.trainer``) gets that
    epoch's seed, so it does not repeat the first epoch's order.
    """
    trainer = getattr(module, "trainer", None) if module is not None else None
    epoch = int(getattr(trainer, "current_epoch", 0) or 0) if trainer is not None else 0
    g = torch.Generator().manual_seed(int(seed) + 1_000_003 * epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers)


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
        return seeded_loader(self.train_set, self.batch_size, self.seed, shuffle=True, num_workers=self.num_workers,
                             module=self)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return seeded_loader(self.val_set, self.val_batch_size, self.seed, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return seeded_loader(self.test_set, self.val_batch_size, self.seed, num_workers=self.num_workers)


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
