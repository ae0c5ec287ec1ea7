"""CLDF inference: peak memory and time per slice, streamed path vs the naive dense path.

One test slice goes through CLDF's inference (docs/methods/cldf.md) twice, each time in a fresh
subprocess so the peak resident memory of one path cannot hide in the other's:

- **cldf** (what ``cldf.refine`` runs): a-bar_l = mean_t a_{l,t} at native resolution
  (4 CDM forwards, t_ref {1, 10, 50, 100} -> {0, 2, 12, 24}), then chunks of 16,384 pixels:
  grid_sample gather -> pixel decoder (D -> 16 -> 16 -> 16 -> 16 with BatchNorm, eval) ->
  (S^2, 16) buffer; L2-normalise; 2-means (k-means++, 3 restarts, <= 50 iterations); the
  foreground rule;
- **dense** (the naive way): Up every block to S x S at every t, keep the (T, D, S, S) stack,
  mean over t, reshape to (S^2, D), decode all pixels at once, then the same clustering.

Cases: 256 x 256 with the paper-profile CDM (D = 1024, up blocks 1-3) and 64 x 64 with the
cpu-profile CDM (D = 112, all blocks).  Peak RSS is the kernel's high-water mark (VmHWM)
after it was reset (``/proc/self/clear_refs``) once the networks were built; "increment"
subtracts the resident size at that moment.  Networks are randomly initialised: time and
memory do not depend on the weights.  Target: increment of the cldf path <= 0.25 x the
dense path at 256 x 256.

    python benchmarks/perf_cldf.py [--threads 1] [--out benchmarks/results/perf_cldf.md]
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

ROOT = Path(__file__).resolve().parents[1]
CASES = {"256": ("paper", 256), "64": ("cpu", 64)}
T_REF = [1, 10, 50, 100]


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # MiB
    raise KeyError(field)


def run_path(case: str, path: str, threads: int) -> dict:
    """One slice through one path, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from wsss_bench.nn import cldf
    from wsss_bench.nn import diffusion as dif
    from wsss_bench.nn import diffusion_features as dfeat
    from wsss_bench.profiles import load_profile

    torch.set_num_threads(threads)
    prof_name, size = CASES[case]
    prof = load_profile(prof_name)
    unet = dif.build_cdm(prof.cdm_unet, 4, seed=0).eval().requires_grad_(False)
    blocks = dfeat.select_blocks(prof.cldf.feature_blocks, prof.cdm_unet, size)
    dim = dfeat.feature_dim(prof.cdm_unet, blocks)
    ts = dif.match(T_REF)
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, 4, size, size, generator=g) for _ in ts]
    image = torch.rand(4, size, size, generator=g)
    seed_fg = torch.zeros(1, size * size, dtype=torch.bool)
    seed_fg[0, : size * size // 10] = True  # any fixed seed set: the rule's cost is what counts
    score = torch.rand(1, size * size, generator=g)
    torch.manual_seed(0)
    decoder = cldf.PixelDecoder(dim).eval()
    restarts = int(load_profile("paper").cldf.kmeans_restarts)

    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    base = _status("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        if path == "cldf":
            acts = dfeat.mean_activations(unet, image[None], ts, noises, blocks)
            emb = cldf.embed_stream(dfeat.stream_from(acts, size, dfeat.DEFAULT_CHUNK), size * size, decoder)
        else:  # dense: (T, D, S, S) features, mean, then every pixel through the decoder at once
            labels = torch.ones(1, dtype=torch.long)
            per_t = []
            for t, eps in zip(ts, noises):
                tt = dif.timesteps(t, 1)
                xt = dif.add_noise(image[None] * 2 - 1, eps, tt)
                acts = dfeat.block_activations(unet, xt, tt, labels, blocks)
                per_t.append(torch.cat([F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)
                                        for a in acts], dim=1))  # (1, D, S, S)
            feats = torch.stack(per_t).mean(0)[0]  # (D, S, S)
            emb = decoder(feats.reshape(dim, -1).t().contiguous())  # (S^2, 16)
        t_embed = time.perf_counter() - t0
        mask = cldf.segment(emb[None], seed_fg, score, seeds=[0], restarts=restarts)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"case": case, "path": path, "size": size, "dim": dim, "blocks": blocks, "seconds": seconds,
            "embed_seconds": t_embed, "kmeans_seconds": seconds - t_embed, "baseline_mib": base, "peak_mib": peak,
            "increment_mib": peak - base, "emb_checksum": float(emb.double().abs().sum()),
            "mask_pixels": int(mask.sum())}


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


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "wsss_bench/nn/cldf.py",
                                "wsss_bench/nn/diffusion_features.py", "benchmarks/perf_cldf.py"],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
        return sha + (" (+ uncommitted changes to the measured files)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each measured process")
    ap.add_argument("--cases", nargs="+", default=["256", "64"], choices=sorted(CASES))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "perf_cldf.md")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_path(args.child[0], args.child[1], int(args.child[2]))))
        return

    load0 = os.getloadavg()
    t_start = time.time()
    rows = []
    for case in args.cases:
        for path in ("cldf", "dense"):
            r = _child([case, path, str(args.threads)])
            rows.append(r)
            print(f"{case} {path}: {r['seconds']:.2f}s, peak {r['peak_mib']:.0f} MiB (+{r['increment_mib']:.0f})",
                  flush=True)
    load1 = os.getloadavg()
    by = {(r["case"], r["path"]): r for r in rows}
    cmd = " ".join(["python benchmarks/perf_cldf.py", *sys.argv[1:]])
    lines = [
        "# perf_cldf: CLDF inference, streamed path vs naive dense path",
        "",
        f"- command: `{cmd}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(t_start))}; wall {time.time() - t_start:.0f}s",
        f"- machine: {_machine()}",
        f"- git: {_git_sha()}",
        f"- load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} (the cores are shared with other jobs)",
        f"- {args.threads} thread(s) per measured process, each path in its own process; random-init networks; "
        f"one slice per path",
        "",
        "cldf path (what `cldf.refine` does per slice): mean over t of the CDM up-block outputs at native "
        "resolution, then 16,384-pixel chunks: grid_sample gather -> pixel decoder (D -> 16 x 4, BatchNorm, eval) "
        "-> (S^2, 16) buffer; L2-normalise; 2-means (k-means++, 3 restarts, <= 50 iterations) and the foreground "
        "rule. Dense path: Up every block to S x S at every t, keep the (T, D, S, S) stack, mean, decode all "
        "S^2 rows at once, same clustering. Timesteps t_ref {1, 10, 50, 100} -> {0, 2, 12, 24}.",
        "",
        "| slice | profile CDM | D | path | time (s) | features + decoder (s) | 2-means (s) | peak RSS (MiB) | "
        "peak - resident before (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['size']}x{r['size']} | {CASES[r['case']][0]} | {r['dim']} | {r['path']} | "
                     f"{r['seconds']:.2f} | {r['embed_seconds']:.2f} | {r['kmeans_seconds']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['increment_mib']:.0f} |")
    lines += ["", "| slice | time ratio (cldf / dense) | peak RSS ratio | increment ratio | embeddings equal | "
                  "target (increment <= 0.25x at 256) |", "|---|---|---|---|---|---|"]
    for case in args.cases:
        s, n = by[(case, "cldf")], by[(case, "dense")]
        same = abs(s["emb_checksum"] - n["emb_checksum"]) <= 1e-4 * max(1.0, abs(n["emb_checksum"]))
        ratio = s["increment_mib"] / n["increment_mib"]
        target = ("met" if ratio <= 0.25 else "NOT met") if case == "256" else "-"
        lines.append(f"| {s['size']}x{s['size']} | {s['seconds'] / n['seconds']:.2f} | "
                     f"{s['peak_mib'] / n['peak_mib']:.2f} | {ratio:.2f} | "
                     f"{'yes' if same else 'NO'} (checksum {s['emb_checksum']:.4g} vs {n['emb_checksum']:.4g}) | "
                     f"{target} |")
    lines += ["", "Increment = what the path allocates on top of the process and the networks' weights. "
              "The 2-means runs on the same (S^2, 16) embeddings in both paths, so its cost is shared; "
              "the difference is the feature path."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
