"""Cluster stage wiring: edges of every descriptor + exact-hash groups -> clusters.parquet.

Node i is the i-th sample in sample_id order (failed samples included, so
every sample gets a row; only samples with status `ok` get edges, so a failed
one is always alone). Identical bytes (sha256) are one node for the chaining
guard and expand afterwards, so they always share a cluster. The guard
compares each member with its cluster's representative using every
descriptor: a member stays if it passes *some* descriptor's guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dedup.engine import run_stage
from dedup.errors import DedupError
from dedup.records import CLUSTERS, RunDir, fingerprint, load_samples, open_embeddings, write_record
from dedup.run import Run
from dedup.search.union_find import cluster_with_guard
from dedup.stages.crops import contains_scorer, crop_edge_nodes
from dedup.stages.overrides import drop_separated_edges

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
    row_of_node: np.ndarray
    similarity: object  # dedup.search.pairs.PairSimilarity over rows
    guard: float


def _views(run: RunDir, node_ids: np.ndarray, descriptors: list[str], guards: dict[str, float]) -> list[_DescriptorView]:
    from dedup.descriptors import query_transform_for
    from dedup.search.pairs import pair_similarity

    views = []
    for name in descriptors:
        vectors = open_embeddings(run, name)  # memory maps: the guard reads only the rows it compares
        ids = vectors.ids
        row_of_node = np.full(len(node_ids), -1, dtype=np.int64)
        row_of_node[np.searchsorted(node_ids, ids)] = np.arange(len(ids))
        views.append(_DescriptorView(name, row_of_node, pair_similarity(vectors, query_transform_for(name)), guards[name]))
    return views


def _exact_heads(sha: np.ndarray) -> np.ndarray:
    """Node -> first node with the same bytes (itself when its bytes are unique or unknown)."""
    head = np.arange(len(sha), dtype=np.int64)
    known = np.flatnonzero(pd.notna(sha))  # elementwise: sha is an object array
    if not len(known):
        return head
    codes, _ = pd.factorize(sha[known])
    first_of_code = np.full(codes.max() + 1, len(sha), dtype=np.int64)
    np.minimum.at(first_of_code, codes, known)
    head[known] = first_of_code[codes]
    return head


@dataclass(frozen=True)
class GuardedClusters:
    labels: np.ndarray  # int64 node index of each node's representative
    is_representative: np.ndarray  # bool
    passes: int  # guard passes that ran

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.labels))[self.labels]


def guarded_clusters(head: np.ndarray, a: np.ndarray, b: np.ndarray, margin, contains=None) -> GuardedClusters:
    """Chaining guard over identical-bytes groups contracted to one node each, then expanded.

    Each group travels as its head: edges are moved onto heads, the guard sees one
    node per group, and every member takes its head's label afterwards. So identical
    bytes end in one cluster whatever the guard does (however many passes it needs).
    """
    n_nodes = len(head)
    a, b = head[a], head[b]
    apart = a != b
    result = cluster_with_guard(n_nodes, a[apart], b[apart], margin, guard_threshold=0.0,
                                support_threshold=-SUPPORT_SLACK, contains=contains)
    is_head = head == np.arange(n_nodes)
    return GuardedClusters(result.labels[head], result.is_representative & is_head, int(result.passes))


def _descriptor_edges(run: RunDir, name: str, threshold: float, node_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from dedup.records import iter_edge_parts

    # File by file as int64 arrays: no frame of every edge (with its keys) is ever built.
    parts = [(np.searchsorted(node_ids, a), np.searchsorted(node_ids, b)) for a, b in iter_edge_parts(run, name, threshold)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


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
    same_bytes = (sha[reps] == sha[members]) & pd.notna(sha[members])
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
    """Cluster a run with explicit cuts and guards (no settings read), so tests and `cluster` share one path."""
    samples = load_samples(run, ["sample_id", "shard_index", "shard", "key", "url", "caption", "status", "sha256"])
    samples = samples.sort_values("sample_id", ignore_index=True)
    node_ids = samples["sample_id"].to_numpy()
    ok = (samples["status"] == "ok").to_numpy()
    sha = _usable_sha(samples["sha256"], ok)
    head = _exact_heads(sha)
    crop_nodes = crop_edge_nodes(run, node_ids)  # large crops: dedup/stages/crops.py
    a, b = _ok_edges([_descriptor_edges(run, d, thresholds[d], node_ids) for d in descriptors] + [crop_nodes], ok)
    a, b = drop_separated_edges(run, node_ids, a, b)  # review overrides (OUT/overrides.parquet)
    views = _views(run, node_ids, descriptors, guards)
    result = guarded_clusters(head, a, b, lambda r, m: _best_match(views, sha, r, m)[0],
                              contains=contains_scorer(run, node_ids, crop_nodes))
    similarity, matched_by = _explain(views, sha, result.labels, result.is_representative)
    clusters = samples.drop(columns=["sha256"]).assign(
        cluster_id=node_ids[result.labels],
        cluster_size=result.sizes().astype(np.int64),
        is_representative=result.is_representative,
        similarity_to_representative=similarity,
        matched_by=matched_by.astype(str),
    )[CLUSTER_COLUMNS]
    stats = {
        "samples": len(clusters),
        "edges": int(len(a) + (head != np.arange(len(head))).sum()),
        "clusters_with_copies": int(clusters.loc[clusters["cluster_size"] > 1, "cluster_id"].nunique()),
        "samples_in_clusters": int((clusters["cluster_size"] > 1).sum()),
        "guard_passes": int(result.passes),
    }
    return clusters, stats


def _usable_sha(sha256: pd.Series, ok: np.ndarray) -> np.ndarray:
    """sha256 of samples that decoded; None elsewhere.

    A failed sample never matches by bytes: every 0-byte image has the sha256 of
    empty bytes, and twenty of them are not twenty copies of one picture.
    """
    sha = sha256.to_numpy(dtype=object)
    return np.where(pd.isna(sha) | ~ok, None, sha)


def _ok_edges(parts: list[tuple[np.ndarray, np.ndarray]], ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descriptor edges between two usable samples (a failed sample keeps its row, alone)."""
    empty = np.empty(0, dtype=np.int64)
    a = np.concatenate([empty] + [p[0] for p in parts]).astype(np.int64)
    b = np.concatenate([empty] + [p[1] for p in parts]).astype(np.int64)
    both = ok[a] & ok[b]
    return a[both], b[both]


class ClusterStage:
    """One task: every descriptor's edges + identical bytes -> clusters.parquet.

    The fingerprint names the edges, the samples and the cuts, so a changed
    threshold or guard (run.json) or new edges cluster again.
    """

    name = "cluster"

    def __init__(self, run: Run) -> None:
        self.run_dir = run
        self.settings = run.settings

    def task_ids(self) -> list[str]:
        return ["0"]

    def fingerprint(self) -> str:
        inputs = [*self.run_dir.root.glob("neighbors/*/part_*.parquet"), *self.run_dir.root.glob("samples/*.parquet"),
                  self.run_dir.overrides]
        cuts = {"thresholds": self.settings.thresholds, "guards": self.settings.guards}
        return fingerprint(inputs, cuts)

    def reset(self) -> None:
        self.run_dir.clusters.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        settings = self.settings
        clusters, stats = cluster_run(self.run_dir, settings.descriptors, settings.thresholds, settings.guards)
        write_record(clusters, self.run_dir.clusters, CLUSTERS)
        progress(len(clusters))
        return stats

    def close(self) -> None:
        pass


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
    report = run_stage(run, ClusterStage(run))
    return {k: int(v) for k, v in report.stats.items()}
