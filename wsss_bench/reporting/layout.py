"""The report tables' layout engine: columns per task and block, rows per method, cells with
mean±std, CI and significance marks.

In a ReportTable, ``rows[i][0]`` is the row label and ``bold`` holds (row, column) indices
into ``rows``, so column 0 is the label column and cells start at column 1.  A cell may hold
a second line after ``"\\n"`` (the bootstrap CI); exporters set it smaller or inline.  A
:class:`StatTable` also carries the two-level header of the paper's layout (``groups``: a
task over its Dice/IoU columns; ``subheader``: the lower header line).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from wsss_bench.boundary import BOUNDARY_METRICS, DEFAULT_EMPTY_RULE, LOWER_IS_BETTER, apply_rule_to_rows, rule_line
from wsss_bench.errors import UserError
from wsss_bench.interfaces import ReportTable
from wsss_bench.metrics import GATES, MIN_CASES_FOR_TEST
from wsss_bench.reporting import paper
from wsss_bench.reporting.format import MISSING, _finite, fmt_ci, fmt_mean_std
from wsss_bench.reporting.stats import aggregate, aggregate_volumes, compare_to
from wsss_bench.running.rundir import FailedCell

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DEFAULT_TASK_LABELS = {"brats": "BraTS21", "flare21-kidney": "Kidney",
                       "flare21-spleen": "Spleen", "flare21-liver": "Liver"}
METRIC_LABELS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "assd": "ASSD"}
#: metrics with a per-volume (3D) column under --per-volume, and the stats key of that column
VOLUME_METRICS = {"dice": "dice3d", "hd95": "hd95_3d", "assd": "assd_3d"}
#: metrics the paper reports (its numbers stand beside these columns)
PAPER_METRICS = ("dice", "iou")
BLOCKS = {"all": "", "pos": " (pos)", "case": " (case)"}  # header suffix per block
VOLUME_SUFFIX = " (3D)"
PAPER_SUFFIX = " (paper)"
UP = "↑"
DOWN = "↓"
MARK = "†"
#: after a row's Dice when a model behind it is in doubt (wsss_bench.reporting.quality)
QUALITY_MARK = "‡"
ALPHA = 0.05
TABLES = ("summary", "table1", "table2", "table3", "cases", "seeds", "quality")
TASK_ORDER = paper.TASKS


def _values(df: "pd.DataFrame", column: str) -> list[str]:
    return [str(v) for v in sorted(df[column].dropna().unique(), key=str)] if column in df.columns else []


def _footer(df: "pd.DataFrame", gate: str, data: str | None, extra: Sequence[str] = ()) -> str:
    seeds = _values(df, "seed")
    kinds = _values(df, "data") or ([data] if data else ["unspecified"])
    parts = [f"gate={gate}", f"profile={','.join(_values(df, 'profile')) or 'unspecified'}",
             f"{'seeds' if len(seeds) > 1 else 'seed'}={','.join(seeds) or 'unspecified'}",
             f"data={','.join(kinds)}"]
    text = "; ".join(parts) + "."
    return " ".join([text, *[e for e in extra if e]]).strip()


def _pick_gate(df: "pd.DataFrame", gate: str | None) -> str:
    present = [str(g) for g in df["gate"].unique()]
    if gate is None:
        if "label" in present or not present:
            return "label"
        if len(present) == 1:
            return present[0]
        raise UserError(f"results hold several gates ({', '.join(present)}); choose one with gate=")
    if gate not in GATES:
        raise UserError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)}")
    if gate not in present:
        raise UserError(f"no results for gate={gate}; the results hold gate(s) {', '.join(present) or 'none'}")
    return gate


def gates_of(df: "pd.DataFrame", gate: str | None) -> list[str]:
    """The gates a report shows: ``all`` = every gate the results hold (protocol order)."""
    if gate == "all":
        present = {str(g) for g in df["gate"].unique()}
        return [g for g in GATES if g in present] or [_pick_gate(df, None)]
    return [_pick_gate(df, gate)]


_NOTES = {"all": "Values: mean±std over all test slices (population std).",
          "pos": "(pos): positive slices only.", "case": "(case): mean of per-case means."}


# --------------------------------------------------------------------------- layout engine
@dataclass
class StatTable(ReportTable):
    """A ReportTable with the paper's two-level header.

    ``groups`` lists (label, span) over the cell columns 1..n (a task over its columns);
    ``subheader`` is the lower header line, one entry per column (entry 0 = row-label column).
    The flat ``header`` stays complete ("BraTS21 Dice ↑") for exporters that draw one line.
    """

    groups: list[tuple[str, int]] = field(default_factory=list)
    subheader: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Col:
    task: str
    metric: str  # dice | iou
    block: str  # all | pos | case | vol (per-volume) | paper


def _columns(tasks: Sequence[str], metrics: Sequence[str], blocks: Sequence[str],
             task_labels: Mapping[str, str] | None, *, per_volume: bool = False,
             with_paper: bool = False) -> tuple[list[Col], list[str], list[str], list[tuple[str, int]]]:
    """Task-major columns: per task, each block's metrics (paper value after its own), then 3D Dice."""
    labels = {**DEFAULT_TASK_LABELS, **(task_labels or {})}
    for b in blocks:
        if b not in BLOCKS:
            raise UserError(f"unknown block {b!r}; choose from {', '.join(BLOCKS)}")
    for m in metrics:
        if m not in METRIC_LABELS:
            raise UserError(f"unknown metric {m!r}; choose from {', '.join(METRIC_LABELS)}")
    cols: list[Col] = []
    for t in tasks:
        for b in blocks:
            for m in metrics:
                cols.append(Col(t, m, b))
                if with_paper and b == "all" and m in PAPER_METRICS:
                    cols.append(Col(t, m, "paper"))
        if per_volume:
            cols.extend(Col(t, m, "vol") for m in metrics if m in VOLUME_METRICS)
    sub = []
    for c in cols:
        arrow = DOWN if c.metric in LOWER_IS_BETTER else UP
        if c.block == "paper":
            sub.append(f"{METRIC_LABELS[c.metric]}{PAPER_SUFFIX}")
        elif c.block == "vol":
            sub.append(f"{METRIC_LABELS[c.metric]}{VOLUME_SUFFIX} {arrow}")
        else:
            sub.append(f"{METRIC_LABELS[c.metric]}{BLOCKS[c.block]} {arrow}")
    header = [f"{labels.get(c.task, c.task)} {s}" for c, s in zip(cols, sub)]
    groups: list[tuple[str, int]] = []
    for c in cols:
        name = labels.get(c.task, c.task)
        if groups and groups[-1][0] == name:
            groups[-1] = (name, groups[-1][1] + 1)
        else:
            groups.append((name, 1))
    return cols, header, sub, groups


@dataclass
class RowSpec:
    """One table row: its label, the method filling it per task (None: no result), and the
    paper row its numbers stand beside per task."""

    label: str
    methods: dict[str, str | None]
    paper_rows: dict[str, tuple[str, str] | None] = field(default_factory=dict)
    supplementary: bool = False
    bold: bool = True


def _short(error: str, n: int = 48) -> str:
    first = error.split(" (traceback", 1)[0].strip()
    return first if len(first) <= n else first[: n - 1].rstrip() + "…"


def _reason(error: str) -> str:
    """The short reason a failed cell shows: the exception name, else the first words."""
    head = error.split(":", 1)[0].strip()
    return head if re.fullmatch(r"[A-Z][A-Za-z]*(Error|Exception|Exit|Interrupt)", head) else _short(error, 28)


def _count(rec: Mapping, key: str, total: int) -> str:
    """'n=45 of 50' when a boundary value was defined for fewer than all slices (volumes)."""
    n = rec.get(key)
    return f"n={int(n)} of {int(total)}" if n is not None and _finite(n) and int(n) < int(total) else ""


def _layout(sel: "pd.DataFrame", specs: Sequence[RowSpec], cols: Sequence[Col], *, gate: str,
            resamples: int = 0, references: Mapping[str, str | None] | None = None,
            failed: Sequence[FailedCell] = (), empty_distance: str = DEFAULT_EMPTY_RULE,
            quality: Any = None
            ) -> tuple[list[list[str]], set, "pd.DataFrame", list[str]]:
    """Cells, bold set, the tidy numbers and footer notes for ``specs`` x ``cols``.

    Boundary metrics (HD95, ASSD) are averaged under the ``empty_distance`` rule; lower is
    better there, so their best value is the smallest.  ``quality`` (a
    :class:`wsss_bench.reporting.quality.QualityIndex`) marks a row's Dice with
    :data:`QUALITY_MARK` where a model behind it is in doubt, adds the footnote, and puts the
    classifier's test stats and the stop reasons into the tidy numbers.
    """
    import pandas as pd

    sel = apply_rule_to_rows(sel, empty_distance)
    shown_metrics = list(dict.fromkeys(c.metric for c in cols if c.block != "paper"))
    boundary_shown = [m for m in shown_metrics if m in BOUNDARY_METRICS]
    ci_columns = ("dice", "iou", *boundary_shown)
    agg = aggregate(sel, ci_resamples=resamples, ci_columns=ci_columns) if len(sel) else pd.DataFrame()
    index = {(r["method"], r["task"]): r for r in agg.to_dict("records")}
    vol_index: dict = {}
    if any(c.block == "vol" for c in cols) and len(sel):
        vol = aggregate_volumes(sel, ci_resamples=resamples, empty_distance=empty_distance)
        vol_index = {(r["method"], r["task"]): r for r in vol.to_dict("records")}
    tested = [m for m in shown_metrics if m == "dice" or m in boundary_shown]
    tests: dict[tuple[str, str, str], dict] = {}
    notes: list[str] = []
    refs = dict(references or {})
    tasks = list(dict.fromkeys(c.task for c in cols))
    for t in tasks:
        ref = refs.get(t)
        members = [s.methods.get(t) for s in specs]
        members = [m for m in dict.fromkeys(members) if m and m != ref and (m, t) in index]
        if not ref or (ref, t) not in index or not members:
            continue
        for metric in tested:
            if metric not in sel.columns:
                continue
            cmp = compare_to(sel[sel["task"] == t], ref, gate=gate, column=metric, methods=members)
            for rec in cmp.to_dict("records"):
                tests[(rec["method"], t, metric)] = rec
    failures = {}
    for f in failed:
        failures.setdefault((f.method, f.task), f)

    rows = [[s.label] for s in specs]
    bold: set[tuple[int, int]] = set()
    marked: dict[tuple[str, str], list[str]] = {}
    for j, col in enumerate(cols, start=1):
        means: list[float] = []
        for i, spec in enumerate(specs):
            method = spec.methods.get(col.task)
            value = float("nan")
            if col.block == "paper":
                pr = spec.paper_rows.get(col.task)
                got = paper.value(pr[0], pr[1], col.task, col.metric) if pr else None
                text = fmt_mean_std(*got) if got else MISSING
            elif method is None or (method, col.task) not in (vol_index if col.block == "vol" else index):
                fail = failures.get((method or spec.label, col.task))
                text = f"failed: {_reason(fail.flat)}" if fail else MISSING
            elif col.block == "vol":
                rec = vol_index[(method, col.task)]
                key = VOLUME_METRICS[col.metric]
                value = rec.get(f"{key}_mean", float("nan"))
                text = fmt_mean_std(value, rec.get(f"{key}_std"))
                ci = fmt_ci(rec.get(f"{key}_ci_lo"), rec.get(f"{key}_ci_hi"))
                if col.metric in BOUNDARY_METRICS:
                    ci = " ".join(x for x in (ci, _count(rec, f"{key}_n", rec["n_volumes"])) if x)
                text = f"{text}\n{ci}" if ci else text
            else:
                rec = index[(method, col.task)]
                stem = col.metric if col.block == "all" else f"{col.metric}_{col.block}"
                value = rec.get(f"{stem}_mean")
                text = fmt_mean_std(value, rec.get(f"{stem}_std") if col.block != "case" else None)
                second = fmt_ci(rec.get(f"{col.metric}_ci_lo"), rec.get(f"{col.metric}_ci_hi")) \
                    if col.block == "all" else ""
                if col.metric in BOUNDARY_METRICS and col.block in ("all", "pos"):
                    total = rec["n_slices"] if col.block == "all" else rec["n_pos"]
                    second = " ".join(x for x in (second, _count(rec, f"{stem}_n", total)) if x)
                test = tests.get((method, col.task, col.metric)) if col.block == "all" else None
                if test is not None:
                    if _finite(test["p_holm"]) and test["p_holm"] < ALPHA:
                        text += MARK
                    elif str(test["note"]).startswith(f"n/a: {test['n_cases']} common"):
                        second = f"{second} n/a".strip()
                flags = quality.flags(method, col.task, gate) if quality and col.block == "all" \
                    and col.metric == "dice" else []
                if flags:
                    text += QUALITY_MARK
                    marked.setdefault((col.task, method), flags)
                text = f"{text}\n{second}" if second else text
            rows[i].append(text)
            means.append(round(value, 3) if _finite(value) else float("nan"))
        eligible = [i for i, s in enumerate(specs) if s.bold and _finite(means[i])]
        if col.block != "paper" and eligible:  # compare at printed precision: printed ties all bold
            pick = min if col.metric in LOWER_IS_BETTER else max
            best = pick(means[i] for i in eligible)
            bold |= {(i, j) for i in eligible if means[i] == best}

    # tidy numbers: one record per (row, task) that has results
    records = []
    for spec in specs:
        for t in tasks:
            method = spec.methods.get(t)
            if method is None or (method, t) not in index:
                continue
            rec = {"row": spec.label, **index[(method, t)], "supplementary": spec.supplementary}
            if (method, t) in vol_index:
                rec.update({k: v for k, v in vol_index[(method, t)].items()
                            if k.startswith(("dice3d", "iou3d", "n_vol", "hd95_3d", "assd_3d"))})
            if quality:
                rec.update(quality.row_facts(method, t, gate))
            test = tests.get((method, t, "dice"))
            if test is not None:
                rec.update({"reference": test["reference"], "p": test["p"], "p_holm": test["p_holm"],
                            "test_cases": test["n_cases"], "test_note": test["note"]})
            if boundary_shown:  # the rule the boundary numbers were averaged under
                rec["empty_distance"] = empty_distance
            for metric in boundary_shown:
                test = tests.get((method, t, metric))
                if test is not None:
                    rec.update({f"{metric}_p": test["p"], f"{metric}_p_holm": test["p_holm"]})
            pr = spec.paper_rows.get(t)
            if pr:
                rec["paper_row"] = f"{pr[0]}:{pr[1]}"
                for m in PAPER_METRICS:
                    got = paper.value(pr[0], pr[1], t, m)
                    rec[f"paper_{m}_mean"], rec[f"paper_{m}_std"] = got if got else (math.nan, math.nan)
            records.append(rec)
    raw = pd.DataFrame.from_records(records)

    # footer notes
    if resamples > 0:
        notes.append(f"[lo, hi]: case-level cluster bootstrap 95% CI of the mean ({resamples} resamples, "
                     "seed component 'bootstrap').")
    shown = [t for t in tasks if any(c.task == t and c.block == "all" and c.metric == "dice" for c in cols)]
    with_ref = [t for t in shown if refs.get(t) and (refs[t], t) in index]
    if with_ref:
        names = sorted({refs[t] for t in with_ref})
        what = "Dice" if not boundary_shown else \
            "/".join(METRIC_LABELS[m].split(" ")[0] for m in tested) + " (the column's metric)"
        notes.append(f"{MARK}: per-case mean {what} differs from CLDF ({', '.join(names)}) by the paired two-sided "
                     f"Wilcoxon signed-rank test, Holm-corrected per column, p < {ALPHA}; n/a: fewer than "
                     f"{MIN_CASES_FOR_TEST} common test cases, not tested.")
    missing_ref = [t for t in shown if t not in with_ref]
    if missing_ref and shown:
        notes.append(f"No CLDF results for {', '.join(missing_ref)}: no significance test there.")
    if any(c.block == "vol" for c in cols):
        notes.append(f"Dice{VOLUME_SUFFIX}: per-volume Dice, each case's test slices restacked "
                     "(docs/metrics.md); mean±std over test cases.")
    if boundary_shown:
        notes.append(rule_line(empty_distance))
    if any(c.block == "paper" for c in cols):
        notes.append(f"{PAPER_SUFFIX.strip()}: Zeng et al. (CLDF), their test sets and full-size data "
                     "(docs/protocol.md §13); not comparable number for number with a phantom or a small profile.")
    if marked:
        notes.append(quality.footnote([(t, m, f) for (t, m), f in marked.items()]))
    shown_fail = [f for f in failed if f.task in tasks]
    if shown_fail:
        notes.append("Failed cells (manifest.json): " + "; ".join(
            f"{f.task} {f.method} seed {f.seed}: {_short(f.flat, 160).rstrip('.')}" for f in shown_fail) + ".")
    return rows, bold, raw, notes


def available(sel: "pd.DataFrame") -> dict[str, "paper.Parsed"]:
    """Method label -> its parsed CAM sources and refiner (from the cam/refiner columns)."""
    out = {}
    cols = [c for c in ("method", "cam", "refiner") if c in sel.columns]
    for rec in sel.drop_duplicates("method")[cols].to_dict("records"):
        cam, ref = rec.get("cam"), rec.get("refiner")
        use_cols = isinstance(ref, str) and ref != ""
        out[str(rec["method"])] = paper.parse_method(str(rec["method"]), cam if use_cols else None,
                                                     ref if use_cols else None)
    return out


def cldf_references(df: "pd.DataFrame", tasks: Sequence[str], reference: str | None = None) -> dict[str, str | None]:
    """Per task, the CLDF method every row is tested against (``reference`` overrides)."""
    if reference:  # any spelling of a method the results hold; anything else is refused
        from wsss_bench.labels import resolve_method
        from wsss_bench.plugins import load_plugins

        methods = sorted(map(str, df["method"].unique()))
        host = load_plugins() if reference not in methods else None
        return {t: resolve_method(host, reference, methods, "--reference") for t in tasks}
    out = {}
    for t in tasks:
        avail = available(df[df.task == t])
        out[t] = paper.resolve("table1", "CLDF", t, avail)
    return out


def _tasks_in(sel: "pd.DataFrame", failed: Sequence[FailedCell] = ()) -> list[str]:
    present = list(dict.fromkeys([*map(str, sel["task"].unique()), *[f.task for f in failed]]))
    return sorted(present, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


