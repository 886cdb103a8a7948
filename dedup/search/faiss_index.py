"""Build a faiss index from a spec (train on a sample, fill in chunks); set search parameters; move to GPU.

No file I/O: saving and loading live with the index stage (dedup/stages/index.py).
"""

from __future__ import annotations

import faiss
import numpy as np

from dedup.errors import DedupError, IndexInfeasible
from dedup.search.index_choice import ADD_CHUNK, GPU_INSTALL_HINT, IndexSpec, default_train_size


def build_index(
    spec: IndexSpec, vectors: np.ndarray, train_sample: int | None = None, seed: int = 0
) -> faiss.Index:
    """Train (IVF: on a random sample) and fill the index with every row of `vectors`.

    `vectors` may be a memory map: it is read in chunks, L2-normalised
    float32/float16 rows. Row i gets faiss label i.
    """
    _check_vectors(spec, vectors)
    index = _empty_index(spec)
    if spec.use_gpu:
        index = _to_gpu(index)
    if not index.is_trained:
        index.train(_train_rows(spec, vectors, train_sample, seed))
    if _is_cpu_array_ivf(index):
        _add_ivf_without_slack(index, vectors)
    else:
        for start in range(0, len(vectors), ADD_CHUNK):
            index.add(_rows(vectors[start : start + ADD_CHUNK]))
    apply_search_params(index, spec)
    return index


def _check_vectors(spec: IndexSpec, vectors: np.ndarray) -> None:
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"expected a non-empty (n, d) array, got shape {vectors.shape}")
    if vectors.shape[1] != spec.dim:
        raise ValueError(f"spec is for dim={spec.dim}, vectors have {vectors.shape[1]} columns")
    if len(vectors) > spec.n_vectors:
        # The memory estimate (and the index kind) were checked for n_vectors only.
        raise ValueError(
            f"spec was chosen for {spec.n_vectors:,} vectors, got {len(vectors):,}: rerun choose_index with the real count"
        )


def _empty_index(spec: IndexSpec) -> faiss.Index:
    index = faiss.index_factory(spec.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index)) if "IVF" in spec.factory else None
    if isinstance(ivf, faiss.IndexIVFPQ):
        # Polysemous training (for Hamming pre-filtering, which we never use)
        # dominates training time; skip it.
        ivf.do_polysemous_training = False
    return index


def _rows(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def _train_rows(spec: IndexSpec, vectors: np.ndarray, train_sample: int | None, seed: int) -> np.ndarray:
    size = min(len(vectors), train_sample or default_train_size(spec) or len(vectors))
    rng = np.random.default_rng(seed)
    # Sorted positions keep reads sequential when `vectors` is a memory map.
    rows = np.sort(rng.choice(len(vectors), size=size, replace=False))
    return _rows(vectors[rows])


def _is_cpu_array_ivf(index) -> bool:
    ivf = _try_extract_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)


def _try_extract_ivf(index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # faiss raises this for indexes without inverted lists
        return None


def _add_ivf_without_slack(index, vectors: np.ndarray) -> None:
    """Add with every inverted list reserved at its final length.

    A plain `add` appends to each list in 64k-vector batches and std::vector
    growth leaves up to 2x spare capacity; assigning first and reserving makes
    the memory estimate exact and costs no extra quantizer pass (the
    assignment is handed to `add_core`).
    """
    ivf = _try_extract_ivf(index)
    assignment = np.empty(len(vectors), dtype=np.int32)
    for start in range(0, len(vectors), ADD_CHUNK):
        block = _rows(vectors[start : start + ADD_CHUNK])
        assignment[start : start + len(block)] = _assign(ivf.quantizer, block)
    counts = np.bincount(assignment, minlength=ivf.nlist)
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    for list_no in np.flatnonzero(counts):
        # resize up then down keeps the capacity (std::vector never shrinks).
        invlists.resize(int(list_no), int(counts[list_no]))
        invlists.resize(int(list_no), 0)
    for start in range(0, len(vectors), ADD_CHUNK):
        block = _rows(vectors[start : start + ADD_CHUNK])
        lists = assignment[start : start + len(block)].astype(np.int64)
        ivf.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(lists))
    if ivf is not index:  # wrappers (e.g. IndexPreTransform) keep their own count
        index.ntotal = ivf.ntotal


def _assign(quantizer, block: np.ndarray) -> np.ndarray:
    _, labels = quantizer.search(block, 1)
    return labels[:, 0]


def apply_search_params(index, spec: IndexSpec) -> None:
    """Set nprobe / efSearch from the spec (they are not stored in .faiss files)."""
    from dedup.search.index_choice import QUERY_MIN_NPROBE
    from dedup.search.pairs import CellSearcher

    if isinstance(index, CellSearcher):
        # Queries (a handful of vectors) probe more cells than the self-join: see QUERY_MIN_NPROBE.
        index.nprobe = min(max(spec.nprobe, QUERY_MIN_NPROBE), index.lists.nlist)
        return
    if spec.nprobe:
        if spec.use_gpu:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", spec.nprobe)
        else:
            _try_extract_ivf(index).nprobe = spec.nprobe
    if spec.ef_search:
        faiss.downcast_index(index).hnsw.efSearch = spec.ef_search


def faiss_gpu_count() -> int:
    """GPUs faiss can use: always 0 with faiss-cpu, which lacks the GPU classes of the same `faiss` module."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def faiss_backend() -> str:
    """Which faiss build is installed, for the run log: "faiss-gpu with 2 GPUs" or "faiss-cpu"."""
    if not hasattr(faiss, "StandardGpuResources"):
        return "faiss-cpu"
    count = faiss_gpu_count()
    return f"faiss-gpu with {count} GPU{'' if count == 1 else 's'}"


def _to_gpu(index):
    _require_gpu()
    return faiss.index_cpu_to_all_gpus(index)


def _require_gpu() -> None:
    if not hasattr(faiss, "StandardGpuResources"):
        raise DedupError(
            "a GPU index needs faiss-gpu, but the installed faiss is the CPU build (faiss-cpu)",
            hint=GPU_INSTALL_HINT,
        )
    if faiss.get_num_gpus() == 0:
        raise IndexInfeasible(
            "the index spec asks for a GPU but faiss sees none",
            hint=f"run on a machine with a CUDA GPU and {GPU_INSTALL_HINT}, or choose the index with gpu=False",
        )


# ---------------------------------------------------------------- block build (memory-mapped inputs)


# Coarse centroids closer than this (cosine) are merged after k-means. A large
# duplicate group (10,000 copies at cosine 0.97-0.99) is a dense blob that
# k-means splits among dozens of centroids; its members then scatter over more
# cells than `nprobe` reaches (measured: a 3,000-copy group over 55 cells,
# pair recall 0.37 at nprobe 16). Distinct centroids of real data sit far
# below 0.95, so the merge only ever collapses such blobs.
CENTROID_MERGE_COSINE = 0.95


def train_index(spec: IndexSpec, vectors, train_sample: int | None = None, seed: int = 0,
                merge_cosine: float | None = CENTROID_MERGE_COSINE):
    """An empty index trained on a random sample of rows read from `vectors`.

    Float IVF kinds: spherical k-means for the coarse centroids, centroids
    closer than `merge_cosine` merged (the index may have fewer lists than
    `spec.nlist`: see `spec_of_trained`), then the rest of the index (PQ
    codebooks) trained on the same sample.
    """
    _check_vectors(spec, vectors)
    sample = _train_rows(spec, vectors, train_sample, seed)
    if spec.kind not in ("ivf_flat", "ivf_pq") or merge_cosine is None:
        index = _empty_index(spec)
        if not index.is_trained:
            index.train(sample)
        return index
    centroids = merge_close_centroids(_kmeans(sample, spec.nlist, seed), merge_cosine)
    from dedup.search.index_choice import respec_nlist

    index = _empty_index(respec_nlist(spec, len(centroids)))
    quantizer_of(index).add(centroids)
    index.train(sample)  # the quantizer holds nlist centroids already: faiss trains only the codes
    return index


KMEANS_ITERATIONS = 10


def _kmeans(sample: np.ndarray, k: int, seed: int, gpu: bool = False) -> np.ndarray:
    if gpu:
        _require_gpu()
    kmeans = faiss.Kmeans(sample.shape[1], k, niter=KMEANS_ITERATIONS, spherical=True, seed=seed, verbose=False,
                          gpu=bool(gpu))
    kmeans.train(sample)
    return kmeans.centroids


# efSearch of an HNSW coarse quantizer: at least this, and twice the probes it must return.
QUANTIZER_EF_SEARCH = 16


def train_cells_quantizer(spec: IndexSpec, vectors, points: int, seed: int = 0, gpu: bool = False,
                          merge_cosine: float | None = CENTROID_MERGE_COSINE):
    """The coarse quantizer of a cell layout: spherical k-means on `points` sampled rows, close centroids merged.

    Returns a CPU index over the centroids (flat, or HNSW when the spec's
    factory names it); k-means runs on the GPU with `gpu`. The number of
    centroids may be below `spec.nlist` after the merge.
    """
    _check_vectors(spec, vectors)
    sample = _train_rows(spec, vectors, points, seed)
    centroids = split_crowded_cells(sample, _kmeans(sample, spec.nlist, seed, gpu=gpu), seed, gpu=gpu)
    del sample
    if merge_cosine is not None:
        centroids = merge_close_centroids(centroids, merge_cosine)
    return centroid_index(centroids, hnsw="_HNSW" in spec.factory, nprobe=spec.nprobe)


# A cell holding more than this many times the mean share of the k-means sample is
# split by a k-means of its own points. Spherical k-means leaves a few crowded cells
# of far-apart rows (rows close to no centroid gather where the data is diffuse);
# everyone's 2nd-4th probes land there, and the join's cost is cell members x rows
# probing the cell. LAION-like benchmark, 300k rows: 3x fewer products, no pair lost
# (BENCHMARKS.md). A duplicate blob split this way is merged back by the merge below.
CROWDED_CELL_FACTOR = 3.0


def split_crowded_cells(sample: np.ndarray, centroids: np.ndarray, seed: int, gpu: bool = False) -> np.ndarray:
    """Centroids with every crowded cell (> CROWDED_CELL_FACTOR x the mean share of `sample`) split."""
    from dedup.search.index_choice import MIN_TRAIN_POINTS_PER_LIST

    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    flat = faiss.IndexFlatIP(centroids.shape[1])
    flat.add(centroids)
    home = flat.search(sample, 1)[1][:, 0]
    counts = np.bincount(home, minlength=len(centroids))
    mean = max(1.0, len(sample) / len(centroids))
    crowded = np.flatnonzero(counts > CROWDED_CELL_FACTOR * mean)
    kept = [centroids[np.setdiff1d(np.arange(len(centroids)), crowded)]]
    by_cell = np.argsort(home, kind="stable")  # one sort, not one mask over the sample per crowded cell
    starts = np.r_[0, np.cumsum(counts)]
    for cell in crowded:
        parts = int(min(np.ceil(counts[cell] / mean), counts[cell] // MIN_TRAIN_POINTS_PER_LIST))
        members = sample[np.sort(by_cell[starts[cell] : starts[cell + 1]])]
        kept.append(_kmeans(members, parts, seed + 1, gpu=gpu) if parts >= 2 else centroids[cell : cell + 1])
    return np.concatenate(kept)


def centroid_index(centroids: np.ndarray, hnsw: bool, nprobe: int):
    """Inner-product index over unit centroids: flat, or an HNSW graph (quantizer of very many lists)."""
    from dedup.search.index_choice import QUANTIZER_HNSW_M

    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if hnsw:
        index = faiss.IndexHNSWFlat(centroids.shape[1], QUANTIZER_HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(QUANTIZER_EF_SEARCH, 2 * nprobe)
    else:
        index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    return index


def searching_quantizer(quantizer, gpu: bool):
    """The quantizer to probe with: itself, or (gpu) a copy on every GPU; same `search` interface."""
    if not gpu:
        return quantizer
    return _to_gpu(quantizer)


def merge_close_centroids(centroids: np.ndarray, cosine: float) -> np.ndarray:
    """Greedy: keep a centroid unless an earlier kept one is at >= `cosine` (sparse range search)."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    flat = faiss.IndexFlatIP(centroids.shape[1])
    flat.add(centroids)
    lims, _, labels = flat.range_search(centroids, float(cosine))
    removed = np.zeros(len(centroids), dtype=bool)
    for i in range(len(centroids)):
        if not removed[i]:
            close = labels[lims[i] : lims[i + 1]]
            removed[close[close > i]] = True
    return centroids[~removed]


def spec_of_trained(spec: IndexSpec, index) -> IndexSpec:
    """The spec describing a trained index (its list count after the centroid merge)."""
    from dedup.search.index_choice import respec_nlist

    ivf = _try_extract_ivf(index)
    return spec if ivf is None or ivf.nlist == spec.nlist else respec_nlist(spec, int(ivf.nlist))


def quantizer_of(index):
    """The coarse quantizer of an IVF index (None for other kinds)."""
    ivf = _try_extract_ivf(index)
    return None if ivf is None else ivf.quantizer


def probe_cells(quantizer, vectors, nprobe: int, out: np.ndarray, block_rows: int = ADD_CHUNK,
                progress=None, prune=None) -> np.ndarray:
    """The `nprobe` nearest cells of every row into `out` ((n, nprobe) int32, e.g. a memory map).

    Column 0 is the row's home cell (the cell an IVF add puts it in), so one
    quantizer pass serves both the index fill and the neighbour join.
    `prune` = (centroids, threshold): probes that cannot hold a pair at that
    threshold are stored as -1 (`dedup.search.pairs.prune_probes`).
    """
    from dedup.search.pairs import prune_probes

    for start in range(0, len(vectors), block_rows):
        block = _rows(vectors[start : start + block_rows])
        similarities, cells = quantizer.search(block, nprobe)
        if prune is not None:
            cells = prune_probes(similarities, cells, *prune)
        out[start : start + len(block)] = cells
        if progress is not None:
            progress(len(block))
    return out


def fill_ivf(index, vectors, home: np.ndarray, block_rows: int = ADD_CHUNK, first_id: int | None = None) -> None:
    """Add every row of `vectors` to the cell `home[row]` already chose: no second quantizer pass.

    Lists are reserved at their final length first (see `_add_ivf_without_slack`).
    `first_id`: label of the first row (default: the index's current count).
    """
    ivf = _try_extract_ivf(index)
    counts = np.bincount(np.asarray(home), minlength=ivf.nlist)
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(invlists, faiss.ArrayInvertedLists):
        for list_no in np.flatnonzero(counts):
            invlists.resize(int(list_no), int(counts[list_no]))
            invlists.resize(int(list_no), 0)
    for start in range(0, len(vectors), block_rows):
        block = _rows(vectors[start : start + block_rows])
        lists = np.ascontiguousarray(home[start : start + len(block)], dtype=np.int64)
        labels = None if first_id is None else np.arange(first_id + start, first_id + start + len(block), dtype=np.int64)
        ivf.add_core(len(block), faiss.swig_ptr(block), None if labels is None else faiss.swig_ptr(labels),
                     faiss.swig_ptr(lists))
    if ivf is not index:
        index.ntotal = ivf.ntotal

