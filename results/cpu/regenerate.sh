#!/usr/bin/env bash
# results/cpu: the paper's Tables 1-3 and Fig. 4 on the cpu profile over the embedded phantoms,
# from an empty cache (a cold run), on this machine's CPU.  Run it from the root of a clean
# clone after the README's install (`. .venv/bin/activate` first); see results/README.md.
#
#   bash results/cpu/regenerate.sh          # about 2 h on 2 cores; writes results/cpu/
#
# The bench itself is the one command a user types; the rest copies its outputs here and
# renders the LaTeX / Markdown paper tables and the figures from the copied per-slice rows
# (results/check.py recomputes every one of them).
set -euo pipefail
export WSSS_BENCH_CACHE="${WSSS_BENCH_CACHE:-$PWD/.cache-cold}"
if [ -e "$WSSS_BENCH_CACHE" ] && [ -n "$(ls -A "$WSSS_BENCH_CACHE")" ]; then
  echo "WSSS_BENCH_CACHE=$WSSS_BENCH_CACHE is not empty: a cold run needs an empty cache" >&2
  exit 2
fi
OUT=runs/bench_cpu
wsss-bench bench benchmarks/table1.toml benchmarks/table2.toml benchmarks/table3.toml benchmarks/fig4.toml \
  --profile cpu --executor 'local[jobs=2]' --out "$OUT" || echo "bench: some cells failed (recorded in the tables)" >&2
bash results/cpu/collect.sh "$OUT"
