"""benchmarks/cdm_curve.py runs on the smoke profile and its report reads its own log."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_curve_scores_each_milestone_resumes_and_reports(tmp_path, one_thread):
    log, out = tmp_path / "curve.jsonl", tmp_path / "curve.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cdm_curve.py"), "--profile", "smoke", "--tag", "t",
           "--milestones", "10,20", "--cache-dir", str(tmp_path / "cache"), "--log", str(log), "--samples", "2"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("iteration") for r in rows] == [None, 10, 20]
    for r in rows[1:]:
        for kind in ("raw", "ema"):
            s = r[kind]
            assert -1.0 <= s["contrast"] <= 1.0 and 0.0 <= s["saliency_dice_pos"] <= 1.0
            assert 0.0 <= s["probe_dice_pos"] <= 1.0 and s["val_positive"] > 0
    assert rows[2]["train_seconds_total"] >= rows[1]["train_seconds_total"]
    # a second call scores nothing twice: both milestones are in the log
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    assert len(log.read_text().splitlines()) == 3
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cdm_curve.py"), "--report", str(log), "--out", str(out)],
                   check=True, capture_output=True, env=env, cwd=ROOT)
    text = out.read_text()
    assert text.count("| 10 |") == 2 and text.count("| 20 |") == 2 and "80% target" in text
