"""Tables from the per-slice results (PROTOCOL sections 8-9 and 13).

Data flows one way: ``results.parquet`` -> :func:`load_results` -> aggregates
(:mod:`wsss_bench.metrics`) -> a :class:`~wsss_bench.interfaces.ReportTable` (formatted
strings plus the tidy numbers in ``raw``) -> an exporter.  Nothing here recomputes a metric
from images, and no layout decision reaches back into the results.

In a ReportTable, ``rows[i][0]`` is the row label and ``bold`` holds (row, column) indices
into ``rows``, so column 0 is the label column and cells start at column 1.  A cell may hold
a second line after ``"\\n"`` (the bootstrap CI); exporters set it smaller or inline.  A
:class:`StatTable` also carries the two-level header of the paper's layout (``groups``: a
task over its Dice/IoU columns; ``subheader``: the lower header line).

Statistics in the tables (PROTOCOL section 8):

- ``[lo, hi]`` under a mean: case-level cluster bootstrap 95% CI of that mean
  (:func:`wsss_bench.metrics.bootstrap_ci`; resamples from the profile's ``bootstrap`` section,
  seed = seed(base, task, "bootstrap"));
- ``†`` after a Dice mean: the method's per-case mean Dice differs from CLDF's by the paired
  two-sided Wilcoxon signed-rank test, Holm-corrected over the rows of that column, p < 0.05;
  ``n/a`` where fewer than 6 test cases are shared (no test).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from wsss_bench.reporting import paper
from wsss_bench.errors import UserError
from wsss_bench.interfaces import Exporter, ReportTable
from wsss_bench.metrics import GATES, MIN_CASES_FOR_TEST
from wsss_bench.reporting.stats import (
    aggregate,
    aggregate_volumes,
    check_unique_slices,
    classifier_gate_stats,
    compare_to,
    require_columns,
    volume_scores,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

RESULTS_FILE = "results.parquet"
MANIFEST_FILE = "manifest.json"
REQUIRED_COLUMNS = ["task", "method", "gate", "case_id", "z", "label", "dice", "iou"]
DEFAULT_TASK_LABELS = {"brats": "BraTS21", "flare21-kidney": "Kidney",
                       "flare21-spleen": "Spleen", "flare21-liver": "Liver"}
METRIC_LABELS = {"dice": "Dice", "iou": "IoU"}
BLOCKS = {"all": "", "pos": " (pos)", "case": " (case)"}  # header suffix per block
VOLUME_SUFFIX = " (3D)"
PAPER_SUFFIX = " (paper)"
MISSING = "—"
UP = "↑"
MARK = "†"
ALPHA = 0.05
TABLES = ("summary", "table1", "table2", "table3")
TASK_ORDER = paper.TASKS


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


def _sources(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise UserError("no results given; pass at least one run directory")
    files: dict[Path, None] = {}
    for src in sources:
        for f in _result_files(Path(src)):
            files.setdefault(f.resolve(), None)
    return list(files)


def load_results(source: str | os.PathLike | Iterable[str | os.PathLike]) -> "pd.DataFrame":
    """The per-slice results of one run, of every run below a folder, or of a list of either.

    Adds a ``run_dir`` column (the folder each row came from).  Raises UserError naming the
    path when it is missing or holds no ``results.parquet``, and when two runs score the
    same slice for the same method, gate, seed and profile.
    """
    import pandas as pd

    df = pd.concat([_read_one(f) for f in _sources(source)], ignore_index=True)
    check_unique_slices(df)
    return df


def load_manifests(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """The ``manifest.json`` of every run directory ``load_results`` would read (where present).

    Each manifest gets a ``_run_dir`` key.  A manifest that is not JSON raises UserError.
    """
    out = []
    for f in _sources(source):
        path = f.parent / MANIFEST_FILE
        if not path.is_file():
            continue
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read manifest {path}: {err}") from None
        m["_run_dir"] = str(f.parent)
        out.append(m)
    return out


def failed_cells(manifests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Cells the manifests record with ``status`` "failed": task, method, seed and error."""
    out = []
    for m in manifests:
        for c in m.get("cells", []) or []:
            if not isinstance(c, Mapping) or c.get("status") != "failed":
                continue
            cell = c.get("cell") if isinstance(c.get("cell"), Mapping) else {}
            out.append({"task": str(c.get("task", cell.get("task", ""))),
                        "method": str(c.get("method", cell.get("method", ""))),
                        "seed": c.get("seed", cell.get("seed")),
                        "error": " ".join(str(c.get("error") or "unknown error").split())})
    return out


def bootstrap_resamples(df: "pd.DataFrame", manifests: Sequence[Mapping[str, Any]] = ()) -> int:
    """Resamples of the case bootstrap: the run's profile ``bootstrap.resamples`` (PROTOCOL 10)."""
    for m in manifests:
        boot = (m.get("profile") or {}).get("bootstrap") or {}
        if "resamples" in boot:
            return int(boot["resamples"])
    if "profile" in df.columns and df["profile"].notna().any():
        from wsss_bench.profiles import load_profile

        try:
            return int(load_profile(str(df["profile"].dropna().iloc[0])).bootstrap.resamples)
        except (UserError, AttributeError, KeyError):
            return 0
    return 0


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


def fmt_ci(lo: float, hi: float) -> str:
    """'[0.350, 0.431]' (3 decimals, as the mean); '' when missing."""
    return f"[{lo:.3f}, {hi:.3f}]" if _finite(lo) and _finite(hi) else ""


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
                if with_paper and b == "all":
                    cols.append(Col(t, m, "paper"))
        if per_volume and "dice" in metrics:
            cols.append(Col(t, "dice", "vol"))
    sub = []
    for c in cols:
        if c.block == "paper":
            sub.append(f"{METRIC_LABELS[c.metric]}{PAPER_SUFFIX}")
        elif c.block == "vol":
            sub.append(f"{METRIC_LABELS[c.metric]}{VOLUME_SUFFIX} {UP}")
        else:
            sub.append(f"{METRIC_LABELS[c.metric]}{BLOCKS[c.block]} {UP}")
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


def _layout(sel: "pd.DataFrame", specs: Sequence[RowSpec], cols: Sequence[Col], *, gate: str,
            resamples: int = 0, references: Mapping[str, str | None] | None = None,
            failed: Sequence[Mapping[str, Any]] = ()) -> tuple[list[list[str]], set, "pd.DataFrame", list[str]]:
    """Cells, bold set, the tidy numbers and footer notes for ``specs`` x ``cols``."""
    import pandas as pd

    agg = aggregate(sel, ci_resamples=resamples, ci_columns=("dice", "iou")) if len(sel) else pd.DataFrame()
    index = {(r["method"], r["task"]): r for r in agg.to_dict("records")}
    vol_index: dict = {}
    if any(c.block == "vol" for c in cols) and len(sel):
        vol = aggregate_volumes(sel, ci_resamples=resamples)
        vol_index = {(r["method"], r["task"]): r for r in vol.to_dict("records")}
    tests: dict[tuple[str, str], dict] = {}
    notes: list[str] = []
    refs = dict(references or {})
    tasks = list(dict.fromkeys(c.task for c in cols))
    for t in tasks:
        ref = refs.get(t)
        members = [s.methods.get(t) for s in specs]
        members = [m for m in dict.fromkeys(members) if m and m != ref and (m, t) in index]
        if not ref or (ref, t) not in index or not members:
            continue
        cmp = compare_to(sel[sel["task"] == t], ref, gate=gate, column="dice", methods=members)
        for rec in cmp.to_dict("records"):
            tests[(rec["method"], t)] = rec
    failures = {}
    for f in failed:
        failures.setdefault((f["method"], f["task"]), f)

    rows = [[s.label] for s in specs]
    bold: set[tuple[int, int]] = set()
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
                text = f"failed: {_reason(fail['error'])}" if fail else MISSING
            elif col.block == "vol":
                rec = vol_index[(method, col.task)]
                value = rec["dice3d_mean"]
                text = fmt_mean_std(value, rec["dice3d_std"])
                ci = fmt_ci(rec.get("dice3d_ci_lo"), rec.get("dice3d_ci_hi"))
                text = f"{text}\n{ci}" if ci else text
            else:
                rec = index[(method, col.task)]
                stem = col.metric if col.block == "all" else f"{col.metric}_{col.block}"
                value = rec.get(f"{stem}_mean")
                text = fmt_mean_std(value, rec.get(f"{stem}_std") if col.block != "case" else None)
                second = fmt_ci(rec.get(f"{col.metric}_ci_lo"), rec.get(f"{col.metric}_ci_hi")) \
                    if col.block == "all" else ""
                test = tests.get((method, col.task)) if col.block == "all" and col.metric == "dice" else None
                if test is not None:
                    if _finite(test["p_holm"]) and test["p_holm"] < ALPHA:
                        text += MARK
                    elif str(test["note"]).startswith(f"n/a: {test['n_cases']} common"):
                        second = f"{second} n/a".strip()
                text = f"{text}\n{second}" if second else text
            rows[i].append(text)
            means.append(round(value, 3) if _finite(value) else float("nan"))
        eligible = [i for i, s in enumerate(specs) if s.bold and _finite(means[i])]
        if col.block != "paper" and eligible:  # compare at printed precision: printed ties all bold
            best = max(means[i] for i in eligible)
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
                rec.update({k: v for k, v in vol_index[(method, t)].items() if k.startswith(("dice3d", "iou3d", "n_vol"))})
            test = tests.get((method, t))
            if test is not None:
                rec.update({"reference": test["reference"], "p": test["p"], "p_holm": test["p_holm"],
                            "test_cases": test["n_cases"], "test_note": test["note"]})
            pr = spec.paper_rows.get(t)
            if pr:
                rec["paper_row"] = f"{pr[0]}:{pr[1]}"
                for m in METRIC_LABELS:
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
        notes.append(f"{MARK}: per-case mean Dice differs from CLDF ({', '.join(names)}) by the paired two-sided "
                     f"Wilcoxon signed-rank test, Holm-corrected per column, p < {ALPHA}; n/a: fewer than "
                     f"{MIN_CASES_FOR_TEST} common test cases, not tested.")
    missing_ref = [t for t in shown if t not in with_ref]
    if missing_ref and shown:
        notes.append(f"No CLDF results for {', '.join(missing_ref)}: no significance test there.")
    if any(c.block == "vol" for c in cols):
        notes.append(f"Dice{VOLUME_SUFFIX}: per-volume Dice, each case's test slices restacked "
                     "(docs/metrics.md); mean±std over test cases.")
    if any(c.block == "paper" for c in cols):
        notes.append(f"{PAPER_SUFFIX.strip()}: Zeng et al. (CLDF), their test sets and full-size data "
                     "(PROTOCOL 13); not comparable number for number with a phantom or a small profile.")
    shown_fail = [f for f in failed if f["task"] in tasks]
    if shown_fail:
        notes.append("Failed cells (manifest.json): " + "; ".join(
            f"{f['task']} {f['method']} seed {f['seed']}: {_short(f['error'], 160).rstrip('.')}" for f in shown_fail) + ".")
    return rows, bold, raw, notes


def _available(sel: "pd.DataFrame") -> dict[str, "paper.Parsed"]:
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
    if reference:
        return {t: reference for t in tasks}
    out = {}
    for t in tasks:
        avail = _available(df[df["task"] == t])
        out[t] = paper.resolve("table1", "CLDF", t, avail)
    return out


def _tasks_in(sel: "pd.DataFrame", failed: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    present = list(dict.fromkeys([*map(str, sel["task"].unique()), *[f["task"] for f in failed]]))
    return sorted(present, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


# --------------------------------------------------------------------------- tables
def summary_table(df: "pd.DataFrame", gate: str | None = None, *, blocks: Sequence[str] = ("all", "pos"),
                  methods: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                  metrics: Sequence[str] = ("dice", "iou"), data: str | None = None,
                  title: str | None = None, task_labels: Mapping[str, str] | None = None,
                  not_bold: Iterable[str] = (), ci_resamples: int = 0, per_volume: bool = False,
                  with_paper: bool = False, reference: str | None = None, stats: bool | None = None,
                  failed: Sequence[Mapping[str, Any]] = ()) -> StatTable:
    """Every method (rows) x task and metric (columns), one column block per entry of ``blocks``.

    ``gate=None`` picks gate=label when present, else the only gate.  ``not_bold`` names methods
    that may not take the bold (``fsl`` always is).  ``ci_resamples`` > 0 adds the bootstrap CI
    under each all-slice mean; ``stats`` (default: on when CIs are) marks methods that differ
    from CLDF (``reference`` overrides which method that is).  ``per_volume`` adds a per-volume
    Dice column per task; ``with_paper`` the paper's value beside each all-slice column (the row
    mapping of :mod:`wsss_bench.reporting.paper`).  ``failed`` (from :func:`failed_cells`) fills the cells of
    failed methods.  ``raw`` is the tidy aggregate of the shown cells.
    """
    require_columns(df, REQUIRED_COLUMNS, what="results")
    gate = _pick_gate(df, gate)
    sel = df[df["gate"] == gate]
    failed = [f for f in failed if tasks is None or f["task"] in tasks]
    tasks = list(tasks) if tasks is not None else _tasks_in(sel, failed)
    if methods is None:
        methods = list(dict.fromkeys([*map(str, sel["method"].unique()), *[f["method"] for f in failed]]))
    methods = list(methods)
    sel = sel[sel["task"].isin(tasks) & sel["method"].isin(methods)]
    avail = _available(sel)
    skip = set(not_bold)
    specs = []
    for m in methods:
        parsed = avail.get(m) or paper.parse_method(m)
        is_fsl = parsed.refiner == "fsl"
        specs.append(RowSpec(m, {t: m for t in tasks},
                             {t: paper.paper_row_of(parsed, t) for t in tasks} if with_paper else {},
                             bold=m not in skip and not is_fsl))
    stats = ci_resamples > 0 if stats is None else stats
    refs = cldf_references(sel, tasks, reference) if stats else {}
    cols, header, sub, groups = _columns(tasks, metrics, blocks, task_labels, per_volume=per_volume,
                                         with_paper=with_paper)
    rows, bold, raw, notes = _layout(sel, specs, cols, gate=gate, resamples=ci_resamples,
                                     references=refs, failed=failed)
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
                title: str = "", metrics: Sequence[str] = ("dice", "iou"), block: str = "all",
                data: str | None = None, task_labels: Mapping[str, str] | None = None,
                not_bold: Iterable[str] = (), bold_supplementary: bool = False,
                ci_resamples: int = 0, per_volume: bool = False, stats: bool | None = None,
                references: Mapping[str, str | None] | None = None,
                paper_rows: Mapping[str, tuple[str, str]] | None = None,
                failed: Sequence[Mapping[str, Any]] = ()) -> StatTable:
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
    sel = df[(df["gate"] == gate) & df["task"].isin(tasks) & df["method"].isin(list(wanted))]
    stats = ci_resamples > 0 if stats is None else stats
    refs = (dict(references) if references is not None else cldf_references(df[df["gate"] == gate], tasks)) \
        if stats else {}
    cols, header, sub, groups = _columns(tasks, metrics, [block], task_labels, per_volume=per_volume,
                                         with_paper=bool(paper_rows))
    cells, bold, raw, notes = _layout(sel, specs, cols, gate=gate, resamples=ci_resamples,
                                      references=refs, failed=failed)
    return StatTable(title=title, header=["Method", *header], rows=cells, bold=bold,
                     rules_after=[n_main - 1] if supplementary_rows and n_main else [],
                     footer=_footer(sel, gate, data, [_NOTES[block], *notes]), raw=raw,
                     groups=groups, subheader=["Method", *sub])


def reference_table(df: "pd.DataFrame", table: str, gate: str = "label", *, with_paper: bool = False,
                    ci_resamples: int = 0, per_volume: bool = False, data: str | None = None,
                    failed: Sequence[Mapping[str, Any]] = ()) -> StatTable:
    """Table 1, 2 or 3 of the paper (PROTOCOL section 9), rows filled by :mod:`wsss_bench.reporting.paper`.

    The footer names the method label that filled each row whose label differs from the
    paper's name, so a reader sees e.g. that CLDF on BraTS is ``amecam+mg+cldf``.
    """
    if table not in paper.ROWS:
        raise UserError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    require_columns(df, REQUIRED_COLUMNS, what="results")
    gate = _pick_gate(df, gate)
    tasks = list(paper.TABLE_TASKS[table])
    sel = df[df["gate"] == gate]
    by_task = {t: _available(sel[sel["task"] == t]) for t in tasks}
    present = [t for t in tasks if by_task[t] or any(f["task"] == t for f in failed)]
    tasks = present or tasks[:1]

    def fill(row: str) -> dict[str, str | None]:
        return {t: paper.resolve(table, row, t, by_task.get(t, {})) for t in tasks}
    main = [(r, fill(r)) for r in paper.ROWS[table]]
    supp = [(r, fill(r)) for r in paper.SUPPLEMENTARY.get(table, [])]
    supp = [(r, m) for r, m in supp if any(m.values())]  # supplementary rows only when run
    failed_rows = []
    for f in failed:
        if f["task"] in tasks:
            parsed = paper.parse_method(f["method"])
            hit = next((r for r in [*paper.ROWS[table], *paper.SUPPLEMENTARY.get(table, [])]
                        if any(rule.matches(parsed) for rule in paper.row_rules(table, r, f["task"]))), None)
            for label, methods in [*main, *supp]:
                if label == hit and methods.get(f["task"]) is None:
                    methods[f["task"]] = f["method"]
            if hit is None:
                failed_rows.append(f)
    paper_rows = {r: (table, r) for r in paper.NUMBERS[table]} if with_paper else None
    t = paper_table(df, main, tasks, gate, supp, title=f"{paper.TITLES[table]} (gate={gate})",
                    data=data, not_bold=paper.NOT_BOLD, ci_resamples=ci_resamples, per_volume=per_volume,
                    paper_rows=paper_rows, references=cldf_references(sel, tasks), failed=failed)
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
    avail = _available(sel)
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
    """AUC, sensitivity and specificity of gate=classifier per task (PROTOCOL section 7)."""
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
                 reference: str | None = None, failed: Sequence[Mapping[str, Any]] = (),
                 data: str | None = None) -> list[StatTable]:
    """The tables ``wsss-bench report`` prints: one per gate (``gate="all"``: every gate held)."""
    if table not in TABLES:
        raise UserError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    out = []
    for g in gates_of(df, gate):
        if table == "summary":
            out.append(summary_table(df, g, blocks=("all", "pos"), ci_resamples=resamples, per_volume=per_volume,
                                     with_paper=with_paper, reference=reference, failed=failed, data=data))
        else:
            out.append(reference_table(df, table, g, with_paper=with_paper, ci_resamples=resamples,
                                       per_volume=per_volume, data=data, failed=failed))
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
    from wsss_bench.cache import atomic_write_bytes

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


# --------------------------------------------------------------------------- HTML page
_PAGE_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1500px;
color:#1d2329;padding:0 16px}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccd;padding-bottom:3px}
table.wsss{border-collapse:collapse;margin:8px 0 4px;font-size:13px}
table.wsss th,table.wsss td{padding:3px 8px;text-align:center;white-space:nowrap}
table.wsss td:first-child,table.wsss th:first-child{text-align:left}
table.wsss thead tr:first-child th{border-top:2px solid #222}
table.wsss thead tr:last-child th{border-bottom:1px solid #222}
table.wsss tbody tr:last-child td{border-bottom:2px solid #222}
table.wsss tr.rule td{border-top:1px solid #222}
table.wsss th.group{border-bottom:1px solid #888}
table.wsss .ci{display:block;font-size:11px;color:#56606b}
table.wsss td.failed{color:#a4161a;font-size:12px}
table.sortable th{cursor:pointer;user-select:none} table.sortable th:hover{background:#eef}
table.sortable th.asc::after{content:' \\25B2'} table.sortable th.desc::after{content:' \\25BC'}
table.sortable tbody tr:nth-child(even){background:#f6f7f9}
p.footer{font-size:12px;color:#444;max-width:1400px;margin-top:2px}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px}
dl.meta dt{font-weight:600} dl.meta dd{margin:0}
figure{margin:14px 0} figure img{max-width:100%;border:1px solid #dde} figcaption{font-size:12px;color:#444}
.note{font-size:13px;color:#555}
"""

# Click a header of a table.sortable to sort by it (numbers numerically, '—' last); a URL
# hash "#sort=<table id>:<column>:<asc|desc>" applies one sort on load (used by the tests).
_PAGE_JS = """
(function(){
function key(td){var v=td.getAttribute('data-value');if(v===null)v=td.textContent;
 var f=parseFloat(v);return isNaN(f)?null:f;}
function sortBy(table,col,dir){var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
  if(x===null&&y===null){var s=a.cells[col].textContent.localeCompare(b.cells[col].textContent);return dir==='asc'?s:-s;}
  if(x===null)return 1; if(y===null)return -1; return dir==='asc'?x-y:y-x;});
 rows.forEach(function(r){body.appendChild(r);});
 var ths=table.tHead.rows[table.tHead.rows.length-1].cells;
 for(var i=0;i<ths.length;i++){ths[i].classList.remove('asc','desc');}
 ths[col].classList.add(dir);}
document.querySelectorAll('table.sortable').forEach(function(table){
 var ths=table.tHead.rows[table.tHead.rows.length-1].cells;
 Array.prototype.forEach.call(ths,function(th,i){th.addEventListener('click',function(){
  sortBy(table,i,th.classList.contains('desc')?'asc':'desc');});});});
var m=/sort=([^:&]+):(\\d+):(asc|desc)/.exec(decodeURIComponent(location.hash||''));
if(m){var t=document.getElementById(m[1]);if(t){sortBy(t,parseInt(m[2],10),m[3]);}}
document.documentElement.setAttribute('data-ready','1');
})();
"""


def _esc(text: Any) -> str:
    import html

    return html.escape(str(text), quote=True)


def html_page(sections: Sequence[tuple[str, Sequence[Any]]], exporter: Exporter, *, title: str,
              meta: Sequence[tuple[str, str]] = ()) -> str:
    """One self-contained HTML document: no external resource, figures inlined as data URIs.

    ``sections`` = [(heading, items)]; an item is a ReportTable (rendered by ``exporter``'s
    ``fragment``), ``("figure", caption, png_bytes)``, ``("sortable", table_id, ReportTable)`` or
    ``("note", text)``.
    """
    import base64

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
             'img-src data:; style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
             f"<title>{_esc(title)}</title>", f"<style>{_PAGE_CSS}</style></head><body>",
             f"<h1>{_esc(title)}</h1>"]
    if meta:
        parts.append('<dl class="meta">' + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in meta) + "</dl>")
    for heading, items in sections:
        parts.append(f"<h2>{_esc(heading)}</h2>")
        for item in items:
            if isinstance(item, ReportTable):
                parts.append(exporter.fragment(item))
            elif item[0] == "figure":
                data = base64.b64encode(item[2]).decode("ascii")
                parts.append(f'<figure><img alt="{_esc(item[1])}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{_esc(item[1])}</figcaption></figure>")
            elif item[0] == "sortable":
                parts.append(exporter.fragment(item[2], table_id=item[1], sortable=True))
            elif item[0] == "note":
                parts.append(f'<p class="note">{_esc(item[1])}</p>')
            else:  # pragma: no cover - programming error
                raise ValueError(f"unknown page item {item[0]!r}")
    parts.append(f"<script>{_PAGE_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def run_meta(df: "pd.DataFrame", manifests: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Facts about the runs for the page header: runs, profile, seeds, data, tasks, methods."""
    meta = [("runs", ", ".join(m.get("_run_dir", "") for m in manifests) or ", ".join(_values(df, "run_dir"))),
            ("profile", ", ".join(_values(df, "profile")) or "unspecified"),
            ("seeds", ", ".join(_values(df, "seed")) or "unspecified"),
            ("data", ", ".join(_values(df, "data")) or "unspecified"),
            ("tasks", ", ".join(_tasks_in(df))), ("methods", str(df["method"].nunique()))]
    for m in manifests[:1]:
        if m.get("command"):
            meta.append(("command", str(m["command"])))
        env = m.get("environment") or {}
        if isinstance(env, Mapping) and env.get("git_sha"):
            meta.append(("git", str(env["git_sha"])))
    return meta


def html_report(source: Any, exporter: Exporter, *, table: str = "summary", gate: str | None = "all",
                with_paper: bool = False, per_volume: bool = False, resamples: int | None = None,
                reference: str | None = None, figures: bool = True) -> str:
    """The whole HTML page of one or more runs: tables with CIs, classifier gate, failed cells,
    the figures (embedded PNG), and the sortable per-case Dice table."""
    df = load_results(source)
    manifests = load_manifests(source)
    failed = failed_cells(manifests)
    r = bootstrap_resamples(df, manifests) if resamples is None else resamples
    gates = gates_of(df, gate)
    tables = build_tables(df, table, gate, with_paper=with_paper, per_volume=per_volume, resamples=r,
                          reference=reference, failed=failed)
    sections: list[tuple[str, list]] = [("Results", list(tables))]
    clf = classifier_table(df)
    if clf is not None:
        sections.append(("Negative gate", [clf]))
    if figures:
        from wsss_bench.reporting import figures as figs

        items: list = []
        made, skipped = figs.build_figures(df, manifests, gate=gates[0])
        for fig in made:
            items.append(("figure", fig.caption, fig.png()))
            fig.close()
        items += [("note", why) for why in skipped]
        sections.append(("Figures", items))
    per_case = [("sortable", f"per-case-{t}", per_case_table(df, gates[0], per_volume=per_volume, task=t))
                for t in _tasks_in(df)]
    sections.append((f"Per case (gate={gates[0]}; click a header to sort)", per_case))
    return html_page(sections, exporter, title="wsss-bench report", meta=run_meta(df, manifests))
