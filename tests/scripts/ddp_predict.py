"""Run by tests/test_predict.py: a data set explained by ExplainWriter through trainer.predict.

``python ddp_predict.py <out_dir> <devices>``: ``devices`` processes (2: DDP on gloo), each writing its own shards
to ``out_dir``. The test compares the result with a run in one process, sample by sample. The data (45 samples,
batches of 4: the last batch short, the batches not a multiple of the processes) and the model are made here and
imported by the test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from explain_callbacks.predict import ExplainWriter, SplitData
from tests.helpers_lightning import lit
from tests.scripts import run_main

N, BATCH = 45, 4
#: a random method (SmoothGrad draws noise per row of the batch) besides deterministic ones: batches dealt whole
#: to the processes make even its draws the same as in one process
METHODS = ["saliency", {"name": "ig", "n_steps": 8}, {"name": "smoothgrad", "n_samples": 4}]
METRICS = ["deletion", "sparseness"]


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.class_names = ["a", "b", "c"]

    def test_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(3)
        x = torch.rand(N, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (N,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def explain(out_dir: str, devices: int, **writer_kw) -> ExplainWriter:
    torch.set_num_threads(1)
    writer = ExplainWriter(out_dir, methods=METHODS, metrics=METRICS, shard_size=8, **writer_kw)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", callbacks=[writer],
        logger=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.predict(lit(), datamodule=SplitData(Data()), return_predictions=False)
    if trainer.is_global_zero:
        print("DDP_OK", writer.counts)
    return writer


if __name__ == "__main__":
    run_main(lambda out, devices: explain(out, int(devices)), sys.argv[1], sys.argv[2])
