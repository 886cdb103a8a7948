"""Peak anonymous memory and wall time of the cluster stage on a synthetic run with many edges.

Writes a run by hand (samples parts, float16 vectors, neighbour edge parts with the records
schemas), then runs the cluster stage of one or more source trees in a subprocess each and samples
the child's RssAnon (anonymous memory: the float16 memory maps are page cache, not counted) from
/proc every 20 ms.

    PYTHONPATH=$PWD python benchmarks/bench_cluster_memory.py --nodes 1000000 --edges 60000000 \
        --trees /work/main,$PWD --data /tmp/bench_cluster

Clusters are planted: nodes fall into groups of 100-200 copies (all pairs are edges, cosine ~0.9),
plus a few unrelated cross edges that the chaining guard has to cut, 3% identical bytes and 1%
failed samples. The data is kept in --data (delete it yourself) so both trees read the same run.

Measured 2026-12-01 on the 2-core machine (shared with other jobs, so wall times are noisy), 1M samples,
58.85M edges in 30 parts, 128-d float16: main (4243e97) peak RssAnon 6.09 GiB, 37 s CPU, 123 s wall;
streamed cluster stage 0.48 GiB, 47 s CPU, 169 s wall; clusters.parquet identical.
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
EDGES_PER_PART = 2_000_000
DESCRIPTOR = "clip"


def _sample_part(shard: int, rows: int, sha: np.ndarray, status: np.ndarray) -> pa.Table:
    from dedup.records import SAMPLES, make_sample_id

    positions = np.arange(rows)
    columns = {name: pa.nulls(rows, type=SAMPLES.field(name).type) for name in SAMPLES.names}
    columns |= {
        "sample_id": pa.array(make_sample_id(shard, 0) + positions, pa.int64()),
        "shard_index": pa.array(np.full(rows, shard, np.int32)),
        "shard": pa.array([f"s3://bucket/laion/{shard:05d}.tar"] * rows),
        "key": pa.array([f"{shard:05d}{p:04d}" for p in positions]),
        "url": pa.array([f"https://images.example.com/photos/{shard}/{p}/picture-of-something.jpg" for p in positions]),
        "caption": pa.array([f"a photo of thing number {p} in shard {shard}, high resolution stock image" for p in positions]),
        "sha256": pa.array(list(sha)), "status": pa.array(list(status)),
    }
    return pa.table(columns, schema=SAMPLES)


def _planted_groups(rng, n: int, edges: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Group of each node (-1 = singleton) and the node lists of the groups, until the edge budget is spent."""
    order = rng.permutation(n)
    group = np.full(n, -1, np.int64)
    members, start, spent = [], 0, 0
    while spent < edges and start < n:
        size = int(rng.integers(100, 201))
        nodes = np.sort(order[start : start + size])
        group[nodes] = len(members)
        members.append(nodes)
        start, spent = start + size, spent + size * (size - 1) // 2
    return group, members


def _edge_stream(rng, members: list[np.ndarray], n: int, cross: int):
    """(a, b) chunks of every within-group pair, then the unrelated cross edges."""
    for nodes in members:
        i, j = np.triu_indices(len(nodes), 1)
        yield nodes[i], nodes[j]
    a, b = rng.integers(0, n, cross), rng.integers(0, n, cross)
    yield np.minimum(a, b)[a != b], np.maximum(a, b)[a != b]


def _write_edges(run, node_ids: np.ndarray, stream) -> int:
    from dedup.records import EDGES

    folder = run.neighbors_dir(DESCRIPTOR)
    folder.mkdir(parents=True, exist_ok=True)
    buffer_a, buffer_b, held, part, total = [], [], 0, 0, 0

    def flush():
        nonlocal buffer_a, buffer_b, held, part
        a, b = np.concatenate(buffer_a), np.concatenate(buffer_b)
        rows = len(a)
        table = pa.table({"id_a": node_ids[a], "id_b": node_ids[b], "key_a": pa.nulls(rows, pa.string()),
                          "key_b": pa.nulls(rows, pa.string()), "similarity": np.full(rows, 0.9, np.float32),
                          "descriptor": pa.nulls(rows, pa.string())}, schema=EDGES)
        pq.write_table(table, folder / f"part_{part}.parquet")
        buffer_a, buffer_b, held, part = [], [], 0, part + 1

    for a, b in stream:
        buffer_a.append(a)
        buffer_b.append(b)
        held, total = held + len(a), total + len(a)
        if held >= EDGES_PER_PART:
            flush()
    if held:
        flush()
    return total


def _write_vectors(run, rng, group: np.ndarray, n_groups: int, dim: int, node_ids: np.ndarray) -> None:
    from dedup.records import EMBEDDING_METADATA

    centres = rng.standard_normal((n_groups, dim)).astype(np.float32)
    for shard, start in enumerate(range(0, len(group), SHARD_ROWS)):
        g = group[start : start + SHARD_ROWS]
        vectors = rng.standard_normal((len(g), dim)).astype(np.float32) * np.where(g >= 0, 0.35, 1.0)[:, None]
        vectors[g >= 0] += centres[g[g >= 0]]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        path = run.embedding_part(DESCRIPTOR, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors.astype(np.float16))
        ids = node_ids[start : start + len(g)]
        meta = {"sample_id": ids, "key": pa.nulls(len(g), pa.string()), "url": pa.nulls(len(g), pa.string()),
                "caption": pa.nulls(len(g), pa.string()), "shard_index": np.full(len(g), shard, np.int32)}
        run.metadata_part(DESCRIPTOR, shard).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(meta, schema=EMBEDDING_METADATA), run.metadata_part(DESCRIPTOR, shard))


def _write_samples(run, rng, n: int, group: np.ndarray) -> None:
    sha = np.array([hashlib.sha256(b"%d" % i).hexdigest() for i in range(n)], dtype=object)
    grouped = np.flatnonzero(group >= 0)
    first = np.full(group.max() + 1, n)
    np.minimum.at(first, group[grouped], grouped)
    copies = rng.choice(grouped, len(grouped) * 3 // 100, replace=False)
    sha[copies] = sha[first[group[copies]]]  # 3% carry the bytes of their group's first node
    status = np.where(rng.random(n) < 0.01, "decode_error", "ok").astype(object)
    (run.root / "samples").mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, n, SHARD_ROWS)):
        stop = min(start + SHARD_ROWS, n)
        pq.write_table(_sample_part(shard, stop - start, sha[start:stop], status[start:stop]), run.samples_part(shard))


def make_run(root: Path, n: int, edges: int, dim: int, seed: int = 0) -> int:
    from dedup.records import RunDir, make_sample_id

    run = RunDir(root)
    rng = np.random.default_rng(seed)
    node_ids = np.array([make_sample_id(i // SHARD_ROWS, i % SHARD_ROWS) for i in range(n)], dtype=np.int64)
    group, members = _planted_groups(rng, n, edges)
    _write_samples(run, rng, n, group)
    _write_vectors(run, rng, group, len(members), dim, node_ids)
    return _write_edges(run, node_ids, _edge_stream(rng, members, n, cross=len(members) // 2))


# The child: the cluster stage of one tree (main's code returns a frame, the streamed one writes itself).
CHILD = """
import resource, sys, time
from dedup.records import CLUSTERS, RunDir, write_record
import dedup.stages.cluster as c
run = RunDir(sys.argv[1])
args = (["clip"], {"clip": 0.5}, {"clip": 0.5})
memory = int(sys.argv[2]) if len(sys.argv) > 2 else None
began = time.perf_counter()
if hasattr(c, "node_state") and memory:
    stats = c.write_clusters(run, *args, memory_bytes=memory)
elif hasattr(c, "write_clusters"):
    stats = c.write_clusters(run, *args)
else:
    frame, stats = c.cluster_run(run, *args)
    write_record(frame, run.clusters, CLUSTERS)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
usage = resource.getrusage(resource.RUSAGE_SELF)
print("TREE", c.__file__, "STATS", stats, "SECONDS", round(time.perf_counter() - began, 1), "CPU", round(usage.ru_utime + usage.ru_stime, 1),
      "VmHWM", status["VmHWM"].strip())
"""


def measure(tree: str, root: Path, memory: int | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RssAnon GiB, child stdout) of the cluster stage of `tree` (with a budget where it takes one)."""
    began = time.perf_counter()
    # cwd=tree as well: `python -c` puts the working directory before PYTHONPATH on sys.path.
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), *([str(memory)] if memory else [])], env={"PYTHONPATH": tree, "PATH": "/usr/bin"},
                             cwd=tree, stdout=subprocess.PIPE, text=True)
    out, peak = communicate_sampled(child)
    if child.returncode:
        raise SystemExit(f"{tree}: the cluster stage failed ({child.returncode})")
    return time.perf_counter() - began, peak / 2**30, out.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--edges", type=int, default=60_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--data", type=Path, default=Path("/tmp/bench_cluster"))
    parser.add_argument("--trees", default=".", help="comma-separated source trees to measure (PYTHONPATH of the child)")
    parser.add_argument("--memory", default=None, help="--memory of the stage, e.g. 256MB (trees that take one)")
    args = parser.parse_args()
    from dedup.settings import parse_size

    memory = parse_size(args.memory) if args.memory else None
    if not (args.data / "samples").exists():
        began = time.perf_counter()
        written = make_run(args.data, args.nodes, args.edges, args.dim)
        print(f"wrote {args.nodes:,} samples and {written:,} edges in {time.perf_counter() - began:.0f} s")
    for tree in args.trees.split(","):
        seconds, peak, out = measure(str(Path(tree).resolve()), args.data, memory)
        digest = _clusters_digest(args.data)
        print(f"{tree}: wall {seconds:.1f} s, peak RssAnon {peak:.2f} GiB, clusters digest {digest}\n  {out}")


def _clusters_digest(root: Path) -> str:
    """A digest of clusters.parquet's rows, so that the trees' outputs can be compared line by line."""
    import pandas as pd

    frame = pd.read_parquet(root / "clusters.parquet")
    return f"{int(pd.util.hash_pandas_object(frame, index=False).sum()) & (2**64 - 1):016x}"


if __name__ == "__main__":
    main()
