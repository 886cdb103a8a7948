"""Cluster stage wiring: edges of every descriptor + exact-hash groups -> clusters.parquet.

Node i is the i-th sample in sample_id order (failed samples included, so
every sample gets a row; only samples with status `ok` get edges, so a failed
one is always alone). Identical bytes (sha256) are one node for the chaining
guard and expand afterwards, so they always share a cluster. The guard
compares each member with its cluster's representative using every
descriptor: a member stays if it passes *some* descriptor's guard.

Anonymous memory is bounded by --memory, never O(edges) or a frame of every
sample: samples are read part by part (only the columns used) into
memory-mapped node arrays, identical bytes are grouped out of core
(`build_nodes`: 64-bit sha256 prefixes hash-partitioned into buckets sized
from --memory, each bucket's prefixes sorted and its candidate runs verified
on the full string), every guard pass reads the edge parts one at a time
(`cluster_with_guard_streamed`) and touches the nodes a block at a time, its
O(nodes) arrays (union-find parent, labels, degrees, representatives,
anchors) anonymous while they fit half the budget and memory maps in the
run's scratch above it (`node_state`), the descriptors' rows are found by
binary search (no table of every node), and clusters.parquet is written one
row group per samples batch. Behind the engine the first components pass runs as one
task per edge part (`ClusterEdgesStage`, on the cluster with --engine ray).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup.engine import forget_tasks, run_stage
from dedup.errors import DedupError, StoreError
from dedup.records import CLUSTERS, RunDir, atomic_output, conform, fingerprint, open_embeddings, write_array
from dedup.run import Run
from dedup.search.union_find import (
    BLOCK_NODES,
    Allocator,
    blocks,
    cluster_sizes,
    cluster_with_guard_streamed,
    in_memory,
    merge_summaries,
    reduce_part,
)
from dedup.settings import DEFAULT_MEMORY
from dedup.stages.crops import CROPS, contains_scorer, crop_edge_nodes
from dedup.stages.overrides import load_overrides, separated_edges

CLUSTER_COLUMNS = CLUSTERS.names  # the contract lives in dedup/records.py
EXACT = "sha256"
# Support check of the chaining guard (dedup.search.union_find): every member must also be
# within this of its descriptor's guard against the cluster's anchor (the member
# closest to the representative). Unrelated photos score ~0 (real-dups: at most
# 0.38), so a hub such as a blend of two photos cannot hold both in one cluster.
SUPPORT_SLACK = 0.25


@dataclass
class _DescriptorView:
    """A descriptor's vectors addressed by node index (-1 = node has no vector)."""

    name: str
    row_of_node: _RowLookup
    similarity: object  # dedup.search.pairs.PairSimilarity over rows
    guard: float


def _views(run: RunDir, node_ids: np.ndarray, descriptors: list[str], guards: dict[str, float]) -> list[_DescriptorView]:
    from dedup.descriptors import query_transform_for
    from dedup.search.pairs import pair_similarity

    views = []
    for name in descriptors:
        vectors = open_embeddings(run, name)  # memory maps: the guard reads only the rows it compares
        rows = _RowLookup(node_ids, vectors.ids)
        views.append(_DescriptorView(name, rows, pair_similarity(vectors, query_transform_for(name)), guards[name]))
    return views


class _RowLookup:
    """node -> its row in a descriptor's vectors (-1: none), by binary search: no table of every node."""

    def __init__(self, node_ids: np.ndarray, vector_ids: np.ndarray) -> None:
        self.node_ids, self.vector_ids = node_ids, vector_ids

    def __getitem__(self, nodes: np.ndarray) -> np.ndarray:
        ids = np.asarray(self.node_ids[nodes])
        if not len(self.vector_ids):
            return np.full(len(ids), -1, dtype=np.int64)
        rows = np.minimum(np.searchsorted(self.vector_ids, ids), len(self.vector_ids) - 1)
        return np.where(np.asarray(self.vector_ids[rows]) == ids, rows, -1).astype(np.int64)


@dataclass(frozen=True)
class GuardedClusters:
    labels: np.ndarray  # int64 node index of each node's representative
    is_representative: np.ndarray  # bool
    passes: int  # guard passes that ran

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.labels))[self.labels]


@dataclass(frozen=True)
class NodeState:
    """Where the cluster task's O(nodes) arrays live (`alloc`) and how many nodes its steps touch at once."""

    alloc: Allocator = in_memory
    block_nodes: int = BLOCK_NODES


def guarded_clusters_streamed(head: np.ndarray, edge_parts, margin, contains=None, parent=None,
                              first_graph=None, state: NodeState = NodeState()) -> GuardedClusters:
    """The chaining guard over identical-bytes groups contracted to one node each, then expanded, the edges
    read part by part (`edge_parts()` -> iterable of (a, b)); tests/oracles.py `guarded_clusters` is the in-memory twin.

    Each group travels as its head: edges are moved onto heads, the guard sees one node per group, and
    every member takes its head's label afterwards. So identical bytes end in one cluster whatever the
    guard does (however many passes it needs).

    `contains` is the one place a containment check (large crops) enters the guard;
    `parent` and `first_graph` as in `cluster_with_guard_streamed` (first_graph over head-mapped edges);
    `state` says where the O(nodes) arrays live.
    """
    def on_heads():
        return (_onto_heads(head, a, b) for a, b in edge_parts())

    result = cluster_with_guard_streamed(len(head), on_heads, margin, guard_threshold=0.0,
                                         support_threshold=-SUPPORT_SLACK, contains=contains,
                                         parent=parent, first_graph=first_graph,
                                         restrict=getattr(edge_parts, "restrict", None),
                                         alloc=state.alloc, block_nodes=state.block_nodes)
    return _expanded(head, result, state)


def _onto_heads(head: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges moved onto their groups' heads; edges inside one group vanish (the group is one node)."""
    a, b = head[a], head[b]
    apart = a != b
    return a[apart], b[apart]


def _expanded(head: np.ndarray, result, state: NodeState) -> GuardedClusters:
    """Every group member takes its head's label; only heads can represent (block by block)."""
    labels = state.alloc("final_labels", len(head), np.int64)
    is_rep = state.alloc("final_is_rep", len(head), bool)
    for block in blocks(len(head), state.block_nodes):
        heads = np.asarray(head[block])
        labels[block] = result.labels[heads]
        is_rep[block] = result.is_representative[block] & (heads == np.arange(block.start, block.stop))
    return GuardedClusters(labels, is_rep, int(result.passes))


def _best_match(views: list[_DescriptorView], nodes: _Nodes, reps: np.ndarray, members: np.ndarray):
    """Per (rep, member) pair: the descriptor clearing its guard by most.

    Returns (margin = similarity - guard, similarity, matched_by); identical bytes
    win outright (margin +inf, similarity 1.0, `sha256`).
    """
    margin = np.full(len(reps), -np.inf, dtype=np.float64)
    similarity = np.full(len(reps), np.nan, dtype=np.float32)
    matched_by = np.full(len(reps), "", dtype=object)
    for view in views:
        ra, rb = view.row_of_node[reps], view.row_of_node[members]
        both = np.flatnonzero((ra >= 0) & (rb >= 0))
        if not len(both):
            continue
        sims = view.similarity(ra[both], rb[both])
        better = sims - view.guard > margin[both]
        chosen = both[better]
        margin[chosen], similarity[chosen], matched_by[chosen] = sims[better] - view.guard, sims[better], view.name
    same_bytes = nodes.same_bytes(reps, members)
    margin[same_bytes], similarity[same_bytes], matched_by[same_bytes] = np.inf, 1.0, EXACT
    return margin, similarity, matched_by


def _explain(views, nodes: _Nodes, labels, is_rep) -> tuple[np.ndarray, np.ndarray]:
    """similarity_to_representative and matched_by of every given node (representatives: 1.0, `self`).

    `labels`, `is_rep` and `nodes` may be one block of the nodes: each row needs only its own representative.
    """
    similarity = np.ones(len(labels), dtype=np.float32)
    matched_by = np.where(is_rep, "self", "").astype(object)
    members = np.flatnonzero(~is_rep)
    _, similarity[members], matched_by[members] = _best_match(views, nodes, labels[members], nodes.index[members])
    return similarity, matched_by


# Crop edges (neighbors/perceptual-crops/) are verified containment scores, already past their own cut:
# every stored one counts.
CROP_EDGE_CUT = -np.inf


def edge_sources(run: RunDir, descriptors: list[str]) -> list[tuple[str, Path]]:
    """(name, path) of every edge part the guard reads: each descriptor's, then the large-crop edges if any."""
    from dedup.records import edge_part_paths

    paths = [(name, path) for name in descriptors for path in edge_part_paths(run, name)]
    crops = run.neighbors_dir(CROPS) / "part_0.parquet"
    return paths + ([(CROPS, crops)] if crops.exists() else [])


# ---------------------------------------------------------------- nodes: samples read part by part

SAMPLE_COLUMNS = ["sample_id", "shard_index", "shard", "key", "url", "caption", "status"]
BATCH_ROWS = 65_536  # rows of a samples part read at once (one row group of clusters.parquet)
# Bytes per node of the cluster task's O(nodes) arrays (union-find parent, labels, degrees, each pass's
# representatives and anchors, the final labels and sizes): while they fit half of --memory they are
# anonymous memory, above it memory maps in the run's scratch folder (file pages: the page cache's).
NODE_STATE_BYTES = 96
# Bytes of temporaries per node of one block (sorts of labels, degrees, similarities): sets the block size.
BLOCK_BYTES_PER_NODE = 128
MIN_BLOCK_NODES = 4096
SCRATCH = "_scratch/cluster"


@dataclass
class _Nodes:
    """Node i = the i-th sample in sample_id order: O(nodes) arrays, no Python object per row."""

    ids: np.ndarray  # int64 sample ids, sorted
    ok: np.ndarray  # bool: status ok (only those get edges)
    head: np.ndarray  # int64: first node with the same bytes (itself when unique or unknown)
    known: np.ndarray  # bool: usable sha256 (ok and present)

    @property
    def index(self) -> np.ndarray:
        return np.arange(len(self.ids), dtype=np.int64)

    def same_bytes(self, reps: np.ndarray, members: np.ndarray) -> np.ndarray:
        # Unknown bytes are their own group, so equal heads of two distinct nodes mean equal known bytes.
        return (self.head[reps] == self.head[members]) & self.known[members]


def _sample_paths(run: RunDir) -> list[Path]:
    parts = sorted((run.root / "samples").glob("samples_*.parquet"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not parts:
        raise StoreError(f"{run.root} has no samples table", hint=f"run 'dedup embed SHARDS --out {run.root}' first")
    return parts


def iter_sample_tables(run: RunDir, columns: list[str]) -> Iterator[pa.Table]:
    """The samples in sample_id order, a batch at a time (only `columns`, sample_id always first)."""
    columns = ["sample_id", *[c for c in columns if c != "sample_id"]]
    last = None
    for path in _sample_paths(run):
        for table in _part_tables(path, columns):
            ids = table["sample_id"].to_numpy()
            if len(ids) and last is not None and ids[0] <= last:
                raise StoreError(f"{path} holds sample ids of another part", hint="rerun the embed stage")
            last = ids[-1] if len(ids) else last
            yield table


def _part_tables(path: Path, columns: list[str]) -> Iterator[pa.Table]:
    handle = pq.ParquetFile(path)
    ids = handle.read(columns=["sample_id"])["sample_id"].to_numpy()
    if len(ids) > 1 and not (np.diff(ids) > 0).all():  # written in position order; sort the rare other one
        yield handle.read(columns=columns).take(pa.array(np.argsort(ids, kind="stable")))
        return
    for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield pa.Table.from_batches([batch])


def read_nodes(run: RunDir, memory_bytes: int | None = None) -> _Nodes:
    """The nodes in memory, for small runs and tests: `build_nodes` into a scratch folder, loaded, removed.

    `memory_bytes`: the group-by's budget (default: the run's when `run` is a Run, else DEFAULT_MEMORY).
    """
    if memory_bytes is None:
        memory_bytes = run.settings.memory_budget_bytes if isinstance(run, Run) else DEFAULT_MEMORY
    folder = run.root / SCRATCH
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nodes-", dir=folder) as tmp:
        built, _ = build_nodes(run, Path(tmp), memory_bytes)
        nodes = _Nodes(*(np.array(getattr(built, name)) for name in NODE_ARRAYS))
        del built  # the maps closed before their files go
    return nodes


# Identical bytes are a hash-partitioned group-by (`build_nodes`). A known row costs about this much in its
# bucket when every row is a candidate: node, prefix, sort order and mask, the full sha256 with its offset,
# its dictionary code. Buckets get half the budget; the other half is the read batch and Arrow's buffers.
BUCKET_ROW_BYTES = 160
# Open bucket writers at most (as rank's buckets); past MAX_BUCKETS x the rows a budget allows, buckets grow.
MAX_BUCKETS = 512
# Known rows gathered before they are split into the buckets (fewer, larger record batches per bucket file),
# at most; a small budget gathers fewer (held three times while split: gathered, joined, sorted).
SPILL_ROWS = 1 << 18
NODE_DTYPES = {"ids": np.int64, "ok": np.bool_, "head": np.int64, "known": np.bool_}
_BUCKET_SCHEMA = pa.schema([("node", pa.int64()), ("key", pa.uint64()), ("sha", pa.large_string())])


def build_nodes(run: RunDir, folder: Path, memory_bytes: int, require_ok: bool = True,
                progress=None) -> tuple[_Nodes, dict[str, int]]:
    """ids, ok, head and known as `folder`/nodes_*.npy (each atomic), returned as read-only memory maps.

    Nothing of size O(samples) is held: the row count comes from the parquet metadata, the arrays are
    memory maps filled a samples batch at a time, and identical bytes are grouped out of core: each batch's
    known rows go to B buckets by the top bits of their 64-bit sha256 prefix (B a power of two from the
    budget, 1 when all fits: then nothing is spilled), and each bucket alone sorts its prefixes and verifies
    the candidate runs on the full strings (an equal prefix is only a candidate). `known`: a sha256 present
    and, with `require_ok`, status ok (the cluster stage); without, bytes of any status count (guidance).
    Returns the nodes and stats: samples, buckets, candidates (rows whose prefix another row shares).
    """
    rows = _sample_rows(run)
    count = bucket_count(rows, memory_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    with _node_outputs(folder, rows) as arrays, tempfile.TemporaryDirectory(prefix="heads-", dir=folder) as tmp:
        buckets = _Buckets(Path(tmp), count, min(SPILL_ROWS, max(1, memory_bytes // (8 * BUCKET_ROW_BYTES))))
        _fill(run, arrays, buckets, require_ok, progress)
        candidates = sum(buckets.heads(i, arrays["head"]) for i in range(count))
    nodes = _Nodes(*(np.load(folder / f"nodes_{name}.npy", mmap_mode="r") for name in NODE_ARRAYS))
    return nodes, {"samples": rows, "buckets": count, "candidates": candidates}


def bucket_count(rows: int, memory_bytes: int) -> int:
    """Buckets of the identical-bytes group-by: a power of two (the prefix's top bits), each in half the budget."""
    need = -(-rows * BUCKET_ROW_BYTES // max(1, memory_bytes // 2))
    return min(MAX_BUCKETS, 1 << max(0, need - 1).bit_length())


def _sample_rows(run: RunDir) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in _sample_paths(run))


@contextmanager
def _node_outputs(folder: Path, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The node arrays as writable memory maps at temporaries, each published under its name on success."""
    with ExitStack() as stack:
        temporaries = {name: stack.enter_context(atomic_output(folder / f"nodes_{name}.npy")) for name in NODE_ARRAYS}
        arrays = {name: np.lib.format.open_memmap(path, mode="w+", dtype=NODE_DTYPES[name], shape=(rows,))
                  for name, path in temporaries.items()}
        yield arrays
        for array in arrays.values():
            array.flush()  # the pages reach the file before atomic_output's fsync and rename


def _fill(run: RunDir, arrays: dict[str, np.ndarray], buckets: _Buckets, require_ok: bool, progress) -> None:
    """ids, ok, known and head = itself, a samples batch at a time; the known rows spilled to the buckets."""
    start, rows = 0, len(arrays["ids"])
    with buckets.writing():
        for table in iter_sample_tables(run, ["status", "sha256"]):
            stop = start + len(table)
            if stop > rows:
                raise StoreError(f"{run.root / 'samples'} changed while it was read", hint="rerun the stage")
            known = _fill_batch(arrays, slice(start, stop), table, require_ok)
            buckets.add(start + np.flatnonzero(known), table["sha256"].combine_chunks().filter(pa.array(known)))
            if progress is not None:
                progress(len(table))
            start = stop
    if start != rows:
        raise StoreError(f"{run.root / 'samples'} changed while it was read", hint="rerun the stage")


def _fill_batch(arrays: dict[str, np.ndarray], rows: slice, table: pa.Table, require_ok: bool) -> np.ndarray:
    ok = pc.fill_null(pc.equal(table["status"].combine_chunks(), "ok"), False).to_numpy(zero_copy_only=False)
    known = table["sha256"].combine_chunks().is_valid().to_numpy(zero_copy_only=False) & (ok | (not require_ok))
    arrays["ids"][rows], arrays["ok"][rows], arrays["known"][rows] = table["sample_id"].to_numpy(), ok, known
    arrays["head"][rows] = np.arange(rows.start, rows.stop, dtype=np.int64)  # unique until a bucket says otherwise
    return known


class _Buckets:
    """Known rows (node, 64-bit prefix, full sha256) partitioned by the prefix's top bits into `count` buckets.

    Equal strings have equal prefixes, so every group of identical bytes lies in one bucket. One bucket is
    held in memory (all fits); more are Arrow IPC files in `folder`, read back memory-mapped one at a time.
    """

    def __init__(self, folder: Path, count: int, spill_rows: int) -> None:
        self.folder, self.count, self.spill_rows = folder, count, spill_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.held: list[pa.Table] = []
        self.writers: list[Any] = []

    def path(self, i: int) -> Path:
        return self.folder / f"bucket_{i}.arrow"

    @contextmanager
    def writing(self) -> Iterator[None]:
        with ExitStack() as stack:
            if self.count > 1:
                self.writers = [stack.enter_context(pa.ipc.new_file(self.path(i), _BUCKET_SCHEMA))
                                for i in range(self.count)]
            yield
            self._flush()
        self.writers = []

    def add(self, nodes: np.ndarray, sha: pa.Array) -> None:
        sha = sha.cast(pa.large_string())  # a bucket may exceed string's 2 GiB of offsets
        self.pending.append(pa.table([pa.array(nodes, pa.int64()), pa.array(prefix_keys(sha)), sha], schema=_BUCKET_SCHEMA))
        self.pending_rows += len(nodes)
        if self.count > 1 and self.pending_rows >= self.spill_rows:
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables([_BUCKET_SCHEMA.empty_table(), *self.pending])
        self.pending, self.pending_rows = [], 0
        if self.count == 1:
            self.held.append(table)
            return
        bucket = table["key"].to_numpy() >> np.uint64(64 - (self.count.bit_length() - 1))
        order = np.argsort(bucket, kind="stable")  # stable: each bucket stays in node order
        table, bounds = table.take(pa.array(order)), np.searchsorted(bucket[order], np.arange(self.count + 1))
        for i in np.flatnonzero(np.diff(bounds)):
            self.writers[i].write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]))

    def table(self, i: int) -> pa.Table:
        if self.count == 1:
            return pa.concat_tables([_BUCKET_SCHEMA.empty_table(), *self.held])
        return pa.ipc.open_file(pa.memory_map(str(self.path(i)))).read_all()  # zero-copy: file pages, not RAM

    def heads(self, i: int, head: np.ndarray) -> int:
        """Bucket i's groups into `head`, then the bucket dropped (its disk freed at once); returns its candidates."""
        candidates = _bucket_heads(self.table(i), head)
        self.held = []
        self.path(i).unlink(missing_ok=True)
        return candidates


def _bucket_heads(table: pa.Table, head: np.ndarray) -> int:
    """head[node] = the smallest node with the same full string, for the bucket's rows whose prefix repeats.

    Verified a record batch at a time, as identical bytes can be millions of rows (one placeholder image
    served for every dead link): a first pass keeps each distinct candidate string's smallest node, a second
    points every candidate at it. Only the distinct strings are held, never every candidate's.
    """
    repeated = _repeated(table["key"].to_numpy())
    if not repeated.any():
        return 0
    firsts = _first_nodes(_gathered(_candidate_batches(table, repeated), MERGE_ROWS))
    smallest = firsts["node"].to_numpy()
    # index_in hashes its value set on every call: calls of at least as many rows keep that cost linear.
    for batch in _gathered(_candidate_batches(table, repeated), max(len(firsts), MERGE_ROWS)):
        where = pc.index_in(batch["sha"], value_set=firsts["sha"]).to_numpy()  # exact equality, in Arrow
        head[batch["node"].to_numpy()] = smallest[where]
    return int(repeated.sum())


def _candidate_batches(table: pa.Table, repeated: np.ndarray) -> Iterator[pa.Table]:
    """The candidate rows of each record batch of the bucket (its batches are views of the file: no copy)."""
    start = 0
    for batch in table.to_batches():
        rows = repeated[start : start + batch.num_rows]
        start += batch.num_rows
        if rows.any():
            yield pa.Table.from_batches([batch]).filter(pa.array(rows))


def _gathered(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The tables joined into ones of at least `rows` rows (the last may have fewer)."""
    pending, held = [], 0
    for table in tables:
        pending.append(table)
        held += len(table)
        if held >= rows:
            yield pa.concat_tables(pending)
            pending, held = [], 0
    if pending:
        yield pa.concat_tables(pending)


# Candidate rows verified at once, at least, and distinct strings gathered before they are merged with the
# ones so far (merges double in size, so each string is regrouped O(log) times, not once per batch).
MERGE_ROWS = 1 << 16


def _first_nodes(batches: Iterator[pa.Table]) -> pa.Table:
    """(sha, node): each distinct string of the batches with its smallest node."""
    merged, pending, rows = _smallest([]), [], 0
    for batch in batches:
        pending.append(_smallest([batch]))
        rows += len(pending[-1])
        if rows >= max(len(merged), MERGE_ROWS):
            merged, pending, rows = _smallest([merged, *pending]), [], 0
    return _smallest([merged, *pending])


def _smallest(tables: list[pa.Table]) -> pa.Table:
    table = pa.concat_tables([_FIRSTS.empty_table(), *(t.select(["sha", "node"]) for t in tables)])
    encoded = table["sha"].combine_chunks().dictionary_encode()  # exact equality, in Arrow (a hash, no sort)
    codes = encoded.indices.to_numpy()
    smallest = np.full(len(encoded.dictionary), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, codes, table["node"].to_numpy())
    return pa.table([encoded.dictionary, pa.array(smallest)], schema=_FIRSTS)


_FIRSTS = pa.schema([("sha", pa.large_string()), ("node", pa.int64())])


_NIBBLE = np.array([int(chr(c), 16) if chr(c) in "0123456789abcdefABCDEF" else c & 15 for c in range(256)],
                   dtype=np.uint64)
PREFIX_CHARS = 16  # 64 bits of a hex digest: equal prefixes are only candidates, verified on the full string


def prefix_keys(strings: pa.Array) -> np.ndarray:
    """uint64 of the first 16 characters of each string (read as hex), straight from the Arrow buffers."""
    strings = strings.cast(pa.large_string())
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2], dtype=np.uint8) if strings.buffers()[2] else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    key = np.zeros(len(strings), dtype=np.uint64)
    for j in range(PREFIX_CHARS):
        byte = data[np.minimum(starts + j, max(len(data) - 1, 0))]
        key = (key << np.uint64(4)) | np.where(j < lengths, _NIBBLE[byte], np.uint64(0))
    return key


def _repeated(keys: np.ndarray) -> np.ndarray:
    """Mask of the rows whose prefix another row shares (the candidates), from one sort of the prefixes."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    same = ordered[1:] == ordered[:-1]
    hit = np.zeros(len(keys), dtype=bool)
    hit[1:] |= same
    hit[:-1] |= same
    repeated = np.empty(len(keys), dtype=bool)
    repeated[order] = hit
    return repeated



# ---------------------------------------------------------------- edges: one part at a time


class _EdgeSource:
    """Every descriptor's edge parts as node indices between two ok samples, review overrides applied.

    Calling it starts a fresh read; `edges` counts the edges of the first full read (for the stats).
    With a `workdir`, `restrict(detached)` (the guard's detached mask over heads) makes the next read
    keep only edges between two detached groups and write them there as .npy parts, which later
    passes read instead: passes after the first read what can still cluster, not every edge again.
    """

    def __init__(self, run: RunDir, nodes: _Nodes, descriptors: list[str], thresholds: dict[str, float],
                 workdir: Path | None = None) -> None:
        self.run, self.nodes, self.descriptors, self.thresholds = run, nodes, descriptors, thresholds
        self.overrides = load_overrides(run)  # read once: every pass applies them to every part
        self.edges: int | None = None
        self.workdir, self.cached, self.detached, self.generation = workdir, None, None, 0

    def paths(self) -> list[tuple[str, Path]]:
        return edge_sources(self.run, self.descriptors)

    def part(self, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
        table = pq.read_table(path, columns=["id_a", "id_b", "similarity"])
        # Compared in float32, as the stored similarities (a float64 cut would drop a pair at exactly the cut).
        keep = table["similarity"].to_numpy() >= np.float32(self.thresholds.get(name, CROP_EDGE_CUT))
        a = np.searchsorted(self.nodes.ids, table["id_a"].to_numpy()[keep]).astype(np.int64)
        b = np.searchsorted(self.nodes.ids, table["id_b"].to_numpy()[keep]).astype(np.int64)
        both = self.nodes.ok[a] & self.nodes.ok[b]  # a failed sample keeps its row, alone
        a, b = a[both], b[both]
        if self.overrides.empty:
            return a, b
        # Review overrides (the reviewer's separated pairs), with the table read once.
        keep = ~separated_edges(self.overrides, self.nodes.ids[a], self.nodes.ids[b])
        return a[keep], b[keep]

    def restrict(self, detached: np.ndarray) -> None:
        if self.workdir is not None:
            self.detached = detached

    def _read(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.cached is not None:
            for path in self.cached:
                pair = np.load(path)
                yield pair[0], pair[1]
            return
        count = 0
        for name, path in self.paths():
            a, b = self.part(name, path)
            count += len(a)
            yield a, b
        self.edges = count if self.edges is None else self.edges

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.detached is None:
            yield from self._read()
            return
        detached, head, written = self.detached, self.nodes.head, []
        self.generation += 1
        for a, b in self._read():
            keep = detached[head[a]] & detached[head[b]]
            a, b = a[keep], b[keep]
            if len(a):
                written.append(self.workdir / f"pass{self.generation}_{len(written)}.npy")
                np.save(written[-1], np.stack([a, b]))
            yield a, b
        for path in self.cached or []:
            path.unlink(missing_ok=True)
        self.cached, self.detached = written, None


# ---------------------------------------------------------------- the stage's computation


@dataclass
class _Result:
    nodes: _Nodes
    clusters: GuardedClusters
    views: list[_DescriptorView]
    edges: int
    sizes: np.ndarray  # members per label node
    state: NodeState

    def stats(self) -> dict[str, int]:
        labels, sizes = self.clusters.labels, self.sizes
        counts = {"copies": 0, "samples_in_clusters": 0, "clusters_with_copies": 0}
        for block in blocks(len(labels), self.state.block_nodes):
            index = np.arange(block.start, block.stop)
            counts["copies"] += int((np.asarray(self.nodes.head[block]) != index).sum())
            counts["samples_in_clusters"] += int((sizes[np.asarray(labels[block])] > 1).sum())
            counts["clusters_with_copies"] += int((np.asarray(sizes[block]) > 1).sum())
        return {
            "samples": len(labels),
            "edges": int(self.edges + counts["copies"]),
            "clusters_with_copies": counts["clusters_with_copies"],
            "samples_in_clusters": counts["samples_in_clusters"],
            "guard_passes": int(self.clusters.passes),
        }

    def blocks(self, run: RunDir) -> Iterator[pa.Table]:
        """clusters.parquet rows, one samples batch at a time, in sample_id order."""
        labels, is_rep, sizes = self.clusters.labels, self.clusters.is_representative, self.sizes
        start = 0
        for table in iter_sample_tables(run, SAMPLE_COLUMNS):
            block = slice(start, start + len(table))
            block_labels, block_rep = np.asarray(labels[block]), np.asarray(is_rep[block])
            similarity, matched_by = _explain(self.views, _Block(self.nodes, block), block_labels, block_rep)
            columns = {"cluster_id": np.asarray(self.nodes.ids[block_labels]),
                       "cluster_size": np.asarray(sizes[block_labels]).astype(np.int64),
                       "is_representative": block_rep, "similarity_to_representative": similarity,
                       "matched_by": pa.array(matched_by.astype(str))}
            for name, values in columns.items():
                table = table.append_column(name, pa.array(values) if not isinstance(values, pa.Array) else values)
            yield conform(table, CLUSTERS)
            start = block.stop


class _Block:
    """A _Nodes seen from one block of rows: `index` is the block's node indices, lookups stay global."""

    def __init__(self, nodes: _Nodes, block: slice) -> None:
        self.nodes, self.index = nodes, np.arange(block.start, block.stop, dtype=np.int64)

    def same_bytes(self, reps: np.ndarray, members: np.ndarray) -> np.ndarray:
        return self.nodes.same_bytes(reps, members)


def compute_clusters(run: RunDir, descriptors: list[str], thresholds: dict[str, float], guards: dict[str, float],
                     contains=None, nodes: _Nodes | None = None, first_graph=None, parent=None,
                     state: NodeState = NodeState()) -> _Result:
    """Nodes, then the streamed chaining guard over the edge parts (O(nodes) state; see module doc).

    `contains`: the one place a containment check (large crops) enters the stage's guard.
    `first_graph`: ((components, degree), edge count) of the head-mapped edges, merged from the
    cluster_edges summaries; None reads the edges for the first pass too. `state`: where the
    O(nodes) arrays live (see `node_state`); the result's arrays are valid while it is.
    """
    nodes = read_nodes(run) if nodes is None else nodes
    views = _views(run, nodes.ids, descriptors, guards)
    if contains is None:  # large crops (`dedup run --large-crops`): None when the run has no crop edges
        contains = contains_scorer(run, nodes.ids, crop_edge_nodes(run, nodes.ids))
    graph, counted = first_graph if first_graph is not None else (None, None)
    (run.root / SCRATCH).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="passes-", dir=run.root / SCRATCH) as workdir:
        edges = _EdgeSource(run, nodes, descriptors, thresholds, workdir=Path(workdir))
        result = guarded_clusters_streamed(nodes.head, edges, lambda r, m: _best_match(views, nodes, r, m)[0],
                                           contains=contains, parent=parent, first_graph=graph, state=state)
    sizes = cluster_sizes(result.labels, state.alloc, state.block_nodes)
    return _Result(nodes, result, views, (edges.edges or 0) if counted is None else counted, sizes, state)


@contextmanager
def node_state(run: RunDir, n_nodes: int, memory_bytes: int | None):
    """The cluster task's `NodeState` under a memory budget (None: anonymous memory, default blocks).

    While n_nodes x NODE_STATE_BYTES fits half the budget the arrays are anonymous memory; above it
    each is an .npy memory map in a scratch folder removed afterwards (so --memory bounds the task's
    anonymous memory at any node count). Blocks are sized so their temporaries fit a quarter of it.
    """
    if memory_bytes is None:
        yield NodeState()
        return
    block_nodes = int(min(BLOCK_NODES, max(MIN_BLOCK_NODES, memory_bytes // 4 // BLOCK_BYTES_PER_NODE)))
    if n_nodes * NODE_STATE_BYTES <= memory_bytes // 2:
        yield NodeState(in_memory, block_nodes)
        return
    (run.root / SCRATCH).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="state-", dir=run.root / SCRATCH) as folder:
        yield NodeState(_memmap_allocator(Path(folder)), block_nodes)


def _memmap_allocator(folder: Path) -> Allocator:
    made = []

    def alloc(name: str, n: int, dtype) -> np.ndarray:
        made.append(name)  # a name may be asked for twice (e.g. two degree arrays): each gets its own file
        return np.lib.format.open_memmap(folder / f"{len(made)}_{name}.npy", mode="w+", dtype=dtype, shape=(n,))

    return alloc


@contextmanager
def _state_for(run: RunDir, nodes: _Nodes, options: dict):
    """The caller's `state` option, or one made from its `memory_bytes` option for these nodes."""
    state, memory_bytes = options.pop("state", None), options.pop("memory_bytes", None)
    with nullcontext(state) if state is not None else node_state(run, len(nodes.ids), memory_bytes) as made:
        yield made


@contextmanager
def _nodes_for(run: RunDir, nodes: _Nodes | None, memory_bytes: int | None):
    """The given nodes; else, under a budget, memory maps built in a scratch folder removed afterwards
    (as the cluster_nodes task writes them); else, with no budget (tests, small runs), arrays in memory."""
    if nodes is not None or memory_bytes is None:
        yield read_nodes(run) if nodes is None else nodes
        return
    (run.root / SCRATCH).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nodes-", dir=run.root / SCRATCH) as folder:
        yield build_nodes(run, Path(folder), memory_bytes)[0]


def cluster_run(run: RunDir, descriptors: list[str], thresholds: dict[str, float],
                guards: dict[str, float], memory_bytes: int | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Cluster a run with explicit cuts and guards (no settings read), so tests and `cluster` share one path.

    Returns the clusters as one frame: for tests and small runs; the stage writes them block by block.
    """
    with _nodes_for(run, None, memory_bytes) as nodes, node_state(run, len(nodes.ids), memory_bytes) as state:
        result = compute_clusters(run, descriptors, thresholds, guards, nodes=nodes, state=state)
        tables = list(result.blocks(run))
        table = pa.concat_tables(tables) if tables else CLUSTERS.empty_table()
        return table.to_pandas(), result.stats()


def write_clusters(run: RunDir, descriptors: list[str], thresholds: dict[str, float], guards: dict[str, float],
                   contains=None, **options) -> dict[str, int]:
    """Cluster and write clusters.parquet one row group per samples batch (atomic: a temporary, then rename).

    `options`: nodes, first_graph, parent and state of `compute_clusters`, or memory_bytes (see `node_state`).
    """
    with _nodes_for(run, options.pop("nodes", None), options.get("memory_bytes")) as nodes, \
            _state_for(run, nodes, options) as state:
        result = compute_clusters(run, descriptors, thresholds, guards, contains=contains, nodes=nodes,
                                  state=state, **options)
        with atomic_output(run.clusters) as tmp, pq.ParquetWriter(tmp, CLUSTERS) as writer:
            for block in result.blocks(run):
                writer.write_table(block)
        return result.stats()


# ---------------------------------------------------------------- the stages behind the engine
#
# Three stages share one fingerprint (edges, samples, overrides, cuts), so any change runs all three:
# cluster_nodes (one task: sample ids, ok mask, identical-bytes heads -> scratch .npy files),
# cluster_edges (one task per edge part: the part reduced to its touched nodes' local roots and degrees,
# the first components pass; these run on the cluster with --engine ray) and cluster (one task: the
# summaries merged into the first pass, the later passes streamed, clusters.parquet written).

NODE_ARRAYS = ("ids", "ok", "head", "known")


def _scratch(run: RunDir) -> Path:
    return run.root / SCRATCH


def load_nodes(run: RunDir) -> _Nodes:
    """The nodes the cluster_nodes stage saved, as read-only memory maps (O(nodes) on disk, not in every worker)."""
    return _Nodes(*(np.load(_scratch(run) / f"nodes_{name}.npy", mmap_mode="r") for name in NODE_ARRAYS))


class _ClusterInputs:
    """What the three cluster stages share: the run, its cuts and the fingerprint of their inputs."""

    def __init__(self, run: Run) -> None:
        self.run_dir = run
        self.settings = run.settings

    def fingerprint(self) -> str:
        inputs = [*self.run_dir.root.glob("neighbors/*/part_*.parquet"), *self.run_dir.root.glob("samples/*.parquet"),
                  self.run_dir.overrides]
        cuts = {"thresholds": self.settings.thresholds, "guards": self.settings.guards}
        return fingerprint(inputs, cuts)

    def edge_paths(self) -> list[tuple[str, Path]]:
        return edge_sources(self.run_dir, self.settings.descriptors)

    def close(self) -> None:
        pass


class ClusterNodesStage(_ClusterInputs):
    """One task: sample ids, ok mask and identical-bytes heads (out of core, `build_nodes`) -> the run's scratch folder."""

    name = "cluster_nodes"

    def task_ids(self) -> list[str]:
        return ["0"]

    def reset(self) -> None:
        for name in NODE_ARRAYS:
            (_scratch(self.run_dir) / f"nodes_{name}.npy").unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        # Straight into the scratch folder the later sub-stages memory-map (load_nodes), within the run's budget.
        _, stats = build_nodes(self.run_dir, _scratch(self.run_dir), self.settings.memory_budget_bytes, progress=progress)
        return stats


class ClusterEdgesStage(_ClusterInputs):
    """One task per edge part: its edges (cut, ok, overrides, onto heads) reduced to a (node, root, degree) summary."""

    name = "cluster_edges"

    def task_ids(self) -> list[str]:
        return [str(i) for i in range(len(self.edge_paths()))]

    def summary_path(self, task_id: str) -> Path:
        return _scratch(self.run_dir) / f"edges_{task_id}.npy"

    def reset(self) -> None:
        for path in _scratch(self.run_dir).glob("edges_*.npy"):
            path.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        nodes = load_nodes(self.run_dir)
        source = _EdgeSource(self.run_dir, nodes, self.settings.descriptors, self.settings.thresholds)
        a, b = source.part(*self.edge_paths()[int(task_id)])
        summary = reduce_part(*_onto_heads(nodes.head, a, b))
        # One (3, touched) array plus the part's edge count in the last column: a single atomic file.
        write_array(np.concatenate([np.stack(summary), [[len(a)], [0], [0]]], axis=1), self.summary_path(task_id))
        progress(len(a))
        return {"edges": len(a)}

    def summaries(self) -> tuple[Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], list[int]]:
        """The summaries one at a time, and each part's edge count (read from the files' last column)."""
        paths = [self.summary_path(t) for t in self.task_ids()]
        counts = [int(np.load(p, mmap_mode="r")[0, -1]) for p in paths]

        def read():
            for path in paths:
                table = np.load(path)
                yield table[0, :-1], table[1, :-1], table[2, :-1]

        return read(), counts


class ClusterStage(_ClusterInputs):
    """One task: the cluster_edges summaries merged (the first guard pass), the later passes over the
    streamed edge parts, clusters.parquet written batch by batch."""

    name = "cluster"

    def task_ids(self) -> list[str]:
        return ["0"]

    def reset(self) -> None:
        self.run_dir.clusters.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        settings = self.settings
        nodes = load_nodes(self.run_dir)
        summaries, counts = ClusterEdgesStage(self.run_dir).summaries()
        with node_state(self.run_dir, len(nodes.ids), settings.memory_budget_bytes) as state:
            parent = state.alloc("parent", len(nodes.ids), np.int64)
            first_graph = merge_summaries(len(nodes.ids), summaries, parent=parent, alloc=state.alloc)
            stats = write_clusters(self.run_dir, settings.descriptors, settings.thresholds, settings.guards,
                                   nodes=nodes, first_graph=(first_graph, sum(counts)), parent=parent, state=state)
        progress(stats["samples"])
        return stats


def forget_lost_outputs(run: Run) -> list[str]:
    """Remove the markers of cluster sub-stage tasks whose outputs are gone, so that those tasks run again.

    The scratch folder is the one thing a later sub-stage reads that an earlier one wrote: a disk
    cleanup or a crash can remove it after their markers were written. While clusters.parquet stands
    under a done cluster task nothing needs it; otherwise every task whose files are missing is redone
    (nodes and edge summaries are recomputed from unchanged inputs, so the result is the same).
    Returns the forgotten markers' stage/task names.
    """
    final = ClusterStage(run)
    if run.clusters.exists() and run.marker(final.name, "0").exists():
        return []
    nodes, edges = ClusterNodesStage(run), ClusterEdgesStage(run)
    lost = [(final.name, "0")]
    if not all((_scratch(run) / f"nodes_{name}.npy").exists() for name in NODE_ARRAYS):
        lost.append((nodes.name, "0"))
    lost += [(edges.name, task) for task in edges.task_ids() if not edges.summary_path(task).exists()]
    return forget_tasks(run, lost)


def run_cluster_stages(run: Run) -> dict[str, int]:
    """Nodes, edge reduction (one task per part) and the cluster task, each behind the run's engine."""
    forget_lost_outputs(run)
    run_stage(run, ClusterNodesStage(run))
    run_stage(run, ClusterEdgesStage(run), unit="edges")
    report = run_stage(run, ClusterStage(run))
    return {k: int(v) for k, v in report.stats.items()}


def check_cuts(run: Run) -> None:
    """Clustering on missing edges would be silently wrong: the neighbour search must be complete and
    no cut may lie below the threshold it searched at."""
    from dedup.engine import unfinished_tasks
    from dedup.stages.neighbors import neighbors_stage

    settings = run.settings
    for name in settings.descriptors:
        if not run.neighbors_dir(name).exists():
            raise DedupError(f"no neighbour edges for {name} in {run.neighbors_dir(name)}",
                             hint=f"run 'dedup neighbors {run.root}' first")
        # Searched on the CPU (no k cap) or on a GPU (k <= 2048, saturated queries redone): either is complete.
        if all(unfinished_tasks(run, neighbors_stage(run, name, cap)) for cap in (None, 2048)):
            raise DedupError(f"the neighbour search of {name} is missing or unfinished",
                             hint=f"run 'dedup neighbors {run.root}' first")
    for name, value in settings.thresholds.items():
        searched = settings.search_thresholds.get(name)
        if searched is not None and value < searched - 1e-9:
            raise DedupError(
                f"threshold {name}={value} is below the {searched} the neighbours were searched at",
                hint=f"run 'dedup neighbors {run.root} --threshold {name}={value}' first",
            )


def cluster(run: Run) -> dict[str, int]:
    """Cluster at the run's cuts behind the engine; returns the cluster stats."""
    check_cuts(run)
    return run_cluster_stages(run)
