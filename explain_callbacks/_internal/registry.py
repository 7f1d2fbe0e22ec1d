"""String registries from short names (``"ig"``, ``"rise"``, ``"deletion"``) to constructors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["ATTRIBUTIONS", "INTERACTIONS", "METRICS", "PENALTIES", "STUDENTS", "Registry"]


class Registry(Generic[T]):
    """A timm-style decorator registry: ``@REG.register("name", "alias")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, *names: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            for n in names:
                key = n.lower()
                if key in self._entries and self._entries[key] is not obj:
                    raise KeyError(f"{self.kind} name {n!r} is already registered to {self._entries[key]!r}")
                self._entries[key] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise KeyError(
                f"Unknown {self.kind} {name!r}. Available: {', '.join(self.names())}. "
                f"Pass a registered name, an instance, or register your own with "
                f"@{self.kind.upper()}S.register('name')."
            ) from None

    def build(self, spec: str | Mapping[str, Any] | T, **overrides: Any) -> T:
        """Build from a name, a ``{"name": ..., **kwargs}`` mapping, or return an instance as is."""
        if isinstance(spec, str):
            return self.get(spec)(**overrides)
        if isinstance(spec, Mapping):
            kwargs = dict(spec)
            name = kwargs.pop("name", None)
            if name is None:
                raise KeyError(f"A {self.kind} given as a mapping needs a 'name' key, got keys {list(kwargs)}.")
            kwargs.update(overrides)
            return self.get(name)(**kwargs)
        return spec


ATTRIBUTIONS: Registry[Any] = Registry("attribution")
METRICS: Registry[Any] = Registry("metric")
INTERACTIONS: Registry[Any] = Registry("interaction")
PENALTIES: Registry[Any] = Registry("penalty")
STUDENTS: Registry[Any] = Registry("student")
