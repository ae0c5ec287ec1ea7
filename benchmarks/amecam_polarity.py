"""Why AME-CAM's deletion test does (or does not) choose a polarity: a diagnosis, per task.

The polarity rule (docs/methods/amecam.md) deletes the region each sign claims
(``minmax(s * avg) > 0.5`` set to 0) on <= 256 label-1 training slices and keeps the sign
whose deletion lowers sigma(logit_4) more; |drop+ - drop-| < 0.01 is a tie (s = +1).  This
script loads the trained AME-CAM of each task from a bench's cache (nothing is trained; the
models behind the published tables) and measures, on the same slices the rule used:

- how confident the classifier is there (mean sigma(logit_4), share above 0.99): a saturated
  sigmoid hides any deletion effect, whatever the maps;
- both drops in probability (the rule) and in logit (no saturation);
- both drops when the deleted region is filled with each slice's background value (its
  minimum) instead of 0: with InstanceNorm(affine=False) throughout the network, 0 is not
  "nothing" for a z-scored input;
- how much of each positive slice each sign claims, and, as a diagnostic only, the Dice of
  each sign's mask against the training masks (the training split; never the test split; the
  rule itself never reads a mask): which sign is right, and whether either localises at all;
- the same for each exit map m_1..m_4 and the attention map A alone.

    python benchmarks/amecam_polarity.py --cache-dir .cache-cold --tasks brats,flare21-kidney
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, provenance_lines, write_result  # noqa: E402

SOURCES = ["benchmarks/amecam_polarity.py", "wsss_bench/nn/amecam.py", "plugins/amecam.py"]


def _dice(pred, gt) -> float:
    inter = float((pred & gt).sum())
    den = float(pred.sum() + gt.sum())
    return 2 * inter / den if den else 1.0


def diagnose(ctx) -> dict:
    import torch

    from wsss_bench.maps import minmax
    from wsss_bench.nn import amecam as am

    plugin = ctx.plugin("cams", "amecam")
    net = plugin.net
    rows = am.polarity_rows(np.asarray(ctx.data.labels), ctx.data.split("train"), ctx.generator("amecam/polarity"))
    x = torch.from_numpy(np.asarray(ctx.data.images(rows))).float()
    gt = torch.from_numpy(np.asarray(ctx.task_data.masks(rows)) > 0)
    out: dict = {"n_slices": int(len(rows)), "recorded": dict(plugin.polarity)}
    with torch.no_grad():
        logit = net.logit4(x).float()
        p = torch.sigmoid(logit)
        out["p_mean"], out["p_above_0.99"] = float(p.mean()), float((p > 0.99).float().mean())
        out["logit_mean"] = float(logit.mean())
        avg = net(x).float()
        fill = x.amin(dim=(2, 3), keepdim=True)  # each slice's background value, per channel
        for s in (+1, -1):
            mask = minmax(s * avg) > 0.5
            m = mask[:, None].to(x.dtype)
            l0 = net.logit4(x * (1 - m)).float()
            lf = net.logit4(x * (1 - m) + fill * m).float()
            out[f"s{s:+d}"] = {
                "area": float(mask.float().mean()),
                "drop_p": float((p - torch.sigmoid(l0)).mean()),
                "drop_logit": float((logit - l0).mean()),
                "drop_p_fill_min": float((p - torch.sigmoid(lf)).mean()),
                "drop_logit_fill_min": float((logit - lf).mean()),
                "dice_vs_train_masks": float(np.mean([_dice(a, b) for a, b in zip(mask.numpy(), gt.numpy())])),
            }
        _, m = net.stage1.up_maps(x)  # (B, 4, S, S)
        a, _ = net.stage2(x, m)
        named = {f"m{k + 1}": m[:, k].float() for k in range(m.shape[1])}
        named["A"] = a.float().reshape(avg.shape)
        parts = {name: {s: float(np.mean([_dice(u, v) for u, v in zip((minmax(s * mk) > 0.5).numpy(), gt.numpy())]))
                        for s in (1, -1)} for name, mk in named.items()}
        out["parts"] = parts
    out["gt_area"] = float(gt.float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, required=True, help="a bench's cache holding the trained AME-CAMs")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--tasks", default="brats,flare21-kidney,flare21-spleen,flare21-liver")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "amecam_polarity.md")
    args = ap.parse_args()
    import torch

    from wsss_bench.running.runner import RunConfig, Session

    torch.set_num_threads(1)
    cfg = RunConfig(profile=args.profile, device="cpu", cache_dir=args.cache_dir, out=Path("/tmp/wsss-polarity"))
    session = Session(cfg)
    results = {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        results[task] = diagnose(session.context(task, 0))
        print(task, results[task], flush=True)
    lines = ["# AME-CAM polarity: what the deletion test sees", "",
             "Written by `benchmarks/amecam_polarity.py` from the AME-CAM models a bench trained (its cache);",
             "nothing is trained. Slices: the <= 256 seeded label-1 training slices the rule itself uses.",
             "Dice against the training masks is a diagnostic of which sign is right; the rule never reads a mask.",
             "", *provenance_lines(command_line(argv=sys.argv[1:]), args.profile, sources=SOURCES), "",
             "| task | recorded s (drop+ / drop-) | mean p / share p>0.99 | sign | area claimed | drop p | drop logit | "
             "drop p, fill=min | drop logit, fill=min | Dice vs train masks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in results.items():
        rec = r["recorded"]
        head = (f"{rec['s']:+d}{' (tie)' if rec.get('tied') else ''} ({rec['drop_plus']:.3f} / {rec['drop_minus']:.3f})",
                f"{r['p_mean']:.3f} / {r['p_above_0.99']:.2f}")
        for s in (+1, -1):
            d = r[f"s{s:+d}"]
            first = (task, *head) if s == 1 else ("", "", "")
            lines.append(f"| {' | '.join(first)} | {s:+d} | {d['area']:.3f} | {d['drop_p']:.3f} | {d['drop_logit']:.2f} | "
                         f"{d['drop_p_fill_min']:.3f} | {d['drop_logit_fill_min']:.2f} | {d['dice_vs_train_masks']:.3f} |")
    lines += ["", "Object area (share of pixels in the training masks of these slices): " +
              ", ".join(f"{t} {r['gt_area']:.3f}" for t, r in results.items())]
    if any(r["parts"] for r in results.values()):
        lines += ["", "Dice vs training masks of each exit map alone, sign +1 / -1:", ""]
        for t, r in results.items():
            lines.append(f"- {t}: " + ", ".join(f"{k} {v[1]:.3f} / {v[-1]:.3f}" for k, v in r["parts"].items()))
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
