"""What the Distiller adds to a checkpoint and to memory, at 3x32x32 inputs with the default buffers.

    .venv/bin/python benchmarks/bench_distill_checkpoint.py     # about 30 s on 2 CPU cores

One epoch of a linear classifier on 2,048 training and 1,024 validation rows of random 3x32x32 inputs, with a
Distiller (one tree student, default ``buffer_size=2048``, ``val_size=1024``), a ModelCheckpoint at its end:
the checkpoint's size without the Distiller, with it (default: rows left out) and with ``checkpoint_buffer=True``
(the rows kept, the behaviour before). Then the rows the default ``max_buffer_mb`` lets the buffers hold at
3x224x224, where ``buffer_size`` alone allowed 1.9 GB per rank.
"""

from __future__ import annotations

import platform
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.callbacks.distiller import Distiller


def checkpoint_mb(folder: Path, distiller: Distiller | None) -> float:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3072, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (3072,), generator=g)
    train = DataLoader(TensorDataset(x[:2048], y[:2048]), batch_size=128)
    val = DataLoader(TensorDataset(x[2048:], y[2048:]), batch_size=256)
    model = _Lit()
    ckpt = ModelCheckpoint(dirpath=str(folder), save_last=True)
    callbacks = [ckpt] + ([distiller] if distiller is not None else [])
    tr = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    tr.fit(model, train, val)
    return (folder / "last.ckpt").stat().st_size / 2**20


class _Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, dist in [
            ("no Distiller", None),
            ("Distiller (default: rows left out)", Distiller(students=["tree"], export=False, budget=None)),
            (
                "Distiller, checkpoint_buffer=True",
                Distiller(students=["tree"], export=False, checkpoint_buffer=True, budget=None),
            ),
        ]:
            mb = checkpoint_mb(Path(tmp, str(len(rows))), dist)
            held = "" if dist is None else f"{dist.buffer.nbytes / 2**20 + dist.val.nbytes / 2**20:.1f}"
            rows.append((label, mb, held))
    print(f"Checkpoint size at 3x32x32 ({platform.processor() or platform.machine()}, torch {torch.__version__})\n")
    print("| run | checkpoint MB | buffers in memory, MB per rank |\n|---|---:|---:|")
    for label, mb, held in rows:
        print(f"| {label} | {mb:.2f} | {held} |")
    d = Distiller(students=["tree"], budget=None)
    row = {"x": torch.zeros(1, 3, 224, 224)}
    tr, va = d.buffer.rows_for(row), d.val.rows_for(row)
    mb = (tr + va) * 3 * 224 * 224 * 4 / 2**20
    print(
        f"\nAt 3x224x224 the default max_buffer_mb={d.max_buffer_mb:g} holds {tr} training and {va} validation rows "
        f"({mb:.0f} MB per rank; buffer_size=2048 and val_size=1024 alone: "
        f"{3072 * 3 * 224 * 224 * 4 / 2**20:.0f} MB)."
    )


if __name__ == "__main__":
    main()
