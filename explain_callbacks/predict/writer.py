"""ExplainWriter: attribution maps and per-sample metric scores of a whole data set, through ``trainer.predict``."""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from .._internal.batch import BatchAdapter, InputSpec, masks_of
from .._internal.batching import BatchSize, check_batch_size, chunks
from .._internal.config import spec_list, to_plain
from .._internal.distributed import agree
from .._internal.guard import detach_clone, model_guard
from .._internal.outputs import OutputSpec, output_adapter, read_scores
from .._internal.registry import METRICS
from .._internal.targets import TargetPolicy, resolve_target
from ..attribution import Attributor, build_attributor
from ..callbacks import _logging
from ..callbacks.attribution_monitor import find_class_names
from ..callbacks.base import check_forward, class_indices, eager_forward, float_dtype, resolve_model
from ..metrics.base import update_metric
from ..metrics.functional._utils import broadcast_map
from .store import ShardWriter, finished_ids, load_rank_indexes, merge_indexes
from .summary import summarize

__all__ = ["ExplainWriter"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: metrics that compare maps across training epochs: nothing to compare within one data set
_NOT_PER_SAMPLE = ("drift", "explanation_drift")


def _plain_spec(spec: Any) -> Any:
    """A method's or metric's spec as plain JSON (resume checks that a restart computes the same things)."""
    spec = to_plain(spec)
    if isinstance(spec, (str, int, float, bool)) or spec is None:
        return spec
    if isinstance(spec, Mapping):
        return {str(k): _plain_spec(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_plain_spec(v) for v in spec]
    if isinstance(spec, Attributor):
        return repr(spec)  # the class and its settings (public attributes)
    return f"{type(spec).__module__}.{type(spec).__qualname__}"


class ExplainWriter(BasePredictionWriter):
    """Explain every sample of a data set with Lightning's predict loop (any number of devices, DDP: each
    process writes its own shards), writing maps and per-sample metric scores to ``output_dir``.

    ``trainer.predict(model, loader, return_predictions=False)`` with this writer among the callbacks computes,
    for every batch: the model's scores, the target (``target`` policy), every method's maps and every metric's
    per-sample scores on them; rows are written in safetensors shards of about ``shard_size`` samples (memory:
    one shard's rows, whatever the data set's size), each listed in the process's index once written. At the
    end, ``index.json`` says where every sample is (id -> shard, row), ``summary.json`` holds the metric means per
    method and per class, and the means go to the trainer's loggers (scalars ``<section>/<metric>/<method>`` and
    the tables ``summary/means`` and ``summary/per_class/<metric>``). Read the results with
    :class:`~explain_callbacks.predict.ExplainReader` or :func:`~explain_callbacks.predict.read_maps`.

    **Sample ids** are the data set's indices as the sampler gave them (Lightning records them while
    predicting), so one process and several give the same ids. **Resume**: a restart with the same
    ``output_dir`` and settings skips every sample of a finished shard (no method or metric runs on it) and
    computes the rest; a restart with other methods, metrics or target is refused. Under several processes every
    process must see the output directory (one machine, or a shared file system).

    **The model** is explained under the model guard, as in the monitors: eval mode, gradients on (outside the
    predict loop's inference mode), float32, parameters frozen; modes, ``requires_grad``, ``.grad`` and the global
    RNG restored after each batch. A LightningModule without its own ``predict_step`` gets one that does nothing
    while predicting (Lightning's default would call ``forward`` on the whole batch; the writer runs the model
    itself), restored at the end.

    Args:
        output_dir: where the shards, indexes and summary go (nothing is written elsewhere).
        methods: attribution methods (short names, ``{"name": ..., **kwargs}`` mappings, instances).
        metrics: metrics scored per sample on every method's maps (short names, mappings, instances); metrics
            needing ground-truth masks apply when the batches hold them (``mask_key``).
        target: ``"label"``, ``"prediction"``, a class index, or None (single-output models).
        batch_size: rows per model call inside the methods and metrics (``"auto"``: from the model's size).
        shard_size: rows per shard (a shard closes at the first batch end that reaches it).
        input_key, label_key, mask_key: where inputs, labels and masks are in a batch (as in the monitors).
        model_attr: explain ``getattr(pl_module, model_attr)`` instead of the module.
        output_key: where the scores are in a non-tensor model output.
        map_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the stored maps (scores stay float64).
        save_maps: False stores scores only (no maps).
        class_names: names of the classes in the summary (default: the data module's ``class_names``).
        fingerprint: extra plain values that must match on a restart (the entry point passes the checkpoint).
    """

    def __init__(
        self,
        output_dir: str | Path,
        methods: Sequence[Any] = ("saliency", "ig"),
        metrics: Sequence[Any] = (),
        target: TargetPolicy = "label",
        batch_size: BatchSize = "auto",
        shard_size: int = 1024,
        input_key: InputSpec = None,
        label_key: InputSpec = None,
        mask_key: InputSpec = None,
        model_attr: str | None = None,
        output_key: OutputSpec = None,
        map_dtype: str = "float32",
        save_maps: bool = True,
        class_names: Sequence[str] | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if not (target is None or isinstance(target, int) or target in ("label", "prediction")):
            raise ValueError(f"target must be 'label', 'prediction', an int class or None, got {target!r}.")
        if int(shard_size) < 1:
            raise ValueError(f"shard_size (rows per shard) must be >= 1, got {shard_size}.")
        if map_dtype not in _DTYPES:
            raise ValueError(f"map_dtype must be one of {sorted(_DTYPES)}, got {map_dtype!r}.")
        self.output_dir = Path(output_dir)
        self.target = target
        self.batch_size = check_batch_size(batch_size)
        self.shard_size = int(shard_size)
        self.adapter = BatchAdapter(input_key, label_key)
        self.mask_key = mask_key
        self.model_attr = model_attr
        self.output_key = output_key
        self.map_dtype = map_dtype
        self.save_maps = save_maps
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        specs = spec_list(methods)
        if not specs:
            raise ValueError("ExplainWriter needs at least one method, e.g. methods=['saliency', 'ig'].")
        self.methods: dict[str, Attributor] = {}
        method_specs: dict[str, Any] = {}
        for spec in specs:
            method = self._build_method(spec)
            name = self._unique(str(getattr(method, "name", type(method).__name__.lower())), self.methods)
            self.methods[name] = method
            method_specs[name] = _plain_spec(spec)
        self.metrics: dict[str, Any] = {}
        metric_specs: dict[str, Any] = {}
        for spec in spec_list(metrics):
            metric = self._build_metric(spec)
            base = str(getattr(metric, "short_name", None) or type(metric).__name__.lower())
            if base in _NOT_PER_SAMPLE:
                raise ValueError(
                    f"metric {base!r} compares maps across training epochs, not samples of one data set; drop it "
                    "from metrics (the AttributionMonitor logs it while training)."
                )
            name = self._unique(base, self.metrics)
            metric.warn_dropped = False  # non-finite scores are stored as they are and counted in the summary
            self.metrics[name] = metric
            metric_specs[name] = _plain_spec(spec)
        self.settings: dict[str, Any] = {
            "methods": method_specs,
            "metrics": metric_specs,
            "target": target,
            "model_attr": model_attr,
            "map_dtype": map_dtype,
            "save_maps": save_maps,
            **_plain_spec(dict(fingerprint or {})),
        }
        # per run (reset in setup)
        self._store: ShardWriter | None = None
        self._done: set[int] = set()
        self._buffer: list[dict[str, Tensor]] = []
        self._buffered_rows = 0
        self._seconds: dict[str, float] = {}
        self._skipped_rows = 0
        self._written_rows = 0
        self._warned: set[tuple[str, str]] = set()
        self._saved_predict_step: Any = None
        self.summary: dict[str, Any] | None = None

    # ------------------------------------------------------------------ building
    def _build_method(self, spec: Any) -> Attributor:
        if isinstance(spec, str):
            return build_attributor(spec, batch_size=self.batch_size)
        if isinstance(spec, Mapping):
            spec = dict(spec)
            spec.setdefault("batch_size", self.batch_size)
        return build_attributor(spec)

    def _build_metric(self, spec: Any) -> Any:
        """A metric from its spec, with the writer's ``batch_size`` unless the spec sets its own (a metric given
        as an instance keeps its own)."""
        if isinstance(spec, str):
            spec = {"name": spec}
        if isinstance(spec, Mapping):
            spec = dict(spec)
            spec.setdefault("batch_size", self.batch_size)
            return METRICS.build(spec)
        return spec

    @staticmethod
    def _unique(name: str, taken: Mapping[str, Any]) -> str:
        base, i = name, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        return name

    # ------------------------------------------------------------------ run
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self._store = ShardWriter(self.output_dir, trainer.global_rank, self.settings)
        indexes = load_rank_indexes(self.output_dir)
        for idx in indexes:
            saved = idx.get("settings", {})
            if saved != self.settings:
                differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
                raise ValueError(
                    f"{self.output_dir} holds an explain run with other settings ({', '.join(differ)}: "
                    f"{ {k: saved.get(k) for k in differ} } there, { {k: self.settings.get(k) for k in differ} } now). "
                    "Restart with the same settings to resume it, or choose another output directory."
                )
        self._done = finished_ids(indexes)
        self._buffer, self._buffered_rows, self._seconds = [], 0, {}
        self._skipped_rows = self._written_rows = 0
        self.summary = None
        if self.class_names is None:
            self.class_names = find_class_names(trainer)
        if not is_overridden("predict_step", pl_module, pl.LightningModule):
            # Lightning's default predict_step calls forward on the whole batch ((x, y) tuples fail); the writer
            # runs the model itself, so the predict loop's own step does nothing
            self._saved_predict_step = pl_module.__dict__.get("predict_step")
            pl_module.predict_step = types.MethodType(_no_prediction, pl_module)  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if "predict_step" in pl_module.__dict__:
            del pl_module.__dict__["predict_step"]
            if self._saved_predict_step is not None:
                pl_module.predict_step = self._saved_predict_step  # type: ignore[method-assign]
        self._saved_predict_step = None

    def write_on_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if dataloader_idx != 0:
            raise ValueError(
                "ExplainWriter explains one data set per run (sample ids are indices into it), but predict got "
                "several dataloaders; run trainer.predict once per data set, each with its own output_dir."
            )
        if not batch_indices:
            raise ValueError(
                "Lightning could not tell the data set indices of this batch (they are the sample ids): predict over "
                "a torch DataLoader of an indexable (map-style) Dataset, not an IterableDataset or another loader."
            )
        ids = torch.as_tensor(list(batch_indices), dtype=torch.long)
        todo = torch.tensor([int(i) not in self._done for i in ids], dtype=torch.bool)
        if not bool(todo.any()):  # every sample of the batch is in a finished shard: nothing runs
            self._skipped_rows += ids.numel()
            return
        self._skipped_rows += int((~todo).sum())
        rows = self._explain(trainer, pl_module, batch, ids, todo)
        self._buffer.append(rows)
        self._buffered_rows += int(rows["ids"].numel())
        if self._buffered_rows >= self.shard_size:
            self._flush()

    def _explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, ids: Tensor, todo: Tensor
    ) -> dict[str, Tensor]:
        """One batch's rows (those in ``todo``): ids, labels, target, outputs, maps and scores, on the CPU."""
        x, y = self.adapter(batch)
        masks = masks_of(batch, self.mask_key)
        if x.shape[0] != ids.numel():
            raise ValueError(
                f"The batch holds {x.shape[0]} inputs but Lightning recorded {ids.numel()} indices for it; a collate "
                "function that changes the number of samples breaks the sample ids. Keep one input row per sample."
            )
        sel = todo.nonzero().flatten()
        out: dict[str, Tensor] = {"ids": ids[sel]}
        with model_guard(pl_module), eager_forward(pl_module):
            model = resolve_model(pl_module, self.model_attr)
            check_forward(model)
            with output_adapter(model, self.output_key):
                dtype = float_dtype(model) if x.is_floating_point() else None
                # the predict loop runs under inference mode: normal copies of every tensor entering a graph
                xs = detach_clone(x[sel.to(x.device)], dtype).to(pl_module.device)
                check_forward(model, xs)
                ys = None if y is None else detach_clone(y[sel.to(y.device)]).to(pl_module.device)
                ms = None if masks is None else detach_clone(masks[sel.to(masks.device)]).to(pl_module.device)
                with torch.no_grad():
                    scores = torch.cat([read_scores(model(xs[sl])) for sl in chunks(xs.shape[0], self.batch_size)])
                target = resolve_target(self.target, model, xs, ys, self.batch_size)
                out["output"] = scores.detach().float().cpu()
                if scores.ndim == 2 and scores.shape[1] > 1:
                    out["pred"] = scores.argmax(1).cpu()
                labels = None if ys is None else class_indices(ys)
                if labels is not None:
                    out["label"] = labels.long().cpu()
                if target is not None:
                    out["target"] = target.long().cpu()
                for name, method in self.methods.items():
                    start = time.perf_counter()
                    try:
                        maps = method(model, xs, target).detach()
                    except Exception as err:
                        raise _with_context(err, self._failed(f"method {name!r}", out["ids"], err)) from err
                    self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start
                    if self.save_maps:
                        out[f"maps.{name}"] = maps.to(_DTYPES[self.map_dtype]).cpu()
                    self._score(model, xs, maps, target, method, name, ms, out)
        return out

    def _score(
        self, model: nn.Module, x: Tensor, maps: Tensor, target: Tensor | None, method: Attributor, name: str,
        masks: Tensor | None, out: dict[str, Tensor],
    ) -> None:  # fmt: skip
        """Every metric's per-sample scores of ``method``'s maps into ``out`` (``scores.<metric>.<method>``)."""
        if not self.metrics:
            return
        try:
            broadcast_map(maps, x)
        except ValueError:
            self._warn_once("shape", name, f"the maps of {name!r} have shape {tuple(maps.shape[1:])} per sample, "
                            f"not the input's {tuple(x.shape[1:])}: no metric scores them.")  # fmt: skip
            return
        for mname, metric in self.metrics.items():
            if hasattr(metric, "to"):
                metric.to(x.device)
            try:
                applied = update_metric(metric, model, x, maps, target, method, masks)
            except Exception as err:
                raise _with_context(err, self._failed(f"metric {mname!r} on {name!r}", out["ids"], err)) from err
            if not applied:
                why = "does not apply" if masks is not None else "needs masks; the batches hold none (mask_key)"
                self._warn_once(mname, name, f"metric {mname!r} {why} to {name!r}: not scored.")
                continue
            scores = metric.last_scores
            if scores is None or scores.numel() != x.shape[0]:
                raise ValueError(
                    f"metric {mname!r} gave {None if scores is None else scores.numel()} scores for {x.shape[0]} "
                    "samples; the data-set writer needs one score per sample."
                )
            out[f"scores.{mname}.{name}"] = scores.detach().double().cpu()

    @staticmethod
    def _failed(what: str, ids: Tensor, err: Exception) -> str:
        shown = ids[:8].tolist()
        more = "" if ids.numel() <= 8 else f" ... ({ids.numel()} samples)"
        return (
            f"ExplainWriter: {what} failed on the samples with ids {shown}{more}: {err} Finished shards are kept: "
            "fix the cause and run again with the same output directory to resume."
        )

    def _warn_once(self, what: str, method: str, message: str) -> None:
        if (what, method) in self._warned:
            return
        self._warned.add((what, method))
        warnings.warn(f"ExplainWriter: {message}", UserWarning, stacklevel=3)

    def _flush(self) -> None:
        """Write the buffered rows as one shard and list it in this process's index."""
        if not self._buffer:
            return
        assert self._store is not None
        keys = set(self._buffer[0])
        for part in self._buffer[1:]:
            if set(part) != keys:  # e.g. a metric that applied to some batches only (masks in some)
                keys &= set(part)
        tensors = {k: torch.cat([part[k] for part in self._buffer]) for k in sorted(keys)}
        info = {"seconds": {k: round(v, 6) for k, v in self._seconds.items()}}
        self._store.write(tensors, info)
        self._written_rows += int(tensors["ids"].numel())
        self._buffer, self._buffered_rows, self._seconds = [], 0, {}

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problem: Exception | None = None
        try:
            self._flush()
        except Exception as err:
            problem = err
        # every process has written its last shard (or failed) before rank zero reads the indexes
        agreement = agree(problem is None, problem, trainer)
        if not agreement.ok:
            if problem is not None:
                raise problem
            raise RuntimeError(f"ExplainWriter: writing the last shard failed ({agreement.why}).")
        if trainer.global_rank != 0:
            return
        merged = merge_indexes(self.output_dir, {"world_size": trainer.world_size})
        self.summary = summarize(self.output_dir, merged, self.class_names)
        self._log_summary(trainer, self.summary)

    def _log_summary(self, trainer: pl.Trainer, summary: dict[str, Any]) -> None:
        """The means as scalars ``<section>/<metric>/<method>`` (step 0) and tables, to the trainer's loggers."""
        means: dict[str, dict[str, float | None]] = summary["means"]
        scalars = {
            f"{_logging.metric_section(mt, self.metrics.get(mt))}/{mt}/{md}": v
            for mt, by in means.items() for md, v in by.items() if v is not None
        }  # fmt: skip
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=0)
        for tag in scalars:
            _logging._add_chart(trainer, tag, "")
        metrics = list(means)
        if metrics:
            rows = [[md, *[means[mt].get(md) for mt in metrics]] for md in summary["methods"]]
            _logging.log_table(trainer, "summary/means", ["method", *metrics], rows,
                               f"{summary['n_samples']} samples; per-sample scores in the shards.", step=0)  # fmt: skip
        for mt, by in summary["per_class"].items():
            classes = sorted({c for v in by.values() for c in v}, key=lambda c: (len(c), c))
            rows = [[c, *[by.get(md, {}).get(c) for md in summary["methods"]]] for c in classes]
            _logging.log_table(trainer, f"summary/per_class/{mt}", [summary["class_key"] or "class",
                                                                    *summary["methods"]], rows, step=0)  # fmt: skip
        for logger in trainer.loggers:
            logger.save()

    # ------------------------------------------------------------------ reporting
    @property
    def counts(self) -> dict[str, int]:
        """This process's rows of the last run: ``written`` (explained now) and ``skipped`` (finished before)."""
        return {"written": self._written_rows, "skipped": self._skipped_rows}


def _no_prediction(self: pl.LightningModule, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Tensor:
    """The predict step while an :class:`ExplainWriter` runs the model: an empty tensor (None would make Lightning
    warn at every run that predict returned nothing)."""
    return torch.empty(0)


def _with_context(err: Exception, message: str) -> Exception:
    """``err``'s type with ``message`` (callers catching that type still do), or a RuntimeError for types whose
    constructor takes other arguments."""
    try:
        return type(err)(message)
    except Exception:
        return RuntimeError(message)
