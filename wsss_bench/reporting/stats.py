"""Statistics behind the tables: aggregates, bootstrap CIs, per-volume Dice, paired tests.

Views of the per-slice results table (one row per run, task, method, gate, slice); nothing here
looks at images.  Per-slice Dice/IoU and the gates are in :mod:`wsss_bench.metrics`, which the
runner imports; these functions are used only by reporting and the end-of-run tables, so they
live apart from what computes a cell.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from wsss_bench.boundary import BOUNDARY_METRICS, DEFAULT_EMPTY_RULE, VOLUME_COLUMNS, has_boundary, volume_boundary
from wsss_bench.errors import UserError
from wsss_bench.metrics import CLASSIFIER_THRESHOLD, GROUP_KEYS, MIN_CASES_FOR_TEST, SLICE_KEYS, dice_iou_from_counts

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

def require_columns(df: "pd.DataFrame", columns: Iterable[str], what: str = "results") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{what} lack column(s) {', '.join(missing)}; "
                        "expected the per-slice results table (docs/protocol.md section 8)")


def check_unique_slices(df: "pd.DataFrame") -> None:
    """Refuse a table where one slice is scored twice for the same method, gate and seed."""
    keys = [k for k in SLICE_KEYS + ["profile"] if k in df.columns]
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        first = df.loc[dup, keys].iloc[0].to_dict()
        raise UserError(f"{int(dup.sum())} rows score the same slice twice, e.g. {first}; the "
                        "results combine overlapping runs: load fewer runs or give the methods distinct labels")


def case_means(df: "pd.DataFrame", column: str = "dice") -> "pd.Series":
    """Mean of ``column`` per (task, method, gate, case_id), pooled over seeds."""
    return df.groupby(GROUP_KEYS + ["case_id"], sort=False)[column].mean()


def _mean_std(v: np.ndarray) -> tuple[float, float]:
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=0))


def _group_stats(g: "pd.DataFrame") -> dict[str, Any]:
    pos = g["label"].to_numpy() == 1
    rec: dict[str, Any] = {
        "n_slices": len(g), "n_pos": int(pos.sum()), "n_neg": int((g["label"].to_numpy() == 0).sum()),
        "n_cases": int(g["case_id"].nunique()),
        "n_seeds": int(g["seed"].nunique()) if "seed" in g else 1,
    }
    for col in ("dice", "iou", *(m for m in BOUNDARY_METRICS if m in g.columns)):
        v = g[col].to_numpy(dtype=np.float64)
        if col in BOUNDARY_METRICS:  # NaN = undefined (one mask empty): left out, counted
            rec[f"{col}_n"] = int((~np.isnan(v)).sum())
            rec[f"{col}_pos_n"] = int((~np.isnan(v[pos])).sum())
            v_all, v_pos = v[~np.isnan(v)], v[pos & ~np.isnan(v)]
        else:
            v_all, v_pos = v, v[pos]
        rec[f"{col}_mean"], rec[f"{col}_std"] = _mean_std(v_all)
        rec[f"{col}_pos_mean"], rec[f"{col}_pos_std"] = _mean_std(v_pos)
        rec[f"{col}_case_mean"] = float(g.groupby("case_id", sort=False)[col].mean().mean())
        if "seed" in g and rec["n_seeds"] > 1:  # across-seed spread, kept apart from the per-slice std
            rec[f"{col}_seed_std"] = float(g.groupby("seed")[col].mean().std(ddof=0))
        else:
            rec[f"{col}_seed_std"] = 0.0
    return rec


def bootstrap_seed(g: "pd.DataFrame", task: str) -> int:
    """seed(base, task, "bootstrap") (docs/protocol.md section 12), base = the smallest seed in ``g``."""
    from wsss_bench.seeding import derive_seed

    base = int(g["seed"].min()) if "seed" in g and len(g) else 0
    return derive_seed(base, str(task), "bootstrap")


def aggregate(df: "pd.DataFrame", ci_resamples: int = 0,
              ci_columns: Sequence[str] = ("dice",)) -> "pd.DataFrame":
    """One row per (task, method, gate): all-slice, positive-only and case-level summaries.

    Columns: n_slices, n_pos, n_neg, n_cases, n_seeds and, for dice and iou, ``_mean``/``_std``
    (all slices, population std), ``_pos_mean``/``_pos_std`` (label == 1), ``_case_mean`` (mean
    of per-case means) and ``_seed_std``.  With ``ci_resamples`` > 0, also ``<col>_ci_lo`` /
    ``<col>_ci_hi`` for each of ``ci_columns`` (default dice) from :func:`bootstrap_ci`, seeded
    with seed(base, task, "bootstrap"); every column of a group uses the same case draws.
    """
    import pandas as pd

    require_columns(df, GROUP_KEYS + ["case_id", "label", "dice", "iou"])
    check_unique_slices(df)
    records = []
    for key, g in df.groupby(GROUP_KEYS, sort=False):
        rec = dict(zip(GROUP_KEYS, key))
        rec.update(_group_stats(g))
        if ci_resamples > 0:
            seed = bootstrap_seed(g, rec["task"])
            for col in ci_columns:
                rec[f"{col}_ci_lo"], rec[f"{col}_ci_hi"] = bootstrap_ci(g, ci_resamples, seed, column=col)
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=None if records else GROUP_KEYS)


def bootstrap_ci(df_group: "pd.DataFrame", resamples: int, seed: int, column: str = "dice",
                 level: float = 0.95) -> tuple[float, float]:
    """Case-level cluster bootstrap CI of the slice-weighted all-slice mean of ``column``.

    Cases are drawn with replacement; each draw's mean is (sum of the drawn cases' slice
    scores) / (their slice count).  Percentiles 2.5/97.5 (for ``level`` 0.95).  NaN scores
    (an undefined boundary distance) are left out of sums and counts; a draw with no defined
    score is left out of the percentiles.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    per_case = df_group.groupby("case_id", sort=True)[column].agg(["sum", "count"])
    if len(per_case) == 0:
        return float("nan"), float("nan")
    sums = per_case["sum"].to_numpy(np.float64)
    counts = per_case["count"].to_numpy(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_case), size=(resamples, len(per_case)))  # (R, n_cases)
    drawn = counts[idx].sum(1)
    means = sums[idx].sum(1)[drawn > 0] / drawn[drawn > 0]
    if len(means) == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- per volume
VOLUME_KEYS = ["task", "method", "gate", "seed", "case_id"]


def slice_intersections(df: "pd.DataFrame") -> np.ndarray:
    """|P∩G| per row (int64), recovered from ``dice``, ``pred_area`` and ``gt_area``.

    Dice = 2|P∩G| / (|P| + |G|) is exact in float64 for any slice size, so |P∩G| =
    round(Dice (|P| + |G|) / 2); where |G| = 0 the intersection is 0 whatever the empty rule
    scored.  A row whose recovered count is not within 1e-6 of an integer, or exceeds an area,
    means the columns disagree and raises UserError.
    """
    require_columns(df, ["dice", "pred_area", "gt_area"], what="results (per-volume Dice)")
    p = df["pred_area"].to_numpy(np.float64)
    g = df["gt_area"].to_numpy(np.float64)
    raw = np.where(g > 0, df["dice"].to_numpy(np.float64) * (p + g) / 2.0, 0.0)
    inter = np.rint(raw)
    if np.any(np.abs(raw - inter) > 1e-6 * np.maximum(1.0, p + g)) or np.any(inter > np.minimum(p, g)):
        raise UserError("results rows disagree: dice, pred_area and gt_area do not give an integer "
                        "intersection; the per-slice table is corrupt or was edited")
    return inter.astype(np.int64)


def volume_scores(df: "pd.DataFrame") -> "pd.DataFrame":
    """Per-volume (3D) Dice and IoU per (task, method, gate, seed, case): the case's test slices
    restacked, i.e. sums of |P∩G|, |P| and |G| over its slices, then the per-slice formulas with
    the same empty rule (an empty volume G scores 1 iff the volume P is empty too).

    Columns: the keys, ``n_slices``, ``inter``, ``pred_area``, ``gt_area``, ``dice3d``, ``iou3d``.
    """
    import pandas as pd

    keys = [k for k in VOLUME_KEYS if k in df.columns]
    require_columns(df, ["task", "method", "gate", "case_id"], what="results (per-volume Dice)")
    check_unique_slices(df)
    work = df[keys].copy()
    work["inter"] = slice_intersections(df)
    work["pred_area"] = df["pred_area"].to_numpy(np.int64)
    work["gt_area"] = df["gt_area"].to_numpy(np.int64)
    work["n_slices"] = 1
    vol = work.groupby(keys, sort=False, as_index=False)[["n_slices", "inter", "pred_area", "gt_area"]].sum()
    d, i = dice_iou_from_counts(vol["inter"], vol["pred_area"], vol["gt_area"])
    vol["dice3d"], vol["iou3d"] = d, i
    return pd.DataFrame(vol)


def aggregate_volumes(df: "pd.DataFrame", ci_resamples: int = 0, empty_distance: str = DEFAULT_EMPTY_RULE) -> "pd.DataFrame":
    """One row per (task, method, gate): mean and population std of the per-volume Dice/IoU over
    test cases (x seeds), ``n_volumes``; with ``ci_resamples`` > 0 the case-level bootstrap CI of
    the mean per-volume Dice (``dice3d_ci_lo``/``_hi``, same seed component as :func:`aggregate`).
    Rows with boundary columns add ``hd95_3d``/``assd_3d`` (``_mean``, ``_std``, ``_n`` defined
    volumes, ``_ci_lo``/``_ci_hi``) under the ``empty_distance`` rule.
    """
    import pandas as pd

    vol = volume_scores(df)
    cols = ["dice3d", "iou3d"]
    if has_boundary(df) and all(c in df.columns for c in VOLUME_COLUMNS):
        keys = [k for k in VOLUME_KEYS if k in df.columns]
        vol = vol.merge(volume_boundary(df, keys, empty_distance), on=keys, how="left")
        cols += [f"{m}_3d" for m in BOUNDARY_METRICS]
    records = []
    for key, g in vol.groupby(GROUP_KEYS, sort=False):
        rec = dict(zip(GROUP_KEYS, key))
        rec["n_volumes"] = len(g)
        for col in cols:
            v = g[col].to_numpy(np.float64)
            rec[f"{col}_mean"], rec[f"{col}_std"] = _mean_std(v[~np.isnan(v)])
            rec[f"{col}_n"] = int((~np.isnan(v)).sum())
        if ci_resamples > 0:
            seed = bootstrap_seed(g, rec["task"])
            for col in ["dice3d", *cols[2:]]:
                rec[f"{col}_ci_lo"], rec[f"{col}_ci_hi"] = bootstrap_ci(g, ci_resamples, seed, column=col)
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=None if records else GROUP_KEYS)


# --------------------------------------------------------------------------- tests
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values; NaN entries are left out of the family and stay NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def compare_to(df: "pd.DataFrame", reference_method: str, task: str | None = None,
               gate: str | None = None, column: str = "dice",
               methods: Sequence[str] | None = None, min_cases: int = MIN_CASES_FOR_TEST) -> "pd.DataFrame":
    """Paired two-sided Wilcoxon signed-rank tests of per-case mean ``column`` vs a reference.

    One family per (task, gate) = one table column: every other method (or those in
    ``methods``) against ``reference_method`` on their common test cases, Holm-corrected
    within the family.  Fewer than ``min_cases`` common cases: p is NaN and ``note`` "n/a".
    """
    import pandas as pd
    from scipy.stats import wilcoxon

    require_columns(df, GROUP_KEYS + ["case_id", column])
    sel = df
    if task is not None:
        sel = sel[sel["task"] == task]
    if gate is not None:
        sel = sel[sel["gate"] == gate]
    means = case_means(sel, column)
    rows = []
    for (t, gt), fam in means.groupby(level=["task", "gate"], sort=False):
        per_method = {m: s.droplevel(["task", "method", "gate"]) for m, s in fam.groupby(level="method", sort=False)}
        ref = per_method.get(reference_method)
        family = []
        for m in per_method if methods is None else methods:
            if m == reference_method:
                continue
            rec = {"task": t, "gate": gt, "method": m, "reference": reference_method,
                   "n_cases": 0, "statistic": np.nan, "p": np.nan, "note": ""}
            cur = per_method.get(m)
            if ref is None or cur is None:
                rec["note"] = "n/a: no results for " + (reference_method if ref is None else m)
            else:
                common = cur.dropna().index.intersection(ref.dropna().index)  # undefined case means drop out
                rec["n_cases"] = len(common)
                a = cur.loc[common].to_numpy(np.float64)
                b = ref.loc[common].to_numpy(np.float64)
                rec["mean_diff"] = float((a - b).mean()) if len(common) else np.nan
                if len(common) < min_cases:
                    rec["note"] = f"n/a: {len(common)} common test cases (< {min_cases})"
                elif np.all(a == b):
                    rec["statistic"], rec["p"], rec["note"] = 0.0, 1.0, "identical per-case means"
                else:
                    res = wilcoxon(a, b, alternative="two-sided")
                    rec["statistic"], rec["p"] = float(res.statistic), float(res.pvalue)
            family.append(rec)
        adjusted = holm([r["p"] for r in family])
        for rec, p_holm in zip(family, adjusted):
            rec["p_holm"] = float(p_holm)
        rows.extend(family)
    cols = ["task", "gate", "method", "reference", "n_cases", "mean_diff", "statistic", "p", "p_holm", "note"]
    return pd.DataFrame.from_records(rows, columns=cols)


def classifier_gate_stats(df: "pd.DataFrame") -> "pd.DataFrame":
    """Per task: AUC, sensitivity and specificity of the CAM classifier used by gate=classifier.

    Each test slice counts once per seed (the classifier is shared by all methods of a task).
    """
    import pandas as pd
    from scipy.stats import rankdata

    require_columns(df, ["task", "case_id", "z", "label", "classifier_p1"])
    keys = ["task", "case_id", "z"] + (["seed"] if "seed" in df.columns else [])
    uniq = df.drop_duplicates(keys)
    uniq = uniq[uniq["classifier_p1"].notna()]  # no classifier ran for these rows
    rows = []
    for t, g in uniq.groupby("task", sort=False):
        y = g["label"].to_numpy() == 1
        p = g["classifier_p1"].to_numpy(np.float64)
        n1, n0 = int(y.sum()), int((~y).sum())
        auc = np.nan
        if n1 and n0:  # Mann-Whitney form of the AUC, ties counted half
            auc = (rankdata(p)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
        passed = p >= CLASSIFIER_THRESHOLD
        rows.append({"task": t, "n_pos": n1, "n_neg": n0, "auc": float(auc),
                     "sensitivity": float(passed[y].mean()) if n1 else np.nan,
                     "specificity": float((~passed[~y]).mean()) if n0 else np.nan})
    return pd.DataFrame.from_records(rows, columns=["task", "n_pos", "n_neg", "auc", "sensitivity", "specificity"])
