"""Does the trained diffusion core work?  Trains through the real pipeline, then checks it.

1. Loads the task's data exactly as ``wsss-bench run`` does (default: the cpu profile's
   brain phantom, task ``brats``, seed 0) and trains/loads the shared CDM and the noisy
   classifier through ``get_cdm`` / ``get_noisy_classifier`` (cached artifacts).
2. Draws samples from the CDM with label 1 (and label 0) by a hand-written deterministic
   DDIM loop from pure noise (``--sample-steps`` harness steps, eta = 0, clipped x0) and
   reports their mean intensity inside vs outside the brain mask.  The same loop run on the
   exact noise predictor of a one-image data set must return that image (sampler self-test);
   one-step x0 estimates of noised real slices show how far up in t the CDM denoises.  The brain mask is where
   at least half of the label-1 training slices have tissue (max over channels > 0; the
   phantom is exactly 0 outside the brain).  A sample that is still noise has the same mean
   inside and outside (about 0.5 after clipping); a brain-like sample is dark outside.
3. Reports the noisy classifier's test AUC (softmax p(1), seeded noise) at small t.

The result file starts with its provenance (benchmarks/_meta.py): the command, the git
commit and any uncommitted change to the code it depends on, the phantom generator
version of the data, the profile and the machine.

    python benchmarks/diffusion_check.py [--profile cpu] [--bf16] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, provenance_lines  # noqa: E402

#: the code this result depends on (named in the provenance when uncommitted)
SOURCES = ["benchmarks/diffusion_check.py", "wsss_bench/nn/diffusion.py", "wsss_bench/nn/noisy_classifier.py",
           "wsss_bench/nn/training.py", "wsss_bench/data/phantom_brain.py", "wsss_bench/data/phantom_abdomen.py",
           "wsss_bench/profiles.toml"]


def oracle_unet(x_star):
    """The exact eps-predictor for data that is always ``x_star`` (in [-1, 1]): a sampler self-test."""
    import torch

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device

        def forward(self, x, timesteps, class_labels=None):
            from wsss_bench.nn import diffusion as dif

            a = dif.harness_alphas_cumprod()[timesteps].float().view(-1, 1, 1, 1)
            return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    return Oracle()


def denoise_check(unet, real01, ts, seed: int, profile, mask):
    """One-step x0 estimates of real slices noised to each t: (t, ab, inside, outside, rmse)."""
    import torch

    from wsss_bench.nn import diffusion as dif

    ab = dif.harness_alphas_cumprod(profile)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in ts:
        a = float(ab[t])
        eps = torch.randn(real01.shape, generator=g)
        tt = dif.timesteps(t, real01.shape[0])
        xt = dif.add_noise(real01 * 2 - 1, eps, tt, profile)
        with torch.no_grad():
            e = unet(xt, timesteps=tt, class_labels=torch.ones_like(tt)).float()
        x0 = (((xt - (1 - a) ** 0.5 * e) / a ** 0.5).clamp(-1, 1) + 1) / 2
        inside, outside = inside_outside(x0, mask)
        out.append((t, a, inside, outside, float((x0 - real01).pow(2).mean().sqrt())))
    return out


def ddim_sample(unet, n: int, label: int, channels: int, size: int, steps: int, seed: int, profile):
    """x_0 samples in [0, 1] from pure noise: eta = 0 DDIM on the harness schedule, explicit loop."""
    import numpy as np
    import torch

    from wsss_bench.nn import diffusion as dif

    ab = dif.harness_alphas_cumprod(profile)
    t_max = len(ab)
    seq = sorted({int(v) for v in np.linspace(0, t_max - 1, steps).round()}, reverse=True)
    g = torch.Generator().manual_seed(seed)
    dev = next(unet.parameters()).device
    x = torch.randn(n, channels, size, size, generator=g).to(dev)
    y = torch.full((n,), label, dtype=torch.long, device=dev)
    for k, t in enumerate(seq):
        a = float(ab[t])
        a_prev = float(ab[seq[k + 1]]) if k + 1 < len(seq) else 1.0
        with torch.no_grad():
            eps = unet(x, timesteps=dif.timesteps(t, n, dev), class_labels=y).float()
        x0 = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1, 1)
        eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return ((x + 1) / 2).clamp(0, 1).cpu()  # (n, C, S, S)


def brain_mask(data, idx):
    """Pixels where >= half of the given slices have tissue (any channel > 0): (S, S) bool."""
    import torch

    total, count = None, 0
    for b in data.batches(idx, 64, device="cpu"):
        tissue = (b.images.amax(dim=1) > 0).float().sum(0)
        total = tissue if total is None else total + tissue
        count += len(b)
    return (total / max(1, count)) >= 0.5


def inside_outside(images, mask):
    """Mean intensity (over channels and images) inside and outside ``mask``."""
    m = images.mean(dim=1)  # (n, S, S)
    return float(m[:, mask].mean()), float(m[:, ~mask].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--task", default="brats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for training (as wsss-bench run --bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("WSSS_BENCH_CACHE",
                                                                          Path.home() / ".cache" / "wsss-bench")))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "diffusion_check.md")
    args = ap.parse_args()

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from wsss_bench.nn import diffusion as dif
    from wsss_bench.nn.noisy_classifier import get_noisy_classifier, noisy_scores
    from wsss_bench.running.runner import RunConfig, Session
    from wsss_bench.seeding import set_determinism

    torch.set_num_threads(args.threads)
    t_start, load0 = time.time(), os.getloadavg()
    cfg = RunConfig(profile=args.profile, device="cpu", cache_dir=args.cache_dir, bf16=args.bf16,
                    out=Path("/tmp/wsss-diffusion-check"))
    session = Session(cfg)
    ctx = session.context(args.task, args.seed)
    set_determinism(ctx.seed("diffusion-check"), "cpu")
    data, prof = ctx.data, ctx.profile

    t0 = time.perf_counter()
    unet = dif.get_cdm(ctx)
    t_cdm = time.perf_counter() - t0
    t0 = time.perf_counter()
    clf = get_noisy_classifier(ctx)
    t_clf = time.perf_counter() - t0
    import json

    def train_info(stage: str, key: str) -> dict:
        meta = json.loads((ctx.cache.path(stage, key) / "artifact.json").read_text())
        hit = any(e["stage"] == stage and e["key"] == key and e["hit"] for e in ctx.cache.events)
        return {**meta["meta"]["train"], "cached": hit}

    cdm_info = train_info("cdm", ctx.shared_model_key("cdm"))
    clf_info = train_info("noisy-classifier", ctx.shared_model_key("noisy-classifier"))

    # ---- samples
    train = np.asarray(data.split("train"))
    pos = train[np.asarray(data.labels)[train] == 1]
    mask = brain_mask(data, pos)
    size, c = int(data.image_size), int(ctx.task.channels)
    rows = []
    for label in (1, 0):
        s = ddim_sample(unet, args.samples, label, c, size, args.sample_steps, ctx.seed(f"check/sample/{label}"), prof)
        rows.append((f"CDM sample, label {label}", *inside_outside(s, mask), s))
    real = torch.cat([b.images for b in data.batches(pos[: args.samples], args.samples, device="cpu")])
    rows.append(("real label-1 training slices", *inside_outside(real, mask), real))
    g = torch.Generator().manual_seed(0)
    noise = ((torch.randn(args.samples, c, size, size, generator=g) + 1) / 2).clamp(0, 1)
    rows.append(("pure noise (what an untrained model returns)", *inside_outside(noise, mask), noise))
    mean_slice = real.mean(0, keepdim=True) * 2 - 1  # (1, C, S, S) in [-1, 1]
    oracle = ddim_sample(oracle_unet(mean_slice), args.samples, 1, c, size, args.sample_steps, 0, prof)
    rows.append(("sampler self-test: exact eps of a one-image data set (the mean real slice)",
                 *inside_outside(oracle, mask), oracle))
    test_pos = np.asarray(data.split("test"))
    test_pos = test_pos[np.asarray(data.labels)[test_pos] == 1][: args.samples]
    real_test = torch.cat([b.images for b in data.batches(test_pos, args.samples, device="cpu")])
    denoise = denoise_check(unet, real_test, [dif.match(400), 300, 500, 700, 850, 950], ctx.seed("check/denoise"),
                            prof, mask)

    # ---- noisy classifier AUC
    test = np.asarray(data.split("test"))
    auc_rows = []
    for t_ref in (1, 10, 50, 100, 200):
        t = dif.match(t_ref)
        p1, labels = noisy_scores(clf, data, test, t, seed=ctx.seed(f"check/auc/{t}"), profile=prof)
        auc = float(roc_auc_score(labels, p1)) if len(set(labels.tolist())) == 2 else float("nan")
        acc = float(((p1 >= 0.5) == labels).mean())
        auc_rows.append((t_ref, t, auc, acc, float(max(labels.mean(), 1 - labels.mean())), len(labels)))
    for t in (250, 500):
        p1, labels = noisy_scores(clf, data, test, t, seed=ctx.seed(f"check/auc/{t}"), profile=prof)
        auc_rows.append(("-", t, float(roc_auc_score(labels, p1)), float(((p1 >= 0.5) == labels).mean()),
                         float(max(labels.mean(), 1 - labels.mean())), len(labels)))

    load1 = os.getloadavg()
    loss = cdm_info.get("loss_log") or []
    lines = [
        "# diffusion_check: is the trained CDM a generator, is the noisy classifier a classifier?", "",
        *provenance_lines(command_line(argv=sys.argv[1:]), profile=args.profile, data=data, sources=SOURCES),
        f"- load average at start {load0[0]:.2f}, at end {load1[0]:.2f} (shared machine)",
        f"- data: profile `{args.profile}`, task `{args.task}`, seed {args.seed}, "
        f"{'phantom' if data.is_phantom else 'real data'}; {len(train)} training slices ({len(pos)} label 1), "
        f"{len(test)} test slices; image size {size}",
        f"- CDM: {cdm_info['iterations']} iterations, batch {cdm_info['batch']}, EMA {cdm_info['ema']}, "
        f"bf16 {cdm_info['bf16']}; loss {loss[0][1]:.4f} (first {loss[0][0]} it) -> {loss[-1][1]:.4f} (last "
        f"window); training took {cdm_info['seconds_this_attempt']:.0f}s ({cdm_info['n_train']} slices, resumed from "
        f"iteration {cdm_info['resumed_from']}); this call {t_cdm:.0f}s "
        f"({'reused from the cache' if cdm_info['cached'] else 'trained now'})",
        f"- noisy classifier: {clf_info['iterations']} iterations, batch {clf_info['batch']}, bf16 {clf_info['bf16']}; "
        f"training took {clf_info['seconds_this_attempt']:.0f}s; this call {t_clf:.0f}s "
        f"({'reused from the cache' if clf_info['cached'] else 'trained now'})",
        f"- wall time of this script: {time.time() - t_start:.0f}s", "",
        f"## Samples ({args.samples} per row, {args.sample_steps}-step DDIM, eta = 0, from pure noise)", "",
        f"Brain mask: pixels with tissue in >= 50% of the label-1 training slices ({int(mask.sum())} of {size * size}).",
        "Intensities in [0, 1], averaged over the 4 channels.", "",
        "| images | mean inside brain | mean outside brain | inside - outside |", "|---|---|---|---|",
    ]
    for name, inside, outside, _ in rows:
        lines.append(f"| {name} | {inside:.3f} | {outside:.3f} | {inside - outside:+.3f} |")
    lines += ["", f"## One-step denoising of real label-1 test slices ({len(real_test)} slices, label 1)", "",
              "x0_hat = clamp((x_t - sqrt(1 - ab) eps_hat) / sqrt(ab), -1, 1), mapped to [0, 1]; "
              f"the real slices have mean {inside_outside(real_test, mask)[0]:.3f} inside and "
              f"{inside_outside(real_test, mask)[1]:.3f} outside the brain mask.", "",
              "| harness t | alpha-bar | x0_hat mean inside | x0_hat mean outside | RMSE to the clean slice |",
              "|---|---|---|---|---|"]
    for t, a, inside, outside, rmse in denoise:
        lines.append(f"| {t} | {a:.4f} | {inside:.3f} | {outside:.3f} | {rmse:.3f} |")
    lines += ["", "## Noisy classifier on the test split (seeded noise per batch)", "",
              "| t_ref (4000-step scale) | harness t | test AUC of p(1) | accuracy at 0.5 | majority rate | slices |",
              "|---|---|---|---|---|---|"]
    for t_ref, t, auc, acc, maj, n in auc_rows:
        lines.append(f"| {t_ref} | {t} | {auc:.3f} | {acc:.3f} | {maj:.3f} | {n} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    np.save("/tmp/wsss-diffusion-check-samples.npy", torch.stack([r[3][: args.samples] for r in rows[:4]]).numpy())
    print(text)


if __name__ == "__main__":
    main()
