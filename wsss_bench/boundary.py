"""Boundary metrics in millimetres: HD95 and ASSD per slice (2D) and per case volume (3D).

HD95 is the 95th percentile of the symmetric surface distances (the larger of the two directed
95th percentiles), ASSD the mean of all surface distances in both directions; surfaces are the
masks' boundary pixels (the mask minus its erosion), distances Euclidean with the voxel spacing
in mm, so a 2 mm grid gives twice the distances of a 1 mm grid.

The boundaries and the distances come from MONAI's surface-distance code
(``monai.metrics.utils.get_mask_edges`` and ``get_surface_distance``, the functions behind
``compute_hausdorff_distance(percentile=95)`` and ``compute_average_surface_distance(symmetric=True)``);
one pass per mask pair feeds both metrics, after cropping the pair to its bounding box here.
Calling the two public functions instead gives the same numbers (tests/test_boundary.py checks
it) at 3-8x the time: each crops the pair again through MONAI's transform machinery, which
dominates at these image sizes (benchmarks/results/perf_boundary.md).

Empty masks are decided here, before MONAI sees anything (MONAI returns inf, NaN or 0
depending on which side is empty):

- both empty: 0 mm (nothing to miss);
- exactly one empty: **undefined**, stored as NaN.  Tables apply an :data:`EMPTY_RULES` rule:
  ``undefined`` leaves it out of the mean and counts it ("over n of N"); ``diagonal`` scores it
  the image diagonal in mm (the BraTS challenge convention), which :func:`image_diagonal` gives.

The per-slice store keeps the raw values (NaN for one-empty) and the diagonal, so either rule
can be applied to stored results.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from wsss_bench.errors import UserError
from wsss_bench.lazy import LazyModule, pd

#: MONAI's surface-distance code, imported on first use (the import takes seconds)
monai_utils = LazyModule("monai.metrics.utils")

#: how a slice (or volume) with exactly one empty mask enters a mean
EMPTY_RULES = ("undefined", "diagonal")
DEFAULT_EMPTY_RULE = "undefined"
#: the boundary metrics: column name -> label in tables
BOUNDARY_METRICS = {"hd95": "HD95", "assd": "ASSD"}
#: every per-slice metric a table can show; the boundary ones are distances (lower is better)
ALL_METRICS = ("dice", "iou", "hd95", "assd")
LOWER_IS_BETTER = frozenset(BOUNDARY_METRICS)
#: per-slice store columns: the raw values, the slice diagonal; per-case volume values
SLICE_COLUMNS = ("hd95", "assd", "diag_mm")
VOLUME_COLUMNS = ("hd95_3d", "assd_3d", "diag3d_mm")


def check_rule(rule: str) -> str:
    """The rule, or a UserError naming ``--empty-distance`` and the choices."""
    if rule not in EMPTY_RULES:
        raise UserError(f"--empty-distance {rule!r}: choose one of {', '.join(EMPTY_RULES)}")
    return rule


def parse_metrics(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--metrics dice,iou,hd95,assd`` -> ('dice', ...) in the given order; UserError on unknown names."""
    if text is None:
        return ALL_METRICS
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in ALL_METRICS]
    if bad or not items:
        raise UserError(f"--metrics {','.join(items) or text!r}: unknown metric(s) {', '.join(bad) or '(none given)'}; "
                        f"choose from {','.join(ALL_METRICS)}")
    return tuple(dict.fromkeys(items))


def rule_line(rule: str) -> str:
    """The sentence printed under every table that shows a boundary metric."""
    check_rule(rule)
    head = ("HD95/ASSD: mm with the source voxel spacing, lower is better; both masks empty: 0 mm; "
            "exactly one mask empty: ")
    if rule == "undefined":
        return head + ("undefined, left out of mean, std and CI and counted (\"n=45 of 50\": defined of all "
                       "slices or volumes); --empty-distance diagonal scores it the image diagonal.")
    return head + "the image diagonal in mm (--empty-distance diagonal, the BraTS convention)."


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of an image of ``shape`` pixels at ``spacing`` mm per pixel, in mm."""
    return float(np.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def _as_bool(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if a.dtype.kind == "f":
        raise TypeError(f"{name}: boundary metrics take binary masks (bool or integer), got {a.dtype}")
    return a.astype(bool, copy=False)


def _crop_pair(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus one background pixel on every side
    (what MONAI's own crop does, without its transform machinery: 3-8x faster per pair)."""
    union = p | g
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    box = tuple(box)
    return np.pad(p[box], 1), np.pad(g[box], 1)


def surface_distances(pred: Any, gt: Any, spacing: Sequence[float] | Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(HD95, ASSD) in mm, float64 (B,), of B pairs of 2D (B, H, W) or 3D (B, D, H, W) masks.

    ``spacing``: one spacing per spatial axis for all pairs, or one such sequence per pair.
    Both empty: 0; exactly one empty: NaN (undefined; see :data:`EMPTY_RULES`).
    """
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape or p.ndim not in (3, 4):
        raise ValueError(f"pred {p.shape} and gt {g.shape}: expected equal (B, H, W) or (B, D, H, W) shapes")
    b, dims = p.shape[0], p.ndim - 1
    sp = np.asarray(spacing, dtype=np.float64)
    sp = np.broadcast_to(sp, (b, dims)) if sp.ndim == 1 else sp
    if sp.shape != (b, dims) or not np.all(sp > 0):
        raise ValueError(f"spacing {np.asarray(spacing).tolist()}: expected {dims} positive values (or one row per pair)")
    hd = np.zeros(b, dtype=np.float64)
    asd = np.zeros(b, dtype=np.float64)
    p_any = p.reshape(b, -1).any(1)
    g_any = g.reshape(b, -1).any(1)
    one = p_any != g_any
    hd[one] = asd[one] = np.nan
    both = np.flatnonzero(p_any & g_any)
    if len(both):
        for i in both:
            cp, cg = _crop_pair(p[i], g[i])
            edges_p, edges_g = monai_utils.get_mask_edges(cp, cg, crop=False)
            spacing_i = tuple(float(v) for v in sp[i])
            to_g = np.asarray(monai_utils.get_surface_distance(edges_p, edges_g, "euclidean", spacing_i), dtype=np.float64)
            to_p = np.asarray(monai_utils.get_surface_distance(edges_g, edges_p, "euclidean", spacing_i), dtype=np.float64)
            hd[i] = max(np.percentile(to_g, 95), np.percentile(to_p, 95))
            asd[i] = np.concatenate([to_g, to_p]).mean()
    return hd, asd


def apply_empty_rule(values: np.ndarray, pred_empty: np.ndarray, gt_empty: np.ndarray,
                     diagonal: np.ndarray, rule: str) -> np.ndarray:
    """Raw stored distances -> the values a table averages under ``rule`` (float64 copy).

    ``undefined`` keeps the one-empty entries NaN; ``diagonal`` puts the image diagonal there.
    A NaN where not exactly one mask is empty (or a number where one is) means the stored
    columns disagree: UserError.
    """
    check_rule(rule)
    v = np.array(values, dtype=np.float64)
    one = np.asarray(pred_empty, bool) != np.asarray(gt_empty, bool)
    if np.any(np.isnan(v) != one):
        raise UserError("results rows disagree: a boundary distance is undefined where the prediction and the "
                        "ground truth are not exactly one empty (or the reverse); the per-slice table is corrupt or was edited")
    if rule == "diagonal":
        v[one] = np.asarray(diagonal, dtype=np.float64)[one]
    return v


def score_cell(pred: np.ndarray, gt: np.ndarray, passed: dict[str, np.ndarray], case_ids: np.ndarray,
               z: np.ndarray, spacing: np.ndarray, depth: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """The boundary columns of a cell's per-slice rows, for every gate.

    ``pred``/``gt`` (N, S, S) are the ungated predictions and ground truth of the N test slices;
    ``passed[gate]`` (N,) which slices keep their prediction under that gate (a blanked slice
    has an empty prediction); ``spacing`` (N, 3) each slice's (row, column, slice) spacing in mm;
    ``depth[case]`` the case's slice count in the store (for the volume diagonal).

    Returns gate -> {hd95, assd, diag_mm (per slice), hd95_3d, assd_3d, diag3d_mm (the case
    volume's values, repeated on each of its rows)}.  The volume is the case's test slices
    restacked at their z on the S x S grid, slices outside the test set empty in both masks
    (as the per-volume Dice).  Each distinct (slice or volume) mask pair goes to MONAI once.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    n, size = pred.shape[0], pred.shape[-1]
    spacing = np.asarray(spacing, dtype=np.float64).reshape(n, 3)
    case_ids = np.asarray(case_ids).astype(str)
    z = np.asarray(z, dtype=np.int64)
    hd_all, asd_all = surface_distances(pred, gt, spacing[:, :2])
    gt_any = gt.reshape(n, -1).any(1)
    pred_any = pred.reshape(n, -1).any(1)
    blank = np.where(gt_any, np.nan, 0.0)  # a blanked slice: one-empty if G has foreground, else both empty
    diag = np.sqrt((size * spacing[:, 0]) ** 2 + (size * spacing[:, 1]) ** 2)
    cases = {c: np.flatnonzero(case_ids == c) for c in dict.fromkeys(case_ids.tolist())}
    volumes: dict[tuple, tuple[float, float]] = {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for gate, keep in passed.items():
        keep = np.asarray(keep, dtype=bool).reshape(n)
        cols = {"hd95": np.where(keep, hd_all, blank), "assd": np.where(keep, asd_all, blank), "diag_mm": diag,
                "hd95_3d": np.empty(n), "assd_3d": np.empty(n), "diag3d_mm": np.empty(n)}
        for case, rows in cases.items():
            kept = rows[keep[rows] & pred_any[rows]]  # the slices whose prediction the volume holds
            key = (case, tuple(kept.tolist()))
            if key not in volumes:
                z0 = int(z[rows].min())
                vol_p = np.zeros((1, int(z[rows].max()) - z0 + 1, size, size), dtype=bool)
                vol_g = np.zeros_like(vol_p)
                vol_p[0, z[kept] - z0] = pred[kept]
                vol_g[0, z[rows] - z0] = gt[rows]
                sr, sc, sz = spacing[rows[0]]
                h, a = surface_distances(vol_p, vol_g, (sz, sr, sc))
                volumes[key] = (float(h[0]), float(a[0]))
            cols["hd95_3d"][rows], cols["assd_3d"][rows] = volumes[key]
            sr, sc, sz = spacing[rows[0]]
            cols["diag3d_mm"][rows] = image_diagonal((depth.get(case, int(z[rows].max()) + 1), size, size), (sz, sr, sc))
        out[gate] = cols
    return out


# --------------------------------------------------------------------------- stored rows -> table values
def has_boundary(df: "pd.DataFrame") -> bool:
    """Whether per-slice rows carry the boundary columns (runs made before them do not)."""
    return all(c in df.columns for c in SLICE_COLUMNS)


def apply_rule_to_rows(df: "pd.DataFrame", rule: str) -> "pd.DataFrame":
    """A copy of the per-slice rows whose ``hd95``/``assd`` are the values a table averages
    under ``rule`` (NaN = undefined, left out of means and counted).  Rows without the
    boundary columns are returned unchanged."""
    check_rule(rule)
    if not has_boundary(df):
        return df
    out = df.copy()
    pred_empty = df["pred_area"].to_numpy() == 0
    gt_empty = df["gt_area"].to_numpy() == 0
    for col in BOUNDARY_METRICS:
        out[col] = apply_empty_rule(df[col].to_numpy(np.float64), pred_empty, gt_empty,
                                    df["diag_mm"].to_numpy(np.float64), rule)
    return out


def volume_boundary(df: "pd.DataFrame", keys: Sequence[str], rule: str) -> "pd.DataFrame":
    """Per case volume (one row per ``keys`` group, e.g. task, method, gate, seed, case_id):
    ``hd95_3d`` and ``assd_3d`` under ``rule``.  The volume is empty on a side when all its
    slices are (sums of ``pred_area`` / ``gt_area``).  A group whose rows disagree on the stored
    volume value raises UserError."""
    check_rule(rule)
    keys = list(keys)
    g = df.groupby(keys, sort=False)
    vol = g[["pred_area", "gt_area"]].sum()
    first = g[list(VOLUME_COLUMNS)].first()
    spread = g[list(VOLUME_COLUMNS)].agg(lambda s: s.nunique(dropna=False))
    if (spread > 1).any().any():
        raise UserError("results rows disagree: the slices of one case volume carry different hd95_3d/assd_3d; "
                        "the per-slice table is corrupt or was edited")
    out = pd.DataFrame(index=vol.index)
    for col in BOUNDARY_METRICS:
        out[f"{col}_3d"] = apply_empty_rule(first[f"{col}_3d"].to_numpy(np.float64),
                                            vol["pred_area"].to_numpy() == 0, vol["gt_area"].to_numpy() == 0,
                                            first["diag3d_mm"].to_numpy(np.float64), rule)
    return out.reset_index()


def defined_stats(values: np.ndarray) -> tuple[float, float, int, int]:
    """(mean, population std, n defined, N) of values whose NaN entries are undefined."""
    v = np.asarray(values, dtype=np.float64)
    ok = v[~np.isnan(v)]
    if len(ok) == 0:
        return float("nan"), float("nan"), 0, len(v)
    return float(ok.mean()), float(ok.std(ddof=0)), len(ok), len(v)
