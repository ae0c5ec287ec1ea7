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

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark harness for weakly supervised medical image segmentation.")
data_app = typer.Typer(no_args_is_help=True, help="Write phantoms and prepare slice stores.")
app.add_typer(data_app, name="data")

_STATE: dict[str, Any] = {"strict": None, "plugins_dirs": [], "trace": None, "host": None}

def default_cache() -> Path:
    """$WSSS_BENCH_CACHE, else ~/.cache/wsss-bench (read when a command runs, not at import)."""
    return Path(os.environ.get("WSSS_BENCH_CACHE") or Path.home() / ".cache" / "wsss-bench")


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
    return cached[1]


@app.callback()
@user_errors
def main_options(
    strict: bool = typer.Option(False, "--strict", help="Fail on a plugin that cannot load (default: warn and skip)."),
    plugins_dir: List[Path] = typer.Option([], "--plugins-dir", help="Folder of loose *.py plugin files (repeatable)."),
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
        return [int(s) for s in _split_csv(values)]
    except ValueError:
        raise UserError(f"--seed {','.join(values)}: seeds are integers, e.g. --seed 0 or --seed 0,1,2") from None


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")[:80]


# ---------------------------------------------------------------------------- run
@app.command()
@user_errors
def run(
    method: str = typer.Option(..., "--method", "-m", help="Refiner spec, e.g. threshold or cldf[tau=[0.1,0.5]]."),
    cam: Optional[str] = typer.Option(None, "--cam", "-c", help="Map source spec(s): gradcam, gradcam,layercam (two cells), amecam+mg (one cell, two sources)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Feature backbone of the refiner (its 'backbone' parameter): cdm, resnet18, '[cdm,resnet18]' (a grid)."),
    task: List[str] = typer.Option(["brats"], "--task", "-t", help="brats, flare21-kidney, flare21-spleen, flare21-liver (repeatable / comma list)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Real dataset folder (BraTS21 or FLARE21 layout). Default: the embedded synthetic phantom."),
    profile: str = typer.Option("cpu", "--profile", "-p", help="smoke | cpu | paper (docs/profiles.md)."),
    seed: List[str] = typer.Option(["0"], "--seed", help="Base seed(s); several form a grid axis."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<task>_<cam>_<method>_<profile>_s<seed>)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast for training and feature extraction."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write cached artifacts."),
    force: bool = typer.Option(False, "--force", help="Rebuild artifacts and re-run finished cells."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    phantom_seed: int = typer.Option(0, "--phantom-seed", help="Seed of the embedded phantom (the data, not the training)."),
    executor: str = typer.Option("local", "--executor", help=escape("Executor spec: local, local[jobs=2] or slurm[partition=gpu,gpus=1].")),
    plugins_dir: List[Path] = typer.Option([], "--plugins-dir", help="Folder of loose *.py plugin files (repeatable)."),
    set_: List[str] = typer.Option([], "--set", help="Override a profile value, e.g. --set cdm.iterations=200 (repeatable)."),
    nonfinite: str = typer.Option("error", "--nonfinite", help="NaN/inf voxels in real data: error (default) or zero (read as background, counted in the manifest)."),
) -> None:
    """Run every cell of task x CAM x method x seed, print Dice/IoU per gate, write results."""
    from wsss_bench.profiles import apply_overrides, load_profile
    from wsss_bench.running.runner import CellJob, RunConfig, check_out_dir, plan_cells
    from wsss_bench.spec import parse_specs

    host = get_host([str(p) for p in plugins_dir])
    apply_overrides(load_profile(profile), set_)
    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root}: no such directory; give the folder holding the "
                        f"BraTS2021_* case folders or the FLARE21 TrainingImg/TrainingMask (or imagesTr/labelsTr) folders")
    tasks, seeds = _split_csv(task), _seeds(seed)
    cells = plan_cells(host, tasks, cam, method, seeds, backbones=backbone)
    from wsss_bench.context import resolve_device

    resolve_device(device)  # before any compute, and one message (not one per cell)
    if out is None:
        out = Path("runs") / _slug(f"{'+'.join(tasks)}_{cam or 'nocam'}_{method}_{profile}_s{'-'.join(map(str, seeds))}")
    ex_spec = parse_specs(executor)[0]
    ex = host.get("executors", ex_spec.name)(**ex_spec.expand()[0])
    cfg = RunConfig(profile=profile, out=Path(out), data_root=data_root, device=device,
                    cache_dir=Path(cache_dir or default_cache()), bf16=bf16, use_cache=not no_cache, force=force,
                    phantom_seed=phantom_seed, plugins_dirs=tuple(_STATE["plugins_dirs"] + [str(p) for p in plugins_dir]),
                    strict=bool(_STATE["strict"]), executor=executor, overrides=tuple(set_),
                    nonfinite=_nonfinite(nonfinite))
    check_out_dir(cfg)  # before any compute: writable, and not another configuration's results
    say(f"[bold]wsss-bench run[/bold]: {len(cells)} cell(s), profile {escape(profile)}, "
        f"data {'phantom' if data_root is None else escape(str(data_root))}, out {escape(str(out))}")
    t0 = time.perf_counter()
    job = CellJob(cfg, host=host)
    outcomes = ex.map(job, cells)
    _finish_run(cfg, host, cells, outcomes, time.perf_counter() - t0, job)


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


def _finish_run(cfg, host, cells, outcomes, seconds: float, job) -> None:
    from wsss_bench.running import rundir as results
    from wsss_bench.running.manifest import environment, plugin_distributions
    from wsss_bench.running.runner import CellOutcome

    failed = 0
    user_fail = True
    seen: set[str] = set()
    for cell, oc in zip(cells, outcomes):
        if isinstance(oc, BaseException):
            oc = CellOutcome(cell, "failed", error=f"{type(oc).__name__}: {oc}")
        if oc.status == "failed":
            failed += 1
            user_fail = user_fail and oc.user_error
            _print_failure(cell, oc.error, seen)
        elif oc.status == "resumed":
            say(f"  {escape(cell.task)} {escape(cell.method)} seed {cell.seed}: already done, reused (use --force to redo)")
        else:
            say(f"  {escape(cell.task)} {escape(cell.method)} seed {cell.seed}: done in {oc.seconds:.1f}s")
    frame = results.collect(cfg.out)
    session = job.session()
    manifest = {"command": " ".join(["wsss-bench"] + sys.argv[1:]) if sys.argv else "",
                "config": cfg.to_json(), "wall_seconds": round(seconds, 2),
                "environment": environment(session.device), "plugins": plugin_distributions(host),
                "profile": dict(session.profile),
                "data": {f"{t}/seed{s}": ctx.data.summary() for (t, s), ctx in session._contexts.items()},
                "cache_events": session.cache.events}
    results.write_manifest(cfg.out, manifest)
    if frame is not None:
        keys = {(c.task, c.method, c.seed) for c in cells}
        mine = frame[[k in keys for k in zip(frame["task"], frame["method"], frame["seed"])]]
        if len(mine):
            print_summary(mine, cfg.out)
    where = Path(cfg.out)
    if (where / "results.parquet").is_file():
        say(f"results: {escape(str(where / 'results.parquet'))}  manifest: {escape(str(where / 'manifest.json'))}  "
            f"({seconds:.1f}s)")
    else:
        say(f"no results were written ({failed} of {len(cells)} cell(s) failed); manifest: "
            f"{escape(str(where / 'manifest.json'))}  ({seconds:.1f}s)")
    if failed:
        raise typer.Exit(2 if user_fail else 1)


def print_summary(frame, out: Path) -> None:
    """Rich table: Dice and IoU mean ± std (all slices, positive slices) per method and gate."""
    from rich.table import Table

    from wsss_bench.cache import atomic_write_text
    header, rows = summary_rows(frame)
    table = Table(title="Dice / IoU per gate (mean ± std over test slices)")
    for h in header:
        table.add_column(h, justify="left" if h in ("task", "method", "gate") else "right",
                         overflow="fold", no_wrap=h not in ("method",))
    for row in rows:
        table.add_row(*[escape(c) for c in row])  # method labels hold brackets: gradcam[layer=layer3]
    console.print(table)
    atomic_write_text(Path(out) / "summary.md", summary_markdown(frame))


def summary_markdown(frame) -> str:
    """The end-of-run table as Markdown (``summary.md``; results/check.py recomputes it)."""
    header, rows = summary_rows(frame)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(md) + "\n"


def summary_rows(frame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the end-of-run table, from the aggregate view."""
    from wsss_bench.reporting.stats import aggregate

    agg = aggregate(frame)
    header = ["task", "method", "gate", "Dice (all)", "IoU (all)", "Dice (pos)", "IoU (pos)", "slices pos/neg"]
    rows = []
    for _, r in agg.iterrows():
        rows.append([str(r["task"]), str(r["method"]), str(r["gate"]),
                     f"{r['dice_mean']:.3f} ± {r['dice_std']:.2f}", f"{r['iou_mean']:.3f} ± {r['iou_std']:.2f}",
                     f"{r['dice_pos_mean']:.3f} ± {r['dice_pos_std']:.2f}", f"{r['iou_pos_mean']:.3f} ± {r['iou_pos_std']:.2f}",
                     f"{int(r['n_pos'])}/{int(r['n_neg'])}"])
    return header, rows


def _nonfinite(value: str) -> str:
    if value not in ("error", "zero"):
        raise UserError(f"--nonfinite {value}: choose error (stop at NaN/inf voxels) or zero (read them as background)")
    return value


# ---------------------------------------------------------------------------- bench
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
    profile: str = typer.Option("cpu", "--profile", "-p", help="smoke | cpu | paper (docs/profiles.md)."),
    data_root: List[str] = typer.Option([], "--data-root", help="Real data per dataset: brats=DIR,flare=DIR. Default: the embedded phantoms."),
    executor: str = typer.Option("local", "--executor", help=escape("local, local[jobs=2], slurm[partition=gpu,gpus=1] or slurm[config=cluster.yaml].")),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds for every table (default: each table's own), e.g. 0,1,2."),
    task: List[str] = typer.Option([], "--task", "-t", help="Only these tasks (default: each table's)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bench directory (default runs/bench_<profile>)."),
    failed: bool = typer.Option(False, "--failed", help="Re-run only the cells recorded as failed."),
    collect: bool = typer.Option(False, "--collect", help="Run nothing: gather the finished cells and print the tables."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast for training and feature extraction."),
    force: bool = typer.Option(False, "--force", help="Rebuild artifacts and re-run finished cells."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    phantom_seed: int = typer.Option(0, "--phantom-seed", help="Seed of the embedded phantoms."),
    plugins_dir: List[Path] = typer.Option([], "--plugins-dir", help="Folder of loose *.py plugin files (repeatable)."),
    set_: List[str] = typer.Option([], "--set", help="Override a profile value, e.g. --set cdm.iterations=200 (repeatable)."),
    nonfinite: str = typer.Option("error", "--nonfinite", help="NaN/inf voxels in real data: error (default) or zero."),
) -> None:
    """Regenerate benchmark tables: shared models and maps first (each once), then every cell."""
    from wsss_bench.running import bench as bn
    from wsss_bench.running import rundir as results
    from wsss_bench.context import resolve_device
    from wsss_bench.running.manifest import environment, plugin_distributions
    from wsss_bench.profiles import load_profile
    from wsss_bench.running.runner import RunConfig, check_out_dir
    from wsss_bench.spec import parse_specs

    from wsss_bench.profiles import apply_overrides

    host = get_host([str(p) for p in plugins_dir])
    apply_overrides(load_profile(profile), set_)
    specs = [bn.load_table(p, host) for p in tables]
    seed_list = _seeds([seeds]) if seeds else None
    cells, planned = bn.plan(host, specs, seed_list, _split_csv(task) or None)
    if not cells and not collect:
        raise UserError("the benchmark files expand to no cell (check their tasks and --task)")
    out = Path(out or Path("runs") / f"bench_{profile}")
    ex_spec = parse_specs(executor)[0]
    ex = host.get("executors", ex_spec.name)(**ex_spec.expand()[0])
    cfg = RunConfig(profile=profile, out=out, data_root=None, device=device, cache_dir=Path(cache_dir or default_cache()), bf16=bf16,
                    force=force, phantom_seed=phantom_seed, data_roots=_data_roots(data_root),
                    plugins_dirs=tuple(_STATE["plugins_dirs"] + [str(p) for p in plugins_dir]),
                    strict=bool(_STATE["strict"]), executor=executor, overrides=tuple(set_),
                    nonfinite=_nonfinite(nonfinite))
    check_out_dir(cfg)
    unavailable = [p for p in planned if p.error]
    say(f"[bold]wsss-bench bench[/bold]: {len(specs)} table(s), {len(cells)} unique cell(s), profile "
        f"{escape(profile)}, out {escape(str(out))}" + (f"; {len(unavailable)} row(s) not available" if unavailable else ""))
    t0 = time.perf_counter()
    rep = bn.run_bench(cfg, host, ex, cells, failed_only=failed, collect_only=collect)
    seconds = time.perf_counter() - t0
    failures = [oc for oc in rep["cells"] if oc.status == "failed"]
    seen: set[str] = set()
    for oc in failures:
        _print_failure(oc.cell, oc.error, seen)
    frame = results.collect(out)
    old = {}
    if (out / "manifest.json").is_file():
        import json

        try:
            old = json.loads((out / "manifest.json").read_text())
        except ValueError:
            old = {}
    manifest = {"command": " ".join(["wsss-bench"] + sys.argv[1:]) if sys.argv else "",
                "config": cfg.to_json(), "wall_seconds": round(seconds, 2), "tables": [str(p) for p in tables],
                "only_tasks": _split_csv(task) or None, "seeds": seed_list,
                "environment": environment(resolve_device(device)),
                "plugins": plugin_distributions(host), "profile": dict(cfg.load_profile()),
                "data": {**old.get("data", {}), **rep["data"]}, "phases": rep["phases"], "units": rep["units"],
                "cache_events": rep["cache_events"],
                "training_builds": bn.training_builds(rep["cache_events"]),
                "not_available": [{"table": p.table, "row": p.row, "task": p.task, "why": p.error} for p in unavailable]}
    results.write_manifest(out, manifest)
    resamples = int(load_profile(profile).bootstrap.resamples)
    reasons = bn.failure_reasons(out)
    text = "\n".join(bn.table_summary(frame, planned, t, resamples=resamples, failures=reasons, profile=profile)
                     for t in specs)
    from wsss_bench.cache import atomic_write_text

    atomic_write_text(out / "tables.md", text)
    console.print(text, markup=False, highlight=False)
    say(f"tables: {escape(str(out / 'tables.md'))}  manifest: {escape(str(out / 'manifest.json'))}  ({seconds:.1f}s)")
    if failures:
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
    fmt: str = typer.Option("markdown", "--format", "-f", help="Exporter: markdown, latex, csv, html (a whole page), ..."),
    table: str = typer.Option("summary", "--table", help="summary (every method) | table1 | table2 | table3 (the paper's rows)."),
    gate: str = typer.Option("all", "--gate", help="label | classifier | none | all (default: all, one table per gate held)."),
    with_paper: bool = typer.Option(False, "--with-paper", help="Put the paper's numbers (PROTOCOL 13) beside ours."),
    per_volume: bool = typer.Option(False, "--per-volume", help="Add a per-volume (3D) Dice column per task (docs/metrics.md)."),
    resamples: Optional[int] = typer.Option(None, "--resamples", help="Bootstrap resamples for the 95% CIs (default: the run's profile; 0 = no CIs and no tests)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Method label the significance test compares against (default: CLDF of each task)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Tables of a run with bootstrap CIs and Wilcoxon marks (LaTeX booktabs, Markdown, CSV, HTML page)."""
    from wsss_bench.reporting.report import (bootstrap_resamples, build_tables, failed_cells, html_report,
                                   load_manifests, load_results, render_many, write_text)

    if gate not in ("label", "classifier", "none", "all"):
        raise UserError(f"--gate {gate}: choose label, classifier, none or all")
    if resamples is not None and resamples < 0:
        raise UserError(f"--resamples {resamples}: give 0 (no CIs) or a positive count")
    host = get_host()
    exporter = host.get("exporters", fmt)()
    if fmt == "html":
        text = html_report(run_dir, exporter, table=table, gate=gate, with_paper=with_paper,
                           per_volume=per_volume, resamples=resamples, reference=reference)
    else:
        frame = load_results(run_dir)
        manifests = load_manifests(run_dir)
        r = bootstrap_resamples(frame, manifests) if resamples is None else resamples
        tables = build_tables(frame, table, gate, with_paper=with_paper, per_volume=per_volume, resamples=r,
                              reference=reference, failed=failed_cells(manifests))
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
) -> None:
    """Figures of a run (matplotlib): qualitative grid (Fig. 3), ablation curves (Fig. 4), Dice boxplots."""
    from wsss_bench.reporting.figures import write_figures

    paths, skipped = write_figures(run_dir, out, gate=gate, formats=_split_csv(fmt))
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
) -> None:
    """Predicted masks per test case as NIfTI in the source volume's space and affine."""
    from wsss_bench.reporting.export_masks import export_masks

    if gate not in ("label", "classifier", "none"):
        raise UserError(f"--gate {gate}: choose none, label or classifier")
    paths = export_masks(run_dir, method, out, task=task, gate=gate, seed=seed, ground_truth=ground_truth)
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
    """Show the profile table (the values of PROTOCOL section 10)."""
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    dirs, strict = _prescan(argv)
    try:
        _STATE["plugins_dirs"] = dirs
        _STATE["strict"] = True if strict else None
        add_plugin_commands(get_host())
    except UserError as err:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True, highlight=False)
        raise SystemExit(2)
    app(args=argv, prog_name="wsss-bench")


if __name__ == "__main__":  # pragma: no cover
    main()
