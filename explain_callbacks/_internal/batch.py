"""Batch adapter: get (inputs, labels) out of any LightningModule's batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from torch import Tensor

__all__ = ["BatchAdapter", "InputSpec", "masks_of", "take"]

InputSpec = Union[int, str, Callable[[Any], Any], None]


def take(batch: Any, key: int | str) -> Any:
    """``batch[key]``; for a string key on a batch that is not a mapping (a dataclass or other object
    with tensor attributes), the attribute ``key``. Raises KeyError/IndexError/TypeError otherwise."""
    if isinstance(key, str) and not isinstance(batch, (Mapping, Tensor)) and hasattr(batch, key):
        return getattr(batch, key)
    return batch[key]


def masks_of(batch: Any, key: InputSpec = None) -> Tensor | None:
    """The ground-truth masks of a batch: ``batch[key]`` (a tuple index, dict key, attribute or a function of
    the batch); without a key, a dict's ``mask``/``masks``/``segmentation`` entry, or the third item of an
    ``(x, y, mask)`` tuple when it is shaped like a spatial mask of the inputs; None when there are none."""
    if key is None:
        if isinstance(batch, dict):
            key = next((k for k in ("mask", "masks", "segmentation") if k in batch), None)
        elif isinstance(batch, (tuple, list)) and len(batch) >= 3 and isinstance(batch[2], Tensor):
            # (x, y, mask): take the third item when it looks like a spatial mask of the inputs
            x, m = batch[0], batch[2]
            if isinstance(x, Tensor) and m.ndim == x.ndim >= 3 and m.shape[-2:] == x.shape[-2:]:
                return m
        if key is None:
            return None
    if callable(key):
        return key(batch)
    try:
        m = take(batch, key)
    except (KeyError, IndexError, TypeError) as err:
        raise KeyError(f"Could not take masks with mask_key={key!r} from the batch; fix mask_key.") from err
    return m if isinstance(m, Tensor) else None


class BatchAdapter:
    """Extract inputs and labels from a batch.

    Args:
        input_key: tuple index (int), dict key or attribute name (str) or a function ``batch -> inputs``.
            Default: ``batch[0]`` for sequences, ``batch["x"|"input"|"inputs"|"image"]`` for dicts,
            the batch itself for a tensor. A string names an attribute of batch objects that are not
            mappings (dataclasses, namedtuples).
        label_key: likewise for labels (default index 1 / keys ``y``, ``label``, ``labels``, ``target``);
            labels may be absent.
    """

    _INPUT_KEYS = ("x", "input", "inputs", "image", "images", "data")
    _LABEL_KEYS = ("y", "label", "labels", "target", "targets")

    def __init__(self, input_key: InputSpec = None, label_key: InputSpec = None) -> None:
        self.input_key = input_key
        self.label_key = label_key

    @staticmethod
    def _get(batch: Any, key: InputSpec, defaults: Sequence[Any], what: str, required: bool) -> Any:
        if callable(key):
            return key(batch)
        if key is not None:
            try:
                return take(batch, key)
            except (KeyError, IndexError, TypeError) as err:
                raise KeyError(
                    f"Could not take {what} with key {key!r} from a batch of type {type(batch).__name__}; "
                    f"set {what}_key to a tuple index, a dict key, or a function batch -> {what}."
                ) from err
        if isinstance(batch, Tensor):
            return batch if what == "input" else None
        if isinstance(batch, Mapping):
            for k in defaults:
                if k in batch:
                    return batch[k]
        elif isinstance(batch, Sequence):
            idx = 0 if what == "input" else 1
            if len(batch) > idx:
                return batch[idx]
        if required:
            found = ""
            if isinstance(batch, Mapping):
                # name what is there, so the fix is one copy away
                found = f" with keys {sorted(map(str, batch))[:12]}, none of them {list(defaults)}"
            raise KeyError(
                f"Could not find the {what} in a batch of type {type(batch).__name__}{found}; pass {what}_key= "
                "(tuple index, dict key, or a function batch -> tensor) to the callback."
            )
        return None

    def inputs(self, batch: Any) -> Tensor:
        x = self._get(batch, self.input_key, self._INPUT_KEYS, "input", True)
        if not isinstance(x, Tensor):
            raise TypeError(f"The batch's input must be a Tensor, got {type(x).__name__}; set input_key.")
        return x

    def labels(self, batch: Any) -> Tensor | None:
        y = self._get(batch, self.label_key, self._LABEL_KEYS, "label", False)
        return y if isinstance(y, Tensor) else None

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        return self.inputs(batch), self.labels(batch)
