"""The plain-text tables a run and a bench print: the end-of-run summary (``summary.md``) and
one table per benchmark file (``tables.md``).

Both are :class:`~wsss_bench.interfaces.ReportTable` objects, the same model of header, rows
and footer the report's exporters take; numbers are written by
:func:`wsss_bench.reporting.format.fmt_stat` (spaced "0.392 ± 0.29 [lo, hi]").  The command
line prints a table with rich and :func:`to_markdown` writes it; ``results/check.py``
recomputes both files from ``results.parquet`` with these functions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from wsss_bench.boundary import (BOUNDARY_METRICS, DEFAULT_EMPTY_RULE, apply_rule_to_rows, check_rule, has_boundary,
                                 parse_metrics, rule_line)
from wsss_bench.interfaces import ReportTable
from wsss_bench.reporting.format import fmt_stat, markdown_grid
from wsss_bench.reporting.layout import QUALITY_MARK
from wsss_bench.reporting.quality import QualityIndex
from wsss_bench.reporting.stats import aggregate, bootstrap_ci, bootstrap_seed
from wsss_bench.running.rundir import FailedCell

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

SUMMARY_TITLE = "Dice / IoU per gate (mean ± std over test slices)"
SUMMARY_HEADER = ["task", "method", "gate", "Dice (all)", "IoU (all)", "Dice (pos)", "IoU (pos)", "slices pos/neg"]


def to_markdown(table: ReportTable, *, with_title: bool = True) -> str:
    """``### title``, the Markdown grid, then the footer, each block separated by a blank line."""
    lines = ([f"### {table.title}", ""] if with_title and table.title else []) + markdown_grid(table.header, table.rows)
    if table.footer:
        lines += ["", table.footer]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- end of a run
def _defined(n: Any, total: Any) -> str:
    """' (n=45 of 50)' when a boundary mean covers fewer than all slices."""
    return f" (n={int(n)} of {int(total)})" if int(n) < int(total) else ""


def run_summary(frame: "pd.DataFrame", empty_distance: str = DEFAULT_EMPTY_RULE) -> ReportTable:
    """Per task, method and gate: Dice and IoU mean ± std over all and over positive slices; with
    boundary columns in the rows also HD95 and ASSD (mm) over all slices, under ``empty_distance``."""
    boundary = has_boundary(frame)
    if boundary:
        frame = apply_rule_to_rows(frame, empty_distance)
    rows = []
    for _, r in aggregate(frame).iterrows():
        extra = [fmt_stat(r[f"{m}_mean"], r[f"{m}_std"], compact=False) + _defined(r[f"{m}_n"], r["n_slices"])
                 for m in BOUNDARY_METRICS] if boundary else []
        rows.append([str(r["task"]), str(r["method"]), str(r["gate"]),
                     *(fmt_stat(r[f"{m}_mean"], r[f"{m}_std"], compact=False)
                       for m in ("dice", "iou", "dice_pos", "iou_pos")),
                     *extra, f"{int(r['n_pos'])}/{int(r['n_neg'])}"])
    header = list(SUMMARY_HEADER)
    if boundary:
        header[-1:-1] = ["HD95 mm (all)", "ASSD mm (all)"]
    return ReportTable(title=SUMMARY_TITLE, header=header, rows=rows,
                       footer=rule_line(empty_distance) if boundary else "")


def summary_markdown(frame: "pd.DataFrame") -> str:
    """The end-of-run table as Markdown (``summary.md``), without a title."""
    return to_markdown(run_summary(frame), with_title=False)


# --------------------------------------------------------------------------- a bench table
def _cell_text(frame: "pd.DataFrame | None", task: str, methods: set[str], gate: str, resamples: int,
               failures: dict[tuple[str, str], str], metric: str = "dice",
               quality: "QualityIndex | None" = None, marked: dict | None = None) -> str:
    sub = frame[(frame.task == task) & (frame.method.isin(methods)) & (frame.gate == gate)] \
        if frame is not None and len(frame) else None
    parts = []
    for method in sorted(methods):
        m = sub[sub.method == method] if sub is not None and len(sub) else []
        if not len(m):
            why = failures.get((task, method))
            parts.append(f"failed: {why}" if why else "not run")
            continue
        lo, hi = bootstrap_ci(m, resamples, bootstrap_seed(m, task), column=metric)
        v = m[metric].dropna()  # boundary metrics: NaN = undefined, left out and counted
        text = (fmt_stat(v.mean() if len(v) else float("nan"), v.std(ddof=0), (lo, hi), compact=False)
                + (_defined(len(v), len(m)) if metric in BOUNDARY_METRICS else ""))
        flags = quality.flags(method, task, gate) if quality and metric == "dice" else []
        if flags and marked is not None:
            marked.setdefault((task, method), flags)
            text = text.replace(" [", f"{QUALITY_MARK} [", 1) if " [" in text else text + QUALITY_MARK
        parts.append(text)
    return "; ".join(parts)


def bench_metrics(frame: "pd.DataFrame | None", metrics: Any = None) -> tuple[str, ...]:
    """The bench tables' metric columns: ``metrics`` (``--metrics``), else Dice, plus HD95 and
    ASSD when the rows carry them (IoU only when asked for)."""
    boundary = frame is not None and has_boundary(frame)
    if metrics is None:
        return ("dice", *BOUNDARY_METRICS) if boundary else ("dice",)
    chosen = parse_metrics(metrics)
    return tuple(m for m in chosen if m not in BOUNDARY_METRICS or boundary)


def bench_table(frame: "pd.DataFrame | None", planned: Sequence[Any], table: Any, gate: str = "label",
                resamples: int = 1000, failures: Sequence[FailedCell] = (), profile: str | None = None,
                metrics: Any = None, empty_distance: str = DEFAULT_EMPTY_RULE,
                quality: Any = None) -> ReportTable:
    """One benchmark file's table: its rows x tasks, Dice mean ± std with the case-level bootstrap
    95% CI (``resamples`` draws, seeded with seed(base, task, "bootstrap")); with boundary
    columns in the rows also HD95 and ASSD per task (``metrics`` chooses; ``empty_distance`` is
    the rule for one empty mask, printed under the table).

    ``planned`` are the bench's planned rows (table, row, task, cells, error); a row with a
    ``note`` for ``profile`` gets a numbered caveat in the footer; a failed cell shows the first
    line of its recorded error.  ``quality`` (the bench folder, its manifests or a QualityIndex)
    marks cells whose models are in doubt and adds, per task, the CAM classifier's test stats
    and the models' stop reasons to the footer.
    """
    reasons = {(f.task, f.method): f.reason for f in failures}
    chosen = bench_metrics(frame, metrics)
    if frame is not None and has_boundary(frame) and any(m in BOUNDARY_METRICS for m in chosen):
        frame = apply_rule_to_rows(frame, check_rule(empty_distance))
    index = QualityIndex.of(quality)
    marked: dict[tuple[str, str], list[str]] = {}
    rows: list[list[str]] = []
    notes: list[str] = []
    for row in table.rows:
        cells = []
        for task in table.tasks:
            pr = next((p for p in planned if p.table == table.name and p.row == row.name and p.task == task), None)
            if pr is None:
                cells.append("")
            elif pr.error:
                cells.append(pr.error.split(":")[0])
            else:
                cells.extend(_cell_text(frame, task, {c.method for c in pr.cells}, gate, resamples, reasons, m,
                                         index, marked)
                             for m in chosen)
                continue
            cells.extend([cells[-1]] * (len(chosen) - 1))
        tag = " (upper bound)" if row.upper_bound else (" (suppl.)" if row.supplementary else "")
        note = row.note_for(profile)
        if note:
            notes.append(note)
            tag += f" [{len(notes)}]"
        rows.append([f"{row.name}{tag}", *cells])
    names = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "assd": "ASSD"}
    footer = f"gate={gate}; {'/'.join(names[m] for m in chosen)} mean ± std over test slices [case-level bootstrap 95% CI]"
    if any(m in BOUNDARY_METRICS for m in chosen):
        footer += "\n\n" + rule_line(empty_distance)
    if notes:
        footer += "\n\n" + "\n".join(f"[{i}] {text}" for i, text in enumerate(notes, 1))
    if index:
        lines = [index.task_summary(t, {c.method for p in planned if p.table == table.name and p.task == t
                                        for c in p.cells}) for t in table.tasks]
        lines = [x for x in lines if x]
        if marked:
            lines.append(index.footnote([(t, m, f) for (t, m), f in marked.items()]))
        if lines:
            footer += "\n\nModel quality: " + "\n".join(lines)
    header = ["method", *(f"{t} {names[m]}" for t in table.tasks for m in chosen)]
    return ReportTable(title=f"{table.name}: {table.caption}", header=header, rows=rows, footer=footer)


def bench_markdown(frame: "pd.DataFrame | None", planned: Sequence[Any], tables: Sequence[Any], *,
                   resamples: int, failures: Sequence[FailedCell] = (), profile: str | None = None,
                   metrics: Any = None, empty_distance: str = DEFAULT_EMPTY_RULE, quality: Any = None) -> str:
    """Every benchmark file's table as Markdown (``tables.md``)."""
    index = QualityIndex.of(quality)
    return "\n".join(to_markdown(bench_table(frame, planned, t, resamples=resamples, failures=failures,
                                             profile=profile, metrics=metrics, empty_distance=empty_distance,
                                             quality=index))
                     for t in tables)
