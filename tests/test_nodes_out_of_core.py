"""The node table out of core (cluster stage and threshold guidance): the streamed, bucketed builder gives
exactly what the in-memory one gave (tests/oracles.py read_nodes / run_nodes), whatever the budget."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import oracles
import pandas as pd
import pyarrow as pa
import pytest

import dedup.stages.cluster as stage
from dedup.records import SAMPLES_SCHEMA, RunDir, make_sample_id, write_table
from dedup.stages import guidance
from dedup.stages.cluster import NODE_ARRAYS, build_nodes, read_nodes

TINY = 1  # bytes of budget: every bucket count is the largest (MAX_BUCKETS)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_part(run: RunDir, shard: int, rows: list[tuple[str | None, str | None]], order=None) -> None:
    """One samples part of (status, sha256) rows; `order` writes them in another order (a part read whole, sorted)."""
    order = range(len(rows)) if order is None else order
    columns = {name: [None] * len(rows) for name in SAMPLES_SCHEMA.names}
    columns["sample_id"] = [make_sample_id(shard, i) for i in order]
    columns["shard_index"] = [shard] * len(rows)
    columns["key"] = [f"{i:09d}" for i in order]
    columns["status"] = [rows[i][0] for i in order]
    columns["sha256"] = [rows[i][1] for i in order]
    write_table(pa.Table.from_pydict(columns, schema=SAMPLES_SCHEMA), run.samples_part(shard))


PREFIX = "0123456789abcdef"
TRICKY = [
    PREFIX + "0" * 48, PREFIX + "f" * 48,  # one 64-bit prefix, different bytes
    (PREFIX + "0" * 48).upper(),  # the same digits in upper case: another string, the same prefix
    "not a hex digest at all", "not a hex digest at all!", "zz", "", "0123",
    sha(b"a"), sha(b"b"), sha(b"c"),
]


def tricky_run(root) -> RunDir:
    """Three parts (one written out of order) whose repeated strings are spread across them, with null
    sha256s, failed statuses (some sharing an ok sample's bytes) and the strings of TRICKY."""
    run = RunDir(root)
    rng = np.random.default_rng(11)
    for shard, size in enumerate([40, 7, 55]):
        rows = []
        for _ in range(size):
            status = str(rng.choice(["ok", "ok", "ok", "decode_error", None]))
            rows.append((None if status == "None" else status, None if rng.random() < 0.1 else str(rng.choice(TRICKY))))
        write_part(run, shard, rows, order=rng.permutation(size) if shard == 1 else None)
    return run


def assert_same_nodes(got, expected) -> None:
    for name in NODE_ARRAYS:
        mine, theirs = np.asarray(getattr(got, name)), np.asarray(getattr(expected, name))
        assert mine.dtype == theirs.dtype, name
        np.testing.assert_array_equal(mine, theirs, err_msg=name)


@pytest.mark.parametrize("memory", [TINY, 4_000, 1 << 30])
def test_bucketed_builder_equals_the_in_memory_one(tmp_path, monkeypatch, memory):
    monkeypatch.setattr(stage, "BATCH_ROWS", 6)  # many batches a part
    monkeypatch.setattr(stage, "SPILL_ROWS", 10)  # many flushes into each bucket file
    monkeypatch.setattr(stage, "MERGE_ROWS", 2)  # the distinct strings merged many times
    run = tricky_run(tmp_path / "run")
    expected = oracles.read_nodes(run)
    got, stats = build_nodes(run, tmp_path / "nodes", memory)
    assert_same_nodes(got, expected)
    assert stats["samples"] == len(expected.ids) == 102
    assert stats["buckets"] == {TINY: stage.MAX_BUCKETS, 4_000: 16, 1 << 30: 1}[memory]
    assert (expected.head != np.arange(102)).sum() > 30  # groups did form, across parts
    assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == sorted(f"nodes_{n}.npy" for n in NODE_ARRAYS)


def test_written_files_are_byte_identical_to_the_old_npy_files(tmp_path):
    run = tricky_run(tmp_path / "run")
    expected = oracles.read_nodes(run)
    build_nodes(run, tmp_path / "nodes", TINY)
    for name in NODE_ARRAYS:
        old = io.BytesIO()
        np.save(old, getattr(expected, name))  # what save_nodes wrote
        assert (tmp_path / "nodes" / f"nodes_{name}.npy").read_bytes() == old.getvalue(), name


def test_prefix_collisions_case_and_status_decide_as_before(tmp_path):
    run = RunDir(tmp_path / "run")
    write_part(run, 0, [("ok", TRICKY[0]), ("ok", TRICKY[1]), ("ok", TRICKY[2]), ("decode_error", TRICKY[0])])
    write_part(run, 1, [("ok", TRICKY[1]), ("ok", None), ("ok", TRICKY[0]), ("ok", "")])
    write_part(run, 2, [("ok", ""), (None, TRICKY[2]), ("ok", TRICKY[2])])
    nodes, stats = build_nodes(run, tmp_path / "nodes", TINY)
    assert stats["buckets"] > 1
    # 0 and 6 share bytes; 1 and 4; 2 and 10 (upper case: not 0's); 3 failed, 5 unknown, 9 has no status.
    assert nodes.head.tolist() == [0, 1, 2, 3, 1, 5, 0, 7, 7, 9, 2]
    assert nodes.known.tolist() == [True, True, True, False, True, False, True, True, True, False, True]
    with guidance.run_nodes(run, TINY) as (_, head):  # any status counts there
        assert head.tolist() == [0, 1, 2, 0, 1, 5, 0, 7, 7, 2, 2]


def test_random_samples_in_many_parts_equal_the_oracle_with_and_without_status(tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "BATCH_ROWS", 64)
    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(4)
    pool = [sha(b"%d" % i) for i in range(300)] + [PREFIX + sha(b"%d" % i)[16:] for i in range(20)]
    for shard in range(6):
        size = int(rng.integers(0, 400))
        write_part(run, shard, [(str(rng.choice(["ok", "ok", "empty"])),
                                 None if rng.random() < 0.05 else str(rng.choice(pool))) for _ in range(size)])
    got, stats = build_nodes(run, tmp_path / "nodes", 20_000)
    assert stats["buckets"] > 8 and stats["candidates"] > 500
    assert_same_nodes(got, oracles.read_nodes(run))
    ids, (first, other) = oracles.run_nodes(run)
    with guidance.run_nodes(run, 20_000) as (mine, head):
        np.testing.assert_array_equal(mine, ids)
        pairs = [np.concatenate(x) for x in zip(*guidance.exact_joins(head, block_rows=100), strict=True)]
    np.testing.assert_array_equal(ids[pairs[0]], first)
    np.testing.assert_array_equal(ids[pairs[1]], other)
    assert not list(run.scratch_dir("report").iterdir())  # the guidance nodes are removed with the with


def test_read_nodes_keeps_its_in_memory_result_and_leaves_no_scratch(tmp_path):
    run = tricky_run(tmp_path / "run")
    nodes = read_nodes(run, memory_bytes=TINY)
    assert all(type(getattr(nodes, name)) is np.ndarray for name in NODE_ARRAYS)  # not maps of removed files
    assert_same_nodes(nodes, oracles.read_nodes(run))
    assert not list((run.root / stage.SCRATCH).iterdir())


def test_a_failed_build_publishes_nothing_and_removes_its_buckets(tmp_path, monkeypatch):
    run = tricky_run(tmp_path / "run")
    folder = tmp_path / "nodes"
    build_nodes(run, folder, TINY)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(table, head):
        raise OSError("disk gone")

    monkeypatch.setattr(stage, "_bucket_heads", broken)
    with pytest.raises(Exception, match="disk gone"):
        build_nodes(run, folder, TINY)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary, no bucket, old files kept


def test_nodes_stage_streams_progress_and_reports_its_buckets(tmp_path, monkeypatch):
    from dedup.run import Run
    from dedup.settings import Settings

    monkeypatch.setattr(stage, "BATCH_ROWS", 8)
    tricky_run(tmp_path / "run")
    run = Run(tmp_path / "run", Settings(memory_budget_bytes=1024))
    calls = []
    stats = stage.ClusterNodesStage(run).run_task("0", calls.append)
    assert sum(calls) == stats["samples"] == 102 and len(calls) >= 102 // 8
    assert stats["buckets"] == stage.bucket_count(102, 1024) > 1
    assert_same_nodes(stage.load_nodes(run), oracles.read_nodes(run))


def test_builder_working_set_stays_below_the_node_arrays(tmp_path, monkeypatch):
    """200k samples in 20 parts: the traced peak (numpy arrays) stays below half of what the ids alone take."""
    import tracemalloc

    monkeypatch.setattr(stage, "BATCH_ROWS", 8_192)
    monkeypatch.setattr(stage, "SPILL_ROWS", 8_192)
    run = RunDir(tmp_path / "run")
    n = 200_000
    digests = [sha(b"%d" % (i % 150_000)) for i in range(n)]
    table = pa.table({name: pa.nulls(n, SAMPLES_SCHEMA.field(name).type) for name in SAMPLES_SCHEMA.names})
    table = table.set_column(0, "sample_id", pa.array(np.arange(n, dtype=np.int64)))
    table = table.set_column(SAMPLES_SCHEMA.names.index("status"), "status", pa.array(["ok"] * n))
    table = table.set_column(SAMPLES_SCHEMA.names.index("sha256"), "sha256", pa.array(digests))
    for part in range(20):  # shard-sized parts of 10k samples
        write_table(table.slice(part * 10_000, 10_000).cast(SAMPLES_SCHEMA), run.samples_part(part))
    tracemalloc.start()
    nodes, stats = build_nodes(run, tmp_path / "nodes", 16 * n)  # 16 B a sample: buckets of ~n/20 rows
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stats["buckets"] == 32 and (np.asarray(nodes.head) != np.arange(n)).sum() == 50_000
    assert peak < 4 * n  # the in-memory builder: 72 B a sample (ids, ok, keys, known, sort order, strings)


def test_a_flood_of_identical_bytes_is_verified_batch_by_batch(tmp_path, monkeypatch):
    """100k samples of one placeholder image's bytes (6.4 MB of sha256 strings, all candidates of one bucket):
    Arrow's peak allocation stays below them (the old builder gathered every candidate string at once)."""
    monkeypatch.setattr(stage, "BATCH_ROWS", 4_096)
    monkeypatch.setattr(stage, "MERGE_ROWS", 4_096)  # candidates verified 4k rows at a time
    run = RunDir(tmp_path / "run")
    placeholder = sha(b"photo unavailable")
    for part in range(10):
        rows = [("ok", placeholder if i % 10 else sha(b"%d %d" % (part, i))) for i in range(10_000)]
        write_part(run, part, rows)
    expected = oracles.read_nodes(run)
    original = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(original)  # its own peak: this build's only
    pa.set_memory_pool(pool)
    try:
        nodes, stats = build_nodes(run, tmp_path / "nodes", 2_000_000)
    finally:
        pa.set_memory_pool(original)
    assert stats["buckets"] == 16 and stats["candidates"] == 90_000
    assert_same_nodes(nodes, expected)
    assert pool.max_memory() < 64 * 90_000 / 2


# ---------------------------------------------------------------- guidance: the curve with a memory-mapped parent


def _random_curve_inputs(rng, n=700, edges=900):
    a, b = rng.integers(0, n, edges), rng.integers(0, n, edges)
    records = np.empty(edges, dtype=guidance.EDGE)
    records["a"], records["b"], records["s"] = np.minimum(a, b), np.maximum(a, b), rng.uniform(0.5, 1.0, edges)
    head = np.arange(n, dtype=np.int64)
    copies = rng.integers(1, n, 60)
    head[copies] = rng.integers(0, copies)  # each copy's head lies before it, as the builder's
    return np.arange(n, dtype=np.int64) * 3, head, records  # ids: any sorted ids


def test_curve_with_a_memory_mapped_parent_equals_the_in_memory_one(tmp_path, monkeypatch):
    rng = np.random.default_rng(8)
    ids, head, records = _random_curve_inputs(rng)
    records["a"], records["b"] = ids[records["a"]], ids[records["b"]]
    cuts = np.r_[np.linspace(0.5, 1.0, 9), 0.7]

    def passes():
        return (records[i : i + 50] for i in range(0, len(records), 50))

    parents = []
    made = guidance._parent
    monkeypatch.setattr(guidance, "_parent", lambda *args: parents.append(made(*args)) or parents[-1])
    in_memory = guidance.removal_curve(ids, guidance.exact_joins(head, 64), passes, cuts, tmp_path, chunk_rows=40)
    mapped = guidance.removal_curve(ids, guidance.exact_joins(head, 64), passes, cuts, tmp_path, chunk_rows=40,
                                    memory_bytes=TINY)
    assert type(parents[0]) is np.ndarray and isinstance(parents[1], np.memmap)
    assert mapped.tolist() == in_memory.tolist()
    edges = pd.DataFrame({"id_a": records["a"], "id_b": records["b"], "similarity": records["s"]})
    edges = edges.sort_values("similarity", ascending=False).drop_duplicates(["id_a", "id_b"], ignore_index=True)
    joined = np.flatnonzero(head != np.arange(len(head)))
    exact = (ids[head[joined]], ids[joined])
    assert mapped.tolist() == oracles.removal_curve(edges, exact, cuts).tolist()  # lone nodes change no count
    assert not list(tmp_path.iterdir())  # the parent map went with the band spill


def test_guidance_on_a_fixture_run_is_unchanged_by_a_tiny_budget(demo_copy, monkeypatch):
    config = json.loads(demo_copy.run_config.read_text())
    built, parents = [], []
    build, made = stage.build_nodes, guidance._parent

    def spied_build(*args, **options):
        built.append(build(*args, **options))
        return built[-1]

    monkeypatch.setattr(stage, "build_nodes", spied_build)
    monkeypatch.setattr(guidance, "_parent", lambda *args: parents.append(made(*args)) or parents[-1])
    edges = oracles.stored_edges(demo_copy, "perceptual")
    exact = oracles.exact_pairs(demo_copy)
    assert len(exact[0]) > 0
    expected = oracles.removal_curve(edges, exact, np.linspace(float(edges["similarity"].min()), 1.0, guidance.CURVE_POINTS))
    tiny = guidance.descriptor_guidance(demo_copy, "perceptual", {**config, "search_thresholds": {},
                                                                  "memory_budget_bytes": TINY})
    assert tiny.removed.tolist() == expected.tolist()
    assert built[0][1]["buckets"] == stage.MAX_BUCKETS and isinstance(parents[0], np.memmap)


# ---------------------------------------------------------------- the cluster stage end to end


def test_cluster_stage_with_a_tiny_budget_writes_the_same_clusters(demo_copy, tmp_path):
    from dedup.engine import forget_tasks
    from dedup.run import Run
    from dedup.stages.cluster import cluster

    copy = RunDir(shutil.copytree(demo_copy.root, tmp_path / "run", symlinks=True))
    before = pd.read_parquet(copy.clusters)
    copy.clusters.unlink()
    run = Run.open(copy.root, memory_budget_bytes=2_048)
    forget_tasks(copy, [("cluster_nodes", "0"), ("cluster", "0")]
                 + [("cluster_edges", t) for t in stage.ClusterEdgesStage(run).task_ids()])
    cluster(run)
    marker = json.loads(copy.marker("cluster_nodes", "0").read_text())
    assert marker["stats"]["buckets"] > 1
    pd.testing.assert_frame_equal(pd.read_parquet(copy.clusters), before)
    assert before["cluster_size"].max() > 1
