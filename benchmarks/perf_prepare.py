"""Slice preparation at real size: time per case at 1 and 2 jobs, store bytes, transient disk, peak memory.

Writes N synthetic cases per dataset at the real sizes and dtypes (BraTS21: four int16
modalities + uint8 seg of 240 x 240 x 155; FLARE21: int16 HU + uint8 labels of 512 x 512 x 100,
both gzip NIfTI) with its own simple generator (ellipsoids, smooth shading and noise; not the
phantoms), then prepares the paper profile's S = 256 store of each in a fresh process:

- ``baseline``: the store as it was before the compact store (float32, part files gathered into
  the arrays), taken from git at ``--baseline`` (default: the last commit before it);
- ``jobs=1`` and ``jobs=2``: the current store;
- ``jobs=1`` / ``jobs=2`` on half the cases, to see whether peak memory grows with N.

Each run samples, every 20 ms, the summed PSS of the process and its workers (so memory shared
between a parent and its forked workers is counted once) and the disk blocks under the cache's
``slices/`` folder (the transient disk).  The report gives the projection to 2,000 BraTS and
361 FLARE cases and checks the targets of the issue.  The machine is shared, so the load
average before and after each run is recorded.

``--dice`` instead measures what the image codec does to Dice: ``gradcam + threshold`` on the
smoke profile, per codec (float32, uint16, uint8), each with its own cache, for a few seeds.

    python benchmarks/perf_prepare.py --cases 4 --out benchmarks/results/perf_prepare.md
    python benchmarks/perf_prepare.py --dice --seeds 0,1,2 --out benchmarks/results/perf_prepare.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE = "a61cf18"  # the last commit with the float32 part-file store
BRATS_SHAPE = (240, 240, 155)
FLARE_SHAPE = (512, 512, 100)
SIZE = 256


# --------------------------------------------------------------------------- generator
def _ellipsoid(shape, centre, semi):
    x, y, z = (np.arange(n, dtype=np.float32) for n in shape)
    return ((x[:, None, None] - centre[0]) / semi[0]) ** 2 + ((y[None, :, None] - centre[1]) / semi[1]) ** 2 + (
        (z[None, None, :] - centre[2]) / semi[2]) ** 2


def _shading(rng, shape, amp):
    """A smooth multiplicative field: a random low-order polynomial over the volume."""
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    c = rng.uniform(-amp, amp, 6).astype(np.float32)
    return 1 + c[0] * x[:, None, None] + c[1] * y[None, :, None] + c[2] * z[None, None, :] + c[3] * (
        x[:, None, None] * y[None, :, None]) + c[4] * z[None, None, :] ** 2 + c[5] * x[:, None, None] ** 2


def write_brats(root: Path, n: int, seed: int = 0) -> None:
    import nibabel as nib

    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        case = f"BraTS2021_{i:05d}"
        (root / case).mkdir(parents=True, exist_ok=True)
        centre = (120 + rng.uniform(-5, 5), 120 + rng.uniform(-8, 8), 72 + rng.uniform(-4, 4))
        brain = _ellipsoid(BRATS_SHAPE, centre, (68, 84, 64)) < 1
        t_centre = [centre[0] + rng.uniform(-30, 30), centre[1] + rng.uniform(-35, 35), centre[2] + rng.uniform(-20, 20)]
        r = _ellipsoid(BRATS_SHAPE, t_centre, (1, 1, 1)) ** 0.5
        seg = np.zeros(BRATS_SHAPE, np.uint8)
        rad = rng.uniform(10, 25)
        seg[(r < rad * 1.8) & brain] = 2
        seg[(r < rad) & brain] = 4
        seg[(r < rad * 0.6) & brain] = 1
        nib.save(nib.Nifti1Image(seg, aff), str(root / case / f"{case}_seg.nii.gz"))
        for m, (base, contrast) in enumerate(((400, (1.6, 1.3, 0.6)), (600, (0.8, 0.9, 0.5)),
                                              (550, (1.1, 2.0, 0.4)), (500, (1.5, 1.2, 1.9)))):
            v = base * _shading(rng, BRATS_SHAPE, 0.15)
            for lab, f in zip((2, 4, 1), contrast):
                v[seg == lab] *= f
            v += rng.normal(0, 0.03 * base, BRATS_SHAPE).astype(np.float32)
            v[~brain] = 0
            img = np.clip(v, 0, 32767).astype(np.int16)
            name = ("flair", "t1", "t1ce", "t2")[m]
            nib.save(nib.Nifti1Image(img, aff), str(root / case / f"{case}_{name}.nii.gz"))


def write_flare(root: Path, n: int, seed: int = 0) -> None:
    import nibabel as nib

    (root / "TrainingImg").mkdir(parents=True, exist_ok=True)
    (root / "TrainingMask").mkdir(parents=True, exist_ok=True)
    aff = np.diag([-0.8, -0.8, 2.5, 1.0])
    for i in range(n):
        rng = np.random.default_rng([seed, 1000 + i])
        cx, cy, cz = 256 + rng.uniform(-10, 10), 256 + rng.uniform(-10, 10), 50
        body = _ellipsoid(FLARE_SHAPE, (cx, cy, cz), (230, 170, 1e6)) < 1
        hu = np.full(FLARE_SHAPE, -1000, np.float32)
        hu[body] = -90  # fat
        hu[_ellipsoid(FLARE_SHAPE, (cx, cy, cz), (200, 145, 1e6)) < 1] = 45  # muscle / viscera
        lab = np.zeros(FLARE_SHAPE, np.uint8)
        organs = ((1, (cx - 80, cy - 20, cz + 20), (90, 70, 30), 60), (3, (cx + 100, cy + 40, cz + 15), (35, 30, 18), 50),
                  (2, (cx - 70, cy + 70, cz - 10), (22, 28, 20), 160), (2, (cx + 70, cy + 70, cz - 5), (22, 28, 20), 160),
                  (4, (cx + 10, cy + 10, cz), (50, 12, 8), 40))
        for label, c, semi, value in organs:
            m = _ellipsoid(FLARE_SHAPE, c, semi) < 1
            lab[m] = label
            hu[m] = value
        hu[_ellipsoid(FLARE_SHAPE, (cx, cy + 110, cz), (25, 25, 1e6)) < 1] = 600  # spine
        hu += rng.normal(0, 12, FLARE_SHAPE).astype(np.float32)
        hu[~body] = -1024
        case = f"train_{i:03d}"
        nib.save(nib.Nifti1Image(hu.astype(np.int16), aff), str(root / "TrainingImg" / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(root / "TrainingMask" / f"{case}.nii.gz"))


# --------------------------------------------------------------------------- sampling
def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _disk_bytes(path: Path) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of every file under ``path``."""
    blocks = apparent = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            blocks += st.st_blocks * 512
            apparent += st.st_size
    return blocks, apparent


class Sampler(threading.Thread):
    def __init__(self, slices: Path) -> None:
        super().__init__(daemon=True)
        self.slices, self.stop_ = slices, threading.Event()
        self.peak_pss_kb = 0
        self.peak_disk = 0

    def run(self) -> None:
        me = os.getpid()
        while not self.stop_.is_set():
            self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in _descendants(me)))
            if self.slices.exists():
                self.peak_disk = max(self.peak_disk, _disk_bytes(self.slices)[0])
            time.sleep(0.02)


# --------------------------------------------------------------------------- one run (child process)
def child_run(args) -> None:
    import resource

    from wsss_bench.data.readers import BratsDataset, Flare21Dataset

    import torch  # noqa: F401  as in a real run; not part of the measured time

    source = {"brats": BratsDataset, "flare": Flare21Dataset}[args.dataset]()
    cache = Path(args.cache)
    slices = cache / "slices"
    sampler = Sampler(slices)
    sampler.start()

    def cpu_now() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
    if args.mode == "baseline":
        import importlib.util

        spec = importlib.util.spec_from_file_location("baseline_store", args.baseline_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules["baseline_store"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        t0, cpu0 = time.perf_counter(), cpu_now()
        store = module.prepare_slices(source, Path(args.root), SIZE, cache, case_cap=args.cap)
        t_hash = 0.0
        seconds = time.perf_counter() - t0
    else:
        from wsss_bench.data import store as st

        t0 = time.perf_counter()
        st.data_fingerprint(Path(args.root), cache, args.jobs)  # first read of the data: content hashes
        t_hash = time.perf_counter() - t0
        t1, cpu0 = time.perf_counter(), cpu_now()
        store = st.prepare_slices(source, Path(args.root), SIZE, cache, case_cap=args.cap, jobs=args.jobs)
        seconds = time.perf_counter() - t1
    sampler.stop_.set()
    sampler.join()
    cpu = cpu_now()
    blocks, apparent = _disk_bytes(store.path)
    n_cases = len(store.meta["cases"])
    tissue = store.index["tissue_fraction"].to_numpy()
    print(json.dumps({
        "mode": args.mode, "dataset": args.dataset, "jobs": args.jobs, "cases": n_cases,
        "slices": int(len(store.index)), "blank_slices": int((tissue == 0).sum()),
        "seconds": seconds, "hash_seconds": t_hash, "s_per_case": seconds / n_cases,
        "cpu_per_case": (cpu - cpu0) / n_cases,
        "store_apparent": apparent, "store_allocated": blocks,
        "peak_disk": sampler.peak_disk, "peak_pss_mb": sampler.peak_pss_kb / 1024,
        "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "maxrss_child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "input_bytes": sum(p.stat().st_size for p in Path(args.root).rglob("*.nii.gz")),
    }))


def run_child(work: Path, dataset: str, mode: str, jobs: int, cap: int, baseline_file: Path) -> dict:
    cache = work / f"cache-{dataset}-{mode}-j{jobs}-n{cap}"
    shutil.rmtree(cache, ignore_errors=True)
    load0 = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--child", "--dataset", dataset, "--mode", mode, "--jobs", str(jobs),
           "--cap", str(cap), "--root", str(work / dataset), "--cache", str(cache), "--baseline-file", str(baseline_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["load_before"], rec["load_after"] = load0, os.getloadavg()[0]
    shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(rec), flush=True)
    return rec


# --------------------------------------------------------------------------- report
def _machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {mem:.0f} GiB RAM, {platform.platform()}"


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}"


def report(records: list[dict], n: int, cmd: str) -> str:
    lines = ["# Slice preparation at real size", "",
             f"Command: `{cmd}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M')}  ", f"Machine: {_machine()}  ",
             f"Git: {_git_sha()} (baseline store from {BASELINE})  ",
             "Threads: OMP_NUM_THREADS=1; each job is one process with one torch thread.", "",
             "Synthetic cases at real size and dtype (generator in the script); paper profile S = 256.", "",
             "| dataset | run | cases | s/case (wall) | CPU s/case | speed-up vs jobs=1 | store MB/case (apparent / allocated) "
             "| store vs baseline | peak disk / store | peak PSS MB (all processes) | max RSS MB parent / largest worker "
             "| load avg before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["dataset"], r["mode"], r["jobs"], r["cases"]): r for r in records}
    for r in records:
        one = by.get((r["dataset"], "new", 1, r["cases"]))
        base = by.get((r["dataset"], "baseline", 1, r["cases"])) or by.get((r["dataset"], "baseline", 1, n))
        speed = f"{one['s_per_case'] / r['s_per_case']:.2f}x" if one and r["mode"] == "new" else "-"
        ratio = f"{(r['store_apparent'] / r['cases']) / (base['store_apparent'] / base['cases']):.4f}" if base else "-"
        label = "baseline (float32, parts + copy)" if r["mode"] == "baseline" else f"jobs={r['jobs']}"
        lines.append(
            f"| {r['dataset']} | {label} | {r['cases']} | {r['s_per_case']:.2f} | {r['cpu_per_case']:.2f} | {speed} | "
            f"{_mb(r['store_apparent'] / r['cases'])} / {_mb(r['store_allocated'] / r['cases'])} | {ratio} | "
            f"{r['peak_disk'] / max(1, r['store_allocated']):.2f} | {r['peak_pss_mb']:.0f} | "
            f"{r['maxrss_self_mb']:.0f} / {r['maxrss_child_mb']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", "Content hashing (first read of a data root; remembered afterwards):", ""]
    for r in records:
        if r["mode"] == "new" and r["cases"] == n:
            rate = r["input_bytes"] / max(r["hash_seconds"], 1e-9) / 1e6
            lines.append(f"- {r['dataset']} jobs={r['jobs']}: {r['hash_seconds']:.2f} s for "
                         f"{_mb(r['input_bytes'])} MB of gzip NIfTI ({rate:.0f} MB/s)")
    lines += ["", "## Projection", "",
              "Linear in the number of cases, from the N-case runs above (s/case at 1 and 2 jobs; "
              "more cores scale like the 2-job speed-up only if the disk keeps up).", "",
              "| dataset | cases | store GB (apparent / allocated) | peak transient disk GB | hours at jobs=1 "
              "| hours at jobs=2 | baseline: hours, store GB, transient GB |",
              "|---|---|---|---|---|---|---|"]
    for ds, total in (("brats", 2000), ("flare", 361)):
        one, two, base = by.get((ds, "new", 1, n)), by.get((ds, "new", 2, n)), by.get((ds, "baseline", 1, n))
        if not (one and two):
            continue
        per_a, per_b = one["store_apparent"] / n, one["store_allocated"] / n
        peak = max(one["peak_disk"], two["peak_disk"]) / max(1, one["store_allocated"])
        b = (f"{base['s_per_case'] * total / 3600:.2f} h, {base['store_apparent'] / n * total / 1e9:.0f} GB, "
             f"{base['peak_disk'] / n * total / 1e9:.0f} GB") if base else "-"
        lines.append(f"| {ds} | {total} | {per_a * total / 1e9:.1f} / {per_b * total / 1e9:.1f} | "
                     f"{peak * per_b * total / 1e9:.1f} | {one['s_per_case'] * total / 3600:.2f} | "
                     f"{two['s_per_case'] * total / 3600:.2f} | {b} |")
    lines += ["", "## Targets", ""]
    for ds in ("brats", "flare"):
        one, two, base = by.get((ds, "new", 1, n)), by.get((ds, "new", 2, n)), by.get((ds, "baseline", 1, n))
        half1, half2 = by.get((ds, "new", 1, n // 2)), by.get((ds, "new", 2, n // 2))
        if not (one and two):
            continue
        checks = []
        if base:
            ratio = one["store_apparent"] / base["store_apparent"]
            checks.append(f"store <= 0.3x baseline bytes per case: {ratio:.4f} "
                          f"({'met' if ratio <= 0.3 else 'NOT met'}; allocated {one['store_allocated'] / base['store_apparent']:.3f})")
        tr = max(one["peak_disk"], two["peak_disk"]) / max(1, one["store_allocated"])
        checks.append(f"transient disk <= 1.1x store: {tr:.2f} ({'met' if tr <= 1.1 else 'NOT met'})")
        if half1 and half2:
            flat = max(one["peak_pss_mb"] / half1["peak_pss_mb"], two["peak_pss_mb"] / half2["peak_pss_mb"])
            checks.append(f"peak memory flat in N (N={n // 2} -> {n}): jobs=1 {half1['peak_pss_mb']:.0f} -> "
                          f"{one['peak_pss_mb']:.0f} MB, jobs=2 {half2['peak_pss_mb']:.0f} -> {two['peak_pss_mb']:.0f} MB "
                          f"({'met' if flat <= 1.15 else 'NOT met'})")
        sp = one["s_per_case"] / two["s_per_case"]
        ideal = 2 * one["cpu_per_case"] / two["cpu_per_case"]
        checks.append(f"2 jobs >= 1.7x faster than 1: {sp:.2f}x wall ({'met' if sp >= 1.7 else 'NOT met'}; "
                      f"load average {two['load_before']:.1f} before the 2-job run on "
                      f"{len(os.sched_getaffinity(0))} usable cores; CPU s/case {one['cpu_per_case']:.2f} at 1 job, "
                      f"{two['cpu_per_case']:.2f} at 2, so two idle cores would give at most {ideal:.2f}x)")
        lines.append(f"- **{ds}**: " + "; ".join(checks))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- dice mode
DICE_SCRIPT = """
import sys
from wsss_bench.data import store
store.DEFAULT_CODEC = sys.argv[1]
from wsss_bench.cli import main
main(sys.argv[2:])
"""


def dice_mode(args) -> str:
    """Dice per codec.  A variant "uint8@float32" reuses the float32 variant's trained classifier
    (a copy of its cache without the maps) and makes the maps from the uint8 store: the effect
    of quantisation on inference alone, without the chaos of retraining.  It relies on artifact
    keys that ignore the store codec; the run's output is checked for the reuse."""
    import pandas as pd

    work = Path(args.work) / "dice"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    t0 = time.time()
    variants = args.codecs.split(",")
    for variant in variants:
        codec, _, trained_on = variant.partition("@")
        for task in args.tasks.split(","):
            out = work / f"run-{variant}-{task}"
            cache = work / f"cache-{variant}-{task}"
            if trained_on:
                shutil.copytree(work / f"cache-{trained_on}-{task}", cache)
                for stage in ("maps", "classifier-p1"):
                    shutil.rmtree(cache / "artifacts" / stage, ignore_errors=True)
            cmd = [sys.executable, "-c", DICE_SCRIPT, codec, "run", "--profile", args.profile, "--method", "threshold",
                   "--cam", "gradcam", "--task", task, "--seed", args.seeds, "--out", str(out),
                   "--cache-dir", str(cache)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WSSS_BENCH_NO_PROGRESS": "1"}
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{variant} {task} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
            if trained_on and "reused cached classifier" not in res.stdout + res.stderr:
                raise SystemExit(f"{variant} {task}: the classifier was not reused; the variant is meaningless")
            if "failed" in res.stdout and "0 failed" not in res.stdout:
                print(res.stdout[-1500:])
            frame = pd.read_parquet(out / "results.parquet")
            frame = frame[frame["gate"] == "label"]
            for seed, g in frame.groupby("seed"):
                rows.append({"codec": variant, "task": task, "seed": int(seed), "dice": float(g["dice"].mean()),
                             "n": len(g), "frame": g.sort_values(["case_id", "z"])["dice"].to_numpy()})
            print(variant, task, f"{time.time() - t0:.0f}s", flush=True)
    others = [v for v in variants if v != "float32"]
    lines = ["", f"## Image codec and Dice ({args.profile} profile)", "",
             f"Command: `{' '.join(sys.argv)}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M')}, git {_git_sha()}", "",
             "`gradcam + threshold`, gate = label, mean Dice over the test slices. Each codec has its own cache, so "
             "its classifier is trained on its own images; `uint8@float32` = the float32 classifier, maps made "
             "from the uint8 store (quantisation at inference only).", "",
             f"| task | seed | {' | '.join(variants)} | " + " | ".join(f"{v} - float32 (slices changed)" for v in others) + " |",
             "|---|---|" + "---|" * (len(variants) + len(others))]
    key = {(r["codec"], r["task"], r["seed"]): r for r in rows}
    diffs: dict[str, list[float]] = {v: [] for v in others}
    for task in args.tasks.split(","):
        for seed in sorted({r["seed"] for r in rows if r["task"] == task}):
            f = key[("float32", task, seed)]
            cols = " | ".join(f"{key[(c, task, seed)]['dice']:.4f}" for c in variants)
            deltas = []
            for v in others:
                o = key[(v, task, seed)]
                changed = int((np.abs(f["frame"] - o["frame"]) > 1e-9).sum()) if len(f["frame"]) == len(o["frame"]) else -1
                diffs[v].append(o["dice"] - f["dice"])
                deltas.append(f"{o['dice'] - f['dice']:+.4f} ({changed} / {len(f['frame'])})")
            lines.append(f"| {task} | {seed} | {cols} | " + " | ".join(deltas) + " |")
    lines.append("")
    for v in others:
        lines.append(f"- mean change {v} - float32: {np.mean(diffs[v]):+.4f} (sd {np.std(diffs[v]):.4f}, "
                     f"{len(diffs[v])} task x seed pairs)")
    lines.append(f"- wall time {time.time() - t0:.0f} s")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--datasets", default="brats,flare")
    ap.add_argument("--work", default="/tmp/wsss-perf-prepare")
    ap.add_argument("--out", default=None)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--dice", action="store_true")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="brats,flare21-kidney")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--codecs", default="float32,uint16,uint8,uint8@float32")
    # child mode
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--dataset")
    ap.add_argument("--mode")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--cap", type=int, default=0)
    ap.add_argument("--root")
    ap.add_argument("--cache")
    ap.add_argument("--baseline-file")
    ap.add_argument("--generate", default=None)
    args = ap.parse_args()
    if args.generate:
        return (write_brats if args.generate == "brats" else write_flare)(Path(args.root), args.cases)
    if args.child:
        return child_run(args)
    cmd = "python benchmarks/perf_prepare.py " + " ".join(sys.argv[1:])
    if args.dice:
        text = dice_mode(args)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(text)
        print(text)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    baseline_file = work / "baseline_store.py"
    baseline_file.write_text(subprocess.run(["git", "show", f"{args.baseline}:wsss_bench/data/store.py"], cwd=ROOT,
                                            capture_output=True, text=True, check=True).stdout)
    n = args.cases
    records = []
    for ds in args.datasets.split(","):
        root = work / ds
        marker = root / f".written-{n}"
        if not marker.is_file():
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.time()
            # in a child, so that this process stays small: a run's ru_maxrss starts from the
            # high-water mark of the process that forked it
            subprocess.run([sys.executable, __file__, "--generate", ds, "--cases", str(n), "--root", str(root)],
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
            marker.write_text("")
            print(f"wrote {n} {ds} cases in {time.time() - t0:.0f}s", flush=True)
        if not args.no_baseline:
            records.append(run_child(work, ds, "baseline", 1, n, baseline_file))
        for jobs in (1, 2):
            records.append(run_child(work, ds, "new", jobs, n, baseline_file))
        if n >= 2:
            for jobs in (1, 2):
                records.append(run_child(work, ds, "new", jobs, n // 2, baseline_file))
    text = report(records, n, cmd)
    (work / "records.json").write_text(json.dumps(records, indent=1))
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
