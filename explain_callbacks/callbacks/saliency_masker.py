"""SaliencyMasker: train a real-time masking network (Dabkowski & Gal 2017) alongside the classifier."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .. import viz
from .._internal.checks import check_floating
from .._internal.guard import detach_clone, model_guard, rng_guard
from .._internal.outputs import output_adapter
from .._internal.targets import resolve_target
from ..attribution.base import make_generator
from ..attribution.blackbox.realtime import MaskerObjective, MaskingNetwork, RealTimeSaliency, train_masker_step
from .base import ProbeCallback, check_forward, eager_forward, float_dtype, non_default_settings

__all__ = ["SaliencyMasker"]


class SaliencyMasker(ProbeCallback):
    """Trains a small masking network g(x, c) → m next to the classifier, then explains in one pass.

    After every ``every_n_steps``-th training batch (from ``start_epoch`` on), the masker takes one
    step of its own optimiser on that batch against the classifier frozen inside the model guard
    (eval mode, parameters frozen, gradients only for the masker, global RNG restored): the
    classifier's weights, optimiser, BatchNorm statistics and random stream are untouched, so a run
    with this callback gives bit-identical classifier weights to a run without it. The objective is
    :class:`~explain_callbacks.attribution.MaskerObjective` (area, smoothness, preserver and destroyer
    hinges, a class selector that sometimes asks for a wrong class). The masker's own randomness (the
    selector, noise alternatives) comes from a seeded generator kept in the checkpoint.

    On due validation epochs it logs, for the probe set: a figure of the inputs and their masks
    (``masker/maps``), the Dabkowski & Gal saliency metric ``faithfulness/saliency_metric/masker``
    (lower is better), the mean mask area ``maps/area/masker``; and, every epoch, the masker's
    training losses ``masker/train_loss/<part>``.

    Args:
        masker: a network ``(x, target) -> (B,1,H,W)`` mask; default a :class:`MaskingNetwork` of
            ``width`` built at the first training batch (from the input channels and the number of
            classifier outputs).
        lr: Adam learning rate of the masker.
        every_n_steps: train the masker on every n-th training batch.
        start_epoch: first epoch to train the masker (let the classifier warm up).
        objective: a :class:`MaskerObjective`, or a dict of its fields.
        seed: seed of the masker's initialisation and of its generator.
        max_images: masks drawn per logged grid.
        budget: the share of the training time the masker may take during ``fit``, its training steps and its
            explanations together. None (the default): the masker is what this callback trains, so it trains on
            every ``every_n_steps``-th batch (the paper's schedule: one masker step per classifier step, several
            times the classifier's cost). With a share (``budget=0.02``) a batch trains the masker only while the
            time spent so far plus one step (measured) stays within ``budget`` × the training time, so a masker
            step costing several classifier steps is taken on every few hundredth batch: enough to watch it, not
            to train a masker that explains well. The decision is each rank's own (no collective depends on a
            step; the maskers are averaged at each epoch's end).
        **kwargs: :class:`ProbeCallback` arguments (num_samples, every_n_epochs, target, ...). ``target``
            also picks the classes the masker trains on: the batch's labels (``"label"``), the classifier's
            predictions (``"prediction"``: multi-label or unlabelled data) or one class (an int).

    Images (B,C,H,W) only. Under DDP each rank trains its own copy of the masker on its shard.
    """

    def __init__(
        self,
        masker: nn.Module | None = None,
        width: int = 16,
        lr: float = 1e-3,
        every_n_steps: int = 1,
        start_epoch: int = 0,
        objective: MaskerObjective | dict[str, Any] | None = None,
        seed: int = 0,
        max_images: int = 16,
        log_images: bool = True,
        num_samples: int = 16,
        budget: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, budget=budget, **kwargs)
        if self.target is None:
            raise ValueError(
                "SaliencyMasker trains and explains class-conditional masks: target must be 'label', "
                "'prediction' or an int class, not None."
            )
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if objective is None:
            objective = MaskerObjective()
        elif not isinstance(objective, MaskerObjective):
            objective = MaskerObjective(**dict(objective))
        self.objective = objective
        self.masker = masker
        self.width = width
        self.lr = lr
        self.every_n_steps = every_n_steps
        self.start_epoch = start_epoch
        self.seed = seed
        self.max_images = max_images
        self.log_images = log_images
        self.num_classes: int | None = getattr(masker, "num_classes", None)
        self.optimizer: torch.optim.Optimizer | None = None
        self._generator: torch.Generator | None = None
        self._pending: dict[str, Any] | None = None
        self._steps = 0
        self._sums: dict[str, float] = {}
        self._count = 0
        self._disabled = False

    def key_fields(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "seed": self.seed}

    def setting_fields(self) -> dict[str, Any]:
        # two maskers compared side by side (another width, objective or start) are two states
        return non_default_settings(
            self, width=self.width, lr=self.lr, every_n_steps=self.every_n_steps, start_epoch=self.start_epoch,
            objective=self._objective_changes(), target=self.target, every_n_epochs=self.every_n_epochs,
            model_attr=self.model_attr,
        )  # fmt: skip

    def _objective_changes(self) -> dict[str, Any] | None:
        """The objective's fields that differ from :class:`MaskerObjective`'s defaults (None: none do)."""
        default = MaskerObjective()
        changed = {
            f: getattr(self.objective, f) for f in vars(default) if getattr(self.objective, f) != getattr(default, f)
        }
        return changed or None

    # ------------------------------------------------------------------ building
    def _build(self, pl_module: pl.LightningModule, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"SaliencyMasker needs image batches (B,C,H,W), got inputs of shape {tuple(x.shape)}; use "
                "AttributionMonitor with a black-box method (rise, hsic, occlusion) for other data."
            )
        device = pl_module.device
        model = self.model(pl_module)
        if self.num_classes is None:
            out = model(x[:1])
            if out.ndim != 2 or out.shape[1] < 2:
                raise ValueError("SaliencyMasker needs a classifier with at least two class outputs (B, K).")
            self.num_classes = int(out.shape[1])
        if self.masker is None:
            with rng_guard():  # a deterministic initialisation that leaves the global stream alone
                torch.manual_seed(self.seed)
                self.masker = MaskingNetwork(x.shape[1], self.num_classes, self.width)
        self.masker.to(device=device, dtype=x.dtype)  # the classifier's dtype (x is cast to it)
        self.optimizer = torch.optim.Adam(self.masker.parameters(), lr=self.lr)
        self._generator = make_generator(device, self.seed)
        if self._pending is not None:
            pend, self._pending = self._pending, None
            self.masker.load_state_dict(pend["masker"])
            if pend.get("optimizer") is not None:
                self.optimizer.load_state_dict(pend["optimizer"])
            if pend.get("generator") is not None:
                with contextlib.suppress(RuntimeError):  # a checkpoint from another device type
                    self._generator.set_state(pend["generator"])
            self._steps = int(pend.get("steps", 0))

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        if self.masker is None and self._pending is not None:
            return dict(self._pending)
        if self.masker is None:
            return {}
        return {
            "masker": {k: v.detach().cpu().clone() for k, v in self.masker.state_dict().items()},
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "generator": None if self._generator is None else self._generator.get_state(),
            "num_classes": self.num_classes,
            "steps": self._steps,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "masker" not in state:
            return
        self.num_classes = state.get("num_classes", self.num_classes)
        self._pending = {k: state.get(k) for k in ("masker", "optimizer", "generator", "steps")}
        if self.masker is not None and self.optimizer is not None:  # already built: restore at once
            pend, self._pending = self._pending, None
            self.masker.load_state_dict(pend["masker"])
            if pend.get("optimizer") is not None:
                self.optimizer.load_state_dict(pend["optimizer"])
            self._steps = int(pend.get("steps") or 0)

    # ------------------------------------------------------------------ training the masker
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch < self.start_epoch or batch_idx % self.every_n_steps != 0 or self._disabled:
            return
        # the budget, on this rank's times (a per-batch collective would cost more than it saves)
        if self.budget_units(trainer, 1, agreed=False, kind="step") < 1:
            self._budget_skipped += 1
            return
        start = self.clock()
        try:
            self._train_step(pl_module, batch)
            self.budget_spend(self.clock() - start, 1, None, kind="step")
        except Exception as err:
            if self.strict:
                raise
            # the masker is an add-on: stop training it, never the classifier
            self._disabled = True
            rank_zero_warn(
                f"SaliencyMasker stopped training its masker at epoch {trainer.current_epoch}: "
                f"{type(err).__name__}: {err}. Classifier training continues; pass strict=True to raise instead."
            )

    def _train_step(self, pl_module: pl.LightningModule, batch: Any) -> None:
        x, y = self.adapter(batch)
        if y is None and self.target == "label":
            raise ValueError(
                "SaliencyMasker trains on labelled batches; set label_key so labels can be found, or "
                "target='prediction' to train on the classifier's predictions."
            )
        model = self.model(pl_module)
        check_forward(model)
        # the classifier's own dtype (float64, bf16-true weights) and its scores (output_key, .logits)
        with model_guard(pl_module), eager_forward(pl_module), output_adapter(model, self.output_key):
            check_floating(x)  # uint8 images: the masker multiplies and blurs them
            x = detach_clone(x, float_dtype(model)).to(pl_module.device)
            check_forward(model, x)
            y = None if y is None else detach_clone(y).to(pl_module.device)
            # the target policy: labels (one class per sample), the prediction, or a fixed class
            target = resolve_target(self.target, model, x, y, self.batch_size)
            if target is None:  # target='prediction' on a single-output model
                raise ValueError("SaliencyMasker needs a classifier with at least two class outputs (B, K).")
            if self.masker is None or self.optimizer is None:
                self._build(pl_module, x)
            assert self.masker is not None and self.optimizer is not None and self._generator is not None
            parts = train_masker_step(
                model, self.masker, self.optimizer, self.objective, x, target, self._generator,
                int(self.num_classes or 2),
            )  # fmt: skip
            self.masker.eval()
        self._steps += 1
        for k, v in parts.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 and self._all_ranks_ok(trainer, self.masker is not None):
            # each rank trains on its own shard: average the maskers once per epoch (local SGD), so
            # every rank explains with the same masker and the checkpointed one is the average
            with torch.no_grad():
                for t in self.masker.state_dict().values():
                    if t.is_floating_point():
                        t.copy_(trainer.strategy.reduce(t.clone(), reduce_op="mean"))
        if self._count:
            for k, v in self._sums.items():
                self.log_scalar(pl_module, f"masker/train_loss/{k}", v / self._count, sync=False)
        self._sums, self._count = {}, 0

    # ------------------------------------------------------------------ explaining
    def saliency(self) -> RealTimeSaliency:
        """The trained masker as an attribution method (one forward pass per map)."""
        return RealTimeSaliency(self.masker, batch_size=self.batch_size)

    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        if self.masker is None:
            if self._pending is None:  # not trained yet (before start_epoch, or validate()/test() without a fit)
                if trainer.state.fn != TrainerFn.FITTING:  # was silent: nothing logged, no word why
                    self.warn_failure(
                        ("untrained",),
                        "SaliencyMasker has no trained masker to explain with: it trains during trainer.fit (from "
                        f"start_epoch={self.start_epoch}); fit with it attached, or resume from a checkpoint that "
                        "holds its state.",
                    )
                return
            self._build(pl_module, x)
        if target is None:
            raise ValueError("SaliencyMasker needs class targets for the probe set (target='label' or 'prediction').")
        from ..metrics.functional import dabkowski_saliency

        model = self.model(pl_module)
        masks = self.saliency()(model, x, target)
        metric = dabkowski_saliency(model, x, masks, target, batch_size=self.batch_size)
        self.log_scalar(pl_module, "faithfulness/saliency_metric/masker", metric.mean())
        self.log_scalar(pl_module, "maps/area/masker", masks.mean())
        if self.log_images and trainer.is_global_zero:
            n = min(self.max_images, x.shape[0])
            captions = [f"saliency metric {float(v):.3g}" for v in metric[:n]]
            fig = viz.attribution_figure(
                x[:n].detach().cpu(), {"masker": masks[:n, 0].detach().cpu()}, {"masker": False}, captions,
                title=f"real-time saliency masks · epoch {trainer.current_epoch}",
            )  # fmt: skip
            self.log_image(trainer, "masker/maps", fig)
