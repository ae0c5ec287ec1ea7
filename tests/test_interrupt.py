"""A kill loses nothing (issue 14): SIGKILL a smoke run during training and during map writing,
run the same command again, and get what an uninterrupted run gets.

The run has two cells, ``gradcam+threshold`` (finishes first) and ``cdm+threshold`` (trains
the CDM, then writes its test maps).  The test watches the plain log lines the run prints
when stdout is not a terminal ("stage train/cdm [...]: started", "maps cdm (test): started")
and kills the process the moment one appears.  After each kill:

- nothing the cache or the run folder would read is half-written: every published artifact
  has its ``artifact.json`` and its files load (safetensors weights, maps of the recorded
  size), every published slice store its marker, every finished cell's parquet reads;
- the killed stage's artifact is not published (the kill landed inside it);

and the re-runs do not recompute what was finished (the gradcam cell is reused, its file
untouched; no finished model is trained again), and the final per-slice results are
bit-identical (CPU) to those of an uninterrupted run in a fresh cache.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TIMEOUT_S = 300
CODE = "import sys; from wsss_bench.cli import main; main(sys.argv[1:])"


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WSSS_BENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "WSSS_BENCH_NO_BARS": "1"})
    env.pop("WSSS_BENCH_NO_PROGRESS", None)
    return env


def run_cli(args: list, cache: Path, kill_on: str | None = None) -> tuple[str, int, bool]:
    """Run ``wsss-bench ARGS`` in a fresh process; SIGKILL it at the first line matching
    ``kill_on``.  Returns (output, exit code, whether it was killed)."""
    proc = subprocess.Popen([sys.executable, "-c", CODE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(cache), bufsize=1)
    watchdog = threading.Timer(TIMEOUT_S, proc.kill)
    watchdog.start()
    lines, killed = [], False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if kill_on and re.search(kill_on, line):
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = proc.stdout.read() if proc.stdout is not None else ""
    return "".join(lines) + rest, proc.returncode, killed


def published(cache: Path, stage: str) -> list[Path]:
    root = cache / "artifacts" / stage
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []


def maps_of(cache: Path, plugin: str) -> list[Path]:
    return [d for d in published(cache, "maps")
            if json.loads((d / "artifact.json").read_text())["describe"]["plugin"] == plugin]


def assert_nothing_half_written(cache: Path, out: Path) -> None:
    """Everything a later run would read is complete."""
    from safetensors import safe_open

    for stage_dir in (cache / "artifacts").glob("*"):
        for d in published(cache, stage_dir.name):
            meta = json.loads((d / "artifact.json").read_text())  # present and whole
            for weights in d.glob("*.safetensors"):
                with safe_open(str(weights), "pt") as fh:
                    assert list(fh.keys())
            if stage_dir.name == "maps":
                maps = np.load(d / "maps.npy", mmap_mode="r")
                assert maps.shape[0] == meta["meta"]["n"] and np.isfinite(maps).all()
            if list(d.glob("*.train.json")):  # a shared model: its weights are there
                assert list(d.glob("*.safetensors")), f"{d}: a published model without its weights"
    for d in (cache / "slices").glob("*"):
        if d.is_dir() and not d.name.startswith("."):
            assert (d / "done").is_file(), f"{d}: a published slice store without its marker"
    for f in (out / "cells").glob("*.parquet"):
        assert len(pd.read_parquet(f))


def per_slice(out: Path) -> pd.DataFrame:
    frame = pd.read_parquet(out / "results.parquet")
    keys = ["method", "gate", "case_id", "z"]
    return frame.sort_values(keys).reset_index(drop=True)[keys + ["dice", "iou", "pred_area", "classifier_p1",
                                                                  "gate_pass", "gt_area"]]


def test_kill_during_training_and_map_writing_loses_nothing(tmp_path):
    args = ["run", "--profile", "smoke", "--task", "brats", "--cam", "gradcam,cdm", "--method", "threshold",
            "--seed", "0", "--device", "cpu"]

    # the uninterrupted reference, in its own fresh cache
    ref_cache, ref_out = tmp_path / "ref-cache", tmp_path / "ref-out"
    text, code, _ = run_cli([*args, "--out", ref_out, "--cache-dir", ref_cache], ref_cache)
    assert code == 0, text
    reference = per_slice(ref_out)
    assert set(reference["method"]) == {"gradcam+threshold", "cdm+threshold"}

    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [*args, "--out", out, "--cache-dir", cache]

    # 1. killed while the CDM trains (the gradcam cell has finished by then)
    text, code, killed = run_cli(cmd, cache, kill_on=r"stage train/cdm .*: started")
    assert killed and code == -signal.SIGKILL, text
    finished = sorted((out / "cells").glob("*.parquet"))
    assert len(finished) == 1  # the finished cell's results are on disk
    gradcam_cell = finished[0]
    stamp = (gradcam_cell.stat().st_mtime_ns, gradcam_cell.read_bytes())
    assert published(cache, "classifier") and not published(cache, "cdm")
    assert_nothing_half_written(cache, out)

    # 2. the same command, killed while it writes the CDM's test maps
    text, code, killed = run_cli(cmd, cache, kill_on=r"maps cdm \(test\): started")
    assert killed and code == -signal.SIGKILL, text
    assert "stage train/classifier" not in text  # the finished classifier is reused
    assert "stage train/cdm" in text  # the killed training starts again (smoke checkpoints only at the end)
    assert published(cache, "cdm") and not maps_of(cache, "cdm")
    assert_nothing_half_written(cache, out)

    # 3. the same command runs to the end, recomputing only the unfinished cell's maps
    text, code, killed = run_cli(cmd, cache)
    assert code == 0 and not killed, text
    assert "gradcam+threshold seed 0: already done" in " ".join(text.split())
    assert "stage train/" not in text  # no model is trained again
    assert "maps cdm (test): started" in text and "maps gradcam (test)" not in text
    # the plain log lines name the stage and the cell, and give the elapsed time
    assert re.search(r"^\d\d:\d\d:\d\d stage maps/cdm/test \[brats cdm\+threshold seed 0\]: done in \d+\.\ds$",
                     text, re.M), text
    assert (gradcam_cell.stat().st_mtime_ns, gradcam_cell.read_bytes()) == stamp
    assert_nothing_half_written(cache, out)
    # one model; two map artifacts: the test maps and the training maps the pseudo-mask quality reads
    assert len(published(cache, "cdm")) == 1 and len(maps_of(cache, "cdm")) == 2

    pd.testing.assert_frame_equal(per_slice(out), reference, check_exact=True)
