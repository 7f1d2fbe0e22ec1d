"""A LightningModule mixin for users who prefer to write the penalised loss themselves.

.. code-block:: python

    class Model(RegularizerMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallCNN()
            self.add_penalty("cdep", weight=10.0)

        def training_step(self, batch, batch_idx):
            x, y, mask = batch
            task = F.cross_entropy(self.net(x), y)
            return self.penalized_loss(task, x, y, mask)

With a CDEP penalty the task's forward can come from the penalty's own pass (the contextual decomposition
carries the true activation through the model): ``logits, reg = self.penalized_forward(x, y, mask)`` and
``loss = F.cross_entropy(logits, y) + reg`` train as ``penalized_loss`` does, without the separate forward and
backward of the task (about half the step's cost on SmallCNN).

This is the same computation as the
:class:`~explain_callbacks.callbacks.regularizer.AttributionRegularizer` callback, and the only
supported shape under manual optimisation (call ``self.manual_backward(self.penalized_loss(...))``).
Or skip both and call the functions of :mod:`explain_callbacks.regularize.functional` directly:
``loss = task + λ * cdep_penalty(self.net, x, mask)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._internal.outputs import OutputSpec, keyed_output
from ..interaction.cd import update_norm_stats
from .functional import zero_penalty
from .penalties import Penalty, build_penalty

__all__ = ["RegularizerMixin"]


class RegularizerMixin:
    """Adds :meth:`add_penalty` and :meth:`penalized_loss` to a LightningModule.

    Penalties are kept in an ordinary dict (not a ModuleDict: they hold no parameters). Each
    penalty's value is logged as ``regularizers/penalty/<name>`` and the task loss as ``regularizers/task_loss``.
    """

    def add_penalty(
        self,
        penalty: Any,
        weight: float = 1.0,
        name: str | None = None,
        model_attr: str | None = None,
        output_key: OutputSpec = None,
    ) -> None:
        """Register a penalty (a name, mapping, Penalty or callable) with its weight λ.

        ``model_attr`` names the submodule the penalty explains (default: the module itself);
        ``output_key`` where its scores are when it returns a tuple/dict (a tuple index, a key, or a
        function output -> scores).
        """
        regs = self.__dict__.setdefault("_explain_penalties", {})
        pen = build_penalty(penalty)
        key = name or getattr(pen, "name", None) or getattr(pen, "__name__", "penalty")
        if key in regs:
            raise KeyError(f"A penalty named {key!r} is already registered; pass name= to add a second one.")
        regs[key] = (pen, float(weight), model_attr)
        if output_key is not None:
            self.__dict__.setdefault("_explain_penalty_keys", {})[key] = output_key

    @property
    def penalties(self) -> dict[str, tuple[Any, float, str | None]]:
        return dict(self.__dict__.get("_explain_penalties", {}))

    def set_penalty_weight(self, name: str, weight: float) -> None:
        """Change λ of a registered penalty (e.g. a warm-up in ``on_train_batch_start``)."""
        regs = self.__dict__.get("_explain_penalties", {})
        if name not in regs:
            raise KeyError(f"No penalty named {name!r}; registered: {sorted(regs)}.")
        pen, _, attr = regs[name]
        regs[name] = (pen, float(weight), attr)

    def penalized_loss(
        self,
        task_loss: Tensor,
        inputs: Tensor,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        log: bool = True,
    ) -> Tensor:
        """``task_loss + Σ λ_k R_k(model, inputs, targets, mask)``; penalties with λ = 0 are skipped."""
        total = task_loss
        do_log = log and hasattr(self, "log") and getattr(self, "_trainer", None) is not None
        if do_log:
            n = inputs.shape[0]
            self.log("regularizers/task_loss", task_loss.detach(), on_step=True, on_epoch=True, batch_size=n)
        step = _draw_step(getattr(self, "_trainer", None))
        for key, (pen, weight, attr) in self.__dict__.get("_explain_penalties", {}).items():
            if weight == 0:
                continue
            model: nn.Module = self if attr is None else getattr(self, attr)  # type: ignore[assignment]
            with keyed_output(model, self.__dict__.get("_explain_penalty_keys", {}).get(key)) as called:
                if isinstance(pen, Penalty):
                    r = pen(called, inputs, targets, mask, step=step)
                else:
                    r = pen(called, inputs, targets, mask)
            total = total + weight * r
            if do_log:
                n = inputs.shape[0]
                self.log(f"regularizers/penalty/{key}", r.detach(), on_step=True, on_epoch=True, batch_size=n)
        return total

    def penalized_forward(
        self,
        inputs: Tensor,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        log: bool = True,
    ) -> tuple[Any, Tensor]:
        """``(output, Σ λ_k R_k)``: the model's output for ``inputs`` and the weighted penalties, the output taken
        from the pass of the first penalty that computes it (CDEP: β + γ of its contextual decomposition, the
        model's own forward to float rounding; BatchNorm running statistics updated once, from that pass).
        Without such a penalty the output is the penalised model's ordinary forward. Use it in place of the
        task's forward: ``loss = task_loss(output, y) + penalty``."""
        regs = self.__dict__.get("_explain_penalties", {})
        keys = self.__dict__.get("_explain_penalty_keys", {})
        do_log = log and hasattr(self, "log") and getattr(self, "_trainer", None) is not None
        step = _draw_step(getattr(self, "_trainer", None))
        output: Any = None
        total: Tensor | None = None
        first_model: nn.Module | None = None
        for key, (pen, weight, attr) in regs.items():
            model: nn.Module = self if attr is None else getattr(self, attr)  # type: ignore[assignment]
            first_model = first_model if first_model is not None else model
            if weight == 0:
                continue
            with keyed_output(model, keys.get(key)) as called:
                if output is None and getattr(pen, "serves_forward", False):
                    r, output, stats, replicas = pen.with_output(called, inputs, targets, mask)
                    if output is not None:
                        update_norm_stats(stats, replicas)
                elif isinstance(pen, Penalty):
                    r = pen(called, inputs, targets, mask, step=step)
                else:
                    r = pen(called, inputs, targets, mask)
            total = weight * r if total is None else total + weight * r
            if do_log:
                n = inputs.shape[0]
                self.log(f"regularizers/penalty/{key}", r.detach(), on_step=True, on_epoch=True, batch_size=n)
        if output is None:  # no penalty computed it: the model's own forward
            output = (first_model if first_model is not None else self)(inputs)  # type: ignore[operator]
        if total is None:
            total = zero_penalty(first_model if first_model is not None else self, inputs)
        return output, total


def _draw_step(trainer: Any) -> int | None:
    """The ``step`` that seeds the random penalties' draws: one per training batch and rank, as the callback's.

    ``trainer.global_step`` counts optimizer steps, so with ``accumulate_grad_batches`` > 1 the batches of one
    step drew the same references and interpolation points, and under DDP every rank drew the same ones. The
    running batch index (restored on resume) times the world size plus the rank gives each batch of each rank
    its own draws; outside training (a validation penalty) the global step, as before. None without a trainer.
    """
    if trainer is None:
        return None
    loop = getattr(trainer, "fit_loop", None)
    if getattr(trainer, "training", False) and loop is not None:
        return int(loop.total_batch_idx) * max(1, int(trainer.world_size)) + int(trainer.global_rank)
    return int(trainer.global_step)
