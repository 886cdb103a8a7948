"""Incremental runs: a run that grew extends its index instead of rebuilding it.

Shard ids are append-only, so new shards (or new precomputed parts) are new
embedding parts after the old ones, and their rows come after every old row
in sample_id order. When a descriptor's parts only grew -- every part the
index was built from is still there, unchanged (name, size, mtime, rows), in
the same order, and the memory budget, GPU setting and search threshold are
those of the build -- `GrowingIndexStage` extends the index: a flat index
adds the new vectors; a cell layout (`IndexSpec.storage == "cells"`, what
every IVF choice builds: quantizer + rows grouped by cell, no vectors in the
index) keeps its quantizer (no k-means), appends the new rows' probed cells
to `<name>.probes.npy` (one quantizer pass over the new rows only, as the
index's probe step: engine tasks of row blocks) and regroups all rows by home
cell and by every probed cell (the index's group step).
`<name>.generations.json` records which rows each build indexed (`bounds`: generation g is rows bounds[g]:bounds[g+1]) and
a `lineage` that is new with every full build; the neighbour stage keys its
markers on it, so it keeps the tasks of earlier generations and searches only
the new rows, against all rows (`dedup.search.new_pairs`).

Full rebuild (and a full search) instead, whenever:
* an old part changed, vanished, or a new part sorts before an old one;
* the budget, GPU, threshold or `--nprobe` setting changed, or the index is on a GPU;
* the new total makes another layout: flat -> cells when exact search stops
  being affordable, another quantizer kind (flat -> HNSW) or nprobe, or a
  cell build that no longer fits the budget (the rebuild then says so);
* a cell layout would hold more than `MAX_GROWTH` times the rows its
  quantizer was trained on (nlist ~ sqrt(nprobe * n): 4x the rows is 2x the
  lists a fresh choice makes, so cells get long and the search slows: retrain).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dedup.descriptors import query_transform_for
from dedup.engine import run_stage, unfinished_tasks
from dedup.errors import IndexInfeasible
from dedup.records import RunDir, embedding_parts, fingerprint, open_embeddings, write_json
from dedup.run import Run
from dedup.search.index_choice import IndexSpec, choose_index_streaming, estimate_memory_bytes
from dedup.stages.index import (
    GroupStage,
    IndexStage,
    ProbeStage,
    RowRange,
    _cells_spec,
    choose_descriptor_spec,
    faiss_gpu_available,
    index_paths,
    save_index,
    warm_row_caches,
    write_pending,
)

MAX_GROWTH = 4
BLOCK_ROWS = 65536  # rows read (as float32) per block while extending


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


def growth_rows(run: RunDir, name: str, settings: dict[str, Any]) -> int | None:
    """Rows already indexed when the index can be extended by the new parts (see module doc), else None."""
    record = read_generations(run, name)
    if record is None or record.settings != settings:
        return None
    stamps = part_stamps(run, name)
    old = len(record.parts)
    if len(stamps) <= old or stamps[:old] != record.parts:
        return None
    spec = IndexSpec.from_json(index_paths(run.index_dir, name)[1].read_text())
    total = sum(stamp[3] for stamp in stamps)
    return record.rows if _same_layout(run, name, spec, total, settings, record.bounds[1]) else None


def _same_layout(run: RunDir, name: str, spec: IndexSpec, total: int, settings: dict[str, Any],
                 trained: int) -> bool:
    """Would a build from scratch over `total` rows make the stored layout (kind, quantizer kind, nprobe)?"""
    if spec.use_gpu or not (spec.kind == "flat" or spec.storage == "cells"):
        return False
    if spec.storage == "cells" and total > MAX_GROWTH * trained:
        return False
    budget, gpu = settings["memory"], settings["gpu"]
    first = np.load(run.embedding_part(name, embedding_parts(run, name)[0]), mmap_mode="r")
    chosen = choose_index_streaming(total, first.shape[1], budget, gpu=gpu, query_variants=_variants(name, first))
    if spec.kind == "flat":
        return chosen.kind == "flat"
    if chosen.kind == "flat":
        return False
    try:  # every IVF choice (in RAM or on disk, flat or PQ codes) builds the cell layout
        fresh = _cells_spec(chosen, total, first.shape[1], budget, gpu, settings["threshold"], settings.get("nprobe"))
    except IndexInfeasible:
        return False  # the rebuild reports it
    return ("_HNSW" in fresh.factory) == ("_HNSW" in spec.factory) and min(fresh.nprobe, spec.nlist) == spec.nprobe


def _variants(name: str, rows: np.ndarray) -> int:
    transform = query_transform_for(name)
    return len(transform(np.asarray(rows[:1], np.float32))) if transform is not None else 1


class GrowingIndexStage(IndexStage):
    """The index's train step, which extends a grown run's index (see module doc) and rebuilds it otherwise.

    The engine calls `reset()` when the parts changed: the index is kept where
    it can be extended, so `run_task` extends it (a flat index here; a cell
    layout hands the new rows to `ProbeStage` and `GroupStage`); otherwise a
    full build trains here and leaves its probe and group steps to the same two
    stages. The group step records a cell layout's generation.
    """

    def reset(self) -> None:
        if growth_rows(self.run_dir, self.descriptor, self._settings()) is None:
            super().reset()
            generations_path(self.run_dir.index_dir, self.descriptor).unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        warm_row_caches(self.run_dir, self.descriptor)
        old = growth_rows(self.run_dir, self.descriptor, self._settings())
        if old is None:
            generations_path(self.run_dir.index_dir, self.descriptor).unlink(missing_ok=True)
            record = {"lineage": secrets.token_hex(8), "settings": self._settings()}
            spec = self._train(generations=record)
            if spec.storage != "cells":  # complete now; a cell build's group step writes the record
                write_generations(self.run_dir, self.descriptor, record["lineage"], [0, spec.n_vectors], record["settings"])
            progress(spec.n_vectors)
            return {"vectors": spec.n_vectors, "added": spec.n_vectors}
        record = read_generations(self.run_dir, self.descriptor)
        spec = IndexSpec.from_json(index_paths(self.run_dir.index_dir, self.descriptor)[1].read_text())
        if spec.storage == "cells":  # the probe step probes the new rows, the group step regroups and records
            total = len(open_embeddings(self.run_dir, self.descriptor))
            generations = {"lineage": record.lineage, "bounds": [*record.bounds, total], "settings": self._settings()}
            spec = pend_cells_extension(self.run_dir, self.descriptor, spec, old, total, self.memory_budget_bytes,
                                        self.rows_per_task, generations)
        else:
            spec = extend_index(self.run_dir, self.descriptor, old, self.memory_budget_bytes)
            write_generations(self.run_dir, self.descriptor, record.lineage, [*record.bounds, spec.n_vectors],
                              self._settings())
        progress(spec.n_vectors - old)
        return {"vectors": spec.n_vectors, "added": spec.n_vectors - old}


def index_stages(run: Run, name: str, gpu: bool, rows_per_task: int | None = None) -> list:
    """The index's three engine stages in order: train (or extend), probe row blocks, group rows by cell."""
    threshold = run.settings.search_thresholds.get(name)  # sets nprobe (index_choice.choose_nprobe)
    train = GrowingIndexStage(run, name, run.settings.memory_budget_bytes, gpu, threshold,
                              nprobe=run.settings.nprobe, rows_per_task=rows_per_task)
    return [train, ProbeStage(run, name), GroupStage(run, name)]


def build_indexes(run: Run, gpu: bool | None = None, rows_per_task: int | None = None) -> dict[str, IndexSpec]:
    """Index every descriptor of the run behind the engine, extending grown indexes; returns the specs.

    `rows_per_task`: rows per probe task (default: `PROBE_TASK_BLOCKS` probe blocks).
    """
    gpu = faiss_gpu_available() if gpu is None else gpu
    specs = {}
    for name in run.settings.descriptors:
        stages = index_stages(run, name, gpu, rows_per_task)
        if run.settings.nprobe is not None and unfinished_tasks(run, stages[0]):
            # A bad --nprobe is the user's: say so here, as two lines, not as a failed task of a Ray worker.
            choose_descriptor_spec(run, name, run.settings.memory_budget_bytes, gpu, stages[0].threshold,
                                   run.settings.nprobe)
        for stage in stages:
            if stage.task_ids():  # a flat index (built or extended) leaves the probe and group steps nothing
                run_stage(run, stage, unit="vectors")
        specs[name] = IndexSpec.from_json(index_paths(run.index_dir, name)[1].read_text())
    return specs


# ---------------------------------------------------------------- extension


def extend_index(run: RunDir, name: str, old: int, budget: int) -> IndexSpec:
    """Add rows old: of the descriptor's parts to its stored flat index (cell layouts: `pend_cells_extension`)."""
    vectors = open_embeddings(run, name)
    spec = IndexSpec.from_json(index_paths(run.index_dir, name)[1].read_text())
    index = faiss.read_index(str(index_paths(run.index_dir, name)[0]))
    new = RowRange(vectors, old, len(vectors))
    for start in range(0, len(new), BLOCK_ROWS):
        index.add(np.ascontiguousarray(new[start : start + BLOCK_ROWS], dtype=np.float32))
    grown = replace(spec, n_vectors=len(vectors),
                    memory_bytes=estimate_memory_bytes(spec.kind, len(vectors), spec.dim, spec.nlist, spec.pq_m))
    save_index(index, grown, run.index_dir, name)
    return grown


def _grown_cells_spec(spec: IndexSpec, total: int, budget: int) -> IndexSpec:
    """The stored cell spec over `total` rows; memory_bytes as `cells_stage_bytes` counts it at that size."""
    from dedup.search.index_choice import cells_stage_bytes

    working = cells_stage_bytes(total, spec.dim, spec.nlist, spec.nprobe, "_HNSW" in spec.factory, budget)
    return replace(spec, n_vectors=total, memory_bytes=max(working, spec.memory_bytes))


def pend_cells_extension(run: RunDir, name: str, spec: IndexSpec, old: int, total: int, budget: int,
                         rows_per_task: int | None, generations: dict[str, Any]) -> IndexSpec:
    """Hand rows old:total of a grown cell layout to the probe and group steps; the quantizer is kept.

    The probe step probes only the new rows (tasks of whole blocks counted from
    `old`, as one pass over them would); the group step copies the stored rows'
    probes (never recomputed), appends the new ones, regroups every row by home
    cell and by every probed cell, saves the grown spec and records the
    generation. The stored index stays whole until then: a run killed on the
    way extends the same stored rows again.
    """
    from dedup.search.index_choice import probe_block_rows

    grown = _grown_cells_spec(spec, total, budget)
    write_pending(run, name, grown, probe_block_rows(spec.dim, spec.nprobe, budget), rows_per_task, generations,
                  first_row=old)
    return grown
