"""The data an explain run goes through: a split of a data module, in batches dealt to the processes whole.

Lightning's distributed sampler deals samples to the processes in turn (rank r gets samples r, r + W, ...), so
under W processes every batch holds other samples than in one process. Deterministic methods give the same maps
either way (up to the rounding of a differently composed batch), but a random method seeded per call (SmoothGrad's
noise, Expected Gradients' references, a metric's random subsets) draws per row of the batch: its maps then
depend on the world size. :class:`BlockBatchSampler` deals *batches* instead: the batches are those of one
process (consecutive ids, ``batch_size`` each) and rank r takes batches r, r + W, ...; every sample is explained
in the same batch at the same row, so one process and several give the same results sample by sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset

__all__ = ["BlockBatchSampler", "SplitData"]

_STAGES = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}
# Lightning warns that it cannot set drop_last=False on a custom batch sampler: this one never drops a sample
warnings.filterwarnings("ignore", message=r".*custom batch sampler `BlockBatchSampler`.*")


class BlockBatchSampler:
    """Batches of ``batch_size`` consecutive indices of ``range(n)`` (the last one shorter), rank ``rank`` of
    ``world`` taking batches ``rank, rank + world, ...``. Not a ``BatchSampler`` subclass on purpose: Lightning
    leaves a custom batch sampler as it is when predicting (it only wraps it to record the indices)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, {world}), got {rank}.")
        self.n, self.size, self.rank, self.world = int(n), int(batch_size), int(rank), int(world)

    def __iter__(self) -> Iterator[list[int]]:
        starts = range(self.rank * self.size, self.n, self.world * self.size)
        for s in starts:
            yield list(range(s, min(s + self.size, self.n)))

    def __len__(self) -> int:
        batches = -(-self.n // self.size)
        return max(0, -(-(batches - self.rank) // self.world))


class SplitData(pl.LightningDataModule):
    """One split (``"test"``, ``"val"``, ``"train"`` or ``"predict"``) of ``datamodule`` as a predict data module,
    in batches dealt whole to the processes (:class:`BlockBatchSampler`), unshuffled.

    Takes the split's dataset, collate function and worker count from ``datamodule``'s own
    ``<split>_dataloader()``; ``batch_size`` (default: that loader's) sets the rows per batch, and so per model
    call of the forward and of the write. Use with ``Trainer(use_distributed_sampler=False)``: the batches are
    already dealt. ``class_names`` / ``classes`` of the data module are passed on (the summary names classes)."""

    def __init__(self, datamodule: Any, split: str = "test", batch_size: int | None = None) -> None:
        super().__init__()
        if split not in _STAGES:
            raise ValueError(f"split must be one of {sorted(_STAGES)}, got {split!r}.")
        self.datamodule = datamodule
        self.split = split
        self.batch_size = batch_size
        for attr in ("class_names", "classes", "feature_names", "input_shape", "num_classes"):
            if hasattr(datamodule, attr):
                setattr(self, attr, getattr(datamodule, attr))

    def prepare_data(self) -> None:
        if hasattr(self.datamodule, "prepare_data"):
            self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self.datamodule, "setup"):
            self.datamodule.setup(_STAGES[self.split])

    def source_loader(self) -> DataLoader:
        """The data module's own loader of the split (a clear error when it has none)."""
        hook = getattr(self.datamodule, f"{self.split}_dataloader", None)
        try:
            loader = hook() if callable(hook) else None
        except (NotImplementedError, MisconfigurationException):  # Lightning's default hooks raise the latter
            loader = None
        if not isinstance(loader, DataLoader):
            have = [s for s in _STAGES if self._defines(s)]
            raise ValueError(
                f"{type(self.datamodule).__name__} gives no DataLoader for split={self.split!r} (its "
                f"{self.split}_dataloader() returned {type(loader).__name__}); choose another split (it defines "
                f"{have}), e.g. split=val."
            )
        return loader

    def _defines(self, split: str) -> bool:
        hook = getattr(type(self.datamodule), f"{split}_dataloader", None)
        return callable(hook) and hook is not getattr(pl.LightningDataModule, f"{split}_dataloader", None)

    def dataset(self) -> Dataset:
        return self.source_loader().dataset

    def predict_dataloader(self) -> DataLoader:
        loader = self.source_loader()
        try:
            n = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise ValueError(
                f"The {self.split} data set of {type(self.datamodule).__name__} has no length (an IterableDataset): "
                "explaining a data set needs indexable samples, whose indices are the sample ids."
            ) from err
        size = int(self.batch_size or loader.batch_size or 1)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return DataLoader(
            loader.dataset, batch_sampler=BlockBatchSampler(n, size, rank, world), collate_fn=loader.collate_fn,
            num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        )  # fmt: skip
