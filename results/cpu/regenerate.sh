#!/usr/bin/env bash
# results/cpu: the paper's Tables 1-3 and Fig. 4 on the cpu profile over the embedded phantoms,
# from an empty cache (a cold run), on this machine's CPU.  Run it from the root of a clean
# clone after the README's install (`. .venv/bin/activate` first); see results/README.md.
#
#   bash results/cpu/regenerate.sh          # about 95 min on 2 cores; writes results/cpu/
#
# The bench itself is the one command a user types.  It runs twice: cold (every model trained,
# its manifest kept as manifest-cold.json with the time of every unit and cell) and then warm
# (the same command again: every unit and cell must be reused, which checks that the results
# belong to this commit's code, and measures the warm time).  collect.sh then copies the
# outputs here and renders the LaTeX / Markdown paper tables, the side tables and the figures
# from the copied per-slice rows (results/check.py recomputes every one of them).
set -euo pipefail
export WSSS_BENCH_CACHE="${WSSS_BENCH_CACHE:-$PWD/.cache-cold}"
if [ -e "$WSSS_BENCH_CACHE" ] && [ -n "$(ls -A "$WSSS_BENCH_CACHE")" ]; then
  echo "WSSS_BENCH_CACHE=$WSSS_BENCH_CACHE is not empty: a cold run needs an empty cache" >&2
  exit 2
fi
OUT=runs/bench_cpu
TABLES="benchmarks/table1.toml benchmarks/table2.toml benchmarks/table3.toml benchmarks/fig4.toml"
mkdir -p "$OUT"
rm -f "$OUT/manifest-incremental.json"   # only an incremental re-run (results/README.md) writes one
# shellcheck disable=SC2086
WSSS_BENCH_NO_BARS=1 wsss-bench bench $TABLES --profile cpu --executor 'local[jobs=2]' --out "$OUT" \
  | tee "$OUT.log" || echo "bench: some cells failed (recorded in the tables)" >&2
grep ' stage ' "$OUT.log" > "$OUT/bench-stages.log" || true   # the stage lines, for benchmarks/bench_breakdown.py
cp "$OUT/manifest.json" "$OUT/manifest-cold.json"
# shellcheck disable=SC2086
wsss-bench bench $TABLES --profile cpu --executor 'local[jobs=2]' --out "$OUT"   # warm: nothing may train
bash results/cpu/collect.sh "$OUT"
