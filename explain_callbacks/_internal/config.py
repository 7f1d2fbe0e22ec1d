"""Config plumbing: arguments that arrive from Hydra as OmegaConf containers."""

from __future__ import annotations

from typing import Any

__all__ = ["to_plain"]


def to_plain(obj: Any) -> Any:
    """OmegaConf ``DictConfig``/``ListConfig`` (from Hydra) to plain dicts and lists; anything else as is."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency, but keep plain use working
        return obj
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj
