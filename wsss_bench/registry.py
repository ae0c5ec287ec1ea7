"""Name -> plugin class, one registry per kind, with wildcard listing and did-you-mean errors."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

from wsss_bench.errors import PluginError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    plugin: str  # the pluggy plugin (entry point / file) that registered it


class Registry(Generic[T]):
    """Plain dict of name -> Entry for one kind ("cams", "refiners", ...)."""

    def __init__(self, kind: str, noun: str) -> None:
        self.kind = kind
        self.noun = noun  # how errors call one item, e.g. "CAM source"
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, obj: T, plugin: str) -> str | None:
        """Register ``obj`` as ``name``; returns a warning if the name is taken (first wins)."""
        if not name or not isinstance(name, str):
            return f"plugin '{plugin}' registered a {self.noun} without a name: {obj!r}; set its `name`"
        if name in self._entries:
            other = self._entries[name].plugin
            return (
                f"plugin '{plugin}' tried to register {self.noun} '{name}', already registered "
                f"by '{other}'; kept the first (rename one of them)"
            )
        self._entries[name] = Entry(name, obj, plugin)
        return None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise PluginError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        names = sorted(self._entries)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(names) if names else "(none registered)"
        return f"unknown {self.noun} '{name}'.{hint} Available: {known}"

    def list(self, pattern: str = "*") -> list[Entry[T]]:
        return [e for n, e in sorted(self._entries.items()) if fnmatch.fnmatchcase(n, pattern)]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
