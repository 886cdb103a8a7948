"""Peak anonymous memory and wall time of the cluster_nodes step (ids, ok, identical-bytes heads).

Writes N samples by hand (10k-row parts, 3% of them carrying another sample's sha256, 1% failed), then
builds the node table in a child process per variant and samples its RssAnon from /proc every 20 ms
(memory maps are page cache, not counted):

- `memory`: tests/oracles.py read_nodes, the in-memory builder this replaced (every id, prefix and
  candidate string concatenated in RAM, all prefixes argsorted at once);
- `budget=SIZE`: dedup.stages.cluster.build_nodes with that budget (the bucket count follows from it).

    PYTHONPATH=$PWD python benchmarks/bench_cluster_nodes.py --samples 5000000 --data /tmp/bench_nodes \
        --variants memory,budget=8GB,budget=256MB

The heads of every variant are compared with the first one's. The data stays in --data (delete it yourself).

Measured 2026-12-01 on the shared 2-core machine, 6M samples in 600 parts (339,841 candidates), child
RssAnon peak (imports alone: 0.055 GiB) and build seconds: in-memory 0.56 GiB, 13.4 s; budget 8GB (1 bucket,
held in memory) 0.78 GiB, 10.6 s; 256MB (8 buckets) 0.15 GiB, 9.8 s; 64MB (32 buckets) 0.11 GiB, 12.2 s;
heads equal in all. At 2M samples the 64MB build peaked at 0.11 GiB too: it does not grow with the samples.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from anon_memory import communicate_sampled

SHARD_ROWS = 10_000

CHILD = """
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "tests")
import dedup.stages.cluster as c
from dedup.records import RunDir
from dedup.settings import parse_size
run, variant, out = RunDir(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
began = time.perf_counter()
if variant == "memory":
    import oracles
    head, stats = oracles.read_nodes(run).head, {}
else:
    nodes, stats = c.build_nodes(run, out, parse_size(variant.split("=", 1)[1]))
    head = nodes.head
np.save(out / "head_check.npy", np.asarray(head))
print(variant, stats, "SECONDS", round(time.perf_counter() - began, 1))
"""


def write_samples(root: Path, n: int, seed: int = 0) -> None:
    from dedup.records import SAMPLES, make_sample_id

    rng = np.random.default_rng(seed)
    source = np.arange(n)
    copies = rng.choice(n, n * 3 // 100, replace=False)
    source[copies] = rng.integers(0, n, len(copies))  # 3% carry another sample's bytes
    (root / "samples").mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, n, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n - start)
        columns = {name: pa.nulls(rows, type=SAMPLES.field(name).type) for name in SAMPLES.names}
        columns["sample_id"] = pa.array(make_sample_id(shard, 0) + np.arange(rows), pa.int64())
        columns["sha256"] = pa.array([hashlib.sha256(b"%d" % s).hexdigest() for s in source[start : start + rows]])
        columns["status"] = pa.array(np.where(rng.random(rows) < 0.01, "decode_error", "ok"))
        pq.write_table(pa.table(columns, schema=SAMPLES), root / "samples" / f"samples_{shard}.parquet")


def measure(tree: Path, data: Path, variant: str, out: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RssAnon GiB, child stdout) of one variant."""
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data), variant, str(out)],
                             env={"PYTHONPATH": str(tree), "PATH": "/usr/bin"}, cwd=tree, stdout=subprocess.PIPE, text=True)
    stdout, peak = communicate_sampled(child)
    if child.returncode:
        raise SystemExit(f"{variant}: failed ({child.returncode})")
    return time.perf_counter() - began, peak / 2**30, stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2_000_000)
    parser.add_argument("--data", type=Path, default=Path("/tmp/bench_nodes"))
    parser.add_argument("--variants", default="memory,budget=8GB,budget=256MB")
    args = parser.parse_args()
    if not (args.data / "samples").exists():
        began = time.perf_counter()
        write_samples(args.data, args.samples)
        print(f"wrote {args.samples:,} samples in {time.perf_counter() - began:.0f} s")
    tree, first = Path.cwd(), None
    for i, variant in enumerate(args.variants.split(",")):
        out = args.data / f"nodes_{i}"
        seconds, peak, stdout = measure(tree, args.data, variant, out)
        head = np.load(out / "head_check.npy", mmap_mode="r")
        first = head if first is None else first
        print(f"{variant}: wall {seconds:.1f} s, peak RssAnon {peak:.2f} GiB, heads equal: {np.array_equal(head, first)}\n"
              f"  {stdout}")


if __name__ == "__main__":
    main()
