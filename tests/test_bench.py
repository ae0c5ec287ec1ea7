"""`wsss-bench bench`: table files as data, two phases, executors, --failed / --collect."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from wsss_bench.running import bench as bn
from wsss_bench import cli
from wsss_bench.errors import UserError
from wsss_bench.plugins import load_plugins
from wsss_bench.reporting.summary import bench_table, to_markdown

ROOT = Path(__file__).resolve().parent.parent
TABLES = sorted((ROOT / "benchmarks").glob("*.toml"))


def _toml(tmp_path: Path, name: str, rows: str, tasks='["brats"]', head_extra="") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""
        [table]
        name = "{name}"
        caption = "test"
        tasks = {tasks}
        seeds = [0]
        {head_extra}
    """) + textwrap.dedent(rows))
    return path


ROWS_A = """
[[rows]]
name = "GradCAM"
cam = "gradcam"
method = "threshold"

[[rows]]
name = "MG"
cam = "mg"
method = "threshold"
"""

ROWS_B = """
[[rows]]
name = "MG"
cam = "mg"
method = "threshold"

[[rows]]
name = "GradCAM+MG"
cam = "gradcam+mg"
method = "threshold"
"""


# ---------------------------------------------------------------------------- table files
@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_every_committed_table_file_loads_and_plans(path):
    host = load_plugins()
    table = bn.load_table(path, host)
    cells, planned = bn.plan(host, [table])
    assert cells and all(not p.error for p in planned), [p.error for p in planned if p.error]
    assert {p.row for p in planned} == {r.name for r in table.rows}


def test_tables_1_and_3_share_their_cells():
    host = load_plugins()
    t1, t3 = (bn.load_table(ROOT / "benchmarks" / f"{n}.toml", host) for n in ("table1", "table3"))
    c1, _ = bn.plan(host, [t1])
    c3, _ = bn.plan(host, [t3])
    both, _ = bn.plan(host, [t1, t3])
    assert len(both) == len(set(c1) | set(c3)) < len(c1) + len(c3)  # LayerCAM, AME-CAM, CLDF rows are shared


def test_shared_units_alternate_tasks_so_two_workers_do_not_queue_on_one_model():
    host = load_plugins()
    cells, _ = bn.plan(host, [bn.load_table(ROOT / "benchmarks" / "table1.toml", host)])
    sources, refiners = bn.shared_units(cells)
    tasks = {c.task for c in cells}
    assert len(tasks) == 4
    for level in (sources, refiners):
        k = min(sum(u.task == t for u in level) for t in tasks)  # rounds in which every task has a unit
        head = level[: 4 * k]
        assert k >= 1 and all(len({u.task for u in head[i:i + 4]}) == 4 for i in range(0, len(head), 4))
    # nothing lost or repeated, and each task keeps its own order
    plain = list(dict.fromkeys(bn.Unit("source", c.task, c.seed, s) for c in cells for s in c.source_specs))
    got = [u for u in sources if u.kind == "source"]
    assert sorted(map(str, got)) == sorted(map(str, plain))
    for t in tasks:
        assert [u for u in got if u.task == t] == [u for u in plain if u.task == t]


def test_plan_is_stable_under_reordering_rows_and_parameters(tmp_path):
    host = load_plugins()
    a = _toml(tmp_path, "a", ROWS_A + '\n[[rows]]\nname = "S"\ncam = "scorecam[variant=library,chunk=64]"\nmethod = "threshold"\n')
    b = _toml(tmp_path, "b", '\n[[rows]]\nname = "S"\ncam = "scorecam[chunk=64,variant=library]"\nmethod = "threshold"\n'
              + ROWS_A.replace('name = "GradCAM"', 'name = "G"'))
    ca, _ = bn.plan(host, [bn.load_table(a, host)])
    cb, _ = bn.plan(host, [bn.load_table(b, host)])
    assert {c.key for c in ca} == {c.key for c in cb}
    assert sorted(c.method for c in ca) == sorted(c.method for c in cb)


@pytest.mark.parametrize("text,needle", [
    ('[[rows]]\nname = "x"\ncam = "gradcam"\n', "row 1 ('x'): missing the required field 'method'"),
    ('[[rows]]\ncam = "gradcam"\nmethod = "threshold"\n', "row 1: missing the required field 'name'"),
    ('[[rows]]\nname = "x"\nmethod = "threshold"\nbogus = 1\n', "unknown field(s) bogus"),
    ('[[rows]]\nname = "x"\ncam = "gradcam[layer="\nmethod = "threshold"\n', "row 1 ('x'): malformed spec"),
    ('[[rows]]\nname = "x"\ncam = { liver = "gradcam" }\nmethod = "threshold"\n', "names task(s) liver"),
    ('[[rows]]\nname = "x"\ncam = "gradcam"\nmethod = "threshold"\nnote = 3\n', "note must be a string"),
])
def test_a_bad_table_file_gets_a_clear_error_naming_file_and_row(tmp_path, run_cli, text, needle):
    path = _toml(tmp_path, "bad", text)
    result = run_cli("bench", path, "--profile", "smoke", "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert str(path) in flat.replace(" ", "") or path.name in flat
    assert needle in flat and "Traceback" not in result.output


def test_missing_table_section_and_file(tmp_path):
    host = load_plugins()
    (tmp_path / "x.toml").write_text('[[rows]]\nname = "a"\nmethod = "threshold"\n')
    with pytest.raises(UserError, match=r"x\.toml: missing the \[table\] section"):
        bn.load_table(tmp_path / "x.toml", host)
    with pytest.raises(UserError, match="does not exist"):
        bn.load_table(tmp_path / "nope.toml", host)


def test_a_row_note_for_the_profile_is_a_numbered_caveat_under_the_table(tmp_path):
    host = load_plugins()
    rows = ROWS_A.replace('name = "MG"\n', 'name = "MG"\nnote = { cpu = "MG caveat [cpu]" }\n')
    table = bn.load_table(_toml(tmp_path, "t", rows), host)
    _, planned = bn.plan(host, [table])
    cpu = to_markdown(bench_table(None, planned, table, resamples=10, profile="cpu"))
    assert "| MG [1] |" in cpu and "\n[1] MG caveat [cpu]" in cpu and "GradCAM [" not in cpu
    smoke = to_markdown(bench_table(None, planned, table, resamples=10, profile="smoke"))
    assert "caveat" not in smoke and "| MG |" in smoke


def test_unregistered_plugin_row_is_reported_not_available(tmp_path):
    host = load_plugins()
    path = _toml(tmp_path, "t", ROWS_A + '\n[[rows]]\nname = "Future"\ncam = "futurecam"\nmethod = "threshold"\n')
    cells, planned = bn.plan(host, [bn.load_table(path, host)])
    future = [p for p in planned if p.row == "Future"]
    assert future and future[0].error.startswith("not available") and "futurecam" in future[0].error
    assert len(cells) == 2


# ---------------------------------------------------------------------------- running
def _bench(run_cli, tmp_path, *tables, out=None, extra=()):
    out = out or tmp_path / "bench"
    result = run_cli("bench", *tables, "--profile", "smoke", "--out", out, *extra)
    return result, out


def test_two_tables_train_nothing_twice_and_rerun_is_a_noop(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_BENCH_CACHE", str(tmp_path / "cache"))
    a, b = _toml(tmp_path, "a", ROWS_A), _toml(tmp_path, "b", ROWS_B)
    result, out = _bench(run_cli, tmp_path, a, b, extra=("--cache-dir", tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    builds = bn.training_builds(manifest["cache_events"])
    assert builds and all(n == 1 for n in builds.values()), builds
    trained = {k.split("/")[0] for k in builds}
    assert {"classifier", "noisy-classifier"} <= trained
    frame = pd.read_parquet(out / "results.parquet")
    assert set(frame.method) == {"gradcam+threshold", "mg+threshold", "gradcam+mg+threshold"}  # MG once
    tables = (out / "tables.md").read_text()
    assert "### a" in tables and "### b" in tables and "GradCAM+MG" in tables and "[" in tables

    again, _ = _bench(run_cli, tmp_path, a, b, extra=("--cache-dir", tmp_path / "cache"))
    assert again.exit_code == 0, again.output
    manifest2 = json.loads((out / "manifest.json").read_text())
    assert not bn.training_builds(manifest2["cache_events"])  # warm: nothing trains
    # every cell is finished: no shared unit runs, no model is even loaded
    assert manifest2["units"] == [] and manifest2["cache_events"] == [], manifest2["units"]
    assert "3 of 3 cell(s) already finished" in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), frame)

    # one cell lost (a deleted record): only the units that cell needs run, and only it is computed
    record = next(p for p in (out / "cells").glob("*.json") if json.loads(p.read_text())["method"] == "mg+threshold")
    record.unlink()
    third, _ = _bench(run_cli, tmp_path, a, b, extra=("--cache-dir", tmp_path / "cache"))
    assert third.exit_code == 0, third.output
    manifest3 = json.loads((out / "manifest.json").read_text())
    units = {(u["unit"]["kind"], u["unit"]["spec"]) for u in manifest3["units"]}
    assert units == {("gate", ""), ("source", "mg"), ("refiner", "threshold")}, units
    assert "2 of 3 cell(s) already finished" in third.output
    assert not bn.training_builds(manifest3["cache_events"])
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), frame)


BROKEN = '''
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource


class BrokenCam(CamSource):
    name = "brokencam"
    params = {"fail": True}

    def maps(self, batch):
        if self.p["fail"]:
            raise RuntimeError("brokencam exploded on purpose")
        import torch
        return torch.rand(batch.images.shape[0], *batch.images.shape[-2:])


@hookimpl
def register_cam_sources(register):
    register(BrokenCam)
'''


def test_a_failing_cell_is_recorded_the_others_finish_and_failed_reruns_only_it(run_cli, tmp_path):
    plugdir = tmp_path / "plug"
    plugdir.mkdir()
    (plugdir / "brokencam.py").write_text(BROKEN)
    path = _toml(tmp_path, "t", ROWS_A + '\n[[rows]]\nname = "Broken"\ncam = "brokencam"\nmethod = "threshold"\n')
    result, out = _bench(run_cli, tmp_path, path, extra=("--plugins-dir", plugdir))
    assert result.exit_code == 1, result.output
    assert "brokencam exploded on purpose" in " ".join(result.output.split())
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [c for c in manifest["cells"] if c.get("status") == "failed"]
    assert len(failed) == 1 and failed[0]["method"] == "brokencam+threshold"
    assert "exploded" in failed[0]["error"]
    assert "failed: RuntimeError: brokencam exploded on purpose" in (out / "tables.md").read_text()
    frame = pd.read_parquet(out / "results.parquet")
    assert set(frame.method) == {"gradcam+threshold", "mg+threshold"}

    collected, _ = _bench(run_cli, tmp_path, path, extra=("--plugins-dir", plugdir, "--collect"))
    assert collected.exit_code == 0 and "phase" not in collected.output
    rerun, _ = _bench(run_cli, tmp_path, path, extra=("--plugins-dir", plugdir, "--failed"))
    assert rerun.exit_code == 1 and "1 of 3 cell(s) are recorded as failed" in rerun.output
    assert "phase 2: 1 cell(s)" in rerun.output


@pytest.mark.parametrize("executor", ["local[jobs=2]", "slurm[cluster=local,folder={tmp}/slurm]"])
def test_pool_and_submitit_executors_give_the_same_results_as_local(run_cli, tmp_path, executor):
    path = _toml(tmp_path, "t", ROWS_A)
    local, out_local = _bench(run_cli, tmp_path, path, out=tmp_path / "local")
    assert local.exit_code == 0, local.output
    other, out_other = _bench(run_cli, tmp_path, path, out=tmp_path / "other",
                              extra=("--executor", executor.format(tmp=tmp_path)))
    assert other.exit_code == 0, other.output
    cols = ["task", "method", "gate", "case_id", "z", "dice", "iou", "pred_area"]
    a = pd.read_parquet(out_local / "results.parquet")[cols].sort_values(cols[:5]).reset_index(drop=True)
    b = pd.read_parquet(out_other / "results.parquet")[cols].sort_values(cols[:5]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    manifest = json.loads((out_other / "manifest.json").read_text())
    assert manifest["cache_events"], "the workers return their cache events to the parent"
    assert manifest["data"], "the workers return their data summaries to the parent"
