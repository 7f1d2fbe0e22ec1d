"""The attribution contract shared by every method.

``method(model, inputs, target, *, create_graph=False) -> Tensor`` batched over the first dimension,
returning the input's shape (or a documented lower resolution). Randomness comes from a
``torch.Generator`` seeded per call; model calls are chunked by ``batch_size``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize, RowsPerCall, call_facts
from .._internal.checks import check_inputs
from .._internal.targets import as_target_tensor, check_model_target

__all__ = ["Attributor", "make_generator"]


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A fresh generator on ``device`` (CPU generator for devices without one), seeded."""
    try:
        g = torch.Generator(device=device)
    except RuntimeError:
        g = torch.Generator()
    g.manual_seed(int(seed))
    return g


class Attributor(RowsPerCall, ABC):
    """Base class of attribution methods.

    Args:
        batch_size: rows per model call (memory bound): ``"auto"`` (default) picks them from the
            model's activation size on the CPU and 256 on the GPU (``_internal.batching``); an int
            fixes them; ``None`` sends everything at once. Inside a call, ``self.batch_size`` reads
            as the resolved int.
        seed: seed of the per-call generator (random methods only).

    Subclasses implement :meth:`attribute` on validated inputs. ``last_info`` holds per-sample side
    results of the last call (e.g. ``completeness_error`` for path methods).
    """

    name: ClassVar[str] = "attributor"
    #: whether ``create_graph=True`` gives attributions differentiable w.r.t. the parameters.
    differentiable: ClassVar[bool] = True
    #: whether the map has the input's shape (False: a documented lower resolution / other space).
    input_shaped: ClassVar[bool] = True

    def __init__(self, batch_size: BatchSize = "auto", seed: int = 0) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.last_info: dict[str, Tensor] = {}

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        target: Tensor | int | None = None,
        *,
        create_graph: bool = False,
    ) -> Tensor:
        if create_graph and not self.differentiable:
            raise ValueError(
                f"{type(self).__name__} is a black-box method and cannot build a differentiable map; "
                "use a gradient method (saliency, input_x_gradient, ig, expected_gradients) for penalties."
            )
        tgt = self._prepare(model, inputs, target)
        return self.attribute(model, inputs, tgt, create_graph=create_graph)

    def _prepare(self, model: nn.Module, inputs: Tensor, target: Tensor | int | None) -> Tensor | None:
        """Checks shared by ``__call__`` and other public entry points (e.g. ``HSIC.interactions``):
        validates the inputs and the target range, resets ``last_info``, returns the target tensor."""
        check_inputs(inputs)
        tgt = as_target_tensor(target, inputs.shape[0], inputs.device)
        facts = call_facts(model, inputs, self._batch_size, tgt is not None)  # one probe-cache lookup per call
        self._resolve_rows(model, inputs, facts)
        check_model_target(model, tgt, inputs, facts)
        self.last_info = {}
        return tgt

    @abstractmethod
    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        """Compute the map for validated inputs; ``target`` is (B,) long or None."""

    def generator(self, device: torch.device) -> torch.Generator:
        return make_generator(device, self.seed)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> dict[str, Any]:
        args = {"batch_size": self._batch_size}
        args.update(
            (k, v)
            for k, v in vars(self).items()
            if not k.startswith("_") and k != "last_info" and not isinstance(v, Tensor)
        )
        return args
