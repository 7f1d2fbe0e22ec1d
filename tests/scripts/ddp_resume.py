"""Run by tests/test_ddp_robust.py: per-rank callback state through a 2-process DDP checkpoint and resume.

``first``: one epoch with an AttributionMonitor and a Distiller (rows checkpointed), a checkpoint at its end;
each rank saves its probe set and buffers as they were to ``<out_dir>/before_<rank>.pt``.
``resume``: resumes from that checkpoint; each rank saves its restored state at ``on_fit_start`` (after the
restore, before any new batch) to ``<out_dir>/after_<rank>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from explain_callbacks.callbacks import AttributionMonitor, Distiller
from tests.helpers_lightning import image_loaders, lit
from tests.scripts import run_main


def callbacks() -> tuple[AttributionMonitor, Distiller]:
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=5)
    # 30 training and 24 validation rows per rank: in one process the buffers hold both ranks' rows
    dist = Distiller(
        budget=None, students=["tree"], buffer_size=64, val_size=64, per_batch=10, export=False, checkpoint_buffer=True
    )
    return mon, dist


def snapshot(mon: AttributionMonitor, dist: Distiller) -> dict:
    return {
        "probe_x": mon.probe_x, "probe_y": mon.probe_y, "previous": dict(mon.previous),
        "buffer": dist.buffer.get(), "val": dist.val.get(), "generator": dist._gen.get_state(),
    }  # fmt: skip


class Recorder(Callback):
    def __init__(self, mon: AttributionMonitor, dist: Distiller, out_dir: str) -> None:
        self.mon, self.dist, self.out_dir = mon, dist, out_dir

    def on_fit_start(self, trainer, pl_module):
        torch.save(snapshot(self.mon, self.dist), Path(self.out_dir, f"after_{trainer.global_rank}.pt"))


def main(phase: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    train, val = image_loaders()
    mon, dist = callbacks()
    # the resumed run writes elsewhere: the test resumes from the first checkpoint once more, in one process
    ckpt = ModelCheckpoint(dirpath=str(Path(out_dir, "ckpt" if phase == "first" else "ckpt_resumed")), save_last=True)
    extra = [Recorder(mon, dist, out_dir)] if phase == "resume" else []
    tr = pl.Trainer(
        max_epochs=1 if phase == "first" else 2, accelerator="cpu", devices=2, strategy="ddp",
        callbacks=[mon, dist, ckpt, *extra], logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    tr.fit(lit(), train, val, ckpt_path=None if phase == "first" else str(Path(out_dir, "ckpt", "last.ckpt")))
    if phase == "first":
        torch.save(snapshot(mon, dist), Path(out_dir, f"before_{tr.global_rank}.pt"))
    if tr.is_global_zero:
        print("DDP_OK")


if __name__ == "__main__":
    run_main(main, sys.argv[1], sys.argv[2])
