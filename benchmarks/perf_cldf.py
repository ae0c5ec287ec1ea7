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

**Decoders, cached vs streamed** (``--decoders brats flare21-kidney``): one CLDF decoder's
training and inference on a task's cpu-profile data, once with the frozen backbone run on
every batch (streamed, the paper profile) and once from the feature cache (cldf.feature_cache,
the cpu and smoke profiles), plus the cache's build time and size.  Each task runs in a fresh
process with ``--threads`` threads.  The CDM is randomly initialised (time does not depend on
the weights) and the seeds are the ground-truth foreground (fg) and its complement (bg), so
every batch selects as many pixels as the real seeds' caps allow.  Training runs the profile's
full schedule (epochs x label-1 training slices / 4); inference is timed on ``--infer-slices``
test slices and scaled to the whole test split.

    python benchmarks/perf_cldf.py --decoders brats flare21-kidney --out benchmarks/results/perf_cldf_cache.md
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


def run_decoders(task: str, threads: int, cache_dir: str, infer_slices: int, streamed_iters: int = 0) -> dict:
    """One decoder trained and applied streamed and cached on ``task`` (cpu profile), in this process."""
    import tempfile

    import numpy as np
    import torch

    from wsss_bench.nn import backbone as nb
    from wsss_bench.nn import cldf
    from wsss_bench.nn import diffusion as dif
    from wsss_bench.nn import diffusion_features as dfeat
    from wsss_bench.nn.training import IterationBatches, mix
    from wsss_bench.plugins import load_plugins
    from wsss_bench.running.runner import RunConfig, Session

    torch.set_num_threads(threads)
    session = Session(RunConfig(profile="cpu", device="cpu", cache_dir=Path(cache_dir)), host=load_plugins())
    ctx = session.context(task, 0)
    prof, data = ctx.profile, ctx.task_data  # a benchmark: the seeds are the truth (not a plugin)
    size, cfg = int(data.image_size), prof.cldf
    unet = dif.build_cdm(prof.cdm_unet, int(ctx.task.channels), seed=0).eval().requires_grad_(False)
    blocks = dfeat.select_blocks(cfg.feature_blocks, prof.cdm_unet, size)
    dim = dfeat.feature_dim(prof.cdm_unet, blocks)
    ts = dif.match(T_REF)
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, int(ctx.task.channels), size, size, generator=g) for _ in ts]

    def activations(images):
        return dfeat.mean_activations(unet, images.float(), ts, noises, blocks, profile=prof)

    train = data.split("train")
    rows = train[data.labels[train] == 1]
    test = data.split("test")
    pos_of = {int(r): k for k, r in enumerate(rows)}
    fg_all = torch.from_numpy(data.masks(rows))

    def seeds_for(b):
        fg = fg_all[[pos_of[int(r)] for r in b.index]]
        return fg, ~fg

    epochs, batch = int(cfg.epochs), int(prof.common.cldf_batch)
    out: dict = {"task": task, "dim": dim, "train_slices": int(len(rows)), "test_slices": int(len(test)),
                 "threads": threads}
    infer = test[:infer_slices]

    def train(gather, iters):
        with tempfile.TemporaryDirectory(prefix="perf-cldf-") as work:
            torch.manual_seed(0)
            dec = cldf.PixelDecoder(dim)
            batches = IterationBatches(data, rows, batch, 1, "cpu")
            t0, c0 = time.perf_counter(), time.process_time()
            weights, _ = cldf.train_decoder(dec, batches, seeds_for, gather, iters, seed=1, work=Path(work),
                                            fg_cap=int(cfg.fg_cap), bg_per_batch=int(cfg.bg_per_batch))
            return dec, weights, time.perf_counter() - t0, time.process_time() - c0

    full = IterationBatches(data, rows, batch, 1, "cpu").epochs(epochs)
    n_cmp = min(full, streamed_iters) if streamed_iters > 0 else full
    out["compare_iterations"] = n_cmp

    def one(name, gather, stream_of):
        dec, weights, t_train, c_train = train(gather, n_cmp)
        iters = n_cmp
        if name == "cached" and n_cmp < full:  # the cached path also runs (and is timed on) the full schedule
            _, _, t_train, c_train = train(gather, full)
            iters = full
        # streamed with --streamed-iters: scaled to the full schedule; the standardisation's 16
        # batches cost about one step each and are paid once
        scale = (full + cldf.STANDARDISE_BATCHES) / (iters + cldf.STANDARDISE_BATCHES)
        t_train, c_train = t_train * scale, c_train * scale
        dec.load_state_dict(weights)
        dec.eval()
        t0, c0 = time.perf_counter(), time.process_time()
        masks = []
        for b in data.batches(infer, 32):
            emb = torch.stack([cldf.embed_stream(stream_of(img, int(r)), size * size, dec)
                               for img, r in zip(b.images, b.index)])
            fg = torch.from_numpy(data.masks(b.index)).reshape(len(b), -1)
            masks.append(cldf.segment(emb, fg, fg.float(), [mix(7, int(r)) for r in b.index],
                                      restarts=int(cfg.kmeans_restarts)))
        t_infer, c_infer = time.perf_counter() - t0, time.process_time() - c0
        out[name] = {"iterations": full, "timed_iterations": iters, "train_s": t_train, "train_cpu_s": c_train,
                     "infer_s_measured": t_infer, "infer_cpu_s_task": c_infer / len(infer) * len(test),
                     "infer_s_per_slice": t_infer / len(infer),
                     "infer_s_task": t_infer / len(infer) * len(test)}
        out[name]["decoder_s"] = t_train + out[name]["infer_s_task"]
        out[name]["decoder_cpu_s"] = c_train + out[name]["infer_cpu_s_task"]
        return weights, torch.cat(masks)

    w_s, m_s = one("streamed", lambda b, c: dfeat.gather_from(activations(b.images), c, size),
                   lambda img, r: dfeat.stream_from(activations(img[None]), size, dfeat.DEFAULT_CHUNK))
    union = np.union1d(rows, test)
    with tempfile.TemporaryDirectory(prefix="perf-cldf-cache-") as work:
        t0, c0 = time.perf_counter(), time.process_time()
        meta = nb.build_activation_cache(Path(work), activations, data.batches(union, 16), union)
        out["cache"] = {"build_s": time.perf_counter() - t0, "build_cpu_s": time.process_time() - c0,
                        "slices": int(len(union)), "bytes": meta["bytes"],
                        "bytes_per_slice": meta["bytes_per_slice"]}
        feats = nb.CachedActivations(Path(work), size)
        w_c, m_c = one("cached", lambda b, c: feats.gather(np.asarray(b.index), c),
                       lambda img, r: feats.stream(r, dfeat.DEFAULT_CHUNK))
    out["max_rel_weight_diff"] = max(float((w_c[k].float() - w_s[k].float()).abs().max()
                                           / max(1e-12, float(w_s[k].float().abs().max()))) for k in w_s)
    out["mask_pixels_differing"] = int((m_c != m_s).sum())
    out["mask_pixels"] = int(m_s.sum())
    return out


def textbook_supcon(z, labels, tau):
    """The loss as first written (dense (N, N) masks, autograd through every step): the "before"."""
    import torch

    n = z.shape[0]
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(1e-8)
    s = zn @ zn.t() / float(tau)
    eye = torch.eye(n, dtype=torch.bool)
    s = s.masked_fill(eye, float("-inf"))
    s = s - s.max(dim=1, keepdim=True).values.detach()
    log_denom = torch.logsumexp(s, dim=1)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    has = n_pos > 0
    pos_sum = torch.where(pos, s, torch.zeros_like(s)).sum(1)
    return (-(pos_sum[has] / n_pos[has] - log_denom[has])).mean()


def supcon_report(args) -> None:
    """--supcon: one SupCon step (forward + backward, 1 thread) textbook vs current, CPU time."""
    import torch

    from wsss_bench.nn import cldf

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    lines = ["# perf_cldf --supcon: one SupCon step (forward + backward), textbook form vs the current form", "",
             f"- command: `{' '.join(['python benchmarks/perf_cldf.py', *sys.argv[1:]])}`",
             f"- machine: {_machine()}", f"- git: {_git_sha()}",
             f"- load average at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} (shared machine); CPU time of "
             f"this process, {args.threads} thread(s), median of 7 after 2 warm-up steps; 16-dim embeddings, 30% fg",
             "", "| pixels N | textbook (s) | current (s) | speed-up | max abs loss diff | max abs grad diff |",
             "|---|---|---|---|---|---|"]
    for n in (1000, 3000, 4000):
        g = torch.Generator().manual_seed(n)
        z = torch.randn(n, 16, generator=g)
        labels = (torch.rand(n, generator=g) < 0.3).long()
        times, out = {}, {}
        for name, fn in (("textbook", textbook_supcon), ("current", cldf.supcon_loss)):
            ts = []
            for k in range(9):
                x = z.clone().requires_grad_(True)
                c0 = time.process_time()
                loss = fn(x, labels, 0.1)
                loss.backward()
                ts.append(time.process_time() - c0)
            times[name] = sorted(ts[2:])[3]
            out[name] = (float(loss), x.grad)
        dl = abs(out["textbook"][0] - out["current"][0])
        dg = float((out["textbook"][1] - out["current"][1]).abs().max())
        lines.append(f"| {n} | {times['textbook']:.3f} | {times['current']:.3f} | "
                     f"{times['textbook'] / times['current']:.1f}x | {dl:.1e} | {dg:.1e} |")
        print(lines[-1], flush=True)
    write_result(args.out, lines)


def _child(args: list[str], threads: int | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads) if threads else args[-1])
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
                                "wsss_bench/nn/diffusion_features.py", "wsss_bench/nn/backbone.py",
                                "benchmarks/perf_cldf.py"],
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
    ap.add_argument("--decoders", nargs="+", metavar="TASK",
                    help="instead: time one CLDF decoder cached vs streamed on these tasks (cpu profile)")
    ap.add_argument("--supcon", action="store_true", help="instead: time one SupCon step, textbook vs current form")
    ap.add_argument("--cache-dir", default="/tmp/perf-cldf-cache", help="data cache of the --decoders runs")
    ap.add_argument("--infer-slices", type=int, default=48, help="test slices timed at inference (--decoders)")
    ap.add_argument("--streamed-iters", type=int, default=0,
                    help="--decoders: time the streamed training on this many iterations and scale to the full "
                         "schedule (0 = run it all); weights are compared after this many iterations")
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "decoders":
            print(json.dumps(run_decoders(args.child[1], int(args.child[2]), args.child[3], int(args.child[4]),
                                          int(args.child[5]))))
        else:
            print(json.dumps(run_path(args.child[0], args.child[1], int(args.child[2]))))
        return
    if args.decoders:
        decoders_report(args)
        return
    if args.supcon:
        supcon_report(args)
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
    write_result(args.out, lines)


def decoders_report(args) -> None:
    """Run --decoders per task in a fresh process and write the markdown result."""
    load0, t_start = os.getloadavg(), time.time()
    rows = []
    for task in args.decoders:
        r = _child(["decoders", task, str(args.threads), args.cache_dir, str(args.infer_slices),
                    str(args.streamed_iters)], args.threads)
        rows.append(r)
        print(f"{task}: streamed {r['streamed']['decoder_cpu_s']:.1f}s CPU, cached {r['cached']['decoder_cpu_s']:.1f}s CPU, "
              f"cache build {r['cache']['build_s']:.1f}s, {r['cache']['bytes'] / 2**20:.0f} MiB", flush=True)
    load1 = os.getloadavg()
    cmd = " ".join(["python benchmarks/perf_cldf.py", *sys.argv[1:]])
    lines = [
        "# perf_cldf --decoders: one CLDF decoder, streamed features vs the feature cache (cpu profile)",
        "",
        f"- command: `{cmd}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(t_start))}; wall {time.time() - t_start:.0f}s",
        f"- machine: {_machine()}",
        f"- git: {_git_sha()}",
        f"- load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}: the machine was shared with other developers' jobs, "
        f"so absolute times carry that contention",
        f"- {args.threads} thread(s), each task in its own process; random-init cpu-profile CDM (D = "
        f"{rows[0]['dim'] if rows else '?'}), seeds = ground truth fg / its complement; training = the profile's "
        f"full schedule" + (f" (streamed: timed on its first {args.streamed_iters} iterations and scaled to the "
                            f"full schedule; weights compared after those iterations)" if args.streamed_iters else "")
        + f"; inference timed on {args.infer_slices} test slices and scaled to the test split",
        "",
        "Wall = elapsed time; CPU = the process's CPU time (one thread: what the work costs without the "
        "other jobs' contention, the better number on a shared machine).",
        "",
        "| task | label-1 train slices | iterations | path | training wall (s) | training CPU (s) | "
        "inference per slice, wall (s) | inference, test split, CPU (s) | per decoder wall (s) | "
        "per decoder CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for path in ("streamed", "cached"):
            p = r[path]
            lines.append(f"| {r['task']} | {r['train_slices']} | {p['iterations']} | {path} | {p['train_s']:.1f} | "
                         f"{p['train_cpu_s']:.1f} | {p['infer_s_per_slice']:.3f} | {p['infer_cpu_s_task']:.1f} | "
                         f"{p['decoder_s']:.1f} | {p['decoder_cpu_s']:.1f} |")
    lines += ["", "| task | cache slices (label-1 train + test) | build wall (s) | build CPU (s) | size (MiB) | "
                  "per slice (MiB) | CPU speed-up per decoder | break-even decoders (CPU) | max rel. weight diff | "
                  "mask pixels differing |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, st, ca = r["cache"], r["streamed"], r["cached"]
        saved = st["decoder_cpu_s"] - ca["decoder_cpu_s"]
        lines.append(f"| {r['task']} | {c['slices']} | {c['build_s']:.1f} | {c['build_cpu_s']:.1f} | "
                     f"{c['bytes'] / 2**20:.0f} | {c['bytes_per_slice'] / 2**20:.2f} | "
                     f"{st['decoder_cpu_s'] / ca['decoder_cpu_s']:.1f}x | "
                     f"{c['build_cpu_s'] / saved if saved > 0 else float('inf'):.2f} | {r['max_rel_weight_diff']:.1e} | "
                     f"{r['mask_pixels_differing']} of {r['mask_pixels']} |")
    lines += ["", "The cache is built once per task and backbone and shared by every decoder of that task "
              "(Table 3's variants, Table 2's rows of one backbone, Fig. 4's sizes). Weight and mask differences "
              "come from the frozen forward's batch-size dependence (~1e-7 in the features), amplified by SGD "
              "at lr 1.0."]
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
