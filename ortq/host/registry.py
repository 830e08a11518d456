"""Name -> plugin-provided class tables, one per kind, owned by a toolkit (never module-level)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

from ortq.core.errors import ConfigError, PluginError

__all__ = ["Registry", "Entry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    plugin: str


class Registry(Generic[T]):
    """A table of named things that plugins add; duplicates are errors unless the plugin asks to replace.

    NNCF raises on a duplicate too; llm silently renames, which hides which plugin won.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, value: T, *, plugin: str, replace: bool = False) -> None:
        existing = self._entries.get(name)
        if existing is not None and not replace:
            raise PluginError(
                f"plugin {plugin!r} registers {self.kind} {name!r}, already registered by plugin "
                f"{existing.plugin!r}; pass replace=True to override it"
            )
        self._entries[name] = Entry(name, value, plugin)

    def remove_plugin(self, plugin: str) -> None:
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != plugin}

    def get(self, name: str) -> T:
        try:
            return self._entries[name].value
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(f"no {self.kind} named {name!r}; registered: {known}") from None

    def find(self, name: str) -> T | None:
        entry = self._entries.get(name)
        return entry.value if entry else None

    def entry(self, name: str) -> Entry[T]:
        self.get(name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)
