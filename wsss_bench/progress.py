"""Progress of long stages: rich bars on a terminal, plain lines in a log.

On an interactive terminal a stage shows a rich progress bar.  When stdout is not a terminal
(CI, SLURM, ``> run.log``) each stage prints one plain line when it starts and one when it
ends (name, elapsed time), and long ones a line every 10% or every minute, whichever comes
first, with the estimated time left (ETA, from the mean rate so far), so a user watching a
log can tell a training run from a hang and when it will end.
``WSSS_BENCH_NO_PROGRESS=1`` silences both; ``WSSS_BENCH_NO_BARS=1`` (set by the test suite) or
``CI`` keeps bars off but leaves the plain lines.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console

def _width() -> int | None:
    """Keep tables readable when output goes to a file or CI log (rich defaults to 80 columns)."""
    return None if sys.stdout.isatty() else 140


console = Console(stderr=False, highlight=False, width=_width())
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)


def bars_enabled() -> bool:
    if any(os.environ.get(v) for v in ("CI", "WSSS_BENCH_NO_BARS", "WSSS_BENCH_NO_PROGRESS")):
        return False
    return sys.stdout.isatty()


def log_lines_enabled() -> bool:
    """Plain progress lines: output is not an interactive terminal and not silenced."""
    return not os.environ.get("WSSS_BENCH_NO_PROGRESS") and not bars_enabled()


#: seconds between two progress lines of one stage in a log
LOG_EVERY_S = 60.0


def log_line(message: str) -> None:
    """One plain, timestamped line (no markup: user text stays as it is)."""
    console.print(f"{time.strftime('%H:%M:%S')} {message}", markup=False, highlight=False, soft_wrap=True)


def eta_text(done: int, total: int | None, elapsed: float) -> str:
    """', ETA 42s' (or ' 3.5 min') from the mean rate so far; '' when it cannot be estimated."""
    if not total or done <= 0 or done >= total or elapsed <= 0:
        return ""
    left = elapsed / done * (total - done)
    return f", ETA {left:.0f}s" if left < 120 else f", ETA {left / 60:.1f} min"


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; a bar on an interactive terminal, plain lines in a log."""
    if not bars_enabled():
        if not log_lines_enabled():
            yield lambda n=1: None
            return
        state = {"done": 0, "next_pct": 10, "last": time.perf_counter()}
        t0 = state["last"]
        log_line(f"{description}: started" + (f" ({total} steps)" if total else ""))

        def advance(n: int = 1) -> None:
            state["done"] += n
            now = time.perf_counter()
            pct = 100.0 * state["done"] / total if total else None
            if (pct is not None and pct >= state["next_pct"] and state["done"] < total) or \
                    now - state["last"] >= LOG_EVERY_S:
                where = f"{state['done']}/{total} ({pct:.0f}%)" if pct is not None else f"{state['done']}"
                log_line(f"{description}: {where}, {now - t0:.0f}s{eta_text(state['done'], total, now - t0)}")
                state["last"] = now
                if pct is not None:
                    while state["next_pct"] <= pct:
                        state["next_pct"] += 10

        ok = False
        try:
            yield advance
            ok = True
        finally:
            log_line(f"{description}: {'done' if ok else 'stopped'} after {time.perf_counter() - t0:.1f}s")
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def say(message: str) -> None:
    """One status line (stdout)."""
    console.print(message, soft_wrap=True)
