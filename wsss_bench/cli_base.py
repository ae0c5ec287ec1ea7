"""What every ``wsss-bench`` command shares: the Typer apps, the global options, plugin loading,
the one-line user errors, and small parsers and printers.  The commands live in :mod:`cli`
(run, bench, plugins, list, profiles, the entry point) and :mod:`cli_output` (report,
figures, export-masks, data synth / prepare)."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, List

import typer
from rich.markup import escape

from wsss_bench.errors import UserError
from wsss_bench.progress import console, err_console

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


