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
    # --from-tag scores that run's training again without training it: the same weights give
    # the same scores, and the header says where the weights came from
    log2 = tmp_path / "again.jsonl"
    again = cmd[:cmd.index("--tag")] + ["--tag", "t2", "--from-tag", "t", "--from-log", str(log), "--milestones", "20",
                                        "--cache-dir", str(tmp_path / "cache"), "--log", str(log2), "--samples", "2"]
    subprocess.run(again, check=True, capture_output=True, env=env, cwd=ROOT)
    head2, row2 = [json.loads(line) for line in log2.read_text().splitlines()]
    assert head2["trained_by"] == "t" and head2["recipe"]["maps_bf16"] is False
    assert row2["raw"]["saliency_dice_pos"] == rows[2]["raw"]["saliency_dice_pos"]
    assert row2["raw"]["probe_dice_pos"] == rows[2]["raw"]["probe_dice_pos"]
    assert row2["loss_last_window"] == rows[2]["loss_last_window"]
    assert row2["train_seconds_total"] == rows[2]["train_seconds_total"]  # the source's, not ~0


def _curve_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cdm_curve", ROOT / "benchmarks" / "cdm_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(seed, bf16, lr, milestones, *, seed_in_header=True, maps_bf16=None):
    head = {"kind": "header", "tag": f"s{seed}-{bf16}-{lr}", "val_positive": 60 + seed,
            "command": f"python benchmarks/cdm_curve.py --lr {lr}" + (f" --seed {seed}" if seed else ""),
            "recipe": {"iterations": 3000, "batch": 8, "ema": 0.999, "lr": lr, "bf16": bf16, "threads": 1}}
    if maps_bf16 is not None:
        head["recipe"]["maps_bf16"] = maps_bf16
    if seed_in_header:
        head["seed"] = seed
    rows = [{"kind": "milestone", "iteration": it, "train_seconds_total": secs, "loss_last_window": 0.06,
             "raw": {"saliency_dice_pos": sal, "probe_dice_pos": probe}} for it, secs, sal, probe in milestones]
    return head, rows


def test_precision_pairs_match_seed_and_recipe_at_the_last_common_milestone():
    mod = _curve_module()
    runs = [
        # seed 0: an old log (seed only in the command, no maps_bf16) whose fp32 run went further
        _run(0, False, 1e-4, [(1500, 500, 0.5, 0.5), (3000, 1000, 0.20, 0.70), (4500, 1500, 0.9, 0.9)],
             seed_in_header=False),
        _run(0, True, 1e-4, [(1500, 350, 0.4, 0.4), (3000, 700, 0.10, 0.75)], seed_in_header=False),
        # seed 1 at 1e-4, a bf16-trained run scored in fp32, and a bf16 run at another learning
        # rate that must not join them
        _run(1, False, 1e-4, [(3000, 1200, 0.30, 0.60)], maps_bf16=False),
        _run(1, True, 1e-4, [(3000, 900, 0.35, 0.60)], maps_bf16=True),
        _run(1, True, 1e-4, [(3000, 1, 0.40, 0.62)], maps_bf16=False),
        _run(1, True, 5e-4, [(3000, 10, 0.99, 0.99)]),
        # seed 2 has only fp32: no row
        _run(2, False, 1e-4, [(3000, 1000, 0.5, 0.5)]),
    ]
    lines = mod.precision_pairs(runs)
    rows = [line for line in lines if line[:4] in ("| 0 ", "| 1 ", "| 2 ")]
    assert len(rows) == 2
    assert rows[0].startswith("| 0 | 3000 | 60 | 1000 / 700 (-30%) |")
    assert "| 0.200 / 0.100 (-0.100) / - | 0.700 / 0.750 (+0.050) / - |" in rows[0]
    assert rows[1].startswith("| 1 | 3000 | 61 | 1200 / 900 (-25%) |")
    assert "| 0.300 / 0.350 (+0.050) / 0.400 (+0.100) | 0.600 / 0.600 (+0.000) / 0.620 (+0.020) |" in rows[1]
    # bf16 over seeds 0 and 1: saliency (-0.1 + 0.05) / 2, probe (0.05 + 0) / 2; fp32 maps: seed 1 only
    assert "- bf16 against fp32, over 2 seed(s): saliency Dice -0.025 on average (lower on 1 of 2), " \
           "probe Dice +0.025." in lines
    assert "- bf16 train, fp32 maps against fp32, over 1 seed(s): saliency Dice +0.100 on average " \
           "(lower on 0 of 1), probe Dice +0.020." in lines
    assert mod.precision_pairs(runs[2:3]) == []
