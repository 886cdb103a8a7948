"""Incremental runs: a run that grew extends its index instead of rebuilding it.

Shard ids are append-only, so new shards (or new precomputed parts) are new
embedding parts after the old ones, and their rows come after every old row
in sample_id order. When a descriptor's parts only grew -- every part the
index was built from is still there, unchanged (name, size, mtime, rows), in
the same order, and the memory budget and GPU setting are those of the build
-- `GrowingIndexStage` extends the index: the quantizer is kept (no k-means),
the new rows get their probed cells appended to `<name>.probes.npy`, the rows
are regrouped by home cell, and the full index (for queries) gets the new
vectors: a flat or in-RAM IVF index adds them, on-disk lists are merged with
them into a new `<name>.g<generation>.ivfdata`. `<name>.generations.json`
records which rows each build indexed (`bounds`: generation g is rows
bounds[g]:bounds[g+1]) and a `lineage` that is new with every full build;
the neighbour stage keys its markers on it, so it keeps the tasks of earlier
generations and searches only the new rows, against all rows
(`dedup.search.new_pairs`).

Full rebuild (and a full search) instead, whenever:
* an old part changed, vanished, or a new part sorts before an old one;
* the budget or GPU setting changed, or the index is on a GPU;
* the kind `choose_index_streaming` picks for the new total differs from the
  stored one (flat -> IVF when exact search stops being affordable, in RAM ->
  on disk when the lists outgrow the budget), or an IVF-PQ code size differs;
* an IVF index would hold more than `MAX_GROWTH` times the rows its quantizer
  was trained on (nlist ~ 4 sqrt(n): 4x the rows is 2x the lists a fresh
  choice makes, so cells get long and the search slows: retrain).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dedup.descriptors import query_transform_for
from dedup.engine import run_stage
from dedup.records import RunDir, embedding_parts, fingerprint, open_embeddings, write_array, write_json
from dedup.run import Run
from dedup.search.index_choice import IndexSpec, choose_index_streaming, estimate_memory_bytes
from dedup.stages.index import (
    IndexStage,
    build_descriptor_index,
    cell_paths,
    faiss_gpu_available,
    group_rows_by_cell,
    index_paths,
    save_index,
)

MAX_GROWTH = 4
BLOCK_ROWS = 65536  # rows read (as float32) per block while extending
IVF_KINDS = ("ivf_flat", "ivf_pq")


def generations_path(index_dir: Path, name: str) -> Path:
    return Path(index_dir) / f"{name}.generations.json"


@dataclass(frozen=True)
class Generations:
    """What `<name>.generations.json` holds; valid only while the index files are the ones it was written with."""

    lineage: str
    bounds: list[int]
    parts: list[list[Any]]
    settings: dict[str, Any]
    index_stamp: str

    @property
    def rows(self) -> int:
        return self.bounds[-1]


def part_stamps(run: RunDir, name: str) -> list[list[Any]]:
    """[file name, size, mtime_ns, rows] of every embedding part, in part order (what "unchanged" means)."""
    stamps = []
    for part in embedding_parts(run, name):
        path = run.embedding_part(name, part)
        stat = path.stat()
        stamps.append([path.name, stat.st_size, stat.st_mtime_ns, int(np.load(path, mmap_mode="r").shape[0])])
    return stamps


def index_stamp(index_dir: Path, name: str) -> str:
    return fingerprint(index_paths(index_dir, name))


def read_generations(run: RunDir, name: str) -> Generations | None:
    """The generation record, or None when absent or when the index was rebuilt without it (another stamp)."""
    import json

    path = generations_path(run.index_dir, name)
    if not path.exists():
        return None
    record = Generations(**json.loads(path.read_text()))
    return record if record.index_stamp == index_stamp(run.index_dir, name) else None


def write_generations(run: RunDir, name: str, lineage: str, bounds: list[int], settings: dict[str, Any]) -> None:
    record = {"lineage": lineage, "bounds": [int(b) for b in bounds], "parts": part_stamps(run, name),
              "settings": settings, "index_stamp": index_stamp(run.index_dir, name)}
    write_json(record, generations_path(run.index_dir, name))


def growth_rows(run: RunDir, name: str, budget: int, gpu: bool) -> int | None:
    """Rows already indexed when the index can be extended by the new parts (see module doc), else None."""
    record = read_generations(run, name)
    if record is None or record.settings != {"memory": budget, "gpu": gpu}:
        return None
    stamps = part_stamps(run, name)
    old = len(record.parts)
    if len(stamps) <= old or stamps[:old] != record.parts:
        return None
    spec = IndexSpec.from_json(index_paths(run.index_dir, name)[1].read_text())
    total = sum(stamp[3] for stamp in stamps)
    return record.rows if _same_kind(run, name, spec, total, budget, gpu, record.bounds[1]) else None


def _same_kind(run: RunDir, name: str, spec: IndexSpec, total: int, budget: int, gpu: bool, trained: int) -> bool:
    if spec.use_gpu or spec.kind not in ("flat", *IVF_KINDS) or (spec.on_disk and spec.kind != "ivf_flat"):
        return False
    if spec.kind in IVF_KINDS and (total > MAX_GROWTH * trained or not cell_paths(run.index_dir, name)["probes.npy"].exists()):
        return False
    first = np.load(run.embedding_part(name, embedding_parts(run, name)[0]), mmap_mode="r")
    chosen = choose_index_streaming(total, first.shape[1], budget, gpu=gpu, query_variants=_variants(name, first))
    return chosen.kind == spec.kind and chosen.on_disk == spec.on_disk and chosen.pq_m == spec.pq_m


def _variants(name: str, rows: np.ndarray) -> int:
    transform = query_transform_for(name)
    return len(transform(np.asarray(rows[:1], np.float32))) if transform is not None else 1


class GrowingIndexStage(IndexStage):
    """The index stage that extends a grown run's index (see module doc) and rebuilds it otherwise.

    The engine calls `reset()` when the parts changed: the index is kept where
    it can be extended, so `run_task` extends it; otherwise both rebuild.
    """

    def _settings(self) -> dict[str, Any]:
        return {"memory": self.memory_budget_bytes, "gpu": self.gpu}

    def reset(self) -> None:
        if growth_rows(self.run_dir, self.descriptor, self.memory_budget_bytes, self.gpu) is None:
            super().reset()
            _remove_ivfdata(self.run_dir.index_dir, self.descriptor)  # lists of extended on-disk indexes too
            generations_path(self.run_dir.index_dir, self.descriptor).unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        old = growth_rows(self.run_dir, self.descriptor, self.memory_budget_bytes, self.gpu)
        if old is None:
            spec = build_descriptor_index(self.run_dir, self.descriptor, self.memory_budget_bytes, self.gpu)
            write_generations(self.run_dir, self.descriptor, secrets.token_hex(8), [0, spec.n_vectors], self._settings())
            progress(spec.n_vectors)
            return {"vectors": spec.n_vectors, "added": spec.n_vectors}
        record = read_generations(self.run_dir, self.descriptor)
        spec = extend_index(self.run_dir, self.descriptor, old, generation=len(record.bounds) - 1)
        write_generations(self.run_dir, self.descriptor, record.lineage, [*record.bounds, spec.n_vectors],
                          self._settings())
        progress(spec.n_vectors - old)
        return {"vectors": spec.n_vectors, "added": spec.n_vectors - old}


def build_indexes(run: Run, gpu: bool | None = None) -> dict[str, IndexSpec]:
    """Index every descriptor of the run behind the engine, extending grown indexes; returns the specs."""
    gpu = faiss_gpu_available() if gpu is None else gpu
    specs = {}
    for name in run.settings.descriptors:
        run_stage(run, GrowingIndexStage(run, name, run.settings.memory_budget_bytes, gpu), unit="vectors")
        specs[name] = IndexSpec.from_json(index_paths(run.index_dir, name)[1].read_text())
    return specs


# ---------------------------------------------------------------- extension


class _RowRange:
    """Rows start:stop of a VectorParts as an array-like (len and slices), for the block readers."""

    def __init__(self, vectors, start: int, stop: int) -> None:
        self.vectors, self.start, self.stop = vectors, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, item: slice) -> np.ndarray:
        first, last, _ = item.indices(len(self))
        return self.vectors[self.start + first : self.start + last]


def extend_index(run: RunDir, name: str, old: int, generation: int) -> IndexSpec:
    """Add rows old: of the descriptor's parts to its stored index (quantizer kept); returns the new spec."""
    vectors = open_embeddings(run, name)
    index_path, spec_path = index_paths(run.index_dir, name)
    spec = IndexSpec.from_json(spec_path.read_text())
    new = _RowRange(vectors, old, len(vectors))
    if spec.kind == "flat":
        index = faiss.read_index(str(index_path))
        for start in range(0, len(new), BLOCK_ROWS):
            index.add(np.ascontiguousarray(new[start : start + BLOCK_ROWS], dtype=np.float32))
    elif spec.on_disk:
        index = _extend_on_disk(run, name, spec, new, _extend_cells(run, name, spec, vectors, old), old, generation)
    else:
        index = faiss.read_index(str(index_path))
        _append_ivf(index, new, _extend_cells(run, name, spec, vectors, old), first_id=old)
    grown = replace(spec, n_vectors=len(vectors))
    if not spec.on_disk:  # the on-disk spec's memory_bytes is the build's working set: unchanged
        grown = replace(grown, memory_bytes=estimate_memory_bytes(spec.kind, len(vectors), spec.dim, spec.nlist, spec.pq_m))
    save_index(index, grown, run.index_dir, name, with_cells=spec.kind in IVF_KINDS)
    if spec.on_disk:
        _remove_ivfdata(run.index_dir, name, keep=ivfdata_path(run.index_dir, name, generation))
    return grown


def ivfdata_path(index_dir: Path, name: str, generation: int) -> Path:
    """On-disk lists of generation g >= 1: a new file each time, so the stored index stays whole until replaced."""
    return cell_paths(index_dir, name)["ivfdata"] if generation == 0 else Path(index_dir) / f"{name}.g{generation}.ivfdata"


def _remove_ivfdata(index_dir: Path, name: str, keep: Path | None = None) -> None:
    for path in Path(index_dir).glob(f"{name}.*ivfdata"):
        if path != keep:
            path.unlink(missing_ok=True)


def _extend_on_disk(run: RunDir, name: str, spec: IndexSpec, new: _RowRange, home: np.ndarray, old: int,
                    generation: int):
    """The stored on-disk lists plus one index of the new rows, merged into a new .ivfdata file.

    The new rows go to the cells `home` chose (no quantizer pass). The stored
    lists are read through faiss' memory map of their .ivfdata, never loaded.
    (faiss contrib's merge_ondisk cannot take them: it reopens every input
    with IO_FLAG_MMAP, which crashes on on-disk lists.)
    """
    quantizer = faiss.read_index(str(cell_paths(run.index_dir, name)["quantizer.faiss"]))
    part = faiss.IndexIVFFlat(quantizer, spec.dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
    _append_ivf(part, new, home, first_id=old)
    stored = faiss.read_index(str(index_paths(run.index_dir, name)[0]))
    target = ivfdata_path(run.index_dir, name, generation)
    target.unlink(missing_ok=True)  # a killed extension's leftover (the stored index names another file)
    merged = faiss.IndexIVFFlat(quantizer, spec.dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
    lists = faiss.OnDiskInvertedLists(spec.nlist, merged.code_size, str(target))
    sources = faiss.InvertedListsPtrVector()
    for index in (stored, part):
        sources.push_back(faiss.extract_index_ivf(index).invlists)
    merged.ntotal = lists.merge_from_multiple(sources.data(), sources.size(), False)
    merged.replace_invlists(lists, True)
    lists.this.disown()  # owned by `merged` now
    return merged


def _extend_cells(run: RunDir, name: str, spec: IndexSpec, vectors, old: int) -> np.ndarray:
    """Probes of the new rows appended to the stored ones, rows regrouped by cell; returns the new home cells.

    The old rows' probes are copied, never recomputed, so a run killed here
    redoes the same extension from the same stored rows.
    """
    from dedup.search.faiss_index import probe_cells

    paths = cell_paths(run.index_dir, name)
    quantizer = faiss.read_index(str(paths["quantizer.faiss"]))
    stored = np.load(paths["probes.npy"], mmap_mode="r")
    tmp = paths["probes.npy"].with_name(f".{paths['probes.npy'].name}.tmp")
    probes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(len(vectors), stored.shape[1]))
    for start in range(0, old, BLOCK_ROWS):
        probes[start : min(start + BLOCK_ROWS, old)] = stored[start : min(start + BLOCK_ROWS, old)]
    probe_cells(quantizer, _RowRange(vectors, old, len(vectors)), stored.shape[1], probes[old:])
    probes.flush()
    del probes, stored
    tmp.replace(paths["probes.npy"])
    home = np.load(paths["probes.npy"], mmap_mode="r")[:, 0]  # a strided view of the map, read in blocks
    write_array(group_rows_by_cell(home, spec.nlist, paths["cell_rows.npy"]), paths["cell_bounds.npy"])
    return home[old:]


def _append_ivf(index, rows: _RowRange, home: np.ndarray, first_id: int) -> None:
    """Add rows to the cells already chosen (labels first_id...), keeping every stored list."""
    ivf = faiss.extract_index_ivf(index)
    for start in range(0, len(rows), BLOCK_ROWS):
        block = np.ascontiguousarray(rows[start : start + BLOCK_ROWS], dtype=np.float32)
        lists = np.ascontiguousarray(home[start : start + len(block)], dtype=np.int64)
        labels = np.arange(first_id + start, first_id + start + len(block), dtype=np.int64)
        ivf.add_core(len(block), faiss.swig_ptr(block), faiss.swig_ptr(labels), faiss.swig_ptr(lists))
    if ivf is not index:  # wrappers keep their own count
        index.ntotal = ivf.ntotal
