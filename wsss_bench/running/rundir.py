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
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from wsss_bench.cache import atomic_path, atomic_write_json
from wsss_bench.errors import UserError


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


# --------------------------------------------------------------------------- predictions
PREDICTIONS_DIR = "predictions"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- 1. storing
def save_predictions(out_dir: str | Path, cell_key: str, case_ids: Sequence[str], z: Sequence[int],
                     masks: Any, *, task: str, method: str, seed: int) -> Path:
    """Write one cell's ungated predicted masks (N, S, S) bool of its test slices.

    ``case_ids``/``z`` identify each row (the results' ``case_id``/``z``).  The file is
    ``<out_dir>/predictions/<cell_key>.npz``, written atomically; returns its path.
    """
    m = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    if m.ndim != 3 or m.shape[1] != m.shape[2]:
        raise ValueError(f"masks must be (N, S, S), got shape {m.shape}")
    if len(case_ids) != len(m) or len(z) != len(m):
        raise ValueError(f"{len(m)} masks but {len(case_ids)} case ids and {len(z)} z values")
    path = Path(out_dir) / PREDICTIONS_DIR / f"{cell_key}.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, version=np.int64(FORMAT_VERSION), task=np.str_(task), method=np.str_(method),
                seed=np.int64(seed), case_ids=np.asarray([str(c) for c in case_ids], dtype=np.str_),
                z=np.asarray(z, dtype=np.int64), shape=np.asarray(m.shape, dtype=np.int64),
                bits=np.packbits(m.astype(bool).reshape(-1)))
    return path


@dataclass
class Predictions:
    """One cell's stored masks: rows (case_id, z) and the (N, S, S) bool masks."""

    task: str
    method: str
    seed: int
    case_ids: np.ndarray
    z: np.ndarray
    masks: np.ndarray
    path: Path

    def lookup(self, case_id: str, z: int) -> np.ndarray | None:
        hit = np.flatnonzero((self.case_ids == str(case_id)) & (self.z == int(z)))
        return self.masks[hit[0]] if len(hit) else None


def read_predictions(path: str | Path) -> Predictions:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            shape = tuple(int(s) for s in f["shape"])
            masks = np.unpackbits(f["bits"], count=int(np.prod(shape))).astype(bool).reshape(shape)
            return Predictions(str(f["task"]), str(f["method"]), int(f["seed"]), f["case_ids"].astype(str),
                               f["z"].astype(np.int64), masks, path)
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"cannot read stored predictions {path}: {err}") from None


def load_predictions(run_dirs: str | Path | Iterable[str | Path]) -> dict[tuple[str, str, int], Predictions]:
    """Every stored cell of the run directories: (task, method, seed) -> Predictions."""
    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    out: dict[tuple[str, str, int], Predictions] = {}
    for d in dirs:
        for f in sorted((Path(d) / PREDICTIONS_DIR).glob("*.npz")):
            p = read_predictions(f)
            out[(p.task, p.method, p.seed)] = p
    return out
