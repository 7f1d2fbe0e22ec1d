"""Config plumbing: arguments that arrive from Hydra as OmegaConf containers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["spec_list", "to_plain"]


def to_plain(obj: Any) -> Any:
    """OmegaConf ``DictConfig``/``ListConfig`` (from Hydra) to plain dicts and lists; anything else as is."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency, but keep plain use working
        return obj
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def spec_list(obj: Any) -> list[Any]:
    """A list of specs (short names, ``{"name": ...}`` mappings, instances) from what a config gives: a list, or
    one spec on its own (``metrics=deletion`` on Hydra's command line is the string ``"deletion"``, which
    ``list()`` would split into letters); ``None`` gives ``[]``."""
    obj = to_plain(obj)
    if obj is None:
        return []
    if isinstance(obj, (str, bytes, Mapping)) or not isinstance(obj, Sequence):
        return [obj]
    return list(obj)
