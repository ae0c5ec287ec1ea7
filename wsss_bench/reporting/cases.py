"""The per-case table (``report --table cases``): one row per case x method x gate (x seed).

Researchers paste it into their own statistics: per case volume Dice, IoU (the case's test
slices restacked, as :func:`volume_scores`), HD95 and ASSD in mm (the stored 3D values under the
empty rule in force), and the slice counts.  Everything comes from the per-slice rows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from wsss_bench.boundary import BOUNDARY_METRICS, apply_rule_to_rows, has_boundary, rule_line, volume_boundary
from wsss_bench.interfaces import ReportTable
from wsss_bench.lazy import pd
from wsss_bench.reporting.stats import volume_scores

CASE_KEYS = ["task", "method", "gate", "seed", "case_id"]


def case_frame(df: "pd.DataFrame", rule: str = "undefined", metrics: Sequence[str] = ("dice", "iou", "hd95", "assd"),
               gates: Sequence[str] | None = None) -> "pd.DataFrame":
    """Tidy per-case numbers, full precision.

    Columns: the keys, ``n_slices``, ``n_pos``, ``n_neg``, then per chosen metric its volume value
    (``dice3d``, ``iou3d``, ``hd95_3d``, ``assd_3d``) and, for a boundary metric, ``<m>_slices``:
    the mean of its per-slice values over the case's defined slices and ``<m>_n`` how many
    were defined.  Boundary columns appear only when the rows carry them.
    """
    sel = df if gates is None else df[df["gate"].isin(list(gates))]
    keys = [k for k in CASE_KEYS if k in sel.columns]
    vol = volume_scores(sel)
    counts = sel.assign(_pos=(sel["label"] == 1).astype(int), _neg=(sel["label"] == 0).astype(int)) \
        .groupby(keys, sort=False).agg(n_pos=("_pos", "sum"), n_neg=("_neg", "sum")).reset_index()
    out = vol[keys + ["n_slices"]].merge(counts, on=keys, how="left")
    if "dice" in metrics:
        out["dice3d"] = vol["dice3d"].to_numpy()
    if "iou" in metrics:
        out["iou3d"] = vol["iou3d"].to_numpy()
    wanted = [m for m in metrics if m in BOUNDARY_METRICS]
    if wanted and has_boundary(sel):
        b = volume_boundary(sel, keys, rule)
        ruled = apply_rule_to_rows(sel, rule)
        per = ruled.groupby(keys, sort=False)[wanted].agg(["mean", "count"])
        for m in wanted:
            out = out.merge(b[keys + [f"{m}_3d"]], on=keys, how="left")
            add = per[m].reset_index().rename(columns={"mean": f"{m}_slices", "count": f"{m}_n"})
            out = out.merge(add, on=keys, how="left")
        out["empty_distance"] = rule  # the rule the boundary numbers follow
    return pd.DataFrame(out)


def _fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if np.isfinite(v) else "undefined"


def cases_table(df: "pd.DataFrame", rule: str = "undefined", metrics: Sequence[str] = ("dice", "iou", "hd95", "assd"),
                gates: Sequence[str] | None = None, data: str | None = None) -> ReportTable:
    """:func:`case_frame` laid out for the exporters (Markdown prints it; CSV writes ``raw``)."""
    frame = case_frame(df, rule, metrics, gates)
    keys = [k for k in CASE_KEYS if k in frame.columns]
    value_cols = [c for c in ("dice3d", "iou3d", "hd95_3d", "assd_3d") if c in frame.columns]
    labels = {"dice3d": "Dice (3D) ↑", "iou3d": "IoU (3D) ↑", "hd95_3d": "HD95 (3D, mm) ↓", "assd_3d": "ASSD (3D, mm) ↓"}
    header = ["case", "task", "method", "gate", *(["seed"] if "seed" in keys else []),
              *[labels[c] for c in value_cols], "slices (pos/neg)"]
    rows = []
    for rec in frame.to_dict("records"):
        rows.append([str(rec["case_id"]), str(rec["task"]), str(rec["method"]), str(rec["gate"]),
                     *([str(int(rec["seed"]))] if "seed" in keys else []),
                     *[_fmt(float(rec[c]), 3 if c in ("dice3d", "iou3d") else 2) for c in value_cols],
                     f"{int(rec['n_slices'])} ({int(rec['n_pos'])}/{int(rec['n_neg'])})"])
    notes = ["One row per test case: its test slices restacked into a volume (slices outside the test set are "
             "empty in both masks); Dice/IoU from the summed overlaps, HD95/ASSD over the volume with the "
             "(slice, row, column) spacing in mm."]
    if any(c in value_cols for c in ("hd95_3d", "assd_3d")):
        notes.append(rule_line(rule))
    if data:
        notes.append(f"Data: {data}.")
    return ReportTable(title="Per-case results", header=header, rows=rows, footer=" ".join(notes), raw=frame)
