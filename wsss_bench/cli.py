"""The ``wsss-bench`` command line (Typer): run, bench, plugins, list, profiles and the entry
point.  What the commands share is in :mod:`cli_base`; report, figures, export-masks and the
``data`` commands are in :mod:`cli_output`.  Plugins may add commands via register_commands."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from wsss_bench.cli_base import (CACHE_HELP, PLUGINS_DIR_HELP, _STATE, _seeds, _slug, _split_csv,  # noqa: F401
                                 app, default_cache, get_host, print_table, user_errors)
from wsss_bench.errors import UserError
from wsss_bench.progress import console, err_console, say


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
    from wsss_bench.running.plan import make_plan, render, worker_threads
    from wsss_bench.spec import parse_specs

    spec = parse_specs(executor)[0]
    jobs = int(spec.expand()[0].get("jobs", 1) or 1)
    threads = worker_threads(jobs) if spec.name == "local" else 1
    say(f"[bold]plan[/bold] (nothing runs): {len(cells)} cell(s), profile {escape(cfg.profile)}, "
        f"out {escape(str(cfg.out))}")
    for line in render(make_plan(cfg, host, cells), jobs, threads):
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


# report, figures, export-masks and data register here, so --help lists the commands in this order
from wsss_bench import cli_output  # noqa: E402,F401


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
