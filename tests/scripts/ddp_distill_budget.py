"""Run by tests/test_budget_callbacks.py: the time budget under 2-process DDP (gloo, CPU). A buffered row costs 1/64
fake seconds in rank 0's teacher pass and 1/16 in rank 1's; both ranks must fit the same rows on the same epochs (the
slower rank's cost decides: its gathers and student fits are collectives), and print their decisions. Beside it, on
clocks of their own, the budget's pieces of the InteractionMonitor (CD decompositions) and the InfluenceMonitor
(gradient rows), rank 1's again 4x slower: the same pieces on both ranks, every collective reached."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import explain_callbacks.callbacks.influence_monitor as im
from explain_callbacks.callbacks import Distiller, InfluenceMonitor, InteractionMonitor
from tests.helpers_lightning import image_loaders, lit
from tests.scripts import run_main


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK, PIECES = Clock(), Clock()  # the Distiller's; the monitors' pieces (their costs must not enter the other's)
PASS = Distiller._forward
GRADS = im.per_sample_gradients


class Ticks(pl.Callback):
    def on_train_batch_end(self, *args) -> None:
        CLOCK.now += 1.0
        PIECES.now += 1.0


def slow() -> float:
    return 4.0 if torch.distributed.get_rank() == 1 else 1.0


def grads(model, x, *args, **kw):
    PIECES.now += slow() * x.shape[0] / 64
    return GRADS(model, x, *args, **kw)


def monitors() -> tuple[InteractionMonitor, InfluenceMonitor, list[tuple[int, int]]]:
    im.per_sample_gradients = grads
    inter = InteractionMonitor(budget=0.25, log_images=False)
    method = inter.methods["cd"]
    original = method.interactions
    seen: list[tuple[int, int]] = []

    def interactions(model, inputs, target, groups):
        PIECES.now += slow() * inputs.shape[0] * groups.n * (groups.n + 1) // 2 / 256
        seen.append((inputs.shape[0], groups.n))
        return original(model, inputs, target, groups)

    method.interactions = interactions
    infl = InfluenceMonitor(budget=0.25, num_train=24, num_samples=2, model_attr="net")
    inter.clock = infl.clock = PIECES
    return inter, infl, seen


def forward(self, pl_module, x):
    CLOCK.now += (1 / 16 if torch.distributed.get_rank() == 1 else 1 / 64) * x.shape[0]
    return PASS(self, pl_module, x)


def main() -> None:
    pl.seed_everything(0)
    Distiller._forward = forward
    train, val = image_loaders()  # 96 training rows: 3 batches of 16 per rank; 24 validation rows per rank
    dist = Distiller(students="tree", budget=0.25, export=False, log_students=False)
    dist.clock = CLOCK
    inter, infl, seen = monitors()
    tr = pl.Trainer(
        max_epochs=4, accelerator="cpu", devices=2, strategy="ddp", callbacks=[Ticks(), dist, inter, infl],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=True,
    )  # fmt: skip
    tr.fit(lit(), train, val)
    print(f"RANK{tr.global_rank} LOG {dist.budget_log}", flush=True)
    print(f"RANK{tr.global_rank} INTER {seen} {inter.budget_log}", flush=True)
    print(f"RANK{tr.global_rank} INFL {infl.epochs} {infl.budget_log}", flush=True)


if __name__ == "__main__":
    run_main(main)
