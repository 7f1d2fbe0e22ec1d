"""Small Lightning pieces for callback tests (fast: a few hundred samples, tiny nets)."""

from __future__ import annotations

import glob

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.models import LitClassifier


class TinyImageCNN(nn.Module):
    """Conv + BatchNorm + Dropout so mode, statistics and RNG side effects would show."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 4 * 4, k))

    def forward(self, x):
        return self.head(self.features(x))


def image_loaders(n: int = 96, k: int = 3, seed: int = 0, nan_at: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x[torch.arange(n), 0, y * 2, y * 2] += 2.0  # learnable signal
    xv = x[:48].clone()
    if nan_at is not None:
        xv[nan_at, 0, 0, 0] = float("nan")
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(xv, y[:48]), batch_size=16)
    return train, val


def trainer(tmp_path, callbacks=(), max_epochs: int = 2, logger: bool = True, **kw) -> pl.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=list(callbacks),
        logger=TensorBoardLogger(str(tmp_path), name="tb") if logger else False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kw,
    )  # fmt: skip


def lit(k: int = 3, seed: int = 0) -> LitClassifier:
    torch.manual_seed(seed)
    return LitClassifier(TinyImageCNN(k), lr=0.01)


def event_tags(tmp_path) -> dict[str, set[str]]:
    """Tags per plugin found in TensorBoard event files under tmp_path."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set[str]] = {"images": set(), "scalars": set(), "histograms": set(), "text": set()}
    for f in glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(f, size_guidance={"images": 0, "tensors": 0, "scalars": 0, "histograms": 0})
        acc.Reload()
        t = acc.Tags()
        tags["images"] |= set(t.get("images", []))
        tags["scalars"] |= set(t.get("scalars", []))
        tags["histograms"] |= set(t.get("histograms", []))
        tags["text"] |= {x for x in t.get("tensors", []) if "text_summary" in x or "/" in x}
    return tags
