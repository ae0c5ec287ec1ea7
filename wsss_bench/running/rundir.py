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
names: a name that starts with a dot (a temporary file) is never read, a ``cells/*.parquet``
counts only next to its ``<key>.json`` record (a stray ``*.parquet`` is not a result), and a
JSON file that is not a cell record is ignored.  Runner, bench, command line, reporting and mask export reach these files only
through this module.

Ownership: ``run.json`` marks a folder as made by wsss-bench.  A run writes only into an empty
(or new) folder or one holding ``run.json``, never into ``/`` or the home folder, and
``--force`` deletes only the names above, so a user's own files in the folder survive.  A run
holds an exclusive lock on ``.lock`` while it writes; a second run into the same folder is
refused in one sentence.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

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
PREDICTIONS_DIR = "predictions"
LOCK_FILE = ".lock"
#: the names of a run folder's own top-level entries (a folder holding only these is ours)
OWN_TOP = frozenset({RUN_FILE, RESULTS_FILE, MANIFEST_FILE, SUMMARY_FILE, TABLES_FILE, CELLS_DIR, PREDICTIONS_DIR,
                     LOCK_FILE})
#: the kinds of a cell's files (``cells/<key><kind>``, ``predictions/<key>.npz``)
CELL_KINDS = (".parquet", ".json", FAILED_SUFFIX, ".error.txt")
#: a cell file of a 12-hex-digit key or the temporary file of one (``.<name>.<random><suffix>``)
_OWN_CELL_FILE = re.compile(r"^\.?[0-9a-f]{12}(\.parquet|\.json|\.failed\.json|\.error\.txt|\.npz)"
                            r"(\.[A-Za-z0-9_]+(\.parquet|\.tmp|\.npz|\.txt|\.json))?$")
_HELD: dict[str, Any] = {}


def _committed(folder: Path, pattern: str) -> list[Path]:
    """Files of ``folder`` matching ``pattern`` whose name is not a temporary one (no leading dot)."""
    return sorted(p for p in Path(folder).glob(pattern) if not p.name.startswith(".") and p.is_file())


def _record(path: Path) -> dict | None:
    """A cell record (JSON object with a ``status``) read from ``path``; None for anything else."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "status" in rec else None


def results_path(out: str | Path) -> Path:
    return Path(out) / RESULTS_FILE


def manifest_path(out: str | Path) -> Path:
    return Path(out) / MANIFEST_FILE


def tables_path(out: str | Path) -> Path:
    return Path(out) / TABLES_FILE


# --------------------------------------------------------------------------- the folder itself
def prepare(out: str | Path, identity: Mapping[str, Any], *, force: bool,
            values: Mapping[str, Any] | None = None) -> None:
    """Make ``out`` (and ``cells/``) writable, lock it for this process and stamp it with ``identity``.

    Refused (UserError, before anything is written): ``/`` or the home folder, a non-empty folder
    without ``run.json`` (not made by wsss-bench), a folder another run holds the lock of, and a
    folder holding finished cells of another identity (its rows would be relabelled) unless
    ``force``, which deletes only this module's own files.  ``values`` (the flattened profile)
    are stored so a refusal can name the changed keys.
    """
    out = Path(out)
    _check_ownership(out)
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
    _lock(out)
    mine = dict(identity)
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            stored = json.loads(run_file.read_text())
        except (OSError, ValueError):
            stored = {}
        theirs = stored.get("identity", {}) if isinstance(stored, dict) else {}
        if theirs and theirs != mine and cell_files(out):
            if force:
                _delete_own_files(out)
            else:
                diff = _describe_change(theirs, mine, stored.get("values") if isinstance(stored, dict) else None,
                                        values)
                raise UserError(f"--out {out} holds results made with another configuration ({diff}); "
                                f"choose a new --out, or pass --force to replace them")
    atomic_write_json(run_file, {"identity": mine, **({"values": dict(values)} if values is not None else {})})


def _check_ownership(out: Path) -> None:
    """Refuse ``/``, the home folder and a non-empty folder that wsss-bench did not make."""
    try:
        real = out.resolve()
    except OSError:
        real = out.absolute()
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise UserError(f"--out {out}: refusing to write into {'the root folder' if real == Path(real.anchor) else 'your home folder'} "
                        f"(not made by wsss-bench); choose a new folder such as runs/my-run")
    if not out.is_dir() or (out / RUN_FILE).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_TOP and not p.name.startswith(".write-test-"))
    if foreign:
        raise UserError(f"--out {out}: the folder is not empty and was not made by wsss-bench (no {RUN_FILE}; it "
                        f"holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); choose a new or empty folder")


def _lock(out: Path) -> None:
    """Hold an exclusive lock on ``out/.lock`` until :func:`release` (or the process ends)."""
    key = str(out.resolve())
    if key in _HELD:
        return
    fh = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise UserError(f"--out {out}: another wsss-bench run (pid {holder}) is writing into this folder; wait for it "
                        f"to finish or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _HELD[key] = fh


def release(out: str | Path | None = None) -> None:
    """Release the lock of ``out`` (every lock this process holds when None)."""
    keys = list(_HELD) if out is None else [str(Path(out).resolve())]
    for key in keys:
        fh = _HELD.pop(key, None)
        if fh is not None:
            fh.close()


@contextmanager
def exclusive(out: str | Path) -> Iterator[None]:
    """Hold ``out``'s lock as another run would (tests, scripts that write into a run folder)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _delete_own_files(out: Path) -> None:
    """``--force`` on a folder of another configuration: delete this module's files only."""
    cells = out / CELLS_DIR
    keys = set()  # keys with a cell record of ours (whatever their spelling)
    for p in _committed(cells, "*.json"):
        if _record(p) is not None:
            keys.add(p.name[: -len(FAILED_SUFFIX)] if p.name.endswith(FAILED_SUFFIX) else p.name[: -len(".json")])
    for sub in (CELLS_DIR, PREDICTIONS_DIR):
        folder = out / sub
        if folder.is_dir():
            for p in folder.iterdir():
                stem = p.name.lstrip(".")
                ours = _OWN_CELL_FILE.match(p.name) or any(
                    stem.startswith(k + kind) for k in keys for kind in (*CELL_KINDS, ".npz"))
                if p.is_file() and ours:
                    p.unlink()
    for name in (RESULTS_FILE, MANIFEST_FILE, SUMMARY_FILE, TABLES_FILE):
        (out / name).unlink(missing_ok=True)
    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)


def _describe_change(theirs: Mapping[str, Any], mine: Mapping[str, Any], old_values: Any, new_values: Any) -> str:
    """The changed identity keys with old and new values; for the profile's values, the changed
    profile keys themselves (``classifier.batch 16 -> 8``) when both runs stored them."""
    parts = []
    for k in sorted(set(mine) | set(theirs)):
        if theirs.get(k) == mine.get(k):
            continue
        if k == "profile_values" and isinstance(old_values, Mapping) and isinstance(new_values, Mapping):
            changed = [f"{v} {old_values.get(v, '(unset)')!r} -> {new_values.get(v, '(unset)')!r}"
                       for v in sorted(set(old_values) | set(new_values)) if old_values.get(v) != new_values.get(v)]
            if changed:
                parts.append("profile values " + ", ".join(changed).replace("'", ""))
                continue
        parts.append(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- cells
def cell_files(out: str | Path) -> list[Path]:
    """The finished cells' row files (``cells/<key>.parquet`` with their ``<key>.json`` record)."""
    return [p for p in _committed(Path(out) / CELLS_DIR, "*.parquet") if p.with_suffix(".json").is_file()]


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
    return [rec for rec in map(_record, _committed(Path(out) / CELLS_DIR, "*.json")) if rec is not None]


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


def cell_quality(source: str | Path | Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, Any], dict[str, Any]]:
    """Model and pseudo-mask quality of every finished cell of a run folder (its
    ``cells/<key>.json``) or of loaded manifests (their ``cells`` records):
    ``{(task, method, seed): {"model_quality": ..., "pseudo_masks": ...}}``, the one reader of
    these records.  Cells recorded before they existed are left out."""
    if isinstance(source, (str, os.PathLike)):
        records = [r for r in cell_manifests(source) if isinstance(r, Mapping)]
    else:
        records = [r for m in source for r in (m.get("cells", []) or []) if isinstance(r, Mapping)]
    out: dict[tuple[str, str, Any], dict[str, Any]] = {}
    for rec in records:
        if rec.get("status") != "done" or not ("model_quality" in rec or "pseudo_masks" in rec):
            continue
        cell = rec.get("cell") if isinstance(rec.get("cell"), Mapping) else {}
        task, seed = str(cell.get("task", rec.get("task", ""))), cell.get("seed", rec.get("seed"))
        out[(task, str(rec.get("method", "")), seed)] = {"model_quality": rec.get("model_quality") or {}, "pseudo_masks": rec.get("pseudo_masks") or {}}
    return out


# --------------------------------------------------------------------------- results, manifest, tables
def collect(out: str | Path):
    """Concatenate every finished cell of ``out`` into ``results.parquet`` (atomically)."""
    import pandas as pd

    files = cell_files(out)
    if not files:
        return None
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f))
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"cell result {f} is unreadable ({str(err).splitlines()[0][:120]}); delete it and run the "
                            f"same command again (that cell is recomputed)") from None
    frame = pd.concat(frames, ignore_index=True)
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
