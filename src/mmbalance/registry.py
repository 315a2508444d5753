"""Name -> factory registries (methods, fusions, encoders, datasets), as timm does for models.

Every registry entry carries a one-line summary so ``mmbalance list`` can describe it, and an
unknown name fails with the list of valid names.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration or data error; the CLI prints its message on one line."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    summary: str


class Registry(Generic[T]):
    """A small name -> object registry with helpful errors.

    >>> r = Registry("widget")
    >>> @r.register("a", summary="the a widget")
    ... def make_a(): return "A"
    >>> r.get("a")()
    'A'
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, summary: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            text = summary
            if text is None:
                doc = inspect.getdoc(obj) or ""
                text = doc.strip().splitlines()[0] if doc.strip() else ""
            self._entries[name] = Entry(name, obj, text)
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise ConfigError(f"unknown {self.kind} '{name}'; valid {self.kind}s: {valid}")
        return self._entries[name].obj

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def check_options(kind: str, name: str, factory: Callable[..., Any], options: dict[str, Any],
                  skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate ``options`` against ``factory``'s signature and type hints (see
    :mod:`mmbalance.options`): unknown names fail with the valid ones, values are coerced to the
    declared type and checked against the declared range. Returns the coerced options."""
    from .options import validate_options

    return validate_options(kind, name, factory, options, skip)
