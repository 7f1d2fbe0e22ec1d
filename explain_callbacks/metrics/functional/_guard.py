"""Metrics leave the model as they found it, whatever mode it is in.

A metric runs the model as given (the caller chooses the mode; the monitor's guard puts it in eval
mode). A model left in training mode would otherwise be changed by the metric and make it random:
BatchNorm layers update their running statistics in place on every forward pass, and dropout draws
from the global RNG. :func:`left_as_found` runs a metric so that neither happens:

- the global RNG (CPU, and CUDA where initialised) is saved and restored, so the caller's random
  stream is untouched;
- when any module is in training mode, the metric runs on a view of the model whose buffers are
  clones (:func:`~explain_callbacks.metrics.functional.randomisation.randomised_view` with nothing
  re-drawn: the original buffer objects are put back afterwards, their values and version counters
  untouched), and the global RNG is seeded with 0 inside, so dropout draws the same masks on every
  call: the metric is deterministic.

Metrics run outside ``torch.inference_mode`` (Lightning's ``validate``/``test`` steps run in it), so
explainer metrics can re-run gradient methods there. Parameters, their ``.grad`` and ``requires_grad``
flags and module modes are not touched by the metrics themselves (their forward passes run under
``no_grad``; explainer metrics' methods take gradients with respect to the inputs).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from ..._internal.guard import rng_guard
from ..._internal.outputs import OutputSpec, keyed_output, model_errors

__all__ = ["left_as_found", "model_left_as_found"]

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def left_as_found(model: Any) -> Iterator[Any]:
    """Yield the model to run a metric on (itself, or a buffer-cloned view of it in training mode); on
    exit the model's buffers and the global RNG are as found."""
    # out of inference mode (Lightning's validate/test steps run in it): explainer metrics re-run methods
    # that take gradients, and tensors made inside (randomised weights, perturbed inputs) must be normal ones
    with torch.inference_mode(False), rng_guard():
        if not isinstance(model, nn.Module) or not any(m.training for m in model.modules()):
            yield model
            return
        from .randomisation import randomised_view  # randomisation imports this module

        torch.default_generator.manual_seed(0)  # dropout: the same masks on every call (restored on exit)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(0)
        with randomised_view(model) as (view, _):
            yield view


def model_left_as_found(fn: F) -> F:
    """Decorate a functional metric ``fn(model, ...)`` so that it runs under :func:`left_as_found`, takes
    ``output_key=`` (where the scores are when the model returns a tuple/dict) and re-raises errors of
    the model's forward with the input shape given
    (:func:`~explain_callbacks._internal.outputs.model_errors`)."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, output_key: OutputSpec = None, **kwargs: Any) -> Any:
        # errors of the model's forward say the input shape given (not the chunk or probe row it failed on)
        inputs = args[0] if args else kwargs.get("inputs")
        with keyed_output(model, output_key) as called, left_as_found(called) as view, model_errors(view, inputs):
            return fn(view, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
