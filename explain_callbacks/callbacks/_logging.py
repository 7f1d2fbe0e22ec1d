"""Where the callbacks' results go: scalars through Lightning, pictures and tables to every logger.

Tag layout (stable; see :data:`SECTIONS`): ``<section>/<metric>/<series>``, the section being the concern
(``maps``, ``faithfulness``, ``sanity``, ``robustness``, ``localisation``, ``interactions``, ``concepts``,
``influence``, ``landscape``, ``distillation``, ``regularizers``, ``masker``,
``cost``), the series the method, student, class or
penalty. TensorBoard groups its sections by the first part of a tag, and the custom-scalars layout
written here puts every series of one metric on one chart (``Custom Scalars`` tab).

Rules:
- inside ``trainer.test`` every tag gets the prefix ``test/``: test values never land in the validation
  curves (they used to: drift jumped to 1.0 at the last step);
- pictures, tables and text are logged at the step Lightning logs the scalars at
  (``fit_loop.epoch_loop._batches_that_stepped``, the global step for one optimizer), so sliders and
  curves share one x-axis;
- pictures, tables and text are written on global rank zero only, to each logger in its own form:
  TensorBoard (images, text, histograms, layout), Weights & Biases (``wandb.Image``/``wandb.Table``/
  ``wandb.Histogram``), MLflow (PNG, CSV and Markdown artifacts under ``media/``) and CSVLogger (PNG,
  CSV and Markdown files under ``<log_dir>/media/``, beside ``metrics.csv``). Other loggers get the
  scalars only.
"""

from __future__ import annotations

import csv
import io
import re
import struct
import tempfile
import weakref
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

__all__ = [
    "SECTIONS",
    "TEST_PREFIX",
    "class_name",
    "find_class_names",
    "global_step",
    "log_figure",
    "log_histogram",
    "log_image",
    "log_scalar",
    "log_table",
    "log_text",
    "markdown_table",
    "media_loggers",
    "metric_section",
    "output_class_names",
    "phase_prefix",
    "tensorboard_writers",
]

#: the sections, in the order the custom-scalars layout lists them
SECTIONS = (
    "maps",
    "faithfulness",
    "sanity",
    "robustness",
    "localisation",
    "interactions",
    "concepts",
    "influence",
    "landscape",
    "distillation",
    "regularizers",
    "masker",
    "cost",
    "metrics",
)
TEST_PREFIX = "test/"

_METRIC_SECTIONS = {
    "faithfulness": (
        "deletion", "insertion", "insertion_deletion", "neflag", "abc", "mufidelity", "infidelity",
        "faithfulness_correlation", "dabkowski", "dabkowski_saliency", "saliency_metric",
    ),
    "sanity": (
        "randomisation", "randomization", "mprt", "completeness_error", "ig_completeness", "completeness_soundness",
    ),
    "robustness": ("max_sensitivity", "avg_sensitivity", "local_lipschitz", "lipschitz", "fragility"),
    "localisation": ("pointing_game", "energy_pointing_game"),
    "maps": ("sparseness", "gini", "complexity", "entropy", "drift", "explanation_drift", "area"),
}  # fmt: skip


def metric_section(name: str, metric: Any = None) -> str:
    """The section of a metric's tag: the metric's own ``section`` attribute, else the family of its short
    name (``deletion`` → ``faithfulness``, ``randomisation`` → ``sanity``, ...), else ``metrics``."""
    own = getattr(metric, "section", None)
    if isinstance(own, str) and own:
        return own
    base = re.sub(r"_\d+$", "", name)  # 'deletion_2': a second deletion metric with other settings
    for section, names in _METRIC_SECTIONS.items():
        if base in names:
            return section
    return "metrics"


# ---------------------------------------------------------------------------------------------- class names
def _names(obj: Any) -> list[str] | None:
    """``obj.class_names`` or ``obj.classes`` when it is a non-empty sequence of names (str or int)."""
    for attr in ("class_names", "classes"):
        names = getattr(obj, attr, None) if obj is not None else None
        if isinstance(names, (list, tuple)) and names and all(isinstance(c, (str, int)) for c in names):
            return [str(c) for c in names]
    return None


def find_class_names(trainer: pl.Trainer) -> list[str] | None:
    """The names of the data's labels, for captions: ``class_names`` or ``classes`` of the data module, else of the
    first validation dataset (or the dataset a ``Subset`` wraps), when it is a sequence of names."""
    candidates: list[Any] = [getattr(trainer, "datamodule", None)]
    try:
        loaders = trainer.val_dataloaders
    except Exception:  # not available at setup in every Lightning version
        loaders = None
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    ds = getattr(loader, "dataset", None)
    candidates += [ds, getattr(ds, "dataset", None)]
    for obj in candidates:
        names = _names(obj)
        if names is not None:
            return names
    return None


def output_class_names(*modules: Any, default: Sequence[str] | None = None) -> list[str] | None:
    """The names of a model's output classes: the ``class_names`` of the first of ``modules`` (the explained network,
    then the LightningModule) that has them, else ``default`` (the labels' names: a classifier's outputs are its
    labels). A segmentation net's outputs are not its image labels: channel 0 is the background
    (:class:`~explain_callbacks.models.LitSegmenter` names it)."""
    for module in modules:
        names = _names(module)
        if names is not None:
            return names
    return None if default is None else [str(c) for c in default]


def class_name(names: Sequence[str] | None, k: int) -> str:
    """Class ``k``'s name, or its index when ``names`` does not name it."""
    return str(names[k]) if names is not None and 0 <= k < len(names) else str(k)


# ---------------------------------------------------------------------------------------------- phase and step
def phase_prefix(trainer: pl.Trainer) -> str:
    """``"test/"`` inside ``trainer.test``, else ``""``."""
    return TEST_PREFIX if trainer.state.fn == TrainerFn.TESTING else ""


def global_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs epoch-level scalars at, so images and scalars share the x-axis."""
    loop = getattr(trainer, "fit_loop", None)
    step = getattr(getattr(loop, "epoch_loop", None), "_batches_that_stepped", None)
    return int(step) if isinstance(step, int) else int(trainer.global_step)


# ---------------------------------------------------------------------------------------------- scalars
def log_scalar(
    pl_module: pl.LightningModule,
    tag: str,
    value: float | Tensor,
    sync: bool = True,
    *,
    on_step: bool = False,
    on_epoch: bool = True,
    batch_size: int | None = None,
) -> None:
    """``pl_module.log`` under the phase prefix, and the tag's chart added to the custom-scalars layout."""
    trainer = pl_module.trainer
    full = phase_prefix(trainer) + tag
    if isinstance(value, Tensor):
        value = value.detach().to(dtype=torch.float32, device=pl_module.device)
    else:
        value = torch.tensor(float(value), dtype=torch.float32, device=pl_module.device)
    kw: dict[str, Any] = {"batch_size": batch_size} if batch_size is not None else {}
    pl_module.log(full, value, on_step=on_step, on_epoch=on_epoch, sync_dist=sync, add_dataloader_idx=False, **kw)
    if not full.startswith(TEST_PREFIX):  # test values are single points: no chart of their own
        _add_chart(trainer, full, "_step" if on_step and on_epoch else "")


# ---------------------------------------------------------------------------------------------- layout
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, str]]] = weakref.WeakKeyDictionary()


def _add_chart(trainer: pl.Trainer, tag: str, suffix: str) -> None:
    """One multi-line chart per metric (``<section>/<metric>/*``) in the TensorBoard custom-scalars layout.

    The layout is rewritten when a chart is added: TensorBoard shows the latest layout of a run, so
    every callback of the run contributes to one layout (a layout per callback would hide the others)."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    parts = tag.split("/")
    if len(parts) >= 3:
        section, chart = parts[0], "/".join(parts[1:-1])
        regex = f"^{re.escape(section)}/{re.escape(chart)}/[^/]+{re.escape(suffix)}$"
    else:
        section, chart = (parts[0], parts[-1]) if len(parts) == 2 else ("metrics", tag)
        regex = f"^{re.escape(tag)}{re.escape(suffix)}$"
    for w in writers:
        try:
            layout = _LAYOUTS.setdefault(w, {})
        except TypeError:  # a writer that takes no weak reference: no layout, the plain dashboard remains
            continue
        charts = layout.setdefault(section, {})
        if charts.get(chart) == regex:
            continue
        charts[chart] = regex
        order = {s: i for i, s in enumerate(SECTIONS)}
        spec = {
            s: {c: ["Multiline", [r]] for c, r in sorted(layout[s].items())}
            for s in sorted(layout, key=lambda s: (order.get(s, len(order)), s))
        }
        if hasattr(w, "add_custom_scalars"):
            w.add_custom_scalars(spec)


# ---------------------------------------------------------------------------------------------- loggers
def _is(logger: Any, name: str) -> bool:
    return any(c.__name__ == name for c in type(logger).__mro__)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers, on global rank zero (empty elsewhere)."""
    if trainer.global_rank != 0:
        return []
    writers = []
    for logger in trainer.loggers:
        if _is(logger, "WandbLogger") or _is(logger, "MLFlowLogger") or _is(logger, "CSVLogger"):
            continue
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image") and hasattr(exp, "add_text"):
            writers.append(exp)
    return writers


def media_loggers(trainer: pl.Trainer) -> list[Any]:
    """The loggers that take pictures and tables (TensorBoard, W&B, MLflow, CSV), on global rank zero only:
    callbacks draw nothing where this is empty (other ranks, ``logger=False``, other loggers)."""
    if trainer.global_rank != 0:
        return []
    out = []
    for logger in trainer.loggers:
        if _is(logger, "WandbLogger") or _is(logger, "MLFlowLogger") or _is(logger, "CSVLogger"):
            out.append(logger)
            continue
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image") and hasattr(exp, "add_text"):
            out.append(logger)
    return out


def _safe_parts(tag: str) -> list[str]:
    """A tag as path parts that stay inside the folder they are joined to (no '..', no absolute path)."""
    parts = [re.sub(r"[^A-Za-z0-9._=-]+", "_", p) for p in tag.split("/")]
    return [p for p in parts if p not in ("", ".", "..")] or ["untitled"]


def _csv_file(logger: Any, tag: str, name: str) -> Path:
    folder = Path(logger.log_dir, "media", *_safe_parts(tag))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _mlflow_artifact(logger: Any, tag: str, name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        logger.experiment.log_artifact(logger.run_id, str(path), "/".join(["media", *_safe_parts(tag)]))


def _to_uint8(image: Any) -> np.ndarray:
    """A rendered figure (H,W,3 uint8) or a (3,H,W)/(1,H,W) float tensor in [0,1] as (H,W,3) uint8."""
    if isinstance(image, np.ndarray):
        return image
    img = image.detach().float().cpu().clamp(0, 1)
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H,W,3) uint8 array as PNG (zlib only: no image library needed, with or without matplotlib)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def log_figure(trainer: pl.Trainer, tag: str, figure: Any, step: int | None = None) -> None:
    """A matplotlib Figure (rendered once with Agg, then released) or a (3,H,W) image in [0,1], to every
    media logger under the phase prefix at the scalars' step."""
    loggers = media_loggers(trainer)
    if figure is None or not loggers:
        return
    from ..viz import figure_to_array, is_figure

    rgb = figure_to_array(figure) if is_figure(figure) else _to_uint8(figure)
    if is_figure(figure):
        figure.clear()  # the figure is not registered anywhere: cleared and dropped, its memory is freed
    tag = phase_prefix(trainer) + tag
    step = global_step(trainer) if step is None else step
    for logger in loggers:
        if _is(logger, "WandbLogger"):
            logger.log_image(key=tag, images=[rgb], step=step)
        elif _is(logger, "MLFlowLogger"):
            _mlflow_artifact(logger, tag, f"step_{step:07d}.png", png_bytes(rgb))
        elif _is(logger, "CSVLogger"):
            _csv_file(logger, tag, f"step_{step:07d}.png").write_bytes(png_bytes(rgb))
        else:
            logger.experiment.add_image(tag, rgb, step, dataformats="HWC")


#: kept for callers that log a plain (3,H,W) image
log_image = log_figure


def _fmt(v: Any) -> str:
    if isinstance(v, Tensor) and v.numel() == 1:
        v = float(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(v: Any) -> str:
    """A Markdown cell: a missing score (NaN: saliency has no completeness error) reads as a dash, not "nan"."""
    if isinstance(v, Tensor) and v.numel() == 1:
        v = float(v)
    if isinstance(v, float) and v != v:
        return "–"
    return _fmt(v).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders it)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_table(
    trainer: pl.Trainer, tag: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "",
    step: int | None = None,
) -> None:  # fmt: skip
    """A table to every media logger: Markdown text (TensorBoard), ``wandb.Table``, CSV + Markdown files
    (MLflow artifacts, CSVLogger files). ``note``: Markdown shown after the table (TensorBoard, .md files)."""
    loggers = media_loggers(trainer)
    if not loggers:
        return
    tag = phase_prefix(trainer) + tag
    step = global_step(trainer) if step is None else step
    md = markdown_table(headers, rows) + (f"\n\n{note}" if note else "")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(headers)
    writer.writerows([[_fmt(v) for v in row] for row in rows])
    for logger in loggers:
        if _is(logger, "WandbLogger"):
            logger.log_table(key=tag, columns=list(headers), data=[[_fmt(v) for v in row] for row in rows], step=step)
        elif _is(logger, "MLFlowLogger"):
            _mlflow_artifact(logger, tag, f"step_{step:07d}.csv", buf.getvalue().encode())
            _mlflow_artifact(logger, tag, f"step_{step:07d}.md", md.encode())
        elif _is(logger, "CSVLogger"):
            _csv_file(logger, tag, f"step_{step:07d}.csv").write_text(buf.getvalue())
            _csv_file(logger, tag, f"step_{step:07d}.md").write_text(md)
        else:
            logger.experiment.add_text(tag, md, step)


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int | None = None) -> None:
    """Markdown text to every media logger (a one-cell table for W&B, a .md file for MLflow and CSV)."""
    loggers = media_loggers(trainer)
    if not loggers:
        return
    tag = phase_prefix(trainer) + tag
    step = global_step(trainer) if step is None else step
    for logger in loggers:
        if _is(logger, "WandbLogger"):
            logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)
        elif _is(logger, "MLFlowLogger"):
            _mlflow_artifact(logger, tag, f"step_{step:07d}.md", text.encode())
        elif _is(logger, "CSVLogger"):
            _csv_file(logger, tag, f"step_{step:07d}.md").write_text(text)
        else:
            logger.experiment.add_text(tag, text, step)


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int | None = None) -> None:
    """A histogram of the finite values (TensorBoard and W&B; MLflow and CSV have no histogram view)."""
    loggers = [lg for lg in media_loggers(trainer) if not (_is(lg, "MLFlowLogger") or _is(lg, "CSVLogger"))]
    if not loggers:
        return
    v = values.detach().float().cpu().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return
    tag = phase_prefix(trainer) + tag
    step = global_step(trainer) if step is None else step
    for logger in loggers:
        if _is(logger, "WandbLogger"):
            import wandb

            logger.experiment.log({tag: wandb.Histogram(v.numpy()), "trainer/global_step": step})
        else:
            logger.experiment.add_histogram(tag, v, step)
