"""Whole-table reference implementations, kept only as oracles for the tests.

Each is the code a streamed or out-of-core version in dedup/ replaced, kept verbatim (or nearly) so a
test can compare the two on random inputs small enough to hold in memory.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dedup.records import RunDir

SIMILARITY_BINS = 40  # dedup.stages.report.SIMILARITY_BINS when the histogram was whole-table


# ---------------------------------------------------------------- report histogram, guidance (whole edge table)


def similarity_histogram(run: RunDir, descriptor: str, low: float | None) -> tuple[np.ndarray, np.ndarray]:
    parts = sorted(run.neighbors_dir(descriptor).glob("part_*.parquet"))
    if not parts:
        return np.array([]), np.array([])
    pairs = pd.concat([pq.read_table(p, columns=["id_a", "id_b", "similarity"]).to_pandas() for p in parts])
    similarity = pairs.drop_duplicates(["id_a", "id_b"])["similarity"].to_numpy(np.float64)
    if similarity.size == 0:
        return np.array([]), np.array([])
    start = low if low is not None else float(similarity.min())
    start = min(start, float(similarity.min()))
    edges = np.linspace(start, 1.0, SIMILARITY_BINS + 1) if start < 1.0 else np.array([start - 0.01, 1.0])
    counts, edges = np.histogram(np.clip(similarity, edges[0], edges[-1]), bins=edges)
    return edges, counts


def stored_edges(run: RunDir, descriptor: str) -> pd.DataFrame:
    parts = sorted(run.neighbors_dir(descriptor).glob("part_*.parquet"))
    if not parts:
        return pd.DataFrame({"id_a": pd.Series(dtype="int64"), "id_b": pd.Series(dtype="int64"),
                             "similarity": pd.Series(dtype="float32")})
    edges = pd.concat([pq.read_table(p, columns=["id_a", "id_b", "similarity"]).to_pandas() for p in parts])
    return edges.sort_values("similarity", ascending=False).drop_duplicates(["id_a", "id_b"], ignore_index=True)


def exact_pairs(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    from dedup.records import load_samples

    samples = load_samples(run, ["sample_id", "sha256"]).dropna(subset=["sha256"])
    first = samples.groupby("sha256")["sample_id"].transform("min")
    joined = samples[samples["sample_id"] != first]
    return first[joined.index].to_numpy(np.int64), joined["sample_id"].to_numpy(np.int64)


def removal_curve(edges: pd.DataFrame, exact: tuple[np.ndarray, np.ndarray], cuts: np.ndarray) -> np.ndarray:
    from dedup.search.union_find import connected_components

    ids = np.unique(np.concatenate([edges["id_a"].to_numpy(np.int64), edges["id_b"].to_numpy(np.int64), *exact]))
    a = np.searchsorted(ids, edges["id_a"].to_numpy(np.int64))
    b = np.searchsorted(ids, edges["id_b"].to_numpy(np.int64))
    similarity = edges["similarity"].to_numpy(np.float32)
    labels = connected_components(len(ids), np.searchsorted(ids, exact[0]), np.searchsorted(ids, exact[1]))
    removed = np.zeros(len(cuts), dtype=np.int64)
    done = np.zeros(len(similarity), dtype=bool)
    for position in np.argsort(-np.asarray(cuts, dtype=np.float64), kind="stable"):
        step = ~done & (similarity >= np.float32(cuts[position]))
        labels = connected_components(len(ids), labels[a[step]], labels[b[step]])[labels]
        done |= step
        removed[position] = len(ids) - len(np.unique(labels))
    return removed


def band_pairs(edges: pd.DataFrame, low: float, bands: int = 6, per_band: int = 3) -> list[tuple[float, float, pd.DataFrame]]:
    limits = np.linspace(low, 1.0, bands + 1)
    result = []
    for left, right in itertools.pairwise(limits):
        last = right >= 1.0
        inside = edges[(edges["similarity"] >= left) & ((edges["similarity"] <= right) if last else (edges["similarity"] < right))]
        inside = inside.sort_values(["similarity", "id_a", "id_b"], ignore_index=True)
        if len(inside) > per_band:
            inside = inside.iloc[np.unique(np.linspace(0, len(inside) - 1, per_band).round().astype(int))]
        result.append((float(left), float(right), inside))
    return result


# ---------------------------------------------------------------- rank (every member of a cluster with copies in one frame)


def ranking_of(clusters_path, by: str = "copies") -> pd.DataFrame:
    """What the rank stage wrote when it read every member of a cluster with copies at once (one frame)."""
    from dedup.stages.rank import RANK_COLUMNS, rank_clusters

    return rank_clusters(pq.read_table(clusters_path, columns=RANK_COLUMNS, filters=[("cluster_size", ">=", 2)]).to_pandas(), by)


# ---------------------------------------------------------------- cluster (every edge and every sha256 in memory)


def exact_heads(sha: np.ndarray) -> np.ndarray:
    """Node -> first node with the same bytes (itself when its bytes are unique or unknown); in memory, for small inputs."""
    head = np.arange(len(sha), dtype=np.int64)
    known = np.flatnonzero(pd.notna(sha))  # elementwise: sha is an object array
    if not len(known):
        return head
    codes, _ = pd.factorize(sha[known])
    first_of_code = np.full(codes.max() + 1, len(sha), dtype=np.int64)
    np.minimum.at(first_of_code, codes, known)
    head[known] = first_of_code[codes]
    return head


def guarded_clusters(head: np.ndarray, a: np.ndarray, b: np.ndarray, margin, contains=None):
    """Chaining guard over identical-bytes groups contracted to one node each, then expanded (all edges in memory):
    the in-memory twin of dedup.stages.cluster.guarded_clusters_streamed."""
    from dedup.search.union_find import cluster_with_guard
    from dedup.stages.cluster import SUPPORT_SLACK, GuardedClusters, _onto_heads

    a, b = _onto_heads(head, a, b)
    result = cluster_with_guard(len(head), a, b, margin, guard_threshold=0.0,
                                support_threshold=-SUPPORT_SLACK, contains=contains)
    is_head = head == np.arange(len(head))  # every group member takes its head's label, in memory
    return GuardedClusters(result.labels[head], result.is_representative & is_head, int(result.passes))


def drop_separated_edges(run: RunDir, node_ids: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (node indices into node_ids) without the ones a reviewer separated, the overrides read for the call."""
    from dedup.stages.overrides import load_overrides, separated_edges

    overrides = load_overrides(run)
    if overrides.empty:
        return a, b
    keep = ~separated_edges(overrides, node_ids[a], node_ids[b])
    return a[keep], b[keep]


# ---------------------------------------------------------------- report gallery by risk (every cluster's score in memory)


def riskiest(path, top: int) -> list[int]:
    scores = pd.read_parquet(path, columns=["cluster_id", "risk", "rank"])
    return scores.sort_values(["risk", "rank"], ascending=[False, True]).head(top)["cluster_id"].tolist()


# ---------------------------------------------------------------- cluster nodes (every id, prefix and candidate string in RAM)
#
# dedup.stages.cluster.read_nodes and guidance.run_nodes before the out-of-core builder, verbatim but for the
# imports: ids, ok, prefix keys and known concatenated, all prefixes argsorted at once, every candidate's sha256
# gathered into one Arrow array.


def read_nodes(run: RunDir):
    """Sample ids, ok mask and identical-bytes heads, reading sample_id, status and sha256 part by part."""
    import pyarrow.compute as pc

    from dedup.stages.cluster import _Nodes, iter_sample_tables, prefix_keys

    ids, ok, keys, known = [], [], [], []
    for table in iter_sample_tables(run, ["status", "sha256"]):
        ids.append(table["sample_id"].to_numpy())
        ok.append(pc.fill_null(pc.equal(table["status"].combine_chunks(), "ok"), False).to_numpy(zero_copy_only=False))
        sha = table["sha256"].combine_chunks()
        known.append(ok[-1] & sha.is_valid().to_numpy(zero_copy_only=False))
        keys.append(prefix_keys(sha))
    ids, ok, keys, known = (np.concatenate(x) for x in (ids, ok, keys, known))
    return _Nodes(ids.astype(np.int64), ok, _heads(run, keys, known), known)


def run_nodes(run: RunDir) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(every sample id, sorted; identical-bytes pairs (first sample id, other sample id)), read part by part."""
    import pyarrow.compute as pc

    from dedup.stages.cluster import iter_sample_tables, prefix_keys

    ids, keys, known = [], [], []
    for table in iter_sample_tables(run, ["sha256"]):
        sha = table["sha256"].combine_chunks()
        ids.append(table["sample_id"].to_numpy())
        known.append(pc.is_valid(sha).to_numpy(zero_copy_only=False))
        keys.append(prefix_keys(sha))
    ids, keys, known = (np.concatenate(x) for x in (ids, keys, known))
    head = _heads(run, keys, known)
    joined = np.flatnonzero(head != np.arange(len(head)))
    return ids.astype(np.int64), (ids[head[joined]].astype(np.int64), ids[joined].astype(np.int64))


def _heads(run: RunDir, keys: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Identical-bytes heads out of core: sort the 64-bit prefixes, then verify candidate runs on the full sha256."""
    head = np.arange(len(keys), dtype=np.int64)
    candidates = _prefix_runs(keys, known)
    if not len(candidates):
        return head
    full = _strings_of(run, candidates)
    codes = full.dictionary_encode().indices.to_numpy()  # exact equality, in Arrow (no Python object per row)
    first_of_code = np.full(codes.max() + 1, len(keys), dtype=np.int64)
    np.minimum.at(first_of_code, codes, candidates)
    head[candidates] = first_of_code[codes]
    return head


def _prefix_runs(keys: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Known nodes whose prefix another known node shares, in node order."""
    nodes = np.flatnonzero(known)
    order = np.argsort(keys[nodes], kind="stable")
    sorted_keys = keys[nodes][order]
    repeated = np.zeros(len(nodes), dtype=bool)
    same = sorted_keys[1:] == sorted_keys[:-1]
    repeated[1:] |= same
    repeated[:-1] |= same
    return np.sort(nodes[order][repeated])


def _strings_of(run: RunDir, nodes: np.ndarray):
    """The sha256 strings of the given (sorted) nodes, read part by part."""
    import pyarrow as pa

    from dedup.stages.cluster import iter_sample_tables

    pieces, start = [], 0
    for table in iter_sample_tables(run, ["sha256"]):
        stop = start + len(table)
        lo, hi = np.searchsorted(nodes, [start, stop])
        if hi > lo:
            pieces.append(table["sha256"].combine_chunks().take(pa.array(nodes[lo:hi] - start)))
        start = stop
    return pa.concat_arrays(pieces).cast(pa.large_string())
