"""Index stage: one FAISS index per descriptor, its type chosen before any vector is read."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dedup.descriptors import query_transform_for
from dedup.errors import StoreError
from dedup.records import RunDir, atomic_output, fingerprint, open_embeddings, write_array
from dedup.search.faiss_index import _to_gpu, apply_search_params, faiss_gpu_count
from dedup.search.index_choice import DEFAULT_NPROBE, IndexSpec, choose_index_streaming, default_nlist


class IndexStage:
    """One task per descriptor: choose the index from (vectors, dim, budget, GPU), build it, save it.

    Its fingerprint names the embedding parts and the budget, so added or
    re-embedded vectors rebuild the index, and the neighbour stage (whose
    fingerprint names the index files) searches again.
    """

    def __init__(self, run: RunDir, descriptor: str, memory_budget_bytes: int, gpu: bool,
                 threshold: float | None = None) -> None:
        self.run_dir, self.descriptor = run, descriptor
        self.memory_budget_bytes, self.gpu, self.threshold = memory_budget_bytes, gpu, threshold
        self.name = f"index-{descriptor}"

    def task_ids(self) -> list[str]:
        return ["0"]

    def fingerprint(self) -> str:
        parts = (self.run_dir.embedding_dir(self.descriptor) / "img_emb").glob("*.npy")
        return fingerprint(parts, {"memory": self.memory_budget_bytes, "gpu": self.gpu, "threshold": self.threshold})

    def reset(self) -> None:
        for path in [*index_paths(self.run_dir.index_dir, self.descriptor),
                     *cell_paths(self.run_dir.index_dir, self.descriptor).values()]:
            path.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        spec = build_descriptor_index(self.run_dir, self.descriptor, self.memory_budget_bytes, self.gpu,
                                      threshold=self.threshold)
        progress(spec.n_vectors)
        return {"vectors": spec.n_vectors}

    def close(self) -> None:
        pass


def build_descriptor_index(run: RunDir, name: str, budget: int, gpu: bool = False,
                           threshold: float | None = None) -> IndexSpec:
    """Index one descriptor from its memory-mapped parts (never all vectors in RAM, never as float32).

    Exact search affordable: a flat index. Otherwise the cell layout (CPU and
    GPU alike): spherical k-means on a bounded sample, then ONE quantizer pass
    that stores every row's `nprobe` nearest cells (`<name>.probes.npy`, column
    0 = home cell) and the rows grouped by cell (`<name>.cell_rows.npy`,
    `<name>.cell_bounds.npy`). No vector is copied into an index: the neighbour
    join and `query` score candidates from the embeddings' memory maps, so the
    index is the quantizer (`<name>.faiss`, also `<name>.quantizer.faiss`) and
    those three arrays. `threshold` (the search threshold) sets nprobe.
    """
    from dedup.search.faiss_index import build_index

    vectors = open_embeddings(run, name)
    transform = query_transform_for(name)
    variants = len(transform(np.asarray(vectors[:1], np.float32))) if transform is not None else 1
    spec = choose_index_streaming(len(vectors), vectors.dim, budget, gpu=gpu, query_variants=variants)
    if spec.kind in ("ivf_flat", "ivf_pq"):
        spec = replace(_cells_spec(spec, len(vectors), vectors.dim, budget, gpu, threshold), probe_threshold=threshold)
        quantizer, spec = _build_cells(run, name, spec, vectors, budget)
        save_index(quantizer, spec, run.index_dir, name, with_cells=True)
        return spec
    save_index(build_index(spec, vectors), spec, run.index_dir, name)
    return spec


def _cells_spec(chosen: IndexSpec, n: int, dim: int, budget: int, gpu: bool, threshold: float | None) -> IndexSpec:
    """The cell layout replacing an IVF choice; a spec given with storage "index" keeps its nlist and nprobe."""
    from dedup.search.index_choice import choose_cells_index

    spec = choose_cells_index(n, dim, budget, threshold=threshold, gpu=gpu)
    if chosen.storage == "cells":
        return chosen
    if chosen.nlist != default_nlist(n) or chosen.nprobe != DEFAULT_NPROBE:
        # A spec forced with other lists (tests, expert use): honour them, exactly, without index storage.
        prefix = chosen.factory.split(",")[0]
        return replace(spec, nlist=chosen.nlist, nprobe=chosen.nprobe, factory=f"{prefix},Flat")
    return spec


def cell_paths(directory: str | os.PathLike, name: str) -> dict[str, Path]:
    directory = Path(directory)
    return {part: directory / f"{name}.{part}" for part in
            ("quantizer.faiss", "probes.npy", "cell_rows.npy", "cell_bounds.npy", "probe_rows.npy",
             "probe_bounds.npy", "ivfdata")}


def _build_cells(run: RunDir, name: str, spec: IndexSpec, vectors, budget: int):
    """k-means, one probe pass into a memory map, rows grouped by home cell. Returns (quantizer, final spec)."""
    from dedup.search.faiss_index import probe_cells, searching_quantizer, train_cells_quantizer
    from dedup.search.index_choice import probe_block_rows, respec_cells_nlist, train_points

    paths = cell_paths(run.index_dir, name)
    run.index_dir.mkdir(parents=True, exist_ok=True)
    paths["ivfdata"].unlink(missing_ok=True)  # lists of an earlier full-index build
    points = train_points(len(vectors), spec.nlist, vectors.dim, budget)
    quantizer = train_cells_quantizer(spec, vectors, points, gpu=spec.use_gpu)
    spec = respec_cells_nlist(spec, int(quantizer.ntotal), budget)
    faiss.write_index(quantizer, str(paths["quantizer.faiss"]))
    probes = np.lib.format.open_memmap(paths["probes.npy"], mode="w+", dtype=np.int32,
                                       shape=(len(vectors), max(1, spec.nprobe)))
    probe_cells(searching_quantizer(quantizer, spec.use_gpu), vectors, probes.shape[1], probes,
                block_rows=probe_block_rows(vectors.dim, spec.nprobe, budget), prune=probe_pruning(quantizer, spec))
    probes.flush()
    bounds = group_rows_by_cell(probes[:, 0], spec.nlist, paths["cell_rows.npy"])
    write_array(bounds, paths["cell_bounds.npy"])
    write_probe_lists(probes, spec.nlist, paths)
    return quantizer, spec


def write_probe_lists(probes, nlist: int, paths: dict[str, Path]) -> None:
    """Rows by probed cell (the cell-major join's queries): probe_rows.npy + probe_bounds.npy."""
    from dedup.search.pairs import ProbeLists

    lists = ProbeLists.from_probes(np.asarray(probes), nlist)
    small = len(probes) < np.iinfo(np.int32).max  # half the disk below 2^31 rows
    write_array(lists.rows.astype(np.int32) if small else lists.rows, paths["probe_rows.npy"])
    write_array(lists.bounds, paths["probe_bounds.npy"])


def probe_pruning(quantizer, spec: IndexSpec):
    """(centroids, threshold) for `probe_cells`, or None: the bound needs an exact (flat) quantizer."""
    if spec.probe_threshold is None or "_HNSW" in spec.factory:
        return None
    return quantizer.reconstruct_n(0, quantizer.ntotal), spec.probe_threshold


def group_rows_by_cell(home, nlist: int, path: Path, block_rows: int = 1 << 20) -> np.ndarray:
    """Counting sort of rows by home cell into a memory-mapped .npy (rows ascending within a cell).

    Two passes over `home` in blocks; memory is O(nlist + block), not O(rows).
    Returns the CSR bounds (nlist + 1).
    """
    counts = np.zeros(nlist, dtype=np.int64)
    for start in range(0, len(home), block_rows):
        counts += np.bincount(np.asarray(home[start : start + block_rows]), minlength=nlist)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tmp = path.with_name(f".{path.name}.tmp")
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(len(home),))
    filled = bounds[:-1].copy()
    for start in range(0, len(home), block_rows):
        cells = np.asarray(home[start : start + block_rows]).astype(np.int64)
        order = np.argsort(cells, kind="stable")
        sorted_cells = cells[order]
        first = np.searchsorted(sorted_cells, sorted_cells, side="left")
        slots = filled[sorted_cells] + (np.arange(len(order)) - first)
        rows[slots] = start + order
        np.add.at(filled, sorted_cells, 1)
    rows.flush()
    del rows
    tmp.replace(path)
    return bounds


def faiss_gpu_available() -> bool:
    """faiss-gpu installed and a GPU visible (then `dedup run` indexes and searches on it)."""
    return faiss_gpu_count() > 0


# ---------------------------------------------------------------- save / load


def index_paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"{name}.faiss", directory / f"{name}.json"


def save_index(index, spec: IndexSpec, directory: str | os.PathLike, name: str,
               with_cells: bool = False) -> tuple[Path, Path]:
    """Write `<name>.faiss` and `<name>.json` atomically (temp file + rename).

    Without `with_cells` the cell files of an earlier streaming build are
    removed: they describe another index and the neighbour stage would join from them.
    """
    index_path, spec_path = index_paths(directory, name)
    if not with_cells:
        for part in ("probes.npy", "cell_rows.npy", "cell_bounds.npy", "quantizer.faiss"):
            cell_paths(directory, name)[part].unlink(missing_ok=True)
    with atomic_output(index_path) as tmp_index:
        on_gpu = spec.use_gpu and spec.storage == "index"  # a cell layout's quantizer is kept on the CPU
        faiss.write_index(faiss.index_gpu_to_cpu(index) if on_gpu else index, str(tmp_index))
    # The spec goes last: its presence marks a complete pair.
    with atomic_output(spec_path) as tmp_spec:
        stored = spec.n_vectors if spec.storage == "cells" else int(index.ntotal)  # a quantizer holds centroids
        tmp_spec.write_text(replace(spec, n_vectors=stored).to_json())
    return index_path, spec_path


def load_index(directory: str | os.PathLike, name: str, *, gpu: bool | None = None,
               vectors=None) -> tuple[object, IndexSpec]:
    """Read an index written by `save_index`; `gpu` overrides the spec's use_gpu.

    A cell layout loads as a `CellSearcher` (faiss' `range_search`, scores exact
    from `vectors`: by default the memory maps of the run whose index folder
    `directory` is).
    """
    index_path, spec_path = index_paths(directory, name)
    if not spec_path.exists() or not index_path.exists():
        raise StoreError(
            f"index '{name}' not found in {directory} (expected {index_path.name} and {spec_path.name})",
            hint="run the index stage first",
        )
    spec = IndexSpec.from_json(spec_path.read_text())
    if spec.storage == "cells":
        return _load_cells(Path(directory), name, spec, vectors), spec
    if gpu is not None:
        spec = replace(spec, use_gpu=gpu)
    index = faiss.read_index(str(index_path))
    if spec.use_gpu:
        index = _to_gpu(index)
    apply_search_params(index, spec)
    return index, spec


def _load_cells(directory: Path, name: str, spec: IndexSpec, vectors):
    from dedup.search.pairs import CellLists, CellSearcher

    paths = cell_paths(directory, name)
    missing = [p.name for p in (paths["cell_rows.npy"], paths["cell_bounds.npy"]) if not p.exists()]
    if missing:
        raise StoreError(f"index '{name}' in {directory} lacks {', '.join(missing)}", hint="run the index stage again")
    if vectors is None:
        vectors = open_embeddings(RunDir(directory.parent), name)
    lists = CellLists(np.load(paths["cell_rows.npy"], mmap_mode="r"), np.load(paths["cell_bounds.npy"]),
                      np.zeros((0, 0), np.int32))  # the stored probes are the self-join's, not a query's
    searcher = CellSearcher(faiss.read_index(str(index_paths(directory, name)[0])), lists, vectors, spec.nprobe)
    apply_search_params(searcher, spec)
    return searcher
