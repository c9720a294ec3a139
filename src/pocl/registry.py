"""A small name -> object registry with exact lookup and typo suggestions.

Lookups are exact (after lower-casing): ``"kl"`` never silently matches ``"fkl"``, unlike
substring-matching of loss names in the authors' code. An unknown name raises
:class:`pocl.errors.UnknownNameError`, which suggests the nearest registered names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from pocl.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, item: T, *, aliases: tuple[str, ...] = ()) -> T:
        key = name.lower()
        keys = [key] + [a.lower() for a in aliases]
        # Check every name before registering any, so a clash leaves the registry unchanged.
        for k in keys:
            if k in self._items or k in self._aliases or keys.count(k) > 1:
                raise ValueError(f"{self.kind} name '{k}' is already registered")
        self._items[key] = item
        for a in keys[1:]:
            self._aliases[a] = key
        return item

    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        if key in self._items:
            return key
        if key in self._aliases:
            return self._aliases[key]
        raise UnknownNameError(self.kind, name, list(self._items) + list(self._aliases))

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = name.strip().lower()
        return key in self._items or key in self._aliases

    def names(self) -> list[str]:
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
