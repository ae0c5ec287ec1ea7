"""CPU dry run of the paper profile at full image size, and the GPU-hour plan it feeds.

    nice -n 10 python benchmarks/paper_dryrun.py            # cells (~1 h on 2 shared cores), then the plan
    python benchmarks/paper_dryrun.py --plan-only           # re-render the result file and docs/scale.md

What it does and why: the paper profile (256 px, full-width ResNet-50 at output stride 32, the
169 M-parameter CDM UNet with attention, DiG at patch 16 / depth 12, CLDF at D = 1024, ...) is
meant for a GPU node, and before this script no code path of it had run at that size.  The
dry run runs one ``wsss-bench run --profile paper --device cpu`` cell per method of Tables 1-3
on small paper-size phantoms (the paper's in-plane size, 4 cases of 10 thick slices) with every
training cut to one or two steps through ``--set``, and records per stage the wall time, the
peak RSS and the load average (the machine is shared: every per-step time is an upper bound).
Where one test slice of a map stage would take minutes on a CPU core, the cell runs a
proportional slice of the work (fewer DDIM steps, t values or ScoreCAM channels: see
``REDUCED``) and the cost model scales it back by the stated factor.

Then :mod:`paper_costs` counts the FLOPs of one step of every network at the paper's batch
(``torch.utils.flop_counter`` on the meta device: exact shapes, no compute), the parameters and
the tensors saved for backward, and writes ``benchmarks/results/paper_dryrun.md`` and
``docs/scale.md`` (GPU-hours, GPU memory, storage, SLURM layout) from those numbers and the
assumptions stated there.  The cell results live in ``benchmarks/results/paper_dryrun.json``
so the plan can be re-rendered without re-running the cells.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import ROOT, command_line, provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
JSON_OUT = RESULTS / "paper_dryrun.json"
SEED = 1  # the --seed whose case split of the 4-case phantoms has positives in train, val and test

#: small paper-size phantoms: the paper's in-plane size, 4 cases, 10 thick slices each
DATA = ["brain_phantom.cases=4", "brain_phantom.volume=[240,240,10]", "brain_phantom.voxel_mm=[1.0,1.0,16.0]",
        "abdomen_phantom.cases=4", "abdomen_phantom.volume=[512,512,10]", "abdomen_phantom.voxel_mm=[0.8,0.8,24.0]"]
#: every training cut to one epoch or two iterations; the largest batches cut where one step
#: would take minutes (per-step cost is linear in the batch, the cost model scales it back)
TRAIN = ["classifier.epochs=1", "seam.epochs=1", "amecam.simclr_epochs=1", "amecam.stage1_epochs=1",
         "amecam.stage2_epochs=1", "dig.epochs=1", "cldf.epochs=1",
         "cdm.iterations=2", "cdm.batch=2", "noisy_classifier.iterations=2", "noisy_classifier.batch=4",
         "fsl.iterations=2", "fsl.batch=4", "mg.t_ref=[200]"]
OVERRIDES = DATA + TRAIN
#: map-stage work cut in proportion: (what, fraction of the paper's per-slice work that ran)
REDUCED = {
    "cdm[steps=1]": "CDM saliency: 1 of the 10 DDIM steps (2 of 20 UNet passes per slice)",
    "mg.t_ref=[200]": "MG: 1 of the 20 reference timesteps (1 of 20 noisy-classifier passes per slice)",
    "cdm[t_ref=100]": "CLDF CDM features: 1 of the 4 feature timesteps",
    "unet-encoder[t_ref=100]": "UNet-encoder features: 1 of the 4 feature timesteps",
    "scorecam[layer=layer1]": "ScoreCAM: layer1's 256 channels instead of layer4's 2048 (4 chunks of 64, not 32)",
}
CDM_BB = "cdm[t_ref=100]"

#: (name, task, --cam, --method, --backbone, run after): one cell per method of Tables 1-3
CELLS = [
    ("GradCAM (T1)", "brats", "gradcam", "threshold", None, None),
    ("AME-CAM (T1)", "brats", "amecam", "threshold", None, None),
    ("CDM (T1)", "brats", "cdm[steps=1]", "threshold", None, None),
    ("CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)", "brats", "amecam+mg", "cldf", CDM_BB, "CDM (T1)"),
    ("CLDF kidney (T1, T2 CDM)", "flare21-kidney", "layercam+mg", "cldf", CDM_BB, None),
    ("DiG (T1)", "brats", "dig", "threshold", None, "CDM (T1)"),
    ("ScoreCAM (T1)", "brats", "scorecam[layer=layer1]", "threshold", None, "GradCAM (T1)"),
    ("LayerCAM (T1, T3)", "brats", "layercam", "threshold", None, "GradCAM (T1)"),
    ("MG (T3)", "brats", "mg", "threshold", None, "CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)"),
    ("SEAM (T1)", "brats", "seam", "threshold", None, None),
    ("FSL (T1)", "brats", None, "fsl", None, None),
    ("CLDF ResNet18 (T2)", "brats", "amecam+mg", "cldf", "resnet18", "CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)"),
    ("CLDF ResNet50 (T2)", "brats", "amecam+mg", "cldf", "resnet50", "CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)"),
    ("CLDF UNet encoder (T2)", "brats", "amecam+mg", "cldf", "unet-encoder[t_ref=100]",
     "CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)"),
    ("AME-CAM+CL (T3)", "brats", "amecam", "cldf[use_mg=false]", CDM_BB, "CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)"),
    ("MG+CL (T3)", "brats", "mg", "cldf", CDM_BB, "CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)"),
    ("LayerCAM+CL (T3)", "brats", "layercam", "cldf[use_mg=false]", CDM_BB, "CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)"),
    ("LayerCAM+MG+CL (T3)", "brats", "layercam+mg", "cldf", CDM_BB, "CLDF (T1, T2 CDM, T3 AME-CAM+MG+CL)"),
]


def cell_command(task: str, cam: str | None, method: str, backbone: str | None, out: Path, cache: Path) -> list[str]:
    """The ``wsss-bench run`` command line of one dry-run cell."""
    cmd = [sys.executable, "-m", "wsss_bench.cli", "run", "--profile", "paper", "--device", "cpu",
           "--seed", str(SEED), "--task", task, "--method", method, "--out", str(out), "--cache-dir", str(cache)]
    cmd += ["--cam", cam] if cam else []
    cmd += ["--backbone", backbone] if backbone else []
    for o in OVERRIDES:
        cmd += ["--set", o]
    return cmd


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def run_cell(spec: tuple, runs: Path, cache: Path) -> dict:
    """Run one cell in a subprocess; its stages (time, peak RSS), records and the load average."""
    name, task, cam, method, backbone, _ = spec
    slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
    out = runs / slug
    cmd = cell_command(task, cam, method, backbone, out, cache)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "WSSS_BENCH_NO_PROGRESS"}  # stage lines on stderr
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    row = {"name": name, "task": task, "cam": cam, "method": method, "backbone": backbone,
           "wall_s": round(wall, 1), "load_start": [round(v, 2) for v in load0],
           "load_end": [round(v, 2) for v in os.getloadavg()], "exit": done.returncode,
           "command": "wsss-bench " + " ".join(cmd[3:]).replace(str(out), "OUT").replace(str(cache), "CACHE")}
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        cells = m.get("cells") or []
        cell = cells[0] if cells else {}
        row["status"] = cell.get("status", "missing")
        row["stages"] = cell.get("stages") or []
        row["records"] = {k: v for k, v in (cell.get("records") or {}).items()
                          if k.startswith(("features/", "match/")) or "dim" in str(v)[:200]}
        row["error"] = cell.get("error")
        row["data"] = {k: {s: {"n_pos": d["n_pos"], "n_neg": d["n_neg"]} for s, d in v["splits"].items()}
                       for k, v in (m.get("data") or {}).items()}
    if done.returncode != 0:
        row["status"] = "failed"
        lines = done.stderr.strip().splitlines()
        row["stages_done"] = [ln for ln in lines if ": done in " in ln and ln.split()[1:2] == ["stage"]][-12:]
        row["stderr_tail"] = [ln for ln in lines if " stage " not in ln][-6:]
    return row


def run_cells(runs: Path, cache: Path, budget_min: float, workers: int, only: list[str],
              json_out: Path = JSON_OUT) -> dict:
    """Run :data:`CELLS` on ``workers`` threads in list order, each cell after its prerequisite;
    a cell not started within ``budget_min`` minutes is recorded as not run."""
    runs.mkdir(parents=True, exist_ok=True)
    todo = [c for c in CELLS if not only or c[0] in only]
    selected = {c[0] for c in todo}
    state: dict = {"provenance": provenance(command_line(), profile="paper (with the overrides below)",
                                            note_phantom="brain-2, abdomen-2 (small paper-size phantoms)"),
                   "overrides": OVERRIDES, "reduced": REDUCED, "seed": SEED, "cells": {}, "started": time.time()}
    if only and json_out.exists():  # a second pass over some cells: keep the others' rows
        before = json.loads(json_out.read_text())
        before.setdefault("passes", []).append({"command": command_line(), "cells": only,
                                                "date": time.strftime("%Y-%m-%d %H:%M %Z")})
        before["wall_s_before"] = before.get("wall_s", 0.0) + before.get("wall_s_before", 0.0)
        state = before
    lock = threading.Lock()
    finished: set[str] = set()
    t_start = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                ready = [c for c in todo if c[5] is None or c[5] in finished or c[5] not in selected]
                pending = [c for c in todo if c not in ready]
                if not todo:
                    return
                if not ready:
                    spec = None
                else:
                    spec = ready[0]
                    todo.remove(spec)
            if spec is None:
                if not pending:
                    return
                time.sleep(5)
                continue
            if (time.perf_counter() - t_start) / 60 > budget_min:
                row = {"name": spec[0], "status": "not run", "why": f"time budget of {budget_min:g} min spent"}
            else:
                print(f"{time.strftime('%H:%M:%S')} start {spec[0]}", flush=True)
                row = run_cell(spec, runs, cache)
                print(f"{time.strftime('%H:%M:%S')} {row.get('status')} {spec[0]} in {row.get('wall_s')} s",
                      flush=True)
            with lock:
                finished.add(spec[0])
                state["cells"][spec[0]] = row
                state["wall_s"] = round(time.perf_counter() - t_start, 1)
                _write_json(json_out, state)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state["wall_s"] = round(time.perf_counter() - t_start, 1)
    _write_json(json_out, state)
    return state


API_OUT = RESULTS / "paper_dryrun_api.json"


def api_checks() -> dict[str, str]:
    """Paper-size checks of DiG through the Python API, one slice: the network at patch 16 /
    depth 12 (one forward + backward with a random diffusion input of the real shape) and the
    shape of the diffusion input the paper CDM gives it (meta device, nothing computed).
    Run where the end-to-end DiG cell is too slow for a shared CPU."""
    import resource

    import torch

    from wsss_bench.nn import dig as D
    from wsss_bench.nn.diffusion import build_cdm
    from wsss_bench.profiles import load_profile

    prof = load_profile("paper")
    spec, s, c = dict(prof.dig), int(prof.image_size), 4
    feat_in = len(D.FEATURE_T) * D.feature_dim(prof.cdm_unet)
    out: dict[str, str] = {}
    with torch.device("meta"):
        unet = build_cdm(dict(prof.cdm_unet), c)
    feats = D.diffusion_features(unet, torch.rand(1, c, s, s, device="meta"),
                                 torch.randn(1, len(D.FEATURE_T), c, s, s, device="meta"), int(spec["grid"]),
                                 profile=prof)
    out["DiG diffusion input from the paper CDM (meta)"] = f"{tuple(feats.shape)} (expected (1, {feat_in}, 16, 16))"
    torch.manual_seed(0)
    model = D.DiG(c, s, spec, feat_in)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    res = model(torch.rand(1, c, s, s), torch.rand(1, feat_in, int(spec["grid"]), int(spec["grid"])))
    loss = sum(v.float().sum() for v in res.values() if isinstance(v, torch.Tensor) and v.requires_grad)
    loss.backward()
    wall = time.perf_counter() - t0
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in res.items() if isinstance(v, torch.Tensor))
    out["DiG ViT patch 16 / depth 12 + LFCA, one slice forward + backward (CPU)"] = (
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {wall:.1f} s at 1-min load "
        f"{load0:.1f}, gradients finite: {finite}, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB; "
        f"outputs {shapes}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-only", action="store_true", help="re-render the result file and docs/scale.md "
                    "from benchmarks/results/paper_dryrun.json without running cells")
    ap.add_argument("--runs", default="/tmp/paperscale-runs/dryrun")
    ap.add_argument("--cache-dir", default="/tmp/paperscale-cache")
    ap.add_argument("--budget-min", type=float, default=55.0, help="start no cell after this many minutes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="", help="cell names joined by ';' (default: all)")
    ap.add_argument("--api-only", action="store_true", help="run only the Python-API checks (DiG at paper size)")
    ap.add_argument("--note", action="append", default=[], metavar="CELL=TEXT",
                    help="record an observation about a cell (e.g. the kernel log line of a kill) in the stored run; "
                    "with --pass-name (and --plan-only), about that later run's row")
    ap.add_argument("--pass-name", default="", help="write this run's cells to paper_dryrun_pass-NAME.json, run "
                    "beside the main dry run; --plan-only merges them (their rows replace 'not run' rows)")
    args = ap.parse_args(argv)
    for note in args.note:
        cell, _, text = note.partition("=")
        if cell not in {c[0] for c in CELLS} or not text:
            print(f"--note {note!r}: expected CELL=TEXT with CELL one of the dry run's cell names")
            return 2
        stored = json.loads(JSON_OUT.read_text())
        stored.setdefault("notes", {})[cell] = {"text": text, "command": command_line(),
                                                **({"pass": args.pass_name} if args.pass_name else {})}
        _write_json(JSON_OUT, stored)
    if args.api_only:
        _write_json(API_OUT, api_checks())
    elif not args.plan_only:
        if not args.pass_name:
            _write_json(API_OUT, api_checks())
        only = [s.strip() for s in args.only.split(";") if s.strip()]
        out = RESULTS / f"paper_dryrun_pass-{args.pass_name}.json" if args.pass_name else JSON_OUT
        run_cells(Path(args.runs), Path(args.cache_dir), args.budget_min, args.workers, only, out)
    if not JSON_OUT.exists():
        print(f"{JSON_OUT} is missing: run the dry run first (without --plan-only)")
        return 2
    import paper_plan

    dry = json.loads(JSON_OUT.read_text())
    for extra in sorted(RESULTS.glob("paper_dryrun_pass-*.json")):
        other = json.loads(extra.read_text())
        dry.setdefault("passes", []).append({"command": other["provenance"]["command"],
                                             "date": other["provenance"]["date"], "cells": sorted(other["cells"]),
                                             "git_sha": other["provenance"].get("git_sha"), "name": extra.name})
        for name, row in other["cells"].items():
            have = dry["cells"].get(name, {})
            # a later pass replaces a row that did not finish (not run, killed, failed) with one
            # that did; a cell run in two passes keeps the run that did the work (the other found
            # it cached)
            unfinished = have.get("status") != "done" and row.get("status") == "done"
            if have.get("status") in (None, "not run") or unfinished or (
                    have.get("from_pass") and row.get("status") == "done" and row.get("wall_s", 0) > have.get("wall_s", 0)):
                dry["cells"][name] = {**row, "from_pass": extra.name}
    if API_OUT.exists():
        dry["api"] = json.loads(API_OUT.read_text())
    paper_plan.render(dry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
