"""Run by tests/test_ddp_robust.py: failures on rank 1 alone under 2-process DDP (gloo, CPU).

Rank 1's validation shard is all NaN (no probe set for one monitor), another monitor's ``input_key`` fails on
rank 1 only, a method and a Distiller student fail on rank 1 only. Each rank writes the warnings it raised to
``<out_dir>/warnings_<rank>.json``; rank zero prints ``DDP_OK`` when training finished.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from explain_callbacks.callbacks import AttributionMonitor, Distiller
from explain_callbacks.distill.trees import TreeStudent
from tests.helpers_lightning import image_loaders, lit
from tests.scripts import run_main
from tests.scripts.ddp_monitor import FailsOnRankOne


def rank() -> int:
    return torch.distributed.get_rank()


def inputs_failing_on_rank_one(batch):
    """An input_key that cannot read rank 1's batches (e.g. a key its data lacks)."""
    if rank() == 1:
        raise KeyError("no 'image' in the batches of rank 1")
    return batch[0]


def finite_inputs(batch):
    return torch.nan_to_num(batch[0])


class TreeFailingOnRankOne(TreeStudent):
    """A student whose fit fails on rank 1 only (e.g. out of memory there)."""

    name = "tree"

    def _fit(self, x, teacher_out, teacher):
        if rank() == 1:
            raise RuntimeError("the student ran out of memory on rank 1")
        super()._fit(x, teacher_out, teacher)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    train, val = image_loaders()
    xv, yv = val.dataset.tensors
    xv = xv.clone()
    xv[1::2] = float("nan")  # DistributedSampler(shuffle=False) gives rank 1 the odd rows: all NaN
    val = DataLoader(TensorDataset(xv, yv), batch_size=8)
    no_probe = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4)
    bad_key = AttributionMonitor(
        budget=None, methods=[{"name": "ig", "n_steps": 4}], num_samples=4, input_key=inputs_failing_on_rank_one
    )
    # reads the inputs NaN-free (rank 1 has a probe set here): only its method fails on rank 1
    flaky = AttributionMonitor(
        budget=None, methods=["input_x_gradient", FailsOnRankOne()], num_samples=4, input_key=finite_inputs
    )
    dist = Distiller(
        budget=None,
        students={"tree": "tree", "flaky": TreeFailingOnRankOne(max_depth=2)}, buffer_size=128, val_size=32,
    )  # fmt: skip
    tr = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[no_probe, bad_key, flaky, dist],
        logger=TensorBoardLogger(out_dir, name="tb"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tr.fit(lit(), train, val)
    messages = [str(w.message) for w in record]
    Path(out_dir, f"warnings_{tr.global_rank}.json").write_text(json.dumps(messages, indent=1))
    metrics = sorted(str(k) for k in tr.callback_metrics)
    Path(out_dir, f"metrics_{tr.global_rank}.json").write_text(
        json.dumps({"metrics": metrics, "exported": sorted(dist.exported), "epoch": tr.current_epoch})
    )
    if tr.is_global_zero:
        print("DDP_OK")


if __name__ == "__main__":
    run_main(main, sys.argv[1])
