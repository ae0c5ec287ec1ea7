"""The ``wsss-bench`` commands that read finished runs or write data: report, figures,
export-masks, and ``data synth`` / ``data prepare``.  Registered on the app of :mod:`cli_base`
when :mod:`cli` imports this module."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from wsss_bench.cli_base import CACHE_HELP, _nonfinite, _split_csv, app, data_app, default_cache, get_host, user_errors
from wsss_bench.errors import UserError
from wsss_bench.progress import say


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
    from wsss_bench.reporting.load import bootstrap_resamples, failed_cells
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


