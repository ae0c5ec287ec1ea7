"""benchmarks/bench_breakdown.py sums finished stages by name and leaves out prepare/*."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("bench_breakdown", ROOT / "benchmarks" / "bench_breakdown.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_totals_by_name():
    mod = _module()
    lines = [
        "17:00:00 stage prepare/cdm [source cdm (brats, seed 0)]: started",
        "17:20:00 stage train/cdm [source cdm (brats, seed 0)]: done in 1200.0s",
        "17:20:00 stage train/cdm [source cdm (flare21-liver, seed 0)]: done in 600.5s",
        "17:20:01 stage prepare/cdm [source cdm (brats, seed 0)]: done in 1201.0s",
        "17:21:00 stage maps/layercam[layers=layer4]/test [source x (brats, seed 0)]: done in 2.0s",
        "17:21:00 stage maps/layercam/test [source y (brats, seed 0)]: done in 1.0s",
        "17:21:01 maps layercam (test): 32/263 (12%), 0s",
        "17:22:00 stage train/cdm [source cdm (brats, seed 0)]: failed in 3.0s",
    ]
    totals = mod.breakdown(lines)
    assert totals == {"train/cdm": (1800.5, 2), "maps/layercam": (3.0, 2)}
    text = mod.markdown(totals, {"wall_seconds": 1200, "phases": [{"phase": "shared", "seconds": 1100}]})
    assert "| train/cdm | 2 | 30.0 | 99.8% |" in text and "Wall time 20.0 min" in text
    # the floor counts only train/* stages, divided by the run's workers (1 without an executor)
    assert "train/* stages are 30.0 of those" in text and "on 1 worker(s) no schedule finishes under 30.0 min" in text
    two = mod.markdown(totals, {"wall_seconds": 1200, "config": {"executor": "local[jobs=2]"}})
    assert "on 2 worker(s) no schedule finishes under 15.0 min" in two
