"""Profiles: every value of docs/protocol.md section 10, read from ``profiles.toml``.

A profile is a plain nested dict with attribute access (``profile.classifier.epochs``).
``COMMON`` holds the values that are identical across profiles.
"""
from __future__ import annotations

import copy
import difflib
import math
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
                raise UserError(f"--set {item}: profile '{profile['name']}' has no section '{part}'{_did_you_mean(key)}")
            node = node[part]
        last = parts[-1]
        if not isinstance(node, dict) or last not in node or last in ("name", "common"):
            raise UserError(f"--set {item}: profile '{profile['name']}' has no value '{key}'{_did_you_mean(key)} "
                            f"(see docs/profiles.md for the knobs)")
        old = node[last]
        if isinstance(old, bool) != isinstance(value, bool) or (
                isinstance(old, (int, float)) and not isinstance(value, (int, float))) or (
                isinstance(old, (list, str, dict)) and type(old) is not type(value)):
            raise UserError(f"--set {item}: '{key}' is {type(old).__name__} ({old!r}); got {value!r}")
        node[last] = Section.of(value) if isinstance(value, dict) else value
        problem = check_value(key, node[last])
        if problem:
            raise UserError(f"--set {item}: {problem}")
    if overrides:
        problem = check_profile(out)
        if problem:
            raise UserError(f"--set {' '.join(overrides)}: {problem}")
        out["overrides"] = list(overrides)
    return out


# ------------------------------------------------------------------ value rules
#: the largest integer a count may take (guards against 1e309-style overflow and absurd runs)
MAX_COUNT = 10**9


def flat_values(profile: Any) -> "dict[str, Any]":
    """Every value of a profile under its dotted key (``classifier.batch``), without name,
    common, overrides and hardware: what a refused configuration change is described by."""
    return _leaves(profile)


def _leaves(node: Any, prefix: str = "") -> "dict[str, Any]":
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("name", "common", "overrides", "hardware"):
                continue
            if isinstance(v, dict):
                out.update(_leaves(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
    return out


@lru_cache(maxsize=None)
def _shipped() -> "dict[str, list[Any]]":
    """Every dotted key of the shipped profiles and the values they give it."""
    seen: dict[str, list[Any]] = {}
    for name in PROFILE_NAMES:
        for key, value in _leaves(_raw()[name]).items():
            seen.setdefault(key, []).append(value)
    return seen


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, list(_shipped()), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _numbers(values: "list[Any]") -> "list[float]":
    flat: list[Any] = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return [v for v in flat if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_value(key: str, value: Any) -> str | None:
    """Why ``value`` is not acceptable for the profile value ``key`` (None when it is).

    Rules, derived from the shipped profiles so a new knob needs no new code: a number (or each
    number of a list) is finite and at most :data:`MAX_COUNT`; a key whose shipped values are all
    integers takes integers; it may be 0 only if a shipped profile uses 0, and is never negative;
    a float key whose shipped values are all below 1 stays below 1 (rates, decays, fractions).
    """
    shipped = _numbers(_shipped().get(key, []))
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            return f"'{key}' must be a finite number; got {v!r}"
        if abs(v) > MAX_COUNT:
            return f"'{key}' = {v!r} is out of range (at most {MAX_COUNT:g})"
        if shipped and all(isinstance(s, int) for s in shipped) and not isinstance(v, int):
            return f"'{key}' takes an integer, e.g. {shipped[0]}; got {v!r}"
        if v < 0:
            return f"'{key}' must not be negative; got {v!r}"
        if v == 0 and shipped and 0 not in shipped:
            return f"'{key}' must be greater than 0; got {v!r}"
        if shipped and isinstance(v, float) and all(0 <= s < 1 for s in shipped) and v >= 1:
            return f"'{key}' must be below 1 (a rate or fraction, e.g. {shipped[0]}); got {v!r}"
    return None


def check_profile(profile: Any) -> str | None:
    """Why a whole (overridden) profile cannot run, beyond single values (None when it can):
    the image size is at least 16 and a multiple of every classifier's output stride."""
    size = profile.get("image_size")
    if not isinstance(size, int) or size < 16:
        return f"'image_size' must be an integer of at least 16 pixels; got {size!r}"
    for section in ("cam_classifier", "table2_resnet", "amecam"):
        stride = (profile.get(section) or {}).get("output_stride")
        if isinstance(stride, int) and stride > 0 and size % stride:
            return (f"'image_size' = {size} is not a multiple of '{section}.output_stride' = {stride}; "
                    f"the classifier's feature map would not tile the image")
    return None


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
