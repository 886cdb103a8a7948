#!/usr/bin/env bash
# One short GPU check for a session that is lent a GPU machine (device tool): run it there as
#   bash benchmarks/gpu_check.sh
# It installs dedup into a venv on that machine, runs the tests marked `gpu`, then the CLIP embed
# benchmark on CUDA (ViT-B-32, random weights): bare decode vs bare model vs pipeline (target >= 0.85).
# faiss-gpu is not installed by this script: the index/search GPU path needs it in place of faiss-cpu
# (pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12; same `faiss` module, so no extra can add it).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv /tmp/gpu-venv
/tmp/gpu-venv/bin/pip install -q -e '.[dev,clip]'
/tmp/gpu-venv/bin/python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
/tmp/gpu-venv/bin/python -m pytest -q -m gpu
/tmp/gpu-venv/bin/python benchmarks/bench_embed.py --descriptor clip --device cuda --n 4000 --batch-size 256 --workers 8
