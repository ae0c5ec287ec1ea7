"""How fast are our classifier CAMs next to pytorch-grad-cam 1.5.7 and torchcam 0.5.0?

One process, one model, one set of inputs: a random-init timm ResNet18 (full width, 4 input
channels, 2 classes, output stride 32), CPU, 2 threads by default, target layer ``layer4``.
Per image size (64 and 128 by default) it times, interleaved round-robin so that load
drifts hit every method alike, and reports medians:

- our GradCAM, GradCAM++, LayerCAM (one layer), ScoreCAM (paper and library variants, and
  the library variant with the constant-channel shortcut switched off);
- the same methods in pytorch-grad-cam 1.5.7 and torchcam 0.5.0 (where they exist);
- the floors: one plain forward of the batch (inference mode); one plain forward+backward
  (what a naive gradient CAM pays); and, for ScoreCAM, B*K plain forward passes of masked
  inputs (K = channels of the target layer) in chunks of ``--chunk``, in inference mode.

``OMP_WAIT_POLICY=PASSIVE`` is set unless given (stable timings on a shared machine).
Every CAM call returns (B, S, S) maps at input size: torchcam's maps are upsampled
(bilinear) inside the timed call, grad-cam resizes itself.  Peers get the same chunk for
their masked forwards (grad-cam's ``batch_size``, torchcam's ``batch_size``); grad-cam's
tqdm bars are silenced.  ScoreCAM is timed per image, on ``--score-images`` images (it
loops over chunks of masked inputs, so the per-image cost does not depend on the batch
once a chunk is full).

Targets (the issue): GradCAM and LayerCAM <= 0.9 x torchcam and <= 1.15 x one plain
forward; ScoreCAM <= 0.8 x grad-cam, <= 0.85 x torchcam and <= 1.1 x its floor.

    python benchmarks/perf_cams.py                       # writes benchmarks/results/perf_cams.md
    python benchmarks/perf_cams.py --sizes 64 --reps 3 --score-reps 1 --out /tmp/quick.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # grad-cam's ScoreCAM draws a bar per chunk
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine, spinning threads
# of a busy neighbour turn every parallel region into a lottery (46 ms forwards measured at
# 70-1900 ms); passive waiting keeps the comparisons stable.  Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wsss_bench._compat import ensure_torchvision, import_timm  # noqa: E402

ensure_torchvision()

from wsss_bench_plugins import gradcam as our_gradcam  # noqa: E402
from wsss_bench_plugins import gradcampp as our_gradcampp  # noqa: E402
from wsss_bench_plugins import layercam as our_layercam  # noqa: E402
from wsss_bench_plugins import scorecam as our_scorecam  # noqa: E402

TARGETS = {
    # (method, reference): maximum ratio ours / reference
    ("GradCAM", "torchcam"): 0.9,
    ("GradCAM", "forward"): 1.15,
    ("LayerCAM", "torchcam"): 0.9,
    ("LayerCAM", "forward"): 1.15,
    ("ScoreCAM", "grad-cam"): 0.8,
    ("ScoreCAM", "torchcam"): 0.85,
    ("ScoreCAM", "floor"): 1.1,
}


def build_model(in_chans: int = 4, seed: int = 0) -> torch.nn.Module:
    timm = import_timm()
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, in_chans=in_chans, num_classes=2).eval()


# --------------------------------------------------------------------------- the contenders
def ours(model, layer, chunk):
    def gradcam(x):
        return our_gradcam.GradCAMExtractor(model, layer)(x)

    def gradcampp(x):
        return our_gradcampp.GradCAMPPExtractor(model, layer)(x)

    def layercam(x):
        return our_layercam.LayerCAMExtractor(model, layer)(x)

    def scorecam(variant, skip=True):
        def run(x):
            ext = our_scorecam.ScoreCAMExtractor(model, layer, variant=variant, chunk=chunk)
            ext.skip_constant = skip
            return ext(x)
        return run

    return {"GradCAM": gradcam, "GradCAM++": gradcampp, "LayerCAM": layercam,
            "ScoreCAM": scorecam("official"), "ScoreCAM (library)": scorecam("library"),
            "ScoreCAM (library, no skip)": scorecam("library", skip=False)}


def grad_cam_lib(model, layer, chunk):
    import pytorch_grad_cam as gc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    target_layer = model.get_submodule(layer)

    def make(cls, **attrs):
        def run(x):
            cam = cls(model, [target_layer])
            for k, v in attrs.items():
                setattr(cam, k, v)
            try:
                return cam(x, targets=[ClassifierOutputTarget(1)] * len(x))
            finally:
                cam.activations_and_grads.release()
        return run

    return {"GradCAM": make(gc.GradCAM), "GradCAM++": make(gc.GradCAMPlusPlus),
            "LayerCAM": make(gc.LayerCAM), "ScoreCAM (library)": make(gc.ScoreCAM, batch_size=chunk)}


def torchcam_lib(model, layer, chunk):
    from torchcam import methods as tc

    def make(cls, inference=False, **kwargs):
        def run(x):
            ext = cls(model, layer, input_shape=tuple(x.shape[1:]), **kwargs)
            try:
                if inference:  # ScoreCAM needs no graph for its first forward
                    with torch.inference_mode():
                        scores = model(x)
                    cams = ext(class_idx=1)
                else:
                    scores = model(x)
                    cams = ext(class_idx=1, scores=scores)
                return F.interpolate(cams[0][:, None], size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)[:, 0]
            finally:
                ext.remove_hooks()
        return run

    return {"GradCAM": make(tc.GradCAM), "GradCAM++": make(tc.GradCAMpp), "LayerCAM": make(tc.LayerCAM),
            "ScoreCAM (torchcam)": make(tc.ScoreCAM, inference=True, batch_size=chunk)}


def floors(model, layer, chunk):
    k = _layer_channels(model, layer)

    def forward(x):
        with torch.inference_mode():
            return model(x)

    def forward_backward(x):
        model.zero_grad(set_to_none=True)
        model(x)[:, 1].sum().backward()
        model.zero_grad(set_to_none=True)

    def masked_forwards(channels_last):
        def run(x):
            """B*K forwards of masked inputs, ``chunk`` at a time, inference mode."""
            n = len(x) * k
            gen = torch.Generator().manual_seed(0)
            masks = torch.rand(min(chunk, n), 1, *x.shape[-2:], generator=gen)
            with torch.inference_mode():
                batch = x[torch.arange(len(masks)) % len(x)] * masks  # one chunk of masked inputs
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                for start in range(0, n, chunk):
                    model(batch[: min(chunk, n - start)])
        return run

    return {"forward": forward, "forward+backward": forward_backward,
            "ScoreCAM floor": masked_forwards(False), "ScoreCAM floor (channels-last)": masked_forwards(True)}


def _layer_channels(model, layer) -> int:
    seen = {}

    def hook(module, inputs, output):
        seen["k"] = output.shape[1]

    handle = model.get_submodule(layer).register_forward_hook(hook)
    with torch.inference_mode():
        model(torch.zeros(1, model.conv1.in_channels, 64, 64))
    handle.remove()
    return int(seen["k"])


# --------------------------------------------------------------------------- timing
def time_round_robin(calls: dict[str, tuple[Callable, torch.Tensor]], reps: int,
                     warm_full: bool = True) -> dict[str, dict[str, list[float]]]:
    """Warm each call up, then ``reps`` rounds, each running every call once in turn.

    Returns per call the wall-clock times and the process CPU times (all threads) of the
    rounds.  CPU time is the load-robust check: a busy neighbour stretches wall time, but
    with passive OpenMP waiting it barely changes the work this process does.
    """
    for fn, x in calls.values():
        fn(x if warm_full else x[:1])
    out = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(reps):
        for name, (fn, x) in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(x)
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
    return out


FRESH_CODE = """
import json, os, statistics, sys, time
sys.path.insert(0, {root!r})
import torch
from benchmarks.perf_cams import build_model, ours, torchcam_lib
torch.set_num_threads({threads})
model = build_model()
x = torch.rand({batch}, 4, {size}, {size}, generator=torch.Generator().manual_seed({size}))
mine, tc = ours(model, {layer!r}, 1), torchcam_lib(model, {layer!r}, 1)
def forward(x):
    with torch.inference_mode():
        model(x)
calls = {{"forward": forward, "ours GradCAM": mine["GradCAM"], "torchcam GradCAM": tc["GradCAM"],
         "ours LayerCAM": mine["LayerCAM"], "torchcam LayerCAM": tc["LayerCAM"]}}
out = {{name: [] for name in calls}}
for fn in calls.values():
    fn(x)
for _ in range({reps}):
    for name, fn in calls.items():
        t0 = time.perf_counter(); fn(x); out[name].append(time.perf_counter() - t0)
print(json.dumps({{name: statistics.median(v) for name, v in out.items()}}))
"""


def fresh_process(size: int, args) -> dict[str, float]:
    """GradCAM and LayerCAM against torchcam in a new process where no backward ever ran.

    torchcam records the whole forward graph; how much that costs depends on the state of
    the memory allocator, which any earlier backward (a training step, grad-cam's call)
    warms up.  This isolates the cold case.
    """
    import json
    import subprocess

    code = FRESH_CODE.format(root=str(ROOT), threads=args.threads, batch=args.batch, size=size,
                             layer=args.layer, reps=args.reps)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    from wsss_bench.running.manifest import cpu_model

    return cpu_model()


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "timm", "grad-cam", "torchcam"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} missing")
    return ", ".join(parts)


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


SCORE_LABELS = {"ours ScoreCAM": "ours scorecam[variant=official]",
                "ours ScoreCAM (library)": "ours scorecam[variant=library]",
                "ours ScoreCAM (library, no skip)": "ours scorecam[variant=library], shortcut off"}


def section(med: dict[str, float], n_score: int, k: int) -> tuple[list[str], list[tuple[str, str, float]]]:
    """The two tables of one image size (from medians of one clock) and the target ratios."""
    per_img = {name: med[name] / n_score for name in med if "ScoreCAM" in name}
    fwd = med["forward"]
    rows = ["| method (batch) | ours (ms) | grad-cam 1.5.7 (ms) | torchcam 0.5.0 (ms) | ours / grad-cam | "
            "ours / torchcam | ours / plain forward |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for name in ("GradCAM", "GradCAM++", "LayerCAM"):
        o, g, t = med[f"ours {name}"], med[f"grad-cam {name}"], med[f"torchcam {name}"]
        rows.append(f"| {name} | {fmt_ms(o)} | {fmt_ms(g)} | {fmt_ms(t)} | {o / g:.2f} | {o / t:.2f} | "
                    f"{o / fwd:.2f} |")
        if name != "GradCAM++":
            ratios += [(name, "torchcam", o / t), (name, "forward", o / fwd)]
    rows += [f"| plain forward | {fmt_ms(fwd)} | | | | | 1.00 |",
             f"| plain forward+backward | {fmt_ms(med['forward+backward'])} | | | | | "
             f"{med['forward+backward'] / fwd:.2f} |", "",
             "| ScoreCAM, per image | ms | / grad-cam (library) | / torchcam | / floor |",
             "|---|---:|---:|---:|---:|"]
    g, t, f = (per_img["grad-cam ScoreCAM (library)"], per_img["torchcam ScoreCAM"], per_img["ScoreCAM floor"])
    for name, label in SCORE_LABELS.items():
        o = per_img[name]
        rows.append(f"| {label} | {fmt_ms(o)} | {o / g:.2f} | {o / t:.2f} | {o / f:.2f} |")
        if "no skip" not in name:
            ratios += [(name, "grad-cam", o / g), (name, "torchcam", o / t), (name, "floor", o / f)]
    rows += [f"| grad-cam ScoreCAM | {fmt_ms(g)} | 1.00 | {g / t:.2f} | {g / f:.2f} |",
             f"| torchcam ScoreCAM | {fmt_ms(t)} | {t / g:.2f} | 1.00 | {t / f:.2f} |",
             f"| floor: {k} plain masked forwards | {fmt_ms(f)} | {f / g:.2f} | {f / t:.2f} | 1.00 |"]
    c = per_img["ScoreCAM floor (channels-last)"]
    rows.append(f"| the same, inputs channels-last | {fmt_ms(c)} | {c / g:.2f} | {c / t:.2f} | {c / f:.2f} |")
    return rows, ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15, help="rounds for the gradient methods and floors")
    ap.add_argument("--score-reps", type=int, default=3, help="rounds for ScoreCAM")
    ap.add_argument("--score-images", type=int, nargs="+", default=[16, 4],
                    help="images ScoreCAM is timed on, per size (last value repeats)")
    ap.add_argument("--chunk", type=int, default=128, help="masked inputs per forward (cpu profile: 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--no-fresh", dest="fresh", action="store_false",
                    help="skip the fresh-process GradCAM/LayerCAM vs torchcam check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "perf_cams.md"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = build_model()
    k = _layer_channels(model, args.layer)
    load_before = os.getloadavg()
    started = time.time()
    mine, gc, tc, fl = (f(model, args.layer, args.chunk) for f in (ours, grad_cam_lib, torchcam_lib, floors))

    sections = []
    summary = []  # (size, method, reference, wall ratio, cpu ratio)
    for si, size in enumerate(args.sizes):
        gen = torch.Generator().manual_seed(size)
        x = torch.rand(args.batch, 4, size, size, generator=gen)
        n_score = args.score_images[min(si, len(args.score_images) - 1)]
        xs = x[:n_score]

        fast = {"forward": (fl["forward"], x), "forward+backward": (fl["forward+backward"], x)}
        for name in ("GradCAM", "GradCAM++", "LayerCAM"):
            fast[f"ours {name}"] = (mine[name], x)
            fast[f"grad-cam {name}"] = (gc[name], x)
            fast[f"torchcam {name}"] = (tc[name], x)
        slow = {"ScoreCAM floor": (fl["ScoreCAM floor"], xs),
                "ScoreCAM floor (channels-last)": (fl["ScoreCAM floor (channels-last)"], xs),
                "ours ScoreCAM": (mine["ScoreCAM"], xs),
                "ours ScoreCAM (library)": (mine["ScoreCAM (library)"], xs),
                "ours ScoreCAM (library, no skip)": (mine["ScoreCAM (library, no skip)"], xs),
                "grad-cam ScoreCAM (library)": (gc["ScoreCAM (library)"], xs),
                "torchcam ScoreCAM": (tc["ScoreCAM (torchcam)"], xs)}
        print(f"size {size}: timing gradient methods ({args.reps} rounds) ...", flush=True)
        times = time_round_robin(fast, args.reps)
        print(f"size {size}: timing ScoreCAM on {n_score} images ({args.score_reps} rounds) ...", flush=True)
        times.update(time_round_robin(slow, args.score_reps, warm_full=False))

        ext = our_scorecam.ScoreCAMExtractor(model, args.layer, variant="library", chunk=args.chunk)
        ext(xs)
        skipped = ext.last_stats[0]["skipped"]
        dead = skipped / ext.last_stats[0]["channels"]

        med = {clock: {name: statistics.median(v[clock]) for name, v in times.items()} for clock in ("wall", "cpu")}
        wall_rows, wall_ratios = section(med["wall"], n_score, k)
        cpu_rows, cpu_ratios = section(med["cpu"], n_score, k)
        summary += [(size, m, ref, rw, rc) for (m, ref, rw), (_, _, rc) in zip(wall_ratios, cpu_ratios)]
        spread = {name: max(v["wall"]) / statistics.median(v["wall"]) for name, v in times.items()}
        worst = max(spread, key=spread.get)
        rows = [f"### {size} x {size}, batch {args.batch} (ScoreCAM: {n_score} images, chunk {args.chunk})", "",
                f"All-zero layer4 channels (skipped by ScoreCAM) on these inputs: {skipped} of {len(xs) * k} "
                f"({dead:.0%}). Slowest repetition: {worst}, {spread[worst]:.2f}x its median.", "",
                "Wall clock (medians):", "", *wall_rows, "",
                "Process CPU time, both threads (medians):", "", *cpu_rows, ""]
        if args.fresh:
            fresh = fresh_process(size, args)
            f0 = fresh["forward"]
            rows += ["In a fresh process where no backward has run (wall clock, medians; the cold allocator "
                     "case, see the notes):", "",
                     "| method (batch) | ours (ms) | torchcam (ms) | ours / torchcam | ours / plain forward | "
                     "torchcam / plain forward |", "|---|---:|---:|---:|---:|---:|"]
            for name in ("GradCAM", "LayerCAM"):
                o, t = fresh[f"ours {name}"], fresh[f"torchcam {name}"]
                rows.append(f"| {name} | {fmt_ms(o)} | {fmt_ms(t)} | {o / t:.2f} | {o / f0:.2f} | {t / f0:.2f} |")
            rows += [f"| plain forward | {fmt_ms(f0)} | | | 1.00 | |", ""]
        sections.append("\n".join(rows))
        print(sections[-1], flush=True)

    load_after = os.getloadavg()
    target_rows = ["| size | method | reference | ours / reference (wall) | (CPU time) | target | met (wall) |",
                   "|---|---|---|---:|---:|---:|---|"]
    for size, name, ref, wall, cpu in summary:
        base = "ScoreCAM" if name.startswith("ours ScoreCAM") else name
        limit = TARGETS[(base, ref)]
        label = SCORE_LABELS.get(name, name).replace("ours ", "")
        target_rows.append(f"| {size} | {label} | {ref} | {wall:.2f} | {cpu:.2f} | <= {limit} | "
                           f"{'yes' if wall <= limit else 'no'} |")

    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    header = [
        "# Classifier-CAM speed: ours vs pytorch-grad-cam 1.5.7 vs torchcam 0.5.0", "",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, wall {time.time() - started:.0f} s",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"torch threads {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"- load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} (other jobs share the 2 cores)",
        f"- versions: {versions()}",
        f"- model: timm resnet18 (random init, full width, output stride 32), 4 input channels, 2 classes; "
        f"target layer {args.layer} ({k} channels); class 1; CPU float32",
        "- medians over round-robin repetitions; every CAM call returns (B, S, S) maps at input size; "
        "ScoreCAM per image", "",
        "## Targets", "", *target_rows, "",
    ]
    text = "\n".join(header + ["## Details", ""] + [s + "\n" for s in sections])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n".join(target_rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
