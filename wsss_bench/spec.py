"""Spec strings: ``name[k=v,k2=[a,b]]`` -> parameter grids (benchopt style).

- A bracketed list is a grid axis: ``cldf[tau=[0.1,0.5]]`` is two cells.
- A parameter that itself takes a list joins items with ``+``: ``layercam[layers=layer2+layer4]``.
- Several specs are separated by top-level commas: ``gradcam,scorecam[variant=library]``.
- Map sources combine with a top-level ``+``: ``amecam+mg`` is one cell with two sources
  (``+`` inside brackets still joins list items: ``layercam[layers=layer3+layer4]+mg``);
  :func:`parse_sources` reads these, :func:`parse_specs` refuses them.
- Scalars become int, float, bool (true/false) or None (none) when they look like one; quote
  a value ('...' or "...") to keep it a string.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from wsss_bench.errors import UserError

#: a plugin name; ``distribution:name`` reaches a third-party plugin whose name a built-in holds
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*(?::[A-Za-z_][A-Za-z0-9_.\-]*)?")


@dataclass
class Spec:
    """One parsed spec: a plugin name and, per parameter, the list of values to grid over."""

    name: str
    grid: dict[str, list[Any]] = field(default_factory=dict)
    text: str = ""

    def expand(self) -> list[dict[str, Any]]:
        """Cartesian product of the grid, in a stable order."""
        if not self.grid:
            return [{}]
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> UserError:
        pointer = f"{self.text}\n{' ' * self.pos}^"
        return UserError(
            f"malformed spec '{self.text}' at position {self.pos}: {what}. "
            f"Expected NAME or NAME[key=value,key2=[a,b]]\n{pointer}"
        )

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def expect(self, ch: str) -> None:
        self.skip_ws()
        if self.peek() != ch:
            raise self.error(f"expected '{ch}'" + (f", found '{self.peek()}'" if self.peek() else ", found the end"))
        self.pos += 1

    def name(self) -> str:
        self.skip_ws()
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.error("expected a name")
        self.pos = m.end()
        return m.group(0)

    def specs(self, combine: bool = False) -> list[list[Spec]]:
        out = [self.combo(combine)]
        self.skip_ws()
        while self.peek() == ",":
            self.pos += 1
            out.append(self.combo(combine))
            self.skip_ws()
        if self.pos != len(self.text):
            if self.peek() == "+" and not combine:
                raise self.error("'+' joins map sources (--cam a+b), not refiners; give one plugin here")
            raise self.error(f"unexpected '{self.peek()}'")
        return out

    def combo(self, combine: bool) -> list[Spec]:
        parts = [self.spec()]
        self.skip_ws()
        while combine and self.peek() == "+":
            self.pos += 1
            parts.append(self.spec())
            self.skip_ws()
        return parts

    def spec(self) -> Spec:
        start = self.pos
        name = self.name()
        grid: dict[str, list[Any]] = {}
        self.skip_ws()
        if self.peek() == "[":
            self.pos += 1
            self.skip_ws()
            if self.peek() == "]":
                self.pos += 1
            else:
                while True:
                    key = self.name()
                    if key in grid:
                        raise self.error(f"parameter '{key}' given twice")
                    self.expect("=")
                    value = self.value(top=True)
                    grid[key] = value if isinstance(value, list) else [value]
                    self.skip_ws()
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    self.expect("]")
                    break
        return Spec(name, grid, self.text[start : self.pos].strip())

    def value(self, top: bool = False) -> Any:
        self.skip_ws()
        if self.peek() == "[":
            if not top:
                raise self.error("nested lists are not allowed; join list items with '+'")
            self.pos += 1
            items = [self.value()]
            self.skip_ws()
            while self.peek() == ",":
                self.pos += 1
                items.append(self.value())
                self.skip_ws()
            self.expect("]")
            return items
        if self.peek() in ("'", '"'):
            quote = self.peek()
            end = self.text.find(quote, self.pos + 1)
            if end < 0:
                raise self.error("unterminated quote")
            raw = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return raw
        start = self.pos
        while self.peek() and self.peek() not in ",[]=":
            self.pos += 1
        raw = self.text[start : self.pos].strip()
        if not raw:
            raise self.error("expected a value")
        quote = next((c for c in raw if c in "'\""), None)
        if quote:  # else a value could hold both quote kinds, which no spec can write back
            self.pos = start + self.text[start:].index(quote)
            raise self.error(f"a {quote} inside an unquoted value; quote the whole value instead, "
                             f"e.g. key='text' or key=\"it's\"")
        return parse_scalar(raw)


def parse_scalar(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def parse_specs(text: str) -> list[Spec]:
    """Parse one or more comma-separated specs; UserError with a pointer if malformed."""
    if text is None or not str(text).strip():
        raise UserError("empty spec: give a plugin name such as 'gradcam' or 'gradcam[layer=layer3]'")
    return [combo[0] for combo in _Parser(str(text)).specs(combine=False)]


def parse_sources(text: str) -> list[list[Spec]]:
    """Comma-separated alternatives, each one or more map sources joined by a top-level ``+``.

    ``gradcam,amecam+mg`` -> [[gradcam], [amecam, mg]]: two kinds of cell, the second with two
    sources.  A source named twice in one combination is refused.
    """
    if text is None or not str(text).strip():
        raise UserError("empty --cam spec: give a map source such as 'gradcam', 'amecam+mg' or "
                        "'layercam[layers=layer3+layer4]'")
    combos = _Parser(str(text)).specs(combine=True)
    for combo in combos:
        names = [s.name for s in combo]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"map source '{dup[0]}' appears twice in '{'+'.join(s.text for s in combo)}'; "
                            f"name each source once")
    return combos


def format_sources(specs: list[str]) -> str:
    """Canonical text of a combination of map sources (already canonical specs)."""
    return "+".join(specs)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    if isinstance(value, str) and (value != value.strip() or parse_scalar(value) != value
                                   or any(c in value for c in ",[]='\"") or not value):
        return f"'{value}'" if "'" not in value else f'"{value}"'
    return str(value)


def format_spec(name: str, params: dict[str, Any]) -> str:
    """Canonical text of one cell: name plus sorted parameters (no grids)."""
    if not params:
        return name
    inner = ",".join(f"{k}={format_value(params[k])}" for k in sorted(params))
    return f"{name}[{inner}]"
