"""The report's tables (summary, the paper's Tables 1-3, significance, per case, classifier
gate) built on the layout engine, and their rendering through an exporter.

Statistics in the tables:

- ``[lo, hi]`` under a mean: case-level cluster bootstrap 95% CI of that mean
  (:func:`wsss_bench.reporting.stats.bootstrap_ci`; resamples from the profile's ``bootstrap``
  section, seed = seed(base, task, "bootstrap"));
- ``†`` after a Dice (HD95, ASSD) mean: the method's per-case mean of that metric differs from
  CLDF's by the paired two-sided Wilcoxon signed-rank test, Holm-corrected over the rows of that
  column, p < 0.05; ``n/a`` where fewer than 6 test cases are shared (no test);
- ``n=45 of 50`` under an HD95/ASSD mean: the slices (volumes) where it is defined, under the
  default empty rule (``docs/metrics.md``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from wsss_bench.boundary import ALL_METRICS, BOUNDARY_METRICS, DEFAULT_EMPTY_RULE, check_rule, has_boundary, parse_metrics
from wsss_bench.cache import atomic_write_bytes
from wsss_bench.errors import UserError
from wsss_bench.interfaces import Exporter, ReportTable
from wsss_bench.reporting import paper
from wsss_bench.reporting.format import MISSING, _finite, fmt_p
from wsss_bench.reporting.layout import (DEFAULT_TASK_LABELS, METRIC_LABELS, TABLES, TASK_ORDER, _NOTES, RowSpec,
                                         StatTable, _columns, _footer, _layout, _pick_gate, _tasks_in, available,
                                         cldf_references, gates_of)
from wsss_bench.reporting.cases import cases_table
from wsss_bench.reporting.load import REQUIRED_COLUMNS
from wsss_bench.reporting.quality import QualityIndex, model_quality_table, seeds_table
from wsss_bench.reporting.stats import classifier_gate_stats, compare_to, require_columns, volume_scores
from wsss_bench.running.rundir import FailedCell

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

# --------------------------------------------------------------------------- metrics
def table_metrics(df: "pd.DataFrame", metrics: Sequence[str] | str | None) -> tuple[str, ...]:
    """The metric columns to show: ``metrics`` (``--metrics``) checked against what the rows hold,
    or by default Dice and IoU, plus HD95 and ASSD when the rows carry them."""
    if metrics is None:
        return ALL_METRICS if has_boundary(df) else ("dice", "iou")
    chosen = parse_metrics(metrics)
    missing = [m for m in chosen if m in BOUNDARY_METRICS and not has_boundary(df)]
    if missing:
        raise UserError(f"--metrics {','.join(chosen)}: these results have no {'/'.join(missing)} columns "
                        "(they were made before boundary metrics were stored); re-run the cells, or leave "
                        f"out {','.join(missing)}")
    return chosen


# --------------------------------------------------------------------------- tables
def summary_table(df: "pd.DataFrame", gate: str | None = None, *, blocks: Sequence[str] = ("all", "pos"),
                  methods: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                  metrics: Sequence[str] | None = None, data: str | None = None,
                  title: str | None = None, task_labels: Mapping[str, str] | None = None,
                  not_bold: Iterable[str] = (), ci_resamples: int = 0, per_volume: bool = False,
                  with_paper: bool = False, reference: str | None = None, stats: bool | None = None,
                  failed: Sequence[FailedCell] = (), empty_distance: str = DEFAULT_EMPTY_RULE,
                  quality: Any = None) -> StatTable:
    """Every method (rows) x task and metric (columns), one column block per entry of ``blocks``.

    ``gate=None`` picks gate=label when present, else the only gate.  ``not_bold`` names methods
    that may not take the bold (``fsl`` always is).  ``ci_resamples`` > 0 adds the bootstrap CI
    under each all-slice mean; ``stats`` (default: on when CIs are) marks methods that differ
    from CLDF (``reference`` overrides which method that is).  ``per_volume`` adds a per-volume
    Dice column per task; ``with_paper`` the paper's value beside each all-slice column (the row
    mapping of :mod:`wsss_bench.reporting.paper`).  ``failed`` (from :func:`failed_cells`) fills the cells of
    failed methods.  ``raw`` is the tidy aggregate of the shown cells.  ``metrics`` default: see
    :func:`table_metrics`; HD95/ASSD are averaged under ``empty_distance``.
    ``quality`` (run folder, manifests or a QualityIndex) marks rows whose models are in doubt
    (:mod:`wsss_bench.reporting.quality`).
    """
    require_columns(df, REQUIRED_COLUMNS, what="results")
    metrics = table_metrics(df, metrics)
    gate = _pick_gate(df, gate)
    sel = df[df["gate"] == gate]
    failed = [f for f in failed if tasks is None or f.task in tasks]
    tasks = list(tasks) if tasks is not None else _tasks_in(sel, failed)
    if methods is None:
        methods = list(dict.fromkeys([*map(str, sel["method"].unique()), *[f.method for f in failed]]))
    methods = list(methods)
    sel = sel[sel["task"].isin(tasks) & sel["method"].isin(methods)]
    avail = available(sel)
    skip = set(not_bold)
    specs = []
    from wsss_bench.labels import display_labels
    from wsss_bench.plugins import load_plugins

    shown = display_labels(load_plugins(), methods)  # a grid's parameter on every row, defaults included
    for m in methods:
        parsed = avail.get(m) or paper.parse_method(m)
        is_fsl = parsed.refiner == "fsl"
        specs.append(RowSpec(shown[m], {t: m for t in tasks},
                             {t: paper.paper_row_of(parsed, t) for t in tasks} if with_paper else {},
                             bold=m not in skip and not is_fsl))
    stats = ci_resamples > 0 if stats is None else stats
    refs = cldf_references(sel, tasks, reference) if stats else {}
    cols, header, sub, groups = _columns(tasks, metrics, blocks, task_labels, per_volume=per_volume,
                                         with_paper=with_paper)
    rows, bold, raw, notes = _layout(sel, specs, cols, gate=gate, resamples=ci_resamples,
                                     references=refs, failed=failed, empty_distance=empty_distance,
                                     quality=QualityIndex.of(quality))
    notes = [_NOTES[b] for b in blocks] + notes
    return StatTable(title=title or f"Segmentation results (gate={gate})", header=["Method", *header],
                     rows=rows, bold=bold, footer=_footer(sel, gate, data, notes), raw=raw,
                     groups=groups, subheader=["Method", *sub])


def _row_methods(method: str | Mapping[str, str | None] | Callable[[str], str | None],
                 tasks: Sequence[str]) -> dict[str, str | None]:
    if isinstance(method, str):
        return {t: method for t in tasks}
    if callable(method):
        return {t: method(t) for t in tasks}
    return {t: method.get(t) for t in tasks}


def paper_table(df: "pd.DataFrame", rows: Sequence[tuple[str, Any]], tasks: Sequence[str],
                gate: str = "label", supplementary_rows: Sequence[tuple[str, Any]] = (), *,
                title: str = "", metrics: Sequence[str] | None = None, block: str = "all",
                data: str | None = None, task_labels: Mapping[str, str] | None = None,
                not_bold: Iterable[str] = (), bold_supplementary: bool = False,
                ci_resamples: int = 0, per_volume: bool = False, stats: bool | None = None,
                references: Mapping[str, str | None] | None = None,
                paper_rows: Mapping[str, tuple[str, str]] | None = None,
                failed: Sequence[FailedCell] = (), empty_distance: str = DEFAULT_EMPTY_RULE,
                quality: Any = None) -> StatTable:
    """A paper-style table: the given (row label, method) rows in order, then the
    supplementary rows after a rule; cells ``mean±std`` or '—' where a method has no result.

    A row's method is a label, a {task: label} mapping or a function of the task (CLDF's seeds
    differ per task).  Bold marks the best value per column among the main rows whose label is
    not in ``not_bold`` (supplementary rows too when ``bold_supplementary``).  ``paper_rows``
    maps row labels to (paper table, paper row): their reference numbers stand beside ours.
    ``references`` gives the CLDF method per task for the significance marks (default: the
    paper mapping).  ``raw`` holds the aggregate of every shown cell with its ``row`` label and a
    ``supplementary`` flag.
    """
    require_columns(df, REQUIRED_COLUMNS, what="results")
    metrics = table_metrics(df, metrics)
    gate = _pick_gate(df, gate)
    tasks = list(tasks)
    skip = set(not_bold)
    n_main = len(rows)
    specs = []
    for i, (label, method) in enumerate([*rows, *supplementary_rows]):
        pr = (paper_rows or {}).get(label)
        specs.append(RowSpec(label, _row_methods(method, tasks),
                             {t: pr for t in tasks} if pr else {}, supplementary=i >= n_main,
                             bold=label not in skip and (i < n_main or bold_supplementary)))
    wanted = {m for s in specs for m in s.methods.values() if m}
    sel = df[(df["gate"] == gate) & df.task.isin(tasks) & df.method.isin(list(wanted))]
    stats = ci_resamples > 0 if stats is None else stats
    refs = (dict(references) if references is not None else cldf_references(df[df["gate"] == gate], tasks)) \
        if stats else {}
    cols, header, sub, groups = _columns(tasks, metrics, [block], task_labels, per_volume=per_volume,
                                         with_paper=bool(paper_rows))
    cells, bold, raw, notes = _layout(sel, specs, cols, gate=gate, resamples=ci_resamples,
                                      references=refs, failed=failed, empty_distance=empty_distance,
                                      quality=QualityIndex.of(quality))
    return StatTable(title=title, header=["Method", *header], rows=cells, bold=bold,
                     rules_after=[n_main - 1] if supplementary_rows and n_main else [],
                     footer=_footer(sel, gate, data, [_NOTES[block], *notes]), raw=raw,
                     groups=groups, subheader=["Method", *sub])


def reference_table(df: "pd.DataFrame", table: str, gate: str = "label", *, with_paper: bool = False,
                    ci_resamples: int = 0, per_volume: bool = False, data: str | None = None,
                    failed: Sequence[FailedCell] = (), metrics: Sequence[str] | None = None,
                    empty_distance: str = DEFAULT_EMPTY_RULE, quality: Any = None) -> StatTable:
    """Table 1, 2 or 3 of the paper (docs/protocol.md section 9), rows filled by :mod:`wsss_bench.reporting.paper`.

    The footer names the method label that filled each row whose label differs from the
    paper's name, so a reader sees e.g. that CLDF on BraTS is ``amecam+mg+cldf``.
    """
    if table not in paper.ROWS:
        raise UserError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    require_columns(df, REQUIRED_COLUMNS, what="results")
    gate = _pick_gate(df, gate)
    tasks = list(paper.TABLE_TASKS[table])
    sel = df[df["gate"] == gate]
    by_task = {t: available(sel[sel["task"] == t]) for t in tasks}
    present = [t for t in tasks if by_task[t] or any(f.task == t for f in failed)]
    tasks = present or tasks[:1]

    def fill(row: str) -> dict[str, str | None]:
        return {t: paper.resolve(table, row, t, by_task.get(t, {})) for t in tasks}
    main = [(r, fill(r)) for r in paper.ROWS[table]]
    supp = [(r, fill(r)) for r in paper.SUPPLEMENTARY.get(table, [])]
    supp = [(r, m) for r, m in supp if any(m.values())]  # supplementary rows only when run
    failed_rows = []
    for f in failed:
        if f.task in tasks:
            parsed = paper.parse_method(f.method)
            hit = next((r for r in [*paper.ROWS[table], *paper.SUPPLEMENTARY.get(table, [])]
                        if any(rule.matches(parsed) for rule in paper.row_rules(table, r, f.task))), None)
            for label, methods in [*main, *supp]:
                if label == hit and methods.get(f.task) is None:
                    methods[f.task] = f.method
            if hit is None:
                failed_rows.append(f)
    paper_rows = {r: (table, r) for r in paper.NUMBERS[table]} if with_paper else None
    t = paper_table(df, main, tasks, gate, supp, title=f"{paper.TITLES[table]} (gate={gate})",
                    data=data, not_bold=paper.NOT_BOLD, ci_resamples=ci_resamples, per_volume=per_volume,
                    paper_rows=paper_rows, references=cldf_references(sel, tasks), failed=failed,
                    metrics=metrics, empty_distance=empty_distance, quality=quality)
    filled = []
    for label, methods in [*main, *supp]:
        used = {t: m for t, m in methods.items() if m}
        if not used:
            continue
        if len(set(used.values())) == 1:
            filled.append(f"{label} = {next(iter(used.values()))}")
        else:
            filled.append(f"{label} = " + ", ".join(f"{m} ({DEFAULT_TASK_LABELS.get(t, t)})" for t, m in used.items()))
    extra = []
    if filled:
        extra.append("Rows: " + "; ".join(filled) + " (docs/metrics.md).")
    if with_paper and table in paper.NOTES:
        extra.append(paper.NOTES[table])
    t.footer = " ".join([t.footer, *extra])
    return t


def significance_table(df: "pd.DataFrame", reference_method: str, rows: Sequence[tuple[str, str]],
                       tasks: Sequence[str], gate: str = "label", *, column: str = "dice",
                       title: str = "", data: str | None = None,
                       task_labels: Mapping[str, str] | None = None) -> ReportTable:
    """Holm-corrected Wilcoxon p-values of every row's per-case mean ``column`` vs the reference."""
    require_columns(df, REQUIRED_COLUMNS, what="results")
    gate = _pick_gate(df, gate)
    labels = {**DEFAULT_TASK_LABELS, **(task_labels or {})}
    methods = [m for _, m in rows]
    sel = df[(df["gate"] == gate) & df.task.isin(list(tasks))]
    cmp = compare_to(sel, reference_method, gate=gate, column=column, methods=methods)
    index = {(r["method"], r["task"]): r for r in cmp.to_dict("records")}
    cells = []
    for label, method in rows:
        line = [label]
        for t in tasks:
            rec = index.get((method, t))
            line.append("ref" if method == reference_method else fmt_p(rec["p_holm"], rec["note"]) if rec else MISSING)
        cells.append(line)
    note = (f"Paired two-sided Wilcoxon signed-rank test on per-case mean {METRIC_LABELS.get(column, column)} "
            f"vs {reference_method}, Holm-corrected per column; n/a: fewer than 6 common test cases.")
    return ReportTable(title=title or f"p-values vs {reference_method}",
                       header=["Method", *[f"{labels.get(t, t)} p" for t in tasks]], rows=cells,
                       footer=_footer(sel, gate, data, [note]), raw=cmp)


def per_case_table(df: "pd.DataFrame", gate: str = "label", *, per_volume: bool = False,
                   methods: Sequence[str] | None = None, task: str | None = None,
                   data: str | None = None) -> StatTable:
    """Dice per test case (rows) and method (columns): the mean over the case's test slices, or
    its per-volume Dice with ``per_volume``.  Bold: the best method of each case (FSL excluded).
    ``task`` keeps one task (and the methods that ran on it)."""
    import pandas as pd

    require_columns(df, REQUIRED_COLUMNS, what="results")
    gate = _pick_gate(df, gate)
    sel = df[df["gate"] == gate]
    if task is not None:
        sel = sel[sel["task"] == task]
    methods = list(methods) if methods is not None else list(dict.fromkeys(map(str, sel["method"].unique())))
    sel = sel[sel["method"].isin(methods)]
    if per_volume:
        vals = volume_scores(sel).groupby(["task", "case_id", "method"], sort=False)["dice3d"].mean()
    else:
        vals = sel.groupby(["task", "case_id", "method"], sort=False)["dice"].mean()
    counts = sel.drop_duplicates(["task", "case_id", "z"]).groupby(["task", "case_id"], sort=False).size()
    avail = available(sel)
    fsl = {m for m, p in avail.items() if p.refiner == "fsl"}
    labels = DEFAULT_TASK_LABELS
    keys = sorted(counts.index, key=lambda k: (TASK_ORDER.index(k[0]) if k[0] in TASK_ORDER else 99, k[0], str(k[1])))
    rows, bold, records = [], set(), []
    for i, (task, case) in enumerate(keys):
        line = [str(case), labels.get(task, task), str(int(counts[(task, case)]))]
        best, scores = -1.0, {}
        for m in methods:
            v = vals.get((task, case, m), float("nan"))
            scores[m] = v
            line.append(f"{v:.3f}" if _finite(v) else MISSING)
            records.append({"task": task, "case_id": case, "method": m, "gate": gate,
                            "dice3d" if per_volume else "dice_case_mean": v})
            if m not in fsl and _finite(v):
                best = max(best, round(v, 3))
        for j, m in enumerate(methods, start=3):
            if m not in fsl and _finite(scores[m]) and round(scores[m], 3) == best:
                bold.add((i, j))
        rows.append(line)
    what = "per-volume Dice (test slices restacked)" if per_volume else "mean Dice over the case's test slices"
    where = f"{DEFAULT_TASK_LABELS.get(task, task)}, " if task else ""
    return StatTable(title=f"Dice per test case ({where}gate={gate})", header=["Case", "Task", "Slices", *methods],
                     rows=rows, bold=bold, footer=_footer(sel, gate, data, [f"Cells: {what}; bold: best WSSS method per case."]),
                     raw=pd.DataFrame.from_records(records))


def classifier_table(df: "pd.DataFrame") -> ReportTable | None:
    """AUC, sensitivity and specificity of gate=classifier per task (docs/protocol.md section 7)."""
    if "classifier_p1" not in df.columns or not df["classifier_p1"].notna().any():
        return None
    st = classifier_gate_stats(df)
    rows = [[DEFAULT_TASK_LABELS.get(r["task"], r["task"]), str(r["n_pos"]), str(r["n_neg"]),
             *(f"{r[k]:.3f}" if _finite(r[k]) else MISSING for k in ("auc", "sensitivity", "specificity"))]
            for r in st.to_dict("records")]
    return ReportTable(title="CAM classifier used by gate=classifier (test slices)",
                       header=["Task", "positives", "negatives", "AUC", "sensitivity", "specificity"],
                       rows=rows, footer="A slice passes when softmax p(1) >= 0.5.", raw=st)


def build_tables(df: "pd.DataFrame", table: str = "summary", gate: str | None = "all", *,
                 with_paper: bool = False, per_volume: bool = False, resamples: int = 0,
                 reference: str | None = None, failed: Sequence[FailedCell] = (),
                 data: str | None = None, metrics: Sequence[str] | str | None = None,
                 empty_distance: str = DEFAULT_EMPTY_RULE, quality: Any = None,
                 quality_table: bool = True) -> list[ReportTable]:
    """The tables ``wsss-bench report`` prints: one per gate (``gate="all"``: every gate held);
    ``table="cases"`` is one per-case table over the chosen gates.

    ``quality`` (run folder, loaded manifests or a QualityIndex): the cells' model and
    pseudo-mask quality.  With it, result rows whose models are in doubt are marked, and
    (``quality_table``) the model-quality table follows the result tables.  ``table="seeds"``
    is the training-split pseudo-mask table, ``table="quality"`` the model-quality table alone.
    """
    if table not in TABLES:
        raise UserError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    check_rule(empty_distance)
    chosen = table_metrics(df, metrics)
    if reference:  # refused like any unknown name, whichever table is asked for
        reference = next(iter(cldf_references(df, ["-"], reference).values()))
    if table == "cases":
        require_columns(df, REQUIRED_COLUMNS, what="results")
        return [cases_table(df, empty_distance, chosen, gates=gates_of(df, gate), data=data)]
    index = QualityIndex.of(quality)
    if table == "seeds":
        return [seeds_table(index, df)]
    if table == "quality":
        got = model_quality_table(index, df)
        if got is None:
            raise UserError("no cell of these runs recorded model quality (runs made before it existed); "
                            "re-run them to get it")
        return [got]
    out: list[ReportTable] = []
    for g in gates_of(df, gate):
        if table == "summary":
            out.append(summary_table(df, g, blocks=("all", "pos"), ci_resamples=resamples, per_volume=per_volume,
                                     with_paper=with_paper, reference=reference, failed=failed, data=data,
                                     metrics=chosen, empty_distance=empty_distance, quality=index))
        else:
            out.append(reference_table(df, table, g, with_paper=with_paper, ci_resamples=resamples,
                                       per_volume=per_volume, data=data, failed=failed, metrics=chosen,
                                       empty_distance=empty_distance, quality=index))
            out[-1].kind = table  # the LaTeX exporter's compact preset is for the paper's tables
    mq = model_quality_table(index, df) if quality_table else None
    if mq is not None:
        out.append(mq)
    return out


# --------------------------------------------------------------------------- output
def render(table: ReportTable, exporter: Exporter | type[Exporter]) -> str:
    """The table as text in the exporter's format, ending with a newline."""
    if isinstance(exporter, type):
        exporter = exporter()
    text = exporter.export(table)
    return text if text.endswith("\n") else text + "\n"


def render_many(tables: Sequence[ReportTable], exporter: Exporter | type[Exporter]) -> str:
    """Several tables in one text: CSV concatenates the tidy numbers; others join the tables."""
    import pandas as pd

    if isinstance(exporter, type):
        exporter = exporter()
    if len(tables) == 1:
        return render(tables[0], exporter)
    if exporter.name == "csv":
        raws = [t.raw for t in tables if t.raw is not None]
        merged = ReportTable(title="", header=[], rows=[], raw=pd.concat(raws, ignore_index=True) if raws else None)
        return render(merged, exporter)
    return "\n".join(render(t, exporter) for t in tables)


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower() or "table"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (temp file + os.replace, umask mode)."""
    path = Path(path)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def write_report(table: ReportTable, exporter: Exporter | type[Exporter], path: str | os.PathLike) -> Path:
    """Write the rendered table to ``path`` atomically (temp file + os.replace).

    If ``path`` is an existing directory the file is named after the title and the
    exporter's suffix.  Returns the written path.
    """
    if isinstance(exporter, type):
        exporter = exporter()
    path = Path(path)
    if path.is_dir():
        path = path / f"{_slug(table.title)}{exporter.suffix}"
    return write_text(path, render(table, exporter))


