"""Index stage: one FAISS index per descriptor, its type chosen before any vector is read.

Three engine stages run in order (`stages.increment.build_indexes`): `index-<name>-train` (one task:
k-means, or the whole flat index), `index-<name>-probe` (one task per block of rows: the quantizer
pass) and `index-<name>-group` (one task: rows grouped by home cell and by every probed cell).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dedup.descriptors import query_transform_for
from dedup.errors import StoreError
from dedup.records import RunDir, atomic_output, fingerprint, open_embeddings, open_row_keys, write_array
from dedup.search.faiss_index import _to_gpu, apply_search_params, faiss_gpu_count
from dedup.search.index_choice import DEFAULT_NPROBE, IndexSpec, choose_index_streaming, default_nlist

# Probe blocks (`probe_block_rows`, <= 65,536 rows) per engine task of the probe step: ~1M rows a task, so
# LAION-2B is ~2,000 tasks and a killed run redoes at most one task's rows.
PROBE_TASK_BLOCKS = 16
PENDING = "pending.json"  # the build the probe and group steps finish (in OUT/_scratch/index-<name>/)


def warm_row_caches(run: RunDir, descriptor: str) -> None:
    """Write a large descriptor's ids and keys caches (records.IDS_IN_MEMORY) in this single task, before the
    parallel probe and neighbour tasks would each build them; a no-op when they exist or the run is small."""
    open_embeddings(run, descriptor)
    open_row_keys(run, descriptor)


class IndexStage:
    """Step 1 of 3 (`index-<name>-train`, one task): choose the index, build it or train its quantizer.

    Exact search affordable: the flat index is built and saved here, and the
    later steps have no tasks. Otherwise the cell layout: spherical k-means on
    a bounded sample writes `<name>.quantizer.faiss` and the build's final spec
    to `OUT/_scratch/index-<name>/pending.json`; `ProbeStage` then probes row
    blocks as engine tasks and `GroupStage` groups rows by cell and writes
    `<name>.json` (its presence marks a complete index). Its fingerprint names
    the embedding parts and the settings, so added or re-embedded vectors (or
    another budget, GPU, threshold or nprobe) rebuild the index, and the
    neighbour stage (whose fingerprint names the index files) searches again.
    """

    def __init__(self, run: RunDir, descriptor: str, memory_budget_bytes: int, gpu: bool,
                 threshold: float | None = None, nprobe: int | None = None,
                 rows_per_task: int | None = None) -> None:
        self.run_dir, self.descriptor = run, descriptor
        self.memory_budget_bytes, self.gpu, self.threshold = memory_budget_bytes, gpu, threshold
        self.nprobe, self.rows_per_task = nprobe, rows_per_task
        self.name = f"index-{descriptor}-train"

    def task_ids(self) -> list[str]:
        return ["0"]

    def _settings(self) -> dict[str, Any]:
        # nprobe only when given: records of runs made before the option stay comparable.
        settings = {"memory": self.memory_budget_bytes, "gpu": self.gpu, "threshold": self.threshold}
        return settings if self.nprobe is None else {**settings, "nprobe": self.nprobe}

    def fingerprint(self) -> str:
        parts = (self.run_dir.embedding_dir(self.descriptor) / "img_emb").glob("*.npy")
        return fingerprint(parts, self._settings())

    def reset(self) -> None:
        clear_index(self.run_dir, self.descriptor)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        warm_row_caches(self.run_dir, self.descriptor)
        spec = self._train()
        progress(spec.n_vectors)
        return {"vectors": spec.n_vectors}

    def _train(self, generations: dict[str, Any] | None = None) -> IndexSpec:
        return train_descriptor_index(self.run_dir, self.descriptor, self.memory_budget_bytes, self.gpu,
                                      threshold=self.threshold, nprobe=self.nprobe,
                                      rows_per_task=self.rows_per_task, generations=generations)

    def close(self) -> None:
        pass


def index_scratch(run: RunDir, name: str) -> Path:
    return run.scratch_dir(f"index-{name}")


def read_pending(run: RunDir, name: str) -> dict[str, Any] | None:
    """The cell build the probe and group steps still have to finish (None: nothing pending)."""
    import json

    path = index_scratch(run, name) / PENDING
    return json.loads(path.read_text()) if path.exists() else None


def probe_block_path(run: RunDir, name: str, task: int) -> Path:
    return index_scratch(run, name) / f"probes_{task}.npy"


def clear_index(run: RunDir, name: str) -> None:
    """Remove the index files, the cell files and a pending build's scratch files."""
    for path in [*index_paths(run.index_dir, name), *cell_paths(run.index_dir, name).values()]:
        path.unlink(missing_ok=True)
    scratch = index_scratch(run, name)
    for path in [*scratch.glob("probes_*.npy"), scratch / PENDING]:
        path.unlink(missing_ok=True)


def train_descriptor_index(run: RunDir, name: str, budget: int, gpu: bool = False, threshold: float | None = None,
                           nprobe: int | None = None, rows_per_task: int | None = None,
                           generations: dict[str, Any] | None = None) -> IndexSpec:
    """The train step: a flat index built and saved, or a cell quantizer trained and its build made pending.

    `generations` (lineage and settings, see `stages.increment`) is written
    beside the finished cell index by the group step.
    """
    from dedup.search.faiss_index import build_index

    clear_index(run, name)
    vectors = open_embeddings(run, name)
    spec = choose_descriptor_spec(run, name, budget, gpu, threshold, nprobe, vectors)
    if spec.storage == "cells":
        return _train_cells(run, name, spec, vectors, budget, rows_per_task, generations)
    save_index(build_index(spec, vectors), spec, run.index_dir, name)
    return spec


def choose_descriptor_spec(run: RunDir, name: str, budget: int, gpu: bool = False, threshold: float | None = None,
                           nprobe: int | None = None, vectors=None) -> IndexSpec:
    """The index a build would make (before training): pure in the row count and dim, read from the memory maps.

    Raises IndexInfeasible for a budget nothing fits or an `nprobe` outside 1..nlist,
    so the driver can say so before a task is shipped to a worker.
    """
    vectors = open_embeddings(run, name) if vectors is None else vectors
    transform = query_transform_for(name)
    variants = len(transform(np.asarray(vectors[:1], np.float32))) if transform is not None else 1
    spec = choose_index_streaming(len(vectors), vectors.dim, budget, gpu=gpu, query_variants=variants)
    if spec.kind in ("ivf_flat", "ivf_pq"):
        cells = _cells_spec(spec, len(vectors), vectors.dim, budget, gpu, threshold, nprobe, name)
        return replace(cells, probe_threshold=threshold)
    return spec


def build_descriptor_index(run: RunDir, name: str, budget: int, gpu: bool = False,
                           threshold: float | None = None, nprobe: int | None = None,
                           rows_per_task: int | None = None) -> IndexSpec:
    """Index one descriptor from its memory-mapped parts in this process: the three steps, no engine.

    Exact search affordable: a flat index. Otherwise the cell layout (CPU and
    GPU alike): spherical k-means on a bounded sample, then ONE quantizer pass
    that stores every row's `nprobe` nearest cells (`<name>.probes.npy`, column
    0 = home cell), the rows grouped by home cell (`<name>.cell_rows.npy`,
    `<name>.cell_bounds.npy`) and by every probed cell (`<name>.probe_rows.npy`,
    `<name>.probe_bounds.npy`). No vector is copied into an index: the neighbour
    join and `query` score candidates from the embeddings' memory maps, so the
    index is the quantizer (`<name>.faiss`, also `<name>.quantizer.faiss`) and
    those arrays. `threshold` (the search threshold) sets nprobe unless `nprobe` is given.
    """
    IndexStage(run, name, budget, gpu, threshold, nprobe, rows_per_task).run_task("0", lambda n: None)
    for stage in (ProbeStage(run, name), GroupStage(run, name)):
        for task in stage.task_ids():
            stage.run_task(task, lambda n: None)
    return IndexSpec.from_json(index_paths(run.index_dir, name)[1].read_text())


def _cells_spec(chosen: IndexSpec, n: int, dim: int, budget: int, gpu: bool, threshold: float | None,
                nprobe: int | None = None, name: str = "") -> IndexSpec:
    """The cell layout replacing an IVF choice; a spec given with storage "index" keeps its nlist and nprobe.

    `nprobe` (`--nprobe`) replaces the threshold's choice; it must lie in 1..nlist.
    """
    from dedup.search.index_choice import check_nprobe, choose_cells_index

    forced = chosen.storage == "cells" or chosen.nlist != default_nlist(n) or chosen.nprobe != DEFAULT_NPROBE
    spec = choose_cells_index(n, dim, budget, threshold=threshold, gpu=gpu, nprobe=None if forced else nprobe,
                              name=name)
    if not forced:
        return spec
    if chosen.storage == "cells":
        spec = chosen
    else:  # a spec forced with other lists (tests, expert use): honour them, exactly, without index storage
        prefix = chosen.factory.split(",")[0]
        spec = replace(spec, nlist=chosen.nlist, nprobe=chosen.nprobe, factory=f"{prefix},Flat")
    if nprobe is None:
        return spec
    check_nprobe(nprobe, spec.nlist, n, name)
    return replace(spec, nprobe=nprobe)


def cell_paths(directory: str | os.PathLike, name: str) -> dict[str, Path]:
    directory = Path(directory)
    return {part: directory / f"{name}.{part}" for part in
            ("quantizer.faiss", "probes.npy", "cell_rows.npy", "cell_bounds.npy", "probe_rows.npy",
             "probe_bounds.npy", "ivfdata")}


def _train_cells(run: RunDir, name: str, spec: IndexSpec, vectors, budget: int, rows_per_task: int | None,
                 generations: dict[str, Any] | None) -> IndexSpec:
    """k-means -> `<name>.quantizer.faiss`; the final spec and the probe tasks' sizes -> pending.json."""
    from dedup.search.faiss_index import train_cells_quantizer
    from dedup.search.index_choice import probe_block_rows, respec_cells_nlist, train_points

    paths = cell_paths(run.index_dir, name)
    run.index_dir.mkdir(parents=True, exist_ok=True)
    points = train_points(len(vectors), spec.nlist, vectors.dim, budget)
    quantizer = train_cells_quantizer(spec, vectors, points, gpu=spec.use_gpu)
    spec = respec_cells_nlist(spec, int(quantizer.ntotal), budget)
    with atomic_output(paths["quantizer.faiss"]) as tmp:
        faiss.write_index(quantizer, str(tmp))
    write_pending(run, name, spec, probe_block_rows(vectors.dim, spec.nprobe, budget), rows_per_task, generations)
    return spec


def write_pending(run: RunDir, name: str, spec: IndexSpec, block_rows: int, rows_per_task: int | None,
                  generations: dict[str, Any] | None, first_row: int = 0) -> None:
    """Hand a cell build to the probe and group steps: rows first_row: are probed (0: all; > 0: an extension).

    Probe tasks are whole probe blocks counted from `first_row`, so every block
    starts where a single pass's would: the probes are the bytes of one pass.
    """
    import secrets

    from dedup.records import write_json

    for path in index_scratch(run, name).glob("probes_*.npy"):  # blocks of an earlier pending build
        path.unlink()
    task_rows = block_rows * max(1, -(-(rows_per_task or block_rows * PROBE_TASK_BLOCKS) // block_rows))
    write_json({"spec": json.loads(spec.to_json()), "build": secrets.token_hex(8), "block_rows": block_rows,
                "task_rows": task_rows, "first_row": first_row, "generations": generations},
               index_scratch(run, name) / PENDING)


class _PendingStep:
    """What the probe and group steps share: the pending build, read from disk on every call (never stale)."""

    def __init__(self, run: RunDir, descriptor: str) -> None:
        self.run_dir, self.descriptor = run, descriptor
        self._quantizer = self._centroids = None

    def __getstate__(self):
        return {**self.__dict__, "_quantizer": None, "_centroids": None}  # built inside each worker

    def pending(self) -> dict[str, Any] | None:
        return read_pending(self.run_dir, self.descriptor)

    def fingerprint(self) -> str:
        # A new k-means (another pending build) makes every probe block and the grouping stale.
        pending = self.pending()
        return fingerprint([], {"build": pending and pending["build"]})

    def close(self) -> None:
        self._quantizer = self._centroids = None


class ProbeStage(_PendingStep):
    """Step 2 of 3 (`index-<name>-probe`): the quantizer pass, one engine task per block of rows.

    Task i writes the `nprobe` nearest cells of rows [f + i*T, f + (i+1)*T) to its own
    file, `OUT/_scratch/index-<name>/probes_{i}.npy` (temp file + rename): no two
    tasks write one file, so nodes sharing a network filesystem never overwrite
    each other's pages, and a finished block is whole. The quantizer (on the GPU
    with `use_gpu`) is read inside the worker, once per worker. f (`first_row`)
    is 0 for a full build and the rows already indexed for an extension.
    """

    def __init__(self, run: RunDir, descriptor: str) -> None:
        super().__init__(run, descriptor)
        self.name = f"index-{descriptor}-probe"

    def task_ids(self) -> list[str]:
        pending = self.pending()
        if pending is None:
            return []
        rows = pending["spec"]["n_vectors"] - pending["first_row"]
        return [str(i) for i in range(-(-rows // pending["task_rows"]))]

    def reset(self) -> None:
        for path in index_scratch(self.run_dir, self.descriptor).glob("probes_*.npy"):
            path.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        from dedup.search.faiss_index import probe_cells

        pending = self.pending()
        spec, rows = IndexSpec(**pending["spec"]), pending["task_rows"]
        start = pending["first_row"] + int(task_id) * rows
        stop = min(start + rows, spec.n_vectors)
        path = probe_block_path(self.run_dir, self.descriptor, int(task_id))
        tmp = path.with_name(f".{path.name}.tmp")
        probes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(stop - start, max(1, spec.nprobe)))
        rows_here = RowRange(open_embeddings(self.run_dir, self.descriptor), start, stop)
        probe_cells(self._searching_quantizer(spec.use_gpu), rows_here, probes.shape[1], probes,
                    block_rows=pending["block_rows"], progress=progress, prune=self._pruning(spec))
        probes.flush()
        del probes
        tmp.replace(path)
        return {"vectors": stop - start}

    def _searching_quantizer(self, gpu: bool):
        from dedup.search.faiss_index import searching_quantizer

        if self._quantizer is None:  # once per worker: a GPU copy costs a transfer of every centroid
            self._quantizer = searching_quantizer(self._cpu_quantizer(), gpu)
        return self._quantizer

    def _cpu_quantizer(self):
        return faiss.read_index(str(cell_paths(self.run_dir.index_dir, self.descriptor)["quantizer.faiss"]))

    def _pruning(self, spec: IndexSpec):
        """(centroids, threshold) for `probe_cells`, or None: the bound needs an exact (flat) quantizer."""
        if spec.probe_threshold is None or "_HNSW" in spec.factory:
            return None
        if self._centroids is None:
            quantizer = self._cpu_quantizer()
            self._centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
        return self._centroids, spec.probe_threshold


class GroupStage(_PendingStep):
    """Step 3 of 3 (`index-<name>-group`, one task): probes.npy assembled, rows grouped by cell, index saved.

    Writes `<name>.probes.npy` from the probe blocks (then removes them), the
    rows by home cell (`cell_rows.npy`, `cell_bounds.npy`), the inverse probe
    lists (`probe_rows.npy`, `probe_bounds.npy`), `<name>.faiss` and last
    `<name>.json`; a rerun after a kill finds probes.npy whole (it is renamed
    into place) and goes on from it. No `reset()` (the engine's is optional): its one task
    writes every output whole, so a stale grouping has nothing to remove first.
    """

    def __init__(self, run: RunDir, descriptor: str) -> None:
        super().__init__(run, descriptor)
        self.name = f"index-{descriptor}-group"

    def task_ids(self) -> list[str]:
        return [] if self.pending() is None else ["0"]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        pending, paths = self.pending(), cell_paths(self.run_dir.index_dir, self.descriptor)
        spec = IndexSpec(**pending["spec"])
        self._assemble_probes(pending, spec, paths["probes.npy"])
        write_cell_lists(paths, np.load(paths["probes.npy"], mmap_mode="r"), spec.nlist)
        save_index(faiss.read_index(str(paths["quantizer.faiss"])), spec, self.run_dir.index_dir, self.descriptor,
                   with_cells=True)
        self._record_generations(pending["generations"], spec)
        (index_scratch(self.run_dir, self.descriptor) / PENDING).unlink(missing_ok=True)
        progress(spec.n_vectors)
        return {"vectors": spec.n_vectors}

    def _assemble_probes(self, pending: dict[str, Any], spec: IndexSpec, path: Path) -> None:
        """The probe blocks, in row order, into one memory-mapped `<name>.probes.npy` (bytes of a single pass)."""
        probe = ProbeStage(self.run_dir, self.descriptor)
        blocks = [probe_block_path(self.run_dir, self.descriptor, int(t)) for t in probe.task_ids()]
        if not all(block.exists() for block in blocks):
            if path.exists() and np.load(path, mmap_mode="r").shape[0] == spec.n_vectors:
                return  # assembled by an earlier try that was stopped after removing the blocks
            # Only a hand-deleted scratch file gets here: a block is renamed into place before its marker.
            raise StoreError(f"index '{self.descriptor}': probe blocks missing in {blocks[0].parent}",
                             hint=f"remove {self.run_dir.root / '_markers' / probe.name} and rerun the same command")
        tmp = path.with_name(f".{path.name}.tmp")
        probes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(spec.n_vectors, max(1, spec.nprobe)))
        first_row, step = pending["first_row"], pending["block_rows"]
        if first_row:  # an extension: the stored rows' probes are copied, never recomputed
            _copy_rows(np.load(path, mmap_mode="r")[:first_row], probes, 0, step)
        for task, block in enumerate(blocks):
            _copy_rows(np.load(block, mmap_mode="r"), probes, first_row + task * pending["task_rows"], step)
        probes.flush()
        del probes
        tmp.replace(path)
        for block in blocks:
            block.unlink()

    def _record_generations(self, generations: dict[str, Any] | None, spec: IndexSpec) -> None:
        if generations is not None:
            from dedup.stages.increment import write_generations

            bounds = generations.get("bounds", [0, spec.n_vectors])  # an extension names its generations
            write_generations(self.run_dir, self.descriptor, generations["lineage"], bounds, generations["settings"])


def _copy_rows(source, target, start: int, step: int) -> None:
    """source -> target[start:start + len(source)] in blocks of `step` rows (memory maps stay file pages)."""
    for first in range(0, len(source), step):
        chunk = source[first : first + step]
        target[start + first : start + first + len(chunk)] = chunk


class RowRange:
    """Rows start:stop of a VectorParts as an array-like (len and slices), for the block readers."""

    def __init__(self, vectors, start: int, stop: int) -> None:
        self.vectors, self.start, self.stop = vectors, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, item: slice) -> np.ndarray:
        first, last, _ = item.indices(len(self))
        return self.vectors[self.start + first : self.start + last]


# Flattened probe entries per block of the out-of-core grouping (~8 bytes x 5 arrays each: ~40 MB a block).
GROUP_BLOCK_ENTRIES = 1 << 20


def write_cell_lists(paths: dict[str, Path], probes, nlist: int) -> None:
    """Rows by home cell (column 0) and by every probed cell, both CSR, out of core."""
    rows = max(1, GROUP_BLOCK_ENTRIES // max(1, probes.shape[1]))
    write_array(group_rows_by_cell(probes[:, 0], nlist, paths["cell_rows.npy"]), paths["cell_bounds.npy"])
    write_array(group_rows_by_cell(probes, nlist, paths["probe_rows.npy"], block_rows=rows), paths["probe_bounds.npy"])


def _block_entries(cells, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(cell, row) of every distinct cell of rows start:stop, row-major; -1 (faiss' padding) dropped."""
    block = np.asarray(cells[start:stop]).astype(np.int64)
    block = block.reshape(len(block), -1)
    block.sort(axis=1)  # a row's repeats become neighbours; order within a row does not matter
    keep = block >= 0
    keep[:, 1:] &= block[:, 1:] != block[:, :-1]
    rows = np.repeat(np.arange(start, stop, dtype=np.int64), block.shape[1])
    return block[keep], rows[keep.ravel()]


def _stable_order(cells: np.ndarray, nlist: int) -> np.ndarray:
    """`np.argsort(cells, kind="stable")` as numpy's radix sort of 16-bit keys (~5x a 64-bit merge sort).

    More than 2^16 lists: two stable passes, low 16 bits then high (LSD radix).
    """
    if nlist <= 1 << 16:
        return np.argsort(cells.astype(np.uint16), kind="stable")
    order = np.argsort((cells & 0xFFFF).astype(np.uint16), kind="stable")
    return order[np.argsort((cells[order] >> 16).astype(np.uint16), kind="stable")]


def group_rows_by_cell(cells, nlist: int, path: Path, block_rows: int = 1 << 20) -> np.ndarray:
    """Counting sort of rows by cell into a memory-mapped .npy (rows ascending within a cell).

    `cells`: (n,) home cells, or (n, k) probes: a row is listed once under each
    distinct cell of its row, -1 entries skipped. Two passes over `cells` in
    blocks of `block_rows` rows; memory is O(nlist + block), not O(rows).
    Returns the CSR bounds (nlist + 1).
    """
    counts = np.zeros(nlist, dtype=np.int64)
    for start in range(0, len(cells), block_rows):
        found, _ = _block_entries(cells, start, min(start + block_rows, len(cells)))
        counts += np.bincount(found, minlength=nlist)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tmp = path.with_name(f".{path.name}.tmp")
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(int(bounds[-1]),))
    filled = bounds[:-1].copy()
    for start in range(0, len(cells), block_rows):
        found, of_row = _block_entries(cells, start, min(start + block_rows, len(cells)))
        order = _stable_order(found, nlist)  # entries are row-major: rows stay ascending within a cell
        sorted_cells = found[order]
        in_block = np.bincount(found, minlength=nlist)
        first = np.cumsum(in_block) - in_block  # where each cell's entries start in `order`
        rows[filled[sorted_cells] + np.arange(len(order)) - first[sorted_cells]] = of_row[order]
        filled += in_block
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
        for part in ("probes.npy", "cell_rows.npy", "cell_bounds.npy", "probe_rows.npy", "probe_bounds.npy",
                     "quantizer.faiss"):
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
