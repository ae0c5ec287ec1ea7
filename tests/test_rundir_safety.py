"""The run folder under kills, strays, concurrent runs and hostile --out / table files.

- a kill at the instant a cell's rows are written (a hook that ends the process between the
  temporary file and its rename) leaves a temporary file no reader takes; the same command
  then finishes with the rows of an uninterrupted run;
- stray ``*.parquet`` files in ``cells/`` (empty, foreign) are never read as results;
- a second run into a folder another run is writing is refused in one sentence;
- ``--out /``, the home folder and a non-empty folder wsss-bench did not make are refused;
  ``--force`` deletes only wsss-bench's own files;
- a table file nested 100,000 deep, one with too many rows, and a row naming an unknown
  plugin: one sentence each (the last on stderr, and exit 2 under ``--strict``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from wsss_bench.running import rundir

ROW_COLS = ["task", "method", "gate", "case_id", "z", "dice", "iou"]
KILL_AT_CELL_RENAME = """
import os, sys
from wsss_bench import cache
real = cache._publish
def hook(tmp, path):
    if str(path).endswith(".parquet") and os.path.basename(os.path.dirname(str(path))) == "cells":
        os._exit(137)  # killed between the temporary file and its rename
    return real(tmp, path)
cache._publish = hook
from wsss_bench.cli import main
main(sys.argv[1:])
"""


def _args(cache: Path, out: Path, *extra) -> list:
    return ["run", "--profile", "smoke", "--cam", "gradcam", "--method", "threshold",
            "--cache-dir", cache, "--out", out, *extra]


def _rows(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "results.parquet")
    return df[ROW_COLS].sort_values(ROW_COLS[:5]).reset_index(drop=True)


def test_kill_between_temp_write_and_rename_then_clean_rerun(run_cli, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, CI="1", OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILL_AT_CELL_RENAME, *map(str, _args(cache, out))],
                            capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == 137, killed.stdout + killed.stderr
    temps = [p for p in (out / "cells").iterdir() if p.name.startswith(".") and p.suffix == ".parquet"]
    assert temps, "the hook did not fire between the temporary write and the rename"
    (out / "cells" / f".{temps[0].name[1:13]}.parquet.zzzz.parquet").write_bytes(b"")  # a kill mid-write: 0 bytes
    again = run_cli(*_args(cache, out))
    assert again.exit_code == 0, again.output
    clean = run_cli(*_args(cache, tmp_path / "clean"))
    assert clean.exit_code == 0
    pd.testing.assert_frame_equal(_rows(out), _rows(tmp_path / "clean"))
    forced = run_cli(*_args(cache, out, "--force"))  # --force too (it died on the temp file before)
    assert forced.exit_code == 0, forced.output


def test_stray_parquet_files_are_not_results(run_cli, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert run_cli(*_args(cache, out)).exit_code == 0
    n = len(pd.read_parquet(out / "results.parquet"))
    (out / "cells" / "empty.parquet").write_bytes(b"")
    pd.read_parquet(out / "results.parquet").head(3).to_parquet(out / "cells" / "copy.parquet")
    assert {p.name for p in rundir.cell_files(out)} == {p.name for p in rundir.cell_files(out)
                                                        if p.name not in ("empty.parquet", "copy.parquet")}
    again = run_cli(*_args(cache, out))
    assert again.exit_code == 0, again.output
    assert len(pd.read_parquet(out / "results.parquet")) == n


def test_a_second_run_into_a_busy_folder_is_refused(run_cli, tmp_path):
    out = tmp_path / "out"
    with rundir.exclusive(out):
        result = run_cli(*_args(tmp_path / "cache", out))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith(f"error: --out {out}") and "another wsss-bench" in text and "Traceback" not in text
    assert not (tmp_path / "cache").exists()  # refused before any work


@pytest.mark.parametrize("where", ["root", "home", "foreign"])
def test_out_that_is_not_ours_is_refused(run_cli, tmp_path, monkeypatch, where):
    if where == "root":
        out = Path("/")
    elif where == "home":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        out = tmp_path / "home"
        out.mkdir()
        (out / ".bashrc").write_text("# mine\n")
    else:
        out = tmp_path / "mine"
        out.mkdir()
        (out / "thesis.tex").write_text("mine")
    result = run_cli(*_args(tmp_path / "cache", out))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith(f"error: --out {out}") and "not made by wsss-bench" in text, text
    assert not (out / "cells").exists() and not (out / rundir.RUN_FILE).exists()


def test_force_deletes_only_our_files(run_cli, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert run_cli(*_args(cache, out)).exit_code == 0
    (out / "cells" / "my_notes.txt").write_text("mine")
    (out / "my_analysis.ipynb").write_text("{}")
    refused = run_cli(*_args(cache, out, "--set", "classifier.batch=8"))
    assert refused.exit_code == 2
    text = " ".join(refused.output.split())
    assert "classifier.batch 16 -> 8" in text, text  # the changed key and values, not only hashes
    forced = run_cli(*_args(cache, out, "--set", "classifier.batch=8", "--force"))
    assert forced.exit_code == 0, forced.output
    assert (out / "cells" / "my_notes.txt").read_text() == "mine"
    assert (out / "my_analysis.ipynb").is_file()


# ============================================================================ table files
def _table(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text('[table]\nname = "t"\ntasks = ["brats"]\nseeds = [0]\n' + body)
    return path


def _bench(run_cli, tmp_path: Path, table: Path, *extra):
    return run_cli(*extra, "bench", table, "--profile", "smoke", "--cache-dir", tmp_path / "cache",
                   "--out", tmp_path / "out", "--collect")


def test_a_table_nested_100000_deep_is_one_sentence(run_cli, tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = _bench(run_cli, tmp_path, path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) <= 3 and str(path) in " ".join(result.output.split()) and "nested" in result.output


def test_a_table_with_too_many_rows_is_refused(run_cli, tmp_path):
    from wsss_bench.running import bench as bn

    rows = "".join(f'[[rows]]\nname = "r{i}"\nmethod = "threshold"\ncam = "gradcam"\n' for i in range(bn.MAX_ROWS + 1))
    result = _bench(run_cli, tmp_path, _table(tmp_path, rows))
    assert result.exit_code == 2
    assert f"at most {bn.MAX_ROWS}" in " ".join(result.output.split()), result.output


def test_a_row_naming_an_unknown_plugin_is_printed_and_strict_fails(run_cli, tmp_path):
    body = ('[[rows]]\nname = "ok"\nmethod = "threshold"\ncam = "gradcam"\n'
            '[[rows]]\nname = "ghost"\nmethod = "threshold"\ncam = "nosuchcam"\n')
    table = _table(tmp_path, body)
    result = _bench(run_cli, tmp_path, table)
    text = " ".join(result.output.split())
    assert "row 'ghost'" in text and "not available" in text and "nosuchcam" in text, text
    strict = _bench(run_cli, tmp_path, table, "--strict")
    assert strict.exit_code == 2, strict.output
