#!/usr/bin/env bash
# Copy a finished bench folder into results/cpu and render its tables and figures there.
#   bash results/cpu/collect.sh runs/bench_cpu
set -euo pipefail
OUT="${1:?usage: collect.sh BENCH_DIR}"
DEST=results/cpu
NEW="$DEST.new"
rm -rf "$NEW"; mkdir -p "$NEW/cells" "$NEW/latex"
cp "$OUT"/results.parquet "$OUT"/manifest.json "$OUT"/tables.md "$NEW"/
for f in manifest-cold.json manifest-incremental.json bench-stages.log; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$NEW"/; done  # the cold (and any incremental) run's record
cp "$OUT"/cells/*.json "$NEW/cells"/                     # per-cell manifests (stages, seeds, errors)
cp -r "$OUT"/predictions "$NEW"/
for t in table1 table2 table3; do
  wsss-bench report "$NEW" --format latex --table "$t" --with-paper --gate label -o "$NEW/latex/$t.tex"
  wsss-bench report "$NEW" --format markdown --table "$t" --with-paper --gate label -o "$NEW/$t.md"
done
wsss-bench report "$NEW" --format markdown --table seeds -o "$NEW/seeds.md"   # training-split pseudo-mask quality
wsss-bench report "$NEW" --format markdown --table quality -o "$NEW/quality.md"   # the models behind each row
wsss-bench figures "$NEW" --out "$NEW/figures" --format png
cp results/cpu/regenerate.sh results/cpu/collect.sh "$NEW"/
rm -rf "$DEST.old"; [ -d "$DEST" ] && mv "$DEST" "$DEST.old"; mv "$NEW" "$DEST"; rm -rf "$DEST.old"
echo "wrote $DEST"
