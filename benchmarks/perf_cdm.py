"""CDM training throughput: seconds per iteration of the real training step, by setting.

Runs :func:`wsss_bench.nn.diffusion.train_cdm` (the cpu-profile CDM, random init, the
task's cpu-profile training slices) for ``--iters`` iterations per setting, each in a fresh
process, and takes the median time between consecutive progress callbacks after
``--warmup`` iterations.  Settings:

- ``fp32``: today's default (float32, contiguous tensors);
- ``bf16``: ``torch.autocast(cpu, bfloat16)`` around the UNet (the ``--bf16`` run option);
- ``channels_last``: the model's weights in channels-last memory format (inputs as given);
- ``threads=N``: intra-op threads of the process (the bench's workers get 1 each);
- ``data``: the data path alone, per iteration: :class:`IterationBatches.get` (reading and
  batching the slices), the iteration generator, t and eps draws, flips and ``add_noise``,
  without the network, i.e. the per-step overhead a faster data path could remove.

Numerics: bf16 and channels-last change the floating-point result of every step (channels
last through different convolution kernels), so they are measured here but become defaults
only if a trained model is as good by ``benchmarks/cdm_curve.py``'s measures.

    python benchmarks/perf_cdm.py [--task brats] [--iters 40] [--out benchmarks/results/perf_cdm.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (threads, bf16, channels_last, data path only)
    "fp32, 1 thread": (1, False, False, False),
    "bf16, 1 thread": (1, True, False, False),
    "channels-last, 1 thread": (1, False, True, False),
    "fp32, 2 threads": (2, False, False, False),
    "bf16, 2 threads": (2, True, False, False),
    "data path only, 1 thread": (1, False, False, True),
}


def measure(task: str, setting: str, iters: int, warmup: int, cache_dir: str) -> dict:
    """One setting in this process: median seconds per iteration."""
    import torch

    from wsss_bench.nn import diffusion as dif
    from wsss_bench.nn.training import IterationBatches, iteration_generator, random_flips
    from wsss_bench.plugins import load_plugins
    from wsss_bench.running.runner import RunConfig, Session

    threads, bf16, cl, data_only = SETTINGS[setting]
    torch.set_num_threads(threads)
    session = Session(RunConfig(profile="cpu", device="cpu", cache_dir=Path(cache_dir)), host=load_plugins())
    ctx = session.context(task, 0)
    prof, data = ctx.profile, ctx.data
    n = warmup + iters
    stamps: list[float] = []
    if data_only:
        batches = IterationBatches(data, data.split("train"), int(prof.cdm.batch), 0, "cpu")
        t_max = dif._harness_spec(prof)[0]
        for it in range(n):
            b = batches.get(it)
            g = iteration_generator(0, it)
            x0 = dif.to_model_range(b.images.float())
            if ctx.task.flips:
                x0 = random_flips(x0, g)
            t = torch.randint(0, t_max, (x0.shape[0],), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            dif.add_noise(x0, eps, t, prof)
            stamps.append(time.perf_counter())
    else:
        model = dif.build_cdm(prof.cdm_unet, int(ctx.task.channels), seed=0)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        with tempfile.TemporaryDirectory(prefix="perf-cdm-") as work:
            dif.train_cdm(model, data, prof, "cpu", 0, Path(work), flips=bool(ctx.task.flips), bf16=bf16,
                          progress=lambda k=1: stamps.append(time.perf_counter()), iterations=n,
                          checkpoint_interval=10**9)
    steps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return {"setting": setting, "threads": threads, "median_s": statistics.median(steps),
            "min_s": min(steps), "max_s": max(steps), "iterations": len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="brats")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cache-dir", default="/tmp/perf-cldf-cache", help="data cache (phantoms)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "perf_cdm.md")
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS),
                    help="which settings to measure (default: all)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        task, setting, iters, warmup, cache = args.child
        print(json.dumps(measure(task, setting, int(iters), int(warmup), cache)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from perf_cldf import _git_sha, _machine

    load0, t_start = os.getloadavg(), time.time()
    rows = []
    for setting in args.settings:
        threads = SETTINGS[setting][0]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        res = subprocess.run([sys.executable, __file__, "--child", args.task, setting, str(args.iters),
                              str(args.warmup), args.cache_dir], capture_output=True, text=True, env=env, cwd=ROOT,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{setting} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{setting}: {rows[-1]['median_s'] * 1000:.0f} ms/it", flush=True)
    load1 = os.getloadavg()
    base = next((r["median_s"] for r in rows if r["setting"] == "fp32, 1 thread"), rows[0]["median_s"])
    lines = ["# perf_cdm: CDM training seconds per iteration (cpu profile)", "",
             f"- command: `{' '.join(['python benchmarks/perf_cdm.py', *sys.argv[1:]])}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(t_start))}; wall {time.time() - t_start:.0f}s",
             f"- machine: {_machine()}", f"- git: {_git_sha()}",
             f"- load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
             f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}: the machine was shared with other developers' jobs; "
             f"with more runnable jobs than cores the 2-thread rows especially are unreliable",
             f"- task {args.task}, random-init cpu-profile CDM, {args.warmup} warm-up + {args.iters} timed iterations "
             f"per setting, each setting in a fresh process; median of per-iteration times", "",
             "| setting | median (ms/it) | min | max | vs fp32 1 thread |", "|---|---|---|---|---|"]
    skipped = [k for k in SETTINGS if k not in args.settings]
    if skipped:
        lines[-2:-2] = [f"Not measured in this run: {', '.join(skipped)}.", ""]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['median_s'] * 1000:.0f} | {r['min_s'] * 1000:.0f} | "
                     f"{r['max_s'] * 1000:.0f} | {r['median_s'] / base:.2f}x |")
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
