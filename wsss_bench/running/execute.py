"""What ``wsss-bench run`` and ``wsss-bench bench`` do after parsing: build the configuration,
run the cells on an executor, gather the results, write the manifest and the tables, and
return a result object the command line prints.

Nothing here prints a table or decides an exit code; the command line does both from the
returned :class:`RunResult` / :class:`BenchResult`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from wsss_bench.context import resolve_device
from wsss_bench.errors import UserError
from wsss_bench.interfaces import ReportTable
from wsss_bench.profiles import apply_overrides, load_profile
from wsss_bench.reporting.summary import bench_markdown, run_summary, summary_markdown
from wsss_bench.running import bench as bn
from wsss_bench.running import rundir
from wsss_bench.running.manifest import environment, plugin_distributions
from wsss_bench.running.runner import Cell, CellJob, CellOutcome, RunConfig
from wsss_bench.spec import parse_specs

NONFINITE = ("error", "zero")


@dataclass(frozen=True)
class CommonOptions:
    """The options ``run`` and ``bench`` share, as the command line parsed them."""

    profile: str
    device: str = "auto"
    bf16: bool = False
    force: bool = False
    cache_dir: Path = Path.home() / ".cache" / "wsss-bench"
    phantom_seed: int = 0
    executor: str = "local"
    plugins_dirs: tuple[str, ...] = ()
    strict: bool = False
    overrides: tuple[str, ...] = ()
    nonfinite: str = "error"
    verify: bool = False


def check_nonfinite(value: str) -> str:
    """``--nonfinite`` is error or zero; anything else is a user error."""
    if value not in NONFINITE:
        raise UserError(f"--nonfinite {value}: choose error (stop at NaN/inf voxels) or zero (read them as background)")
    return value


def make_config(opts: CommonOptions, out: Path, *, data_root: Path | None = None,
                data_roots: tuple[tuple[str, str], ...] = (), use_cache: bool = True) -> RunConfig:
    """The one place a :class:`RunConfig` is built from command-line options (checks
    ``--nonfinite`` and the ``--set`` overrides against the profile; the caller then checks the
    run folder with :func:`~wsss_bench.running.runner.check_out_dir` before any compute)."""
    check_nonfinite(opts.nonfinite)
    apply_overrides(load_profile(opts.profile), opts.overrides)
    return RunConfig(profile=opts.profile, out=Path(out), data_root=data_root, device=opts.device,
                     cache_dir=Path(opts.cache_dir), bf16=opts.bf16, use_cache=use_cache, force=opts.force,
                     phantom_seed=opts.phantom_seed, data_roots=data_roots, plugins_dirs=tuple(opts.plugins_dirs),
                     strict=opts.strict, executor=opts.executor, overrides=tuple(opts.overrides),
                     nonfinite=opts.nonfinite, verify=opts.verify)


def make_executor(host, spec: str):
    """The executor plugin an ``--executor`` spec names, with its parameters."""
    ex_spec = parse_specs(spec)[0]
    ex = host.get("executors", ex_spec.name)(**ex_spec.expand()[0])
    preflight = getattr(ex, "preflight", None)  # e.g. slurm off a cluster: one sentence, nothing written
    if callable(preflight):
        preflight()
    return ex


def _command() -> str:
    return " ".join(["wsss-bench"] + sys.argv[1:]) if sys.argv else ""


def _as_outcome(cell: Cell, oc: Any) -> CellOutcome:
    return CellOutcome(cell, "failed", error=f"{type(oc).__name__}: {oc}") if isinstance(oc, BaseException) else oc


# --------------------------------------------------------------------------- run
@dataclass
class RunResult:
    """What a run did: one outcome per cell, the summary of this run's cells (None: no rows)."""

    out: Path
    outcomes: list[CellOutcome]
    seconds: float
    summary: ReportTable | None = None

    @property
    def failures(self) -> list[CellOutcome]:
        return [oc for oc in self.outcomes if oc.status == "failed"]

    @property
    def has_results(self) -> bool:
        return rundir.has_results(self.out)

    def exit_code(self) -> int:
        """0 when every cell ran; 2 when every failure was the user's (data, parameters, disk); else 1."""
        if not self.failures:
            return 0
        return 2 if all(oc.user_error for oc in self.failures) else 1


def execute_run(cfg: RunConfig, host, executor, cells: list[Cell],
                on_outcome: Callable[[CellOutcome], None] | None = None) -> RunResult:
    """Run ``cells`` into ``cfg.out``; writes results.parquet, manifest.json and summary.md.

    ``on_outcome`` sees each cell's outcome before anything is gathered, so the user learns
    which cells finished even when writing the results then fails (a full disk)."""
    t0 = time.perf_counter()
    job = CellJob(cfg, host=host)
    outcomes = [_as_outcome(c, oc) for c, oc in zip(cells, executor.map(job, cells))]
    seconds = time.perf_counter() - t0
    for oc in outcomes if on_outcome is not None else ():
        on_outcome(oc)
    frame = rundir.collect(cfg.out)
    session = job.session()
    before = rundir.read_manifest(cfg.out) or {}
    commands = [*(before.get("commands") or ([before["command"]] if before.get("command") else [])), _command()]
    rundir.write_manifest(cfg.out, {
        "command": _command(), "commands": list(dict.fromkeys(commands)),  # every command that wrote cells here
        "config": cfg.to_json(), "wall_seconds": round(seconds, 2),
        "environment": environment(session.device), "plugins": plugin_distributions(host),
        "profile": dict(session.profile), "data": session.data_summaries(),
        "cache_events": session.cache.events,
        # warnings of this command's cells (each cell's cells/*.json keeps its own)
        "warnings": [{"task": oc.cell.task, "method": oc.cell.method, "seed": oc.cell.seed, **w}
                     for oc in outcomes for w in (oc.info or {}).get("warnings", [])]})
    result = RunResult(Path(cfg.out), outcomes, seconds)
    if frame is not None:
        keys = {(c.task, c.method, c.seed) for c in cells}
        mine = frame[[k in keys for k in zip(frame["task"], frame["method"], frame["seed"])]]
        if len(mine):
            result.summary = run_summary(mine)
        # summary.md describes the whole folder, as results.parquet does: another command's
        # cells written here earlier are not hidden behind the last command's
        rundir.write_summary(cfg.out, summary_markdown(frame))
    return result


# --------------------------------------------------------------------------- bench
@dataclass
class BenchResult:
    """What a bench did: its cells' outcomes, the tables as Markdown, the rows not available."""

    out: Path
    outcomes: list[CellOutcome]
    seconds: float
    text: str
    not_available: list[Any] = field(default_factory=list)

    @property
    def failures(self) -> list[CellOutcome]:
        return [oc for oc in self.outcomes if oc.status == "failed"]


def plan_bench(host, tables: Sequence[Path], seeds: list[int] | None, tasks: list[str] | None, *,
               collect_only: bool = False):
    """(table specs, unique cells, planned rows) of the benchmark files."""
    specs = [bn.load_table(p, host) for p in tables]
    cells, planned = bn.plan(host, specs, seeds, tasks)
    if not cells and not collect_only:
        raise UserError("the benchmark files expand to no cell (check their tasks and --task)")
    return specs, cells, planned


def execute_bench(cfg: RunConfig, host, executor, specs: list, cells: list[Cell], planned: list, *,
                  tables: Sequence[Path], only_tasks: list[str] | None, seeds: list[int] | None,
                  failed_only: bool = False, collect_only: bool = False, metrics: str | None = None,
                  empty_distance: str = "undefined") -> BenchResult:
    """Both bench phases into ``cfg.out``; writes results.parquet, manifest.json and tables.md."""
    t0 = time.perf_counter()
    rep = bn.run_bench(cfg, host, executor, cells, failed_only=failed_only, collect_only=collect_only)
    seconds = time.perf_counter() - t0
    frame = rundir.collect(cfg.out)
    old = rundir.read_manifest(cfg.out, missing_ok=True) or {}
    unavailable = [p for p in planned if p.error]
    rundir.write_manifest(cfg.out, {
        "command": _command(), "config": cfg.to_json(), "wall_seconds": round(seconds, 2),
        "tables": [str(p) for p in tables], "only_tasks": only_tasks, "seeds": seeds,
        "environment": environment(resolve_device(cfg.device)), "plugins": plugin_distributions(host),
        "profile": dict(cfg.load_profile()), "data": {**old.get("data", {}), **rep["data"]},
        "phases": rep["phases"], "units": rep["units"], "cache_events": rep["cache_events"],
        "training_builds": bn.training_builds(rep["cache_events"]),
        "warnings": [{"unit": f"{u['unit'].get('kind')} {u['unit'].get('spec') or ''}".strip(),
                      "task": u["unit"].get("task"), **w}
                     for u in rep["units"] for w in u.get("warnings", [])]
                    + [{"task": oc.cell.task, "method": oc.cell.method, "seed": oc.cell.seed, **w}
                       for oc in rep["cells"] if isinstance(oc, CellOutcome) for w in (oc.info or {}).get("warnings", [])],
        "not_available": [{"table": p.table, "row": p.row, "task": p.task, "why": p.error} for p in unavailable],
        "table_metrics": metrics, "empty_distance": empty_distance})
    text = bench_markdown(frame, planned, specs, resamples=int(load_profile(cfg.profile).bootstrap.resamples),
                          failures=rundir.failed_cells(cfg.out), profile=cfg.profile, metrics=metrics,
                          empty_distance=empty_distance, quality=cfg.out)
    rundir.write_tables(cfg.out, text)
    return BenchResult(Path(cfg.out), list(rep["cells"]), seconds, text, unavailable)
