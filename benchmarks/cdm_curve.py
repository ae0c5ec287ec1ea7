"""How good is the cpu CDM after N iterations?  A training curve on the validation split.

One CDM is trained with the task's recipe (the profile's ``cdm_unet`` network, ``cdm``
batch and learning rate, ``--lr`` / ``--batch`` to change them) and stopped at each
milestone (``--milestones 1500,3000,6000``).  Training resumes from the previous milestone's
checkpoint, so the curve is one run (the batches and noise of iteration i do not depend on
where training stopped).  An EMA shadow (``--ema``) is kept beside the raw weights, and
each milestone scores both:

- **sample contrast**: 8 label-1 samples from pure noise (100-step deterministic DDIM, the
  loop of diffusion_check.py), mean intensity inside minus outside the brain mask (pixels
  with tissue in >= half of the label-1 training slices); real training slices give the
  target (the issue's goal: >= 80% of it);
- **CDM saliency Dice** on the validation split: ``cdm`` maps (docs/methods/diffusion.md) through the
  protocol's Otsu rule, mean Dice over positive validation slices;
- **CDM-feature probe Dice** on the validation split: the ``cdm`` backbone's features
  (docs/methods/diffusion.md) at 24 foreground and 24 background pixels of each of 96 positive training
  slices, a logistic-regression probe (scikit-learn, standardised features), its p >= 0.5
  mask on every positive validation slice, mean Dice.  A diagnostic of how linearly the
  features separate the target; the training masks are read by this script only.

MG depends on the noisy classifier, not on the CDM, so it is scored once (``--mg``).  The
test split is never read.  Each milestone appends one JSON line to ``--log`` as soon as it
is scored, so an interrupted curve keeps what it measured; ``--report`` turns logs into
the Markdown table of benchmarks/results/cdm_curve.md.

    python benchmarks/cdm_curve.py --tag paper-lr --lr 1e-4 --threads 1 --bf16 --mg
    python benchmarks/cdm_curve.py --report benchmarks/results/cdm_curve_*.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, provenance_lines  # noqa: E402

SOURCES = ["benchmarks/cdm_curve.py", "benchmarks/diffusion_check.py", "wsss_bench/nn/diffusion.py",
           "wsss_bench/nn/diffusion_features.py", "wsss_bench/nn/training.py", "plugins/cdm.py",
           "plugins/cdm_features.py", "wsss_bench/data/phantom_brain.py", "wsss_bench/profiles.toml"]
PROBE_SLICES, PROBE_PIXELS = 96, 24


def fresh_context(base, model, key: str):
    """A new RunContext on ``base``'s data whose shared CDM is ``model`` (own memo, own key)."""
    from wsss_bench.context import RunContext

    # base.base_seed, the run's integer seed (base.seed is the method that derives seeds from it)
    ctx = RunContext(base.task, base.task_data, base.profile, base.base_seed, base.device, base.cache,
                     bf16=base.bf16, host=base.host)
    ctx.provide_model("cdm", model, key=key)
    return ctx


def otsu_dice(ctx, spec: str, split: str) -> tuple[float, float, int]:
    """(mean Dice over positive slices, mean Dice with negatives gated empty, n positive) of ``spec``."""
    import numpy as np
    import torch

    from wsss_bench.maps import otsu_masks
    from wsss_bench.metrics import dice_iou

    idx = np.asarray(ctx.data.split(split))
    maps = np.asarray(ctx.maps(spec, split))
    labels = np.asarray(ctx.task_data.labels)[idx].astype(int)
    gt = ctx.task_data.masks(idx)
    pred = otsu_masks(torch.from_numpy(maps.copy())).numpy()
    pred[labels == 0] = False  # gate = label
    dice, _ = dice_iou(pred, gt)
    return float(dice[labels == 1].mean()), float(dice.mean()), int((labels == 1).sum())


def probe_dice(ctx, seed: int) -> float:
    """Dice of a logistic-regression probe on CDM features (train pixels -> validation slices)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsss_bench.metrics import dice_iou

    data = ctx.task_data
    backbone = ctx.plugin("backbones", "cdm")
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    train = np.asarray(data.split("train"))
    train = train[labels[train] == 1]
    train = np.sort(rng.choice(train, size=min(PROBE_SLICES, len(train)), replace=False))
    feats, ys = [], []
    for start in range(0, len(train), 16):
        chunk = train[start:start + 16]
        b = next(iter(ctx.data.batches(chunk, len(chunk), device="cpu")))
        masks = data.masks(chunk)
        coords = []
        for j, m in enumerate(masks):
            fg, bg = np.flatnonzero(m.ravel()), np.flatnonzero(~m.ravel())
            for pool, y in ((fg, 1), (bg, 0)):
                pick = rng.choice(pool, size=min(PROBE_PIXELS, len(pool)), replace=False)
                coords += [(j, int(p) // m.shape[1], int(p) % m.shape[1]) for p in pick]
                ys += [y] * len(pick)
        with torch.no_grad():
            feats.append(backbone.gather(b.images, torch.tensor(coords, dtype=torch.long)).float().cpu().numpy())
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    probe.fit(np.concatenate(feats), np.asarray(ys))
    val = np.asarray(data.split("val"))
    val = val[labels[val] == 1]
    gt = data.masks(val)
    size = int(data.image_size)
    preds = np.zeros((len(val), size, size), dtype=bool)
    for j, b in enumerate(ctx.data.batches(val, 1, device="cpu")):
        flat = np.zeros(size * size, dtype=bool)
        with torch.no_grad():
            for sl, f in backbone.stream(b.images[0]):
                flat[sl] = probe.predict_proba(f.float().cpu().numpy())[:, 1] >= 0.5
        preds[j] = flat.reshape(size, size)
    dice, _ = dice_iou(preds, gt)
    return float(dice.mean())


def score(base, weights, key: str, args, mask, real_contrast: float) -> dict:
    import torch

    from diffusion_check import ddim_sample, inside_outside
    from wsss_bench.nn.diffusion import build_cdm

    model = build_cdm(dict(base.profile.cdm_unet), base.task.channels)
    model.load_state_dict(weights)
    model.eval().requires_grad_(False)
    t0 = time.perf_counter()
    size, c = int(base.data.image_size), int(base.task.channels)
    s = ddim_sample(model, args.samples, 1, c, size, 100, base.seed("check/sample/1"), base.profile)
    inside, outside = inside_outside(s, mask)
    ctx = fresh_context(base, model, key)
    sal_pos, sal_all, n_pos = otsu_dice(ctx, "cdm", "val")
    probe = probe_dice(ctx, base.seed("curve/probe"))
    return {"contrast": inside - outside, "contrast_fraction": (inside - outside) / real_contrast,
            "saliency_dice_pos": sal_pos, "saliency_dice_all": sal_all, "val_positive": n_pos,
            "probe_dice_pos": probe, "score_seconds": round(time.perf_counter() - t0, 1)}


def run(args) -> None:
    import numpy as np
    import torch

    from diffusion_check import brain_mask, inside_outside
    from wsss_bench.nn.diffusion import build_cdm, train_cdm
    from wsss_bench.nn.training import cpu_state
    from wsss_bench.running.runner import RunConfig, Session

    torch.set_num_threads(args.threads)
    overrides = [f"cdm.lr={args.lr}", f"cdm.ema={args.ema}"] + ([f"cdm.batch={args.batch}"] if args.batch else [])
    # the scoring (CDM maps, features, samples) runs under the session's autocast
    maps_bf16 = args.bf16 and not args.maps_fp32
    cfg = RunConfig(profile=args.profile, device="cpu", cache_dir=args.cache_dir, bf16=maps_bf16,
                    out=Path(f"/tmp/wsss-cdm-curve-{args.tag}"), overrides=overrides)
    session = Session(cfg)
    base = session.context(args.task, args.seed)
    prof = base.profile
    data = base.task_data
    labels = np.asarray(data.labels)
    train = np.asarray(data.split("train"))
    pos = train[labels[train] == 1]
    mask = brain_mask(base.data, pos)
    real = torch.cat([b.images for b in base.data.batches(pos[: args.samples], args.samples, device="cpu")])
    r_in, r_out = inside_outside(real, mask)
    real_contrast = r_in - r_out
    log = Path(args.log or ROOT / "benchmarks" / "results" / f"cdm_curve_{args.tag}.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line).get("iteration") for line in log.read_text().splitlines()} if log.exists() else set()
    command = command_line(argv=sys.argv[1:])
    header = {"kind": "header", "tag": args.tag, "seed": args.seed, "command": command,
              "provenance": provenance_lines(command, profile=args.profile,
                                             data=base.data, sources=SOURCES),
              "recipe": {**dict(prof.cdm), "unet": dict(prof.cdm_unet), "bf16": args.bf16, "maps_bf16": maps_bf16,
                         "threads": args.threads},
              "real_contrast": real_contrast, "val_positive": int((labels[np.asarray(data.split("val"))] == 1).sum())}
    work = args.cache_dir / f"cdm-curve-{args.tag}"
    if args.from_tag:
        # score another run's training again (the same recipe, so the same weights) without
        # training it twice: start from that run's last checkpoint
        src = args.cache_dir / f"cdm-curve-{args.from_tag}"
        if not (src / "checkpoint.safetensors").exists():
            sys.exit(f"cdm_curve: --from-tag {args.from_tag}: no checkpoint in {src}; run that tag first")
        if not work.exists():
            shutil.copytree(src, work)
        header["trained_by"] = args.from_tag
    # a re-scored run trains nothing: its train seconds are the source run's (--from-log), or unknown
    src_secs = {}
    if args.from_log:
        src_secs = {r["iteration"]: r["train_seconds_total"] for r in map(json.loads, args.from_log.read_text().splitlines())
                    if r.get("kind") == "milestone"}
        header["train_seconds_from"] = str(args.from_log)
    if not log.exists():
        log.write_text(json.dumps(header) + "\n")
    model = build_cdm(dict(prof.cdm_unet), base.task.channels, seed=base.seed("init/cdm"))
    train_seconds = 0.0
    for milestone in args.milestones:
        t0 = time.perf_counter()
        weights, info = train_cdm(model, base.data, prof, "cpu", base.seed("train/cdm"), work, flips=base.task.flips,
                                  bf16=args.bf16, iterations=milestone, checkpoint_interval=500)
        train_seconds += time.perf_counter() - t0
        if milestone in done:
            continue
        secs = src_secs.get(milestone) if args.from_tag else round(train_seconds, 1)
        row = {"kind": "milestone", "iteration": milestone, "train_seconds_total": secs,
               "loss_last_window": info["final_loss"], "load": os.getloadavg()[0]}
        row["raw"] = score(base, cpu_state(model), f"curve-{args.tag}-{milestone}-raw", args, mask, real_contrast)
        if args.ema > 0:
            row["ema"] = score(base, weights, f"curve-{args.tag}-{milestone}-ema", args, mask, real_contrast)
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    if args.mg:
        from wsss_bench.nn.noisy_classifier import get_noisy_classifier

        t0 = time.perf_counter()
        get_noisy_classifier(base)
        pos_d, all_d, _ = otsu_dice(base, "mg", "val")
        row = {"kind": "mg", "iteration": "mg", "mg_dice_pos": pos_d, "mg_dice_all": all_d,
               "seconds": round(time.perf_counter() - t0, 1)}
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def projection(curve: dict[str, list[tuple[int, float, float]]]) -> list[str]:
    """Per weight kind: the first milestone whose samples reach 80% of the real contrast, or
    where straight lines through the points (on iterations and on log2 iterations) would
    cross it (extrapolations, printed as such; they need >= 3 milestones)."""
    import numpy as np

    out = []
    for kind, pts in curve.items():
        if not pts:
            continue
        it, frac, secs = (np.asarray(v, dtype=float) for v in zip(*pts))
        per_it = secs[-1] / it[-1]
        hit = np.flatnonzero(frac >= 0.8)
        if len(hit):
            k = int(hit[0])
            out.append(f"- {kind}: reaches 80% of the real contrast at {int(it[k])} iterations (measured; "
                       f"{secs[k] / 3600:.2f} h of training in this run).")
            continue
        if len(pts) < 3:
            continue
        fits = []
        for name, x in (("iterations", it), ("log2 iterations", np.log2(it))):
            slope, icept = np.polyfit(x, frac, 1)
            if slope <= 0:
                fits.append(f"on {name}: no growth")
                continue
            cross = (0.8 - icept) / slope
            need = cross if name == "iterations" else 2 ** cross
            fits.append(f"on {name}: about {need:,.0f} iterations ({need * per_it / 3600:,.1f} h at "
                        f"{per_it:.2f} s per iteration)")
        out.append(f"- {kind}: below 80% at every milestone up to {int(it[-1])} (best "
                   f"{100 * frac.max():.0f}%); a straight line through the points reaches 80% "
                   + "; ".join(fits) + " (extrapolated).")
    return out + ([""] if out else [])


def _secs(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def run_seed(head: dict) -> int:
    """The run's ``--seed`` (logs written before the header held it: from its command, 0 if absent)."""
    if "seed" in head:
        return int(head["seed"])
    m = re.search(r"--seed[ =](\d+)", head.get("command", ""))
    return int(m.group(1)) if m else 0


def precision_pairs(runs: list[tuple[dict, list[dict]]]) -> list[str]:
    """fp32 against bf16, one row per seed: runs whose recipes differ only in precision (and the
    thread count), compared at the last milestone all of them reached, raw weights (what the
    profile uses).  Up to three runs per seed: fp32; bf16 (training and maps, what ``--bf16``
    does); bf16 training with fp32 maps (``--maps-fp32``).  Differences are against fp32, and
    their means are over the seeds that have that run."""
    variants = {(False, False): "fp32", (True, True): "bf16", (True, False): "bf16 train, fp32 maps"}
    groups: dict[str, dict[str, tuple[dict, dict]]] = {}
    for head, rows in runs:
        r = head["recipe"]
        kind = variants.get((bool(r.get("bf16")), bool(r.get("maps_bf16", r.get("bf16")))))
        recipe = {k: v for k, v in r.items() if k not in ("bf16", "maps_bf16", "threads")}
        key = json.dumps([run_seed(head), recipe], sort_keys=True)
        by_it = {x["iteration"]: x for x in rows if x.get("kind") == "milestone"}
        groups.setdefault(key, {})[kind] = (head, by_it)
    table, diffs = [], {kind: [] for kind in variants.values() if kind != "fp32"}
    for pair in groups.values():
        if "fp32" not in pair or len(pair) < 2:
            continue
        common = sorted(set.intersection(*(set(m) for _, m in pair.values())))
        if not common:
            continue
        it = common[-1]
        base = pair["fp32"][1][it]
        cells = {"sal": [], "probe": []}
        for kind in variants.values():
            if kind not in pair:
                cells["sal"].append("-")
                cells["probe"].append("-")
                continue
            m = pair[kind][1][it]["raw"]
            d = []
            for cell, metric in (("sal", "saliency_dice_pos"), ("probe", "probe_dice_pos")):
                d.append(m[metric] - base["raw"][metric])
                cells[cell].append(f"{m[metric]:.3f}" + ("" if kind == "fp32" else f" ({d[-1]:+.3f})"))
            if kind != "fp32":
                diffs[kind].append(tuple(d))
        if "bf16" in pair:
            b16 = pair["bf16"][1][it]
            t32, t16 = base["train_seconds_total"], b16["train_seconds_total"]
            secs = f"{_secs(t32)} / {_secs(t16)}" + (f" ({100 * (t16 / t32 - 1):+.0f}%)" if t32 and t16 else "")
            loss = f"{base['loss_last_window']:.4f} / {b16['loss_last_window']:.4f}"
        else:
            secs, loss = f"{_secs(base['train_seconds_total'])} / -", f"{base['loss_last_window']:.4f} / -"
        table.append(f"| {run_seed(pair['fp32'][0])} | {it} | {pair['fp32'][0]['val_positive']} | {secs} | {loss} | "
                     + " / ".join(cells["sal"]) + " | " + " / ".join(cells["probe"]) + " |")
    if not table:
        return []
    summary = []
    for kind, d in diffs.items():
        if d:
            n = len(d)
            summary.append(f"- {kind} against fp32, over {n} seed(s): saliency Dice "
                           f"{sum(x[0] for x in d) / n:+.3f} on average (lower on {sum(x[0] < 0 for x in d)} of {n}), "
                           f"probe Dice {sum(x[1] for x in d) / n:+.3f}.")
    return ["## fp32 against bf16, by seed (raw weights, last common milestone)", "",
            "Each seed draws its own split and initialisation, shared by its runs. Train s and loss: "
            "fp32 / bf16. Dice cells: fp32 / bf16 (training and maps, what `--bf16` does) / bf16 "
            "training with fp32 maps (`--maps-fp32`), each with its difference from fp32.", "",
            "| seed | iterations | val positives | train s | loss | CDM saliency Dice (val pos) | "
            "probe Dice (val pos) |", "|---|---|---|---|---|---|---|", *table, "", *summary, ""]


def report(paths: list[Path], out: Path) -> None:
    lines = ["# cdm_curve: sample contrast, CDM saliency and CDM-feature probe vs training iterations", ""]
    mg_rows, real, runs = [], None, []
    for p in paths:
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        head = rows[0]
        runs.append((head, rows[1:]))
        real = head["real_contrast"]
        lines += [f"## `{head['tag']}`: lr {head['recipe']['lr']}, batch {head['recipe']['batch']}, "
                  f"EMA shadow {head['recipe']['ema']}", "", *head["provenance"],
                  *([f"- weights: the checkpoint of run `{head['trained_by']}` (re-scored, nothing trained; train s "
                     f"from {head.get('train_seconds_from', 'nowhere: unknown')})"] if "trained_by" in head else []),
                  *([f"- precision: bf16 training, {'bf16' if head['recipe'].get('maps_bf16') else 'fp32'} maps and features"]
                    if head["recipe"].get("bf16") else []),
                  f"- validation split: {head['val_positive']} positive slices; real label-1 contrast "
                  f"{real:+.3f} (80% target {0.8 * real:+.3f})", "",
                  "| iterations | train s (cum.) | loss | weights | sample contrast | % of real | "
                  "CDM saliency Dice (val pos) | probe Dice (val pos) |", "|---|---|---|---|---|---|---|---|"]
        curve: dict[str, list[tuple[int, float, float]]] = {"raw": [], "ema": []}
        for r in rows[1:]:
            if r["kind"] == "mg":
                mg_rows.append((head["tag"], r))
                continue
            for kind in ("raw", "ema"):
                if kind in r:
                    s = r[kind]
                    curve[kind].append((r["iteration"], s["contrast_fraction"], r["train_seconds_total"]))
                    lines.append(f"| {r['iteration']} | {_secs(r['train_seconds_total'])} | {r['loss_last_window']:.4f} | "
                                 f"{kind} | {s['contrast']:+.3f} | {100 * s['contrast_fraction']:.0f}% | "
                                 f"{s['saliency_dice_pos']:.3f} | {s['probe_dice_pos']:.3f} |")
        lines.append("")
        lines += projection(curve)
    lines.append("")
    for tag, r in mg_rows:
        lines += [f"MG (noisy classifier only, independent of the CDM; run `{tag}`): Dice on positive validation "
                  f"slices {r['mg_dice_pos']:.3f}, with negatives gated {r['mg_dice_all']:.3f}.", ""]
    pairs = precision_pairs(runs)
    if pairs:
        lines[2:2] = pairs
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--task", default="brats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="paper-lr")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=0, help="0 = the profile's batch")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA shadow decay scored beside the raw weights")
    ap.add_argument("--milestones", type=lambda s: [int(v) for v in s.split(",")], default=[1500, 3000, 6000, 9000])
    ap.add_argument("--bf16", action="store_true", help="train with bf16 autocast (and score with it, as --bf16 does)")
    ap.add_argument("--maps-fp32", action="store_true",
                    help="with --bf16: train in bf16 but compute the maps, features and samples in fp32")
    ap.add_argument("--from-tag", default=None,
                    help="start from the last checkpoint of run TAG (same cache dir); nothing is trained")
    ap.add_argument("--from-log", type=Path, default=None,
                    help="with --from-tag: run TAG's log, whose train seconds the rows repeat (else unknown)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--mg", action="store_true", help="also score MG once")
    ap.add_argument("--log", type=Path)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("WSSS_BENCH_CACHE",
                                                                          Path.home() / ".cache" / "wsss-bench")))
    ap.add_argument("--report", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cdm_curve.md")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
