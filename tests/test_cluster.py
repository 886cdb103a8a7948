"""The cluster stage over a run directory built by hand: failed samples stay alone, identical bytes stay together."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from oracles import drop_separated_edges, exact_heads, guarded_clusters

from dedup.records import METADATA_SCHEMA, SAMPLES_SCHEMA, RunDir, make_sample_id, write_array, write_table
from dedup.stages.cluster import cluster_run
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


# --- the streamed stage equals the in-memory clustering -----------------------------------------


def test_streamed_guard_with_identical_bytes_equals_the_in_memory_one():
    """Random graph, ~19k identical-bytes groups, edges in uneven parts: labels, representatives, passes equal."""
    from dedup.stages.cluster import guarded_clusters_streamed

    rng = np.random.default_rng(11)
    n = 20_000
    group = rng.integers(0, 15_000, n)
    first = np.full(15_000, n)
    np.minimum.at(first, group, np.arange(n))
    head = first[group]
    a, b = rng.integers(0, n, 30_000), rng.integers(0, n, 30_000)

    def margin(reps, members):
        return ((reps * 7919 + members * 104_729) % 101 / 101.0) - 0.5

    pieces = np.split(rng.permutation(len(a)), [3_000, 3_001, 17_000, 29_000])
    streamed = guarded_clusters_streamed(head, lambda: ((a[p], b[p]) for p in pieces), margin)
    in_memory = guarded_clusters(head, a, b, margin)
    assert np.array_equal(streamed.labels, in_memory.labels)
    assert np.array_equal(streamed.is_representative, in_memory.is_representative)
    assert streamed.passes == in_memory.passes >= 2


def write_edge_parts(run: RunDir, name: str, vectors: np.ndarray, edges: np.ndarray, n_parts: int) -> None:
    """Vectors of samples 0..n-1 of shard 0, and the edges (positions) in `n_parts` neighbour files."""
    write_descriptor(run, name, vectors, [(0, 1)])
    ids = np.array([make_sample_id(0, i) for i in range(len(vectors))], dtype=np.int64)
    a, b = edges.min(axis=1), edges.max(axis=1)
    sims = np.einsum("ij,ij->i", vectors[a], vectors[b]).astype(np.float32)
    for part, rows in enumerate(np.array_split(np.arange(len(a)), n_parts)):
        frame = pd.DataFrame({"id_a": ids[a[rows]], "id_b": ids[b[rows]], "similarity": sims[rows]})
        write_table(frame, run.neighbors_dir(name) / f"part_{part}.parquet")


def in_memory_clusters(run: RunDir, descriptors, thresholds, guards) -> pd.DataFrame:
    """The oracle: every sample in one frame, every edge in one array, heads by pandas factorize (main's design)."""
    from dedup.records import iter_edge_parts, load_samples
    from dedup.stages.cluster import _explain, _Nodes, _views

    samples = load_samples(run).sort_values("sample_id", ignore_index=True)
    ids, ok = samples["sample_id"].to_numpy(), (samples["status"] == "ok").to_numpy()
    sha = np.where(samples["sha256"].isna() | ~ok, None, samples["sha256"].to_numpy(dtype=object))
    head = exact_heads(sha)
    parts = [(np.searchsorted(ids, x), np.searchsorted(ids, y)) for d in descriptors
             for x, y in iter_edge_parts(run, d, thresholds[d])]
    a = np.concatenate([np.empty(0, np.int64)] + [p[0] for p in parts])
    b = np.concatenate([np.empty(0, np.int64)] + [p[1] for p in parts])
    a, b = drop_separated_edges(run, ids, a[ok[a] & ok[b]], b[ok[a] & ok[b]])
    nodes = _Nodes(ids, ok, head, pd.notna(sha).astype(bool))
    views = _views(run, ids, descriptors, guards)
    from dedup.stages.cluster import _best_match

    result = guarded_clusters(head, a, b, lambda r, m: _best_match(views, nodes, r, m)[0])
    similarity, matched_by = _explain(views, nodes, result.labels, result.is_representative)
    return samples.assign(cluster_id=ids[result.labels], cluster_size=result.sizes(),
                          is_representative=result.is_representative, similarity_to_representative=similarity,
                          matched_by=matched_by.astype(str))


@pytest.mark.parametrize("memory_bytes", [None, 100_000])
def test_stage_equals_the_in_memory_oracle_with_bytes_failures_overrides_and_parts(memory_bytes, tmp_path, monkeypatch):
    """Also with a budget too small for the O(nodes) arrays: memory maps, guard steps 64 nodes at a time."""
    import dedup.stages.cluster as stage
    from dedup.stages.overrides import _row, add_override

    monkeypatch.setattr(stage, "MIN_BLOCK_NODES", 64)
    rng = np.random.default_rng(5)
    run = RunDir(tmp_path)
    n = 1_500
    centres = rng.standard_normal((60, 16))
    vectors = centres[rng.integers(0, 60, n)] + 0.6 * rng.standard_normal((n, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    byte_group = rng.integers(0, 1_300, n)  # ~190 groups of identical bytes, most without an edge between them
    status = np.where(rng.random(n) < 0.05, "decode_error", "ok")
    rows = [{"key": f"{i:09d}", "status": status[i], "sha256": sha(b"%d" % byte_group[i]) if i % 17 else None}
            for i in range(n)]
    write_samples(run, rows)
    sims = vectors @ vectors.T
    edges = np.argwhere(np.triu(sims >= 0.6, 1))
    edges = np.concatenate([edges, rng.integers(0, n, (200, 2))])  # unrelated edges for the guard to cut
    edges = edges[edges[:, 0] != edges[:, 1]]
    write_edge_parts(run, "clip", vectors, edges, n_parts=9)
    pair = [make_sample_id(0, int(i)) for i in edges[0]]
    add_override(run, _row("not_duplicate_pair", None, sample_id_a=pair[0], sample_id_b=pair[1]))
    args = (["clip"], {"clip": 0.6}, {"clip": 0.65})
    reads = []
    part = stage._EdgeSource.part
    monkeypatch.setattr(stage._EdgeSource, "part", lambda self, *where: reads.append(where) or part(self, *where))
    made = []
    allocator = stage._memmap_allocator
    monkeypatch.setattr(stage, "_memmap_allocator", lambda folder: made.append(folder) or allocator(folder))
    clusters, stats = cluster_run(run, *args, memory_bytes=memory_bytes)
    assert len(made) == (memory_bytes is not None)  # the small budget put the state on disk
    expected = in_memory_clusters(run, *args)
    assert stats["guard_passes"] >= 3 and stats["clusters_with_copies"] > 10
    assert len(reads) == 2 * 9  # the first pass, then the second writes what can still cluster for the later ones
    assert (clusters["matched_by"] == "sha256").sum() > 20  # identical bytes took part
    pd.testing.assert_frame_equal(clusters, expected[clusters.columns.tolist()])


def test_prefix_collision_never_merges_different_bytes(tmp_path):
    """Two digests sharing their first 16 hex digits are candidates only: the full string decides."""
    from dedup.stages.cluster import prefix_keys, read_nodes

    run = RunDir(tmp_path)
    one, other = "0123456789abcdef" + "0" * 48, "0123456789abcdef" + "f" * 48
    rows = [{"key": f"{i:09d}", "status": "ok", "sha256": s} for i, s in enumerate([one, other, one, other, sha(b"x")])]
    write_samples(run, rows)
    keys = prefix_keys(pa.array([one, other, "0123", None, "ABCDEF0123456789"]))
    assert keys[0] == keys[1] == 0x0123456789ABCDEF and keys[2] == 0x0123 << 48 and keys[4] == 0xABCDEF0123456789
    nodes = read_nodes(run)
    assert nodes.head.tolist() == [0, 1, 0, 1, 4]
    clusters, _ = cluster_run(run, [], {}, {})
    assert clusters["cluster_id"].nunique() == 3 and clusters["cluster_size"].tolist() == [2, 2, 2, 2, 1]


def test_clusters_file_is_written_batch_by_batch_with_the_contract(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import dedup.stages.cluster as stage
    from dedup.records import CLUSTERS

    monkeypatch.setattr(stage, "BATCH_ROWS", 7)
    run = RunDir(tmp_path)
    write_samples(run, [{"key": f"{i:09d}", "status": "ok", "sha256": sha(b"%d" % (i % 4))} for i in range(30)])
    stats = stage.write_clusters(run, [], {}, {})
    handle = pq.ParquetFile(run.clusters)
    assert handle.schema_arrow == CLUSTERS and handle.metadata.num_row_groups == 5  # 30 rows in batches of 7
    frame = handle.read().to_pandas()
    assert frame["key"].tolist() == [f"{i:09d}" for i in range(30)] and stats["clusters_with_copies"] == 4
    assert (frame["cluster_size"] == frame.groupby("cluster_id")["key"].transform("size")).all()
    assert not list(tmp_path.glob("**/.*.tmp"))  # the temporary was renamed


def test_stage_working_set_does_not_grow_with_the_edges(tmp_path, monkeypatch):
    """48 edge parts of 12.5k edges each (9.6 MB as int64 pairs), read in two guard passes: the stage's
    traced peak stays far below the edges (it holds about one part, plus O(nodes) arrays)."""
    import tracemalloc

    import dedup.stages.cluster as stage

    rng = np.random.default_rng(2)
    run = RunDir(tmp_path)
    n, per_part, n_parts = 4_000, 12_500, 48
    half = np.arange(n) >= n // 2  # two unrelated families: the first pass detaches one of them
    vectors = np.where(half[:, None], [0.0, 1.0], [1.0, 0.0]) + 0.1 * rng.standard_normal((n, 2))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    write_samples(run, [{"key": f"{i:09d}", "status": "ok", "sha256": None} for i in range(n)])
    edges = rng.integers(0, n, (per_part * n_parts, 2))
    edges = edges[edges[:, 0] != edges[:, 1]]
    write_edge_parts(run, "clip", vectors, edges, n_parts=n_parts)
    budget = 200_000  # below n x NODE_STATE_BYTES: the O(nodes) arrays are memory maps in the run's scratch
    stage.write_clusters(run, ["clip"], {"clip": -1.0}, {"clip": 0.5})  # warm: imports are not the stage's memory
    tracemalloc.start()
    stats = stage.write_clusters(run, ["clip"], {"clip": -1.0}, {"clip": 0.5}, memory_bytes=budget)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total_edge_bytes = len(edges) * 2 * 8
    assert stats["edges"] == len(edges) and stats["guard_passes"] == 2 and stats["clusters_with_copies"] == 2
    assert peak < total_edge_bytes / 4, f"peak {peak / 2**20:.1f} MiB for {total_edge_bytes / 2**20:.1f} MiB of edges"
    assert not list((tmp_path / stage.SCRATCH).glob("state-*"))  # the memory maps went with the task


def hand_built_run(tmp_path, rng, n: int = 600, n_parts: int = 6) -> RunDir:
    """Samples with identical bytes and failures, clustered vectors and their edges in several parts."""
    run = RunDir(tmp_path)
    centres = rng.standard_normal((25, 16))
    vectors = centres[rng.integers(0, 25, n)] + 0.6 * rng.standard_normal((n, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    status = np.where(rng.random(n) < 0.05, "decode_error", "ok")
    byte_group = rng.integers(0, n - 60, n)
    write_samples(run, [{"key": f"{i:09d}", "status": status[i], "sha256": sha(b"%d" % byte_group[i])} for i in range(n)])
    edges = np.argwhere(np.triu(vectors @ vectors.T >= 0.6, 1))
    edges = np.concatenate([edges, rng.integers(0, n, (60, 2))])
    write_edge_parts(run, "clip", vectors, edges[edges[:, 0] != edges[:, 1]], n_parts=n_parts)
    return run


def cluster_context(root, engine: str):
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings

    settings = Settings(descriptors=["clip"], thresholds={"clip": 0.6}, guards={"clip": 0.65},
                        engine=EngineSettings(name=engine, show_progress=False))
    return Run(root, settings)


def test_edge_reduction_tasks_give_the_streamed_answer(tmp_path):
    """cluster_nodes + one cluster_edges task per part + the merging cluster task = the single streamed pass."""
    from dedup.stages.cluster import run_cluster_stages, write_clusters

    run = hand_built_run(tmp_path, np.random.default_rng(8))
    stats = write_clusters(run, ["clip"], {"clip": 0.6}, {"clip": 0.65})
    expected = pd.read_parquet(run.clusters)
    run.clusters.unlink()
    staged = run_cluster_stages(cluster_context(run.root, "local"))
    assert len(list((run.root / "_markers" / "cluster_edges").glob("*.done"))) == 6
    pd.testing.assert_frame_equal(pd.read_parquet(run.clusters), expected)
    assert staged == stats and stats["guard_passes"] >= 2


def test_cluster_stages_under_a_tiny_budget_give_the_in_memory_answer(tmp_path, monkeypatch):
    """--memory below the nodes' state: the cluster task's arrays are memory maps and its steps small blocks."""
    import dedup.stages.cluster as stage

    monkeypatch.setattr(stage, "MIN_BLOCK_NODES", 50)
    run = hand_built_run(tmp_path, np.random.default_rng(9))
    stats = stage.write_clusters(run, ["clip"], {"clip": 0.6}, {"clip": 0.65})
    expected = pd.read_parquet(run.clusters)
    run.clusters.unlink()
    context = cluster_context(run.root, "local")
    context.settings.memory_budget_bytes = 60_000
    assert stage.run_cluster_stages(context) == stats
    pd.testing.assert_frame_equal(pd.read_parquet(run.clusters), expected)


def test_lost_cluster_scratch_is_recomputed_not_a_traceback(tmp_path):
    """The scratch folder removed (disk cleanup, crash) after the nodes and edge markers, before the cluster task."""
    import shutil

    from dedup.stages import cluster as stage
    from dedup.stages.cluster import run_cluster_stages

    run = hand_built_run(tmp_path, np.random.default_rng(10))
    context = cluster_context(run.root, "local")
    stats = run_cluster_stages(context)
    expected = pd.read_parquet(run.clusters)
    markers = run.root / "_markers"
    # 1. all of the scratch and the last sub-stage's output gone.
    shutil.rmtree(run.root / stage.SCRATCH)
    (markers / "cluster" / "0.done").unlink()
    run.clusters.unlink()
    assert run_cluster_stages(context) == stats
    pd.testing.assert_frame_equal(pd.read_parquet(run.clusters), expected)
    assert (run.root / stage.SCRATCH / "nodes_head.npy").exists() and len(list((run.root / stage.SCRATCH).glob("edges_*.npy"))) == 6
    # 2. two edge summaries and one node array lost, clusters.parquet deleted under its marker.
    before = {p.name: p.stat().st_mtime_ns for p in (run.root / stage.SCRATCH).glob("edges_*.npy")}
    for name in ("edges_1.npy", "edges_4.npy", "nodes_known.npy"):
        (run.root / stage.SCRATCH / name).unlink()
    run.clusters.unlink()
    assert run_cluster_stages(context) == stats
    pd.testing.assert_frame_equal(pd.read_parquet(run.clusters), expected)
    after = {p.name: p.stat().st_mtime_ns for p in (run.root / stage.SCRATCH).glob("edges_*.npy")}
    assert sorted(after) == sorted(before)
    assert sorted(n for n in after if after[n] != before.get(n)) == ["edges_1.npy", "edges_4.npy"]  # only the lost redone
    # 3. the scratch gone after a finished run: nothing needs it, nothing reruns.
    shutil.rmtree(run.root / stage.SCRATCH)
    done = (markers / "cluster" / "0.done").stat().st_mtime_ns
    assert stage.forget_lost_outputs(context) == []
    run_cluster_stages(context)
    assert (markers / "cluster" / "0.done").stat().st_mtime_ns == done


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'dedup[ray]')")
def test_edge_reduction_on_ray_equals_the_local_engine(tmp_path):
    import shutil

    import ray

    from dedup.stages.cluster import run_cluster_stages

    local = hand_built_run(tmp_path / "local", np.random.default_rng(9))
    shutil.copytree(local.root, tmp_path / "ray")
    run_cluster_stages(cluster_context(local.root, "local"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stats = run_cluster_stages(cluster_context(tmp_path / "ray", "ray"))
    finally:
        ray.shutdown()
    marker = json.loads((tmp_path / "ray" / "_markers" / "cluster_edges" / "5.done").read_text())
    assert marker["fingerprint"] and stats["clusters_with_copies"] > 5
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ray" / "clusters.parquet"), pd.read_parquet(local.clusters))
