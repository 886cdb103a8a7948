#!/usr/bin/env bash
# Venv size and install time of the base install and of each heavy extra (README, "Install").
#   bash benchmarks/install_size.sh [base clip ray]
# Each row: a fresh venv under /tmp, `pip install` of a copy of this checkout with an empty pip
# cache (cold), then the same again with that cache (warm). Venvs and caches are deleted afterwards.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(mktemp -d /tmp/dedup-src.XXXX)
tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=demo_out -cf - . | tar -xf - -C "$SRC"

install_once() {  # label spec cache
  local venv=/tmp/venv-install-size-$1
  rm -rf "$venv"
  python3 -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1
  local started=$(date +%s.%N)
  PIP_CACHE_DIR=$3 "$venv/bin/python" -m pip install -q "$2" >/dev/null 2>&1
  local rc=$? seconds=$(echo "$(date +%s.%N) - $started" | bc)
  local torch=$("$venv/bin/python" -c "import importlib.util as u; print(bool(u.find_spec('torch')))")
  printf '%-5s %-4s rc=%s seconds=%.0f bytes=%s torch=%s\n' "$1" "$4" "$rc" "$seconds" "$(du -sb "$venv" | cut -f1)" "$torch"
  rm -rf "$venv"
}

[ $# -eq 0 ] && set -- base clip ray
for name in "$@"; do
  spec=$SRC; [ "$name" != base ] && spec="$SRC[$name]"
  cache=$(mktemp -d /tmp/pip-cache-install-size.XXXX)
  install_once "$name" "$spec" "$cache" cold
  install_once "$name" "$spec" "$cache" warm
  rm -rf "$cache"
done
rm -rf "$SRC"
