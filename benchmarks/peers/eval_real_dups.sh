#!/usr/bin/env bash
# One command: set up the peers venv, run all four peer tools on the real-dups photos, score them.
# usage: bash benchmarks/peers/eval_real_dups.sh [OUTDIR]   (default benchmarks/_work/peers_real_dups)
# Writes OUTDIR/images/ (RGB JPEGs), OUTDIR/peers.jsonl, OUTDIR/pairs_<tool>.parquet,
# OUTDIR/as_labelled.jsonl and OUTDIR/corrected.jsonl (scores), and prints a markdown table.
set -euo pipefail

PEERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH_DIR="$(dirname "$PEERS_DIR")"
OUTDIR="${1:-$BENCH_DIR/_work/peers_real_dups}"
SRC="${REAL_DUPS:-$(dirname "$(dirname "$BENCH_DIR")")/shared/data/real-dups}"
PY="$BENCH_DIR/.venv-peers/bin/python"

if [ ! -f "$SRC/groups.csv" ]; then
  echo "eval_real_dups.sh: $SRC/groups.csv not found; set REAL_DUPS=/path/to/shared/data/real-dups" >&2
  exit 1
fi
bash "$PEERS_DIR/setup.sh"
rm -rf "$OUTDIR/images"
"$PY" "$PEERS_DIR/real_dups.py" prepare --src "$SRC" --out "$OUTDIR/images" 2>/dev/null
bash "$PEERS_DIR/run_all.sh" "$OUTDIR/images" "$OUTDIR"

pairs=("$OUTDIR"/pairs_*.parquet)
"$PY" "$PEERS_DIR/real_dups.py" score --src "$SRC" --pairs "${pairs[@]}" --out "$OUTDIR/as_labelled.jsonl" >/dev/null
# Two labels in groups.csv contradict the pixels (see README.md, "Ground-truth notes"):
# the JImageHash highQuality*.png edits are the forest photo, and mismatch-3.jpg is a re-encode of the
# orientation set's match-r0-f0.jpg (mean absolute pixel difference 3.9 of 255).
"$PY" "$PEERS_DIR/real_dups.py" score --src "$SRC" --pairs "${pairs[@]}" --out "$OUTDIR/corrected.jsonl" \
  --merge "JImageHash:highQuality_png=forest" \
  --merge "negative:jenssegers-imagehash__tests__images__orientation__mismatch-3.jpg=jenssegers:orientation" \
  >/dev/null
"$PY" "$PEERS_DIR/real_dups.py" table --runs "$OUTDIR/peers.jsonl" \
  --scores "$OUTDIR/as_labelled.jsonl" "$OUTDIR/corrected.jsonl"
