"""A tiny name → factory registry shared by backbones and detector heads (open_clip / timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named factories with `register`, `names`, `get` and `create`.

    An unknown name raises `UsageError` listing the valid names.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register `obj` under `name`; usable as a decorator when `obj` is omitted."""

        def _add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        return _add(obj) if obj is not None else _add

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The object registered as `name`, or a `UsageError` listing the valid names."""
        try:
            return self._items[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, *args, **kwargs):
        """Call the factory registered as `name` with the given arguments."""
        factory: Callable = self.get(name)  # type: ignore[assignment]
        return factory(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._items
