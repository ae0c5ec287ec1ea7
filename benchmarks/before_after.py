"""Dice of every row of the paper's tables in two bench folders, side by side (gate = label).

Made for the convergence rule: the reference run before it (classifiers trained a fixed 60
steps) against the run after it.  Per table row and task: mean Dice over all test slices and
over the positive test slices, before -> after, and the change.  Both folders are read as they
are committed (``results.parquet`` + ``manifest.json``); the rows of each table are planned
from the table files the *after* run names, and each row's methods are looked up in both.

    git archive <commit> results/cpu | tar -x -C /tmp/before
    python benchmarks/before_after.py /tmp/before/results/cpu results/cpu --before-name <commit>
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, write_result  # noqa: E402


def _dice(frame, task: str, methods: set[str]) -> tuple[float | None, float | None, str]:
    m = frame[(frame.gate == "label") & (frame.task == task) & frame.method.isin(methods)]
    if not len(m):
        return None, None, ""
    pos = m[m.label == 1]
    return float(m.dice.mean()), float(pos.dice.mean()) if len(pos) else None, ",".join(sorted(set(m.method)))


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _d(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{b - a:+.3f}"


def compare(before: Path, after: Path) -> list[str]:
    import pandas as pd

    from wsss_bench.plugins import load_plugins
    from wsss_bench.running import bench as bn

    manifest = json.loads((after / "manifest.json").read_text())
    host = load_plugins()
    tables = [bn.load_table(ROOT / p, host) for p in manifest["tables"]]
    _, planned = bn.plan(host, tables, manifest.get("seeds"), manifest.get("only_tasks"))
    old, new = pd.read_parquet(before / "results.parquet"), pd.read_parquet(after / "results.parquet")
    lines = []
    for table in tables:
        if not table.paper:
            continue
        lines += [f"### {table.name}", "", "| row | task | method | Dice all: before -> after (change) | "
                  "Dice positive slices: before -> after (change) |", "|---|---|---|---|---|"]
        for row in table.rows:
            for task in table.tasks:
                pr = next((p for p in planned if p.table == table.name and p.row == row.name and p.task == task), None)
                if pr is None:
                    continue
                methods = {c.method for c in pr.cells}
                a_all, a_pos, _ = _dice(old, task, methods)
                b_all, b_pos, used = _dice(new, task, methods)
                lines.append(f"| {row.name} | {task} | {used or ', '.join(sorted(methods))} | {_f(a_all)} -> {_f(b_all)} "
                             f"({_d(a_all, b_all)}) | {_f(a_pos)} -> {_f(b_pos)} ({_d(a_pos, b_pos)}) |")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--before-name", default="before")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "before_after_convergence.md")
    args = ap.parse_args()
    env = lambda p: json.loads((p / "manifest.json").read_text()).get("environment", {})  # noqa: E731
    head = ["# Dice before and after the convergence rule (gate label, mean over test slices)", "",
            f"- command: `{command_line(argv=sys.argv[1:])}`",
            f"- before: `{args.before}` ({args.before_name}; bench made at git `{env(args.before).get('git_sha')}`)",
            f"- after: `{args.after}` (bench made at git `{env(args.after).get('git_sha')}`)",
            "- both are cold cpu-profile benches of Tables 1-3 + Fig. 4 on the embedded phantoms, seed 0", ""]
    write_result(args.out, head + compare(args.before, args.after))


if __name__ == "__main__":
    main()
