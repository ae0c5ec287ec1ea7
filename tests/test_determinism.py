"""Same seed, same numbers (issue 14): two smoke runs in fresh caches and fresh processes
(different ``PYTHONHASHSEED``, so no set or dict order can leak in) give bit-identical
per-slice Dice/IoU and byte-identical trained weights on the CPU; a different ``--seed``
changes them.  GPU runs are not bit-reproducible (docs/decisions.md, "Reliability").

The cells are ``gradcam+threshold`` (the CAM classifier) and ``mg+threshold`` (the noisy
classifier, trained on noised images, and MG's noise draws at map time), so seeded
initialisation, batch order, augmentation and diffusion noise all take part.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

CODE = "import sys; from wsss_bench.cli import main; main(sys.argv[1:])"


def smoke_run(tmp_path: Path, name: str, seed: int, hash_seed: str) -> tuple[pd.DataFrame, dict[str, str], dict]:
    cache, out = tmp_path / f"{name}-cache", tmp_path / f"{name}-out"
    env = {**os.environ, "WSSS_BENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hash_seed,
           "WSSS_BENCH_NO_BARS": "1", "WSSS_BENCH_NO_PROGRESS": "1"}
    args = ["run", "--profile", "smoke", "--task", "brats", "--cam", "gradcam,mg", "--method", "threshold",
            "--seed", str(seed), "--device", "cpu", "--out", str(out), "--cache-dir", str(cache)]
    done = subprocess.run([sys.executable, "-c", CODE, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    keys = ["method", "gate", "case_id", "z"]
    frame = pd.read_parquet(out / "results.parquet").sort_values(keys).reset_index(drop=True)
    weights = {f"{p.parent.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (cache / "artifacts").glob("*/*/*.safetensors")}
    seeds = {c["method"]: c["derived_seeds"] for c in json.loads((out / "manifest.json").read_text())["cells"]}
    return frame, weights, seeds


def test_same_seed_is_bit_identical_and_another_seed_is_not(tmp_path):
    a, wa, sa = smoke_run(tmp_path, "a", 0, "0")
    b, wb, sb = smoke_run(tmp_path, "b", 0, "12345")
    assert set(a["method"]) == {"gradcam+threshold", "mg+threshold"}
    assert {"classifier/classifier.safetensors", "noisy-classifier/noisy_classifier.safetensors"} <= set(wa)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert wa == wb  # the trained weights, byte for byte
    assert sa == sb

    c, wc, sc = smoke_run(tmp_path, "c", 1, "0")
    assert not set(wa.values()) & set(wc.values())  # every model trained differently
    assert sc != sa
    cols = ["case_id", "z", "gate", "method"]
    joined = a.merge(c, on=cols, how="outer", suffixes=("_0", "_1"), indicator=True)
    assert (joined["_merge"] != "both").any() or (joined["dice_0"] != joined["dice_1"]).any()
