"""Models whose ``forward`` returns more than a tensor of scores.

Every method expects ``model(x)`` to be a tensor (N, K) or (N,). Many real networks return a tuple
``(logits, aux)``, a dict, or a Hugging Face ``ModelOutput``. :func:`output_adapter` installs, for the
duration of an explanation, a forward hook on the model that replaces its output with the scores,
so layer names, hooks of the methods and module identity stay as they are (a wrapper module would
rename every layer). Every place that reads a model's output goes through :func:`read_scores`, so an
output that is not a tensor gives one error naming ``output_key`` wherever the model is called.

:func:`model_errors` turns an exception raised inside the model's forward (a wrong input shape) into
one that says what shape was given and what the failing layer takes: without it the model's own
message quotes whatever slice the library sent (a one-row probe, a chunk of path points).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "OutputSpec",
    "keyed_output",
    "model_error",
    "model_errors",
    "output_adapter",
    "pick_output",
    "read_scores",
]

OutputSpec = Union[int, str, Callable[[Any], Tensor], None]


def pick_output(out: Any, key: OutputSpec = None) -> Tensor:
    """The tensor of scores in a model's output.

    A tensor is returned as is (it already is the scores). Otherwise ``key`` is a tuple index, a
    dict key or attribute name, or a function of the output; with ``key=None`` a mapping or object
    with a ``logits`` entry (the Hugging Face convention) gives that entry, and anything else is an
    error naming the fix.
    """
    if isinstance(out, Tensor):
        return out
    if callable(key):
        picked = key(out)
    elif key is not None:
        try:
            picked = getattr(out, key) if isinstance(key, str) and not isinstance(out, Mapping) else out[key]
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise KeyError(
                f"Could not take {key!r} from a model output of type {type(out).__name__}; "
                "set output_key to a tuple index, a dict key or a function output -> scores."
            ) from err
    elif isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        picked = out["logits"]
    elif isinstance(getattr(out, "logits", None), Tensor):
        picked = out.logits
    else:
        raise TypeError(
            f"The model returned a {type(out).__name__}, not a tensor of scores; set output_key "
            "(e.g. output_key=0 for (logits, aux) tuples, 'logits' for dicts, or a function output -> scores; "
            "the callbacks, attribution methods, metrics and penalties take it) or model_attr to explain "
            "a submodule that returns the scores."
        )
    if not isinstance(picked, Tensor):
        raise TypeError(f"output_key={key!r} selected a {type(picked).__name__}, not a tensor of scores.")
    return picked


def read_scores(out: Any) -> Tensor:
    """The scores in a model's output read without an ``output_key``: a tensor as is, the ``logits``
    entry of a dict or ``ModelOutput``; anything else raises the error naming ``output_key``. Every
    function that reads a model's output calls this (or :func:`pick_output`) before using it."""
    return out if isinstance(out, Tensor) else pick_output(out)


@contextmanager
def output_adapter(model: Any, key: OutputSpec = None) -> Iterator[Any]:
    """Within the block, ``model(x)`` returns :func:`pick_output` of its output; yields the model to
    call (the model itself, with a forward hook; a wrapping function for a plain callable)."""
    if not isinstance(model, nn.Module):
        yield lambda *args, **kwargs: pick_output(model(*args, **kwargs), key)
        return

    def hook(_module: nn.Module, _args: Any, out: Any) -> Tensor | None:
        return None if isinstance(out, Tensor) else pick_output(out, key)

    handle = model.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def keyed_output(model: Any, key: OutputSpec = None) -> contextlib.AbstractContextManager[Any]:
    """:func:`output_adapter` when ``key`` is given; otherwise the model as it is (no hook: a
    ScriptModule takes none, and :func:`read_scores` reads tensors and ``logits`` outputs where they
    are used). What the functions that take ``output_key=`` use."""
    if key is None:
        return contextlib.nullcontext(model)
    return output_adapter(model, key)


# --------------------------------------------------------------------------- the model's own errors
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE_MODELS = os.path.join(_PACKAGE, "models")
_CALL_FRAMES = ("_call_impl", "_wrapped_call_impl")


def _frames(tb: types.TracebackType | None) -> list[types.FrameType]:
    out = []
    while tb is not None:
        out.append(tb.tb_frame)
        tb = tb.tb_next
    return out


def _ours(frame: types.FrameType) -> bool:
    """Whether ``frame`` runs this package's own code (not a model it ships)."""
    path = os.path.abspath(frame.f_code.co_filename)
    return path.startswith(_PACKAGE + os.sep) and not path.startswith(_PACKAGE_MODELS + os.sep)


def _takes(module: nn.Module) -> str | None:
    """The input a layer takes, in words, for the layers whose weights fix it."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    if isinstance(module, conv):
        nd = len(module.kernel_size)
        spatial = ", ".join(("L",) if nd == 1 else ("D", "H", "W")[-nd:])
        return f"(N, {module.in_channels}, {spatial}): {module.in_channels} channels"
    if isinstance(module, nn.Linear):
        return f"(..., {module.in_features}): {module.in_features} features in the last dim"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"(N, {module.num_features}, ...): {module.num_features} channels"
    if isinstance(module, nn.LayerNorm):
        return f"(..., {', '.join(map(str, module.normalized_shape))}) in the last dims"
    if isinstance(module, nn.RNNBase):
        return f"(N, T, {module.input_size}) (batch_first) or (T, N, {module.input_size}): {module.input_size} features"
    if isinstance(module, nn.Embedding):
        return f"integer ids below {module.num_embeddings}"
    return None


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def model_error(err: BaseException, model: Any, inputs: Tensor, *, probe: bool = False) -> BaseException | None:
    """The exception to raise instead of ``err`` when ``err`` was raised inside ``model``'s forward
    (None when it was not, when it was raised by this package's own code, e.g. a method's hook, when
    it is out of memory, or when it is already such an error). It has ``err``'s type where that type
    takes a message (else RuntimeError) and says: the shape given, that a one-row probe failed
    (``probe``), the layer that failed with the input it received and the input it takes (read from
    the traceback: the innermost module call the error went through), the model's message last. The
    caller raises it ``from err`` (the original stays the ``__cause__``)."""
    if getattr(err, "_explain_model_error", False) or not isinstance(err, Exception):
        return None
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):  # not the input's shape: leave it as it is
        return None
    frames = _frames(err.__traceback__)
    if not frames or _ours(frames[-1]):
        return None
    code = getattr(model, "__code__", None)
    in_model = False
    failing: tuple[nn.Module, Any] | None = None  # the innermost module call the error went through
    for f in frames:
        if f.f_code.co_name in _CALL_FRAMES and isinstance(f.f_locals.get("self"), nn.Module):
            mod = f.f_locals["self"]
            in_model = in_model or mod is model
            if in_model:
                args = f.f_locals.get("args") or ()
                failing = (mod, args[0] if args else None)
        elif code is not None and f.f_code is code:
            in_model = True
    if not in_model:
        return None
    parts = [f"The model failed on inputs of shape {_shape(inputs)}"]
    if probe:
        parts[0] += (
            f" (on their first row {_shape(inputs[:1])}, a probe forward that sizes the model calls "
            "and reads the number of outputs)"
        )
    if failing is not None and failing[0] is not model:
        mod, got = failing
        name = next((n for n, m in model.named_modules() if m is mod), None) if isinstance(model, nn.Module) else None
        what = f"layer {name!r} ({type(mod).__name__})" if name else type(mod).__name__
        takes = _takes(mod)
        parts.append(f"{what} received {_shape(got)}" + (f" but takes {takes}" if takes else ""))
    hint = (
        "Pass inputs shaped like the model's training inputs (a batch (B, ...) of the same per-sample shape; "
        "in a callback, input_key= / model_attr= select them)."
    )
    msg = "; ".join(parts) + f". {hint} The model's error: {type(err).__name__}: {err}"
    try:  # the model's exception type, so that callers catching it still do
        new = type(err)(msg)
    except Exception:  # a type whose constructor takes other arguments
        new = RuntimeError(msg)
    new._explain_model_error = True  # type: ignore[attr-defined]
    return new


class model_errors:  # noqa: N801 (a context manager, named and called like the function it replaced)
    """Within the block, an exception raised in ``model``'s forward is re-raised as
    :func:`model_error` (given shape, failing layer, what it takes; the original as ``__cause__``).

    A class, not a generator: it is entered on every method call (a few microseconds less, which shows
    on a cheap model)."""

    __slots__ = ("inputs", "model", "probe")

    def __init__(self, model: Any, inputs: Any, *, probe: bool = False) -> None:
        self.model, self.inputs, self.probe = model, inputs, probe

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: Any, err: BaseException | None, _tb: Any) -> bool:
        if not isinstance(err, Exception):
            return False
        new = model_error(err, self.model, self.inputs, probe=self.probe) if isinstance(self.inputs, Tensor) else None
        if new is None:
            return False
        raise new from err
