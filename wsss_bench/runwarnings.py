"""Warnings raised while a run computes: one clean line each, and kept for the manifest.

A plugin that calls ``warnings.warn`` (AME-CAM when its deletion test cannot choose a
polarity, LayerCAM on gridded layers) would otherwise print Python's raw form, with the file,
line number and source line of the call (``plugins/amecam.py:166: UserWarning: ...``), which
tells a user nothing they can act on.  Inside :func:`capture`, each warning is printed once as
``warning: <text>`` on stderr (plain text, so brackets are never read as markup) and recorded
as ``{"category", "message", "source"}``; the runner stores the records in the cell's manifest
and ``report`` shows them.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

#: warnings recorded in this process since the last :func:`capture` began (a list per capture)
_STACK: list[list[dict[str, Any]]] = []


def _source(filename: str) -> str:
    """Where a warning came from, as a user names it: a plugin or a harness module."""
    path = Path(filename)
    parts = path.with_suffix("").parts
    for root in ("wsss_bench_plugins", "plugins"):
        if root in parts:
            return "plugin " + ".".join(parts[parts.index(root) + 1:])
    if "wsss_bench" in parts:
        return ".".join(parts[parts.index("wsss_bench"):])
    return path.stem


def one_line(message: Warning | str) -> str:
    """The warning's text on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(message).split())


def record(message: Warning | str, category: type[Warning], filename: str) -> dict[str, Any]:
    return {"category": category.__name__, "message": one_line(message), "source": _source(filename)}


def _show(message, category, filename, lineno, file: TextIO | None = None, line: str | None = None) -> None:
    rec = record(message, category, filename)
    for bucket in _STACK:
        if rec not in bucket:
            bucket.append(rec)
    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"warning: {rec['message']}\n")
        stream.flush()
    except (OSError, ValueError):  # a closed stream: the record is what matters
        pass


@contextmanager
def capture() -> Iterator[list[dict[str, Any]]]:
    """Print each warning raised inside as one clean line and yield the list of their records.

    Python's default filter stays in force (a warning from one place is shown once)."""
    bucket: list[dict[str, Any]] = []
    _STACK.append(bucket)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show
        try:
            yield bucket
        finally:
            _STACK.remove(bucket)
