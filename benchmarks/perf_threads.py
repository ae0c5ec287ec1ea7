"""Which torch thread setting is fastest for the heavy stages on this machine?

Each setting runs in a fresh subprocess (torch reads ``OMP_NUM_THREADS`` and
``OMP_WAIT_POLICY`` once, at start), on the cpu profile's brats phantom, with the real code
paths and the profile's network sizes; the weights are random (the speed of a step does not
depend on them), so nothing is trained beyond the timed steps:

- ``cdm-train`` / ``cdm-train-bf16``: ``--cdm-steps`` iterations of ``train_cdm`` (fp32, bf16);
- ``cdm-saliency``: the ``cdm`` source's maps (docs/methods/diffusion.md, 10 DDIM steps, two UNet passes
  each) on ``--slices`` test slices;
- ``classifier-train``: one epoch of ``train_classifier``'s steps (the CAM classifier);
- ``noisy-train``: ``--noisy-steps`` iterations of ``train_noisy_classifier``;
- ``mg``: the ``mg`` source's maps (10 t values, one input gradient each) on ``--slices`` slices.

Settings: ``1`` and ``2`` threads with the OpenMP default wait policy and with
``OMP_WAIT_POLICY=PASSIVE``, and ``2x1``: two 1-thread processes side by side (what
``--executor 'local[jobs=2]'`` runs), whose time per unit of work is halved to compare
throughput.  Every stage reports seconds per unit (iteration or slice), the median of the
processes; the table marks the fastest setting per stage.  Run it on an idle machine.

    python benchmarks/perf_threads.py                  # writes benchmarks/results/perf_threads.md
    python benchmarks/perf_threads.py --settings 1,2 --cdm-steps 10 --slices 16 --out /tmp/t.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, provenance_lines  # noqa: E402

SOURCES = ["benchmarks/perf_threads.py", "wsss_bench/nn/diffusion.py", "wsss_bench/nn/classifier.py",
           "wsss_bench/nn/noisy_classifier.py", "plugins/cdm.py", "plugins/mg.py", "plugins/executors.py"]
STAGES = ["cdm-train", "cdm-train-bf16", "cdm-saliency", "classifier-train", "noisy-train", "mg"]
UNITS = {"cdm-train": "s/it", "cdm-train-bf16": "s/it", "cdm-saliency": "s/slice", "classifier-train": "s/step",
         "noisy-train": "s/it", "mg": "s/slice"}
SETTINGS = {"1": (1, None), "2": (2, None), "1p": (1, "PASSIVE"), "2p": (2, "PASSIVE"), "2x1": (1, None)}


def child(args) -> dict:
    """Time every stage in this process; return seconds per unit."""
    import torch

    from wsss_bench.nn.classifier import build_classifier, train_classifier
    from wsss_bench.nn.diffusion import build_cdm, train_cdm
    from wsss_bench.nn.noisy_classifier import build_noisy_classifier, train_noisy_classifier
    from wsss_bench.running.runner import RunConfig, Session

    cfg = RunConfig(profile=args.profile, device="cpu", cache_dir=Path(args.cache_dir), out=Path(args.work) / "run")
    ctx = Session(cfg).context(args.task, 0)
    prof, data = ctx.profile, ctx.data
    test = list(data.split("test"))[: args.slices]
    out: dict[str, float] = {}

    def timed(stage: str, fn, units: int) -> None:
        t0 = time.perf_counter()
        fn()
        out[stage] = (time.perf_counter() - t0) / units

    for stage, bf16 in (("cdm-train", False), ("cdm-train-bf16", True)):
        model = build_cdm(dict(prof.cdm_unet), ctx.task.channels, seed=1)
        work = Path(tempfile.mkdtemp(dir=args.work))
        train_cdm(model, data, prof, "cpu", 1, work, flips=True, bf16=bf16, iterations=2)  # warm-up
        model = build_cdm(dict(prof.cdm_unet), ctx.task.channels, seed=1)
        work = Path(tempfile.mkdtemp(dir=args.work))
        timed(stage, lambda: train_cdm(model, data, prof, "cpu", 1, work, flips=True, bf16=bf16,
                                       iterations=args.cdm_steps), args.cdm_steps)

    ctx.provide_model("cdm", build_cdm(dict(prof.cdm_unet), ctx.task.channels, seed=2).eval().requires_grad_(False), key="random")
    ctx.provide_model("noisy-classifier", build_noisy_classifier(
        dict(prof.cdm_unet), ctx.task.channels, int(data.image_size), seed=3).eval().requires_grad_(False), key="random")
    for stage, spec in (("cdm-saliency", "cdm"), ("mg", "mg")):
        source = ctx.plugin("cams", spec)
        source.prepare(ctx)
        grad = torch.no_grad() if getattr(source, "no_grad", False) else torch.enable_grad()

        def run_maps() -> None:
            with grad:
                for batch in data.batches(test, int(prof.classifier.batch), device="cpu"):
                    source.maps(batch)

        timed(stage, run_maps, len(test))

    clf = build_classifier(dict(prof.cam_classifier), ctx.task.channels, seed=4)
    epoch_prof = _with(prof, "classifier", {"epochs": 1})
    n_train = len(data.split("train"))
    steps = -(-n_train // int(prof.classifier.batch))
    timed("classifier-train", lambda: train_classifier(clf, data, epoch_prof, "cpu", 4, flips=True,
                                                       work=Path(tempfile.mkdtemp(dir=args.work))), steps)
    noisy = build_noisy_classifier(dict(prof.cdm_unet), ctx.task.channels, int(data.image_size), seed=5)
    timed("noisy-train", lambda: train_noisy_classifier(noisy, data, prof, "cpu", 5,
                                                        Path(tempfile.mkdtemp(dir=args.work)), flips=True,
                                                        iterations=args.noisy_steps), args.noisy_steps)
    return {"threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "seconds_per_unit": out}


def _with(prof, section: str, values: dict):
    """``prof`` with some values of one section replaced (the profile's own override path)."""
    from wsss_bench.profiles import apply_overrides, load_profile

    return apply_overrides(load_profile(prof.name), [f"{section}.{k}={v}" for k, v in values.items()])


def launch(setting: str, args, cache: Path) -> list[subprocess.Popen]:
    threads, policy = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    n = 2 if setting == "2x1" else 1
    procs = []
    for i in range(n):
        work = Path(tempfile.mkdtemp(prefix=f"perf-threads-{setting}-{i}-"))
        cmd = [sys.executable, __file__, "--child", "--profile", args.profile, "--task", args.task, "--cache-dir", str(cache), "--work", str(work),
               "--cdm-steps", str(args.cdm_steps), "--slices", str(args.slices), "--noisy-steps", str(args.noisy_steps)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT))
    return procs


def collect(setting: str, procs: list[subprocess.Popen]) -> dict:
    runs = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"setting {setting}: child exited with {p.returncode}")
        runs.append(json.loads(stdout.strip().splitlines()[-1]))
    per = {}
    for stage in STAGES:
        vals = sorted(r["seconds_per_unit"][stage] for r in runs)
        v = vals[len(vals) // 2]
        per[stage] = v / len(runs)  # two processes side by side: the work per unit of wall time doubles
    return {"setting": setting, "processes": len(runs), "raw": runs, "seconds_per_unit": per}


def report(rows: list[dict], command: str, cache: Path, args, load: tuple[float, ...]) -> str:
    from wsss_bench.running.runner import RunConfig, Session

    cfg = RunConfig(profile=args.profile, device="cpu", cache_dir=cache, out=Path(tempfile.mkdtemp()))
    ctx = Session(cfg).context(args.task, 0)
    lines = ["# Torch thread settings for the heavy stages", ""]
    lines += provenance_lines(command, profile=args.profile, data=ctx.data, sources=SOURCES)
    lines.append(f"- load average when it started (1/5/15 min): {' / '.join(f'{v:.2f}' for v in load)}")
    lines += ["", f"Task {args.task}; {args.cdm_steps} CDM iterations, {args.noisy_steps} noisy-classifier "
              f"iterations, {args.slices} test slices for the map stages, one classifier epoch.", "", "Seconds per unit of work (lower is better; `2x1` is two 1-thread processes side by side,",
              "its time per unit halved: the throughput of `--executor 'local[jobs=2]'`). **Bold**: fastest.", ""]
    names = {"1": "1 thread", "2": "2 threads", "1p": "1 thread, PASSIVE", "2p": "2 threads, PASSIVE",
             "2x1": "2 x 1 thread (jobs=2)"}
    lines.append("| stage | unit | " + " | ".join(names[r["setting"]] for r in rows) + " |")
    lines.append("|---|---|" + "---|" * len(rows))
    for stage in STAGES:
        vals = [r["seconds_per_unit"][stage] for r in rows]
        best = min(vals)
        cells = [f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in vals]
        lines.append(f"| {stage} | {UNITS[stage]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default="brats")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--settings", default="1,2,1p,2p,2x1", help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--cdm-steps", type=int, default=30)
    ap.add_argument("--noisy-steps", type=int, default=40)
    ap.add_argument("--slices", type=int, default=64, help="test slices for the map stages")
    ap.add_argument("--cache-dir", default=None, help="phantom/slice cache (default: a fresh temporary one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "perf_threads.md"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise SystemExit(f"--settings: unknown {', '.join(bad)}; choose from {', '.join(SETTINGS)}")
    load = os.getloadavg()
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="perf-threads-cache-"))
    warm = launch("1", argparse.Namespace(**{**vars(args), "cdm_steps": 1, "noisy_steps": 1, "slices": 1}), cache)
    collect("warm-up", warm)  # writes the phantom and slice store once, outside the timings
    rows = []
    for s in settings:
        t0 = time.perf_counter()
        rows.append(collect(s, launch(s, args, cache)))
        print(f"{s}: {json.dumps(rows[-1]['seconds_per_unit'])} ({time.perf_counter() - t0:.0f}s)", flush=True)
    text = report(rows, command_line(), cache, args, load)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
