"""InfluenceMonitor: which training samples made each probe prediction, tracked while the model trains.

TracIn (Pruthi et al. 2020, NeurIPS) sums, over checkpoints of the training trajectory, the learning rate
times the inner product of a training sample's and a test sample's loss gradients. A post-hoc tool needs
saved checkpoint files (Captum's ``TracInCP``); this callback *is* on the trajectory: on every due
validation epoch it takes the live weights as a checkpoint, with the learning rate the optimiser used in
that epoch, and accumulates

- ``scores[i, j] += lr * g(probe_i) . g(train_j)`` for the probe set (validation samples, as every
  :class:`~explain_callbacks.callbacks.ProbeCallback`) against a bounded training subset, and
- ``self_influence[j] += lr * |g(train_j)|^2``,

then logs per probe sample its top proponents and opponents, and the most self-influential training
samples (the likely mislabelled ones). The functional twins are
:func:`~explain_callbacks.analysis.tracin_scores` / :func:`~explain_callbacks.analysis.self_influence`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from .. import viz
from .._internal.distributed import gather_objects
from .._internal.guard import rng_guard
from ..analysis.influence import (
    RandomProjection,
    adam_preconditioner,
    layer_parameters,
    per_sample_gradients,
)
from ._logging import class_name, find_class_names, markdown_table, tensorboard_writers
from .base import ProbeCallback, class_indices, non_default_settings

__all__ = ["InfluenceMonitor"]

_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


class InfluenceMonitor(ProbeCallback):
    """TracIn data attribution (Pruthi et al. 2020) of the probe set, accumulated over due epochs.

    Training subset: ``num_train`` samples drawn once at the start of fit from the train dataloader's
    dataset with a generator seeded by ``seed`` (never the global RNG), read through the loader's
    ``collate_fn``; for an ``IterableDataset`` (or ``train_source="stream"``) the first ``num_train``
    samples of the training batches. Every rank holds the same subset and differentiates its share
    (rows ``rank::world``); results are gathered once per due epoch, after the ranks agreed.

    Gradients: per-sample, by ``torch.func`` (``vmap(grad(functional_call))``) on the live model in eval
    mode inside the model guard (weights, ``.grad``, modes and the global RNG untouched), of the
    parameters of ``layers`` only: ``"last"`` (default: the last module holding parameters, cheap and the
    paper's choice), module names, or None (all). ``projection_dim`` projects gradients to ``k`` random
    directions (seeded) for large layers. Memory: ``batch_size`` rows per call.

    Learning rate: read from the optimisers' parameter groups at each due epoch (per parameter: its
    group's rate; parameters no optimiser holds weigh 0). Under Adam/AdamW ``optimizer_metric="sgd"``
    (default) computes TracIn's SGD form with the current rate, as Captum does (the step direction Adam
    took differs: a warning says so once); ``"adam"`` weights each coordinate by Adam's
    ``1 / (sqrt(v_hat) + eps)`` from ``exp_avg_sq``, the inner product in Adam's metric.

    Args:
        num_train: size of the training subset (all ranks together).
        num_samples: probe size per rank (validation samples).
        top_k: proponents and opponents logged per probe sample.
        layers: ``"last"``, module names, or None.
        projection_dim: random projection dimension, None for exact gradients.
        loss: ``"cross_entropy"``, ``"mse"`` or a function ``loss(output, target)`` (one-row batches).
        optimizer_metric: ``"sgd"`` or ``"adam"`` (see above).
        seed: seeds the subset and the projection.
        train_source: ``"auto"``, ``"dataset"`` or ``"stream"``.
        log_probes: probe samples (of rank zero) whose proponents are drawn.
        log_self_top: most self-influential samples shown.
        batch_size: rows per per-sample-gradient call.
        budget: the share of the training time the monitor may spend during ``fit`` (:class:`ProbeCallback`; 2 % by
            default): an epoch whose TracIn step does not fit is left out of the sum (TracIn over fewer checkpoints,
            listed in :attr:`epochs`), never a part of the probe or of the training subset; ``budget=None`` adds every
            due epoch (the paper's checkpoints). The unit of work is one row of the training subset: before a
            measurement the step starts with the probe's gradients and one row, then goes on in pieces that double
            while the budget covers the rows left at the measured cost per row; when it does not, the epoch's
            gradients are dropped and the epoch left out — except while no step has been added yet: the first step
            is completed whatever it costs, so that a run shows influence at all (TracIn over one checkpoint).
        **kwargs: :class:`ProbeCallback` arguments (``every_n_epochs``, ``input_key``, ``label_key``,
            ``model_attr``, ``output_key``, ``strict``, ...).

    Logs (TensorBoard, rank zero): ``influence/probe_<i>`` (probe, then proponents, then opponents, each
    labelled ``label:score``), ``influence/probe_<i>/table``, ``influence/self_influence/top`` (image and
    table), ``influence/self_influence`` (histogram) and the scalar ``cost/seconds/influence``. The accumulated
    results are in :attr:`scores` ``(probe of all ranks, num_train)``, :attr:`self_influence`
    ``(num_train,)`` and :attr:`train_indices` (dataset indices; -1 when streamed).
    """

    probe_bound_state = ("influence_local", "self_influence_local", "influence_epochs")
    budget_scales_probes = False  # the sums are over the whole probe: a budget leaves epochs out, never probes

    def __init__(
        self,
        num_train: int = 256,
        num_samples: int = 8,
        top_k: int = 5,
        layers: str | list[str] | None = "last",
        projection_dim: int | None = None,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
        optimizer_metric: str = "sgd",
        seed: int = 0,
        train_source: str = "auto",
        log_probes: int = 4,
        log_self_top: int = 16,
        batch_size: int = 64,
        budget: float | None = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, batch_size=batch_size, budget=budget, **kwargs)
        if num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {num_train}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (rows per gradient call), got {batch_size!r}.")
        if optimizer_metric not in ("sgd", "adam"):
            raise ValueError(f"optimizer_metric must be 'sgd' or 'adam', got {optimizer_metric!r}.")
        if train_source not in ("auto", "dataset", "stream"):
            raise ValueError(f"train_source must be 'auto', 'dataset' or 'stream', got {train_source!r}.")
        if isinstance(loss, str) and loss not in _LOSSES:
            raise ValueError(f"loss must be one of {sorted(_LOSSES)} or a function, got {loss!r}.")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 or None, got {projection_dim}.")
        self.num_train = num_train
        self.top_k = top_k
        self.layers = layers
        self.projection_dim = projection_dim
        self.loss_fn = _LOSSES[loss] if isinstance(loss, str) else loss
        self.optimizer_metric = optimizer_metric
        self.seed = seed
        self.train_source = train_source
        self.log_probes = log_probes
        self.log_self_top = log_self_top
        self.rows = batch_size
        # the training subset (the same on every rank) and this rank's accumulators
        self.train_x: Tensor | None = None
        self.train_y: Tensor | None = None
        self.train_indices: Tensor | None = None
        self._streaming = False
        self._stream_x: Tensor | None = None  # rows taken from training batches (train_source="stream")
        self._stream_y: Tensor | None = None
        self._acc: Tensor | None = None  # (probe of all ranks, this rank's share of the subset), float64
        self._acc_self: Tensor | None = None  # (this rank's share,)
        self.epochs: list[int] = []
        self.lrs: list[float] = []
        self._projection: RandomProjection | None = None
        self._warned_adam = False
        # gathered results (every rank)
        self.scores: Tensor | None = None
        self.self_influence: Tensor | None = None
        # under the budget, within a step: the rows of its first piece and the rows' seconds spent so far
        self._first_rows: int | None = None
        self._row_seconds = 0.0
        self._piece_rows_seconds = 0.0

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "num_train": self.num_train, "layers": str(self.layers)}

    def setting_fields(self) -> dict[str, Any]:
        return non_default_settings(
            self, projection_dim=self.projection_dim, optimizer_metric=self.optimizer_metric, seed=self.seed,
            train_source=self.train_source,
        )  # fmt: skip

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {
            "train_x": self.train_x,
            "train_y": self.train_y,
            "train_indices": self.train_indices,
            "influence_local": self._acc,
            "self_influence_local": self._acc_self,
            "influence_epochs": list(self.epochs),
            "influence_lrs": list(self.lrs),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.train_x, self.train_y = state.get("train_x"), state.get("train_y")
        self.train_indices = state.get("train_indices")
        self._acc, self._acc_self = state.get("influence_local"), state.get("self_influence_local")
        self.epochs = list(state.get("influence_epochs") or [])
        self.lrs = list(state.get("influence_lrs") or [])[: len(self.epochs)]

    def reshard_note(self, saved_world: int, world: int) -> str:
        return (
            super().reshard_note(saved_world, world)
            + "; the influence accumulated so far is restarted (each rank's share of the training subset changed)"
        )

    # ------------------------------------------------------------------ the training subset
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_x is not None:
            return  # kept from an earlier fit or a checkpoint: the influence stays comparable
        loader = trainer.train_dataloader
        if isinstance(loader, (Mapping, list, tuple)):  # several train loaders: the first
            loader = next(iter(loader.values())) if isinstance(loader, Mapping) else loader[0]
        dataset = getattr(loader, "dataset", None)
        mapstyle = (
            dataset is not None
            and not isinstance(dataset, IterableDataset)
            and hasattr(dataset, "__getitem__")
            and hasattr(dataset, "__len__")
        )
        if self.train_source == "dataset" and not mapstyle:
            raise ValueError(
                "InfluenceMonitor(train_source='dataset') needs a train dataloader over a map-style dataset "
                "(with __len__ and __getitem__); pass train_source='stream' to take the subset from training batches."
            )
        if self.train_source == "stream" or not mapstyle:
            self._streaming = True
            return
        subset, problem = None, None
        try:
            with rng_guard(), torch.inference_mode(False):  # a dataset's transforms may draw from the global RNG
                gen = torch.Generator().manual_seed(self.seed)
                idx = torch.randperm(len(dataset), generator=gen)[: self.num_train]
                collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
                x, y = self.adapter(collate([dataset[int(i)] for i in idx]))
            if y is None:
                raise ValueError("the training batches hold no labels (the loss needs them); set label_key")
            subset = (x.detach().cpu().clone(), y.detach().cpu().clone(), idx)
        except Exception as err:
            if self.strict:
                raise
            problem = err
        # every rank holds the same subset, or every rank streams one: a rank that alone could not read the
        # dataset would otherwise hold another subset (and wait alone in the stream's gather)
        agreement = self.agree(trainer, subset is not None, problem)
        if not agreement.ok:
            self._streaming = True
            self.report_failure(
                agreement, ("subset",),
                lambda why: f"InfluenceMonitor could not read its training subset from the dataset ({why}); it "
                "takes it from the training batches instead (train_source='stream').",
            )  # fmt: skip
            return
        assert subset is not None
        self.train_x, self.train_y, self.train_indices = subset

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._streaming or self.train_x is not None:
            return
        have = 0 if self._stream_x is None else int(self._stream_x.shape[0])
        share = -(-self.num_train // max(trainer.world_size, 1))
        if have >= share:
            return
        try:
            with torch.inference_mode(False):
                x, y = self.adapter(batch)
                if y is None:
                    raise ValueError("the training batches hold no labels (the loss needs them); set label_key")
                x, y = x[: share - have].detach().cpu().clone(), y[: share - have].detach().cpu().clone()
        except Exception as err:  # the explain step then says, on every rank, that no subset was taken
            if self.strict:
                raise
            self.warn_failure(
                ("stream", type(err).__name__, str(err)),
                f"InfluenceMonitor could not take training rows from a batch ({type(err).__name__}: {err}).",
            )
            return
        self._stream_x = x if self._stream_x is None else torch.cat([self._stream_x, x])
        self._stream_y = y if self._stream_y is None else torch.cat([self._stream_y, y])

    def _finish_stream(self, trainer: pl.Trainer) -> None:
        """Every rank's streamed rows, concatenated in rank order: the same subset on every rank (one gather)."""
        parts = gather_objects((self._stream_x, self._stream_y), trainer)
        xs = [p[0] for p in parts if p[0] is not None]
        ys = [p[1] for p in parts if p[1] is not None]
        self.train_x, self.train_y = torch.cat(xs)[: self.num_train], torch.cat(ys)[: self.num_train]
        self.train_indices = torch.full((self.train_x.shape[0],), -1, dtype=torch.long)
        self._stream_x = self._stream_y = None

    # ------------------------------------------------------------------ explaining
    def _scales(
        self, trainer: pl.Trainer, model: nn.Module, names: list[str]
    ) -> tuple[dict[str, Tensor | float], float]:
        """Per-parameter weights of the inner product: the learning rate of each parameter's group (times Adam's
        preconditioner under ``optimizer_metric="adam"``), and the (first) learning rate for the record."""
        params = dict(model.named_parameters())
        lr_of: dict[int, float] = {}
        adam = None
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    lr_of[id(p)] = float(group["lr"])
                    if id(p) in {id(params[n]) for n in names} and "exp_avg_sq" in opt.state.get(p, {}):
                        adam = opt
        if not any(id(params[n]) in lr_of for n in names):
            raise ValueError(
                f"InfluenceMonitor: none of the parameters of layers={self.layers!r} ({names[:4]}) is trained by an "
                "optimizer, so every TracIn score is 0; pick trained layers."
            )
        if adam is not None and self.optimizer_metric == "sgd" and not self._warned_adam:
            self._warned_adam = True
            rank_zero_warn(
                "InfluenceMonitor: the optimizer is Adam-like; TracIn is computed in its SGD form with the current "
                "learning rate (as Captum's TracInCP), not along Adam's preconditioned steps. Pass "
                "optimizer_metric='adam' to weight coordinates by 1/(sqrt(v_hat)+eps) from exp_avg_sq."
            )
        pre = adam_preconditioner(adam, model, names) if adam is not None and self.optimizer_metric == "adam" else None
        scales: dict[str, Tensor | float] = {}
        for n in names:
            lr = lr_of.get(id(params[n]), 0.0)
            scales[n] = lr * pre[n] if pre is not None else lr
        first = next(lr_of[id(params[n])] for n in names if id(params[n]) in lr_of)
        return scales, first

    def _explain_within_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A TracIn step under the budget, in rows of the training subset (see ``budget``): the rows' seconds give
        the cost per row, the rest of the step (the probe's gradients, the gathers, the figures) its fixed cost."""
        n = self.num_train if self.train_x is None else int(self.train_x.shape[0])
        k = self.budget_units(trainer, n, first=1, scales=False, kind="row")  # 1 before a measurement, else n or 0
        if k <= 0:
            self._budget_skipped += 1
            return
        self._first_rows, self._row_seconds = k, 0.0
        epochs = len(self.epochs)
        start = self.clock()
        try:
            self.run_explain(trainer, pl_module)
        finally:
            seconds = self.clock() - start
            self._first_rows = None
        rest = max(seconds - self._row_seconds, 0.0)  # the rows' seconds were spent piece by piece
        self._spent += rest
        if len(self.epochs) > epochs:  # the step was added to the sum
            self._fixed["row"] = rest
            self.budget_log.append((int(trainer.current_epoch), n))
            self._fit_explanations += 1
        else:
            self._budget_skipped += 1

    def _rows_allowed(self, trainer: pl.Trainer, done: int, last: int, n: int) -> int:
        """The rows of the next piece of a budgeted step (0: the rows left do not fit; the step is dropped): twice
        the ``last`` piece's rows, when the budget covers every row left at the measured cost per row (agreed)."""
        if self._first_rows is None:
            return n - done
        grown = min(n - done, max(1, int(self.budget_growth * last)))
        if not self.epochs:
            # no step in the sum yet: this one is completed (in growing pieces) whatever it costs, since a monitor
            # that never completes a step shows nothing at all (`epochs` is agreed across ranks, like every step)
            return grown
        times = self._budget_times(trainer, True, "row")
        if times is None:
            return n - done
        allowed, per_row, fixed = times
        if allowed - fixed < per_row * (n - done):
            return 0
        return grown

    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            # TracIn sums over the training trajectory: trainer.validate()/test() would add the final weights again.
            # Said only when nothing was accumulated (the callback attached to validate/test alone): a test after
            # fit is the usual script and keeps the results of fit.
            if not self.epochs and not self.__dict__.get("_warned_not_fit"):
                self._warned_not_fit = True
                rank_zero_warn(
                    "InfluenceMonitor accumulates TracIn over the epochs of trainer.fit; trainer.validate()/test() "
                    "add nothing (read .scores / .self_influence, or call analysis.tracin_scores on the model)."
                )
            return
        if self.train_x is None and self._streaming:
            agreement = self.agree(trainer, self._stream_x is not None, "no training rows taken from batches yet")
            if not agreement.ok:
                self.report_failure(agreement, ("stream",), lambda why: f"InfluenceMonitor skipped: {why}.")
                return
            self._finish_stream(trainer)
        ok = self.train_x is not None and y is not None
        why = "no training subset (no train dataloader seen)" if self.train_x is None else "the probe has no labels"
        agreement = self.agree(trainer, ok, None if ok else why)
        if not agreement.ok:
            self.report_failure(agreement, ("subset",), lambda w: f"InfluenceMonitor skipped: {w}.")
            return
        assert self.train_x is not None and self.train_y is not None and y is not None
        model = self.model(pl_module)
        device = pl_module.device
        rank, world = trainer.global_rank, max(trainer.world_size, 1)
        n = int(self.train_x.shape[0])
        own = torch.arange(rank, n, world)
        dtype = x.dtype
        kw: dict[str, Any] = {}
        empty: list[Tensor] = [torch.empty(0)]  # (0, gradient dims), set with the probe's gradients

        def rows_of(a: int, b: int) -> Tensor:
            """This rank's rows among rows [a, b) of the subset, as gradients (timed on the budget's clock)."""
            start = self.clock()
            mine = own[(own >= a) & (own < b)]
            if mine.numel() == 0:  # a piece smaller than the world: no row of it on this rank
                return empty[0]
            tx = self.train_x[mine].to(device, dtype if self.train_x.is_floating_point() else None)
            g = per_sample_gradients(model, tx, self.train_y[mine].to(device), self.loss_fn, **kw)
            self._piece_rows_seconds = self.clock() - start
            return g

        def compute() -> Tensor:
            # inside run_agreed: a bad layers= fails here on every rank, under the error policy, before any gather
            names = layer_parameters(model, self.layers)
            if self.projection_dim is not None and self._projection is None:
                dim = sum(dict(model.named_parameters())[n].numel() for n in names)
                self._projection = RandomProjection(dim, self.projection_dim, self.seed)
            scales, lr = self._scales(trainer, model, names)
            self._last_lr = lr
            kw.update(names=names, scale=scales, projection=self._projection, batch_size=self.rows)
            g_probe = per_sample_gradients(model, x, y, self.loss_fn, **kw)
            empty[0] = g_probe[:0]
            # one tensor for the agreement's finiteness check: probe rows first, then this rank's first rows
            return torch.cat([g_probe, rows_of(0, first)])

        # the first rows: all of them, or under a budget not measured yet one (then pieces while the budget allows)
        first = n if self._first_rows is None else min(self._first_rows, n)
        self._piece_rows_seconds = 0.0
        done = self.run_agreed(trainer, "TracIn gradients", compute, "are NaN/Inf (check the loss and the model)")
        self._spend_rows(first)
        if done is None:
            return
        grads, seconds = done
        g_probe, parts = grads[: x.shape[0]], [grads[x.shape[0] :]]
        covered = k = first
        while covered < n:
            k = self._rows_allowed(trainer, covered, k, n)
            if k <= 0:  # the rows left do not fit the budget: this epoch is left out of the sum, on every rank
                return
            a = covered
            self._piece_rows_seconds = 0.0
            more = self.run_agreed(trainer, "TracIn gradients", functools.partial(rows_of, a, a + k),
                                   "are NaN/Inf (check the loss and the model)")  # fmt: skip
            self._spend_rows(k)
            if more is None:
                return
            parts.append(more[0])
            seconds += more[1]
            covered += k
        g_train = torch.cat(parts)
        start = time.perf_counter()
        g_all = self.gather_rows(trainer, g_probe)  # every rank's probe: scores for all probe rows
        if self._acc is None or self._acc.shape != (g_all.shape[0], own.numel()):
            self._acc = torch.zeros(g_all.shape[0], own.numel(), dtype=torch.float64)
            self._acc_self = torch.zeros(own.numel(), dtype=torch.float64)
        assert self._acc_self is not None
        # lrs are folded into the gradients (sqrt(scale) on both sides): plain inner products here
        self._acc += (g_all @ g_train.T).double().cpu()
        self._acc_self += g_train.double().pow(2).sum(1).cpu()
        self.epochs.append(int(trainer.current_epoch))
        self.lrs.append(float(self._last_lr))
        self._collect(trainer)
        self.log_scalar(pl_module, "cost/seconds/influence", seconds + time.perf_counter() - start, sync=False)
        self._log(trainer, x, y)

    def _spend_rows(self, rows: int) -> None:
        """Charge a budgeted step's piece of ``rows`` rows to the budget (its seconds per row for the next piece)."""
        if self._first_rows is None or not self._piece_rows_seconds:
            return
        self.budget_spend(self._piece_rows_seconds, rows, None, kind="row")
        self._row_seconds += self._piece_rows_seconds

    def _collect(self, trainer: pl.Trainer) -> None:
        """Gather every rank's columns once (one all_gather of a packed tensor), in subset order."""
        assert self._acc is not None and self._acc_self is not None and self.train_x is not None
        n, world = self.train_x.shape[0], max(trainer.world_size, 1)
        packed = torch.cat([self._acc_self[None], self._acc])  # (1 + P, n_local)
        if world <= 1:
            self.self_influence, self.scores = packed[0].clone(), packed[1:].clone()
            return
        width = -(-n // world)  # the largest share: ranks below n % world hold one more column
        pad = packed.new_zeros(packed.shape[0], width - packed.shape[1])
        device = trainer.strategy.root_device
        gathered = trainer.strategy.all_gather(torch.cat([packed, pad], 1).to(device)).cpu()  # (world, 1 + P, width)
        full = packed.new_zeros(packed.shape[0], n)
        for r in range(world):
            cols = torch.arange(r, n, world)
            full[:, cols] = gathered[r, :, : cols.numel()]
        self.self_influence, self.scores = full[0], full[1:]

    # ------------------------------------------------------------------ logging
    @staticmethod
    def _images(rows: Tensor) -> Tensor | None:
        """Samples as (N,3,H,W) RGB in [0, 1] when they are images ((C,H,W) or (H,W)); None for other inputs."""
        if rows.ndim == 3:
            rows = rows[:, None]
        if rows.ndim != 4 or rows.shape[1] not in (1, 3) or not rows.is_floating_point():
            return None
        return viz.to_rgb(rows.float())

    def _figure(self, rows: Tensor, texts: list[str], ncol: int) -> Tensor | None:
        """One (3,H,W) image of the samples, ``ncol`` per row: a matplotlib figure with each sample's title
        (label, score) when matplotlib is importable, else a plain :func:`~explain_callbacks.viz.make_grid` of
        the samples in the same order (the tables logged beside it carry the labels and scores)."""
        rgb = self._images(rows)
        if rgb is None:
            return None
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            return viz.make_grid(viz.upscale(rgb, 48), nrow=ncol)
        nrow = -(-rgb.shape[0] // ncol)
        fig = Figure(figsize=(1.3 * ncol, 1.5 * nrow), dpi=72)  # no pyplot: no global figure state
        canvas = FigureCanvasAgg(fig)
        # fixed margins: tight_layout cost more than the TracIn gradients of a small model
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.25 / nrow, wspace=0.08, hspace=0.35)
        for i in range(rgb.shape[0]):
            ax = fig.add_subplot(nrow, ncol, i + 1)
            ax.set_axis_off()
            ax.imshow(rgb[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(texts[i], fontsize=8)
        canvas.draw()
        buf = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
        w, h = canvas.get_width_height()
        return buf.reshape(h, w, 4)[..., :3].permute(2, 0, 1).float() / 255.0

    def _log(self, trainer: pl.Trainer, x: Tensor, y: Tensor) -> None:
        if not trainer.is_global_zero or self.scores is None or self.self_influence is None:
            return
        assert self.train_x is not None and self.train_y is not None and self.train_indices is not None
        labels = class_indices(self.train_y)
        names = find_class_names(trainer)  # "circle" rather than "0" where the data names its classes
        lab = (lambda j: class_name(names, int(labels[j]))) if labels is not None else (lambda j: "-")
        probe_labels = class_indices(y.cpu())
        self.log_histogram(trainer, "influence/self_influence", self.self_influence)
        k = min(self.log_self_top, self.self_influence.numel())
        top = self.self_influence.topk(k).indices
        rows = [(r + 1, int(self.train_indices[j]), lab(j), float(self.self_influence[j])) for r, j in enumerate(top)]
        self.log_text(trainer, "influence/self_influence/top",
                      markdown_table(["rank", "dataset index", "label", "self-influence"], rows))  # fmt: skip
        images = bool(tensorboard_writers(trainer))
        if images:
            texts = [f"#{int(self.train_indices[j])} y={lab(j)}" for j in top.tolist()]
            fig = self._figure(self.train_x[top], texts, 8)
            if fig is not None:
                self.log_image(trainer, "influence/self_influence/top", fig)
        kk = min(self.top_k, self.scores.shape[1])
        for i in range(min(self.log_probes, x.shape[0])):  # rank zero's own probe rows come first in the gather
            s = self.scores[i]
            pro, opp = s.topk(kk).indices, (-s).topk(kk).indices
            table = [("proponent", r + 1, int(self.train_indices[j]), lab(j), float(s[j])) for r, j in enumerate(pro)]
            table += [("opponent", r + 1, int(self.train_indices[j]), lab(j), float(s[j])) for r, j in enumerate(opp)]
            self.log_text(trainer, f"influence/probe_{i}/table",
                          markdown_table(["kind", "rank", "dataset index", "label", "TracIn"], table))  # fmt: skip
            if not images:
                continue
            plabel = "-" if probe_labels is None else class_name(names, int(probe_labels[i]))
            idx = torch.cat([pro, opp])
            rows_x = torch.cat([x[i : i + 1].cpu().to(self.train_x.dtype), self.train_x[idx]])
            texts = [f"probe y={plabel}"] + [f"y={lab(j)} {float(s[j]):+.2g}" for j in idx.tolist()]
            fig = self._figure(rows_x, texts, 1 + 2 * kk)  # one row: probe | proponents | opponents
            if fig is not None:
                self.log_image(trainer, f"influence/probe_{i}", fig)
