#!/usr/bin/env bash
# Create (or bring up to date) benchmarks/.venv-peers with the four peer tools. Safe to rerun.
# usage: bash benchmarks/peers/setup.sh
set -euo pipefail

PEERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$(dirname "$PEERS_DIR")/.venv-peers"
PYTHON="${PEERS_BASE_PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup.sh: $PYTHON is not Python 3.11; the pinned wheels (fastdup, imagededup) are cp311." >&2
  echo "  set PEERS_BASE_PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! command -v g++ >/dev/null; then
  # pdqhash publishes no cp311 wheel, so pip compiles its C++ sources.
  echo "setup.sh: g++ not found; pdqhash must be compiled. Install it: apt-get install -y g++" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet -r "$PEERS_DIR/requirements.txt"
"$VENV/bin/python" -m pip check

# Import every tool once, with fastdup's telemetry and version check off (see run_peer.py).
SENTRY_OPT_OUT=1 FASTDUP_PRODUCTION=1 "$VENV/bin/python" -c '
import importlib.metadata as md
from imagededup.methods import PHash
import pdqhash, fastdup, cleanvision, pandas, pyarrow, PIL
print("peers venv ready:", ", ".join(f"{d}=={md.version(d)}" for d in ("imagededup", "pdqhash", "fastdup", "cleanvision")))
' 2>/dev/null | tail -n 1
