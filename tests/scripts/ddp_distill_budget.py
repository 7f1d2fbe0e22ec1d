"""Run by tests/test_budget_callbacks.py: the Distiller's time budget under 2-process DDP (gloo, CPU). A buffered row
costs 1/1024 fake seconds in rank 0's teacher pass and 1/256 in rank 1's; both ranks must fit the same rows on the
same epochs (the slower rank's cost decides: its gathers and student fits are collectives), and print their
decisions."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from explain_callbacks.callbacks import Distiller
from tests.helpers_lightning import image_loaders, lit
from tests.scripts import run_main


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()
PASS = Distiller._forward


class Ticks(pl.Callback):
    def on_train_batch_end(self, *args) -> None:
        CLOCK.now += 1.0


def forward(self, pl_module, x):
    CLOCK.now += (1 / 256 if torch.distributed.get_rank() == 1 else 1 / 1024) * x.shape[0]
    return PASS(self, pl_module, x)


def main() -> None:
    pl.seed_everything(0)
    Distiller._forward = forward
    train, val = image_loaders()  # 96 training rows: 3 batches of 16 per rank; 24 validation rows per rank
    dist = Distiller(students="tree", budget=0.25, export=False, log_students=False)
    dist.clock = CLOCK
    tr = pl.Trainer(
        max_epochs=4, accelerator="cpu", devices=2, strategy="ddp", callbacks=[Ticks(), dist], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=True,
    )  # fmt: skip
    tr.fit(lit(), train, val)
    print(f"RANK{tr.global_rank} LOG {dist.budget_log}", flush=True)


if __name__ == "__main__":
    run_main(main)
