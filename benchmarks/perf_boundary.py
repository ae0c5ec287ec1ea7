"""What do HD95/ASSD add to a cell's scoring stage on the cpu profile?

The committed cold cpu bench (``results/cpu``) stores every cell's ungated test-slice masks.
For each of ``--cells`` of those cells (spread over the tasks), this script rebuilds the cell's
scoring inputs on the cpu profile's phantoms (test masks, labels, classifier p(1) from the
committed rows, the three gates) and times the real ``stage_score`` (``wsss_bench.running.stages``) twice:

- ``dice``: with the boundary metrics switched off (``score_cell`` replaced by NaN columns),
  i.e. the scoring stage as it was (Dice, IoU, the row frame);
- ``full``: as shipped (plus per-slice HD95/ASSD through MONAI and the case volumes).

Each is the median of ``--repeats`` runs.  The added seconds are also set against the cell's
whole time in the committed manifest and against the bench's total.  The machine is shared:
the absolute numbers move with its load.

    python benchmarks/perf_boundary.py                       # writes benchmarks/results/perf_boundary.md
    python benchmarks/perf_boundary.py --cells 4 --repeats 1 --out /tmp/p.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, provenance_lines  # noqa: E402

SOURCES = ["benchmarks/perf_boundary.py", "wsss_bench/boundary.py", "wsss_bench/running/stages.py",
           "wsss_bench/metrics.py"]


def _inputs(session, pred, rows):
    """A CellState-like object for ``stage_score`` from stored predictions and committed rows."""
    from wsss_bench.metrics import apply_gate
    from wsss_bench.running.runner import Cell
    from wsss_bench.running.stages import GATES

    ctx = session.context(pred.task, pred.seed)
    data = ctx.task_data
    test = data.split("test")
    order = {(c, int(z)): i for i, (c, z) in enumerate(zip(pred.case_ids, pred.z))}
    pick = np.array([order[(str(c), int(z))] for c, z in zip(data.case_ids[test], data.z[test])])
    masks = pred.masks[pick]
    one = rows[(rows.gate == "none")].set_index(["case_id", "z"])
    p1 = np.array([one.loc[(str(c), int(z)), "classifier_p1"] for c, z in zip(data.case_ids[test], data.z[test])])
    labels = data.labels[test].astype(int)
    gated = {g: apply_gate(masks, g, labels, p1) for g in GATES}
    cell = Cell(pred.task, "threshold", (), (), pred.seed)
    return SimpleNamespace(ctx=ctx, cell=cell, test=test, pred=masks, gated=gated, p1=p1, frame=None), len(test)


def _time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "results" / "cpu"))
    ap.add_argument("--cells", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default="/tmp/metrics-cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "perf_boundary.md"))
    args = ap.parse_args(argv)

    import pandas as pd

    import wsss_bench.boundary as boundary
    from wsss_bench.running.rundir import load_predictions
    from wsss_bench.running import stages
    from wsss_bench.running.runner import RunConfig, Session

    res = Path(args.results)
    frame = pd.read_parquet(res / "results.parquet")
    manifest = json.loads((res / "manifest.json").read_text())
    cell_seconds = {(c["cell"]["task"], c["method"], c["cell"]["seed"]): c.get("seconds", float("nan"))
                    for c in manifest.get("cells", []) if "cell" in c}
    preds = load_predictions(res)
    by_task: dict[str, list] = {}
    for key in sorted(preds):
        by_task.setdefault(key[0], []).append(key)
    chosen, i = [], 0
    while len(chosen) < args.cells and any(by_task.values()):  # round-robin over the tasks
        task = sorted(by_task)[i % len(by_task)]
        if by_task[task]:
            chosen.append(by_task[task].pop(0))
        i += 1

    session = Session(RunConfig(profile="cpu", device="cpu", cache_dir=Path(args.cache_dir), out=Path("/tmp/perf-boundary")))
    real = stages.score_cell
    stage_score = stages.stage_score

    def off(pred, gt, passed, *a, **k):
        n = len(pred)
        return {g: {c: np.full(n, np.nan) for c in boundary.SLICE_COLUMNS + boundary.VOLUME_COLUMNS} for g in passed}

    lines, total_dice, total_full = [], 0.0, 0.0
    for key in chosen:
        pred = preds[key]
        rows = frame[(frame.task == key[0]) & (frame.method == key[1]) & (frame.seed == key[2])]
        st, n = _inputs(session, pred, rows)
        stages.score_cell = off
        t_dice = _time(lambda: stage_score(st), args.repeats)
        stages.score_cell = real
        t_full = _time(lambda: stage_score(st), args.repeats)
        total_dice += t_dice
        total_full += t_full
        cell_s = cell_seconds.get(key, float("nan"))
        lines.append(f"| {key[0]} | {key[1]} | {n} | {t_dice:.3f} | {t_full:.3f} | {t_full - t_dice:.3f} | "
                     f"{cell_s:.2f} | {100 * (t_full - t_dice) / cell_s:.0f}% |")
        print(lines[-1], flush=True)
    added = total_full - total_dice
    n_cells = len(manifest.get("cells", []))
    per_cell = added / max(1, len(chosen))
    out = provenance_lines(command_line(), profile="cpu", sources=SOURCES) + [
        "",
        "# Added time of HD95/ASSD in the scoring stage (cpu profile)",
        "",
        f"Cells: {len(chosen)} of the committed `{res.relative_to(ROOT) if res.is_relative_to(ROOT) else res}` "
        f"({n_cells} cells), their stored masks rescored; median of {args.repeats} runs each. "
        "The machine was shared (up to 8 developers on 2 cores): absolute times move with its load.",
        "",
        "| task | method | test slices | score, Dice only (s) | score, with HD95/ASSD (s) | added (s) | "
        "committed cell time (s) | added / cell |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"Scoring stage: {total_dice:.2f} s -> {total_full:.2f} s over {len(chosen)} cells "
        f"(x{total_full / max(total_dice, 1e-9):.0f}; +{added:.2f} s, {per_cell:.2f} s a cell). "
        f"Over the bench's {n_cells} cells: about {per_cell * n_cells / 60:.1f} min added.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out) + "\n")
    print(out[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
