"""Benchmarks as data: a table file (``benchmarks/table1.toml``) -> cells -> two phases.

A table file names its tasks, seeds and rows; each row is a paper row (``name``), a refiner
spec (``method``), map sources (``cam``: one spec for every task, or a table of task ->
spec with a ``default``) and optionally a ``backbone``.  :func:`load_table` validates it
(a clear error names the file and the row); :func:`plan` turns one or more tables into
unique cells: cells that several tables share (Table 3's LayerCAM row is Table 1's) appear
once.

:func:`run_bench` runs them in two phases on an executor:

1. **shared work**: every unique map source of every (task, seed) is prepared and makes its
   test maps, every unique refiner is prepared (its decoder trained), and the gate's
   classifier scores the test slices.  Each unit is an independent job; units that need the
   same trained model meet at the artifact's lock, so a model is trained exactly once
   whatever the number of tables, cells or workers.
2. **cells**: every cell runs its stages; everything expensive is a cache hit by now.

Re-running skips finished cells (their identity matches); ``failed_only`` re-runs only the
cells recorded as failed; ``collect`` runs nothing and only gathers what is there.
"""
from __future__ import annotations

import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsss_bench import runwarnings
from wsss_bench.errors import UserError
from wsss_bench.running import rundir
from wsss_bench.running.runner import (Cell, CellJob, CellOutcome, RunConfig, Session, cell_identity, classifier_p1,
                                      plan_cells)

TABLE_KEYS = {"name", "caption", "label", "tasks", "seeds", "paper"}
ROW_KEYS = {"name", "cam", "method", "backbone", "supplementary", "upper_bound", "note"}


@dataclass
class Row:
    name: str
    method: str
    cam: dict[str, str | None]  # task -> source spec (None: the refiner needs no map)
    backbone: str | None = None
    supplementary: bool = False
    upper_bound: bool = False
    #: a caveat printed under the table: profile name (or "default") -> text
    note: dict[str, str] = field(default_factory=dict)

    def cam_for(self, task: str) -> str | None:
        return self.cam.get(task, self.cam.get("default"))

    def note_for(self, profile: str | None) -> str | None:
        return self.note.get(str(profile), self.note.get("default")) if self.note else None


@dataclass
class Table:
    path: Path
    name: str
    caption: str
    label: str
    tasks: list[str]
    seeds: list[int]
    paper: str | None
    rows: list[Row] = field(default_factory=list)


#: limits of one table file: every row is a line of a printed table, so a few hundred is already
#: large; the limits turn a runaway generated file into one sentence instead of minutes of planning
MAX_ROWS = 1000
MAX_TABLE_BYTES = 1 << 20


def _where(path: Path, row: int | None = None, name: str | None = None) -> str:
    if row is None:
        return f"{path}"
    return f"{path}, row {row + 1}" + (f" ('{name}')" if name else "")


def load_table(path: Path, host=None) -> Table:
    """Read and validate one table file; UserError naming the file (and row) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"benchmark file {path} does not exist; give a table file such as benchmarks/table1.toml")
    size = path.stat().st_size
    if size > MAX_TABLE_BYTES:
        raise UserError(f"benchmark file {path} is {size} bytes; a table file is at most {MAX_TABLE_BYTES} bytes "
                        f"({MAX_ROWS} rows): split it into several tables")
    try:
        doc = tomllib.loads(path.read_text())
    except RecursionError:
        raise UserError(f"benchmark file {path} is nested too deeply for a table file (arrays or tables inside "
                        f"each other hundreds of levels deep); a table has [table] and [[rows]] entries") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"benchmark file {path} is not valid TOML: {err}") from None
    head = doc.get("table")
    if not isinstance(head, dict):
        raise UserError(f"{path}: missing the [table] section (name, caption, label, tasks, seeds)")
    unknown = sorted(set(head) - TABLE_KEYS)
    if unknown:
        raise UserError(f"{path}: [table] has unknown field(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(sorted(TABLE_KEYS))}")
    for key in ("name", "tasks"):
        if key not in head:
            raise UserError(f"{path}: [table] lacks the required field '{key}'")
    tasks = head["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise UserError(f"{path}: [table] tasks must be a non-empty list of task ids, e.g. [\"brats\"]")
    seeds = head.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"{path}: [table] seeds must be a non-empty list of integers, e.g. [0, 1, 2]")
    table = Table(path, str(head["name"]), str(head.get("caption", "")), str(head.get("label", "")),
                  list(tasks), list(seeds), head.get("paper"))
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: no [[rows]]; each row needs at least 'name' and 'method'")
    if len(rows) > MAX_ROWS:
        raise UserError(f"{path}: {len(rows)} [[rows]]; a table has at most {MAX_ROWS} rows: split it into several tables")
    for i, raw in enumerate(rows):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(raw, dict):
            raise UserError(f"{_where(path, i)}: a row must be a table with 'name' and 'method'")
        unknown = sorted(set(raw) - ROW_KEYS)
        if unknown:
            raise UserError(f"{_where(path, i, name)}: unknown field(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(ROW_KEYS))}")
        for key in ("name", "method"):
            if key not in raw:
                raise UserError(f"{_where(path, i, name)}: missing the required field '{key}'")
        cam = raw.get("cam")
        if cam is None:
            cams: dict[str, str | None] = {"default": None}
        elif isinstance(cam, str):
            cams = {"default": cam}
        elif isinstance(cam, dict) and all(isinstance(v, str) for v in cam.values()):
            bad = sorted(set(cam) - set(tasks) - {"default"})
            if bad:
                raise UserError(f"{_where(path, i, name)}: cam names task(s) {', '.join(bad)} that the table "
                                f"does not have ({', '.join(tasks)}, or 'default')")
            cams = dict(cam)
        else:
            raise UserError(f"{_where(path, i, name)}: cam must be a spec string or a table of task = spec")
        note = raw.get("note", {})
        if isinstance(note, str):
            note = {"default": note}
        if not (isinstance(note, dict) and all(isinstance(v, str) for v in note.values())):
            raise UserError(f"{_where(path, i, name)}: note must be a string or a table of profile = text "
                            f"(e.g. note = {{ cpu = \"...\" }})")
        table.rows.append(Row(str(raw["name"]), str(raw["method"]), cams, raw.get("backbone"),
                              bool(raw.get("supplementary", False)), bool(raw.get("upper_bound", False)),
                              dict(note)))
    names = [r.name for r in table.rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{path}: row name '{dup[0]}' appears twice; row names must be unique")
    return table


@dataclass
class PlannedRow:
    table: str
    row: str
    task: str
    cells: list[Cell]
    error: str | None = None  # "not available: ..." when a plugin is not registered


def plan(host, tables: list[Table], seeds: list[int] | None = None, tasks: list[str] | None = None
         ) -> tuple[list[Cell], list[PlannedRow]]:
    """Unique cells of all tables (stable order), and which cells fill which table row."""
    from wsss_bench.errors import PluginError

    cells: dict[Cell, None] = {}
    rows: list[PlannedRow] = []
    for table in tables:
        for task in table.tasks:
            if tasks and task not in tasks:
                continue
            try:
                host.task(task)
            except UserError as err:
                raise UserError(f"{table.path}: {err}") from None
            for i, row in enumerate(table.rows):
                try:
                    missing = _missing_plugins(host, row, task)
                    if missing:
                        rows.append(PlannedRow(table.name, row.name, task, [], f"not available: {missing}"))
                        continue
                    found = plan_cells(host, [task], row.cam_for(task), row.method, seeds or table.seeds,
                                       backbones=row.backbone)
                except (UserError, PluginError) as err:
                    raise UserError(f"{_where(table.path, i, row.name)}: {err}") from None
                for c in found:
                    cells.setdefault(c)
                rows.append(PlannedRow(table.name, row.name, task, found))
    return list(cells), rows


def _missing_plugins(host, row: Row, task: str) -> str | None:
    """'no map source X registered' when a row names a plugin that is not installed."""
    from wsss_bench.spec import parse_sources, parse_specs

    wanted = [("refiners", s.name) for s in parse_specs(row.method)]
    cam = row.cam_for(task)
    if cam:
        wanted += [("cams", s.name) for combo in parse_sources(cam) for s in combo]
    if row.backbone:
        text = row.backbone.strip()
        text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        wanted += [("backbones", s.name) for s in parse_specs(text)]
    gone = [f"{kind[:-1]} '{name}'" for kind, name in wanted if name not in host.registries[kind]]
    return f"no {', '.join(gone)} registered" if gone else None


# ============================================================================ phase 1: shared work
@dataclass(frozen=True)
class Unit:
    """One piece of shared work: a map source's model and test maps, a refiner's training,
    or the gate classifier's scores, for one (task, seed)."""

    kind: str  # "source", "refiner", "gate"
    task: str
    seed: int
    spec: str = ""
    sources: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        extra = f" on {'+'.join(self.sources)}" if self.sources else ""
        return f"{self.kind} {self.spec}{extra} ({self.task}, seed {self.seed})".replace("  ", " ")


def shared_units(cells: list[Cell]) -> list[list[Unit]]:
    """Phase-1 work in levels: gate classifiers and map sources first, then refiners."""
    first: dict[Unit, None] = {}
    second: dict[Unit, None] = {}
    for c in cells:
        first.setdefault(Unit("gate", c.task, c.seed))
        for spec in c.source_specs:
            first.setdefault(Unit("source", c.task, c.seed, spec))
        second.setdefault(Unit("refiner", c.task, c.seed, c.refiner_spec, tuple(c.source_specs)))
    return [interleave_tasks(list(first)), interleave_tasks(list(second))]


def interleave_tasks(units: list[Unit]) -> list[Unit]:
    """Round-robin over (task, seed), keeping each task's own order.

    A pool takes units in this order.  Units of one task often need the same expensive
    model (the CDM behind ``cdm``, ``dig`` and the diffusion features): taken task by task,
    the second worker waits at that model's lock while the first trains it.  Interleaved,
    the workers train different tasks' models side by side."""
    groups: dict[tuple[str, int], list[Unit]] = {}
    for u in units:
        groups.setdefault((u.task, u.seed), []).append(u)
    queues = list(groups.values())
    out: list[Unit] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


@dataclass
class UnitOutcome:
    unit: Unit
    status: str
    seconds: float
    error: str | None = None
    cache_events: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)


def build_unit(session: Any, unit: Unit) -> None:
    """Build (or load) what ``unit`` shares with its cells: the classifier gate's p(1) on the
    test split, a source's test maps, or a refiner's trained model.  ``bench --plan`` probes
    units through this same function, so the plan lists what the bench then builds."""
    ctx = session.context(unit.task, unit.seed)
    ctx.begin_cell(unit.label)
    if unit.kind == "gate":
        classifier_p1(ctx, ctx.data.split("test"))
    elif unit.kind == "source":
        ctx.maps(ctx.plugin("cams", unit.spec), "test")
    else:
        sources = tuple(ctx.plugin("cams", s) for s in unit.sources)
        ctx.plugin("refiners", unit.spec, sources=sources)


class UnitJob:
    """Picklable callable an executor applies to each phase-1 unit (one Session per process)."""

    def __init__(self, cfg: RunConfig, host=None) -> None:
        self.cells = CellJob(cfg, host)

    def __getstate__(self):
        return {"cells": self.cells}

    def __call__(self, unit: Unit) -> UnitOutcome:
        t0 = time.perf_counter()
        session = self.cells.session()
        before = len(session.cache.events)
        with runwarnings.capture() as warned:  # e.g. AME-CAM's polarity tie: one line, kept in the manifest
            try:
                build_unit(session, unit)
                status, error = "done", None
            except Exception as err:  # the cells that need it fail with their own message in phase 2
                status, error = "failed", f"{type(err).__name__}: {err}"
        return UnitOutcome(unit, status, round(time.perf_counter() - t0, 3), error,
                           list(session.cache.events[before:]), list(warned))


class CellJobWithEvents(CellJob):
    """A CellJob whose outcome carries the cache events and data summary of its process."""

    def __call__(self, cell: Cell) -> CellOutcome:
        session = self.session()
        before = len(session.cache.events)
        outcome = super().__call__(cell)
        outcome.info = dict(outcome.info)
        outcome.info["cache_events"] = list(session.cache.events[before:])
        ctx = session.loaded(cell.task, cell.seed)
        if ctx is not None:
            outcome.info["data_summary"] = ctx.task_data.summary()
        return outcome


# ============================================================================ the bench
def run_bench(cfg: RunConfig, host, executor, cells: list[Cell], failed_only: bool = False,
              collect_only: bool = False) -> dict[str, Any]:
    """Both phases; returns the manifest parts (outcomes, cache events, timings)."""
    from wsss_bench.progress import say

    todo = cells
    if failed_only:
        failed = {f.key for f in rundir.failed_cells(cfg.out)}
        todo = [c for c in cells if c.key in failed]
        say(f"--failed: {len(todo)} of {len(cells)} cell(s) are recorded as failed")
    report: dict[str, Any] = {"phases": [], "units": [], "cells": [], "cache_events": [], "data": {}}
    if collect_only or not todo:
        return report
    t0 = time.perf_counter()
    finished = finished_cells(cfg, host, todo, report["data"])
    if finished:
        say(f"{len(finished)} of {len(todo)} cell(s) already finished with this code, data and configuration: "
            f"reused, and the shared work only they need is skipped")
        todo = [c for c in todo if c not in finished]
    for level, units in enumerate(shared_units(todo)):
        if not units:
            continue
        say(f"phase 1.{level + 1}: {len(units)} shared unit(s) ({', '.join(sorted({u.kind for u in units}))})")
        outcomes = executor.map(UnitJob(cfg, host), units)
        for u, oc in zip(units, outcomes):
            if isinstance(oc, BaseException):
                oc = UnitOutcome(u, "failed", 0.0, f"{type(oc).__name__}: {oc}")
            report["units"].append({"unit": asdict(u), "status": oc.status, "seconds": oc.seconds,
                                    "error": oc.error, **({"warnings": oc.warnings} if oc.warnings else {})})
            report["cache_events"].extend(oc.cache_events)
    report["phases"].append({"phase": "shared", "seconds": round(time.perf_counter() - t0, 2)})
    t1 = time.perf_counter()
    by_key: dict[str, CellOutcome] = {c.key: CellOutcome(c, "resumed") for c in finished}
    if todo:
        say(f"phase 2: {len(todo)} cell(s)")
        for cell, oc in zip(todo, executor.map(CellJobWithEvents(cfg, host), todo)):
            if isinstance(oc, BaseException):
                oc = CellOutcome(cell, "failed", error=f"{type(oc).__name__}: {oc}")
            by_key[cell.key] = oc
            report["cache_events"].extend(oc.info.get("cache_events", []))
            if "data_summary" in oc.info:
                report["data"][f"{cell.task}/seed{cell.seed}"] = oc.info["data_summary"]
    report["cells"] = [by_key[c.key] for c in cells if c.key in by_key]
    report["phases"].append({"phase": "cells", "seconds": round(time.perf_counter() - t1, 2)})
    return report


def finished_cells(cfg: RunConfig, host, cells: list[Cell], data: dict[str, Any],
                   session: Session | None = None) -> list[Cell]:
    """The cells whose stored identity in the run folder equals their identity now.

    A finished cell needs none of the shared work (its rows are in the run folder), so a re-run
    skips its units too, not only the cell: a warm bench loads no model.  Only cells with a
    stored record are checked, so a cold run loads no data here (its workers do); a task whose
    data cannot be read leaves its cells to the workers, which report the error per cell.
    ``data`` gets the summary of each task read here (for the manifest); ``session`` is one
    whose loaded data can be reused (the plan's), else a new one."""
    if cfg.force:
        return []
    stored = {c.key: rundir.stored_identity(cfg.out, c.key) for c in cells}
    if not any(v is not None for v in stored.values()):
        return []
    session, done = session or Session(cfg, host=host), []
    for c in cells:
        if stored[c.key] is None:
            continue
        try:
            ctx = session.context(c.task, c.seed)
        except UserError:
            continue
        if stored[c.key] == cell_identity(cfg, ctx, host, c):
            done.append(c)
            data.setdefault(f"{c.task}/seed{c.seed}", ctx.task_data.summary())
    return done


def training_builds(events: list[dict[str, Any]], stages: set[str] | None = None) -> dict[str, int]:
    """How many times each trained artifact was built (not reused) in ``events``."""
    counts: dict[str, int] = {}
    for e in events:
        if e.get("hit") or e["stage"] in ("maps", "classifier-p1"):
            continue
        if stages is not None and e["stage"] not in stages:
            continue
        counts[f"{e['stage']}/{e['key'][:12]}"] = counts.get(f"{e['stage']}/{e['key'][:12]}", 0) + 1
    return counts
