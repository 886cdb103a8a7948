"""Index stage: one FAISS index per descriptor, its type chosen before any vector is read."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dedup.descriptors import query_transform_for
from dedup.engine import run_stage
from dedup.errors import StoreError
from dedup.records import RunDir, atomic_output, fingerprint, open_embeddings, write_array
from dedup.run import Run
from dedup.search.faiss_index import _to_gpu, apply_search_params, faiss_gpu_count
from dedup.search.index_choice import IndexSpec, choose_index_streaming, on_disk_part_rows


class IndexStage:
    """One task per descriptor: choose the index from (vectors, dim, budget, GPU), build it, save it.

    Its fingerprint names the embedding parts and the budget, so added or
    re-embedded vectors rebuild the index, and the neighbour stage (whose
    fingerprint names the index files) searches again.
    """

    def __init__(self, run: RunDir, descriptor: str, memory_budget_bytes: int, gpu: bool) -> None:
        self.run_dir, self.descriptor = run, descriptor
        self.memory_budget_bytes, self.gpu = memory_budget_bytes, gpu
        self.name = f"index-{descriptor}"

    def task_ids(self) -> list[str]:
        return ["0"]

    def fingerprint(self) -> str:
        parts = (self.run_dir.embedding_dir(self.descriptor) / "img_emb").glob("*.npy")
        return fingerprint(parts, {"memory": self.memory_budget_bytes, "gpu": self.gpu})

    def reset(self) -> None:
        for path in [*index_paths(self.run_dir.index_dir, self.descriptor),
                     *cell_paths(self.run_dir.index_dir, self.descriptor).values()]:
            path.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        spec = build_descriptor_index(self.run_dir, self.descriptor, self.memory_budget_bytes, self.gpu)
        progress(spec.n_vectors)
        return {"vectors": spec.n_vectors}

    def close(self) -> None:
        pass


def build_indexes(run: Run, gpu: bool | None = None) -> dict[str, IndexSpec]:
    """Index every descriptor of the run behind the engine; returns the specs chosen."""
    gpu = faiss_gpu_available() if gpu is None else gpu
    specs = {}
    for name in run.settings.descriptors:
        run_stage(run, IndexStage(run, name, run.settings.memory_budget_bytes, gpu), unit="vectors")
        specs[name] = IndexSpec.from_json(index_paths(run.index_dir, name)[1].read_text())
    return specs


def build_descriptor_index(run: RunDir, name: str, budget: int, gpu: bool = False) -> IndexSpec:
    """Index one descriptor from its memory-mapped parts (never all vectors in RAM, never as float32).

    CPU float IVF kinds: k-means on a sample, then ONE quantizer pass that
    stores every row's `nprobe` nearest cells (`<name>.probes.npy`, column 0 =
    home cell) and the rows grouped by cell (`<name>.cell_rows.npy`,
    `<name>.cell_bounds.npy`); the neighbour stage joins from those and the
    quantizer (`<name>.quantizer.faiss`) alone, never reading the full index.
    The full index (for queries) is filled from the stored home cells, with
    faiss' on-disk inverted lists (`<name>.ivfdata`) when it exceeds `budget`.
    """
    from dedup.search.faiss_index import build_index

    vectors = open_embeddings(run, name)
    transform = query_transform_for(name)
    variants = len(transform(np.asarray(vectors[:1], np.float32))) if transform is not None else 1
    spec = choose_index_streaming(len(vectors), vectors.dim, budget, gpu=gpu, query_variants=variants)
    if spec.kind in ("ivf_flat", "ivf_pq") and not spec.use_gpu:
        index, spec = _build_ivf_streaming(run, name, spec, vectors, on_disk_part_rows(budget, vectors.dim))
    else:
        index = build_index(spec, vectors)
    save_index(index, spec, run.index_dir, name, with_cells=spec.kind in ("ivf_flat", "ivf_pq") and not spec.use_gpu)
    return spec


def cell_paths(directory: str | os.PathLike, name: str) -> dict[str, Path]:
    directory = Path(directory)
    return {part: directory / f"{name}.{part}" for part in
            ("quantizer.faiss", "probes.npy", "cell_rows.npy", "cell_bounds.npy", "ivfdata")}


def _build_ivf_streaming(run: RunDir, name: str, spec: IndexSpec, vectors, part_rows: int):
    from dedup.search.faiss_index import probe_cells, quantizer_of, spec_of_trained, train_index

    paths = cell_paths(run.index_dir, name)
    run.index_dir.mkdir(parents=True, exist_ok=True)
    index = train_index(spec, vectors)
    spec = spec_of_trained(spec, index)
    quantizer = quantizer_of(index)
    faiss.write_index(quantizer, str(paths["quantizer.faiss"]))
    probes = np.lib.format.open_memmap(paths["probes.npy"], mode="w+", dtype=np.int32,
                                       shape=(len(vectors), max(1, spec.nprobe)))
    probe_cells(quantizer, vectors, probes.shape[1], probes, block_rows=_block_rows(spec, vectors))
    probes.flush()
    home = probes[:, 0]  # a strided view of the memory map, read block by block below
    bounds = group_rows_by_cell(home, spec.nlist, paths["cell_rows.npy"])
    write_array(bounds, paths["cell_bounds.npy"])
    if spec.on_disk:
        return _fill_on_disk(index, vectors, home, paths["ivfdata"], run.index_dir / f".{name}.parts", part_rows), spec
    _fill(index, vectors, home)
    return index, spec


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


def _block_rows(spec: IndexSpec, vectors) -> int:
    from dedup.search.index_choice import ADD_CHUNK

    return max(1024, min(ADD_CHUNK, len(vectors)))


def _fill(index, vectors, home: np.ndarray) -> None:
    from dedup.search.faiss_index import fill_ivf

    fill_ivf(index, vectors, home)


def _fill_on_disk(trained, vectors, home: np.ndarray, ivfdata: Path, scratch: Path, rows: int):
    """faiss contrib's on-disk recipe: one small index per block of rows, merged into one .ivfdata file."""
    import shutil

    from faiss.contrib.ondisk import merge_ondisk

    from dedup.search.faiss_index import fill_ivf

    scratch.mkdir(parents=True, exist_ok=True)
    names = []
    for k, start in enumerate(range(0, len(vectors), rows)):
        part = faiss.clone_index(trained)
        # ids continue across parts: row i keeps label i, as in an in-memory build.
        fill_ivf(part, vectors[start : start + rows], np.asarray(home[start : start + rows]), first_id=start)
        names.append(str(scratch / f"part_{k}.faiss"))
        faiss.write_index(part, names[-1])
        del part
    ivfdata.unlink(missing_ok=True)
    merge_ondisk(trained, names, str(ivfdata))
    shutil.rmtree(scratch, ignore_errors=True)
    return trained


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
        faiss.write_index(faiss.index_gpu_to_cpu(index) if spec.use_gpu else index, str(tmp_index))
    # The spec goes last: its presence marks a complete pair.
    with atomic_output(spec_path) as tmp_spec:
        tmp_spec.write_text(replace(spec, n_vectors=int(index.ntotal)).to_json())
    return index_path, spec_path


def load_index(directory: str | os.PathLike, name: str, *, gpu: bool | None = None) -> tuple[object, IndexSpec]:
    """Read an index written by `save_index`; `gpu` overrides the spec's use_gpu."""
    index_path, spec_path = index_paths(directory, name)
    if not spec_path.exists() or not index_path.exists():
        raise StoreError(
            f"index '{name}' not found in {directory} (expected {index_path.name} and {spec_path.name})",
            hint="run the index stage first",
        )
    spec = IndexSpec.from_json(spec_path.read_text())
    if gpu is not None:
        spec = replace(spec, use_gpu=gpu)
    index = faiss.read_index(str(index_path))
    if spec.use_gpu:
        index = _to_gpu(index)
    apply_search_params(index, spec)
    return index, spec
