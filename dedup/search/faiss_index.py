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
) -> faiss.Index | faiss.IndexBinary:
    """Train (IVF: on a random sample) and fill the index with every row of `vectors`.

    `vectors` may be a memory map: it is read in chunks. Float kinds take
    L2-normalised float32/float16 rows; binary kinds take packed uint8 codes
    (dim/8 bytes per row). Row i gets faiss label i.
    """
    _check_vectors(spec, vectors)
    index = _empty_index(spec)
    if spec.use_gpu:
        index = _to_gpu(index)
    if not index.is_trained:
        index.train(_train_rows(spec, vectors, train_sample, seed))
    if _is_cpu_array_ivf(index):
        _add_ivf_without_slack(index, vectors, spec.is_binary)
    else:
        for start in range(0, len(vectors), ADD_CHUNK):
            index.add(_rows(vectors[start : start + ADD_CHUNK], spec.is_binary))
    apply_search_params(index, spec)
    return index


def _check_vectors(spec: IndexSpec, vectors: np.ndarray) -> None:
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"expected a non-empty (n, d) array, got shape {vectors.shape}")
    if spec.is_binary:
        if vectors.dtype != np.uint8 or vectors.shape[1] * 8 != spec.dim:
            raise ValueError(
                f"{spec.kind} needs packed uint8 codes of {spec.dim // 8} bytes per row, "
                f"got {vectors.dtype} rows of {vectors.shape[1]}"
            )
    elif vectors.shape[1] != spec.dim:
        raise ValueError(f"spec is for dim={spec.dim}, vectors have {vectors.shape[1]} columns")
    if len(vectors) > spec.n_vectors:
        # The memory estimate (and the index kind) were checked for n_vectors only.
        raise ValueError(
            f"spec was chosen for {spec.n_vectors:,} vectors, got {len(vectors):,}: rerun choose_index with the real count"
        )


def _empty_index(spec: IndexSpec) -> faiss.Index | faiss.IndexBinary:
    if spec.is_binary:
        return faiss.index_binary_factory(spec.dim, spec.factory)
    index = faiss.index_factory(spec.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index)) if "IVF" in spec.factory else None
    if isinstance(ivf, faiss.IndexIVFPQ):
        # Polysemous training (for Hamming pre-filtering, which we never use)
        # dominates training time; skip it.
        ivf.do_polysemous_training = False
    return index


def _rows(block: np.ndarray, binary: bool) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.uint8 if binary else np.float32)


def _train_rows(spec: IndexSpec, vectors: np.ndarray, train_sample: int | None, seed: int) -> np.ndarray:
    size = min(len(vectors), train_sample or default_train_size(spec) or len(vectors))
    rng = np.random.default_rng(seed)
    # Sorted positions keep reads sequential when `vectors` is a memory map.
    rows = np.sort(rng.choice(len(vectors), size=size, replace=False))
    return _rows(vectors[rows], spec.is_binary)


def _is_cpu_array_ivf(index) -> bool:
    ivf = _try_extract_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)


def _try_extract_ivf(index):
    if isinstance(index, faiss.IndexBinaryIVF):
        return index
    if isinstance(index, faiss.IndexBinary):
        return None
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # faiss raises this for indexes without inverted lists
        return None


def _add_ivf_without_slack(index, vectors: np.ndarray, binary: bool) -> None:
    """Add with every inverted list reserved at its final length.

    A plain `add` appends to each list in 64k-vector batches and std::vector
    growth leaves up to 2x spare capacity; assigning first and reserving makes
    the memory estimate exact and costs no extra quantizer pass (the
    assignment is handed to `add_core`).
    """
    ivf = _try_extract_ivf(index)
    assignment = np.empty(len(vectors), dtype=np.int32)
    for start in range(0, len(vectors), ADD_CHUNK):
        block = _rows(vectors[start : start + ADD_CHUNK], binary)
        assignment[start : start + len(block)] = _assign(ivf.quantizer, block)
    counts = np.bincount(assignment, minlength=ivf.nlist)
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    for list_no in np.flatnonzero(counts):
        # resize up then down keeps the capacity (std::vector never shrinks).
        invlists.resize(int(list_no), int(counts[list_no]))
        invlists.resize(int(list_no), 0)
    for start in range(0, len(vectors), ADD_CHUNK):
        block = _rows(vectors[start : start + ADD_CHUNK], binary)
        lists = assignment[start : start + len(block)].astype(np.int64)
        ivf.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(lists))
    if ivf is not index:  # wrappers (e.g. IndexPreTransform) keep their own count
        index.ntotal = ivf.ntotal


def _assign(quantizer, block: np.ndarray) -> np.ndarray:
    _, labels = quantizer.search(block, 1)
    return labels[:, 0]


def apply_search_params(index, spec: IndexSpec) -> None:
    """Set nprobe / efSearch from the spec (they are not stored in .faiss files)."""
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
    return faiss.index_cpu_to_all_gpus(index)
