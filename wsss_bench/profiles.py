"""Profiles: every value of docs/protocol.md section 10, read from ``profiles.toml``.

A profile is a plain nested dict with attribute access (``profile.classifier.epochs``).
``COMMON`` holds the values that are identical across profiles.
"""
from __future__ import annotations

import copy
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from wsss_bench.errors import UserError

PROFILE_FILE = Path(__file__).with_name("profiles.toml")
PROFILE_NAMES = ("smoke", "cpu", "paper")


class Section(dict):
    """A dict whose keys are also attributes; nested dicts become Sections."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    @classmethod
    def of(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return cls({k: cls.of(v) for k, v in value.items()})
        return value


@lru_cache(maxsize=None)
def _raw() -> dict:
    with PROFILE_FILE.open("rb") as fh:
        return tomllib.load(fh)


def load_profile(name: str) -> Section:
    """The profile ``name`` with a ``name`` key added; a clear error for unknown names."""
    raw = _raw()
    if name not in PROFILE_NAMES or name not in raw:
        raise UserError(
            f"unknown profile '{name}': choose one of {', '.join(PROFILE_NAMES)} "
            f"(defined in {PROFILE_FILE})"
        )
    prof = Section.of(raw[name])
    prof["name"] = name
    prof["common"] = Section.of(raw["common"])
    return prof


def apply_overrides(profile: Section, overrides: "list[str] | tuple[str, ...]") -> Section:
    """``profile`` with ``KEY=VALUE`` overrides (``cdm.iterations=200``, ``image_size=128``).

    Values parse as TOML (numbers, booleans, lists, quoted strings; a bare word is a string);
    the key must exist and keep its type.  An overridden profile is a different profile: its
    values enter every cache key and the run's identity.  Used for short device checks and
    sensitivity runs; the tables' profiles stay the ones in the file.
    """
    out = copy.deepcopy(profile)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set cdm.iterations=200")
        key, text = (part.strip() for part in item.split("=", 1))
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node: Any = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"--set {item}: profile '{profile['name']}' has no section '{part}'")
            node = node[part]
        last = parts[-1]
        if not isinstance(node, dict) or last not in node or last in ("name", "common"):
            raise UserError(f"--set {item}: profile '{profile['name']}' has no value '{key}' "
                            f"(see docs/profiles.md for the knobs)")
        old = node[last]
        if isinstance(old, bool) != isinstance(value, bool) or (
                isinstance(old, (int, float)) and not isinstance(value, (int, float))) or (
                isinstance(old, (list, str, dict)) and type(old) is not type(value)):
            raise UserError(f"--set {item}: '{key}' is {type(old).__name__} ({old!r}); got {value!r}")
        node[last] = Section.of(value) if isinstance(value, dict) else value
    if overrides:
        out["overrides"] = list(overrides)
    return out


def common() -> Section:
    return Section.of(_raw()["common"])


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        if not value:
            return "full"
        if all(isinstance(v, bool) for v in value):
            return "(" + ",".join("T" if v else "F" for v in value) + ")"
        return "(" + ",".join(_fmt(v) for v in value) + ")"
    if isinstance(value, dict):
        if not value:
            return "dataset rules"
        return "; ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def markdown_table() -> str:
    """The profile file as the Markdown table shown in docs/profiles.md."""
    raw = _raw()
    knobs = [k for k in raw["paper"]]
    lines = ["| knob | " + " | ".join(PROFILE_NAMES[::-1]) + " |", "|---|---|---|---|"]
    for knob in knobs:
        cells = [_fmt(raw[p][knob]) for p in PROFILE_NAMES[::-1]]
        lines.append(f"| {knob} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
