"""Planted-pair recall and wall time of `dedup run --embeddings` at the default nprobe and at `--nprobe N`.

    python benchmarks/bench_nprobe.py --parts 10 --rows 20000 --dim 128 --nprobe 16

The data is bench_incremental.py's: isotropic unit rows (no cell structure: IVF's hardest case) with
50 copies per part of rows of the part before it. Each setting runs the CLI on a fresh OUT.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_incremental as data

from dedup.records import RunDir
from dedup.search.index_choice import IndexSpec


def _run(source: Path, out: Path, memory: str, nprobe: int | None) -> float:
    command = [sys.executable, "-m", "dedup.cli", "run", "--embeddings", str(source), "--out", str(out),
               "--no-progress", "--no-report", "--memory", memory, *(["--nprobe", str(nprobe)] if nprobe else [])]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--memory", default="4GB")
    parser.add_argument("--nprobe", type=int, default=16)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-nprobe-"))
    try:
        for p, rows in enumerate(data._parts(args.parts, args.rows, args.dim)):
            data._write_part(root / "emb", p, rows)
        for nprobe in (None, args.nprobe):
            out = root / f"out-{nprobe}"
            wall = _run(root / "emb", out, args.memory, nprobe)
            truth, found = data._planted(out, args.parts, args.rows), data._edges(out)
            spec = IndexSpec.from_json((RunDir(out).index_dir / "precomputed.json").read_text())
            print(f"nprobe {spec.nprobe:3d} ({spec.factory}): planted pairs found {len(truth & found)} of "
                  f"{len(truth)}, edges {len(found)}, wall {wall:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
