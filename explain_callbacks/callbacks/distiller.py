"""Distiller: fit simple students to the network while it trains and track their fidelity.

During training batches the callback copies (a subsample of) the inputs, or the features of a named
layer, into a bounded ring buffer; on monitored epochs it fits its students to the teacher's outputs
on that buffer, and logs, per student, the fidelity to the teacher on validation data (agreement or
R², ``distillation/fidelity/<student>``), the student's own accuracy or R² against the labels
(``distillation/accuracy/<student>`` or ``distillation/r2/<student>``; accuracy needs one class index
per sample, integer or integral float, shape (N,) or (N, 1), and is left out for multi-hot labels), its
headline complexity (``distillation/nonzeros/<student>``, ``.../leaves/...``, ``.../rules/...``; all
measures are in ``history`` and the text) and the student in readable form
(a table, tree or rule list as text; a coefficient image or the learned wavelet filters as an image).
At the end of training the final students are exported with what is needed to load them
(:func:`explain_callbacks.distill.load_student`).

Teacher outputs (``teacher_outputs``):

- ``"refresh"`` (default): only inputs are buffered during training (a copy, no model call); at fit
  time the current teacher is run once over the buffer (no grad, eval mode, chunked), so students
  mimic the network as it is now rather than a mix of stale train-mode outputs;
- ``"captured"``: the outputs (and layer features) of the training forward pass are captured by a
  forward hook, with no extra model call; if the hook did not fire (a ``training_step`` that does not
  call the module), a no-grad eval-mode forward is run on the buffered rows only.

Online students (``OnlineStudent``) are trained at every training step on the batch's captured
teacher outputs (the same hook, or the same fallback forward).

Cost: the buffer is only filled in the epochs whose rows can still be in it at the next fit (every
epoch with ``every_n_epochs=1`` or an online student; the first epoch is sized from its first batch);
a training step then costs one copy of the batch into the preallocated buffer (rows with NaN/Inf
inputs are dropped at fit time). A fit runs the teacher once over the buffer and the validation rows
together, then the students (L1 paths are warm-started from the previous fit); students that do not
call the teacher run under an RNG guard only, without the model guard.

Time budget (``budget``, 2 % of the training time by default; the rule of
:class:`~explain_callbacks.callbacks.base.TimeBudget`): a fit (the gathers, the teacher pass, the students and their
logging) takes as many rows as ``budget`` × the training time allows at the measured seconds per row, the newest
buffered rows and the first validation rows in proportion; the first fit measures on ``budget_rows`` rows (16: a
small first piece, so that a short run stays near its share too), later fits grow from there, at most twice the
largest fit so far (:attr:`~explain_callbacks.callbacks.base.TimeBudget.budget_growth`); the seconds of the students'
text and figures are charged as the fit's fixed cost, apart from the cost per row. A fit that cannot take
``budget_rows`` rows is skipped (the students keep their previous fit; the final export is the latest fit). The
decision reads times agreed across ranks, so every rank fits the same rows or skips.
``budget=None``: every due epoch on the whole buffer (the fixed schedule). Online students train at every step,
outside the budget.

Side effects: none on the training. The buffer copies are detached; every model call and every
fit runs under :func:`model_guard` (eval mode, modes/requires_grad/.grad restored, global CPU/CUDA
RNG restored); students draw randomness from their own seeded generators; the per-batch subsample
uses the callback's own generator. A run with the Distiller gives bit-identical weights to a run
without it (tested).

Failures: a teacher whose outputs hold NaN/Inf (a diverged network) skips the fit with one warning
(``strict`` raises): no student is fitted on it, no fidelity is logged and nothing is exported from it.
Students fail independently: one student's exception skips that student only, which is restored to
the state it had before the fit (an unfitted student stays unfitted) and is not exported while its
latest fit failed.

Memory and checkpoints: each buffer holds at most ``buffer_size`` (``val_size``) rows and, together,
at most ``max_buffer_mb`` MB per rank (fewer rows when rows are large; said once). The rows are *not*
saved in checkpoints unless ``checkpoint_buffer=True`` (they are raw training inputs: ~38 MB per
checkpoint at 3×32×32 with the defaults). A run resumed without them starts with empty buffers: the
training buffer refills from the batches after the resume, so the first fit after it sees only those
rows, and the validation rows are taken again from the first validation batches (the same rows when
the validation loader is not shuffled). History, the subsample generator and online students are
always saved.

DDP: each rank buffers its own batches; at fit time buffers and validation rows are all-gathered
(variable sizes allowed), so every rank fits the same students on the same data (identical
scalars; exports from rank zero). Every outcome a collective depends on (the teacher pass, each
student's fit) is agreed across ranks first, so a failure on one rank skips that step everywhere
instead of hanging, and the warning carries the failing rank's error. Each rank's state (buffers
when checkpointed, generator, online students) is gathered into the checkpoint and handed back to
its rank on resume; under another world size the saved rows of all ranks are dealt out again
round-robin (none lost). Online students train on their rank's batches; rank zero's is exported.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .._internal.batch import BatchAdapter, InputSpec
from .._internal.batching import BatchSize, check_batch_size, chunks, resolve_batch_size
from .._internal.checks import finite_rows
from .._internal.distributed import Agreement, RankStateCallback, agree, warn_rank
from .._internal.guard import detach_clone, model_guard, rng_guard
from .._internal.outputs import OutputSpec, output_adapter, pick_output
from .._internal.registry import STUDENTS
from ..distill.base import Student, build_student, infer_task, save_student, student_from_dict
from ..distill.buffer import RingBuffer, gather_rows
from ..distill.fidelity import fidelity, student_score
from . import _logging
from .base import (
    TimeBudget,
    check_forward,
    class_indices,
    eager_forward,
    float_dtype,
    non_default_settings,
    resolve_model,
)

__all__ = ["Distiller"]

StudentSpec = Any  # a registered name, {"name": ..., **kwargs}, or a Student instance


_KEY = re.compile(r"[\w-]+")


def check_student_key(key: str) -> str:
    """A student key names its export file and its TensorBoard tags: letters, digits, ``_`` and ``-`` only.

    Keys such as ``"../../x"``, ``"/tmp/x"`` or ``"a/b"`` wrote outside the export folder (or into another
    folder); a dot would be taken for the file suffix (``"a.b"`` exported as ``a.pt``).
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(
            f"Student key {key!r} cannot name an export file: use letters, digits, '_' and '-' only (no path "
            "separators, dots or spaces), e.g. {'deep_tree': {'name': 'tree', 'max_depth': 6}}."
        )
    return key


def _is_single_spec(spec: Any) -> bool:
    return isinstance(spec, (str, Student)) or (
        isinstance(spec, Mapping) and isinstance(spec.get("name"), str) and spec["name"] in STUDENTS
    )


#: the default students, as conf/callbacks/distiller.yaml: a depth-3 tree and an L1 logistic model with at most 10
#: non-zero weights (without a limit it kept "386 non-zero weights on 356 features": nothing to read)
DEFAULT_STUDENTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "tree": MappingProxyType({"name": "tree", "max_depth": 3}),
        "sparse_logistic": MappingProxyType({"name": "sparse_logistic", "max_nonzeros": 10}),
    }
)


class Distiller(TimeBudget, RankStateCallback, Callback):
    """Distil the training network into simple students and track their fidelity.

    Args:
        students: one or several students: registered names (``tree``, ``sparse_logistic``,
            ``sparse_linear``, ``rules``, ``attribution_linear``, ``online``, ``awd``),
            ``{"name": ..., **kwargs}`` mappings, Student instances, or a mapping ``key -> spec``
            (the key names the student in tags and export files: letters, digits, ``_`` and ``-``).
        buffer_size: rows kept (the most recent ones); memory is bounded by this and ``max_buffer_mb``.
        per_batch: rows buffered per training batch (a random subsample drawn with the callback's own
            generator); None keeps whole batches.
        layer: name of a submodule (``dict(model.named_modules())``) whose flattened output replaces
            the inputs as the students' features. Students that need the teacher (attribution,
            AWD) require ``layer=None``.
        teacher_outputs: ``"refresh"`` or ``"captured"`` (see the module docstring).
        every_n_epochs: fit and log on epochs where ``(epoch + 1) % every_n_epochs == 0`` (the last
            epoch's students are always exported).
        val_size: validation rows (per rank) kept for the fidelity, the first ones seen.
        task: ``auto`` (from the teacher's output shape), ``classification`` or ``regression``.
        input_key, label_key: where inputs and labels are in a batch (see ``BatchAdapter``).
        model_attr: use ``getattr(pl_module, model_attr)`` as the teacher instead of the module itself.
        output_key: where the outputs are when the teacher returns a tuple/dict/``ModelOutput`` (tuple
            index, key, or a function of the output); ``.logits`` is found without it.
        feature_names: names of the input features (default: ``datamodule.feature_names`` when it
            matches the input size).
        export: write the final students under ``export_dir``, by default ``<log_dir>/distill`` (the first
            logger's directory). Without a logger (``logger=False``) and without ``export_dir`` nothing is
            written (one warning; the students stay in :attr:`students`): never the working directory.
            Not under ``fast_dev_run``, which writes no files.
        log_students: log the readable forms (text and images) to TensorBoard.
        batch_size: rows per teacher call (``"auto"``: chosen from its activation size, see ``_internal.batching``).
        seed: seed of the per-batch subsample generator.
        strict: re-raise exceptions while fitting (default: warn and continue training).
        checkpoint_buffer: save the buffered rows (training and validation) in checkpoints, for an exact
            resume; by default they are left out (see the module docstring for what a resume does then).
        max_buffer_mb: bound of the two buffers together, in MB per rank (split between them in proportion
            to ``buffer_size`` and ``val_size``); None: rows only.
        budget: the share of the training time the fits may take (2 % by default: fits on fewer rows, or
            skipped; see the module docstring); None: every due epoch on every buffered row.
        budget_rows: rows (training and validation together) of the first, measuring fit under the budget, and
            the fewest a fit takes (fewer: skipped); later fits grow from it while the budget allows.
    """

    def __init__(
        self,
        students: StudentSpec | Sequence[StudentSpec] | Mapping[str, StudentSpec] = DEFAULT_STUDENTS,
        buffer_size: int = 2048,
        per_batch: int | None = None,
        layer: str | None = None,
        teacher_outputs: str = "refresh",
        every_n_epochs: int = 1,
        val_size: int = 1024,
        task: str = "auto",
        input_key: InputSpec = None,
        label_key: InputSpec = None,
        model_attr: str | None = None,
        output_key: OutputSpec = None,
        feature_names: Sequence[str] | None = None,
        export: bool = True,
        export_dir: str | None = None,
        log_students: bool = True,
        batch_size: BatchSize = "auto",
        seed: int = 0,
        strict: bool = False,
        checkpoint_buffer: bool = False,
        max_buffer_mb: float | None = 512.0,
        budget: float | None = 0.02,
        budget_rows: int = 16,
    ) -> None:
        if teacher_outputs not in ("refresh", "captured"):
            raise ValueError(f"teacher_outputs must be 'refresh' or 'captured', got {teacher_outputs!r}.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if per_batch is not None and per_batch < 1:
            raise ValueError(f"per_batch must be >= 1 or None, got {per_batch}.")
        if task not in ("auto", "classification", "regression"):
            raise ValueError(f"task must be 'auto', 'classification' or 'regression', got {task!r}.")
        if max_buffer_mb is not None and not max_buffer_mb > 0:
            raise ValueError(f"max_buffer_mb must be > 0 or None, got {max_buffer_mb}.")
        if budget_rows < 4:
            raise ValueError(f"budget_rows must be >= 4 (a student needs rows to fit), got {budget_rows}.")
        self.budget = self._check_budget(budget)
        self.budget_rows = budget_rows
        self._budget_reset()
        self._fit_rows: int | None = None  # rows the current fit took under the budget (None: not fitted)
        self._log_seconds = 0.0  # seconds of the current fit's logging (its fixed cost for the budget)
        self.students: dict[str, Student] = self._build_students(students)
        if layer is not None:
            bad = [k for k, s in self.students.items() if s.needs_teacher]
            if bad:
                raise ValueError(
                    f"Students {bad} need the teacher in the input space (attributions, AWD) and cannot use "
                    f"layer={layer!r} features; use layer=None or drop them."
                )
        self.max_buffer_mb = max_buffer_mb
        self.checkpoint_buffer = checkpoint_buffer
        budget = None if max_buffer_mb is None else float(max_buffer_mb) * 2**20
        share = buffer_size / max(buffer_size + val_size, 1)  # the budget split in proportion to the rows
        self.buffer = RingBuffer(buffer_size, None if budget is None else max(1, int(budget * share)))
        self.val = RingBuffer(val_size, None if budget is None else max(1, int(budget * (1 - share))))
        self.per_batch = per_batch
        self.layer = layer
        self.teacher_outputs = teacher_outputs
        self.every_n_epochs = every_n_epochs
        self.task = task
        self.adapter = BatchAdapter(input_key, label_key)
        self.model_attr = model_attr
        self.output_key = output_key
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.export = export
        self.export_dir = export_dir
        self.log_students = log_students
        self.batch_size = check_batch_size(batch_size)
        self.seed = seed
        self.strict = strict
        self.history: list[dict[str, Any]] = []
        self.exported: dict[str, str] = {}
        self._gen = torch.Generator().manual_seed(int(seed))
        self._hooks: list[Any] = []
        self._capturing = False
        self._cap: dict[str, Tensor] = {}
        self._val_frozen = False
        self._fitted_step: int | None = None
        self._names_checked = False
        self._state_key: str | None = None
        self._collecting = True
        self._rows_this_epoch = 0
        self._rows_per_epoch: int | None = None
        self._captures = self.captures  # looked up at every training step
        self._warned_failures: set[Any] = set()
        self._failed: set[str] = set()  # students whose latest fit failed: not exported

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _build_students(spec: Any) -> dict[str, Student]:
        if _is_single_spec(spec):
            items: list[tuple[str | None, Any]] = [(None, spec)]
        elif isinstance(spec, Mapping):
            items = [(str(k), v) for k, v in spec.items() if v is not None]  # None drops a student (configs)
        elif isinstance(spec, Sequence):
            items = [(None, s) for s in spec]
        else:
            raise TypeError(f"students must be a name, a mapping, a Student or a list of them, got {type(spec)}.")
        out: dict[str, Student] = {}
        for key, s in items:
            st = build_student(dict(s) if isinstance(s, Mapping) else s)
            k = check_student_key(key or st.name)
            base, i = k, 2
            while k in out:
                k, i = f"{base}_{i}", i + 1
            out[k] = st
        if not out:
            raise ValueError("Distiller needs at least one student.")
        return out

    @property
    def state_key(self) -> str:
        if self._state_key is None:  # Lightning asks for it at every hook call
            settings = non_default_settings(
                self, buffer_size=self.buffer.capacity, per_batch=self.per_batch, teacher_outputs=self.teacher_outputs,
                every_n_epochs=self.every_n_epochs, val_size=self.val.capacity, task=self.task,
                model_attr=self.model_attr, seed=self.seed,
            )  # fmt: skip
            # two Distillers differing in those settings (a small buffer every epoch, a large one every 5) are two
            # states; Lightning refused them together ("Found more than one stateful callback")
            self._state_key = self._generate_state_key(students=tuple(self.students), layer=self.layer, **settings)
        return self._state_key

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        """The key before the settings took part: checkpoints written before still restore (Lightning looks
        a state up under it when there is none under :attr:`state_key`)."""
        return self._generate_state_key(students=tuple(self.students), layer=self.layer)

    @property
    def has_online(self) -> bool:
        return any(s.online for s in self.students.values())

    @property
    def captures(self) -> bool:
        return self.teacher_outputs == "captured" or self.has_online

    def teacher(self, pl_module: pl.LightningModule) -> nn.Module:
        return resolve_model(pl_module, self.model_attr)

    def _layer_module(self, teacher: nn.Module) -> nn.Module | None:
        if self.layer is None:
            return None
        mods = dict(teacher.named_modules())
        if self.layer not in mods:
            names = [n for n in mods if n][:20]
            raise KeyError(f"No submodule {self.layer!r} in the teacher; some names: {names}.")
        return mods[self.layer]

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.captures or self._hooks:
            return
        teacher = self.teacher(pl_module)

        def hook(key: str) -> Any:
            def fn(module: nn.Module, args: Any, output: Any) -> None:
                if self._capturing and key not in self._cap:
                    if key == "out" and not isinstance(output, Tensor):
                        output = pick_output(output, self.output_key)
                    if isinstance(output, Tensor):
                        self._cap[key] = output.detach()

            return fn

        self._hooks.append(teacher.register_forward_hook(hook("out")))
        layer = self._layer_module(teacher)
        if layer is not None:
            self._hooks.append(layer.register_forward_hook(hook("feat")))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._capturing = False
        self._cap = {}

    # ------------------------------------------------------------------ collection
    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collecting = self._collect_this_epoch(trainer)
        self._rows_this_epoch = 0

    def _collect_this_epoch(self, trainer: pl.Trainer, rows_per_epoch: int | None = None) -> bool:
        """Buffer only in the epochs whose rows can still be in the buffer at the next fit.

        The buffer keeps the last ``buffer_size`` rows, so with ``every_n_epochs > 1`` only the last
        ``ceil(buffer_size / rows per epoch)`` epochs before a due epoch (or before ``max_epochs``)
        matter; the others are skipped (no per-batch cost). Online students need every batch.
        """
        rows_per_epoch = rows_per_epoch or self._rows_per_epoch
        if self.has_online or self.every_n_epochs == 1 or rows_per_epoch is None:
            return True
        need = -(-self.buffer.limit // max(rows_per_epoch, 1))
        epoch = trainer.current_epoch
        to_due = (self.every_n_epochs - (epoch + 1) % self.every_n_epochs) % self.every_n_epochs
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        to_end = (max_epochs - 1 - epoch) if max_epochs is not None else need
        return to_due < need or to_end < need

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._captures and self._collecting:
            self._cap = {}
            self._capturing = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._capturing = False
        cap, self._cap = self._cap, {}
        first_epoch = self._rows_per_epoch is None
        if not (self._collecting or first_epoch) or not self._fitting(trainer):
            return
        try:
            if not self._collecting:  # first epoch, buffering stopped by the estimate: count its rows only
                self._rows_this_epoch += self._kept(int(self.adapter.inputs(batch).shape[0]))
                return
            self._collect(trainer, pl_module, batch, cap)
        except Exception as err:
            self._fail(trainer, "collecting a training batch", err)
            return
        if first_epoch and batch_idx == 0:
            self._first_epoch_estimate(trainer, batch)

    def _kept(self, rows: int) -> int:
        """Rows buffered from a batch of ``rows`` rows."""
        return rows if self.per_batch is None else min(rows, self.per_batch)

    def _first_epoch_estimate(self, trainer: pl.Trainer, batch: Any) -> None:
        """In the first epoch the rows per epoch are not known yet: estimate them from the first batch
        (a lower bound: every other batch as large, the last one with a single row) and stop buffering
        for the rest of the epoch when its rows cannot reach the next fit."""
        n_batches = trainer.num_training_batches
        if not isinstance(n_batches, int) or n_batches < 1:  # inf for iterable datasets of unknown length
            return
        b = self._kept(int(self.adapter(batch)[0].shape[0]))
        self._collecting = self._collect_this_epoch(trainer, b * (n_batches - 1) + 1)

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, cap: dict[str, Tensor]) -> None:
        """Copy (a subsample of) the batch into the buffer: no model call in ``refresh`` mode, where rows
        with NaN/Inf inputs are dropped at fit time (one vectorised check instead of one per step)."""
        x, y = self.adapter(batch)
        b = x.shape[0]
        idx: Tensor | slice = slice(None)  # fast path: every row, no indexing copies
        n = b
        # captured outputs and online students use the rows now: keep the finite ones
        if self._captures and x.is_floating_point() and not bool(torch.isfinite(x.sum())):
            idx = finite_rows(x).nonzero().flatten()
            n = idx.numel()
        if self.per_batch is not None and n > self.per_batch:
            pick = torch.randperm(n, generator=self._gen)[: self.per_batch].sort().values.to(x.device)
            idx = pick if isinstance(idx, slice) else idx[pick]
            n = self.per_batch
        self._rows_this_epoch += n
        if n == 0:
            return
        # the buffer copies into its preallocated CPU storage (from any device, detached)
        rows: dict[str, Tensor | None] = {"x": x[idx]}
        if y is not None and y.shape[:1] == x.shape[:1]:
            rows["y"] = y[idx]
        if not self._captures:
            self._add_rows(rows)
            return
        out = cap.get("out")
        feat = cap.get("feat")
        ok = out is not None and out.shape[0] == b and (self.layer is None or (feat is not None and feat.shape[0] == b))
        if ok:
            assert out is not None
            out = out[idx]
            feat = None if feat is None else feat[idx]
        else:  # the hook did not see this batch: one guarded no-grad forward on the kept rows only
            out, feat = self._forward(pl_module, x[idx])
        out = out.detach().float()
        if self.teacher_outputs == "captured":
            rows["out"] = out.cpu()
            if feat is not None:
                rows["feat"] = feat.reshape(feat.shape[0], -1).detach().float().cpu()
        for s in self.students.values():
            if s.online:
                src = feat.reshape(feat.shape[0], -1) if (self.layer is not None and feat is not None) else x[idx]
                s.partial_fit(src.detach(), out.detach())
        self._add_rows(rows)

    def _add_rows(self, rows: dict[str, Tensor | None]) -> None:
        first = not self.buffer.names
        self.buffer.add(rows)
        if first and self.buffer.limit < self.buffer.capacity:  # said once: the byte bound cut the rows
            kept = {k: v for k, v in rows.items() if v is not None}
            rank_zero_warn(
                f"Distiller: rows of {self.buffer.row_bytes(kept) / 1024:.0f} KB: max_buffer_mb={self.max_buffer_mb} "
                f"holds {self.buffer.limit} training rows of buffer_size={self.buffer.capacity} (and the validation "
                "rows in proportion). Raise max_buffer_mb, or buffer features of a layer (layer=...)."
            )

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._val_frozen or dataloader_idx != 0 or not self._fitting(trainer) or len(self.val) >= self.val.limit:
            return
        try:  # a validation batch the rows cannot be taken from must not stop training either
            self._add_val(batch)
        except Exception as err:
            self._fail(trainer, "taking validation rows from a batch", err)

    def _add_val(self, batch: Any) -> None:
        x, y = self.adapter(batch)
        keep = finite_rows(x) if x.is_floating_point() else torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        shapes = {"x": x[:0]} if y is None or y.shape[:1] != x.shape[:1] else {"x": x[:0], "y": y[:0]}
        limit = self.val.limit if self.val.names else self.val.rows_for(shapes)  # the first rows, within the bound
        idx = keep.nonzero().flatten()[: limit - len(self.val)]
        if idx.numel() == 0:
            return
        with torch.inference_mode(False):
            rows: dict[str, Tensor | None] = {"x": x[idx].detach().cpu().clone()}
            if y is not None and y.shape[:1] == x.shape[:1]:
                rows["y"] = y[idx].detach().cpu().clone()
        self.val.add(rows)

    # ------------------------------------------------------------------ teacher calls
    def _forward(self, pl_module: pl.LightningModule, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Teacher outputs (and layer features) for rows x, no grad, eval mode, chunked, CPU float32."""
        teacher = self.teacher(pl_module)
        layer = self._layer_module(teacher)
        holder: dict[str, Tensor] = {}
        handle = (
            layer.register_forward_hook(lambda m, a, o: holder.__setitem__("f", o.detach()))
            if layer is not None
            else None
        )
        outs, feats = [], []
        try:
            with model_guard(pl_module), eager_forward(pl_module), torch.no_grad():
                device = pl_module.device
                dtype = float_dtype(teacher) if x.is_floating_point() else None
                first = detach_clone(x[:1], dtype).to(device)
                check_forward(teacher, first)  # a forward(batch) teacher: the error names model_attr
                per_call = resolve_batch_size(self.batch_size, teacher, first)
                for sl in chunks(x.shape[0], per_call):
                    xc = detach_clone(x[sl], dtype).to(device)
                    o = pick_output(teacher(xc), self.output_key)
                    outs.append(o.detach().float().cpu())
                    if handle is not None:
                        f = holder.pop("f")
                        feats.append(f.reshape(f.shape[0], -1).float().cpu())
        finally:
            if handle is not None:
                handle.remove()
        return torch.cat(outs), (torch.cat(feats) if feats else None)

    # ------------------------------------------------------------------ fitting
    def is_due(self, trainer: pl.Trainer) -> bool:
        # fast_dev_run tries every code path, the logging of a fit included, whatever every_n_epochs
        return bool(trainer.fast_dev_run) or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._fitting(trainer):
            return
        if len(self.val):
            self._val_frozen = True
        if self._due_everywhere(trainer, self.is_due(trainer)):
            self._run(trainer, pl_module, log=True)

    def _due_everywhere(self, trainer: pl.Trainer, due: bool) -> bool:
        """Whether every rank fits now (agreed: the fit gathers rows, a collective every rank must reach; the
        schedule is the same on every rank, so ranks that disagree point at a bug and are said once)."""
        agreement = agree(due, "not due", trainer)
        if not agreement.ok and len(agreement.failures) < agreement.world:
            agreement.warn(lambda why: f"Distiller: the ranks disagree on fitting now ({why}); skipped.",
                           self.__dict__.setdefault("_warned_failures", set()), ("due",))  # fmt: skip
        return agreement.ok

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rows_this_epoch and (self._collecting or self._rows_per_epoch is None):
            self._rows_per_epoch = self._rows_this_epoch
        # Epochs without validation (check_val_every_n_epoch, limit_val_batches=0) fit here.
        if self._fitting(trainer) and self._due_everywhere(
            trainer, self.is_due(trainer) and self._fitted_step != trainer.global_step
        ):
            self._run(trainer, pl_module, log=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if self._due_everywhere(trainer, self._fitted_step != trainer.global_step):
            self._run(trainer, pl_module, log=False)
        # fast_dev_run writes nothing (Lightning turns logging and checkpoints off): the students stay in memory
        # (was: <cwd>/distill written by a debugging run)
        if self.export and not trainer.fast_dev_run:
            try:
                folder = self.export_path(trainer)  # trainer.log_dir is a collective under DDP: every rank
                if folder is None:
                    if any(s.fitted for s in self.students.values()):
                        rank_zero_warn(
                            "Distiller: no log directory (logger=False) and no export_dir, so the students were not "
                            "written (they are in Distiller.students; save_student() writes one). Pass "
                            "export_dir=... to export them, or export=False to silence this."
                        )
                else:
                    self._export(trainer, folder)
            except Exception as err:
                self._fail(trainer, "exporting the students", err)

    def _feature_names(self, trainer: pl.Trainer, n_features: int) -> list[str] | None:
        if self.layer is not None:
            return None
        names = self.feature_names
        if names is None:
            dm = getattr(trainer, "datamodule", None)
            names = list(getattr(dm, "feature_names", None) or []) or None
        if names is not None and len(names) != n_features:
            if self.feature_names is not None and not self._names_checked:
                rank_zero_warn(f"Distiller: {len(names)} feature names for {n_features} input features; names ignored.")
            self._names_checked = True
            return None
        return names

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._budget_start()

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool) -> None:
        start, self._fit_rows, self._log_seconds = self.clock(), None, 0.0
        mark = self.one_off_mark()
        try:
            # students that query the teacher (attribution, AWD) see the outputs, not a tuple/dict
            with output_adapter(self.teacher(pl_module), self.output_key):
                self._fit_and_log(trainer, pl_module, log)
        except Exception as err:
            self._fail(
                trainer, f"fitting the students at epoch {trainer.current_epoch}", err, key="fitting the students"
            )
        finally:
            self._fitted_step = trainer.global_step
            if self._fit_rows:  # the budget's measurement: the whole fit's seconds per row
                epoch = int(trainer.current_epoch) - (0 if log else 1)
                self.budget_spend(self.clock() - start, self._fit_rows, epoch, kind="row", fixed=self._log_seconds,
                                  one_off=self.one_off_since(mark))  # fmt: skip

    def _budget_cut(
        self, trainer: pl.Trainer, rows: dict[str, Tensor], val: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
        """The rows a fit takes under the budget (every rank calls this after the gathers: an agreed decision):
        the newest training rows and the first validation rows in proportion, or None to skip the fit."""
        n_train = rows["x"].shape[0]
        n_val = val["x"].shape[0] if val else 0
        n = n_train + n_val
        k = self.budget_units(trainer, n, first=min(n, self.budget_rows), kind="row")
        if k >= n:
            return rows, val
        if k < min(n, self.budget_rows):
            self._budget_skipped += 1
            return None
        k_val = min(n_val, k * n_val // n)
        k_train = k - k_val
        rows = {name: t[n_train - k_train :] for name, t in rows.items()}  # the newest rows
        val = {name: t[:k_val] for name, t in val.items()} if val else val
        return rows, val

    def _teacher_pass(
        self, pl_module: pl.LightningModule, x: Tensor, rows: dict[str, Tensor], val: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Teacher outputs (and layer features) on the buffer and on the validation rows: one chunked pass
        over the rows that need them (the buffer in ``refresh`` mode, the validation rows always)."""
        refresh = self.teacher_outputs == "refresh" or "out" not in rows
        parts = ([x] if refresh else []) + ([val["x"].to(x.dtype)] if val is not None else [])
        o_all, f_all = (
            self._forward(pl_module, torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else (None, None)
        )
        vout = vfeat = None
        if refresh:
            assert o_all is not None
            n = x.shape[0]
            out, feat = o_all[:n], (f_all[:n] if f_all is not None else None)
            if val is not None:
                vout, vfeat = o_all[n:], (f_all[n:] if f_all is not None else None)
        else:
            out, feat = rows["out"], rows.get("feat")
            if val is not None:
                assert o_all is not None
                vout, vfeat = o_all, f_all
        return out, feat, vout, vfeat

    def _fit_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool) -> None:
        # collectives: every rank is here (the fit points are the same epochs on every rank)
        rows = gather_rows(self.buffer.get())
        val = gather_rows(self.val.get())
        if rows and rows["x"].is_floating_point():  # rows with NaN/Inf inputs are dropped
            ok = finite_rows(rows["x"])
            if not bool(ok.all()):
                rows = {k: v[ok] for k, v in rows.items()}
        if not rows or rows["x"].shape[0] < 2:
            warned: set[Any] = self.__dict__.setdefault("_warned_failures", set())
            if ("no rows",) not in warned:  # once: with batches it cannot read, the buffer stays empty every epoch
                warned.add(("no rows",))
                rank_zero_warn("Distiller: fewer than 2 buffered training rows; nothing to fit yet.")
            return
        cut = self._budget_cut(trainer, rows, val)
        if cut is None:  # the budget skips this fit on every rank; the students keep their previous fit
            return
        rows, val = cut
        self._fit_rows = rows["x"].shape[0] + (val["x"].shape[0] if val else 0)
        x = rows["x"]
        has_val = bool(val) and val["x"].shape[0] > 0
        # at on_train_end the epoch counter has already moved past the last epoch
        epoch = int(trainer.current_epoch) - (0 if log else 1)
        # the teacher pass, agreed: a rank where it failed or gave NaN/Inf skips the fit on every rank
        problem: Exception | None = None
        try:
            out, feat, vout, vfeat = self._teacher_pass(pl_module, x, rows, val if has_val else None)
            outs = [out] + ([vout] if vout is not None else [])
            bad = sum(int((~finite_rows(o)).sum()) for o in outs)
            if bad:
                # a diverged network: every student would agree with its NaN (fidelity 1.0 was logged and exported)
                problem = FloatingPointError(
                    f"the teacher's outputs hold NaN/Inf on {bad} of {sum(o.shape[0] for o in outs)} rows"
                )
        except Exception as err:
            problem = err
        agreement = agree(problem is None, problem, trainer)
        if not agreement.ok:
            self._failed = set(self.students)  # nothing fitted on it is exported
            self._agreed_failure(
                agreement, ("teacher",), problem,
                lambda why: f"Distiller skipped the fit at epoch {epoch} ({why}): no student fitted, no fidelity "
                "logged.",
            )  # fmt: skip
            return
        X = feat if self.layer is not None else x
        assert X is not None
        task = infer_task(out, self.task)
        if has_val:
            VX = vfeat if self.layer is not None else val["x"]
            vy = val.get("y")
        names = self._feature_names(trainer, int(X[0].numel()))
        record: dict[str, Any] = {"epoch": epoch, "step": int(trainer.global_step), "final": not log}
        teacher = self.teacher(pl_module)
        for key, student in self.students.items():
            # Students fail independently, and a failed one is restored to its state before the fit (an unfitted
            # one stays unfitted): was, one exception ended the loop for every student, and the failed student
            # (marked fitted by fit() before the solve) was exported and failed on predict.
            backup = None if student.online else _snapshot(student)
            result: dict[str, float] | None = None
            error: Exception | str | None = None
            t0 = time.perf_counter()
            try:
                if student.online:
                    if not student.fitted:
                        error = "not trained yet"
                elif student.needs_teacher:
                    # attributions/AWD use the teacher: guarded, grads enabled
                    with model_guard(pl_module), eager_forward(pl_module):
                        student.fit(X, out, teacher=teacher, feature_names=names)
                else:
                    with rng_guard():  # students use their own generators; the global RNG is restored regardless
                        student.fit(X, out, feature_names=names)
                if error is None:
                    fit_s = time.perf_counter() - t0
                    m: dict[str, float] = {"train_fidelity": float(fidelity(student.predict(X), out, task))}
                    if has_val:
                        pred = student.predict(VX)
                        m["fidelity"] = float(fidelity(pred, vout, task))
                        labels = vy if task == "regression" or vy is None else class_indices(vy)
                        if labels is not None:  # multi-label / one-hot labels: no accuracy to report
                            m["accuracy" if task == "classification" else "r2"] = float(
                                student_score(pred, labels, task)
                            )
                    comp = {k: float(v) for k, v in student.complexity().items()}
                    result = {**m, **comp, "fit_seconds": fit_s}
            except Exception as err:
                error = err
            # logging below is a collective: every rank logs this student, or none does (the same students
            # on the same gathered rows, but a fit can still fail on one rank alone, e.g. out of memory)
            agreement = agree(result is not None, error, trainer)
            if not agreement.ok:
                if backup is not None:  # on every rank: the students stay identical across ranks
                    _restore(student, backup)
                self._failed.add(key)
                if set(agreement.failures.values()) != {"not trained yet"}:
                    self._agreed_failure(
                        agreement, ("student", key), error if isinstance(error, Exception) else None,
                        lambda why, key=key: f"Distiller: student {key!r} failed at epoch {epoch} ({why}); the other "
                        "students go on, this one keeps its previous fit and is not exported while its latest fit "
                        "failed.",
                    )  # fmt: skip
                continue
            assert result is not None
            self._failed.discard(key)
            record[key] = result
            if log:
                logged = self.clock()  # the students' logging: the fit's fixed cost for the budget (not per row)
                # scalars: fidelity, own score and the headline complexity (the rest is in the text and history);
                # the in-sample fidelity only when there is no validation data
                comp_keys = list(student.complexity())
                head = comp_keys[0] if comp_keys else None
                scalars = {
                    k: v for k, v in result.items() if k in ("fidelity", "accuracy", "r2") or k == head
                }
                if not has_val:
                    scalars["train_fidelity"] = result["train_fidelity"]
                for k, v in scalars.items():
                    _logging.log_scalar(pl_module, f"distillation/{k}/{key}", v, True)
                if self.log_students:
                    _logging.log_text(trainer, f"distillation/student/{key}", student.describe())
                    img = student.image()
                    if img is not None:
                        _logging.log_figure(trainer, f"distillation/figure/{key}", img)
                self._log_seconds += self.clock() - logged
        self.history.append(record)

    # ------------------------------------------------------------------ export
    def export_path(self, trainer: pl.Trainer) -> Path | None:
        """Where the students are written: ``export_dir``, else ``<log_dir>/distill`` of the first logger; None
        without either (``logger=False``): Lightning's log_dir is then the working directory, where a run's
        files do not belong."""
        if self.export_dir is not None:
            return Path(self.export_dir)
        if not trainer.loggers:
            return None
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank is here (the same loggers on every rank)
        return None if log_dir is None else Path(log_dir) / "distill"

    def _export(self, trainer: pl.Trainer, folder: Path) -> None:
        if trainer.global_rank != 0:
            return
        last = self.history[-1] if self.history else {}
        lines = []
        for key, student in self.students.items():
            if not student.fitted:
                continue
            if key in self._failed:
                rank_zero_warn(f"Distiller: student {key!r} is not exported: its latest fit failed (warned above).")
                continue
            try:  # one student's export failing must not stop the others
                path = self._export_one(trainer, folder, key, student, last)
            except Exception as err:
                self._fail(trainer, f"exporting student {key!r}", err)
                continue
            self.exported[key] = str(path)
            lines.append(f"- {key}: `{path}`")
        if lines:
            _logging.log_text(trainer, "distillation/exported", "Exported students:\n\n" + "\n".join(lines))

    def _export_one(self, trainer: pl.Trainer, folder: Path, key: str, student: Student, last: dict) -> Path:
        check_student_key(key)  # again: ``students`` is a public dict, a key may have been added after __init__
        target = folder / key
        if target.resolve().parent != folder.resolve():
            raise ValueError(f"Student key {key!r} would be written outside {folder}.")
        meta = {
            "epochs_trained": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "layer": self.layer,
            "input_key": self.adapter.input_key if isinstance(self.adapter.input_key, (int, str)) else None,
            "teacher": type(self.teacher(trainer.lightning_module)).__name__,
            "metrics": {k: v for k, v in (last.get(key) or {}).items() if isinstance(v, float)},
        }
        return save_student(student, target, meta)

    # ------------------------------------------------------------------ errors and state
    def _fail(self, trainer: pl.Trainer, what: str, err: Exception, key: str | None = None) -> None:
        """Raise under ``strict``; otherwise warn on this rank (named under DDP), once per failure (``key``,
        default ``what``, and the error): a batch format the Distiller cannot read fails at every step."""
        if self.strict:
            raise err
        seen = (key or what, type(err).__name__, str(err))
        warned: set[Any] = self.__dict__.setdefault("_warned_failures", set())
        if seen in warned:
            return
        warned.add(seen)
        warn_rank(
            f"Distiller failed while {what}: {type(err).__name__}: {err}. Training continues (the same failure is not "
            "reported again); pass strict=True to raise instead.",
            trainer,
        )

    def _agreed_failure(
        self, agreement: Agreement, key: tuple[str, ...], err: Exception | None, message: Any
    ) -> None:
        """An agreed failure: under ``strict`` every rank raises (the failing one its own error, the others a
        RuntimeError naming it: no rank is left waiting); otherwise rank zero warns naming each failing rank's
        error, and each failing rank warns too, once per failure."""
        if self.strict:
            if err is not None and not agreement.local_ok:
                raise err
            raise RuntimeError(message(agreement.why))
        agreement.warn(
            lambda why: message(why) + " Training continues (the same failure is not reported again); pass "
            "strict=True to raise instead.",
            self.__dict__.setdefault("_warned_failures", set()),
            key,
        )

    def local_state_dict(self) -> dict[str, Any]:
        online = {k: s.to_dict() for k, s in self.students.items() if s.online and s.fitted}
        state: dict[str, Any] = {
            "history": self.history,
            "online": online,
            "generator": self._gen.get_state(),
            **self.budget_state(),
        }
        if self.checkpoint_buffer:  # raw inputs: left out by default (~38 MB per checkpoint at 3x32x32)
            state.update(buffer=self.buffer.state_dict(), val=self.val.state_dict(), val_frozen=self._val_frozen)
        return state

    def load_local_state_dict(self, state_dict: dict[str, Any]) -> None:
        # without saved rows (checkpoint_buffer=False) the buffers start empty: the training rows refill from the
        # batches after the resume, the validation rows are taken again at the next validation
        if state_dict.get("buffer"):
            self.buffer.load_state_dict(state_dict["buffer"])
        else:
            self.buffer.clear()
        if state_dict.get("val"):
            self.val.load_state_dict(state_dict["val"])
            self._val_frozen = bool(state_dict.get("val_frozen", False))
        else:
            self.val.clear()
            self._val_frozen = False
        self.history = list(state_dict.get("history", []))
        for k, d in (state_dict.get("online") or {}).items():
            if k in self.students:
                self.students[k] = student_from_dict(d)
        if "generator" in state_dict:
            self._gen.set_state(state_dict["generator"])
        self.load_budget_state(state_dict)

    def reshard_state(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """Another world size: the saved rows of all ranks are dealt out round-robin, oldest first, so none is
        duplicated and none is lost while they fit the buffers (a rank dealt more than its buffer holds keeps the
        most recent of every rank); the generator and online students come from rank ``rank % saved ranks``, the
        history (the same on every rank) from rank zero."""
        state = {k: v for k, v in states[rank % len(states)].items() if k not in ("buffer", "val", "val_frozen")}
        state["history"] = states[0].get("history", [])
        for name in ("buffer", "val"):
            parts = [s[name]["rows"] for s in states if s.get(name) and s[name].get("rows")]
            if not parts:
                continue
            rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            # oldest first across ranks (a row's age is its place from the end of its rank's buffer; ties in rank
            # order), so that a rank holding fewer rows than it is dealt keeps the most recent of every rank
            sizes = [int(next(iter(p.values())).shape[0]) for p in parts]
            age = torch.cat([torch.arange(-n, 0) for n in sizes])
            order = torch.sort(age, stable=True).indices
            idx = order[rank::world]
            state[name] = {"rows": {k: v[idx] for k, v in rows.items()}, "seen": int(idx.numel())}
            if name == "val":
                state["val_frozen"] = any(bool(s.get("val_frozen")) for s in states)
        return state

    def reshard_note(self, saved_world: int, world: int) -> str:
        return (
            f"the buffered rows of the {saved_world} saved rank(s) are dealt out to the {world} ranks round-robin "
            "(each keeps the most recent rows its buffer holds; empty buffers when they were not checkpointed), "
            f"generators and online students come from rank r mod {saved_world}"
        )


def _snapshot(student: Student) -> dict[str, Any] | None:
    """A copy of a student's attributes before a fit, to restore when the fit fails (None: not copyable)."""
    try:
        return copy.deepcopy(student.__dict__)
    except Exception:  # an attribute that cannot be copied: a failed fit then clears the student instead
        return None


def _restore(student: Student, backup: dict[str, Any] | None) -> None:
    if backup is None:
        student.task_ = None  # fitted is "task_ is not None": a half-fitted student is not taken for a fitted one
        return
    student.__dict__.clear()
    student.__dict__.update(backup)
