"""The run folder: the one module that knows its files, writes them atomically and reads them.

Layout of a run directory::

    run.json                  the configuration identity the folder was made with
    results.parquet           every cell's per-slice rows (one row per method x gate x test slice)
    manifest.json             how it was made: config, environment, plugins, data, cell records
    cells/<key>.parquet       one cell's rows, written when the cell finishes
    cells/<key>.json          that cell's record (stages, artifacts, identity)
    cells/<key>.failed.json   the record of a cell that failed (its error)
    cells/<key>.error.txt     the traceback of a failure that was not the user's
    predictions/<key>.npz     one cell's ungated predicted masks
    summary.md / tables.md    the printed tables, as Markdown

Every write goes through a temporary file in the same folder (``.<name>.<random><suffix>``)
moved into place, so a reader sees a whole file or none.  Readers match only committed
names: a name that starts with a dot (a temporary file) is never read.  Runner, bench,
command line, reporting and mask export reach these files only through this module.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from wsss_bench.cache import atomic_path, atomic_write_json, atomic_write_text
from wsss_bench.errors import UserError

RUN_FILE = "run.json"
RESULTS_FILE = "results.parquet"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.md"
TABLES_FILE = "tables.md"
CELLS_DIR = "cells"
FAILED_SUFFIX = ".failed.json"


def _committed(folder: Path, pattern: str) -> list[Path]:
    """Files of ``folder`` matching ``pattern`` whose name is not a temporary one (no leading dot)."""
    return sorted(p for p in Path(folder).glob(pattern) if not p.name.startswith(".") and p.is_file())


def results_path(out: str | Path) -> Path:
    return Path(out) / RESULTS_FILE


def manifest_path(out: str | Path) -> Path:
    return Path(out) / MANIFEST_FILE


def tables_path(out: str | Path) -> Path:
    return Path(out) / TABLES_FILE


# --------------------------------------------------------------------------- the folder itself
def prepare(out: str | Path, identity: Mapping[str, Any], *, force: bool) -> None:
    """Make ``out`` (and ``cells/``) writable and stamp it with ``identity``.

    A folder holding finished cells of another identity raises UserError (its rows would be
    relabelled), unless ``force``, which clears its cells and tables instead.
    """
    out = Path(out)
    probe_parent = out
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    if not probe_parent.is_dir():
        raise UserError(f"--out {out}: {probe_parent} is a file, not a folder; choose another --out")
    try:
        (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror or err}); choose a writable folder") from None
    mine = dict(identity)
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            theirs = json.loads(run_file.read_text()).get("identity", {})
        except (OSError, ValueError):
            theirs = {}
        if theirs and theirs != mine and cell_files(out):
            if force:
                shutil.rmtree(out / CELLS_DIR, ignore_errors=True)
                (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
                for name in (RESULTS_FILE, MANIFEST_FILE, SUMMARY_FILE):
                    (out / name).unlink(missing_ok=True)
            else:
                diff = ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in sorted(mine)
                                 if theirs.get(k) != mine.get(k))
                raise UserError(f"--out {out} holds results made with another configuration ({diff}); "
                                f"choose a new --out, or pass --force to replace them")
    atomic_write_json(run_file, {"identity": mine})


# --------------------------------------------------------------------------- cells
def cell_files(out: str | Path) -> list[Path]:
    """The finished cells' row files (``cells/<key>.parquet``)."""
    return _committed(Path(out) / CELLS_DIR, "*.parquet")


def stored_identity(out: str | Path, key: str) -> Any:
    """The identity recorded with finished cell ``key``; None when it is not finished (or unreadable)."""
    cells = Path(out) / CELLS_DIR
    if not (cells / f"{key}.parquet").is_file() or not (cells / f"{key}.json").is_file():
        return None
    try:
        return json.loads((cells / f"{key}.json").read_text()).get("identity")
    except (OSError, ValueError):
        return None


def write_cell(out: str | Path, key: str, frame: Any, record: Mapping[str, Any]) -> None:
    """Commit a finished cell: its rows, then its record; drops an earlier failure record."""
    cells = Path(out) / CELLS_DIR
    with atomic_path(cells / f"{key}.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    atomic_write_json(cells / f"{key}.json", dict(record))
    (cells / f"{key}{FAILED_SUFFIX}").unlink(missing_ok=True)


def write_failure(out: str | Path, key: str, record: Mapping[str, Any]) -> None:
    """Record a failed cell (``cells/<key>.failed.json``)."""
    atomic_write_json(Path(out) / CELLS_DIR / f"{key}{FAILED_SUFFIX}", dict(record))


def write_traceback(out: str | Path, key: str, text: str) -> Path:
    """Keep the traceback of a failed cell next to its record; returns the file."""
    path = Path(out) / CELLS_DIR / f"{key}.error.txt"
    atomic_write_text(path, text)
    return path


def cell_manifests(out: str | Path) -> list[dict[str, Any]]:
    """Every cell record of ``out``: finished (``<key>.json``) and failed (``<key>.failed.json``)."""
    return [json.loads(p.read_text()) for p in _committed(Path(out) / CELLS_DIR, "*.json")]


@dataclass(frozen=True)
class FailedCell:
    """A cell recorded as failed: its key (when known), task, method label, seed and error."""

    task: str
    method: str
    seed: Any
    error: str
    key: str = field(default="", compare=False)

    @property
    def flat(self) -> str:
        """The error on one line (whitespace runs collapsed), as report notes show it."""
        return " ".join(self.error.split())

    @property
    def reason(self) -> str:
        """The first line of the error, at most 120 characters."""
        return (self.error.splitlines() or [""])[0][:120]


def _failed(record: Any, key: str = "") -> FailedCell | None:
    if not isinstance(record, Mapping) or record.get("status") != "failed":
        return None
    cell = record.get("cell") if isinstance(record.get("cell"), Mapping) else {}
    return FailedCell(task=str(record.get("task", cell.get("task", ""))),
                      method=str(record.get("method", cell.get("method", ""))),
                      seed=record.get("seed", cell.get("seed")),
                      error=str(record.get("error") or "unknown error"),
                      key=key or str(cell.get("key", "")))


def failed_cells(source: str | Path | Sequence[Mapping[str, Any]]) -> list[FailedCell]:
    """The failed cells of a run folder (its ``cells/*.failed.json``) or of loaded manifests
    (their ``cells`` records): the one reader of failure records."""
    if isinstance(source, (str, os.PathLike)):
        out = []
        for p in _committed(Path(source) / CELLS_DIR, f"*{FAILED_SUFFIX}"):
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            f = _failed(rec, p.name[: -len(FAILED_SUFFIX)])
            if f is not None:
                out.append(f)
        return out
    return [f for m in source for f in map(_failed, m.get("cells", []) or []) if f is not None]


# --------------------------------------------------------------------------- results, manifest, tables
def collect(out: str | Path):
    """Concatenate every finished cell of ``out`` into ``results.parquet`` (atomically)."""
    import pandas as pd

    files = cell_files(out)
    if not files:
        return None
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    with atomic_path(results_path(out)) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def has_results(out: str | Path) -> bool:
    return results_path(out).is_file()


def read_manifest(out: str | Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """``manifest.json`` of ``out``; None when absent.  Unreadable JSON raises UserError unless
    ``missing_ok`` (then it reads as absent)."""
    path = manifest_path(out)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        if missing_ok:
            return None
        raise UserError(f"cannot read manifest {path}: {err}") from None


def write_manifest(out: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` with every cell record of the folder attached."""
    manifest = dict(manifest)
    manifest["cells"] = cell_manifests(out)
    atomic_write_json(manifest_path(out), manifest)


def write_summary(out: str | Path, text: str) -> Path:
    atomic_write_text(Path(out) / SUMMARY_FILE, text)
    return Path(out) / SUMMARY_FILE


def write_tables(out: str | Path, text: str) -> Path:
    atomic_write_text(tables_path(out), text)
    return tables_path(out)


def result_files(path: str | Path) -> list[Path]:
    """The ``results.parquet`` of a run folder, of every run below a folder, or the file itself."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"results path {path} does not exist; pass a run directory "
                        f"(one holding {RESULTS_FILE}) or a folder of run directories")
    if path.is_file():
        if path.suffix == ".parquet":
            return [path]
        raise UserError(f"{path} is not a results file; pass a run directory holding {RESULTS_FILE}")
    if (path / RESULTS_FILE).is_file():
        return [path / RESULTS_FILE]
    found = sorted(path.rglob(RESULTS_FILE))
    if not found:
        raise UserError(f"{path} is not a results directory: no {RESULTS_FILE} in it or below it; "
                        "run `wsss-bench run` first or pass the run directory it printed")
    return found


def read_results(path: str | Path):
    """One ``results.parquet`` as a frame; a file that is not parquet raises UserError."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as err:  # corrupt or not parquet at all
        raise UserError(f"cannot read results file {path}: {err}") from None


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
        for f in _committed(Path(d) / PREDICTIONS_DIR, "*.npz"):
            p = read_predictions(f)
            out[(p.task, p.method, p.seed)] = p
    return out
