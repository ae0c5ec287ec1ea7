"""Per-slice metrics and gates: what a cell computes (docs/protocol.md sections 7-8).

Dice = 2|P∩G| / (|P| + |G|) and IoU = |P∩G| / |P∪G| in float64, with no smoothing epsilon.
Empty rule: if |G| = 0 both are 1 when |P| = 0 and 0 otherwise.  MONAI's DiceMetric uses
other empty-mask conventions and is deliberately not used here.

The statistics over the per-slice table (aggregates, CIs, tests) are in
:mod:`wsss_bench.reporting.stats`; this module is what a cell computes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from wsss_bench.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

GATES = ("label", "classifier", "none")
CLASSIFIER_THRESHOLD = 0.5  # gate=classifier passes a slice when softmax p(1) >= 0.5
GROUP_KEYS = ["task", "method", "gate"]
SLICE_KEYS = ["task", "method", "gate", "seed", "case_id", "z"]
MIN_CASES_FOR_TEST = 6  # fewer common test cases than this: the comparison reads "n/a"


# --------------------------------------------------------------------------- per slice
def _is_torch(x: Any) -> bool:
    return hasattr(x, "detach") and type(x).__module__.startswith("torch")


def _check_mask(x: Any, name: str) -> None:
    if _is_torch(x):
        floating = x.dtype.is_floating_point or x.dtype.is_complex
    else:
        floating = not (np.issubdtype(x.dtype, np.bool_) or np.issubdtype(x.dtype, np.integer))
    if floating:
        raise TypeError(f"{name} must be a boolean (or integer) mask, got dtype {x.dtype}; "
                        "threshold maps into masks before scoring")
    if x.ndim < 3:
        raise ValueError(f"{name} must be batched (B, H, W), got shape {tuple(x.shape)}")


def overlap_counts(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(|P∩G|, |P|, |G|) per slice as int64 arrays (B,); masks (B, H, W), numpy or torch."""
    if not _is_torch(pred):
        pred = np.asarray(pred)
    if not _is_torch(gt):
        gt = np.asarray(gt)
    _check_mask(pred, "pred")
    _check_mask(gt, "gt")
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
    b = pred.shape[0]
    if _is_torch(pred) and _is_torch(gt):  # count on the tensors' device, move B numbers
        p = pred.reshape(b, -1) != 0
        g = gt.to(pred.device).reshape(b, -1) != 0
        counts = [(p & g).sum(1), p.sum(1), g.sum(1)]
        return tuple(c.cpu().numpy().astype(np.int64) for c in counts)  # type: ignore[return-value]
    p = np.asarray(pred.cpu() if _is_torch(pred) else pred).reshape(b, -1) != 0
    g = np.asarray(gt.cpu() if _is_torch(gt) else gt).reshape(b, -1) != 0
    return (p & g).sum(1, dtype=np.int64), p.sum(1, dtype=np.int64), g.sum(1, dtype=np.int64)


def dice_iou_from_counts(inter: Any, pred_area: Any, gt_area: Any) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU (float64) from overlap counts, with the protocol's empty rule."""
    inter = np.asarray(inter, dtype=np.float64)
    ps = np.asarray(pred_area, dtype=np.float64)
    gs = np.asarray(gt_area, dtype=np.float64)
    empty_gt = gs == 0
    empty_score = (ps == 0).astype(np.float64)  # 1 when both empty, else 0
    den_d = np.where(empty_gt, 1.0, ps + gs)  # never 0 where used
    den_i = np.where(empty_gt, 1.0, ps + gs - inter)
    dice = np.where(empty_gt, empty_score, 2.0 * inter / den_d)
    iou = np.where(empty_gt, empty_score, inter / den_i)
    return dice.astype(np.float64), iou.astype(np.float64)


def dice_iou(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Dice and IoU of boolean masks (B, H, W) (numpy or torch) as float64 (B,)."""
    return dice_iou_from_counts(*overlap_counts(pred, gt))


# --------------------------------------------------------------------------- gates
def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if _is_torch(x) else x)


def gate_pass(gate: str, labels: Any = None, classifier_p1: Any = None, n: int | None = None) -> np.ndarray:
    """Which slices keep their prediction under ``gate`` (bool (B,))."""
    if gate == "none":
        if n is None:
            ref = labels if labels is not None else classifier_p1
            n = len(_to_numpy(ref))
        return np.ones(n, dtype=bool)
    if gate == "label":
        if labels is None:
            raise ValueError("gate=label needs the image-level labels")
        return _to_numpy(labels).reshape(-1) != 0
    if gate == "classifier":
        if classifier_p1 is None:
            raise ValueError("gate=classifier needs the classifier's p(1)")
        p1 = _to_numpy(classifier_p1).astype(np.float64).reshape(-1)
        if np.isnan(p1).any():
            raise ValueError("gate=classifier got NaN classifier probabilities")
        return p1 >= CLASSIFIER_THRESHOLD
    raise UserError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)}")


def apply_gate(pred: Any, gate: str, labels: Any = None, classifier_p1: Any = None) -> tuple[Any, np.ndarray]:
    """Blank the predictions the gate rejects: (gated pred, same type as ``pred``; pass (B,))."""
    passed = gate_pass(gate, labels, classifier_p1, n=pred.shape[0])
    if len(passed) != pred.shape[0]:
        raise ValueError(f"gate got {len(passed)} labels/probabilities for {pred.shape[0]} masks")
    shape = (-1,) + (1,) * (pred.ndim - 1)
    if _is_torch(pred):
        import torch

        keep = torch.as_tensor(passed, device=pred.device).reshape(shape)
        return pred & keep if pred.dtype == torch.bool else pred * keep.to(pred.dtype), passed
    pred = np.asarray(pred)
    keep = passed.reshape(shape)
    return (pred & keep if pred.dtype == bool else pred * keep.astype(pred.dtype)), passed
