"""`bench --plan` / `run --plan`: what would run, what is cached, estimates; nothing trains."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wsss_bench.profiles import load_profile
from wsss_bench.running import plan as pl

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\[(1\.\d|2)\] (.*?): (cached|to run, .*|to build from .*)$")


def _items(output: str) -> list[tuple[str, str, str]]:
    found = []
    for line in output.splitlines():
        m = LINE.match(line.strip())
        if m:
            status = m.group(3)
            found.append((m.group(1), m.group(2), "cached" if status == "cached" else "todo"))
    return found


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def test_plan_lists_exactly_what_a_smoke_bench_then_runs_and_then_everything_is_cached(run_cli, tmp_path,
                                                                                         cache_root):
    table = ROOT / "benchmarks" / "table3.toml"
    args = ["bench", table, "--profile", "smoke", "--device", "cpu", "--cache-dir", cache_root, "--out", tmp_path / "b"]
    run_cli(*args, "--plan")  # prepares the data once (the plan needs the cells' identities)
    files = _files(cache_root / "artifacts") if (cache_root / "artifacts").is_dir() else set()
    res = run_cli(*args, "--plan")
    assert res.exit_code == 0, res.output
    before = _items(res.output)
    assert before and all(s == "todo" for p, _, s in before if p == "2")  # no cell has run in this folder
    assert not (tmp_path / "b").exists()  # nothing ran: no run folder, no new artifact
    assert not re.search(r"stage \S+.*: (started|failed)", res.output), res.output  # probes print no stages
    assert (_files(cache_root / "artifacts") if files else set()) == files

    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    ran_units = [u for u in manifest["units"]]
    from wsss_bench.running.bench import Unit

    labels = [Unit(**u["unit"] | {"sources": tuple(u["unit"]["sources"])}).label for u in ran_units]
    planned_units = [label for phase, label, _ in before if phase != "2"]
    assert planned_units == labels  # the same units, in the order the bench ran them
    ran_cells = sorted(f"cell {c['cell']['task']} {c['method']} seed {c['cell']['seed']}" for c in manifest["cells"])
    planned_cells = sorted(label for phase, label, _ in before if phase == "2")
    assert planned_cells == ran_cells

    res = run_cli(*args, "--plan")
    assert res.exit_code == 0, res.output
    after = _items(res.output)
    # every cell is finished: like the bench, the plan needs none of the shared units
    assert [(p, lab) for p, lab, _ in after] == [(p, lab) for p, lab, _ in before if p == "2"]
    assert all(s == "cached" for _, _, s in after), [a for a in after if a[2] != "cached"]
    assert "estimated 0s of worker time" in res.output

    res = run_cli(*args[:-1], tmp_path / "c", "--plan")  # a new run folder: models cached, cells not
    assert res.exit_code == 0, res.output
    fresh = _items(res.output)
    assert [(p, lab) for p, lab, _ in fresh] == [(p, lab) for p, lab, _ in before]
    assert all(s == "cached" for p, _, s in fresh if p != "2") and all(s == "todo" for p, _, s in fresh if p == "2")


def test_run_plan_prints_cells_and_runs_nothing(run_cli, tmp_path):
    res = run_cli("run", "--profile", "smoke", "--device", "cpu", "--task", "brats", "--cam", "gradcam,mg",
                  "--method", "threshold", "--out", tmp_path / "r", "--plan")
    assert res.exit_code == 0, res.output
    items = _items(res.output)
    assert {lab for p, lab, _ in items if p == "2"} == {"cell brats gradcam+threshold seed 0",
                                                         "cell brats mg+threshold seed 0"}
    assert not (tmp_path / "r").exists()


def test_estimates_scale_with_the_profile():
    cpu, smoke, paper = load_profile("cpu"), load_profile("smoke"), load_profile("paper")
    sec_cpu, known = pl.estimate("source:cdm", cpu, cpu)
    assert known and sec_cpu == pytest.approx(pl.COSTS["source:cdm"][0])
    sec_smoke, _ = pl.estimate("source:cdm", smoke, cpu)
    # (32/64)^2 pixels x (30/3000) iterations x (4/8) batch
    assert sec_smoke == pytest.approx(sec_cpu * 0.25 * 0.01 * 0.5)
    assert pl.estimate("source:cdm", paper, cpu)[0] > 100 * sec_cpu
    sec, known = pl.estimate("source:someone-elses", cpu, cpu)
    assert not known and sec == pl.UNKNOWN_SECONDS


def test_render_totals_and_wall_time_with_workers():
    items = [pl.PlanItem("1.1", "a", "x", False, "cdm", 100.0), pl.PlanItem("1.1", "b", "x", False, "cdm", 20.0),
             pl.PlanItem("1.2", "c", "x", True), pl.PlanItem("2", "d", "x", False, "", 10.0)]
    last = pl.render(items, jobs=2)[-1]
    # worker time 130 s; wall: phase 1.1 max(120/2, 100) = 100, phase 2: 10 -> 110 s
    assert "3 to run" in last and "2.2 min of worker time" in last and "about 1.8 min wall" in last


def test_wall_time_scales_with_the_threads_of_a_worker():
    assert pl.thread_factor(1) == 1.0 and pl.thread_factor(2) == pytest.approx(0.6)
    assert pl.thread_factor(16) == pytest.approx(0.25)
    items = [pl.PlanItem("1.1", "a", "x", False, "cdm", 100.0)]
    assert "about 60s wall with 1 worker(s) of 2 thread(s)" in pl.render(items, jobs=1, threads=2)[-1]
    assert "~60s" in pl.render(items, jobs=1, threads=2)[0]


def test_a_refiner_pays_for_the_cdm_its_backbone_trains_unless_a_source_unit_builds_it(run_cli, tmp_path):
    """CLDF's probe stops at its seeds' source; the CDM behind its features is charged to it
    when the command has no ``cdm`` source unit (README's main job), and not twice."""
    cache = tmp_path / "cache"
    base = ["--profile", "smoke", "--device", "cpu", "--cache-dir", cache, "--plan"]
    res = run_cli("run", "--task", "brats", "--cam", "gradcam", "--method", "cldf", "--out", tmp_path / "r", *base)
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("[1.2] refiner cldf"))
    assert "cdm (backbone cdm)" in line, line
    smoke, cpu = load_profile("smoke"), load_profile("cpu")
    expect = (pl.estimate("refiner:cldf", smoke, cpu)[0] + pl.estimate("backbone:cdm", smoke, cpu)[0]) * \
        pl.thread_factor(pl.worker_threads(1))
    assert f"~{pl._dur(expect)}" in line, (line, expect)

    res = run_cli("run", "--task", "brats", "--cam", "gradcam,cdm", "--method", "cldf", "--out", tmp_path / "s", *base)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(ln.startswith("[1.1] source cdm") and "to build from cdm" in ln for ln in lines), res.output
    assert not any("(backbone cdm)" in ln for ln in lines), res.output  # the source unit builds it


def test_a_cell_pays_for_the_training_split_maps_of_a_source_built_in_the_same_command(run_cli, tmp_path):
    """The pseudo-mask stage of the first cell of a freshly built slow source computes its
    training-split maps: that cell's estimate carries their cost, other cells do not."""
    res = run_cli("bench", ROOT / "benchmarks" / "table1.toml", "--profile", "smoke", "--device", "cpu",
                  "--task", "brats", "--out", tmp_path / "b", "--plan")
    assert res.exit_code == 0, res.output
    seconds = {}
    for line in res.output.splitlines():
        m = re.match(r"^\[2\] cell brats (\S+) seed 0: to run, ~(\d+)s$", line.strip())
        if m:
            seconds[m.group(1)] = int(m.group(2))
    smoke, cpu = load_profile("smoke"), load_profile("cpu")
    base = pl.estimate("cell:", smoke, cpu)[0]
    cdm = pl.estimate("trainmaps:cdm", smoke, cpu)[0]
    f = pl.thread_factor(pl.worker_threads(1))  # one local worker with every core
    assert seconds["cdm+threshold"] == round((base + cdm) * f)
    assert seconds["scorecam+threshold"] == round((base + pl.estimate("trainmaps:scorecam", smoke, cpu)[0]) * f)
    assert seconds["gradcam+threshold"] == round(base * f)
