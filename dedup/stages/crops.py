"""Crop stage: large crops of a photo found through windows of its stored perceptual vector.

Writes neighbors/perceptual-crops/part_0.parquet (EDGES; id_a = the containing
image, id_b = the crop, similarity = the containment score), which the cluster
stage reads beside the descriptors' own edges, and provides the `contains`
scorer its chaining guard uses: a crop joins its parent's cluster without
resembling the parent's other crops (`dedup.search.union_find`).

Two-stage search (`dedup.search.crops`): every image looked up in an index of
a few coarse windows of all images, then a local window search on the proposed
pairs only; the run refuses when that index would not fit the memory budget.
Runs on the perceptual vectors alone (nothing more is stored at embed time); a
run without them has no crop edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dedup.engine import run_stage
from dedup.errors import DedupError
from dedup.records import EDGES, RunDir, embedding_parts, fingerprint, open_embeddings, write_record
from dedup.run import Run

DESCRIPTOR = "perceptual"
CROPS = f"{DESCRIPTOR}-crops"  # the neighbours folder of the crop edges (and their `descriptor` value)


def _vectors(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    vectors = open_embeddings(run, DESCRIPTOR)
    return vectors.ids, np.asarray(vectors[0 : len(vectors)], dtype=np.float32)


def _same_picture(vectors: np.ndarray, threshold: float):
    from dedup.descriptors.perceptual import dihedral_variants
    from dedup.search.pairs import pair_similarity

    similarity = pair_similarity(vectors, dihedral_variants)
    return lambda a, b: similarity(a, b) >= threshold


def _check_memory(count: int, budget: int) -> None:
    """The search holds every vector and its window index in memory (~9 KB an image): refuse before loading."""
    from dedup.search.crops import BYTES_PER_IMAGE

    needed = count * BYTES_PER_IMAGE
    if needed > budget:
        raise DedupError(f"--large-crops needs {needed / 1024**3:.1f} GiB for the window index of {count:,} images, "
                         f"over the memory budget of {budget / 1024**3:.1f} GiB",
                         hint="raise --memory, or run again with --no-large-crops")


def find_crop_edges(run: RunDir, threshold: float, memory_budget: int) -> pd.DataFrame:
    """The verified crop edges of a run's perceptual vectors as an EDGES frame."""
    from dedup.search.crops import crop_edges

    _check_memory(len(open_embeddings(run, DESCRIPTOR)), memory_budget)
    ids, vectors = _vectors(run)
    edges = crop_edges(vectors, _same_picture(vectors, threshold), copy_cut=threshold)
    return pd.DataFrame({
        "id_a": ids[edges.parent], "id_b": ids[edges.child], "key_a": None, "key_b": None,
        "similarity": edges.score.astype(np.float32), "descriptor": CROPS,
    })


class CropStage:
    """One task: the perceptual vectors -> neighbors/perceptual-crops/part_0.parquet."""

    name = "crops"

    def __init__(self, run: Run) -> None:
        self.run_dir = run
        self.threshold = float(run.settings.thresholds.get(DESCRIPTOR, 0.0))
        self.memory_budget = run.settings.memory_budget_bytes

    def task_ids(self) -> list[str]:
        return ["0"]

    def _output(self):
        return self.run_dir.neighbors_dir(CROPS) / "part_0.parquet"

    def fingerprint(self) -> str:
        from dedup.search import crops

        parts = [self.run_dir.embedding_part(DESCRIPTOR, p) for p in embedding_parts(self.run_dir, DESCRIPTOR)]
        return fingerprint(parts, {"threshold": self.threshold, "cut": crops.CROP_CUT, "proposals": crops.PROPOSALS,
                                   "large_crop_area": crops.LARGE_CROP_AREA, "product_slack": crops.PRODUCT_SLACK,
                                   "give_up": list(crops.GIVE_UP_MARGINS)})

    def reset(self) -> None:
        self._output().unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        edges = find_crop_edges(self.run_dir, self.threshold, self.memory_budget)
        self._output().parent.mkdir(parents=True, exist_ok=True)
        write_record(edges, self._output(), EDGES)
        progress(len(edges))
        return {"crop_edges": len(edges)}

    def close(self) -> None:
        pass


def crop_search_enabled(run: Run) -> bool:
    """`dedup run --large-crops` (settings.large_crops) on a run with perceptual vectors."""
    return DESCRIPTOR in run.settings.descriptors and run.settings.large_crops


def find_crops(run: Run) -> dict[str, int]:
    """The crop stage behind the engine when the registry enables it; otherwise old crop edges are removed."""
    if not crop_search_enabled(run):
        CropStage(run).reset()  # never cluster on crop edges of an earlier, enabled run
        return {"crop_edges": 0}
    report = run_stage(run, CropStage(run), unit="edges")
    return {k: int(v) for k, v in report.stats.items()}


# ---------------------------------------------------------------- the cluster stage's hooks


def crop_edge_nodes(run: RunDir, node_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(parent, child) node indices of the run's crop edges (none when the crop stage has not run)."""
    path = run.neighbors_dir(CROPS) / "part_0.parquet"
    empty = np.empty(0, dtype=np.int64)
    if not path.exists() or not len(node_ids):
        return empty, empty
    edges = pd.read_parquet(path, columns=["id_a", "id_b"])
    ends = [edges[column].to_numpy(dtype=np.int64) for column in ("id_a", "id_b")]
    nodes = [np.minimum(np.searchsorted(node_ids, end), len(node_ids) - 1) for end in ends]
    # Edges of samples no longer in the run (re-embedded after the crop stage ran) are dropped, never misplaced.
    known = (node_ids[nodes[0]] == ends[0]) & (node_ids[nodes[1]] == ends[1])
    return nodes[0][known], nodes[1][known]


def contains_scorer(run: RunDir, node_ids: np.ndarray, crop_nodes: tuple[np.ndarray, np.ndarray]):
    """`contains(reps, members)` for the chaining guard: containment score minus the crop cut, either way round.

    Only pairs with an end of a verified crop edge (the member or the representative) are scored (every
    other pair: -inf), so the guard's verdict on ordinary clusters is unchanged; None when the run has no
    crop edges.
    """
    from dedup.search.crops import CROP_CUT, containment

    if not len(crop_nodes[0]):
        return None
    ids, vectors = _vectors(run)
    row_of_node = np.full(len(node_ids), -1, dtype=np.int64)
    row_of_node[np.searchsorted(node_ids, ids)] = np.arange(len(ids))
    in_crop_edge = np.zeros(len(node_ids), dtype=bool)
    in_crop_edge[np.concatenate(crop_nodes)] = True

    def contains(reps: np.ndarray, members: np.ndarray) -> np.ndarray:
        score = np.full(len(reps), -np.inf, dtype=np.float64)
        ra, rb = row_of_node[reps], row_of_node[members]
        # Either end: when a crop is its cluster's representative (its own crops give it the most edges),
        # the plain copies of its photo contain it and must stay (issue 12, BENCHMARKS.md round 4).
        check = np.flatnonzero((in_crop_edge[members] | in_crop_edge[reps]) & (ra >= 0) & (rb >= 0))
        if len(check):
            both_ways = np.maximum(containment(vectors, ra[check], rb[check]), containment(vectors, rb[check], ra[check]))
            turned = np.flatnonzero((both_ways < CROP_CUT) & ~in_crop_edge[members[check]])
            both_ways[turned] = _turned_containment(vectors, rb[check[turned]], ra[check[turned]])
            score[check] = both_ways - CROP_CUT
        return score

    return contains


def _turned_containment(vectors: np.ndarray, parents: np.ndarray, children: np.ndarray) -> np.ndarray:
    """Containment of each child in the best of its parent's 8 flips and turns.

    A flipped or turned copy of a photo contains the photo's crop the other way round. It has no crop edge
    of its own, so when that crop represents the cluster it is only kept through this (kodim12's `vflip`
    and `rot90` copies on the held-out set).
    """
    from dedup.descriptors.perceptual import dihedral_variants
    from dedup.search.crops import containment

    if not len(parents):
        return np.zeros(0, dtype=np.float32)
    variants = dihedral_variants(vectors[parents])  # (8, k, dim)
    count = len(parents)
    stack = np.concatenate([vectors[children], variants.reshape(-1, vectors.shape[1])])
    rows = count + np.arange(len(variants) * count)
    scores = containment(stack, rows, np.tile(np.arange(count), len(variants)))
    return scores.reshape(len(variants), count).max(axis=0)
