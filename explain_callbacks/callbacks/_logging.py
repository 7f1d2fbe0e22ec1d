"""Logging helpers: images, text and histograms go to TensorBoard on rank zero only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["global_step", "log_histogram", "log_image", "log_text", "markdown_table", "tensorboard_writers"]


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers, on global rank zero (empty elsewhere).

    Other loggers are skipped: they still receive the scalars logged through ``pl_module.log``.
    """
    if trainer.global_rank != 0:
        return []
    writers = []
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image") and hasattr(exp, "add_text"):
            writers.append(exp)
    return writers


def global_step(trainer: pl.Trainer) -> int:
    """The step images are logged at: the epoch number, so sliders line up across validation epochs."""
    return int(trainer.current_epoch)


def log_image(trainer: pl.Trainer, tag: str, image: Tensor, step: int | None = None) -> None:
    step = global_step(trainer) if step is None else step
    img = image.detach().float().cpu().clamp(0, 1)
    for w in tensorboard_writers(trainer):
        w.add_image(tag, img, step, dataformats="CHW")


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int | None = None) -> None:
    step = global_step(trainer) if step is None else step
    for w in tensorboard_writers(trainer):
        w.add_text(tag, text, step)


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int | None = None) -> None:
    step = global_step(trainer) if step is None else step
    v = values.detach().float().cpu().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return
    for w in tensorboard_writers(trainer):
        w.add_histogram(tag, v, step)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders it)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, Tensor) and v.numel() == 1:
            return f"{float(v):.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
