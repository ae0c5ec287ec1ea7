"""Model quality and pseudo-mask quality: the facts printed next to every result row.

Two diagnostics that say whether a row measures a method or an under-trained model:

- **model quality**: for each trained model a cell's maps come from, how its training
  stopped (its stop reason: ``converged``, ``cap while improving``, ``cap on a plateau``,
  or ``fixed steps`` for a model trained for a fixed number of steps without a validation
  criterion), and the CAM classifier's test AUC, sensitivity and specificity.  A row is
  *marked* when one of its models stopped at its step cap while its validation criterion
  was still improving, or when the CAM classifier its maps come from has test AUC < 0.9
  (:data:`MIN_CLASSIFIER_AUC`);
- **pseudo-mask quality**: precision, recall and Dice of each map source's training-split
  masks (and of a refiner's training seeds) against the training masks, over the positive
  training slices; the share of background seeds inside the tissue.

Where the stop reason comes from: a trained model's ``<name>.train.json`` (what its
``train`` returned) holds a ``convergence`` record, at its top level or under one key per
stage (``{"stage1": {"convergence": {...}}, ...}``), with at least ``stop_reason``, and
where known ``criterion``, ``steps``, ``cap``, ``kept_step`` and ``best``.  A model without
such a record trained for a fixed number of steps.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from wsss_bench.lazy import torch
from wsss_bench.maps import binarize_cam, otsu_masks
from wsss_bench.metrics import overlap_counts

#: a classifier below this test AUC has not learned the task well enough to explain it
MIN_CLASSIFIER_AUC = 0.9
#: the stop reason that marks a row: stopped at the step cap while still improving
STOP_CAP_IMPROVING = "cap while improving"
#: the stop reason of a model trained for a fixed number of steps (no validation criterion)
STOP_FIXED = "fixed steps"
#: prefix of the cell records that hold one trained model's stop record
MODEL_RECORD = "model/"
#: the CAM classifier's shared-model name (its AUC is the one the mark looks at)
CLASSIFIER = "classifier"
_KEEP = ("stop_reason", "criterion", "steps", "cap", "kept_step", "best")


# ============================================================================ stop reasons
def _convergence_records(info: Any) -> list[tuple[str, dict[str, Any]]]:
    """(stage, record) of every convergence record in a model's train info ('' = the model)."""
    if not isinstance(info, Mapping):
        return []
    if isinstance(info.get("convergence"), Mapping):
        return [("", dict(info["convergence"]))]
    return [(str(k), dict(v["convergence"])) for k, v in info.items()
            if isinstance(v, Mapping) and isinstance(v.get("convergence"), Mapping)]


def stop_record(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a trained model's train info says about how it stopped (short, JSON-able).

    ``{"stop_reason": ..., "criterion": ..., "steps": ..., "cap": ..., "kept_step": ...,
    "best": ...}`` for a model with one convergence record; with several (one per stage),
    ``{"stop_reason": <the worst>, "stages": {stage: record}}``; without any,
    ``{"stop_reason": "fixed steps", "steps": ...}``.
    """
    found = _convergence_records(info or {})
    if not found:
        steps = None
        for key in ("iterations", "steps"):
            if isinstance((info or {}).get(key), (int, float)):
                steps = int(info[key])
                break
        return {"stop_reason": STOP_FIXED, "steps": steps}
    short = {stage: {k: rec.get(k) for k in _KEEP if k in rec} for stage, rec in found}
    if len(short) == 1 and "" in short:
        return short[""]
    reasons = [r.get("stop_reason") for r in short.values()]
    worst = STOP_CAP_IMPROVING if STOP_CAP_IMPROVING in reasons else (reasons[0] if len(set(reasons)) == 1
                                                                       else "; ".join(map(str, reasons)))
    return {"stop_reason": worst, "stages": short}


def read_stop_record(train_json: Path, reader: Callable[[Path], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """:func:`stop_record` of a stored ``<name>.train.json`` (plain JSON; a missing file: fixed steps).

    ``reader``: the training loop's public reader of the same records
    (``wsss_bench.nn.training.convergence_of``, ``{model or model/stage: record}``) where it
    offers one; the context passes it, so this core module does not import ``nn/``.
    """
    try:
        info = json.loads(Path(train_json).read_text())
    except (OSError, ValueError):
        return stop_record({})
    if reader is not None and isinstance(info, Mapping):
        found = reader(Path(train_json))
        if found:
            stem = Path(train_json).name[: -len(".train.json")]
            staged = {k[len(stem) + 1:] if k.startswith(stem + "/") else "": {"convergence": v}
                      for k, v in found.items()}
            return stop_record(staged[""] if list(staged) == [""] else staged)
    return stop_record(info)


# ============================================================================ the mark
def model_quality(records: Mapping[str, Any], classifier: Mapping[str, Any] | None,
                  map_models: Sequence[str]) -> dict[str, Any]:
    """The manifest's ``model_quality`` of a cell.

    ``records``: the cell's records (``model/<name>`` -> :func:`stop_record`); ``classifier``:
    the CAM classifier's test stats (``auc``, ``sensitivity``, ``specificity``);
    ``map_models``: the names of the models the cell's maps and masks come from (those made
    before the classifier gate ran).  ``flags`` lists why the cell's rows are marked (empty:
    not marked); ``classifier_auc_low`` says whether the classifier's AUC is below
    :data:`MIN_CLASSIFIER_AUC`, which also marks the cell's gate=classifier rows.
    """
    models = {k[len(MODEL_RECORD):]: dict(v) for k, v in records.items()
              if k.startswith(MODEL_RECORD) and isinstance(v, Mapping)}
    stats = dict(classifier or {})
    auc = stats.get("auc")
    low = auc is not None and float(auc) < MIN_CLASSIFIER_AUC
    flags = []
    if low and CLASSIFIER in map_models:
        flags.append(f"classifier test AUC {float(auc):.3f} < {MIN_CLASSIFIER_AUC}")
    for name in sorted(models):
        if name in map_models and models[name].get("stop_reason") == STOP_CAP_IMPROVING:
            flags.append(f"{name} stopped at its step cap while still improving")
    return {"classifier": stats, "models": models, "map_models": sorted(map_models),
            "classifier_auc_low": bool(low), "flags": flags}


def row_flags(quality: Mapping[str, Any] | None, gate: str) -> list[str]:
    """Why a row (a cell at one gate) is marked; the classifier's AUC also marks gate=classifier."""
    if not quality:
        return []
    flags = list(quality.get("flags") or [])
    auc = (quality.get("classifier") or {}).get("auc")
    auc_flagged = any(f.startswith("classifier") for f in flags)
    if gate == "classifier" and quality.get("classifier_auc_low") and not auc_flagged:
        flags.insert(0, f"classifier test AUC {float(auc):.3f} < {MIN_CLASSIFIER_AUC} (it gates this row)")
    return flags


# ============================================================================ pseudo-masks
def _ratio(num: int, den: int) -> float | None:
    return float(num) / float(den) if den else None


def rule_masks(maps: Any, rule: str, batch: int = 256) -> np.ndarray:
    """(N, S, S) bool masks of maps (N, S, S) under a source's mask rule: ``cam`` (min-max > 0.5)
    or ``otsu`` (Otsu on the min-max map), in batches."""
    if rule not in ("cam", "otsu"):
        raise ValueError(f"mask rule {rule!r}: expected 'cam' or 'otsu'")
    fn = binarize_cam if rule == "cam" else otsu_masks
    arr = np.asarray(maps)
    out = np.zeros(arr.shape, dtype=bool)
    for start in range(0, len(arr), batch):
        chunk = torch.from_numpy(np.array(arr[start:start + batch], dtype=np.float32))
        out[start:start + batch] = fn(chunk).numpy()
    return out


def mask_agreement(pred: Any, gt: Any) -> dict[str, Any]:
    """Precision, recall and Dice of masks ``pred`` against ``gt`` (both (B, H, W) bool).

    Pooled over all pixels of all slices (``tp``, ``pred``, ``gt`` are the pixel counts):
    precision = tp / |P|, recall = tp / |G|, Dice = 2 tp / (|P| + |G|), None where the
    denominator is 0; ``dice_slice_mean`` is the mean of the per-slice Dice (a slice with
    |P| = |G| = 0 counts 1).  Float64, no smoothing.
    """
    inter, p_area, g_area = overlap_counts(pred, gt)
    tp, np_, ng = int(inter.sum()), int(p_area.sum()), int(g_area.sum())
    den = p_area + g_area
    per = np.where(den > 0, 2.0 * inter / np.maximum(den, 1), 1.0)
    return {"slices": int(len(inter)), "tp": tp, "pred": np_, "gt": ng,
            "precision": _ratio(tp, np_), "recall": _ratio(tp, ng), "dice": _ratio(2 * tp, np_ + ng),
            "dice_slice_mean": float(per.mean()) if len(per) else None,
            "empty_pred_slices": int((p_area == 0).sum())}


def seed_quality(fg: Any, bg: Any, gt: Any, tissue: Any) -> dict[str, Any]:
    """Foreground seeds against the target, background seeds against the non-target, and the
    share of background seeds inside the tissue (all (B, H, W) bool, numpy)."""
    fg, bg, gt, tissue = (np.asarray(a, dtype=bool) for a in (fg, bg, gt, tissue))
    n_bg = int(bg.sum())
    return {"fg": mask_agreement(fg, gt), "bg": mask_agreement(bg, ~gt),
            "bg_in_tissue": int((bg & tissue).sum()), "bg_tissue_share": _ratio(int((bg & tissue).sum()), n_bg)}


__all__ = ["MIN_CLASSIFIER_AUC", "STOP_CAP_IMPROVING", "STOP_FIXED", "stop_record", "read_stop_record",
           "model_quality", "row_flags", "rule_masks", "mask_agreement", "seed_quality"]
