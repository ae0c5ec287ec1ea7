"""What does checking the cache cost?  Per artifact read, and on a warm smoke bench of Tables 1-3.

1. **Per read**: an artifact of ``--sizes`` MiB (one float32 ``.npy``) is built once, then served
   ``--reads`` times by ``ArtifactCache.build`` in three modes, median seconds per read:
   ``none`` (the check switched off: the old hit path, one ``is_file``), ``cheap`` (size and
   array header, every read), ``full`` (BLAKE2b of every byte: the first read in a process,
   and every read under ``--verify``).  The file is in the page cache, so ``full`` is hashing
   speed, not disk speed.
2. **Warm bench**: ``wsss-bench bench benchmarks/table{1,2,3}.toml --profile smoke`` once to fill
   a private cache, then ``--repeats`` rounds of three warm runs (each a fresh process and a
   fresh ``--out``, so every cell is recomputed from cached models and maps): ``none`` (every
   integrity check patched out), ``default`` (cheap checks, full hash on first use) and
   ``--verify``.  The order inside a round rotates; the table gives the median wall time.

    python benchmarks/perf_verify.py                      # writes benchmarks/results/perf_verify.md
    python benchmarks/perf_verify.py --sizes 1,16 --repeats 1 --out /tmp/v.md
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, provenance_lines  # noqa: E402

SOURCES = ["benchmarks/perf_verify.py", "wsss_bench/integrity.py", "wsss_bench/cache.py", "wsss_bench/data/store.py",
           "wsss_bench/data/taskdata.py"]
TABLES = ["benchmarks/table1.toml", "benchmarks/table2.toml", "benchmarks/table3.toml"]
#: runs the CLI with every integrity check patched out (the baseline), or as shipped
RUNNER = """
import atexit, sys, time
from wsss_bench import integrity
mode = sys.argv[1]
if mode == "none":
    integrity.check_folder = lambda *a, **k: None
else:  # time every check this process makes (the direct cost, immune to the machine's noise)
    spent = [0.0, 0]
    real = integrity.check_folder
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1
    integrity.check_folder = timed
    atexit.register(lambda: sys.stderr.write(f"\\nCHECK_SECONDS {spent[0]:.4f} {spent[1]}\\n"))
from wsss_bench.cli import main
main(sys.argv[2:])
"""


def per_read(sizes_mib: list[int], reads: int) -> list[tuple[int, str, float]]:
    import numpy as np

    from wsss_bench import integrity
    from wsss_bench.cache import ArtifactCache

    rows = []
    with tempfile.TemporaryDirectory(prefix="wsss-perf-verify-") as tmp:
        cache = ArtifactCache(Path(tmp))
        for mib in sizes_mib:
            key = f"{mib:064d}"
            n = mib * (1 << 20) // 4
            cache.build("maps", key, lambda w: np.save(w / "maps.npy", np.random.default_rng(0).random(n, np.float32)))
            real_check = integrity.check_folder
            for mode in ("none", "cheap", "full"):
                integrity.check_folder = (lambda *a, **k: None) if mode == "none" else real_check
                integrity.set_verify_always(mode == "full")
                times = []
                for _ in range(reads):
                    t0 = time.perf_counter()
                    built = cache.build("maps", key, lambda w: None)
                    times.append(time.perf_counter() - t0)
                    assert built.hit
                integrity.check_folder = real_check
                integrity.set_verify_always(False)
                rows.append((mib, mode, statistics.median(times)))
    return rows


def warm_bench(repeats: int, log, cache_dir: str | None = None) -> tuple[dict, dict]:
    checks: dict[str, list[tuple[float, int, float]]] = {"default": [], "verify": [], "none": []}
    cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="wsss-perf-verify-cache-"))
    outs = Path(tempfile.mkdtemp(prefix="wsss-perf-verify-out-"))
    env = {**__import__("os").environ, "WSSS_BENCH_CACHE": str(cache), "CI": "1"}

    def one(mode: str, tag: str) -> float:
        args = ["bench", *TABLES, "--profile", "smoke", "--cache-dir", str(cache), "--out", str(outs / tag)]
        if mode == "verify":
            args.append("--verify")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", RUNNER, "none" if mode == "none" else "shipped", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"bench {mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        found = [ln.split() for ln in done.stderr.splitlines() if ln.startswith("CHECK_SECONDS")]
        if found:
            checks[mode].append((float(found[-1][1]), int(found[-1][2]), seconds))
        log(f"  {tag}: {seconds:.1f}s" + (f" (checks {found[-1][1]}s in {found[-1][2]} calls)" if found else ""))
        return seconds

    log("filling the cache (cold smoke bench of Tables 1-3)")
    cold = one("default", "cold")
    modes = ["none", "default", "verify"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        order = modes[r % 3:] + modes[:r % 3]
        for mode in order:
            times[mode].append(one(mode, f"{mode}-{r}"))
    times["cold"] = [cold]
    return times, checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,128", help="artifact sizes in MiB (comma list)")
    ap.add_argument("--reads", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of warm benches (0: skip the bench)")
    ap.add_argument("--cache", default=None, help="reuse this cache folder (default: a fresh one, filled cold)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "perf_verify.md")
    args = ap.parse_args()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    lines = [*provenance_lines(command_line(), profile="smoke", sources=SOURCES), ""]
    lines += ["## Per artifact read (median seconds; one float32 .npy, in the page cache)", "",
              "| size MiB | none (no check) | cheap (size, header) | full (BLAKE2b) | full MB/s |", "|---|---|---|---|---|"]
    rows = per_read([int(s) for s in args.sizes.split(",")], args.reads)
    by = {(m, mode): t for m, mode, t in rows}
    for mib in sorted({m for m, _, _ in rows}):
        full = by[(mib, "full")]
        lines.append(f"| {mib} | {by[(mib, 'none')] * 1e3:.2f} ms | {by[(mib, 'cheap')] * 1e3:.2f} ms | "
                     f"{full * 1e3:.1f} ms | {mib * 1.048576 / full:.0f} |")
        log(lines[-1])
    if args.repeats > 0:
        times, checks = warm_bench(args.repeats, log, args.cache)
        base = statistics.median(times["none"])
        lines += ["", f"## Warm smoke bench of Tables 1-3 (wall seconds, {args.repeats} round(s), fresh process and --out each)", "",
                  "| mode | median | runs | vs none |", "|---|---|---|---|"]
        for mode in ("none", "default", "verify"):
            med = statistics.median(times[mode])
            lines.append(f"| {mode} | {med:.1f} | {', '.join(f'{t:.1f}' for t in times[mode])} | "
                         f"{(med / base - 1) * 100:+.1f}% |")
        lines.append(f"\nCold run that filled (or re-used) the cache: {times['cold'][0]:.1f}s.")
        lines += ["", "Time spent inside the checks themselves (measured in the bench process; workers none: "
                  "the local executor runs the cells in it):", "",
                  "| mode | check seconds (median) | calls | share of the run's wall time |", "|---|---|---|---|"]
        for mode in ("default", "verify"):
            if checks[mode]:
                sec = statistics.median(c[0] for c in checks[mode])
                calls = statistics.median(c[1] for c in checks[mode])
                share = statistics.median(c[0] / c[2] for c in checks[mode])
                lines.append(f"| {mode} | {sec:.3f} | {calls:.0f} | {share * 100:.2f}% |")
    lines += ["", "The machine was shared with other developers' jobs while this ran (2 cores): compare the "
              "spread of one mode's runs with the differences between modes before reading the wall times; the "
              "per-read numbers and the time spent inside the checks are the direct cost."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
