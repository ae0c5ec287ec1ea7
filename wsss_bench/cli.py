"""The ``wsss-bench`` command line (Typer).  Plugins may add commands via register_commands."""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.markup import escape

from wsss_bench.errors import UserError
from wsss_bench.progress import console, err_console, say

def _flags_without_type() -> None:
    """A flag takes no value, so --help shows no ``<bool>`` after it (typer prints one)."""
    import typer.core

    original = typer.core.TyperOption.display_type_rich
    if getattr(original, "_wsss_bench", False):
        return

    def display_type_rich(self, ctx):  # noqa: ANN001 - typer's signature
        return "" if self.is_flag else original(self, ctx)

    display_type_rich._wsss_bench = True  # type: ignore[attr-defined]
    typer.core.TyperOption.display_type_rich = display_type_rich


_flags_without_type()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark harness for weakly supervised medical image segmentation.")
data_app = typer.Typer(no_args_is_help=True, help="Write phantoms and prepare slice stores.")
app.add_typer(data_app, name="data")

_STATE: dict[str, Any] = {"strict": None, "plugins_dirs": [], "trace": None, "host": None}

def default_cache() -> Path:
    """$WSSS_BENCH_CACHE, else ~/.cache/wsss-bench (read when a command runs, not at import)."""
    return Path(os.environ.get("WSSS_BENCH_CACHE") or Path.home() / ".cache" / "wsss-bench")


PLUGINS_DIR_HELP = ("Folder of loose *.py plugin files (repeatable; also $WSSS_BENCH_PLUGINS_DIR). Each file is "
                    "Python code that runs with your permissions for every command, list and profiles "
                    "included: use only folders you trust.")
CACHE_HELP = "Artifact, phantom and slice cache (default: $WSSS_BENCH_CACHE or ~/.cache/wsss-bench)."


def user_errors(fn: Callable) -> Callable:
    """Print a UserError as one line and exit 2 (no traceback for a user's mistake)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True, markup=True,
                              highlight=False)
            raise typer.Exit(2) from None
        except OSError as err:  # disk full, quota, read-only, no permission: one line too
            from wsss_bench.errors import disk_problem

            message = disk_problem(err)
            if message is None:
                raise
            err_console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        finally:
            from wsss_bench.running import rundir

            rundir.release()  # the run folder's lock ends with the command

    return wrapper


def get_host(extra_dirs: list[str] | None = None, strict: bool | None = None):
    from wsss_bench.plugins import load_plugins, show_problem

    dirs = list(_STATE["plugins_dirs"]) + list(extra_dirs or [])
    strict = _STATE["strict"] if strict is None else strict
    key = (tuple(dirs), strict, _STATE["trace"])
    cached = _STATE["host"]  # (key, host), one slot so the two can never disagree
    if cached is None or cached[0] != key:
        cached = (key, load_plugins(strict=strict or None, plugins_dirs=dirs, trace=_STATE["trace"],
                                    report=show_problem))
        _STATE["host"] = cached
        loose = cached[1].loose_files
        if loose:  # plugin files are code: say which ones ran
            err_console.print(escape(f"note: ran {len(loose)} loose plugin file(s) as code: "
                                     f"{', '.join(str(f) for f in loose)}"), soft_wrap=True, highlight=False)
    return cached[1]


def _version(value: bool) -> None:
    if value:
        from wsss_bench import __version__

        console.print(f"wsss-bench {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
@user_errors
def main_options(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_version),
    strict: bool = typer.Option(False, "--strict", help="Fail on a plugin that cannot load (default: warn and skip)."),
    plugins_dir: List[Path] = typer.Option([], "--plugins-dir", help=PLUGINS_DIR_HELP),
    trace: bool = typer.Option(False, "--trace", help="Print every plugin hook call."),
) -> None:
    _STATE["strict"] = True if strict else None
    _STATE["plugins_dirs"] = [str(p) for p in plugins_dir]
    _STATE["trace"] = True if trace else None


def _split_csv(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def _seeds(values: list[str]) -> list[int]:
    try:
        seeds = [int(s) for s in _split_csv(values)]
    except ValueError:
        raise UserError(f"--seed {','.join(values)}: seeds are integers, e.g. --seed 0 or --seed 0,1,2") from None
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise UserError(f"--seed {bad[0]}: a seed is an integer from 0 to 2**63-1, e.g. --seed 0 or --seed 0,1,2")
    return seeds


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")[:80]


# ---------------------------------------------------------------------------- run / bench
# The options run and bench share, declared once (typer option objects are only defaults).
PROFILE_OPT = typer.Option("cpu", "--profile", "-p", help="smoke | cpu | paper (docs/profiles.md).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto | cpu | cuda[:N].")
BF16_OPT = typer.Option(False, "--bf16", help="bf16 autocast for training and feature extraction.")
FORCE_OPT = typer.Option(False, "--force", help="Rebuild artifacts, slice stores and phantoms, and re-run finished cells.")
VERIFY_OPT = typer.Option(False, "--verify", help="Hash every cached file (models, maps, slice stores, phantoms) on every read, not only on its first use in a process; damaged ones are moved aside and rebuilt.")
CACHE_OPT = typer.Option(None, "--cache-dir", help=CACHE_HELP)
PHANTOM_SEED_OPT = typer.Option(0, "--phantom-seed", help="Seed of the embedded phantom(s) (the data, not the training).")
EXECUTOR_OPT = typer.Option("local", "--executor", help=escape(
    "Executor spec: local, local[jobs=2], slurm[partition=gpu,gpus=1] or slurm[config=cluster.yaml]."))
PLUGINS_DIR_OPT = typer.Option([], "--plugins-dir", help=PLUGINS_DIR_HELP)
SET_OPT = typer.Option([], "--set", help="Override a profile value, e.g. --set cdm.iterations=200 (repeatable).")
NONFINITE_OPT = typer.Option("error", "--nonfinite", help="NaN/inf voxels in real data: error (default) or zero "
                             "(read as background, counted in the manifest).")
PLAN_OPT = typer.Option(False, "--plan", help="Run nothing: print every unit and cell this command would run, "
                        "which are cached, and the estimated time of the rest.")


def _common(profile: str, device: str, bf16: bool, force: bool, cache_dir: Optional[Path], phantom_seed: int,
            executor: str, plugins_dir: List[Path], set_: List[str], nonfinite: str, verify: bool = False):
    """The shared options as one object (plugin folders: the global ones, then the command's)."""
    from wsss_bench.running.execute import CommonOptions

    return CommonOptions(profile=profile, device=device, bf16=bf16, force=force,
                         cache_dir=Path(cache_dir or default_cache()), phantom_seed=phantom_seed, executor=executor,
                         plugins_dirs=tuple(_STATE["plugins_dirs"] + [str(p) for p in plugins_dir]),
                         strict=bool(_STATE["strict"]), overrides=tuple(set_), nonfinite=nonfinite,
                         verify=verify)


@app.command()
@user_errors
def run(
    method: str = typer.Option(..., "--method", "-m", help="Refiner spec, e.g. threshold or cldf[tau=[0.1,0.5]]."),
    cam: Optional[str] = typer.Option(None, "--cam", "-c", help="Map source spec(s): gradcam, gradcam,layercam (two cells), amecam+mg (one cell, two sources)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Feature backbone of the refiner (its 'backbone' parameter): cdm, resnet18, '[cdm,resnet18]' (a grid)."),
    task: List[str] = typer.Option(["brats"], "--task", "-t", help="brats, flare21-kidney, flare21-spleen, flare21-liver (repeatable / comma list)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Real dataset folder (BraTS21 or FLARE21 layout). Default: the embedded synthetic phantom."),
    profile: str = PROFILE_OPT,
    seed: List[str] = typer.Option(["0"], "--seed", help="Base seed(s); several form a grid axis."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<task>_<cam>_<method>_<profile>_s<seed>)."),
    device: str = DEVICE_OPT,
    bf16: bool = BF16_OPT,
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write cached artifacts."),
    force: bool = FORCE_OPT,
    cache_dir: Optional[Path] = CACHE_OPT,
    phantom_seed: int = PHANTOM_SEED_OPT,
    executor: str = EXECUTOR_OPT,
    plugins_dir: List[Path] = PLUGINS_DIR_OPT,
    set_: List[str] = SET_OPT,
    nonfinite: str = NONFINITE_OPT,
    verify: bool = VERIFY_OPT,
    plan: bool = PLAN_OPT,
) -> None:
    """Run every cell of task x CAM x method x seed, print Dice/IoU per gate, write results."""
    from wsss_bench.context import resolve_device
    from wsss_bench.running.execute import execute_run, make_config, make_executor
    from wsss_bench.running.runner import check_out_dir, plan_cells

    host = get_host([str(p) for p in plugins_dir])
    opts = _common(profile, device, bf16, force, cache_dir, phantom_seed, executor, plugins_dir, set_, nonfinite,
                   verify)
    tasks, seeds = _split_csv(task), _seeds(seed)
    if out is None:
        out = Path("runs") / _slug(f"{'+'.join(tasks)}_{cam or 'nocam'}_{method}_{profile}_s{'-'.join(map(str, seeds))}")
    cfg = make_config(opts, out, data_root=data_root, use_cache=not no_cache)
    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root}: no such directory; give the folder holding the "
                        f"BraTS2021_* case folders or the FLARE21 TrainingImg/TrainingMask (or imagesTr/labelsTr) folders")
    cells = plan_cells(host, tasks, cam, method, seeds, backbones=backbone)
    resolve_device(device)  # before any compute, and one message (not one per cell)
    ex = make_executor(host, executor)
    if plan:
        _print_plan(cfg, host, cells, executor)
        return
    check_out_dir(cfg)  # before any compute: writable, and not another configuration's results
    say(f"[bold]wsss-bench run[/bold]: {len(cells)} cell(s), profile {escape(profile)}, "
        f"data {'phantom' if data_root is None else escape(str(data_root))}, out {escape(str(out))}")
    seen: set[str] = set()

    def show(oc) -> None:
        cell = oc.cell
        if oc.status == "failed":
            _print_failure(cell, oc.error, seen)
        elif oc.status == "resumed":
            say(f"  {escape(cell.task)} {escape(cell.method)} seed {cell.seed}: already done, reused (use --force to redo)")
        else:
            say(f"  {escape(cell.task)} {escape(cell.method)} seed {cell.seed}: done in {oc.seconds:.1f}s")

    result = execute_run(cfg, host, ex, cells, on_outcome=show)
    if result.summary is not None:
        print_table(result.summary)
    from wsss_bench.running import rundir

    if result.has_results:
        say(f"results: {escape(str(rundir.results_path(out)))}  manifest: {escape(str(rundir.manifest_path(out)))}  "
            f"({result.seconds:.1f}s)")
    else:
        say(f"no results were written ({len(result.failures)} of {len(cells)} cell(s) failed); manifest: "
            f"{escape(str(rundir.manifest_path(out)))}  ({result.seconds:.1f}s)")
    if result.exit_code():
        raise typer.Exit(result.exit_code())


def _print_plan(cfg, host, cells, executor: str) -> None:
    """``--plan``: what the command would run, cached or not, and the estimated time; nothing runs."""
    from wsss_bench.running.plan import make_plan, render
    from wsss_bench.spec import parse_specs

    jobs = int(parse_specs(executor)[0].expand()[0].get("jobs", 1) or 1)
    say(f"[bold]plan[/bold] (nothing runs): {len(cells)} cell(s), profile {escape(cfg.profile)}, "
        f"out {escape(str(cfg.out))}")
    for line in render(make_plan(cfg, host, cells), jobs):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _print_failure(cell, error: Any, seen: set[str]) -> None:
    """One line per failed cell; an error already printed (the same bad data file under every
    cell of a task) is referred to instead of repeated."""
    text = str(error)
    head = f"[bold red]cell failed[/bold red] {escape(cell.task)} {escape(cell.method)} seed {cell.seed}: "
    if text in seen:
        err_console.print(head + "the same error as above", soft_wrap=True, highlight=False)
        return
    seen.add(text)
    err_console.print(head + escape(text), soft_wrap=True, highlight=False)


def print_table(table) -> None:
    """A ReportTable (the end-of-run summary) as a rich table; cells are escaped (method labels
    hold brackets: gradcam[layer=layer3])."""
    from rich.table import Table

    out = Table(title=table.title)
    for j, h in enumerate(table.header):
        label = h in ("task", "method", "gate")
        # labels never wrap (a user searches for them); a narrow terminal wraps the numbers at
        # their spaces instead ("0.392 ± 0.29" over "[0.31, 0.45]")
        width = max([len(h)] + [len(r[j]) for r in table.rows if j < len(r)]) if label else None
        out.add_column(h, justify="left" if label else "right", overflow="fold", no_wrap=label,
                       min_width=width)
    for row in table.rows:
        out.add_row(*[escape(c) for c in row])
    console.print(out)
    if table.footer:  # e.g. the empty-mask rule of the HD95/ASSD columns
        console.print(table.footer, markup=False, highlight=False)


def _nonfinite(value: str) -> str:
    from wsss_bench.running.execute import check_nonfinite

    return check_nonfinite(value)


def _data_roots(values: list[str]) -> tuple[tuple[str, str], ...]:
    roots = []
    for item in _split_csv(values):
        if "=" not in item:
            raise UserError(f"--data-root {item}: expected DATASET=DIR, e.g. brats=/data/BraTS2021,flare=/data/FLARE21")
        key, path = item.split("=", 1)
        if not Path(path).is_dir():
            raise UserError(f"--data-root {key}={path}: no such directory")
        roots.append((key.strip(), path))
    return tuple(roots)


@app.command()
@user_errors
def bench(
    tables: List[Path] = typer.Argument(..., help="Benchmark table files, e.g. benchmarks/table1.toml benchmarks/table3.toml."),
    profile: str = PROFILE_OPT,
    data_root: List[str] = typer.Option([], "--data-root", help="Real data per dataset: brats=DIR,flare=DIR. Default: the embedded phantoms."),
    executor: str = EXECUTOR_OPT,
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds for every table (default: each table's own), e.g. 0,1,2."),
    task: List[str] = typer.Option([], "--task", "-t", help="Only these tasks (default: each table's)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bench directory (default runs/bench_<profile>)."),
    failed: bool = typer.Option(False, "--failed", help="Re-run only the cells recorded as failed."),
    collect: bool = typer.Option(False, "--collect", help="Run nothing: gather the finished cells and print the tables."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Metric columns per task, e.g. dice,hd95 (default: Dice, plus HD95 and ASSD in mm when the results hold them)."),
    empty_distance: str = typer.Option("undefined", "--empty-distance", help="HD95/ASSD where exactly one mask is empty: undefined (left out of the mean and counted) | diagonal (the image diagonal in mm, the BraTS convention)."),
    device: str = DEVICE_OPT,
    bf16: bool = BF16_OPT,
    force: bool = FORCE_OPT,
    cache_dir: Optional[Path] = CACHE_OPT,
    phantom_seed: int = PHANTOM_SEED_OPT,
    plugins_dir: List[Path] = PLUGINS_DIR_OPT,
    set_: List[str] = SET_OPT,
    nonfinite: str = NONFINITE_OPT,
    verify: bool = VERIFY_OPT,
    plan: bool = PLAN_OPT,
) -> None:
    """Regenerate benchmark tables: shared models and maps first (each once), then every cell."""
    from wsss_bench.boundary import check_rule, parse_metrics
    from wsss_bench.running import rundir
    from wsss_bench.running.execute import execute_bench, make_config, make_executor, plan_bench
    from wsss_bench.running.runner import check_out_dir

    check_rule(empty_distance)
    chosen = ",".join(parse_metrics(metrics)) if metrics is not None else None
    host = get_host([str(p) for p in plugins_dir])
    opts = _common(profile, device, bf16, force, cache_dir, phantom_seed, executor, plugins_dir, set_, nonfinite,
                   verify)
    out = Path(out or Path("runs") / f"bench_{profile}")
    cfg = make_config(opts, out, data_roots=_data_roots(data_root))
    seed_list = _seeds([seeds]) if seeds else None
    specs, cells, planned = plan_bench(host, tables, seed_list, _split_csv(task) or None, collect_only=collect)
    ex = make_executor(host, executor)
    if plan:
        _print_plan(cfg, host, cells, executor)
        return
    unavailable = [p for p in planned if p.error]
    for p in unavailable:  # on stderr, not only in the manifest
        err_console.print(escape(f"warning: {p.table}: row '{p.row}' ({p.task}) {p.error}"), soft_wrap=True,
                          highlight=False)
    if unavailable and _STATE["strict"]:
        raise UserError(f"{len(unavailable)} table row(s) are not available (see the warnings above) and --strict "
                        f"is set; install the plugins they name or remove the rows")
    check_out_dir(cfg)
    say(f"[bold]wsss-bench bench[/bold]: {len(specs)} table(s), {len(cells)} unique cell(s), profile "
        f"{escape(profile)}, out {escape(str(out))}" + (f"; {len(unavailable)} row(s) not available" if unavailable else ""))
    result = execute_bench(cfg, host, ex, specs, cells, planned, tables=tables, only_tasks=_split_csv(task) or None,
                           seeds=seed_list, failed_only=failed, collect_only=collect, metrics=chosen,
                           empty_distance=empty_distance)
    seen: set[str] = set()
    for oc in result.failures:
        _print_failure(oc.cell, oc.error, seen)
    console.print(result.text, markup=False, highlight=False)
    say(f"tables: {escape(str(rundir.tables_path(out)))}  manifest: {escape(str(rundir.manifest_path(out)))}  "
        f"({result.seconds:.1f}s)")
    if result.failures:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- plugins / list
@app.command()
@user_errors
def plugins(
    all_: bool = typer.Option(False, "--all", help="Also list what each plugin registered."),
    trace: bool = typer.Option(False, "--trace", help="Print every hook call while loading."),
) -> None:
    """Installed plugins: name, kind(s), distribution, version, load errors."""
    from rich.table import Table

    if trace:
        _STATE["trace"] = True
    host = get_host()
    table = Table(title="wsss-bench plugins")
    for col in ("plugin", "kinds", "distribution", "version", "status"):
        table.add_column(col)
    for name, info in sorted(host.infos.items(), key=lambda kv: (not kv[1].builtin, kv[0])):
        kinds = sorted({p.split(":")[0] for p in info.provides})
        status = f"[red]error: {escape(info.error)}[/red]" if info.error else "ok"
        table.add_row(escape(name), ",".join(kinds) or "-", escape(info.distribution), escape(info.version), status)
        if all_ and info.provides:
            table.add_row("", "  " + escape(", ".join(info.provides)), "", "", "")
    console.print(table)


KINDS = ("cams", "refiners", "backbones", "datasets", "tasks", "exporters", "executors", "commands")


@app.command("list")
@user_errors
def list_(
    kind: str = typer.Argument(..., help=f"One of: {', '.join(KINDS)}."),
    pattern: str = typer.Argument("*", help="Wildcard filter on names, e.g. 'grad*'."),
) -> None:
    """List registered plugins of one kind (with their parameters)."""
    import fnmatch

    host = get_host()
    if kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(kind, KINDS, n=1)
        raise UserError(f"unknown kind '{kind}'." + (f" Did you mean '{close[0]}'?" if close else "")
                        + f" Choose one of: {', '.join(KINDS)}")
    if kind == "tasks":
        for task_id, cls in sorted(host.tasks().items()):
            if fnmatch.fnmatchcase(task_id, pattern):
                console.print(f"{escape(task_id)}  [dim](dataset {escape(str(cls.name))})[/dim]", highlight=False)
        return
    for entry in host.registries[kind].list(pattern):
        obj = entry.obj
        params = getattr(obj, "params", {}) or {}
        ptxt = ", ".join(f"{k}={v!r}" for k, v in params.items())
        desc = getattr(obj, "description", "") or (obj.__doc__ or "").strip().split("\n")[0]
        console.print(f"[bold]{escape(entry.name)}[/bold]  [dim]({escape(entry.plugin)})[/dim]  {escape(str(desc))}"
                      + (f"\n    params: {escape(ptxt)}" if ptxt else ""), highlight=False)


# ---------------------------------------------------------------------------- report
@app.command()
@user_errors
def report(
    run_dir: List[Path] = typer.Argument(..., help="Run directory (or several, or a folder of runs)."),
    fmt: str = typer.Option("markdown", "--format", "-f", help="Exporter: markdown, latex, csv, html (a whole page), ...; latex[preset=full] keeps every column (the paper tables default to the compact preset)."),
    table: str = typer.Option("summary", "--table", help="summary (every method) | table1 | table2 | table3 (the paper's rows) | cases (one row per case x method x gate: per-volume Dice, IoU, HD95, ASSD; csv or markdown) | seeds (training-split pseudo-mask quality) | quality (the models behind each row)."),
    gate: str = typer.Option("all", "--gate", help="label | classifier | none | all (default: all, one table per gate held)."),
    with_paper: bool = typer.Option(False, "--with-paper", help="Put the paper's numbers (docs/protocol.md §13) beside ours."),
    per_volume: bool = typer.Option(False, "--per-volume", help="Add a per-volume (3D) Dice column per task (docs/metrics.md)."),
    resamples: Optional[int] = typer.Option(None, "--resamples", help="Bootstrap resamples for the 95% CIs (default: the run's profile; 0 = no CIs and no tests)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Method label the significance test compares against (default: CLDF of each task)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Metric columns, e.g. dice,iou,hd95,assd (default: Dice and IoU, plus HD95 and ASSD in mm when the results hold them)."),
    empty_distance: str = typer.Option("undefined", "--empty-distance", help="HD95/ASSD where exactly one mask is empty: undefined (left out of the mean and counted) | diagonal (the image diagonal in mm, the BraTS convention)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    label: List[str] = typer.Option([], "--label", help="One per run, in order: keeps runs of different profile, data, --set values or code apart as labelled rows."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP + " Phantoms and slice stores for the figures are found or remade here."),
) -> None:
    """Tables of a run with bootstrap CIs and Wilcoxon marks (LaTeX booktabs, Markdown, CSV, HTML page)."""
    from wsss_bench.boundary import check_rule, parse_metrics
    from wsss_bench.reporting.html import html_report
    from wsss_bench.reporting.load import bootstrap_resamples, failed_cells, load_manifests, load_results
    from wsss_bench.reporting.tables import build_tables, render_many, write_text

    if gate not in ("label", "classifier", "none", "all"):
        raise UserError(f"--gate {gate}: choose label, classifier, none or all")
    if resamples is not None and resamples < 0:
        raise UserError(f"--resamples {resamples}: give 0 (no CIs) or a positive count")
    check_rule(empty_distance)
    chosen = parse_metrics(metrics) if metrics is not None else None
    if table == "cases" and fmt not in ("csv", "markdown"):
        raise UserError(f"--table cases --format {fmt}: the per-case table is written as csv or markdown")
    from wsss_bench.reporting.load import load_runs
    from wsss_bench.spec import parse_specs

    host = get_host()
    ex_spec = parse_specs(fmt)[0]
    exporter = host.get("exporters", ex_spec.name)(**ex_spec.expand()[0])
    if ex_spec.name == "html":
        text = html_report(run_dir, exporter, table=table, gate=gate, with_paper=with_paper,
                           per_volume=per_volume, resamples=resamples, reference=reference,
                           metrics=chosen, empty_distance=empty_distance,
                           labels=_split_csv(label), cache_dir=cache_dir)
    else:
        frame, manifests = load_runs(run_dir, _split_csv(label))
        r = bootstrap_resamples(frame, manifests) if resamples is None else resamples
        tables = build_tables(frame, table, gate, with_paper=with_paper, per_volume=per_volume, resamples=r,
                              reference=reference, failed=failed_cells(manifests), metrics=chosen,
                              empty_distance=empty_distance, quality=manifests,
                              quality_table=ex_spec.name != "csv")  # CSV: the quality columns sit in the rows
        text = render_many(tables, exporter)
    if output:
        write_text(output, text)
        say(f"wrote {escape(str(output))}")
    else:
        sys.stdout.write(text)


@app.command()
@user_errors
def figures(
    run_dir: List[Path] = typer.Argument(..., help="Run directory (or several)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the figures (default RUN_DIR/figures)."),
    gate: str = typer.Option("label", "--gate", help="label | classifier | none."),
    fmt: List[str] = typer.Option(["png", "pdf"], "--format", "-f", help="png and/or pdf (repeatable)."),
    size: str = typer.Option("double", "--size", help="single (one journal column, 3.5 in) | double (page width, 7.16 in)."),
    label: List[str] = typer.Option([], "--label", help="One per run, in order: keeps runs of different identity apart."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP + " Phantoms and slice stores are found or remade here."),
) -> None:
    """Figures of a run (matplotlib): qualitative grid (Fig. 3), ablation curves (Fig. 4), Dice boxplots."""
    from wsss_bench.reporting.figures import write_figures

    paths, skipped = write_figures(run_dir, out, gate=gate, formats=_split_csv(fmt), size=size,
                                   cache_dir=cache_dir, labels=_split_csv(label))
    for p in paths:
        say(f"wrote {escape(str(p))}")
    for why in skipped:
        say(f"skipped: {escape(str(why))}")


@app.command("export-masks")
@user_errors
def export_masks_cmd(
    run_dir: List[Path] = typer.Argument(..., help="Run directory (or several)."),
    method: str = typer.Option(..., "--method", "-m", help="Method label as in the results, e.g. gradcam+threshold."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write <task>/<method>/<case>.nii.gz into."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Only this task (default: every task of the method)."),
    gate: str = typer.Option("none", "--gate", help="none (raw prediction) | label | classifier: blank what that gate blanked."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the cell (default: the smallest)."),
    ground_truth: bool = typer.Option(False, "--ground-truth", help="Export the run's preprocessed ground truth of the same cases instead (geometry check)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
) -> None:
    """Predicted masks per test case as NIfTI in the source volume's space and affine."""
    from wsss_bench.reporting.export_masks import export_masks

    if gate not in ("label", "classifier", "none"):
        raise UserError(f"--gate {gate}: choose none, label or classifier")
    paths = export_masks(run_dir, method, out, task=task, gate=gate, seed=seed, ground_truth=ground_truth,
                         cache_dir=cache_dir)
    say(f"wrote {len(paths)} NIfTI file(s) under {escape(str(out))}")


# ---------------------------------------------------------------------------- data
@data_app.command("synth")
@user_errors
def data_synth(
    kind: str = typer.Option(..., "--kind", help="brats or flare."),
    out: Path = typer.Option(..., "--out", help="Folder to write the phantom into (real dataset layout)."),
    cases: Optional[int] = typer.Option(None, "--cases", help="Number of cases (default: the profile's)."),
    seed: int = typer.Option(0, "--seed", help="Phantom seed."),
    profile: str = typer.Option("cpu", "--profile", help="Volume size and voxel spacing from this profile."),
) -> None:
    """Write a synthetic phantom in the real BraTS21 / FLARE21 on-disk layout."""
    from wsss_bench.profiles import load_profile

    names = {"brats": "brats", "flare": "flare21", "flare21": "flare21"}
    if kind not in names:
        raise UserError(f"--kind {kind}: choose brats or flare")
    if cases is not None and cases < 1:
        raise UserError(f"--cases {cases}: need at least 1 case")
    host = get_host()
    ds = host.get("datasets", names[kind])()
    t0 = time.perf_counter()
    ds.synthesize(Path(out), load_profile(profile), seed, cases)
    say(f"wrote {escape(kind)} phantom to {escape(str(out))} ({time.perf_counter() - t0:.1f}s)")


@data_app.command("prepare")
@user_errors
def data_prepare(
    task: str = typer.Option(..., "--task", help="Task id, e.g. brats or flare21-kidney."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset folder (default: the phantom)."),
    profile: str = typer.Option("cpu", "--profile"),
    seed: int = typer.Option(0, "--seed", help="Base seed (splits)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Cases prepared in parallel (default: the usable "
                                       "cores); the store is the same for every value."),
    nonfinite: str = typer.Option("error", "--nonfinite", help="NaN/inf voxels in real data: error (default) or "
                                  "zero (read as background, counted in the store's meta); as in run."),
) -> None:
    """Read, reorient, preprocess and store the slices of a task; print its split summary.

    A killed preparation resumes from the cases already done when run again."""
    import json

    from wsss_bench.data.taskdata import load_task_data
    from wsss_bench.profiles import load_profile

    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: need at least 1 (default: the usable cores)")
    nonfinite = _nonfinite(nonfinite)
    host = get_host()
    cls, _ = host.task(task)
    reader = cls(**({"nonfinite": nonfinite} if "nonfinite" in cls.params else {}))
    t0 = time.perf_counter()
    data = load_task_data(reader, task, data_root, load_profile(profile), seed, Path(cache_dir or default_cache()), jobs=jobs)
    say(escape(json.dumps(data.summary(), indent=1, default=str)[:4000]))
    say(f"prepared {escape(task)} in {time.perf_counter() - t0:.1f}s")


@app.command()
def profiles() -> None:
    """Show the profile table (the values of docs/protocol.md section 10)."""
    from wsss_bench.profiles import markdown_table

    console.print(markdown_table(), highlight=False, markup=False)


# ---------------------------------------------------------------------------- entry point
def _prescan(argv: list[str]) -> tuple[list[str], bool]:
    dirs, strict = [], False
    for i, a in enumerate(argv):
        if a == "--plugins-dir" and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif a.startswith("--plugins-dir="):
            dirs.append(a.split("=", 1)[1])
        elif a == "--strict":
            strict = True
    return dirs, strict


def add_plugin_commands(host) -> None:
    existing = {c.name for c in app.registered_commands}
    for entry in host.registries["commands"].list():
        if entry.name not in existing:
            app.command(name=entry.name)(user_errors(entry.obj))


def escape_help(typer_app: typer.Typer) -> None:
    """Every option and argument help text of every command printed as written.

    rich reads ``[cdm,resnet18]`` or ``local[jobs=2]`` in a help text as a markup tag and drops
    it; each text is escaped once here (one that already holds ``\\[`` is left alone), so no
    help string needs to remember to."""
    import inspect

    from typer.models import ArgumentInfo, OptionInfo

    infos = [*(c.callback for c in typer_app.registered_commands), typer_app.registered_callback
             and typer_app.registered_callback.callback]
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            escape_help(group.typer_instance)
    for fn in infos:
        if fn is None:
            continue
        for param in inspect.signature(fn).parameters.values():
            info = param.default
            if isinstance(info, (OptionInfo, ArgumentInfo)) and info.help and "[" in info.help \
                    and "\\[" not in info.help:
                info.help = escape(info.help)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    dirs, strict = _prescan(argv)
    try:
        _STATE["plugins_dirs"] = dirs
        _STATE["strict"] = True if strict else None
        add_plugin_commands(get_host())
        escape_help(app)
    except UserError as err:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True, highlight=False)
        raise SystemExit(2)
    app(args=argv, prog_name="wsss-bench")


escape_help(app)  # commands defined above; plugin commands are escaped when main() adds them

if __name__ == "__main__":  # pragma: no cover
    main()
