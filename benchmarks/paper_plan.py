"""The paper-scale plan: GPU-hours, GPU memory, storage and the SLURM layout (docs/scale.md).

Every number comes from one of three places, and the tables say which:

- the FLOP / parameter / saved-tensor counts of :mod:`paper_costs` (exact for the code in this
  tree at the paper profile's shapes);
- the schedules of the paper profile (``wsss_bench/profiles.toml``) and the constants below
  (:data:`GPU`, :data:`DATA`, the per-stage work formulas in :func:`stages`), each stated in the
  document as an assumption;
- the CPU dry run's cells (``benchmarks/results/paper_dryrun.json``): that every path runs,
  the wall times and peak RSS measured, and the CPU rate that checks the FLOP counts.
"""
from __future__ import annotations

import json
import math
from typing import Any

#: one data-centre GPU, H100/H200 class: dense BF16 peak 989 TFLOP/s; we assume 20% of it is
#: reached end to end (data loading, small kernels, Python); fp32 runs (no --bf16) use TF32
#: tensor cores at half that peak, so their hours double
GPU = {"name": "H100 / H200 (SXM)", "peak_bf16_tflops": 989.0, "utilisation": 0.20}
CONTEXT_GIB = 1.5  # CUDA context + cuDNN/cuBLAS workspace allowance per process

#: full datasets: cases, axial slices per case at 256 px, case split, share of positive slices
DATA = {
    "brats": {"cases": 1251, "slices": 155, "split": (1001, 125, 125), "pos": 5802 / 125 / 155, "channels": 4},
    "flare": {"cases": 361, "slices": 96, "split": (211, 50, 100), "channels": 1},
}
#: positive-slice share per task (BraTS: the paper's 5,802 positive test slices over 125 test
#: cases of 155 slices; FLARE: assumed from organ extent over a 96-slice abdomen)
POS_SHARE = {"brats": DATA["brats"]["pos"], "flare21-kidney": 0.25, "flare21-spleen": 0.15, "flare21-liver": 0.35}
NEG_PER_POS = 1073 / 5802
T1 = ["brats", "flare21-kidney", "flare21-spleen", "flare21-liver"]
T23 = ["brats", "flare21-kidney"]
#: CLDF decoders per task on CDM features: Table 1 (1) + Table 3's four other seed choices
CLDF_CDM_DECODERS = {"brats": 5, "flare21-kidney": 5, "flare21-spleen": 1, "flare21-liver": 1}


def counts(task: str) -> dict[str, float]:
    """Slices per split for ``task`` at full scale (train: every slice of the train cases, an
    upper bound: ambiguous slices are left out in practice)."""
    d = DATA["brats" if task == "brats" else "flare"]
    n_tr, n_va, n_te = d["split"]
    pos = POS_SHARE[task]
    return {"train": n_tr * d["slices"], "train_pos": n_tr * d["slices"] * pos,
            "val_pos": n_va * d["slices"] * pos, "test": n_te * d["slices"] * pos * (1 + NEG_PER_POS),
            "all": d["cases"] * d["slices"], "channels": d["channels"], "task": task}


def seed_sets(levels: list[list[Any]]) -> dict[tuple[str, str], int]:
    """(task, source) -> how many distinct CLDF seed sets use that source's maps on the training
    positives (decoders that differ only in backbone share one seed set; ``use_mg`` adds MG)."""
    sets: dict[tuple[str, str], set] = {}
    for u in levels[1]:
        if not u.spec.startswith("cldf"):
            continue
        used = set(u.sources) | ({"mg"} if "use_mg=false" not in u.spec else set())
        for src in used:
            sets.setdefault((u.task, src), set()).add((tuple(sorted(used)),))
    return {k: len(v) for k, v in sets.items()}


def stages(net: dict, prof: Any, sets: dict[tuple[str, str], int] | None = None) -> list[dict[str, Any]]:
    """Every stage of Tables 1-3 at paper scale: FLOPs per task, the tasks it runs for, the
    network and batch that set its GPU memory, and how its work was counted."""
    f = lambda name, kind: net[name][kind]  # noqa: E731
    cdm_fwd, feat = f("cdm-unet", "fwd"), f("cdm-features", "fwd")
    n_t = len(prof.mg.t_ref)
    rows = []

    def add(name, tasks, work, mem, note, kind="train"):
        rows.append({"stage": name, "tasks": tasks, "work": work, "mem": mem, "note": note, "kind": kind})

    ep = int(prof.classifier.epochs)
    add("train/classifier (ResNet-50, OS 32)", T1, lambda c: ep * c["train"] * f("resnet50-os32", "train"),
        ("resnet50-os32", int(prof.classifier.batch), 16), f"{ep} epochs x train slices x fwd+bwd")
    add("train/table2-resnet18", T23, lambda c: ep * c["train"] * f("resnet18-os32", "train"),
        ("resnet18-os32", int(prof.classifier.batch), 16), f"{ep} epochs x train slices x fwd+bwd")
    s = prof.seam
    add("train/seam", T1, lambda c: int(s.epochs) * c["train"] * f("seam", "train") * (1 + float(s.view_scale) ** 2),
        ("seam", int(s.batch), 16), f"{s.epochs} epochs; the second view at scale {s.view_scale} adds its area")
    a = prof.amecam
    add("train/amecam-simclr (stage 0)", T1, lambda c: int(a.simclr_epochs) * c["train"] * 2 * f("amecam-simclr", "train"),
        ("amecam-simclr", 2 * int(a.batch), 16), f"{a.simclr_epochs} epochs x 2 views (batch {a.batch} = {2 * int(a.batch)} images)")
    add("train/amecam-stage1", T1, lambda c: int(a.stage1_epochs) * c["train"] * f("amecam-stage1", "train"),
        ("amecam-stage1", int(a.batch), 16), f"{a.stage1_epochs} epochs")
    add("train/amecam-stage2", T1, lambda c: int(a.stage2_epochs) * c["train"] * 3 * f("amecam-stage1", "fwd"),
        ("amecam-stage1", int(a.batch), 4), f"{a.stage2_epochs} epochs; assumed 3 frozen encoder passes "
        "(image, fg, bg) per slice; the aggregator is small")
    cdm = prof.cdm
    add("train/cdm", T1, lambda c: int(cdm.iterations) * int(cdm.batch) * f("cdm-unet", "train"),
        ("cdm-unet", int(cdm.batch), 20), f"{int(cdm.iterations):,} it x batch {cdm.batch}; EMA {cdm.ema} adds 4 B/param")
    nc = prof.noisy_classifier
    add("train/noisy-classifier", T1, lambda c: int(nc.iterations) * int(nc.batch) * f("noisy-classifier", "train"),
        ("noisy-classifier", int(nc.batch), 16), f"{int(nc.iterations):,} it x batch {nc.batch}")
    dg = prof.dig
    add("train/dig", T1, lambda c: int(dg.epochs) * c["train"] * (6 * cdm_fwd + f("dig-vit", "train")),
        ("dig-vit", int(dg.batch), 16), f"{dg.epochs} epochs; feature cache off: 5 feature t + 1 denoising CDM "
        "pass per slice per step")
    fs = prof.fsl
    add("train/fsl", T1, lambda c: int(fs.iterations) * int(fs.batch) * f("fsl-unet", "train"),
        ("fsl-unet", int(fs.batch), 16), f"{int(fs.iterations):,} it x batch {fs.batch}")
    ce = int(prof.cldf.epochs)
    add("train/cldf-decoder (CDM features)", T1,
        lambda c, t=None: ce * (c["train_pos"] + c["val_pos"]) * 4 * feat,
        ("cdm-features", int(prof.common.cldf_batch), 0),
        f"per decoder: {ce} epochs x (train + val positive slices) x 4 feature t (partial CDM pass); "
        "decoders: brats 5, kidney 5, spleen 1, liver 1 (Tables 1 and 3)")
    add("train/cldf-decoder (ResNet-18/50, UNet encoder)", T23,
        lambda c: ce * (c["train_pos"] + c["val_pos"]) * (f("resnet18-os32", "fwd") + f("resnet50-os32", "fwd")
                                                         + 4 * f("noisy-classifier", "fwd")),
        ("noisy-classifier", int(prof.common.cldf_batch), 0), "Table 2's three other backbones, one decoder each")
    sets = sets or {}
    seeds = lambda c, src: c["test"] + (c["train_pos"] + c["val_pos"]) * sets.get((c["task"], src), 0)  # noqa: E731
    mb = int(prof.classifier.batch)
    add("maps/gradcam", T1, lambda c: c["test"] * f("resnet50-os32", "train"), ("resnet50-os32", mb, 4),
        "test slices x fwd+bwd", "maps")
    add("maps/scorecam", T1, lambda c: c["test"] * 2049 * f("resnet50-os32", "fwd"),
        ("resnet50-os32", int(prof.scorecam.chunk), 4), "1 + 2048 layer4 channels x fwd; chunk 64", "maps")
    add("maps/layercam", T1, lambda c: seeds(c, "layercam") * f("resnet50-os32", "train"), ("resnet50-os32", mb, 4),
        "(test + train/val positives x CLDF seed sets using it) x fwd+bwd", "maps")
    tta = sum(float(v) ** 2 for v in prof.seam.tta_scales) * 2
    add("maps/seam", T1, lambda c: c["test"] * tta * f("seam", "fwd"), ("seam", mb, 4),
        f"TTA: sum of scale^2 x 2 flips = {tta:g} x fwd", "maps")
    add("maps/amecam", T1, lambda c: seeds(c, "amecam") * f("amecam-stage1", "fwd"), ("amecam-stage1", mb, 4),
        "(test + train/val positives x CLDF seed sets using it) x fwd", "maps")
    steps = 10
    add("maps/cdm", T1, lambda c: c["test"] * 2 * steps * cdm_fwd, ("cdm-unet", mb, 4),
        f"{steps} DDIM steps x 2 branches x fwd", "maps")
    add("maps/mg", T1, lambda c: seeds(c, "mg") * n_t * f("noisy-classifier", "train"),
        ("noisy-classifier", 128, 4), f"(test + train/val positives x seed sets using MG) x {n_t} t x fwd + input-gradient bwd (counted as fwd+bwd); "
        "2 t per pass at map batch 64 = 128 images with autograd", "maps")
    add("maps/dig", T1, lambda c: c["test"] * (6 * cdm_fwd + f("dig-vit", "fwd")), ("cdm-unet", mb, 4),
        "6 CDM passes + ViT per test slice", "maps")
    add("refine/cldf (test features)", T1,
        lambda c: c["test"] * 4 * feat, ("cdm-features", 1, 4),
        "per decoder: test slices x 4 feature t; k-means on 16-d embeddings is small", "maps")
    return rows


#: stages that keep autograd's saved tensors (training with gradients, gradient-based maps)
AUTOGRAD = {"train/classifier (ResNet-50, OS 32)", "train/table2-resnet18", "train/seam", "train/amecam-simclr (stage 0)",
            "train/amecam-stage1", "train/cdm", "train/noisy-classifier", "train/dig", "train/fsl",
            "maps/gradcam", "maps/layercam", "maps/mg"}

def gpu_rate() -> float:
    """Effective FLOP/s assumed for one GPU."""
    return GPU["peak_bf16_tflops"] * 1e12 * GPU["utilisation"]


def stage_table(net: dict, prof: Any, sets: dict[tuple[str, str], int] | None = None) -> list[dict[str, Any]]:
    """Per stage: FLOPs and GPU-hours per task, tasks, total GPU-hours, memory estimate (GiB)."""
    out = []
    for row in stages(net, prof, sets):
        per_task = {}
        for task in row["tasks"]:
            c = counts(task)
            mult = CLDF_CDM_DECODERS[task] if row["stage"] in ("train/cldf-decoder (CDM features)",
                                                                 "refine/cldf (test features)") else 1
            per_task[task] = row["work"](c) * mult
        flops = sum(per_task.values())
        name, batch, bytes_per_param = row["mem"]
        n = net["cdm-unet" if name == "cdm-features" else name]
        weights = n["params"] * (bytes_per_param or 4)
        if row["stage"].startswith("train/dig"):
            weights += net["cdm-unet"]["params"] * 4  # the frozen CDM that makes DiG's diffusion input
        n_act = net[name]
        act = (n_act["saved_bytes"] if row["stage"] in AUTOGRAD else n_act["live_bytes"]) * batch
        if row["stage"].startswith(("train/dig", "maps/dig")):
            act += batch * net["_meta"]["dig_feat_in"] * int(prof.dig.grid) ** 2 * 4
        gib = (weights + act) / 2**30 + CONTEXT_GIB
        out.append({**row, "flops": flops, "per_task": per_task, "gpu_h": flops / gpu_rate() / 3600,
                    "mem_gib": gib, "batch": batch, "weights_bytes": weights, "act_per_item": act / max(1, batch)})
    return out


def halved_fit(row: dict[str, Any], card_bytes: float) -> tuple[int, float] | None:
    """MG halves its pass on out-of-memory: (images per pass, GiB) of the first halving that fits
    ``card_bytes``, or None when not even one image does."""
    n = int(row["batch"])
    while n >= 1:
        gib = (row["weights_bytes"] + row["act_per_item"] * n) / 2**30 + CONTEXT_GIB
        if gib * 2**30 <= card_bytes:
            return n, gib
        n //= 2
    return None


def storage(prof: Any, net: dict, levels: list[list[Any]]) -> list[tuple[str, str, str]]:
    """(what, size, how) rows for the full datasets."""
    s = int(prof.image_size)
    b, fl = DATA["brats"], DATA["flare"]
    nb, nf = b["cases"] * b["slices"], fl["cases"] * fl["slices"]
    gb = lambda x: f"{x / 1e9:,.1f} GB"  # noqa: E731
    store_b = nb * (b["channels"] * s * s + s * s // 2)
    store_f = nf * (fl["channels"] * s * s + s * s // 2)
    test_maps = sum(counts(u.task)["test"] for u in levels[0] if u.kind == "source")
    maps = test_maps * s * s * 4
    n_src = sum(u.kind == "source" for u in levels[0])
    weights = sum(net[k]["params"] * 4 for k in ("resnet50-os32", "seam", "amecam-stage1", "cdm-unet",
                                                  "noisy-classifier", "dig-vit", "fsl-unet")) * 4
    ckpt = net["cdm-unet"]["params"] * 20
    dig_cache = counts("brats")["train"] * net["_meta"]["dig_feat_in"] * int(prof.dig.grid) ** 2 * 4
    return [
        ("slice store, BraTS21 (uint8 images + packed labels)", gb(store_b),
         f"{nb:,} slices x ({b['channels']} x {s}^2 + {s}^2/2) B"),
        ("slice store, FLARE21 (shared by its three tasks)", gb(store_f), f"{nf:,} slices x (1 x {s}^2 + {s}^2/2) B"),
        (f"test maps cache (float32, {n_src} (task, source) units)", gb(maps),
         "test slices x 256^2 x 4 B per unit; CLDF's training seeds are stored as bit masks (small)"),
        ("trained weights (4 tasks, float32)", gb(weights), "parameters x 4 B; CLDF decoders are tiny"),
        ("one CDM training checkpoint (weights, AdamW, EMA)", gb(ckpt), "169 M params x 20 B; one per CDM in training"),
        ("DiG feature cache if turned on (BraTS train split)", gb(dig_cache),
         f"{counts('brats')['train']:,.0f} slices x {net['_meta']['dig_feat_in']} x {prof.dig.grid}^2 x 4 B: "
         "why the paper profile keeps it off"),
    ]


def fmt_h(h: float) -> str:
    return f"{h:,.1f}" if h >= 0.1 else f"{h:.2f}" if h >= 0.005 else "<0.01"


def fmt_flops(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else "-"


# ============================================================================ rendering
def _stage_cells(row: dict) -> str:
    parts = []
    for s in row.get("stages") or []:
        if s["seconds"] < 0.05 and not s["stage"].startswith("train/"):
            continue
        parts.append(f"{s['stage']} {s['seconds']:.1f}s ({s['peak_rss_mb'] / 1024:.1f})")
    return "; ".join(parts)


def cell_lines(dry: dict) -> list[str]:
    """The dry run's cells as a Markdown table."""
    lines = ["| cell | status | wall (s) | load avg (1 min) start -> end | peak RSS (GiB) | stages: time (peak RSS so far, GiB) |",
             "|---|---|---:|---|---:|---|"]
    for name, row in dry["cells"].items():
        if row.get("status") == "not run":
            lines.append(f"| {name} | not run: {row.get('why', '')} | | | | |")
            continue
        rss = _peak_gib(row)
        status = row.get("status", "?")
        note = (dry.get("notes") or {}).get(name)
        if note and note.get("pass") and row.get("from_pass") == f"paper_dryrun_pass-{note['pass']}.json":
            status = f"{status} in {row['from_pass']}: {note['text']}".replace("|", "/")
        elif note and row.get("from_pass") and status == "done":  # the note is about an earlier pass
            status = f"done in {row['from_pass']}; the first pass: {note['text']}".replace("|", "/")
        elif note:
            status = f"{status}: {note['text']}".replace("|", "/")
        elif status != "done":
            err = row.get("why") or row.get("error") or " ".join(row.get("stderr_tail") or [])
            status = f"{status}: {str(err)[:300]}".replace("|", "/")
        stages = _stage_cells(row) or "; ".join(ln.split(" ", 2)[2] for ln in row.get("stages_done") or [])
        lines.append(f"| {name} | {status} | {row.get('wall_s', 0):.0f} | {row['load_start'][0]:.1f} -> "
                     f"{row['load_end'][0]:.1f} | {rss:.1f} | {stages} |")
    return lines


def network_lines(net: dict) -> list[str]:
    lines = ["| network | parameters | fwd GFLOP / slice | fwd+bwd GFLOP / slice | saved for backward / slice | "
             "peak live, no autograd / slice | shapes |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, n in net.items():
        if name.startswith("_"):
            continue
        g = lambda v: "-" if not math.isfinite(v) else f"{v / 1e9:,.1f}"  # noqa: E731
        lines.append(f"| {name} | {n['params'] / 1e6:,.1f} M | {g(n['fwd'])} | {g(n['train'])} | "
                     f"{n['saved_bytes'] / 2**30:.2f} GiB | {n['live_bytes'] / 2**30:.3f} GiB | {n['note']} |")
    return lines


def cpu_rates(dry: dict, net: dict, overrides: list[str]) -> list[str]:
    """Implied CPU GFLOP/s of the dry run's fixed-size training stages (checks the counts)."""
    ov = dict(o.split("=", 1) for o in overrides)
    known = {"train/cdm": ("cdm-unet", int(ov["cdm.iterations"]) * int(ov["cdm.batch"])),
             "train/noisy-classifier": ("noisy-classifier", int(ov["noisy_classifier.iterations"])
                                        * int(ov["noisy_classifier.batch"])),
             "train/fsl": ("fsl-unet", int(ov["fsl.iterations"]) * int(ov["fsl.batch"]))}
    lines = ["| stage (dry run) | samples | seconds | FLOPs counted | implied CPU GFLOP/s | 1-min load at cell start |",
             "|---|---:|---:|---:|---:|---:|"]
    seen = set()
    for row in dry["cells"].values():
        for s in row.get("stages") or []:
            if s["stage"] in known and s["stage"] not in seen and s["seconds"] > 0:
                seen.add(s["stage"])
                name, n = known[s["stage"]]
                fl = n * net[name]["train"]
                lines.append(f"| {s['stage']} ({row['task']}) | {n} | {s['seconds']:.1f} | {fl:.2e} | "
                             f"{fl / s['seconds'] / 1e9:.1f} | {row['load_start'][0]:.1f} |")
    return lines


def slurm_units() -> tuple[int, list[list[Any]]]:
    """Cells and phase-1 unit levels of Tables 1-3, from the bench planner itself."""
    from pathlib import Path

    from wsss_bench.plugins import load_plugins
    from wsss_bench.running.bench import load_table, plan, shared_units

    root = Path(__file__).resolve().parent
    host = load_plugins()
    tables = [load_table(root / f"table{i}.toml", host) for i in (1, 2, 3)]
    cells, _ = plan(host, tables)
    return len(cells), shared_units(cells)


def _h(x: float) -> str:
    return fmt_h(x)


def _peak_gib(row: dict[str, Any]) -> float:
    """A dry-run cell's peak RSS over its stages, GiB (0 when it recorded none)."""
    return max((st["peak_rss_mb"] for st in row.get("stages") or []), default=0.0) / 1024


def render_scale(dry: dict, net: dict, prof: Any, rows: list[dict], n_cells: int, levels: list[list[Any]],
                 api: dict | None) -> str:
    """docs/scale.md as text."""
    p = dry["provenance"]
    cells = dry["cells"]
    done = [n for n, r in cells.items() if r.get("status") == "done"]
    rate = gpu_rate()
    total = sum(r["gpu_h"] for r in rows)
    by = lambda pred: sum(r["gpu_h"] for r in rows if pred(r))  # noqa: E731
    ep, c6, vit = int(prof.dig.epochs), 6 * net["cdm-unet"]["fwd"], net["dig-vit"]["train"]
    cache_share = (c6 + ep * vit) / (ep * (c6 + vit))
    loads = [r[k][0] for r in cells.values() for k in ("load_start", "load_end") if r.get(k)]
    lo, hi = (min(loads), max(loads)) if loads else (float("nan"), float("nan"))
    passes = dry.get("passes", [])
    cell_min = sum(float(cells[n].get("wall_s") or 0) for n in done) / 60
    longest = sorted(done, key=lambda n: -float(cells[n].get("wall_s") or 0))[:3]
    n_big = sum(1 for n in done if _peak_gib(cells[n]) >= 18)
    cdm_row = next(r for r in rows if r["stage"] == "train/cdm")
    dig_row = next(r for r in rows if r["stage"] == "train/dig")
    L = [
        "# Paper scale: GPU-hours, GPU memory, storage and the cluster layout",
        "",
        "What running Tables 1-3 on the **paper** profile over the full BraTS21 and FLARE21 costs, "
        "projected from FLOP counts of the networks in this tree and checked against a CPU dry run of "
        "every method at the paper's image size. This page is generated: "
        "`python benchmarks/paper_dryrun.py --plan-only` rewrites it from the stored dry run "
        "(`benchmarks/results/paper_dryrun.json`); do not edit it by hand.",
        "",
        "## Status",
        "",
        f"- **CPU dry run** (`benchmarks/results/paper_dryrun.md`): {len(done)} of {len(cells)} cells finished, "
        + (f"in {1 + len(passes)} runs: the first on {p['date']} at commit `{(p.get('git_sha') or 'unknown')[:12]}`, "
           f"the last on {passes[-1]['date']} at commit `{(passes[-1].get('git_sha') or 'unknown')[:12]}` (each "
           "cell's row names its run; a later run re-ran only cells that had not finished, reusing the models "
           "earlier runs had cached)" if passes else
           f"on {p['date']}, commit `{(p.get('git_sha') or 'unknown')[:12]}`")
        + f"; {p['machine']}; the finished cells' wall times add up to {cell_min:.0f} min (longest: "
        + ", ".join(f"{n} {float(cells[n].get('wall_s') or 0) / 60:.0f} min" for n in longest)
        + f"): one worker running every cell would take over an hour here, and two side by side are limited by "
        f"memory ({n_big} cells peak at 18 GiB or more of this machine's 23). The machine was "
        f"shared with other developers' jobs in the first runs (1-minute load average {lo:.0f}-{hi:.0f} on 2 cores "
        "at the cells' starts and ends, our processes at nice 10): "
        "its times are upper bounds, and they are not used for the GPU projection below.",
        "- **Device check: has not run yet.** No GPU has been available to this project. When one is, run",
        "",
        "  ```bash",
        "  pip install -e '.[dev]'            # CUDA build of torch, no constraints-cpu.txt",
        "  timeout 600 python benchmarks/gpu_check.py --iterations 50 --bf16",
        "  ```",
        "",
        "  It runs every method's paper-profile cell on CUDA with trainings cut short and writes "
        "`benchmarks/results/gpu.md` (per stage: wall time, slices/s, peak GPU memory; finite results). It starts "
        "no cell after 480 s and stops a running one at 570 s, so the file is written within the 10 minutes. "
        "Its measured throughput then replaces the assumed utilisation below.",
        "",
        "## Assumptions",
        "",
        f"- **GPU**: one {GPU['name']} class card, dense BF16 peak {GPU['peak_bf16_tflops']:.0f} TFLOP/s, of which "
        f"**{GPU['utilisation']:.0%} is assumed reached end to end** ({rate / 1e12:.0f} TFLOP/s effective) with "
        "`--bf16`. Without `--bf16` (fp32 weights, TF32 matrix units at half the peak) every hour below doubles. "
        "The utilisation is an assumption until the device check measures it.",
        "- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` over one forward (and backward) of each network "
        "as built by this tree at the paper profile's shapes, on the meta device (`benchmarks/paper_costs.py`); "
        "matrix products and convolutions only (normalisation and element-wise work add a few per cent).",
        "- **Data**: BraTS21 1,251 cases x 155 axial slices (193,905 slices), split 1,001 / 125 / 125 cases; "
        "30% of slices positive (the paper's 5,802 positive test slices over 125 test cases). FLARE21 361 cases, "
        "split 211 / 50 / 100, **assumed** 96 slices per case (34,656 slices) and positive shares of 25% (kidney), "
        "15% (spleen), 35% (liver). Test sets add 1,073 negatives per 5,802 positives. Training counts every "
        "slice of the training cases (an upper bound: ambiguous slices are left out).",
        f"- **Schedules**: the paper profile: classifier {prof.classifier.epochs} epochs (batch {prof.classifier.batch}), "
        f"SEAM {prof.seam.epochs} epochs, AME-CAM SimCLR {prof.amecam.simclr_epochs} + {prof.amecam.stage1_epochs} + "
        f"{prof.amecam.stage2_epochs} epochs (batch {prof.amecam.batch}), CDM {int(prof.cdm.iterations):,} iterations "
        f"(batch {prof.cdm.batch}, EMA {prof.cdm.ema}), noisy classifier {int(prof.noisy_classifier.iterations):,} "
        f"iterations (batch {prof.noisy_classifier.batch}), DiG {prof.dig.epochs} epochs (batch {prof.dig.batch}), "
        f"FSL {int(prof.fsl.iterations):,} iterations (batch {prof.fsl.batch}), CLDF {prof.cldf.epochs} epochs "
        f"(batch {prof.common.cldf_batch}). Trainings stop at these caps (the convergence rule may stop them "
        "earlier: the hours are upper bounds in that respect).",
        "- **Tables**: Table 1 on four tasks (BraTS, FLARE kidney, spleen, liver), Tables 2 and 3 on BraTS and "
        "kidney; every model is trained once per task and shared by the cells that use it; one seed.",
        "- **Not counted**: data preparation (CPU, once), k-means and Otsu (CPU-side, seconds per slice at most), "
        "evaluation, checkpoint writes.",
        "",
        "## GPU-hours per stage",
        "",
        f"Per stage: the work counted, the FLOPs over all tasks it runs for, and GPU-hours at {rate / 1e12:.0f} "
        "TFLOP/s. Memory is the estimated peak of one process (next section).",
        "",
        "| stage | tasks | work counted | TFLOP | GPU-h, BraTS | GPU-h, all tasks | est. peak GiB | 40 GB | 80 GB |",
        "|---|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        brats_h = r["per_task"].get("brats", 0.0) / rate / 3600
        fit40 = "fits" if r["mem_gib"] * 2**30 <= 40e9 else "**no**"
        fit80 = "fits" if r["mem_gib"] * 2**30 <= 80e9 else "**no**"
        L.append(f"| {r['stage']} | {len(r['tasks'])} | {r['note']} | {r['flops'] / 1e12:,.0f} | {_h(brats_h)} | "
                 f"{_h(r['gpu_h'])} | {r['mem_gib']:.1f} | {fit40} | {fit80} |")
    L.append(f"| **total, Tables 1-3** | | | {sum(r['flops'] for r in rows) / 1e12:,.0f} | "
             f"{_h(sum(r['per_task'].get('brats', 0.0) for r in rows) / rate / 3600)} | **{_h(total)}** | | | |")
    L += [
        "",
        f"- **Total: about {total:,.0f} GPU-hours** at the assumed {GPU['utilisation']:.0%} utilisation with `--bf16` "
        f"(about {2 * total:,.0f} in fp32), or {total / 24:,.1f} GPU-days. Trainings are "
        f"{by(lambda r: r['kind'] == 'train') / total:.0%} of it, maps and refinement the rest.",
        f"- **DiG dominates** ({_h(dig_row['gpu_h'])} GPU-h): with the feature cache off (the paper profile's "
        f"setting), every DiG training step recomputes 6 CDM passes per slice, in each of the {prof.dig.epochs} epochs. "
        f"`--set dig.feature_cache=true` computes them once per slice ({cache_share:.0%} of those hours remain: "
        "the ViT's own training) but needs "
        "the storage in the table below; that trade is the lever if DiG's hours matter.",
        f"- **The CDM** costs {_h(cdm_row['per_task']['brats'] / rate / 3600)} GPU-h per task "
        f"({_h(cdm_row['gpu_h'])} for four) and is the longest single job that everything diffusion-based "
        "waits for (see the layout below).",
        "",
        "## GPU memory per stage",
        "",
        "Estimated, not measured (the device check will measure it): weights + gradients + AdamW moments = "
        "16 bytes per parameter for a trained network (20 with the CDM's EMA copy, 4 for a frozen one); "
        "activations = the bytes autograd saves for backward per slice (counted on the meta device, fp32, a "
        "tensor saved twice counted twice: an upper bound) times the batch; for stages without autograd, the "
        "peak bytes of activations alive at once in one forward (meta device, outputs tracked until freed) "
        "times the batch; DiG adds its diffusion input "
        f"({net['_meta']['dig_feat_in']} x {prof.dig.grid} x {prof.dig.grid} floats per slice); plus "
        f"{CONTEXT_GIB} GiB for the CUDA context and library workspaces. `--bf16` roughly halves the activation "
        "part. Map stages run in batches of the classifier batch (64 slices).",
        "",
    ]
    ov = dict(o.split("=", 1) for o in dry["overrides"])
    measured = [st["peak_rss_mb"] / 1024 for r in cells.values() for st in r.get("stages") or []
                if st["stage"] == "train/cdm"]
    if measured:
        b = int(ov.get("cdm.batch", prof.cdm.batch))
        u = net["cdm-unet"]
        L.append(f"- Check on the CPU: the dry run's CDM training (batch {b}) peaked at {max(measured):.1f} GiB RSS; "
                 f"the same rule predicts {(u['params'] * 20 + u['saved_bytes'] * b) / 2**30:.1f} GiB "
                 f"({u['params'] / 1e6:.0f} M x 20 B + {b} x {u['saved_bytes'] / 2**30:.2f} GiB saved), without the "
                 "process's own baseline.")
    over40 = [r for r in rows if r["mem_gib"] * 2**30 > 40e9]
    over80 = [r for r in rows if r["mem_gib"] * 2**30 > 80e9]
    L.append("- Over 40 GB: " + (", ".join(f"{r['stage']} ({r['mem_gib']:.0f} GiB at batch {r['batch']})"
                                          for r in over40) or "none") + ".")
    L.append("- Over 80 GB: " + (", ".join(f"{r['stage']} ({r['mem_gib']:.0f} GiB at batch {r['batch']})"
                                          for r in over80) or "none") + ".")
    for card, label in ((40e9, "40 GB"), (80e9, "80 GB")):
        for r in (r for r in rows if r["stage"] == "maps/mg" and r["mem_gib"] * 2**30 > card):
            fit = halved_fit(r, card)
            L.append(f"- maps/mg on a {label} card: MG halves its pass by itself when the device runs out of memory "
                     + (f"and settles at {fit[0]} noisy images per pass ({fit[1]:.1f} GiB by the same estimate); "
                        f"the maps are the same up to rounding, in {r['batch'] // fit[0]}x as many passes."
                        if fit else "but not even one image fits by this estimate."))
    L += [
        "- Where a training's estimate is over a card's memory, the fixes are the batch knobs of the profile "
        "(`--set amecam.batch=...`, `--set classifier.batch=...`, which also sets the map batch) or `--bf16`. "
        "Set them before the first long training: every artifact key holds the whole resolved profile, so a "
        "`--set` added later retrains every model of the run, the CDM included. MG needs no knob: its pass of "
        "at most 128 noisy images (two timesteps of a 64-slice map batch) is halved on out-of-memory. "
        "These are upper bounds; the device check's `peak GPU memory` column decides.",
        "",
        "## Storage",
        "",
        "| what | size | how |",
        "|---|---:|---|",
    ]
    for what, size, how in storage(prof, net, levels):
        L.append(f"| {what} | {size} | {how} |")
    L += [
        "",
        f"Host memory: the slice store is memory-mapped, so a worker holds only its batches; the dry run's "
        f"peak RSS per cell (CPU, paper networks, batches cut) is in the result file, "
        f"{max((_peak_gib(r) for r in cells.values()), default=0):.1f} "
        "GiB at most. `slurm[mem_gb=32]` (the default) leaves room for that plus the data loader.",
        "",
        "## SLURM layout: what runs in parallel, what waits",
        "",
        f"`wsss-bench bench benchmarks/table1.toml benchmarks/table2.toml benchmarks/table3.toml --profile paper "
        f"--bf16 --executor 'slurm[partition=gpu,gpus=1,timeout_min=...]'` plans {n_cells} unique cells and runs "
        "them in three job arrays, one after the other (each array's jobs run in parallel up to "
        "`parallelism`, default 64; the next array is submitted when every job of the previous one has ended):",
        "",
        f"1. **Phase 1.1, {len(levels[0])} jobs**: one per (task, map source) and one gate classifier per task. "
        "Each trains the models its source needs and writes the test maps. Jobs that need the same model (the "
        "task's CDM behind `cdm` and `dig`, the CAM classifier behind `gradcam`, `scorecam`, `layercam`) meet at "
        "that model's file lock in the shared cache: the first trains it, the others **wait holding their GPU**. "
        f"The longest chain is the `dig` job of a task: CDM ({_h(cdm_row['per_task']['brats'] / rate / 3600)} h) "
        f"then DiG ({_h(dig_row['per_task']['brats'] / rate / 3600)} h on BraTS).",
        f"2. **Phase 1.2, {len(levels[1])} jobs**: one per refiner and its seed sources per task: "
        f"{sum(u.spec.startswith('cldf') for u in levels[1])} CLDF decoders (each trains one decoder with feature "
        f"passes over the positive training slices and refines the test slices), "
        f"{sum(u.spec.startswith('fsl') for u in levels[1])} FSL UNets and "
        f"{sum(u.spec.startswith('threshold') for u in levels[1])} threshold units (seconds). They start only "
        "after phase 1.1 has ended and reuse its cached maps and models.",
        f"3. **Phase 2, {n_cells} jobs**: the cells; everything expensive is a cache hit by now (minutes each).",
        "",
        "Consequences for a cluster run:",
        "",
        "- `timeout_min` must cover the longest job, including its wait at a lock: the DiG job of BraTS "
        f"(CDM + DiG, {_h((cdm_row['per_task']['brats'] + dig_row['per_task']['brats']) / rate / 3600)} h at the "
        "assumed rate). The default 1,440 min is too short for that job; an interrupted job resumes from its "
        "last checkpoint when resubmitted (`bench --failed`).",
        "- The cache directory must be on a file system shared by all nodes whose `flock` works across nodes "
        "(NFSv4, Lustre with `flock`, GPFS); otherwise two nodes train the same model at once.",
        "- Waiting jobs hold their GPU idle: per task, the `cdm` and `dig` jobs both need the CDM, so one of them "
        "waits up to the CDM's hours; count that in the allocation.",
        f"- Wall time with enough GPUs is the critical path: phase 1.1's longest chain, then the longest "
        "decoder, then phase 2; on one GPU it is the total GPU-hours.",
        "",
        "## The CPU dry run",
        "",
        "One `wsss-bench run --profile paper --device cpu` cell per method of Tables 1-3, at 256 px with "
        "paper-width networks, on small paper-size phantoms (in-plane 240 x 240 brain and 512 x 512 abdomen "
        "volumes, 4 cases of 10 thick slices each), every training cut to one epoch or two iterations through "
        "`--set`; map stages whose one slice would take minutes of CPU time ran a stated fraction of their "
        "per-slice work (fewer DDIM steps, timesteps or ScoreCAM channels). What ran, what did not and why, "
        "per-stage times and peak RSS: `benchmarks/results/paper_dryrun.md`.",
        "",
    ]
    L += [f"- {name}: {row.get('status')}" + (f" ({row.get('why')})" if row.get("why") else "")
          for name, row in cells.items()]
    if api:
        L += ["", "Network-level checks at paper size (Python API, one slice): " +
              "; ".join(f"{k}: {v}" for k, v in api.items()) + "."]
    return "\n".join(L) + "\n"


def render_result(dry: dict, net: dict) -> str:
    """benchmarks/results/paper_dryrun.md as text."""
    p = dry["provenance"]
    L = ["# CPU dry run of the paper profile at full image size (trainings cut to a few steps)", "",
         f"- command: `{p['command']}`", f"- git: `{p.get('git_sha')}`",
         f"- phantom generator: {p['phantom_generator']}", f"- profile: paper, with every cell's `--set` below",
         f"- machine: {p['machine']}; run {p['date']}; wall "
         f"{(dry.get('wall_s', 0) + dry.get('wall_s_before', 0)) / 60:.0f} min"
         + "".join(f"; later run `{q['command']}` at {q['date']}, commit `{(q.get('git_sha') or 'unknown')[:12]}`"
                   for q in dry.get("passes", [])),
         "- **the machine was shared** with other developers' jobs; the dry run ran at `nice -n 10` and the 1-minute "
         "load average at each cell's start and end is recorded next to its time: every wall time and per-step time "
         "below is an **upper bound measured under contention**, not this CPU's speed",
         "- the numbers of these cut trainings are not results: the dry run checks that each paper-profile path runs "
         "at 256 px with paper-width networks and records what it costs", "",
         f"Cell command (per cell `--task/--cam/--method/--backbone`; `--seed {dry['seed']}`, whose case split of the "
         "4-case phantoms has positive slices in train, val and test): `wsss-bench run --profile paper --device cpu "
         + " ".join(f"--set {o}" for o in dry["overrides"]) + "`", "",
         "Map stages run a stated fraction of their per-slice paper work (the cost model counts the full work):", ""]
    L += [f"- `{k}`: {v}" for k, v in dry["reduced"].items()]
    L += ["", "## Cells", ""] + cell_lines(dry)
    shapes = [f"- {name}: `{key}` {json.dumps(v, sort_keys=True)}" for name, row in dry["cells"].items()
              for key, v in sorted((row.get("records") or {}).items()) if key.startswith("features/")]
    L += ["", "Every map source writes (slices, 256, 256) float32 maps; native resolutions and feature sizes "
          "are in the network table below. Feature sizes the cells recorded (`D` = channels per pixel):", ""]
    L += shapes or ["- none recorded (no CLDF cell finished)"]
    if dry.get("api"):
        L += ["", "## Network-level checks (Python API, paper size)", ""]
        L += [f"- {k}: {v}" for k, v in dry["api"].items()]
    L += ["", "## Networks at the paper profile (per slice, 256 px, 4 channels)", "",
          "FLOPs from `torch.utils.flop_counter.FlopCounterMode` on the meta device; saved-for-backward bytes "
          "from a saved-tensor hook (fp32; a tensor saved twice counts twice).", ""] + network_lines(net)
    L += ["", "## CPU rate implied by the dry run (checks the FLOP counts)", "",
          "Stages with a known number of samples; their time includes checkpoint writes and the contention "
          "above, so the rate is a lower bound on this CPU's speed.", ""] + cpu_rates(dry, net, dry["overrides"])
    return "\n".join(L) + "\n"


def render(dry: dict) -> None:
    """Write benchmarks/results/paper_dryrun.md and docs/scale.md (atomically)."""
    import os
    from pathlib import Path

    import paper_costs
    from wsss_bench.profiles import load_profile

    prof = load_profile("paper")
    notes = dry.get("notes") or {}
    for name, row in dry["cells"].items():  # a killed cell is not a failure of the code
        if row.get("exit") is not None and row["exit"] < 0:
            row["status"] = "stopped"
            row["why"] = (notes.get(name) or {}).get("text") or \
                f"killed at the dry run's time limit (signal {-row['exit']})"
    net = paper_costs.network_costs(prof)
    n_cells, levels = slurm_units()
    rows = stage_table(net, prof, seed_sets(levels))
    root = Path(__file__).resolve().parents[1]
    for path, text in ((root / "benchmarks" / "results" / "paper_dryrun.md", render_result(dry, net)),
                       (root / "docs" / "scale.md", render_scale(dry, net, prof, rows, n_cells, levels, dry.get("api")))):
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        print(f"wrote {path.relative_to(root)}")
