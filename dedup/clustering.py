"""Cluster stage wiring: edges of every descriptor + exact-hash groups -> clusters.parquet.

Node i is the i-th sample in sample_id order (failed samples included, so
every sample gets a row). The chaining guard compares each member with its
cluster's representative, and with the cluster's anchor (`SUPPORT_SLACK`),
using every descriptor: a member stays if it is byte-identical to the
representative or passes *some* descriptor's guard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dedup.cluster import cluster_with_guard
from dedup.store import RunDir, load_embeddings, load_samples

CLUSTER_COLUMNS = [
    "sample_id", "shard_index", "shard", "key", "url", "caption", "status",
    "cluster_id", "cluster_size", "is_representative", "similarity_to_representative", "matched_by",
]
EXACT = "sha256"
# Support check of the chaining guard (dedup.cluster): every member must also be
# within this of its descriptor's guard against the cluster's anchor (the member
# closest to the representative). Unrelated photos score ~0 (real-dups: at most
# 0.38), so a hub such as a blend of two photos cannot hold both in one cluster.
SUPPORT_SLACK = 0.25


@dataclass
class _DescriptorView:
    """A descriptor's vectors addressed by node index (-1 = node has no vector)."""

    name: str
    row_of_node: np.ndarray
    similarity: object  # dedup.neighbors.PairSimilarity over rows
    guard: float


def _views(run: RunDir, node_ids: np.ndarray, descriptors: list[str], guards: dict[str, float]) -> list[_DescriptorView]:
    from dedup.neighbors import pair_similarity
    from dedup.pipeline import query_transform_for

    views = []
    for name in descriptors:
        ids, vectors = load_embeddings(run, name)
        row_of_node = np.full(len(node_ids), -1, dtype=np.int64)
        row_of_node[np.searchsorted(node_ids, ids)] = np.arange(len(ids))
        views.append(_DescriptorView(name, row_of_node, pair_similarity(vectors, query_transform_for(name)), guards[name]))
    return views


def _exact_edges(sha: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Star edges from the first node of each identical-bytes group to the others."""
    known = sha.notna().to_numpy()
    nodes = np.flatnonzero(known)
    codes, _ = pd.factorize(sha[known])
    order = np.lexsort((nodes, codes))
    codes, nodes = codes[order], nodes[order]
    first = np.ones(len(nodes), dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    head = nodes[first][np.cumsum(first) - 1]
    return head[~first], nodes[~first]


def _descriptor_edges(run: RunDir, name: str, threshold: float, node_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from dedup.pipeline import load_edges

    edges = load_edges(run, name, threshold)
    return np.searchsorted(node_ids, edges["id_a"].to_numpy()), np.searchsorted(node_ids, edges["id_b"].to_numpy())


def _best_match(views: list[_DescriptorView], sha: np.ndarray, reps: np.ndarray, members: np.ndarray):
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
    same_bytes = (sha[reps] == sha[members]) & (sha[members] != None)  # noqa: E711 - object array
    margin[same_bytes], similarity[same_bytes], matched_by[same_bytes] = np.inf, 1.0, EXACT
    return margin, similarity, matched_by


def _explain(views, sha, labels, is_rep) -> tuple[np.ndarray, np.ndarray]:
    """similarity_to_representative and matched_by of every node (representatives: 1.0, `self`)."""
    similarity = np.ones(len(labels), dtype=np.float32)
    matched_by = np.where(is_rep, "self", "").astype(object)
    members = np.flatnonzero(~is_rep)
    _, similarity[members], matched_by[members] = _best_match(views, sha, labels[members], members)
    return similarity, matched_by


def cluster_run(run: RunDir, descriptors: list[str], thresholds: dict[str, float],
                guards: dict[str, float]) -> tuple[pd.DataFrame, dict[str, int]]:
    samples = load_samples(run, ["sample_id", "shard_index", "shard", "key", "url", "caption", "status", "sha256"])
    samples = samples.sort_values("sample_id", ignore_index=True)
    node_ids = samples["sample_id"].to_numpy()
    sha = samples["sha256"].to_numpy(dtype=object)
    sha = np.where(pd.isna(sha), None, sha)
    parts = [_exact_edges(samples["sha256"])] + [_descriptor_edges(run, d, thresholds[d], node_ids) for d in descriptors]
    a = np.concatenate([p[0] for p in parts]).astype(np.int64)
    b = np.concatenate([p[1] for p in parts]).astype(np.int64)
    views = _views(run, node_ids, descriptors, guards)
    result = cluster_with_guard(len(node_ids), a, b, lambda r, m: _best_match(views, sha, r, m)[0], guard_threshold=0.0,
                                support_threshold=-SUPPORT_SLACK)
    similarity, matched_by = _explain(views, sha, result.labels, result.is_representative)
    clusters = samples.drop(columns=["sha256"]).assign(
        cluster_id=node_ids[result.labels],
        cluster_size=result.sizes().astype(np.int64),
        is_representative=result.is_representative,
        similarity_to_representative=similarity,
        matched_by=matched_by.astype(str),
    )[CLUSTER_COLUMNS]
    stats = {
        "samples": int(len(clusters)),
        "edges": int(len(a)),
        "clusters_with_copies": int(clusters.loc[clusters["cluster_size"] > 1, "cluster_id"].nunique()),
        "samples_in_clusters": int((clusters["cluster_size"] > 1).sum()),
        "guard_passes": int(result.passes),
    }
    return clusters, stats
