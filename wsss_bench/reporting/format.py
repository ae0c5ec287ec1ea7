"""How a number is written: the one place that formats mean, std, CI and p-values.

Every table (the end-of-run summary, the bench tables, the report) calls these, so a number
reads the same everywhere.  Two spellings of mean ± std exist on purpose: ``compact``
("0.392±0.29", the paper's layout, for the report's dense tables) and spaced
("0.392 ± 0.29", the plain-text summaries); both come from :func:`fmt_stat`.
"""
from __future__ import annotations

import math
from typing import Any

MISSING = "—"


def _finite(x: Any) -> bool:
    try:
        return x is not None and not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def fmt_stat(mean: float, std: float | None = None, ci: tuple[float, float] | None = None, *,
             compact: bool = True) -> str:
    """'0.392±0.29' (``compact``) or '0.392 ± 0.29', then ' [lo, hi]' when ``ci`` is given.

    Mean and CI bounds to 3 decimals, std to 2 (as the paper); '—' when the mean is missing.
    """
    if not _finite(mean):
        return MISSING
    text = f"{mean:.3f}" if not _finite(std) else f"{mean:.3f}{'±' if compact else ' ± '}{std:.2f}"
    bounds = fmt_ci(*ci) if ci is not None else ""
    return f"{text} {bounds}" if bounds else text


def fmt_mean_std(mean: float, std: float | None = None) -> str:
    """'0.392±0.29' (compact, the report's tables); '—' when missing."""
    return fmt_stat(mean, std)


def fmt_ci(lo: float, hi: float) -> str:
    """'[0.350, 0.431]' (3 decimals, as the mean); '' when missing."""
    return f"[{lo:.3f}, {hi:.3f}]" if _finite(lo) and _finite(hi) else ""


def fmt_p(p: float, note: str = "") -> str:
    if not _finite(p):
        return "n/a" if note.startswith("n/a") else MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"




def markdown_grid(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a plain Markdown table (``| a | b |`` rows under a ``|---|`` rule)."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])
