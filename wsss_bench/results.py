"""The per-slice long table (parquet) and the manifest of a run directory.

Layout of a run directory::

    results.parquet      every cell's per-slice rows (one row per method x gate x test slice)
    manifest.json        how it was made (PROTOCOL section 12)
    cells/<key>.parquet  one cell's rows, written atomically when the cell finishes
    cells/<key>.json     that cell's manifest part (stages, artifacts, records)
    summary.md           the printed table, as Markdown

Aggregates are views of ``results.parquet``; nothing here lays out a table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsss_bench.cache import atomic_path, atomic_write_json


def cell_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "cells").glob("*.parquet"))


def collect(out: Path):
    """Concatenate every finished cell of ``out`` into ``results.parquet`` (atomically)."""
    import pandas as pd

    files = cell_files(out)
    if not files:
        return None
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    with atomic_path(Path(out) / "results.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def cell_manifests(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "cells").glob("*.json"))]


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    manifest = dict(manifest)
    manifest["cells"] = cell_manifests(out)
    atomic_write_json(Path(out) / "manifest.json", manifest)
