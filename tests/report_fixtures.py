"""A synthetic, fully specified run directory for the report, figure, export and HTML tests.

Nothing is trained.  Smoke-size phantoms are written in the real layouts and stored as a slice
store, exactly as a run would; the "methods" are fixed transformations of the ground truth
(shifted, dilated, eroded, noisy), scored with the real metric, so the tables, figures and
exports see a run whose every number is known.  Predicted masks are stored with
:func:`wsss_bench.reporting.export_masks.save_predictions`, as the runner does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from wsss_bench.boundary import score_cell
from wsss_bench.data import phantom_abdomen, phantom_brain
from wsss_bench.data.readers import BratsDataset, Flare21Dataset
from wsss_bench.data.store import prepare_slices
from wsss_bench.running.rundir import save_predictions
from wsss_bench.metrics import GATES, apply_gate, dice_iou
from wsss_bench.profiles import load_profile

SIZE = 32
N_CASES = 8
FAILED = {"cell": {"task": "brats", "refiner": "threshold", "refiner_params": [],
                   "sources": [["seam", []]], "seed": 0},
          "method": "seam+threshold", "status": "failed",
          "error": "PluginError: SEAM ran out of memory (traceback in cells/x.error.txt)"}


def _methods(task: str) -> dict[str, tuple[str, str, callable]]:
    """method label -> (cam column, refiner column, transform(gt (n,S,S), rng) -> pred)."""
    cldf_cam = "amecam+mg" if task == "brats" else "layercam+mg"

    def shift(gt, rng):  # a CAM that is off by 3 pixels and fires on negatives too
        out = np.roll(gt, 3, axis=2)
        out[:, 2:6, 2:6] |= rng.random(len(gt))[:, None, None] < 0.5
        return out

    def dilate(gt, rng):
        return ndi.binary_dilation(gt, structure=np.ones((1, 3, 3)), iterations=2)

    def erode(gt, rng):
        keep = ndi.binary_erosion(gt, structure=np.ones((1, 3, 3)))
        return np.where(rng.random(len(gt))[:, None, None] < 0.5, keep, gt)

    def noisy(rate):
        def f(gt, rng):
            flip = rng.random(gt.shape) < rate
            return np.where(flip, ~gt, gt) & ndi.binary_dilation(gt, iterations=3)
        return f

    out = {"gradcam+threshold": ("gradcam", "threshold", shift),
           "layercam+threshold": ("layercam", "threshold", dilate),
           f"{cldf_cam}+cldf": (cldf_cam, "cldf", erode),
           "fsl": ("", "fsl", lambda gt, rng: gt.copy())}
    if task == "brats":  # the Fig. 4 ablation cells
        for k, v, rate in (("out_dim", 4, 0.35), ("out_dim", 8, 0.2), ("out_dim", 32, 0.1),
                           ("decoder_depth", 2, 0.3), ("decoder_depth", 6, 0.12)):
            out[f"{cldf_cam}+cldf[{k}={v}]"] = (cldf_cam, f"cldf[{k}={v}]", noisy(rate))
    return out


def build_run(root: Path, tasks=("brats", "flare21-kidney"), boundary: bool = False) -> Path:
    """Write phantoms, a slice store and a run directory under ``root``; return the run dir.

    ``boundary``: also the HD95/ASSD columns (per slice and per case volume), scored by the
    runner's own function with the store's spacing."""
    profile = load_profile("smoke")
    cache = root / "cache"
    run = root / "run"
    run.mkdir(parents=True)
    frames, data_entries = [], {}
    for task in tasks:
        if task == "brats":
            src, folder = BratsDataset(), root / "brats"
            phantom_brain.write_brain_phantom(folder, profile, 0, N_CASES)
            fg = None
        else:
            src, folder = Flare21Dataset(), root / "flare"
            phantom_abdomen.write_abdomen_phantom(folder, profile, 0, N_CASES, layout="official")
            fg = src.tasks[task].foreground
        store = prepare_slices(src, folder, SIZE, cache, jobs=1)
        labels_all = np.asarray(store.labels)
        gt_all = labels_all > 0 if fg is None else np.isin(labels_all, fg)
        frac = gt_all.reshape(len(gt_all), -1).mean(1)
        tissue = store.index["tissue_fraction"].to_numpy()
        pos = np.flatnonzero(frac > 0.01)
        neg = np.flatnonzero((frac == 0) & (tissue >= 0.1))[::4]
        rows = np.sort(np.concatenate([pos, neg]))
        gt = gt_all[rows]
        label = (frac[rows] > 0.01).astype(int)
        case_ids = store.index["case_id"].to_numpy().astype(str)[rows]
        z = store.index["z"].to_numpy().astype(int)[rows]
        rng = np.random.default_rng(7)
        p1 = np.clip(label * 0.7 + rng.normal(0.15, 0.2, len(rows)), 0, 1)
        data_entries[f"{task}/seed0"] = {"task": task, "dataset": src.name, "data": "phantom",
                                         "data_root": str(folder), "image_size": SIZE, "store_key": store.key}
        spacing = np.array([store.meta["spacing"]["cases"][c] for c in case_ids])
        depth = store.index.groupby("case_id").size().to_dict()
        for k, (method, (cam, refiner, fn)) in enumerate(_methods(task).items()):
            pred = fn(gt, np.random.default_rng(100 + k)).astype(bool)
            save_predictions(run, f"{task}-{k:02d}", case_ids, z, pred, task=task, method=method, seed=0)
            passes = {gate: apply_gate(pred, gate, label, p1)[1] for gate in GATES}
            extra = score_cell(pred, gt, passes, case_ids, z, spacing, depth) if boundary else {}
            for gate in GATES:
                gated, passed = apply_gate(pred, gate, label, p1)
                d, i = dice_iou(gated, gt)
                frames.append(pd.DataFrame({
                    "task": task, "method": method, "cam": cam, "refiner": refiner, "gate": gate,
                    "case_id": case_ids, "z": z, "split": "test", "label": label, "fg_fraction": frac[rows],
                    "gt_area": gt.reshape(len(gt), -1).sum(1), "pred_area": gated.reshape(len(gt), -1).sum(1),
                    "gate_pass": passed, "classifier_p1": p1, "dice": d, "iou": i, "seed": 0,
                    "params": "{}", "profile": "smoke", "data": "phantom", **extra.get(gate, {})}))
    pd.concat(frames, ignore_index=True).to_parquet(run / "results.parquet", index=False)
    manifest = {"command": "wsss-bench run (synthetic fixture)", "config": {"cache_dir": str(cache)},
                "profile": dict(profile), "data": data_entries, "cells": [FAILED]}
    (run / "manifest.json").write_text(json.dumps(manifest, default=str))
    return run
