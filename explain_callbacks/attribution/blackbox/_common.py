"""Shared base of the black-box (perturbation) methods."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..._internal.checks import check_inputs
from ..._internal.masks import OUTPUTS
from ..._internal.targets import as_target_tensor, check_target
from ..base import Attributor, _n_outputs

__all__ = ["PerturbationAttributor"]


class PerturbationAttributor(Attributor):
    """Base of the perturbation methods: not differentiable, a forward-pass ``budget`` and an ``output``.

    Args:
        output: the explained scalar: ``logit`` (the raw model output at the target), ``softmax``,
            ``log_softmax`` or ``sigmoid``.
        budget: at most this many model rows (forward passes) per explained sample; the method lowers
            its sample count to fit, or raises if it cannot.
        batch_size: rows per model call.
        seed: seed of the per-call generator.

    After a call, ``last_info["forwards"]`` holds the number of model rows spent per sample (B,).
    Run it on a model in eval mode (the callbacks do this through the model guard): in train mode,
    BatchNorm statistics would move with every perturbed copy.
    """

    differentiable: ClassVar[bool] = False

    def __init__(
        self, output: str = "logit", budget: int | None = None, batch_size: int | None = 256, seed: int = 0
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be a positive number of forward passes per sample or None, got {budget}.")
        self.output = output
        self.budget = budget

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        """Forward passes (model rows) this method spends per explained sample of ``input_shape``
        (the per-sample shape, without the batch dimension)."""
        raise NotImplementedError

    def _record_forwards(self, inputs: Tensor, n: int) -> None:
        self.last_info["forwards"] = torch.full((inputs.shape[0],), int(n), dtype=torch.long)

    def _prepare(self, model: nn.Module, inputs: Tensor, target: Tensor | int | None) -> Tensor | None:
        """The checks of ``__call__`` for public entry points other than it (``indices``, ``interactions``):
        validates the inputs and target, resets ``last_info`` and returns the target tensor."""
        check_inputs(inputs)
        tgt = as_target_tensor(target, inputs.shape[0], inputs.device)
        if tgt is not None:
            with torch.no_grad():
                n_out = _n_outputs(model, inputs[:1])
            check_target(tgt, n_out, inputs.shape[0])
        self.last_info = {}
        return tgt
