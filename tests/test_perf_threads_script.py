"""benchmarks/perf_threads.py runs every stage in fresh subprocesses and writes its table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_thread_study_times_every_stage_per_setting(tmp_path):
    out = tmp_path / "threads.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "perf_threads.py"), "--profile", "smoke", "--settings", "1,2x1",
           "--cdm-steps", "2", "--noisy-steps", "2", "--slices", "4", "--cache-dir", str(tmp_path / "cache"),
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={"PATH": "/usr/bin:/bin"}, cwd=ROOT)
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["setting"] for r in rows] == ["1", "2x1"] and [r["processes"] for r in rows] == [1, 2]
    assert all(r["raw"][0]["threads"] == 1 for r in rows)  # OMP_NUM_THREADS reached torch in the child
    for r in rows:
        assert set(r["seconds_per_unit"]) == {"cdm-train", "cdm-train-bf16", "cdm-saliency", "classifier-train",
                                              "noisy-train", "mg"}
        assert all(v > 0 for v in r["seconds_per_unit"].values())
    text = out.read_text()
    assert "| cdm-saliency | s/slice |" in text and "2 x 1 thread (jobs=2)" in text and "git:" in text
