"""Tables from the per-slice results (PROTOCOL section 9).

Data flows one way: ``results.parquet`` -> :func:`load_results` -> aggregates
(:mod:`wsss_bench.metrics`) -> a :class:`~wsss_bench.interfaces.ReportTable` (formatted
strings plus the tidy numbers in ``raw``) -> an exporter.  Nothing here recomputes a metric
from images, and no layout decision reaches back into the results.

In a ReportTable, ``rows[i][0]`` is the row label and ``bold`` holds (row, column) indices
into ``rows``, so column 0 is the label column and cells start at column 1.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from wsss_bench.errors import UserError
from wsss_bench.interfaces import Exporter, ReportTable
from wsss_bench.metrics import GATES, aggregate, check_unique_slices, compare_to, require_columns

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

RESULTS_FILE = "results.parquet"
REQUIRED_COLUMNS = ["task", "method", "gate", "case_id", "z", "label", "dice", "iou"]
DEFAULT_TASK_LABELS = {"brats": "BraTS21", "flare21-kidney": "Kidney",
                       "flare21-spleen": "Spleen", "flare21-liver": "Liver"}
METRIC_LABELS = {"dice": "Dice", "iou": "IoU"}
BLOCKS = {"all": "", "pos": " (pos)", "case": " (case)"}  # header suffix per block
MISSING = "—"
UP = "↑"


# --------------------------------------------------------------------------- loading
def _result_files(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"results path {path} does not exist; pass a run directory "
                        f"(one holding {RESULTS_FILE}) or a folder of run directories")
    if path.is_file():
        if path.suffix == ".parquet":
            return [path]
        raise UserError(f"{path} is not a results file; pass a run directory holding {RESULTS_FILE}")
    if (path / RESULTS_FILE).is_file():
        return [path / RESULTS_FILE]
    found = sorted(path.rglob(RESULTS_FILE))
    if not found:
        raise UserError(f"{path} is not a results directory: no {RESULTS_FILE} in it or below it; "
                        "run `wsss-bench run` first or pass the run directory it printed")
    return found


def _read_one(path: Path) -> "pd.DataFrame":
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as err:  # corrupt or not parquet at all
        raise UserError(f"cannot read results file {path}: {err}") from None
    require_columns(df, REQUIRED_COLUMNS, what=f"results file {path}")
    if "run_dir" not in df.columns:
        df["run_dir"] = str(path.parent)
    return df


def load_results(source: str | os.PathLike | Iterable[str | os.PathLike]) -> "pd.DataFrame":
    """The per-slice results of one run, of every run below a folder, or of a list of either.

    Adds a ``run_dir`` column (the folder each row came from).  Raises UserError naming the
    path when it is missing or holds no ``results.parquet``, and when two runs score the
    same slice for the same method, gate, seed and profile.
    """
    import pandas as pd

    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise UserError("no results given; pass at least one run directory")
    files: dict[Path, None] = {}
    for src in sources:
        for f in _result_files(Path(src)):
            files.setdefault(f.resolve(), None)
    df = pd.concat([_read_one(f) for f in files], ignore_index=True)
    check_unique_slices(df)
    return df


# --------------------------------------------------------------------------- formatting
def _finite(x: Any) -> bool:
    try:
        return x is not None and not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def fmt_mean_std(mean: float, std: float | None = None) -> str:
    """'0.392±0.29' (mean to 3 decimals, std to 2, as the paper); '—' when missing."""
    if not _finite(mean):
        return MISSING
    return f"{mean:.3f}" if not _finite(std) else f"{mean:.3f}±{std:.2f}"


def fmt_p(p: float, note: str = "") -> str:
    if not _finite(p):
        return "n/a" if note.startswith("n/a") else MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _values(df: "pd.DataFrame", column: str) -> list[str]:
    return [str(v) for v in sorted(df[column].dropna().unique(), key=str)] if column in df.columns else []


def _footer(df: "pd.DataFrame", gate: str, data: str | None, extra: Sequence[str] = ()) -> str:
    seeds = _values(df, "seed")
    kinds = _values(df, "data") or ([data] if data else ["unspecified"])
    parts = [f"gate={gate}", f"profile={','.join(_values(df, 'profile')) or 'unspecified'}",
             f"{'seeds' if len(seeds) > 1 else 'seed'}={','.join(seeds) or 'unspecified'}",
             f"data={','.join(kinds)}"]
    text = "; ".join(parts) + "."
    return " ".join([text, *extra]).strip()


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


def _layout(agg: "pd.DataFrame", row_specs: Sequence[tuple[str, str]],
            columns: Sequence[tuple[str, str, str]], eligible: set[int]) -> tuple[list[list[str]], set]:
    """Cells for rows (label, method) x columns (task, metric, block); bold = best per column."""
    index = {(r["method"], r["task"]): r for r in agg.to_dict("records")}
    rows = [[label] for label, _ in row_specs]
    bold: set[tuple[int, int]] = set()
    for j, (task, metric, block) in enumerate(columns, start=1):
        stem = metric if block == "all" else f"{metric}_{block}"
        means: list[float] = []
        for i, (_, method) in enumerate(row_specs):
            rec = index.get((method, task))
            mean = rec.get(f"{stem}_mean") if rec else None
            std = rec.get(f"{stem}_std") if rec and block != "case" else None
            rows[i].append(fmt_mean_std(mean, std))
            means.append(round(mean, 3) if _finite(mean) else float("nan"))
        cand = [means[i] for i in eligible if _finite(means[i])]
        if cand:  # compare at printed precision, so printed ties are all bold
            best = max(cand)
            bold |= {(i, j) for i in eligible if means[i] == best}
    return rows, bold


def _columns(tasks: Sequence[str], metrics: Sequence[str], blocks: Sequence[str],
             task_labels: Mapping[str, str] | None) -> tuple[list[tuple[str, str, str]], list[str]]:
    labels = {**DEFAULT_TASK_LABELS, **(task_labels or {})}
    for b in blocks:
        if b not in BLOCKS:
            raise UserError(f"unknown block {b!r}; choose from {', '.join(BLOCKS)}")
    for m in metrics:
        if m not in METRIC_LABELS:
            raise UserError(f"unknown metric {m!r}; choose from {', '.join(METRIC_LABELS)}")
    cols = [(t, m, b) for b in blocks for t in tasks for m in metrics]
    header = [f"{labels.get(t, t)} {METRIC_LABELS[m]}{BLOCKS[b]} {UP}" for t, m, b in cols]
    return cols, header


_NOTES = {"all": "Values: mean±std over all test slices (population std).",
          "pos": "(pos): positive slices only.", "case": "(case): mean of per-case means."}


# --------------------------------------------------------------------------- tables
def summary_table(df: "pd.DataFrame", gate: str | None = None, *, blocks: Sequence[str] = ("all", "pos"),
                  methods: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                  metrics: Sequence[str] = ("dice", "iou"), data: str | None = None,
                  title: str | None = None, task_labels: Mapping[str, str] | None = None,
                  not_bold: Iterable[str] = (), ci_resamples: int = 0) -> ReportTable:
    """Every method (rows) x task and metric (columns), one column block per entry of ``blocks``.

    ``gate=None`` picks gate=label when present, else the only gate.  ``not_bold`` names methods
    that may not take the bold (e.g. the fully supervised upper bound).  ``raw`` is the tidy
    aggregate of the shown methods and tasks (with bootstrap CIs when ``ci_resamples`` > 0).
    """
    require_columns(df, REQUIRED_COLUMNS, what="results")
    gate = _pick_gate(df, gate)
    sel = df[df["gate"] == gate]
    tasks = list(tasks) if tasks is not None else [str(t) for t in sel["task"].unique()]
    methods = list(methods) if methods is not None else [str(m) for m in sel["method"].unique()]
    sel = sel[sel["task"].isin(tasks) & sel["method"].isin(methods)]
    agg = aggregate(sel, ci_resamples=ci_resamples)
    cols, header = _columns(tasks, metrics, blocks, task_labels)
    skip = set(not_bold)
    eligible = {i for i, m in enumerate(methods) if m not in skip}
    rows, bold = _layout(agg, [(m, m) for m in methods], cols, eligible)
    notes = [_NOTES[b] for b in blocks]
    return ReportTable(title=title or f"Segmentation results (gate={gate})", header=["Method", *header],
                       rows=rows, bold=bold, footer=_footer(sel, gate, data, notes), raw=agg)


def paper_table(df: "pd.DataFrame", rows: Sequence[tuple[str, str]], tasks: Sequence[str],
                gate: str = "label", supplementary_rows: Sequence[tuple[str, str]] = (), *,
                title: str = "", metrics: Sequence[str] = ("dice", "iou"), block: str = "all",
                data: str | None = None, task_labels: Mapping[str, str] | None = None,
                not_bold: Iterable[str] = (), bold_supplementary: bool = False) -> ReportTable:
    """A paper-style table: the given (row label, method) rows in order, then the
    supplementary rows after a rule; cells ``mean±std`` or '—' where a method has no result.

    Bold marks the best value per column among the main rows whose label is not in
    ``not_bold`` (supplementary rows too when ``bold_supplementary``).  ``raw`` holds the
    aggregate of every shown cell with its ``row`` label and a ``supplementary`` flag.
    """
    import pandas as pd

    require_columns(df, REQUIRED_COLUMNS, what="results")
    gate = _pick_gate(df, gate)
    specs = [*rows, *supplementary_rows]
    wanted = {m for _, m in specs}
    sel = df[(df["gate"] == gate) & df["task"].isin(list(tasks)) & df["method"].isin(list(wanted))]
    agg = aggregate(sel)
    cols, header = _columns(tasks, metrics, [block], task_labels)
    skip = set(not_bold)
    n_main = len(rows)
    eligible = {i for i, (label, _) in enumerate(specs)
                if label not in skip and (i < n_main or bold_supplementary)}
    cells, bold = _layout(agg, specs, cols, eligible)
    spec_df = pd.DataFrame({"row": [lab for lab, _ in specs], "method": [m for _, m in specs],
                            "supplementary": [i >= n_main for i in range(len(specs))]})
    raw = spec_df.merge(agg, on="method", how="inner") if len(agg) else spec_df.iloc[0:0]
    return ReportTable(title=title, header=["Method", *header], rows=cells, bold=bold,
                       rules_after=[n_main - 1] if supplementary_rows and n_main else [],
                       footer=_footer(sel, gate, data, [_NOTES[block]]), raw=raw.reset_index(drop=True))


def significance_table(df: "pd.DataFrame", reference_method: str, rows: Sequence[tuple[str, str]],
                       tasks: Sequence[str], gate: str = "label", *, column: str = "dice",
                       title: str = "", data: str | None = None,
                       task_labels: Mapping[str, str] | None = None) -> ReportTable:
    """Holm-corrected Wilcoxon p-values of every row's per-case mean ``column`` vs the reference."""
    require_columns(df, REQUIRED_COLUMNS, what="results")
    gate = _pick_gate(df, gate)
    labels = {**DEFAULT_TASK_LABELS, **(task_labels or {})}
    methods = [m for _, m in rows]
    sel = df[(df["gate"] == gate) & df["task"].isin(list(tasks))]
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


# --------------------------------------------------------------------------- output
def render(table: ReportTable, exporter: Exporter | type[Exporter]) -> str:
    """The table as text in the exporter's format, ending with a newline."""
    if isinstance(exporter, type):
        exporter = exporter()
    text = exporter.export(table)
    return text if text.endswith("\n") else text + "\n"


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower() or "table"


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
    text = render(table, exporter)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
