"""Device check: every method's paper-profile cell on CUDA, with training cut short.

Run it whenever a GPU is at hand (nothing depends on it); the prepared command, which ends
within 10 minutes on one H100/H200-class GPU (cells not started by ``--budget-s`` are listed
as not run, so the file is always written):

    timeout 600 python benchmarks/gpu_check.py --iterations 50 --bf16

Each method runs once on the paper profile (256 px, paper-width networks) with `--device cuda`,
its trainings cut to a few hundred iterations (or one epoch) through `--set`, and small paper-size
phantoms (8 cases each, the real volume sizes).  The check is that every cell runs on CUDA and
gives finite results; the result file records, per cell and stage, wall time, test slices per
second of the map/refine stages and peak GPU memory, with the device, the command and the git SHA.
The numbers of such short trainings are not results: they say that the path works and how fast
it is, nothing about the methods.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: (task, --cam, --method, --backbone): one cell per method of Tables 1-3
CELLS = [
    ("brats", "gradcam", "threshold", None),
    ("brats", "scorecam", "threshold", None),
    ("brats", "layercam", "threshold", None),
    ("brats", "seam", "threshold", None),
    ("brats", "amecam", "threshold", None),
    ("brats", "cdm", "threshold", None),
    ("brats", "mg", "threshold", None),
    ("brats", "dig", "threshold", None),
    ("brats", "amecam+mg", "cldf", None),
    ("brats", "amecam+mg", "cldf", "resnet18"),
    ("brats", "amecam+mg", "cldf", "resnet50"),
    ("brats", "amecam+mg", "cldf", "unet-encoder"),
    ("brats", "amecam", "cldf[use_mg=false]", None),
    ("brats", None, "fsl", None),
    ("flare21-kidney", "layercam+mg", "cldf", None),
]


def overrides(iterations: int) -> list[str]:
    """The ``--set`` values of every cell: trainings cut to ``iterations`` steps or one epoch."""
    return [f"cdm.iterations={iterations}", f"noisy_classifier.iterations={iterations}",
            f"fsl.iterations={iterations}", "classifier.epochs=1", "seam.epochs=1", "amecam.simclr_epochs=1",
            "amecam.stage1_epochs=1", "amecam.stage2_epochs=1", "dig.epochs=1", "cldf.epochs=1",
            "brain_phantom.cases=8", "abdomen_phantom.cases=8"]


def results_finite(path: Path) -> bool:
    """True when every numeric column of a run's results.parquet is finite (no NaN/inf Dice)."""
    import numpy as np
    import pandas as pd

    frame = pd.read_parquet(path).select_dtypes("number")
    return bool(len(frame)) and bool(np.isfinite(frame.to_numpy(dtype=float)).all())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--runs", default="/tmp/wsss-gpu-check")
    ap.add_argument("--cache-dir", default="/tmp/wsss-gpu-check/cache")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no cell after this many seconds (the file is written either way)")
    ap.add_argument("--limit-s", type=float, default=570.0,
                    help="stop a cell still running at this many seconds, then write the file")
    ap.add_argument("--bf16", action="store_true", help="pass --bf16 to every cell (what docs/scale.md assumes)")
    ap.add_argument("--only", default="", help="comma list of --cam/--method names to run")
    args = ap.parse_args(argv)

    import torch

    from wsss_bench.running.manifest import git_sha

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    device = torch.cuda.get_device_name(0)
    rows, failures = [], 0
    t_all = time.perf_counter()
    for task, cam, method, backbone in CELLS:
        if args.only and not ({cam, method} & set(args.only.split(","))):
            continue
        label = f"{task} {cam or '-'} {method}" + (f" [{backbone}]" if backbone else "")
        if time.perf_counter() - t_all > args.budget_s:
            rows.append(f"| {label} | not run (time budget of {args.budget_s:.0f} s spent) | | | |")
            continue
        out = Path(args.runs) / label.replace(" ", "_").replace("[", "").replace("]", "")
        cmd = [sys.executable, "-m", "wsss_bench.cli", "run", "--profile", "paper", "--device", "cuda",
               "--task", task, "--method", method, "--out", str(out), "--cache-dir", args.cache_dir]
        cmd += ["--cam", cam] if cam else []
        cmd += ["--backbone", backbone] if backbone else []
        for o in overrides(args.iterations):
            cmd += ["--set", o]
        t0 = time.perf_counter()
        cmd += ["--bf16"] if args.bf16 else []
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WSSS_BENCH_NO_PROGRESS": "1"},
                                  timeout=max(1.0, args.limit_s - (time.perf_counter() - t_all)))
        except subprocess.TimeoutExpired:
            failures += 1
            rows.append(f"| {label} | stopped at the {args.limit_s:.0f} s limit | {time.perf_counter() - t0:.0f} | | |")
            print(label, "stopped at the time limit", flush=True)
            continue
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            failures += 1
            rows.append(f"| {label} | FAILED (exit {done.returncode}) | | | {done.stderr.strip().splitlines()[-1:]} |")
            print(label, "FAILED", done.stderr[-2000:], flush=True)
            continue
        manifest = json.loads((out / "manifest.json").read_text())
        cell = next(c for c in manifest["cells"] if c.get("status") == "done")
        n_test = sum(s["n_slices"] for s in [manifest["data"][k]["splits"]["test"] for k in manifest["data"]])
        stages = []
        for s in cell["stages"]:
            rate = f", {n_test / s['seconds']:.0f} slices/s" if s["stage"].startswith(("maps/", "refine/")) and s["seconds"] > 0 else ""
            stages.append(f"{s['stage']} {s['seconds']:.1f}s{rate}, {s.get('peak_gpu_mb', 0):.0f} MiB")
        finite = results_finite(out / "results.parquet")
        if not finite:
            failures += 1
        rows.append(f"| {label} | {'ok' if finite else 'NON-FINITE results'} | {wall:.0f} | {n_test} | "
                    f"{'; '.join(stages)} |")
        print(label, "ok", f"{wall:.0f}s", flush=True)
    text = [
        "# Device check: every method's paper-profile cell on CUDA (short trainings)", "",
        f"- command: `python benchmarks/gpu_check.py --iterations {args.iterations} --budget-s {args.budget_s:g} "
        f"--limit-s {args.limit_s:g}{' --bf16' if args.bf16 else ''}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, wall {time.perf_counter() - t_all:.0f} s",
        f"- device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}",
        f"- git SHA: {git_sha()}",
        f"- profile: paper with `--set {' --set '.join(overrides(args.iterations))}`",
        "- the numbers of these short trainings are not results; the check is that each cell runs", "",
        "| cell | status | wall (s) | test slices | stages: time, slices/s, peak GPU memory |",
        "|---|---|---:|---:|---|", *rows, ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
