"""The run folder module: committed names only, one failure reader, atomic cell commits."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from wsss_bench.errors import UserError
from wsss_bench.reporting.format import fmt_stat
from wsss_bench.running import rundir


def _frame(key: str, n: int = 2) -> pd.DataFrame:
    return pd.DataFrame({"task": ["brats"] * n, "method": [key] * n, "z": list(range(n)), "dice": [0.5] * n})


def test_readers_skip_temporary_and_stray_files(tmp_path):
    rundir.write_cell(tmp_path, "a", _frame("a"), {"cell": {"task": "brats"}, "method": "a", "status": "done",
                                                   "identity": {"x": 1}})
    cells = tmp_path / "cells"
    # what a killed writer leaves: the temp names atomic_path makes (".<name>.<rand><suffix>")
    _frame("half").to_parquet(cells / ".b.parquet.k2j3.parquet", index=False)
    (cells / ".b.json.k2j3.json").write_text("{not json")
    (cells / ".c.failed.json.x1.json").write_text(json.dumps({"status": "failed", "method": "c", "error": "E"}))
    assert [p.name for p in rundir.cell_files(tmp_path)] == ["a.parquet"]
    assert sorted(rundir.collect(tmp_path)["method"].unique()) == ["a"]
    assert [m["method"] for m in rundir.cell_manifests(tmp_path)] == ["a"]  # the broken temp JSON is not read
    assert rundir.failed_cells(tmp_path) == []
    assert rundir.stored_identity(tmp_path, "a") == {"x": 1}
    assert rundir.stored_identity(tmp_path, "b") is None


def test_one_failure_reader_for_a_folder_and_for_manifests(tmp_path):
    rundir.write_failure(tmp_path, "k1", {"cell": {"task": "brats", "seed": 0}, "method": "seam+threshold",
                                          "status": "failed", "error": "PluginError: seam:\n  out of memory"})
    from_folder = rundir.failed_cells(tmp_path)
    assert from_folder == [rundir.FailedCell("brats", "seam+threshold", 0, "PluginError: seam:\n  out of memory")]
    assert from_folder[0].key == "k1" and from_folder[0].reason == "PluginError: seam:"
    assert from_folder[0].flat == "PluginError: seam: out of memory"
    rundir.write_manifest(tmp_path, {"command": "x"})
    manifest = rundir.read_manifest(tmp_path)
    assert rundir.failed_cells([manifest]) == from_folder
    # a finished commit of the same cell drops its failure record
    rundir.write_cell(tmp_path, "k1", _frame("k1"), {"status": "done", "method": "seam+threshold"})
    assert rundir.failed_cells(tmp_path) == []


def test_unreadable_manifest_is_one_user_error(tmp_path):
    (tmp_path / rundir.MANIFEST_FILE).write_text("{")
    with pytest.raises(UserError, match="cannot read manifest"):
        rundir.read_manifest(tmp_path)
    assert rundir.read_manifest(tmp_path, missing_ok=True) is None


def test_prepare_refuses_another_configuration_unless_forced(tmp_path):
    rundir.prepare(tmp_path, {"profile": "smoke"}, force=False)
    rundir.write_cell(tmp_path, "a", _frame("a"), {"status": "done"})
    with pytest.raises(UserError, match="another configuration"):
        rundir.prepare(tmp_path, {"profile": "cpu"}, force=False)
    rundir.prepare(tmp_path, {"profile": "cpu"}, force=True)
    assert rundir.cell_files(tmp_path) == []


@pytest.mark.parametrize("mean,std,ci,compact,want", [
    (0.39249, 0.2851, None, True, "0.392±0.29"),
    (0.39249, 0.2851, None, False, "0.392 ± 0.29"),
    (0.39249, 0.2851, (0.35, 0.4311), False, "0.392 ± 0.29 [0.350, 0.431]"),
    (float("nan"), 0.1, None, False, "—"),
    (0.5, float("nan"), None, True, "0.500"),
])
def test_fmt_stat_spellings(mean, std, ci, compact, want):
    assert fmt_stat(mean, std, ci, compact=compact) == want
