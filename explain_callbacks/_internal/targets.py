"""Target policies: which output an attribution explains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor, nn

from .batching import chunks, output_width
from .outputs import read_scores
from .target_ops import TargetOperator

__all__ = ["TargetPolicy", "check_model_target", "check_target", "check_target_policy", "resolve_target", "target_key"]

#: what a callback explains: ``"label"``, ``"prediction"``, a class index, None, a target operator (a region,
#: a position, a box: :mod:`~explain_callbacks._internal.target_ops`), or a factory
#: ``(model, inputs, labels) -> target`` called on the probe set when it is explained
TargetPolicy = Union[str, int, None, TargetOperator, Callable[..., Any]]


def check_target_policy(policy: Any) -> None:
    """Raise a clear error for a target setting a callback cannot use."""
    if not isinstance(policy, bool) and (
        policy is None
        or isinstance(policy, (int, TargetOperator))
        or (isinstance(policy, str) and policy in ("label", "prediction"))
        or (callable(policy) and not isinstance(policy, str))
    ):
        return
    raise ValueError(
        f"target must be 'label', 'prediction', an int class, None, a target operator (RegionTarget, PositionTarget, "
        f"BoxTarget) or a function (model, inputs, labels) -> target, got {policy!r}."
    )


def target_key(policy: Any) -> Any:
    """``policy`` as it enters a callback's state key: strings, ints and None as they are; a target operator or
    factory by its ``repr`` (the operators' ``repr`` names their settings), a plain function by its qualified
    name (its default ``repr`` holds a memory address, which would change the key at every run)."""
    if policy is None or isinstance(policy, (str, int)):
        return policy
    if (callable(policy) and type(policy).__repr__ is object.__repr__) or hasattr(policy, "__qualname__"):
        return f"{getattr(policy, '__module__', '')}.{getattr(policy, '__qualname__', type(policy).__qualname__)}"
    return repr(policy)


def check_target(target: Tensor | None, n_outputs: int | None, batch: int) -> None:
    """Raise a clear error for a target of the wrong shape or out of range (a target operator checks the
    output it reads itself, when it reads it)."""
    if target is None:
        return
    if isinstance(target, TargetOperator):
        if target.shape[0] != batch:
            raise ValueError(f"the target operator holds {target.shape[0]} rows but the inputs have {batch}.")
        return
    if target.ndim != 1 or target.shape[0] != batch:
        raise ValueError(
            f"target must have shape ({batch},) (one class index per sample), got {tuple(target.shape)}; "
            "pass a 1-D LongTensor, or an int for the same class for every sample."
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}; use target.long().")
    if n_outputs is not None and target.numel():
        lo, hi = _min_max(target)
        if lo < 0 or hi >= n_outputs:
            hint = (
                " (a single-output model, regression or a one-logit binary classifier, takes target=None)"
                if n_outputs == 1
                else ""
            )
            raise ValueError(
                f"target values must lie in [0, {n_outputs - 1}] (the model has {n_outputs} outputs), "
                f"got values in [{lo}, {hi}]; check the labels or the target policy{hint}."
            )


def _min_max(target: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor with one device-to-host copy (a short CPU tensor: its
    values as a list, cheaper than two reductions)."""
    if target.device.type == "cpu" and target.numel() <= 256:
        values = (target if target.ndim == 1 else target.reshape(-1)).tolist()
        return min(values), max(values)
    lo, hi = torch.stack(torch.aminmax(target)).tolist()
    return int(lo), int(hi)


def check_model_target(
    model: object, target: Tensor | None, inputs: Tensor, facts: tuple[int, int | None] | None = None
) -> None:
    """:func:`check_target` against the output width of ``model`` for ``inputs``, read from the cached
    eval-mode probe (:func:`~explain_callbacks._internal.batching.output_width`: no forward per call, and
    none in the model's own mode, where a one-row batch moves BatchNorm statistics; ``facts``: the
    probe's facts when the caller has them, see :func:`~explain_callbacks._internal.batching.call_facts`).
    A target found out of range is checked again against a fresh probe before the error, so a stale
    cache cannot reject a valid target."""
    if target is None or isinstance(target, TargetOperator):
        check_target(target, None, inputs.shape[0])
        return
    width = None if facts is None else facts[1]
    if (
        width is not None
        and type(target) is Tensor
        and target.dtype == torch.long
        and target.ndim == 1
        and target.device.type == "cpu"
        and 0 < target.shape[0] == inputs.shape[0]
        and target.shape[0] <= 256
    ):  # the common case, in one step: class indices of a CPU batch, checked as a list (a few us per call)
        values = target.tolist()
        if min(values) >= 0 and max(values) < width:
            return
    try:
        check_target(target, output_width(model, inputs) if facts is None else facts[1], inputs.shape[0])
    except ValueError:
        check_target(target, output_width(model, inputs, refresh=True), inputs.shape[0])


def as_target_tensor(
    target: int | Tensor | TargetOperator | None, batch: int, device: torch.device
) -> Tensor | TargetOperator | None:
    """The target as methods take it: a (B,) long tensor of class indices, None, or a target operator bound to
    the ``batch`` rows on ``device``."""
    if target is None:
        return None
    if isinstance(target, Tensor) and target.dtype == torch.long and target.ndim == 1 and target.device == device:
        return target  # already the (B,) long tensor on the device: no conversion call
    if isinstance(target, TargetOperator):
        return target.bind(batch, device)
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    if not isinstance(target, Tensor):
        target = torch.as_tensor(target)
    if target.ndim == 0:
        target = target.expand(batch)
    return target.to(device=device, dtype=torch.long) if not target.is_floating_point() else target.to(device)


@torch.no_grad()
def resolve_target(
    policy: TargetPolicy,
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None,
    batch_size: int | None = None,
) -> Tensor | None:
    """Turn a policy into class indices of shape (B,), or a target operator bound to the B samples.

    ``"label"``: the true labels; ``"prediction"``: the model's arg-max; an int: that class for every
    sample; ``None``: no target (single-output regression models); a target operator: itself, bound; a
    factory ``(model, inputs, labels) -> target``: its result, resolved in turn.
    """
    b = inputs.shape[0]
    if policy is None:
        return None
    if isinstance(policy, TargetOperator):
        return policy.bind(b, inputs.device)
    if callable(policy) and not isinstance(policy, str):
        made = policy(model, inputs, labels)
        if callable(made) and not isinstance(made, (TargetOperator, Tensor)):
            raise TypeError(f"the target factory {policy!r} returned a function; it must return a target.")
        if isinstance(made, Tensor):
            return as_target_tensor(made, b, inputs.device)
        return resolve_target(made, model, inputs, labels, batch_size)
    if isinstance(policy, int):
        return torch.full((b,), policy, dtype=torch.long, device=inputs.device)
    if policy == "label":
        if labels is None:
            raise ValueError("target='label' needs labels in the probe batch; use target='prediction' instead.")
        labels = labels.to(inputs.device)
        if labels.ndim > 1 and labels.shape[0] == b and labels[0].numel() > 1:
            raise ValueError(
                f"target='label' needs one class index per sample, but the labels have shape "
                f"{tuple(labels.shape)} (multi-label or one-hot targets?); pass target='prediction', an int "
                "class, or label_key= a function of the batch that gives class indices."
            )
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            raise ValueError(
                "target='label' needs class indices, but the labels are real numbers (a regression?); pass "
                "target=None for a single-output model, or an int class."
            )
        return labels.long().view(-1)
    if policy == "prediction":
        preds = []
        for sl in chunks(b, batch_size):
            out = read_scores(model(inputs[sl]))
            if out.ndim == 1 or out.shape[1] == 1:
                return None  # regression: a single output, no class to pick
            preds.append(out.argmax(1))
        return torch.cat(preds)
    raise ValueError(f"Unknown target policy {policy!r}; use 'label', 'prediction', an int class, or None.")
