"""Provenance of a result file under benchmarks/results/: what made it, from which code.

Every result file starts with the same block (:func:`provenance_lines`):

- the command that wrote it (as typed, relative to the repository root);
- the git commit (HEAD) and whether the files the result depends on had uncommitted
  changes when it ran (the working tree is shared, so "dirty" is named per file);
- the phantom generator version of the data it used (``brain-2``, ``abdomen-2``; ``real``
  for real data), or the versions in the tree when the result used no phantom;
- the profile, and the machine, Python and torch versions.

    from _meta import provenance_lines       # scripts in benchmarks/ (sys.path[0])
    lines = provenance_lines(command, profile="cpu", data=ctx.data, sources=[...])
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]


def command_line(script: str | Path | None = None, argv: Iterable[str] | None = None) -> str:
    """The command that ran this script, e.g. ``python benchmarks/mutants.py --threads 1``."""
    script = Path(script or sys.argv[0]).resolve()
    try:
        shown = script.relative_to(ROOT)
    except ValueError:
        shown = script
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", str(shown), *args])


def _git(*args: str, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() if strip else out.stdout


def dirty_files(sources: Iterable[str | Path]) -> list[str]:
    """Those of ``sources`` (paths relative to the repository root) that differ from HEAD."""
    paths = [str(p) for p in sources]
    if not paths:
        return []
    out = _git("status", "--porcelain", "--", *paths, strip=False)
    if not out:
        return []
    return sorted({line[3:].strip() for line in out.splitlines() if len(line) > 3})  # "XY path"


def phantom_versions(data: Any = None) -> str:
    """The generator version of ``data``'s phantom (``real`` for real data); without ``data``,
    the versions of the generators in this tree."""
    if data is not None:
        phantom = getattr(data, "phantom", None)
        if phantom:
            return str(phantom.get("generator_version", "unknown"))
        if getattr(data, "is_phantom", None) is False:
            return "real"
    from wsss_bench.data import phantom_abdomen, phantom_brain

    return f"{phantom_brain.GENERATOR_VERSION}, {phantom_abdomen.GENERATOR_VERSION} (generators in this tree)"


def provenance(command: str | None = None, profile: str | None = None, data: Any = None,
               sources: Iterable[str | Path] = (), note_phantom: str | None = None) -> dict[str, Any]:
    """The facts of :func:`provenance_lines` as a dict (for JSON results)."""
    import torch

    from wsss_bench.running.manifest import cpu_model

    return {
        "command": command or command_line(),
        "git_sha": _git("rev-parse", "HEAD"),
        "uncommitted": dirty_files(sources),
        "phantom_generator": note_phantom or phantom_versions(data),
        "profile": profile,
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{cpu_model()}; {os.cpu_count()} logical CPUs; Python {platform.python_version()}; "
                   f"torch {torch.__version__}; {torch.get_num_threads()} thread(s)",
    }


def provenance_lines(command: str | None = None, profile: str | None = None, data: Any = None,
                     sources: Iterable[str | Path] = (), note_phantom: str | None = None) -> list[str]:
    """Markdown bullet lines: command, git SHA (+ uncommitted files), phantom generator, profile, machine."""
    sources = list(sources)
    p = provenance(command, profile, data, sources, note_phantom)
    sha = p["git_sha"] or "unknown (not a git checkout)"
    dirty = (f"; uncommitted changes in {', '.join(p['uncommitted'])}" if p["uncommitted"]
             else "; the files it depends on match this commit" if sources else "")
    return [
        f"- command: `{p['command']}`",
        f"- git: `{sha}`{dirty}",
        f"- phantom generator: {p['phantom_generator']}",
        f"- profile: {p['profile'] or 'n/a'}",
        f"- machine: {p['machine']}; run {p['date']}",
    ]


def write_result(path: Path, lines: Iterable[str]) -> str:
    """Write a benchmark's Markdown result file (atomically: a reader never sees half of it),
    print it, and return its text."""
    text = "\n".join(lines) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(text)
    return text
