"""Runs whose identity differs never pool into one row; --label keeps them apart."""
from __future__ import annotations

import pandas as pd
import pytest

from wsss_bench.errors import UserError
from wsss_bench.reporting import identity


def _manifest(run, profile="cpu", overrides=(), sha="abc123", fp="f" * 64, task="brats"):
    return {"_run_dir": run, "config": {"profile": profile, "overrides": list(overrides)},
            "environment": {"git_sha": sha, "harness_version": "0.1.0"},
            "data": {f"{task}/seed0": {"task": task, "fingerprint": fp}}}


@pytest.mark.parametrize("change,word", [({"profile": "smoke"}, "profile (cpu vs smoke)"),
                                         ({"overrides": ["cdm.iterations=5"]}, "--set values"),
                                         ({"fp": "0" * 64}, "data of task brats"),
                                         ({"sha": "def456"}, "code (commit")])
def test_each_identity_part_refuses_pooling(change, word):
    a, b = _manifest("runs/a"), _manifest("runs/b", **change)
    with pytest.raises(UserError) as err:
        identity.check_poolable([a, b])
    text = str(err.value)
    assert word in text and "runs/a" in text and "runs/b" in text and "--label" in text
    assert "\n" not in text


def test_same_identity_and_other_tasks_pool():
    identity.check_poolable([_manifest("runs/a"), _manifest("runs/b")])
    # another task's data has another fingerprint by nature: not a conflict
    identity.check_poolable([_manifest("runs/a"), _manifest("runs/b", fp="1" * 64, task="flare21-kidney")])


def test_labels_keep_runs_apart(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    df = pd.DataFrame({"method": ["m", "m"], "run_dir": [str(tmp_path / "a"), str(tmp_path / "b")]})
    out = identity.apply_labels(df, [tmp_path / "a", tmp_path / "b"], ["cpu", "smoke"])
    assert list(out["method"]) == ["m (cpu)", "m (smoke)"]
    with pytest.raises(UserError, match="one --label per run"):
        identity.apply_labels(df, [tmp_path / "a", tmp_path / "b"], ["cpu"])
    with pytest.raises(UserError, match="same label"):
        identity.apply_labels(df, [tmp_path / "a", tmp_path / "b"], ["x", "x"])


def test_report_refuses_to_pool_a_cpu_and_a_smoke_run_and_labels_keep_them_apart(tmp_path, run_cli):
    """The issue's case: the same method in a cpu-profile and a smoke-profile run printed one
    pooled row with exit 0."""
    import json
    import shutil

    from report_fixtures import build_run

    a = build_run(tmp_path / "a")
    b = tmp_path / "b" / "run"
    shutil.copytree(a, b)
    for run, profile in ((a, "cpu"), (b, "smoke")):
        m = json.loads((run / "manifest.json").read_text())
        m.setdefault("config", {})["profile"] = profile
        (run / "manifest.json").write_text(json.dumps(m))
    frame = pd.read_parquet(b / "results.parquet")
    frame["case_id"] = frame["case_id"].astype(str) + "-b"  # other slices: only the identity may refuse
    frame.to_parquet(b / "results.parquet")
    res = run_cli("report", a, b, "--format", "csv", "--gate", "label")
    assert res.exit_code == 2 and "profile (cpu vs smoke)" in res.output and "--label" in res.output, res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    res = run_cli("report", a, b, "--format", "csv", "--gate", "label", "--label", "cpu", "--label", "smoke")
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(__import__("io").StringIO(res.output))
    assert {"gradcam+threshold (cpu)", "gradcam+threshold (smoke)"} <= set(rows["method"])
    assert run_cli("figures", a, b, "--out", tmp_path / "f", "--format", "png").exit_code == 2
