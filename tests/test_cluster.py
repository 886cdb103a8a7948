"""The cluster stage over a run directory built by hand: failed samples stay alone, identical bytes stay together."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa

from dedup.records import METADATA_SCHEMA, SAMPLES_SCHEMA, RunDir, make_sample_id, write_array, write_table
from dedup.stages.cluster import cluster_run, guarded_clusters
from dedup.stages.manifests import KeepPolicy, write_manifests


def write_samples(run: RunDir, rows: list[dict]) -> None:
    """One shard part holding `rows` (key, status, sha256 given; the rest filled in)."""
    full = []
    for position, row in enumerate(rows):
        full.append({name: None for name in SAMPLES_SCHEMA.names} | {
            "sample_id": make_sample_id(0, position), "shard_index": 0, "shard": "s/00000.tar",
            "width": 64, "height": 64, **row,
        })
    columns = {name: [r[name] for r in full] for name in SAMPLES_SCHEMA.names}
    write_table(pa.Table.from_pydict(columns, schema=SAMPLES_SCHEMA), run.samples_part(0))


def write_descriptor(run: RunDir, name: str, vectors: np.ndarray, edges: list[tuple[int, int]]) -> None:
    """Vectors of samples 0..n-1 of shard 0, and the neighbour edges between them (as positions)."""
    ids = np.array([make_sample_id(0, i) for i in range(len(vectors))], dtype=np.int64)
    write_array(vectors.astype(np.float32), run.embedding_part(name, 0))
    meta = {"sample_id": ids, "key": [f"{i:09d}" for i in range(len(ids))], "url": [None] * len(ids),
            "caption": [None] * len(ids), "shard_index": np.zeros(len(ids), dtype=np.int32)}
    write_table(pa.Table.from_pydict(meta, schema=METADATA_SCHEMA), run.metadata_part(name, 0))
    a, b = np.array([e[0] for e in edges]), np.array([e[1] for e in edges])
    sims = np.einsum("ij,ij->i", vectors[a], vectors[b]).astype(np.float32)
    frame = pd.DataFrame({"id_a": ids[np.minimum(a, b)], "id_b": ids[np.maximum(a, b)], "similarity": sims})
    write_table(frame, run.neighbors_dir(name) / "part_0.parquet")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_zero_byte_images_are_not_copies_of_each_other(tmp_path):
    run = RunDir(tmp_path)
    empty = sha(b"")
    rows = [{"key": f"{i:09d}", "status": "empty", "sha256": empty} for i in range(5)]
    rows += [{"key": f"{i:09d}", "status": "ok", "sha256": sha(b"photo")} for i in range(5, 8)]
    rows += [{"key": "000000008", "status": "decode_error", "sha256": sha(b"photo")}]  # same bytes, failed
    write_samples(run, rows)
    clusters, stats = cluster_run(run, [], {}, {})
    failed = clusters[clusters["status"] != "ok"]
    assert len(clusters) == 9 and len(failed) == 6  # every sample keeps its row and status
    assert (failed["cluster_size"] == 1).all() and failed["is_representative"].all()
    ok = clusters[clusters["status"] == "ok"]
    assert ok["cluster_id"].nunique() == 1 and (ok["cluster_size"] == 3).all()
    assert stats["clusters_with_copies"] == 1
    write_manifests(run, clusters.assign(width=64, height=64), KeepPolicy.parse("first"))
    removed = pd.read_parquet(run.remove_keys).set_index("key")["reason"]
    assert removed.loc[[f"{i:09d}" for i in range(5)]].eq("status:empty").all()
    assert removed.loc["000000008"] == "status:decode_error"
    assert removed.drop(index=[f"{i:09d}" for i in range(5)] + ["000000008"]).eq("duplicate").sum() == 2


def chain_vectors(n: int) -> np.ndarray:
    """v_i = (e_i + e_{i+1}) / sqrt 2: neighbours have cosine 0.5, all others 0."""
    vectors = np.zeros((n, n + 1), dtype=np.float32)
    vectors[np.arange(n), np.arange(n)] = vectors[np.arange(n), np.arange(n) + 1] = 1 / np.sqrt(2)
    return vectors


def test_identical_bytes_share_a_cluster_however_long_the_guard_takes(tmp_path):
    """A 40-node chain: each guard pass settles three nodes (the rep and its two neighbours), so the far end
    needs ~13 passes. Node 40 has the bytes of node 39 (the approximate search found no edge for it); the
    guard stopping early must not split them."""
    run = RunDir(tmp_path)
    n = 40
    vectors = np.concatenate([chain_vectors(n), chain_vectors(n)[-1:]])
    rows = [{"key": f"{i:09d}", "status": "ok", "sha256": sha(b"%d" % i)} for i in range(n)]
    rows.append({"key": "000000040", "status": "ok", "sha256": sha(b"%d" % (n - 1))})
    write_samples(run, rows)
    write_descriptor(run, "clip", vectors, [(i, i + 1) for i in range(n - 1)])
    clusters, _ = cluster_run(run, ["clip"], {"clip": 0.4}, {"clip": 0.4})
    by_key = clusters.set_index("key")
    assert by_key.loc["000000039", "cluster_id"] == by_key.loc["000000040", "cluster_id"]
    assert by_key.loc["000000040", "cluster_size"] >= 2
    # the guard still splits the chain: no cluster holds two nodes two steps apart
    chain = clusters.iloc[:n]
    for _, members in chain.groupby("cluster_id"):
        positions = members.index.to_numpy()
        assert positions.max() - positions.min() <= 2


def test_random_graph_never_splits_identical_bytes():
    """40k nodes, 19k groups of identical bytes, random near-duplicate edges and a guard that rejects half."""
    rng = np.random.default_rng(7)
    n = 40_000
    group = rng.integers(0, 30_000, n)  # ~19k groups with >= 2 members among 30k codes
    first = np.full(30_000, n)
    np.minimum.at(first, group, np.arange(n))
    head = first[group]
    a, b = rng.integers(0, n, 60_000), rng.integers(0, n, 60_000)

    def margin(reps, members):
        # a deterministic pseudo-random verdict per pair: about half the pairs fail the guard
        return ((reps * 7919 + members * 104_729) % 101 / 101.0) - 0.5

    result = guarded_clusters(head, a, b, margin)
    labels = result.labels
    assert np.array_equal(labels, labels[head])  # every member sits with its group's head
    assert (result.sizes() == np.bincount(labels, minlength=n)[labels]).all()
    assert result.is_representative.sum() == len(np.unique(labels))
    assert result.is_representative[labels].all()
