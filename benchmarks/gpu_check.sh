#!/usr/bin/env bash
# The one GPU check (issue 14): GPU tests + benchmarks/bench_gpu_embed.py, figures into one folder.
#
# Runs on a bare GPU machine with no network and no pip install, in under 5 minutes:
# it puts this checkout and a folder of carried wheels on PYTHONPATH (unzipped with the
# standard library: no pip), builds its own shards from the demo photos replicated to
# 50,000 samples, runs the tests marked `gpu`, then the benchmark.
#
# Prepare the wheel folder once, on a machine with a package index (pure-Python wheels,
# plus wcwidth's abi3 one; ~5 MB; faiss is not needed: only the embed stage runs):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 braceexpand==0.1.7 webdataset==1.0.2 timm==1.0.31
# (`*.whl` is git-ignored: pass `.whl` in the device tool's `carry`.)
#
# Run it there (device tool, from the repository root; figures come back from $OUT):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# A rerun on the same warm machine reuses the shards (/tmp) and skips their build.
# Check its CPU parts anywhere (small, tiny model, same code paths):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_N=300 GPU_CHECK_PER_SHARD=100 GPU_CHECK_MODEL=small224 \
#   GPU_CHECK_BATCH=32 GPU_CHECK_READERS=2 GPU_CHECK_PYTHON=/work/venv/bin/python bash benchmarks/gpu_check.sh
#
# Writes to ${OUT:-benchmarks/results/gpu_check}: env.txt, gpu_tests.log, bench.log, bench_gpu_embed.json.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${GPU_CHECK_PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
N=${GPU_CHECK_N:-50000}
PER_SHARD=${GPU_CHECK_PER_SHARD:-1000}
MODEL=${GPU_CHECK_MODEL:-ViT-B-32}
BATCH=${GPU_CHECK_BATCH:-256}
READERS=${GPU_CHECK_READERS:-$(nproc)}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
FIGS=${OUT:-$REPO/benchmarks/results/gpu_check}
SHARDS=${GPU_CHECK_SHARDS:-/tmp/gpu_check_shards_${N}_${PER_SHARD}}  # kept: a rerun on a warm machine reuses them
mkdir -p "$FIGS"

# Carried wheels -> one site folder (a wheel is a zip of its import tree; no pip needed).
SITE=/tmp/gpu_check_site
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: relying on installed packages" >&2
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

{
  echo "date: $(date -u +%FT%TZ)"; echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "device: $DEVICE  samples: $N  per shard: $PER_SHARD  model: $MODEL  batch: $BATCH  readers: $READERS"
  "$PY" -c "import sys, torch, torchvision, open_clip; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; fi
  echo "cpus: $(nproc)"
} 2>&1 | tee "$FIGS/env.txt"

# GPU tests (skipped on a CPU-only machine: the marker's skip is the check there).
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
  set +e
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
      tests/test_gpu_decode.py tests/test_gpu_embed.py tests/test_clip.py 2>&1 | tee "$FIGS/gpu_tests.log"
  echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$FIGS/gpu_tests.log"
  set -e
fi

# The benchmark: shards built (or reused), then model / decode / readers / pipeline on the same shards.
EXTRA=()
[ "$DEVICE" = cpu ] || EXTRA=(--cuda-graphs --precisions fp16,bf16 --model-batch-sizes 128,256,512,1024)
timeout 270 "$PY" benchmarks/bench_gpu_embed.py --device "$DEVICE" --model "$MODEL" --n "$N" \
    --per-shard "$PER_SHARD" --batch-size "$BATCH" --readers "$READERS" --shards "$SHARDS" \
    --out "$FIGS" "${EXTRA[@]}" 2>&1 | tee "$FIGS/bench.log"
echo "figures in $FIGS"
