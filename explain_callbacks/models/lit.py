"""A generic LightningModule for the examples: classification (cross-entropy) or regression (MSE)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._internal.batch import BatchAdapter

__all__ = ["LitClassifier"]

_BATCH = BatchAdapter()


class LitClassifier(pl.LightningModule):
    """Wraps ``net``; batches are tuples/lists whose first two items are inputs and labels (more items,
    e.g. masks, are ignored) or dicts with keys such as ``x``/``image`` and ``y``/``label``.

    Logs ``train/loss``, ``val/loss``, ``val/acc`` (classification) and the test counterparts.
    ``lr_schedule="cosine"`` anneals the learning rate to zero over ``trainer.max_epochs``.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        task: str = "classification",
        lr_schedule: str | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in (None, "cosine"):
            raise ValueError(f"lr_schedule must be None or 'cosine', got {lr_schedule!r}.")
        self.lr_schedule = lr_schedule
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}.")
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay
        self.task = task
        self.save_hyperparameters(ignore=["net"])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor]:
        """Inputs and labels, found as the monitors find them: items 0 and 1 of a tuple/list, or the dict keys
        ``x``/``input``/``image``/... and ``y``/``label``/``target``/... (a dict batch from a user's data module
        needed exactly ``x`` and ``y`` before)."""
        x, y = _BATCH(batch)
        if y is None:
            raise KeyError(
                f"LitClassifier found no labels in a batch of type {type(batch).__name__}: give (x, y, ...) tuples "
                f"or dicts with one of the keys {', '.join(BatchAdapter._LABEL_KEYS)}."
            )
        return x, y

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.task == "regression":
            return F.mse_loss(out.squeeze(-1), y.float())
        return F.cross_entropy(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack(batch)
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = self.unpack(batch)
        out = self(x)
        self.log(f"{stage}/loss", self._loss(out, y), prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        if self.task == "classification":
            acc = (out.argmax(1) == y).float().mean()
            self.log(f"{stage}/acc", acc, prog_bar=True, batch_size=x.shape[0], sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule is None:
            return opt
        # cosine annealing to zero over the run: the last epochs settle instead of ending on an Adam spike
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(max_epochs))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        # epochs unbounded (max_epochs=-1, or None with max_steps): anneal over the optimizer steps instead of
        # a one-epoch period, whose cosine would swing the rate between lr and 0 every epoch
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 1:
            raise ValueError("lr_schedule='cosine' needs a bounded run: set trainer.max_epochs or trainer.max_steps.")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
