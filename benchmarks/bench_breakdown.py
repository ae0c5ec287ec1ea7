"""Where did a bench's time go?  Per-stage totals from the stage lines of its log.

``wsss-bench bench`` writes a line when each stage of a unit or cell starts and ends
(``HH:MM:SS stage train/cdm [source cdm (brats, seed 0)]: done in 1302.1s``).  This sums the
seconds of every finished stage by stage name (the part before the first ``/`` and the
model or source after it: ``train/cdm``, ``maps/scorecam``, ``refine/cldf``), leaving out
the ``prepare/*`` stages (they contain the ``train/*`` stages they trigger).  With a pool of
N workers the sums are worker-seconds: they add up to about N x the wall time.

With a manifest it also prints the **training floor**: the worker-minutes of the ``train/*``
stages divided by the number of workers.  A bench that trains every model as this one did
cannot finish sooner on that many workers, however the rest is sped up or scheduled; it is
what a wall-time target has to be set against.

    python benchmarks/bench_breakdown.py results/cpu/bench-stages.log --manifest results/cpu/manifest.json
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^(\d\d:\d\d:\d\d) stage (\S+) \[(.*)\]: done in ([0-9.]+)s$")


def stage_name(stage: str) -> str:
    """``maps/layercam[layers=layer4]/test`` -> ``maps/layercam``; ``train/cdm`` stays."""
    parts = stage.split("/")
    head = parts[0]
    if len(parts) == 1:
        return head
    return f"{head}/{parts[1].split('[')[0]}"


def breakdown(lines: list[str]) -> dict[str, tuple[float, int]]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for line in lines:
        m = LINE.match(line.strip())
        if not m or m.group(2).startswith("prepare/"):
            continue
        t = totals[stage_name(m.group(2))]
        t[0] += float(m.group(4))
        t[1] += 1
    return {k: (v[0], int(v[1])) for k, v in totals.items()}


JOBS = re.compile(r"jobs=(\d+)")


def workers(manifest: dict) -> int:
    """Worker processes of the run: ``jobs`` of a ``local[jobs=N]`` executor, else 1."""
    m = JOBS.search(str(manifest.get("config", {}).get("executor", "")))
    return int(m.group(1)) if m else 1


def training_seconds(totals: dict[str, tuple[float, int]]) -> float:
    return sum(sec for name, (sec, _) in totals.items() if name.startswith("train/"))


def markdown(totals: dict[str, tuple[float, int]], manifest: dict | None = None) -> str:
    total = sum(v[0] for v in totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    out = []
    if manifest:
        phases = {p["phase"]: p["seconds"] for p in manifest.get("phases", [])}
        out.append(f"Wall time {manifest.get('wall_seconds', 0) / 60:.1f} min (shared phase "
                   f"{phases.get('shared', 0) / 60:.1f} min, cells {phases.get('cells', 0) / 60:.1f} min); "
                   f"stage time summed over workers {total / 60:.1f} min.")
        n, train = workers(manifest), training_seconds(totals)
        out.append(f"Training floor: the train/* stages are {train / 60:.1f} of those worker-minutes; "
                   f"on {n} worker(s) no schedule finishes under {train / 60 / n:.1f} min while every "
                   "model trains as it did here.")
        out.append("")
    out += ["| stage | runs | worker-minutes | share |", "|---|---|---|---|"]
    for name, (sec, n) in rows:
        out.append(f"| {name} | {n} | {sec / 60:.1f} | {100 * sec / total:.1f}% |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--manifest", type=Path, default=None)
    args = ap.parse_args()
    manifest = json.loads(args.manifest.read_text()) if args.manifest else None
    print(markdown(breakdown(args.log.read_text().splitlines()), manifest), end="")


if __name__ == "__main__":
    main()
