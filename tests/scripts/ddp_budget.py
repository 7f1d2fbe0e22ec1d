"""Run by tests/test_budget.py: the time budget under 2-process DDP (gloo, CPU). Rank 1's method is 4x slower than
rank 0's; both ranks must explain the same epochs on the same number of probes (the slower rank's cost decides),
and print their decisions."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from explain_callbacks.attribution import Attributor
from explain_callbacks.callbacks import AttributionMonitor
from tests.helpers_lightning import image_loaders, lit
from tests.scripts import run_main


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()


class Ticks(pl.Callback):
    def on_train_batch_end(self, *args) -> None:
        CLOCK.now += 1.0


class RankCost(Attributor):
    """|x|, costing 0.25 fake seconds per probe on rank 0 and 1.0 on rank 1."""

    name = "rank_cost"

    def attribute(self, model, inputs, target, *, create_graph=False):
        CLOCK.now += (1.0 if torch.distributed.get_rank() == 1 else 0.25) * inputs.shape[0]
        return inputs.abs()


def main() -> None:
    pl.seed_everything(0)
    train, val = image_loaders()  # 96 training samples: 3 batches of 16 per rank; 24 validation samples per rank
    mon = AttributionMonitor(methods=[RankCost()], num_samples=4, budget=0.25, log_images=False, log_histograms=False)
    mon.clock = CLOCK
    tr = pl.Trainer(
        max_epochs=6, accelerator="cpu", devices=2, strategy="ddp", callbacks=[Ticks(), mon], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=True,
    )  # fmt: skip
    tr.fit(lit(), train, val)
    print(f"RANK{tr.global_rank} LOG {mon.budget_log}", flush=True)


if __name__ == "__main__":
    run_main(main)
