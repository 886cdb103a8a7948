"""Two-stage search for large crops (pure: vectors in, crop edges out; no file I/O).

Stage 1 (proposal): every image's whole-view half, cut to its lowest
`PROPOSAL_COEFFICIENTS` frequencies, is looked up in a faiss index of the
`COARSE_WINDOWS` windows of all images rebuilt from the stored vectors
(`dedup.descriptors.crops`; exact while small, IVF beyond, so no all-pairs step);
each image keeps its `PROPOSALS` best parents. Stage 2 (verification): each
proposed (parent, child) pair's window is refined by a local search on all 128
frequencies; the pair is a crop edge when the score clears `CROP_CUT` and the
child is *specific*: every other proposed parent scoring within `RIVAL_MARGIN`
of it is a copy of that parent, and the best window keeps at least `LARGE_CROP_AREA`
of the parent. A patch of plain sky fits a window of any sky;
a real crop fits one photo and its copies only (measured on crops of real
photos and of 3x3 cells of them: BENCHMARKS.md, issue 12).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dedup.descriptors import crops as windows_of

# Two scales, 3x3 positions: the parent windows a crop's whole view is proposed against.
COARSE_WINDOWS = windows_of.grid_windows([(0.85, 0.85), (0.72, 0.72)], 3)  # 72 % and 52 % of the area
PROPOSAL_COEFFICIENTS = 55  # frequencies u + v <= 9: the ones a window rebuilds well
PROPOSALS = 6  # parents verified per image
PROPOSAL_FLOOR = 0.3  # a proposal below this (55 frequencies) is never a crop (real-dups: the Hopper crops start at 0.44)
CROP_CUT = 0.65  # refined containment score of a crop edge
RIVAL_MARGIN = 0.1
# Issue 12: a large crop keeps 50-75 % of the area. The window search may go down to MIN_AREA (0.47) so that
# it can climb; a child whose best window stays under this share is a smaller part of the photo (the
# benchmark's 20-40 % distractor crops sit at the 0.47 floor), not a crop edge (BENCHMARKS.md, round 4).
LARGE_CROP_AREA = 0.5
PRODUCT_SLACK = 0.05  # a crop of a crop: two estimated window areas multiplied, so their errors too
# A pair still this far under the cut after each refine step stops climbing (measured: BENCHMARKS.md).
GIVE_UP_MARGINS = (0.15, 0.08, 0.03, 0.0)
QUERY_BLOCK = 2048  # images looked up per index search (bounds the hits held at once)
WINDOW_HITS = 96  # windows fetched per image; the best per other image competes for its PROPOSALS
# The window index: exact up to this many windows (~1,100 images), IVF beyond with sqrt(windows) lists
# (measured on the held-out benchmark: BENCHMARKS.md "Large crops round 4").
FLAT_MAX_WINDOWS = 20_000
IVF_NPROBE = 16
TRAIN_PER_LIST = 40  # k-means sample per list (faiss warns below 39)
# What the search holds per image at its peak (filling the index): its float32 stored vector and query, its
# coarse windows twice (the built array and the index's copy) and their int64 ids in the inverted lists.
BYTES_PER_IMAGE = (4 * (windows_of.DIM + (2 * len(COARSE_WINDOWS) + 1) * PROPOSAL_COEFFICIENTS)
                   + 8 * len(COARSE_WINDOWS))


@dataclass(frozen=True)
class CropEdges:
    parent: np.ndarray  # int64 row of the containing image
    child: np.ndarray  # int64 row of the crop
    score: np.ndarray  # float32 refined containment score

    def __len__(self) -> int:
        return len(self.parent)


def _usable(vectors: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(vectors[:, : windows_of.VIEW_DIM], dtype=np.float32), axis=1) > 0


def _window_index(windows: np.ndarray):
    """Inner-product index of the coarse window vectors: exact while few, IVF beyond (k-means on a sample)."""
    import faiss

    dim = windows.shape[1]
    if len(windows) <= FLAT_MAX_WINDOWS:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(math.sqrt(len(windows)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(windows), min(len(windows), TRAIN_PER_LIST * nlist), replace=False)
        index.train(windows[np.sort(sample)])
        index.nprobe = IVF_NPROBE
    index.add(windows)
    return index


def _coarse_windows(vectors: np.ndarray) -> np.ndarray:
    """(n * len(COARSE_WINDOWS), PROPOSAL_COEFFICIENTS) window vectors, row r * W + w for window w of image r.

    Built a block of images at a time: a block's full signatures are 4x the size of what is kept.
    """
    out = np.empty((len(vectors) * len(COARSE_WINDOWS), PROPOSAL_COEFFICIENTS), dtype=np.float32)
    for start in range(0, len(vectors), QUERY_BLOCK):
        block = windows_of.window_signatures(windows_of.coefficient_blocks(vectors[start : start + QUERY_BLOCK]),
                                             COARSE_WINDOWS)
        rows = slice(start * len(COARSE_WINDOWS), (start + len(block)) * len(COARSE_WINDOWS))
        out[rows] = windows_of.truncate(block, PROPOSAL_COEFFICIENTS).reshape(-1, PROPOSAL_COEFFICIENTS)
    return out


def _best_parents(rows: np.ndarray, owners: np.ndarray, sims: np.ndarray, windows: np.ndarray,
                  proposals: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of window hits (query row, owner image, score, window), each row's `proposals` best owners over the floor.

    Hits come sorted by row, best first within a row (faiss order), so an owner's first hit is its best window.
    """
    first = np.unique(rows * (owners.max() + 1) + owners, return_index=True)[1]
    rows, owners, sims, windows = rows[first], owners[first], sims[first], windows[first]
    order = np.lexsort((-sims, rows))
    rows, owners, sims, windows = rows[order], owners[order], sims[order], windows[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    keep = (rank < proposals) & (sims >= PROPOSAL_FLOOR)
    return owners[keep], rows[keep], windows[keep]


def propose(vectors: np.ndarray, proposals: int = PROPOSALS,
            copy_cut: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parent, child, best coarse window) of each image's best-fitting other images (stage 1).

    Every image's whole half is looked up among the windows of all images (`_window_index`: no all-pairs
    product beyond a few thousand images); of its `WINDOW_HITS` best windows the best per other image counts.
    Images at plain cosine >= `copy_cut` are copies the ordinary search already joins: they are not
    proposed, or a photo with many copies would fill every proposal with them and never meet its parent.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    usable = np.flatnonzero(_usable(vectors))
    empty = np.empty(0, dtype=np.int64)
    if len(usable) < 2:
        return empty, empty, empty
    count = len(COARSE_WINDOWS)
    index = _window_index(_coarse_windows(vectors[usable]))
    queries = np.ascontiguousarray(windows_of.truncate(windows_of.whole_halves(vectors[usable]), PROPOSAL_COEFFICIENTS))
    hits = min(WINDOW_HITS, index.ntotal)
    found = [empty, empty, empty]
    for start in range(0, len(usable), QUERY_BLOCK):
        sims, labels = index.search(queries[start : start + QUERY_BLOCK], hits)
        rows = np.repeat(np.arange(start, start + len(sims)), hits)
        labels, sims = labels.ravel(), sims.ravel()
        owners = labels // count
        keep = (labels >= 0) & (owners != rows)  # never its own parent
        if copy_cut is not None:
            cosine = np.einsum("ij,ij->i", vectors[usable[rows[keep]]], vectors[usable[owners[keep]]])
            keep[np.flatnonzero(keep)[cosine >= copy_cut]] = False
        if keep.any():
            block = _best_parents(rows[keep], owners[keep], sims[keep], labels[keep] % count, proposals)
            found = [np.concatenate([a, b]) for a, b in zip(found, block, strict=True)]
    return usable[found[0]], usable[found[1]], found[2]


def containment(vectors: np.ndarray, parents: np.ndarray, children: np.ndarray,
                start_windows: np.ndarray | None = None) -> np.ndarray:
    """Refined containment score of each (parent row, child row) pair (stage 2; -1 where either has no vector).

    Without start windows each pair starts from its best coarse window.
    """
    return containment_and_area(vectors, parents, children, start_windows)[0]


def containment_and_area(vectors: np.ndarray, parents: np.ndarray, children: np.ndarray,
                         start_windows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`containment` and the share of the parent's area its best window keeps (0 where either has no vector)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    parents, children = np.asarray(parents, dtype=np.int64), np.asarray(children, dtype=np.int64)
    score = np.full(len(parents), -1.0, dtype=np.float32)
    area = np.zeros(len(parents), dtype=np.float64)
    both = np.flatnonzero(_usable(vectors[parents]) & _usable(vectors[children]))
    if not len(both):
        return score, area
    blocks = windows_of.coefficient_blocks(vectors[parents[both]])
    halves = windows_of.whole_halves(vectors[children[both]])
    if start_windows is None:
        coarse = np.broadcast_to(COARSE_WINDOWS, (len(both), *COARSE_WINDOWS.shape))
        start = COARSE_WINDOWS[windows_of.pair_window_scores(blocks, halves, coarse).argmax(axis=1)]
    else:
        start = COARSE_WINDOWS[np.asarray(start_windows)[both]]
    give_up = tuple(CROP_CUT - margin for margin in GIVE_UP_MARGINS)
    refined, window = windows_of.refine(blocks, halves, start, give_up)
    area[both] = window[:, 2] * window[:, 3]
    # A best window pressed under LARGE_CROP_AREA wants a smaller part of the parent than a large crop keeps.
    refined[area[both] < LARGE_CROP_AREA] = -1.0
    score[both] = refined
    return score, area


def specific(vectors: np.ndarray, parents: np.ndarray, children: np.ndarray, score: np.ndarray,
             same_picture: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Mask of pairs clearing CROP_CUT whose close rival parents are all copies or crops of their parent.

    `same_picture(rows_a, rows_b)` says whether two images are copies (the descriptor's own cut); a rival
    the parent contains is another crop of it (two crops of one photo overlap).
    """
    # Every (pair, rival) of one child: pairs are few per child (PROPOSALS), so this stays small.
    order = np.argsort(children, kind="stable")
    starts = np.searchsorted(children[order], children, side="left")
    ends = np.searchsorted(children[order], children, side="right")
    candidates = np.flatnonzero(score >= CROP_CUT)
    counts = ends[candidates] - starts[candidates]
    pair = np.repeat(candidates, counts)
    offsets = np.arange(len(pair)) - np.repeat(np.cumsum(counts) - counts, counts)
    rival = order[np.repeat(starts[candidates], counts) + offsets]
    close = (parents[rival] != parents[pair]) & (score[rival] >= score[pair] - RIVAL_MARGIN)
    pair, rival = pair[close], rival[close]
    # One (parent, rival) pair recurs for many children (the crops of one photo share their rivals): each once.
    pairs, inverse = np.unique(np.stack([parents[pair], parents[rival]], axis=1), axis=0, return_inverse=True)
    related = np.asarray(same_picture(pairs[:, 0], pairs[:, 1]), dtype=bool) if len(pairs) else np.ones(0, bool)
    other = np.flatnonzero(~related)
    related[other] = containment(vectors, pairs[other, 0], pairs[other, 1]) >= CROP_CUT
    copies = related[inverse.ravel()]
    keep = np.zeros(len(parents), dtype=bool)
    keep[candidates] = True
    keep[pair[~copies]] = False
    return keep


def crop_edges(vectors: np.ndarray, same_picture: Callable[[np.ndarray, np.ndarray], np.ndarray],
               proposals: int = PROPOSALS, copy_cut: float | None = None) -> CropEdges:
    """Both stages over every row: the verified (parent, child, score) crop edges."""
    parents, children, window = propose(vectors, proposals, copy_cut)
    score, area = containment_and_area(vectors, parents, children, window)
    keep = specific(vectors, parents, children, score, same_picture)
    keep[keep] = ~from_crops(vectors, parents[keep], children[keep], score[keep], area[keep])
    return CropEdges(parents[keep], children[keep], score[keep])


def from_crops(vectors: np.ndarray, parents: np.ndarray, children: np.ndarray, score: np.ndarray,
               area: np.ndarray) -> np.ndarray:
    """Mask of edges whose child is a crop of a crop: under LARGE_CROP_AREA of the photo its parent is cut from.

    A crop of a crop keeps the product of their areas (two large crops: 25-56 % of the photo). Such edges
    chained the benchmark's 20-40 % distractor crops through a `crop_large` copy into its photo's cluster
    (BENCHMARKS.md, round 4). An edge's parent is a crop when an edge into it beats its reverse containment
    (a large crop's window also fits most of the photo, a little worse); a copy trimmed 8 % a side is one
    too, but a large crop of it still keeps over half the photo. `score` and `area`: `containment_and_area`
    of the edges.
    """
    if not len(parents):
        return np.zeros(0, dtype=bool)
    reverse = containment(vectors, children, parents)
    kept = np.ones(len(vectors), dtype=np.float64)  # share of its photo each image keeps
    into = score > reverse
    np.minimum.at(kept, children[into], area[into])
    return kept[parents] * area < LARGE_CROP_AREA - PRODUCT_SLACK


__all__ = ["BYTES_PER_IMAGE", "CROP_CUT", "CropEdges", "containment", "containment_and_area", "crop_edges", "from_crops", "propose", "specific"]
