"""The attribution contract shared by every method.

``method(model, inputs, target, *, create_graph=False) -> Tensor`` batched over the first dimension,
returning the input's shape (or a documented lower resolution). Randomness comes from a
``torch.Generator`` seeded per call; model calls are chunked by ``batch_size``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize, RowsPerCall
from .._internal.checks import check_inputs
from .._internal.guard import grad_enabled, normal_tensor
from .._internal.outputs import OutputSpec, keyed_output, model_errors
from .._internal.softplus import relu_as_softplus
from .._internal.target_ops import MultiTarget, TargetOperator
from .._internal.targets import as_target_tensor, check_model_target

__all__ = ["Attributor", "make_generator"]

_NO_CONTEXT = contextlib.nullcontext()  # reusable: the context of a method without beta


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
        batch_size: rows per model call (memory bound): ``"auto"`` (default) times a few candidate
            sizes with the model's own passes on first use per model and input kind and keeps the
            fastest (``_internal.batching.choose_rows``; the choice and its timings show in ``repr``
            and ``rows_choice``); an int fixes them; ``None`` sends everything at once. Inside a
            call, ``self.batch_size`` reads as the resolved int.
        seed: seed of the per-call generator (random methods only).

    Subclasses implement :meth:`attribute` on validated inputs. ``last_info`` holds per-sample side
    results of the last call (e.g. ``completeness_error`` for path methods).

    Calls run with grad enabled and outside inference mode, whatever the caller's context (a method
    called inside ``torch.no_grad()`` or ``torch.inference_mode()`` gives the same map as outside:
    inference-mode inputs and targets are copied to normal tensors). ``output_key`` reads the scores
    of a model that returns a tuple, dict or ``ModelOutput`` (a tuple index, a key or attribute name,
    or a function output -> scores; ``logits`` entries are read without it). An error raised inside
    the model's forward is re-raised saying the shape given and what the failing layer takes.
    """

    name: ClassVar[str] = "attributor"
    #: whether ``create_graph=True`` gives attributions differentiable w.r.t. the parameters.
    differentiable: ClassVar[bool] = True
    #: whether the map has the input's shape (False: a documented lower resolution / other space).
    input_shaped: ClassVar[bool] = True
    #: softplus(β) in place of every ReLU during the method's own passes (Dombrowski et al. 2019's
    #: β-smoothed network, a defence against manipulated maps); None: the network as is. Gradient and
    #: path methods take it as ``beta=``.
    beta: float | None = None
    #: the kind of pass the method's model calls make (``_internal.batching.PASS_KINDS``), what
    #: ``batch_size="auto"`` is measured with: ``"grad"`` (forward and input-gradient backward; a
    #: ``create_graph=True`` call measures ``"double"``) or ``"forward"`` (black-box methods).
    passes: ClassVar[str] = "grad"

    #: whether the method explains any target operator (a region, a position, a box); False: it needs class
    #: indices of a classifier (e.g. a cross-entropy against the label)
    takes_target_operators: ClassVar[bool] = True

    def __init__(self, batch_size: BatchSize = "auto", seed: int = 0) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.last_info: dict[str, Tensor] = {}

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        target: Tensor | int | TargetOperator | MultiTarget | None = None,
        *,
        create_graph: bool = False,
        output_key: OutputSpec = None,
    ) -> Tensor:
        """The map of ``inputs`` (B, ...) for ``target``: class indices (B,), an int, None (a single-output
        model), a target operator (a region, a position or a box of a dense or multi-output model), or a
        :class:`~explain_callbacks.targets.MultiTarget` of K of those (maps (B, K, ...), one batched call)."""
        if create_graph and not self.differentiable:
            raise ValueError(
                f"{type(self).__name__} is a black-box method and cannot build a differentiable map; "
                "use a gradient method (saliency, input_x_gradient, ig, expected_gradients) for penalties."
            )
        if isinstance(target, MultiTarget):
            return self._call_multi(model, inputs, target, create_graph=create_graph, output_key=output_key)
        if output_key is None and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            # _entry with nothing to switch (grad on, no output key): only the model's errors re-raised
            with model_errors(model, inputs):
                return self._call(model, normal_tensor(inputs), normal_tensor(target), create_graph=create_graph)
        with self._entry(model, inputs, target, output_key) as (model, inputs, target):
            return self._call(model, inputs, target, create_graph=create_graph)

    def _call_multi(
        self, model: nn.Module, inputs: Tensor, target: MultiTarget, *, create_graph: bool, output_key: OutputSpec
    ) -> Tensor:
        """K targets per sample in one call over K·B rows (row ``k·B + b``: sample b, target k), so the rows
        are chunked by ``batch_size`` like any other call; maps (B, K, ...) and ``last_info`` entries (B, K)."""
        check_inputs(inputs)
        b, k = inputs.shape[0], len(target)
        with self._entry(model, inputs, None, output_key) as (called, x, _):
            rows = x.repeat(k, *([1] * (x.ndim - 1)))
            stacked = target.stacked(b, x.device)
            maps = self._call(called, rows, stacked, create_graph=create_graph)
        self.last_info = {
            name: v.reshape(k, b, *v.shape[1:]).transpose(0, 1)
            for name, v in self.last_info.items()
            if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == k * b
        }
        return maps.reshape(k, b, *maps.shape[1:]).transpose(0, 1).contiguous()

    @contextlib.contextmanager
    def _entry(
        self, model: Any, inputs: Tensor, target: Any, output_key: OutputSpec = None
    ) -> Iterator[tuple[Any, Tensor, Any]]:
        """The context of every public entry point (``__call__``, ``HSIC.interactions``, ...): grad on
        and inference mode off (:func:`~explain_callbacks._internal.guard.grad_enabled`), inference
        tensors copied, the scores read at ``output_key``, and errors of the model's forward re-raised
        with the shape given (:func:`~explain_callbacks._internal.outputs.model_errors`). Yields
        (the model to call, inputs, target)."""
        with model_errors(model, inputs), grad_enabled(), keyed_output(model, output_key) as called:
            yield called, normal_tensor(inputs), normal_tensor(target)

    def _call(self, model: nn.Module, inputs: Tensor, target: Tensor | int | None, *, create_graph: bool) -> Tensor:
        """``__call__`` inside :meth:`_entry`: validate, then :meth:`attribute`."""
        tgt = self._prepare(model, inputs, target, create_graph=create_graph)
        if self.beta is None:  # no context to enter (a few us of a cheap model's call)
            return self.attribute(model, inputs, tgt, create_graph=create_graph)
        with self.smoothed():
            return self.attribute(model, inputs, tgt, create_graph=create_graph)

    def smoothed(self) -> contextlib.AbstractContextManager[None]:
        """The context the method's passes run in: ReLUs as softplus(``self.beta``) when ``beta`` is set
        (modules and functional calls, for this thread and this call only; the model is not modified)."""
        return _NO_CONTEXT if self.beta is None else relu_as_softplus(self.beta)

    def _prepare(
        self, model: nn.Module, inputs: Tensor, target: Tensor | int | None, *, create_graph: bool = False
    ) -> Tensor | None:
        """Checks shared by ``__call__`` and other public entry points (e.g. ``HSIC.interactions``):
        validates the inputs and the target range, resolves the rows per call for the kind of pass this
        call makes (:attr:`passes`; double backward with ``create_graph``), resets ``last_info``,
        returns the target tensor."""
        check_inputs(inputs)
        if isinstance(target, TargetOperator) and not self.takes_target_operators:
            raise TypeError(
                f"{type(self).__name__} explains class indices of a classifier, not the target operator {target!r}; "
                "use a gradient, path, CAM, LRP or another perturbation method for dense or multi-output targets."
            )
        tgt = as_target_tensor(target, inputs.shape[0], inputs.device)
        kind = "double" if create_graph and self.passes == "grad" else self.passes
        facts = self._resolve_call(model, inputs, tgt is not None, kind)  # one remembered lookup per call
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
        args = {"batch_size": self._batch_size_repr()}
        args.update(
            (k, v)
            for k, v in vars(self).items()
            if not k.startswith("_") and k != "last_info" and not isinstance(v, Tensor)
        )
        return args
