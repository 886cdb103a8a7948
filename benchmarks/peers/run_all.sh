#!/usr/bin/env bash
# Run every peer tool on one folder of images; one JSON line per tool goes to OUTDIR/peers.jsonl.
# usage: bash benchmarks/peers/run_all.sh DIR OUTDIR
#   OUTDIR/pairs_<tool>.parquet  pairs found (key_a < key_b)
#   OUTDIR/<tool>.log            what the tool printed
# A tool that fails is reported and the others still run; the script then exits 1.
set -uo pipefail

if [ "$#" -ne 2 ]; then
  echo "usage: $0 DIR OUTDIR" >&2
  exit 2
fi
IMAGES="$1"
OUTDIR="$2"
PEERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS_PYTHON="${PEERS_PYTHON:-$(dirname "$PEERS_DIR")/.venv-peers/bin/python}"
TOOLS="${PEER_TOOLS:-imagededup_phash pdq fastdup cleanvision}"

if [ ! -x "$PEERS_PYTHON" ]; then
  echo "run_all.sh: $PEERS_PYTHON not found; run: bash benchmarks/peers/setup.sh" >&2
  exit 1
fi
# fastdup: no Sentry telemetry, no PyPI version check (run_peer.py sets these too).
export SENTRY_OPT_OUT=1 FASTDUP_PRODUCTION=1

mkdir -p "$OUTDIR"
: > "$OUTDIR/peers.jsonl"
failed=()
for tool in $TOOLS; do
  echo "== $tool" >&2
  if line="$("$PEERS_PYTHON" "$PEERS_DIR/run_peer.py" --tool "$tool" --images "$IMAGES" \
        --out "$OUTDIR/pairs_$tool.parquet" 2>"$OUTDIR/$tool.log")"; then
    echo "$line" | tee -a "$OUTDIR/peers.jsonl"
  else
    echo "run_all.sh: $tool failed; last lines of $OUTDIR/$tool.log:" >&2
    tail -n 5 "$OUTDIR/$tool.log" >&2
    failed+=("$tool")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "run_all.sh: failed tools: ${failed[*]}" >&2
  exit 1
fi
