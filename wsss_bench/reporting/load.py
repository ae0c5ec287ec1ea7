"""Results and manifests of one or more run folders, read through :mod:`wsss_bench.running.rundir`.

The per-slice rows of several runs are concatenated (each row keeps the ``run_dir`` it came
from) and refused when two runs score the same slice; a manifest gets a ``_run_dir`` key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from wsss_bench.errors import UserError
from wsss_bench.profiles import load_profile
from wsss_bench.reporting.stats import check_unique_slices, require_columns
from wsss_bench.running import rundir
from wsss_bench.running.rundir import FailedCell, failed_cells  # noqa: F401  (the one failure reader)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

REQUIRED_COLUMNS = ["task", "method", "gate", "case_id", "z", "label", "dice", "iou"]


def _read_one(path: Path) -> "pd.DataFrame":
    df = rundir.read_results(path)
    require_columns(df, REQUIRED_COLUMNS, what=f"results file {path}")
    if "run_dir" not in df.columns:
        df["run_dir"] = str(path.parent)
    return df


def _sources(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise UserError("no results given; pass at least one run directory")
    files: dict[Path, None] = {}
    for src in sources:
        for f in rundir.result_files(Path(src)):
            files.setdefault(f.resolve(), None)
    return list(files)


def load_results(source: str | os.PathLike | Iterable[str | os.PathLike]) -> "pd.DataFrame":
    """The per-slice results of one run, of every run below a folder, or of a list of either.

    Adds a ``run_dir`` column (the folder each row came from).  Raises UserError naming the
    path when it is missing or holds no ``results.parquet``, and when two runs score the
    same slice for the same method, gate, seed and profile.
    """
    import pandas as pd

    df = pd.concat([_read_one(f) for f in _sources(source)], ignore_index=True)
    check_unique_slices(df)
    return df


def load_manifests(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """The ``manifest.json`` of every run directory ``load_results`` would read (where present).

    Each manifest gets a ``_run_dir`` key.  A manifest that is not JSON raises UserError.
    """
    out = []
    for f in _sources(source):
        m = rundir.read_manifest(f.parent)
        if m is None:
            continue
        m["_run_dir"] = str(f.parent)
        out.append(m)
    return out


def bootstrap_resamples(df: "pd.DataFrame", manifests: Sequence[Mapping[str, Any]] = ()) -> int:
    """Resamples of the case bootstrap: the run's profile ``bootstrap.resamples`` (docs/protocol.md §10)."""
    for m in manifests:
        boot = (m.get("profile") or {}).get("bootstrap") or {}
        if "resamples" in boot:
            return int(boot["resamples"])
    if "profile" in df.columns and df["profile"].notna().any():
        try:
            return int(load_profile(str(df["profile"].dropna().iloc[0])).bootstrap.resamples)
        except (UserError, AttributeError, KeyError):
            return 0
    return 0




def load_runs(source: str | os.PathLike | Iterable[str | os.PathLike],
              labels: Sequence[str] = ()) -> tuple["pd.DataFrame", list[dict]]:
    """(rows, manifests) of the runs, refused when runs of different identity would pool.

    Runs whose profile, ``--set`` values, data or code differ are refused with one sentence
    (:mod:`wsss_bench.reporting.identity`) unless ``labels`` names each run (one per entry of
    ``source``, in order): their rows then stay apart as ``method (label)``."""
    from wsss_bench.reporting.identity import apply_labels, check_poolable

    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    df = load_results(sources)
    manifests = load_manifests(sources)
    if labels:
        df = apply_labels(df, [str(s) for s in sources], list(labels))
    else:
        check_poolable(manifests)
    return df, manifests
