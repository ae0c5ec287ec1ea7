"""Rich progress bars for long stages; silent when stdout is not a terminal or CI is set."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console

def _width() -> int | None:
    """Keep tables readable when output goes to a file or CI log (rich defaults to 80 columns)."""
    return None if sys.stdout.isatty() else 140


console = Console(stderr=False, highlight=False, width=_width())
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)


def bars_enabled() -> bool:
    if os.environ.get("CI") or os.environ.get("WSSS_BENCH_NO_PROGRESS"):
        return False
    return sys.stdout.isatty()


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar only on an interactive terminal."""
    if not bars_enabled():
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def say(message: str) -> None:
    """One status line (stdout)."""
    console.print(message, soft_wrap=True)
