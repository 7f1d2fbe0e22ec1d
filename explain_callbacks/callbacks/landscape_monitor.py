"""LandscapeMonitor: energy-landscape conserved weights of the trained network (Niroomand & Wales 2023).

At the end of fit (by default; or on every ``every_n_epochs``-th validation epoch) the callback samples minima of
the loss landscape around the trained weights by basin hopping on a deep copy of the network and a bounded
training subset, aligns them (hidden-unit permutations, sign flips for odd activations), groups the low ones and
ranks the input features by how conserved and how large their first-layer weights are across the group
(:func:`~explain_callbacks.analysis.landscape_analysis`, whose module documents every choice of this
reconstruction). Beside that ranking it logs the global ranking of a gradient attribution method (mean
``|saliency|`` over the probe set) and their Spearman agreement.

Side effects: none on training. The live model is only read (deep-copied, in eval mode inside the model guard),
the basin hopping draws from its own seeded ``torch.Generator``, and the guard restores modes, ``requires_grad``,
``.grad`` and the global RNG; a run with the monitor gives bit-identical weights (tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from .._internal.ops import spearman
from ..analysis.landscape import LOSSES, LandscapeResult, landscape_analysis
from ..attribution import build_attributor
from ..viz.figures import _figure, _style, has_matplotlib
from ._logging import global_step, media_loggers, phase_prefix
from .base import ProbeCallback, non_default_settings

__all__ = ["LandscapeMonitor"]


class LandscapeMonitor(ProbeCallback):
    """Energy-landscape conserved weights (Niroomand & Wales, arXiv:2304.02381) of the trained network.

    Training subset: the first ``num_train`` rows of the training batches this rank sees (first epoch), kept on
    CPU in the callback's state. Snapshots: with ``snapshot_every_n_epochs`` the weights at the end of every
    n-th training epoch (at most ``max_snapshots``, the latest kept) are quenched and added to the minima
    (origin ``"snapshot"``). Probe set (for the attribution ranking): the validation probe of
    :class:`ProbeCallback`; without validation data, the first ``num_samples`` rows of the training subset.

    Under DDP every rank holds a subset of its own; the analysis is run and logged by global rank zero (it draws
    no collective; the other ranks wait at the trainer's next barrier).

    Args:
        num_train: training rows of the landscape (full-batch loss; memory bounded by ``batch_size`` rows).
        n_hops, step_size, temperature, weight_decay, gtol, max_iter, seed, adapt_interval, loss_window, align,
            sign_flips:
            see :func:`~explain_callbacks.analysis.landscape_analysis`.
        loss: ``"cross_entropy"``, ``"mse"`` or ``loss(output, target)``.
        every_n_epochs: None (default): once, at the end of fit; n: on every n-th validation epoch as well.
        snapshot_every_n_epochs: take weight snapshots during training (None: none).
        max_snapshots: snapshots kept (the latest).
        compare_with: the attribution method (registry name or instance) whose global ranking is shown beside.
        top_k: features shown in the figure and table.
        budget: the share of the training time the analysis may take during ``fit``. None (the default): all
            ``n_hops`` hops (the paper-sized sampling; on small MLPs a 2 % share leaves time for the start's minimum
            alone, so nothing would be conserved). With a share the basin hopping gets ``budget × training time``
            seconds (``max_seconds`` of :func:`~explain_callbacks.analysis.basin_hopping`: the start is always
            quenched, then hops while they fit; the table's note says when the limit stopped it);
            ``trainer.validate``/``test`` ignore it.
        **kwargs: :class:`ProbeCallback` arguments (``num_samples``, ``input_key``, ``label_key``, ``target``,
            ``model_attr``, ``output_key``, ``strict``, ``batch_size``...).

    Logs (rank zero): ``landscape/ranking`` (table and figure), ``landscape/minima`` (loss spectrum and PCA of the
    aligned minima coloured by loss), ``landscape/agreement/<method>`` (Spearman of the two rankings),
    ``landscape/minimisations``, ``landscape/unique_minima`` and ``cost/seconds/landscape``. The last result is
    :attr:`result`, the attribution ranking :attr:`attribution_scores`.
    """

    def __init__(
        self,
        num_train: int = 512,
        n_hops: int = 20,
        step_size: float = 0.3,
        temperature: float = 0.02,
        weight_decay: float = 1e-4,
        gtol: float = 1e-4,
        max_iter: int = 500,
        seed: int = 0,
        adapt_interval: int | None = 5,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
        loss_window: float | None = None,
        align: bool = True,
        sign_flips: bool | str = "auto",
        every_n_epochs: int | None = None,
        snapshot_every_n_epochs: int | None = None,
        max_snapshots: int = 10,
        compare_with: Any = "saliency",
        top_k: int = 10,
        num_samples: int = 64,
        batch_size: int = 256,
        budget: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, every_n_epochs=every_n_epochs or 1, batch_size=batch_size,
                         budget=budget, **kwargs)  # fmt: skip
        if num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {num_train}.")
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a function, got {loss!r}.")
        if snapshot_every_n_epochs is not None and snapshot_every_n_epochs < 1:
            raise ValueError(f"snapshot_every_n_epochs must be >= 1 or None, got {snapshot_every_n_epochs}.")
        if sign_flips not in (True, False, "auto"):
            raise ValueError(f"sign_flips must be True, False or 'auto', got {sign_flips!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (rows per loss evaluation), got {batch_size!r}.")
        self.num_train = num_train
        self.landscape_every = every_n_epochs
        self.options = dict(
            n_hops=n_hops, step_size=step_size, temperature=temperature, weight_decay=weight_decay, gtol=gtol,
            max_iter=max_iter, seed=seed, adapt_interval=adapt_interval, loss_window=loss_window, align=align,
            sign_flips=sign_flips,
        )  # fmt: skip
        self.loss = loss
        self.snapshot_every = snapshot_every_n_epochs
        self.max_snapshots = max_snapshots
        self.compare_with = compare_with
        self.top_k = top_k
        self.rows = batch_size
        self.train_x: Tensor | None = None
        self.train_y: Tensor | None = None
        self.snapshots: list[Tensor] = []
        self.result: LandscapeResult | None = None
        self.attribution_scores: Tensor | None = None
        self.agreement: float | None = None

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "num_train": self.num_train}

    def setting_fields(self) -> dict[str, Any]:
        return non_default_settings(self, seed=self.options["seed"], n_hops=self.options["n_hops"])

    def extra_state(self) -> dict[str, Any]:
        return {"train_x": self.train_x, "train_y": self.train_y, "snapshots": list(self.snapshots)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.train_x, self.train_y = state.get("train_x"), state.get("train_y")
        self.snapshots = list(state.get("snapshots") or [])

    # ------------------------------------------------------------------ training data and snapshots
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        have = 0 if self.train_x is None else int(self.train_x.shape[0])
        if have >= self.num_train:
            return
        try:
            with torch.inference_mode(False):
                x, y = self.adapter(batch)
                if y is None:
                    raise ValueError(
                        "the training batches hold no labels (the landscape's loss needs them); set label_key"
                    )
                x = x[: self.num_train - have].detach().cpu().clone()
                y = y[: self.num_train - have].detach().cpu().clone()
        except Exception as err:
            if self.strict:
                raise
            self.warn_failure(("train rows", type(err).__name__), f"LandscapeMonitor could not take training rows "
                              f"from a batch ({type(err).__name__}: {err}).")  # fmt: skip
            return
        self.train_x = x if self.train_x is None else torch.cat([self.train_x, x])
        self.train_y = y if self.train_y is None else torch.cat([self.train_y, y])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.snapshot_every is None or (trainer.current_epoch + 1) % self.snapshot_every:
            return
        params = [p.detach() for p in self.model(pl_module).parameters()]
        # a copy on CPU in float64: reading the weights changes nothing
        self.snapshots.append(torch.cat([p.reshape(-1).double().cpu() for p in params]).clone())
        self.snapshots = self.snapshots[-self.max_snapshots :]

    # ------------------------------------------------------------------ scheduling
    def is_due(self, trainer: pl.Trainer) -> bool:
        if trainer.state.fn == TrainerFn.FITTING and self.landscape_every is None and not trainer.fast_dev_run:
            return False  # at the end of fit only
        return super().is_due(trainer)

    def budget_probes(self, trainer: pl.Trainer) -> int:
        """The whole probe on a due epoch while the budget allows any time (the time limit inside the analysis
        shrinks the sampling), none when it is spent."""
        n = self.num_samples if self.probe_x is None else self.probe_size
        allowed = self.budget_allowed(trainer)
        return n if allowed is None or allowed[0] > 0 else 0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.landscape_every is None and not trainer.fast_dev_run:
            if self.probe_x is None and self.train_x is not None:  # no validation data: probe the training rows
                self.probe_x = self.train_x[: self.num_samples].clone()
                self.probe_y = self.train_y[: self.num_samples].clone() if self.train_y is not None else None
            if self._agree_on_probe(trainer):
                self._fit_explanations += 1
                start = self.clock()
                self.run_explain(trainer, pl_module)
                self.budget_spend(self.clock() - start, self.probe_size, trainer.current_epoch)
        super().on_fit_end(trainer, pl_module)

    # ------------------------------------------------------------------ explaining
    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        if not trainer.is_global_zero:
            return
        if self.train_x is None or self.train_y is None:
            raise RuntimeError("LandscapeMonitor: no training rows were seen (it takes them from training batches).")
        model = self.model(pl_module)
        start = time.perf_counter()
        # under the budget: the seconds left of budget × training time (this rank's clock: rank zero alone runs it)
        allowed = self.budget_allowed(trainer, agreed=False)
        limit = None if allowed is None else max(allowed[0], 0.0)
        result = landscape_analysis(
            model, self.train_x, self.train_y, self.loss, starts=self.snapshots, batch_size=self.rows,
            max_seconds=limit, clock=self.clock, **self.options,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        self.result = result
        self.attribution_scores, self.agreement, method_name = None, None, None
        if self.compare_with is not None:
            method = build_attributor(self.compare_with)
            method_name = getattr(method, "name", type(method).__name__)
            maps = method(model, x, target).detach().abs().double().mean(0).cpu()  # inside run_explain's guard
            self.attribution_scores = self._comparable(maps, result)
            if self.attribution_scores is not None:
                self.agreement = float(spearman(result.channel_scores.flatten(), self.attribution_scores.flatten()))
        self._log(trainer, result, seconds, method_name)

    @staticmethod
    def _comparable(maps: Tensor, result: LandscapeResult) -> Tensor | None:
        """The attribution's global scores on the landscape scores' features: per feature for a Linear first
        layer over flat inputs (or inputs flattened to it), per input channel for a conv first layer."""
        scores = result.scores.score
        if scores.ndim == 1 and maps.numel() == scores.numel():
            return maps.flatten()
        if scores.ndim > 1 and maps.ndim >= 2 and maps.shape[0] == scores.shape[0]:
            return maps.reshape(maps.shape[0], -1).sum(1)
        return None

    # ------------------------------------------------------------------ logging
    def _metrics(self, trainer: pl.Trainer, values: dict[str, float]) -> None:
        # straight to the loggers: pl_module.log is not allowed in on_fit_end, where this monitor runs by default
        step = global_step(trainer)
        prefix = phase_prefix(trainer)
        for logger in trainer.loggers:
            logger.log_metrics({prefix + k: v for k, v in values.items()}, step)

    def _log(self, trainer: pl.Trainer, result: LandscapeResult, seconds: float, method: str | None) -> None:
        values = {
            "landscape/minimisations": float(result.sample.n_minimisations),
            "landscape/unique_minima": float(result.n_unique),
            "cost/seconds/landscape": seconds,
        }
        if self.agreement is not None and method is not None:
            values[f"landscape/agreement/{method}"] = self.agreement
        self._metrics(trainer, values)
        if not media_loggers(trainer):
            return
        s = result.scores
        shape = tuple(s.score.shape)
        k = min(self.top_k, result.ranking.numel())
        attr_rank = None
        if self.attribution_scores is not None and s.score.ndim == 1:
            attr_rank = torch.empty(s.score.numel(), dtype=torch.long)
            attr_rank[torch.argsort(self.attribution_scores, descending=True)] = torch.arange(s.score.numel())
        rows = []
        for r, f in enumerate(result.ranking[:k].tolist()):
            idx = f if len(shape) == 1 else tuple(int(i) for i in torch.unravel_index(torch.tensor(f), shape))
            row = [r + 1, str(idx), float(s.score.flatten()[f]), float(s.conservation.flatten()[f]),
                   float(s.magnitude.flatten()[f])]  # fmt: skip
            if attr_rank is not None:
                row.append(int(attr_rank[f]) + 1)
            rows.append(row)
        headers = ["rank", "feature", "score", "conservation", "magnitude"]
        headers += [f"{method} rank"] if attr_rank is not None else []
        note = (
            f"{result.sample.n_minimisations} minimisations ({result.sample.n_evaluations} loss evaluations, "
            f"{result.sample.seconds:.2f} s), {result.n_unique} unique minima, group of {result.group.numel()}; "
            f"sign flips {'on' if result.sign_flips else 'off'}"
            + (f"; Spearman with {method}: {self.agreement:.3f}" if self.agreement is not None else "")
            + ("".join(f"; {n}" for n in result.notes))
        )
        self.log_table(trainer, "landscape/ranking", headers, rows, note)
        if has_matplotlib():
            with _style():
                self.log_image(trainer, "landscape/ranking", self._ranking_figure(result, method, k))
                self.log_image(trainer, "landscape/minima", self._minima_figure(result))

    def _ranking_figure(self, result: LandscapeResult, method: str | None, k: int) -> Any:
        import numpy as np

        fig = _figure(6.0, 3.2)
        ax = fig.subplots()
        flat = result.scores.score.flatten()
        shape = tuple(result.scores.score.shape)
        top = result.ranking[:k]
        pos = np.arange(k)
        width = 0.4 if self.attribution_scores is not None and flat.numel() == self.attribution_scores.numel() else 0.8
        ax.bar(pos, (flat[top] / flat.max().clamp_min(1e-300)).numpy(), width, label="landscape (conserved weights)")
        if width < 0.8:
            a = self.attribution_scores.flatten()
            ax.bar(pos + width, (a[top] / a.max().clamp_min(1e-300)).numpy(), width, label=f"{method} (mean |map|)")
        names = [str(int(f)) if len(shape) == 1 else str(tuple(int(i) for i in torch.unravel_index(f, shape)))
                 for f in top]  # fmt: skip
        ax.set_xticks(pos + (width / 2 if width < 0.8 else 0), names, rotation=45 if len(shape) > 1 else 0)
        ax.set_xlabel("input feature" if len(shape) == 1 else "(channel, kernel position)")
        ax.set_ylabel("score / max")
        title = "Conserved first-layer weights (Niroomand & Wales)"
        if self.agreement is not None:
            title += f"; Spearman with {method} {self.agreement:.2f}"
        ax.set_title(title)
        ax.legend(loc="best")
        return fig

    @staticmethod
    def _minima_figure(result: LandscapeResult) -> Any:
        fig = _figure(7.5, 3.2)
        ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 2])
        losses = result.losses.numpy()
        in_group = torch.zeros(losses.size, dtype=torch.bool)
        in_group[result.group] = True
        for i, loss in enumerate(losses):
            ax1.hlines(loss, 0, 1, colors="C3" if in_group[i] else "0.4", lw=1.2)
        ax1.set_xticks([])
        ax1.set_ylabel("loss (+ L2)")
        ax1.set_title(f"{losses.size} unique minima (red: group)")
        emb = result.embedding.numpy()
        sc = ax2.scatter(emb[:, 0], emb[:, 1], c=losses, cmap="viridis", s=28, edgecolors="k", linewidths=0.3)
        v = result.explained_variance
        ax2.set_xlabel(f"PC 1 ({100 * float(v[0]):.0f}%)")
        ax2.set_ylabel(f"PC 2 ({100 * float(v[1]):.0f}%)")
        ax2.set_title("aligned minima, PCA")
        fig.colorbar(sc, ax=ax2, label="loss")
        return fig
