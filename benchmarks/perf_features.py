"""Feature-path memory and time, plus per-slice CDM / MG map times (docs/methods/diffusion.md).

Embeds one slice through the CDM feature path (mean over t at native resolution, then
chunked grid_sample gather -> decoder -> (S^2, 16) buffer) and through the naive path
(Up every block at every t to S x S, keep the full (T, D, S, S) stack, mean, decode),
each in a fresh subprocess so peak RSS is not shared:

- 256 x 256 with the paper-profile CDM (D = 1024, blocks up 1-3), 4 timesteps;
- 64 x 64 with the cpu-profile CDM (D = 112, all blocks).

Peak RSS is the kernel's high-water mark (VmHWM) after it was reset (``/proc/self/clear_refs``)
once the network is built; "increment" subtracts the resident size at that moment (torch,
weights), which is what the feature path itself costs.  Networks are randomly initialised:
time and memory do not depend on the weights.

Then the time per 64 x 64 slice of the ``cdm`` map (R = 10 DDIM steps x 2 branches) and the
``mg`` map (10 timesteps of the cpu profile, forward + backward), cpu-profile networks.

    python benchmarks/perf_features.py [--threads 2] [--out benchmarks/results/perf_features.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {"256": ("paper", 256), "64": ("cpu", 64)}


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # MiB
    raise KeyError(field)


def _decoder(dim: int):
    import torch

    torch.manual_seed(0)
    layers, d = [], dim
    for _ in range(4):  # CLDF's D -> 16 -> 16 -> 16 -> 16 shape, without BatchNorm
        layers += [torch.nn.Linear(d, 16), torch.nn.ReLU()]
        d = 16
    return torch.nn.Sequential(*layers[:-1]).eval()


def run_embed(case: str, path: str, threads: int) -> dict:
    """One slice through one path, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from wsss_bench.nn import diffusion as dif
    from wsss_bench.nn import diffusion_features as dfeat
    from wsss_bench.profiles import load_profile

    torch.set_num_threads(threads)
    prof_name, size = CASES[case]
    prof = load_profile(prof_name)
    unet = dif.build_cdm(prof.cdm_unet, 4, seed=0).eval().requires_grad_(False)
    blocks = dfeat.select_blocks(prof.cldf.feature_blocks, prof.cdm_unet, size)
    dim = dfeat.feature_dim(prof.cdm_unet, blocks)
    ts = dif.match([1, 10, 50, 100])
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, 4, size, size, generator=g) for _ in ts]
    image = torch.rand(4, size, size, generator=g)
    decoder = _decoder(dim)

    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    base = _status("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        if path == "stream":
            acts = dfeat.mean_activations(unet, image[None], ts, noises, blocks)
            out = dfeat.stream_embed(dfeat.stream_from(acts, size, dfeat.DEFAULT_CHUNK), size * size, decoder, 16)
        else:  # naive: the full (D, S, S) features at every t, then the mean, then decode
            labels = torch.ones(1, dtype=torch.long)
            per_t = []
            for t, eps in zip(ts, noises):
                tt = dif.timesteps(t, 1)
                xt = dif.add_noise(image[None] * 2 - 1, eps, tt)
                acts = dfeat.block_activations(unet, xt, tt, labels, blocks)
                per_t.append(torch.cat([F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)
                                        for a in acts], dim=1))  # (1, D, S, S)
            feats = torch.stack(per_t).mean(0)[0]  # (D, S, S)
            out = decoder(feats.reshape(dim, -1).t().contiguous())  # (S^2, 16)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"case": case, "path": path, "size": size, "dim": dim, "blocks": blocks, "seconds": seconds,
            "baseline_mib": base, "peak_mib": peak, "increment_mib": peak - base, "out": list(out.shape),
            "checksum": float(out.double().abs().sum())}


def run_maps(threads: int, n: int = 8) -> dict:
    """Seconds per 64 x 64 slice of the cdm and mg maps (cpu-profile networks, batch n)."""
    import torch

    from wsss_bench.nn import diffusion as dif
    from wsss_bench.nn.noisy_classifier import build_noisy_classifier
    from wsss_bench.profiles import load_profile
    from wsss_bench_plugins.cdm import cdm_difference
    from wsss_bench_plugins.mg import mean_gradient

    torch.set_num_threads(threads)
    prof = load_profile("cpu")
    unet = dif.build_cdm(prof.cdm_unet, 4, seed=0).eval().requires_grad_(False)
    clf = build_noisy_classifier(prof.cdm_unet, 4, 64, seed=0).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 4, 64, 64, generator=g)
    noise = torch.randn(n, 4, 64, 64, generator=g)
    table = dict(zip(range(380, 401), dif.match(list(range(380, 401)))))
    ts = dif.match([int(v) for v in prof.mg.t_ref])
    mg_noise = [torch.randn(1, 4, 64, 64, generator=g) for _ in ts]
    out = {}
    for name, fn in (
        ("cdm", lambda: cdm_difference(unet, images * 2 - 1, noise, 0.95, 400, 10, dif.ref_alpha_bar,
                                       table.__getitem__)),
        ("mg", lambda: mean_gradient(clf, images, ts, mg_noise)),
    ):
        fn()  # warm-up
        t0 = time.perf_counter()
        reps = 2
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t0) / (reps * n)
    return {"threads": threads, "batch": n, "cdm_s_per_slice": out["cdm"], "mg_s_per_slice": out["mg"],
            "mg_timesteps": len(ts)}


def _child(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=args[-1])
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return f"{cpu}; {os.cpu_count()} logical CPUs; Linux {platform.release()}; torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="intra-op threads to time maps with")
    ap.add_argument("--embed-threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "perf_features.md")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        result = run_embed(rest[0], rest[1], int(rest[2])) if kind == "embed" else run_maps(int(rest[0]))
        print(json.dumps(result))
        return

    load0 = os.getloadavg()
    t_start = time.time()
    embeds = []
    for case in ("256", "64"):
        for path in ("stream", "naive"):
            r = _child(["embed", case, path, str(args.embed_threads)])
            embeds.append(r)
            print(f"{case} {path}: {r['seconds']:.2f}s, peak {r['peak_mib']:.0f} MiB (+{r['increment_mib']:.0f})",
                  flush=True)
    maps = [_child(["maps", str(t)]) for t in args.threads]
    load1 = os.getloadavg()

    by = {(r["case"], r["path"]): r for r in embeds}
    lines = [
        "# perf_features: CDM feature path vs naive dense features; cdm / mg map times",
        "",
        f"- machine: {_machine()}",
        f"- command: `{' '.join(['python benchmarks/perf_features.py', *sys.argv[1:]])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(t_start))}; wall {time.time() - t_start:.0f}s",
        f"- load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} (the 2 cores were shared with other jobs)",
        f"- embedding runs: {args.embed_threads} thread(s), each path in its own process; random-init networks",
        "",
        "## One slice through the feature path vs the naive path",
        "",
        "Feature path: a-bar_l = mean_t a_{l,t} at native resolution, then chunks of 16,384 pixels: "
        "grid_sample gather -> decoder (D -> 16 x 4) -> (S^2, 16) buffer. Naive: Up every block to "
        "S x S at every t, keep the (T, D, S, S) stack, mean, reshape to (S^2, D), decode. "
        "Timesteps t_ref {1, 10, 50, 100} -> {0, 2, 12, 24}.",
        "",
        "| slice | profile UNet | D | path | time (s) | peak RSS (MiB) | peak - resident before (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in embeds:
        prof = CASES[r["case"]][0]
        lines.append(f"| {r['size']}x{r['size']} | {prof} | {r['dim']} | {r['path']} | {r['seconds']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['increment_mib']:.0f} |")
    lines += ["", "| slice | time ratio (feature / naive) | peak RSS ratio | increment ratio | outputs equal |",
              "|---|---|---|---|---|"]
    for case in ("256", "64"):
        s, n = by[(case, "stream")], by[(case, "naive")]
        same = abs(s["checksum"] - n["checksum"]) <= 1e-4 * max(1.0, abs(n["checksum"]))
        lines.append(f"| {s['size']}x{s['size']} | {s['seconds'] / n['seconds']:.2f} | "
                     f"{s['peak_mib'] / n['peak_mib']:.2f} | {s['increment_mib'] / n['increment_mib']:.2f} | "
                     f"{'yes' if same else 'NO'} (checksum {s['checksum']:.4g} vs {n['checksum']:.4g}) |")
    lines += ["", "Target: peak memory <= 0.25 x the naive path at 256 x 256 (increment column: what the "
              "path allocates on top of the process and the network's weights).", "",
              "## CDM and MG maps, time per 64 x 64 slice (cpu-profile networks)", "",
              "| threads | batch | cdm (s / slice; 10 DDIM steps x 2 branches) | mg (s / slice; timesteps) |",
              "|---|---|---|---|"]
    for m in maps:
        lines.append(f"| {m['threads']} | {m['batch']} | {m['cdm_s_per_slice']:.3f} | "
                     f"{m['mg_s_per_slice']:.3f} ({m['mg_timesteps']}) |")
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
