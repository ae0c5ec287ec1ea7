"""How far do raw intensities get on the phantoms?  (docs/protocol.md section 11, "Calibration".)

Per task, on the phantom of a profile (default: cpu):

1. take the positive slices of every case and split the *cases* in two halves (seeded), so that
   neighbouring slices of one lesion never sit on both sides;
2. fit a per-pixel logistic regression (scikit-learn) on the raw channel intensities plus their
   3 x 3 means, using ground-truth masks of the first half's pixels;
3. report Dice on the second half's positive slices: the mean over slices (the benchmark's
   positive-slice mean), the pooled Dice, and the Dice at the best single threshold (an upper
   bound for any threshold on this linear score).

``--unet-iters N`` also trains a small MONAI UNet (the cpu profile's FSL shape: channels
(8, 16, 32, 64), one residual unit; Adam 3e-3, batch 16, Dice+CE) for N iterations on the same
positive slices, as a reference for "below a fully supervised UNet".

Target: at most 0.8 on brats.  The table goes to stdout and to
``benchmarks/results/calibrate_phantoms.md`` with the command and the machine.

    python benchmarks/calibrate_phantoms.py --profile cpu --unet-iters 600
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsss_bench.data.readers import BratsDataset, Flare21Dataset  # noqa: E402
from wsss_bench.data.taskdata import load_task_data  # noqa: E402
from wsss_bench.profiles import load_profile  # noqa: E402
from wsss_bench.seeding import derive_seed  # noqa: E402

TASKS = [
    (BratsDataset, "brats"),
    (Flare21Dataset, "flare21-kidney"),
    (Flare21Dataset, "flare21-spleen"),
    (Flare21Dataset, "flare21-liver"),
]


def features(images: np.ndarray) -> np.ndarray:
    """(n, C, S, S) -> (n*S*S, 2C): raw intensities and their 3 x 3 means."""
    from scipy.ndimage import uniform_filter

    means = uniform_filter(images, size=(1, 1, 3, 3), mode="nearest")
    feats = np.concatenate([images, means], axis=1)  # (n, 2C, S, S)
    return feats.transpose(0, 2, 3, 1).reshape(-1, feats.shape[1])


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    denom = pred.sum() + gt.sum()
    return 1.0 if denom == 0 else float(2 * (pred & gt).sum() / denom)


def folds(td, seed: int, n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` seeded case halvings, each used in both directions."""
    out = []
    for k in range(n_splits):
        a, b = halves(td, seed + k)
        out += [(a, b), (b, a)]
    return out


def halves(td, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive rows of two seeded halves of the cases that have positive slices."""
    pos = np.flatnonzero(td.labels == 1)
    cases = sorted(set(td.case_ids[pos]))
    order = np.random.default_rng(seed).permutation(len(cases))
    first = {cases[k] for k in order[: len(cases) // 2]}
    in_first = np.isin(td.case_ids[pos], sorted(first))
    return pos[in_first], pos[~in_first]


def logistic(td, train: np.ndarray, test: np.ndarray, max_pixels: int, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = features(td.images(train)), td.masks(train).reshape(-1)
    rng = np.random.default_rng(seed)
    if len(y) > max_pixels:
        keep = rng.choice(len(y), size=max_pixels, replace=False)
        x, y = x[keep], y[keep]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x, y)
    gt = td.masks(test)
    prob = model.predict_proba(features(td.images(test)))[:, 1].reshape(gt.shape)
    per_slice = np.array([dice(p > 0.5, g) for p, g in zip(prob, gt)])
    best = max(dice(prob > t, gt) for t in np.linspace(0.05, 0.95, 19))
    return {
        "dice_mean": float(per_slice.mean()),
        "dice_std": float(per_slice.std()),
        "dice_pooled": dice(prob > 0.5, gt),
        "dice_best_threshold": best,
    }


def unet(td, train: np.ndarray, test: np.ndarray, iters: int, seed: int) -> float:
    """Mean per-slice Dice of a small supervised UNet trained on the same positive slices."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(2, td.channels, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x_all = torch.from_numpy(td.images(train))
    y_all = torch.from_numpy(td.masks(train)).long()[:, None]
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(iters):
        b = rng.choice(len(train), size=min(16, len(train)), replace=False)
        x, y = x_all[b], y_all[b]
        if td.task.flips and rng.uniform() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    net.eval()
    gt = td.masks(test)
    with torch.no_grad():
        pred = net(torch.from_numpy(td.images(test))).argmax(1).numpy().astype(bool)
    return float(np.mean([dice(p, g) for p, g in zip(pred, gt)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--phantom-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the case halves and subsampling")
    ap.add_argument("--cache", default=os.environ.get("WSSS_BENCH_CACHE", str(Path.home() / ".cache" / "wsss-bench")))
    ap.add_argument("--max-pixels", type=int, default=300_000)
    ap.add_argument("--halvings", type=int, default=4, help="random case halvings (each used both ways)")
    ap.add_argument("--unet-iters", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibrate_phantoms.md"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    profile = load_profile(args.profile)
    rows = []
    t_start = time.perf_counter()
    for cls, task in TASKS:
        td = load_task_data(cls(), task, None, profile, 0, Path(args.cache), phantom_seed=args.phantom_seed)
        seed = derive_seed(args.seed, task, "calibration")
        runs = [logistic(td, tr, te, args.max_pixels, seed) for tr, te in folds(td, seed, args.halvings)]
        means = np.array([r["dice_mean"] for r in runs])
        train, test = folds(td, seed, 1)[0]
        res = {
            "folds_mean": float(means.mean()),
            "folds_sd": float(means.std()),
            "fold1": runs[0],
            "pooled": float(np.mean([r["dice_pooled"] for r in runs])),
            "best": float(np.mean([r["dice_best_threshold"] for r in runs])),
            "unet": unet(td, train, test, args.unet_iters, seed) if args.unet_iters else None,
        }
        rows.append((task, len(np.flatnonzero(td.labels == 1)), res))
        print(f"{task}: {res}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_start

    unet_col = f" UNet Dice, fold 1 ({args.unet_iters} it) |" if args.unet_iters else ""
    lines = [
        f"| task | positive slices | LR Dice, mean over {2 * args.halvings} folds (sd over folds) "
        f"| LR pooled Dice | LR Dice, best threshold | LR Dice, fold 1 (±sd over slices) |{unet_col}",
        "|---|---|---|---|---|---|" + ("---|" if args.unet_iters else ""),
    ]
    for task, n_pos, r in rows:
        extra = f" {r['unet']:.3f} |" if r["unet"] is not None else ""
        f1 = r["fold1"]
        lines.append(
            f"| {task} | {n_pos} | **{r['folds_mean']:.3f}** ({r['folds_sd']:.3f}) | {r['pooled']:.3f} | "
            f"{r['best']:.3f} | {f1['dice_mean']:.3f}±{f1['dice_std']:.2f} |{extra}"
        )
    table = "\n".join(lines)
    print(table)
    gens = {"brats": BratsDataset().phantom_version, "flare21": Flare21Dataset().phantom_version}
    cmd = "python benchmarks/calibrate_phantoms.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = (
        "# Phantom calibration: per-pixel logistic regression on raw intensities\n\n"
        f"- command: `{cmd.strip()}`\n"
        f"- profile: {args.profile}, image size {profile.image_size}, phantom seed {args.phantom_seed}, "
        f"generators {gens['brats']} / {gens['flare21']}\n"
        f"- features: raw channel intensities + their 3x3 means ({args.max_pixels} training pixels max); "
        f"cases split in halves ({args.halvings} seeded halvings, each used both ways), train on one half's "
        "positive slices, mean per-slice Dice on the other's; the UNet is trained on fold 1 only\n"
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}, wall time {elapsed:.0f} s\n\n"
        f"{table}\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
