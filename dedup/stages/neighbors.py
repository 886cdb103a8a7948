"""Find-neighbours stage: all-vs-all range search per descriptor -> neighbors/<descriptor>/part_{j}[.k].parquet.

Every index type is searched in query blocks (one engine task per block of
rows), reading vectors from the descriptor's float16 memory maps. CPU IVF
indexes are joined cell by cell from what the index stage stored (quantizer,
each row's probed cells, rows grouped by cell): the full index is never read
and no vector is assigned to a cell a second time.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dedup.descriptors import query_transform_for
from dedup.engine import StageReport, run_stage
from dedup.errors import StoreError
from dedup.records import (
    EDGES,
    RowKeys,
    RunDir,
    embedding_parts,
    fingerprint,
    open_embeddings,
    open_row_keys,
    write_record,
)
from dedup.run import Run
from dedup.settings import Settings

# Edges per output file: a task with a 10,000-copy group writes several files instead of one huge frame.
EDGES_PER_FILE = 1 << 22
# Bytes of one query row while it is searched: float32 variants, the probes and
# the similarity rows against one cell (about 4 cells' worth of members).
QUERY_ROW_OVERHEAD = 4


def rows_per_task_for(budget_bytes: int, dim: int, variants: int, cap: int = 1 << 17) -> int:
    """Query rows per task so that the task's buffers stay within a quarter of the memory budget."""
    per_row = dim * 4 * variants * QUERY_ROW_OVERHEAD + EDGES_PER_FILE * 20 // (1 << 16)
    return int(max(1024, min(cap, budget_bytes // 4 // per_row)))


class NeighborsStage:
    """All-vs-all range search in row blocks; block j's edges -> neighbors/<descriptor>/part_{j}.parquet.

    Rows are the descriptor's vectors in sample_id order, so block boundaries
    are stable and a killed search resumes at the first unfinished block.
    An index extended by an incremental run (`dedup.stages.increment`) has
    generations of rows: block j of generation g >= 1 is task `g{g}-{j}`
    (part_g{g}-{j}.parquet) and searches its new rows against all rows: the
    forward rule among rows up to the generation's end, plus every earlier
    row. The fingerprint then names the index lineage, not its files, so the
    tasks of earlier generations stay done; a full rebuild starts a new lineage.
    """

    def __init__(self, run: RunDir, descriptor: str, threshold: float, knn_cap: int | None = None,
                 rows_per_task: int = 65536) -> None:
        self.run_dir, self.descriptor, self.threshold, self.knn_cap = run, descriptor, threshold, knn_cap
        self.rows_per_task = rows_per_task
        self.name = f"neighbors-{descriptor}"
        self._loaded = self._bounds = self._ranges = None

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None, "_bounds": None, "_ranges": None}

    def _spec(self):
        from dedup.search.index_choice import IndexSpec

        spec_file = self.run_dir.index_dir / f"{self.descriptor}.json"
        return IndexSpec.from_json(spec_file.read_text()) if spec_file.exists() else None

    def _uses_cells(self) -> bool:
        from dedup.stages.index import cell_paths

        spec = self._spec()
        stored = cell_paths(self.run_dir.index_dir, self.descriptor)
        if spec is None or not stored["probes.npy"].exists():
            return False
        # A cell layout (GPU builds too) has no other index to search.
        return spec.storage == "cells" or (spec.kind in ("ivf_flat", "ivf_pq") and not spec.use_gpu
                                           and self.knn_cap is None)

    def _cell_major(self) -> bool:
        """Generation 0 joined cell by cell: untransformed queries over a cell layout with probe lists."""
        from dedup.stages.index import cell_paths

        stored = cell_paths(self.run_dir.index_dir, self.descriptor)
        return (self._uses_cells() and query_transform_for(self.descriptor) is None
                and stored["probe_rows.npy"].exists() and stored["probe_bounds.npy"].exists())

    def _check_pruned_for(self) -> None:
        spec = self._spec()
        pruned_at = getattr(spec, "probe_threshold", None)
        if pruned_at is not None and self.threshold < pruned_at:
            raise StoreError(
                f"the {self.descriptor} index keeps only the cells a pair at >= {pruned_at} can be in, "
                f"not {self.threshold}",
                hint="rebuild it at this threshold: rerun `dedup run` with the same --threshold",
            )

    def _probe_lists(self):
        from dedup.search.pairs import ProbeLists
        from dedup.stages.index import cell_paths

        paths = cell_paths(self.run_dir.index_dir, self.descriptor)
        return ProbeLists(np.load(paths["probe_rows.npy"], mmap_mode="r"), np.load(paths["probe_bounds.npy"]))

    def _cell_ranges(self) -> list[range]:
        """Generation 0's tasks: contiguous cell ranges of about equal work, as many as row blocks."""
        from dedup.search.pairs import cell_work, split_cells

        if self._ranges is None:
            lists, _ = self._searcher()
            bounds, _ = self._generations()
            tasks = max(1, -(-(bounds[1] - bounds[0]) // self.rows_per_task))
            self._ranges = split_cells(cell_work(lists, self._probe_lists()), tasks)
        return self._ranges

    def _load(self):
        if self._loaded is None:
            vectors = open_embeddings(self.run_dir, self.descriptor)
            keys = open_row_keys(self.run_dir, self.descriptor)  # memory-mapped above KEYS_IN_MEMORY rows
            self._loaded = (self._searcher(), vectors, keys)
        return self._loaded

    def _searcher(self):
        import faiss

        from dedup.search.pairs import CellLists
        from dedup.stages.index import cell_paths, load_index

        if not self._uses_cells():
            return load_index(self.run_dir.index_dir, self.descriptor)[0]
        paths = cell_paths(self.run_dir.index_dir, self.descriptor)
        lists = CellLists(np.load(paths["cell_rows.npy"], mmap_mode="r"), np.load(paths["cell_bounds.npy"]),
                          np.load(paths["probes.npy"], mmap_mode="r"))
        return lists, faiss.read_index(str(paths["quantizer.faiss"]))

    def _generations(self):
        """Generation bounds (rows bounds[g]:bounds[g+1]) and lineage; one generation without a valid record."""
        if self._bounds is None:
            self._bounds = self._read_generations()
        return self._bounds

    def _read_generations(self):
        from dedup.stages.increment import read_generations

        rows = sum(len(np.load(self.run_dir.embedding_part(self.descriptor, p), mmap_mode="r"))
                   for p in embedding_parts(self.run_dir, self.descriptor))
        record = read_generations(self.run_dir, self.descriptor)
        if record is None or record.rows != rows:
            return [0, rows], None
        return record.bounds, record.lineage

    def task_ids(self) -> list[str]:
        bounds, _ = self._generations()
        ids = []
        for g, (lo, hi) in enumerate(pairwise(bounds)):
            blocks = -(-(hi - lo) // self.rows_per_task)
            if g == 0 and self._cell_major():
                blocks = len(self._cell_ranges())
            blocks = max(1, blocks) if g == 0 else blocks  # an empty run still has its one (empty) task
            ids += [str(j) if g == 0 else f"g{g}-{j}" for j in range(blocks)]
        return ids

    def _task_rows(self, task_id: str, bounds: list[int]) -> tuple[int, slice]:
        generation, block = (int(x) for x in task_id[1:].split("-")) if task_id.startswith("g") else (0, int(task_id))
        start = bounds[generation] + block * self.rows_per_task
        return generation, slice(start, min(start + self.rows_per_task, bounds[generation + 1]))

    def _pairs(self, rows: slice, progress):
        from dedup.search.pairs import find_pairs, find_pairs_cells

        searcher, vectors, _ = self._load()
        transform = query_transform_for(self.descriptor)
        if isinstance(searcher, tuple):
            lists, quantizer = searcher
            return find_pairs_cells(vectors, vectors.ids, self.threshold, lists, rows=rows, quantizer=quantizer,
                                    query_transform=transform, block_size=self.rows_per_task, max_pairs=EDGES_PER_FILE,
                                    progress=progress)
        return find_pairs(searcher, vectors, vectors.ids, self.threshold, query_transform=transform,
                          knn_cap=self.knn_cap, rows=rows, progress=progress)

    def _earlier_pairs(self, rows: slice, earlier: int, progress):
        """Generation >= 1: pairs of its new rows with every row of the earlier generations."""
        from dedup.search.new_pairs import pairs_with_earlier

        searcher, vectors, _ = self._load()
        lists, quantizer = searcher if isinstance(searcher, tuple) else (None, None)
        return pairs_with_earlier(vectors, vectors.ids, self.threshold, rows, earlier, lists=lists,
                                  quantizer=quantizer, query_transform=query_transform_for(self.descriptor),
                                  block_size=self.rows_per_task, max_pairs=EDGES_PER_FILE, progress=progress)

    def _cell_pairs(self, task_id: str, end: int, progress):
        from dedup.search.pairs import find_pairs_by_cell

        (lists, _), vectors, _ = self._load()
        return find_pairs_by_cell(vectors, vectors.ids, self.threshold, lists, self._probe_lists(),
                                  self._cell_ranges()[int(task_id)], row_limit=end, max_pairs=EDGES_PER_FILE,
                                  progress=progress)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        self._check_pruned_for()
        searcher, vectors, keys = self._load()
        bounds, _ = self._generations()
        generation, rows = self._task_rows(task_id, bounds)
        end = bounds[generation + 1]
        writer = _EdgeWriter(self.run_dir.neighbors_dir(self.descriptor), task_id, self.descriptor, keys, vectors.ids)
        cell_major = generation == 0 and self._cell_major()
        pairs = self._cell_pairs(task_id, end, progress) if cell_major else self._pairs(rows, progress)
        if cell_major:  # the task's rows are its cells' members
            (lists, _), cells = searcher, self._cell_ranges()[int(task_id)]  # loaded once, not re-read
            rows = slice(int(lists.bounds[cells.start]), int(lists.bounds[cells.stop]))
        for id_a, id_b, sims in pairs:
            if end < len(vectors):  # a later generation pairs its rows with these: keep each pair once
                keep = id_b < vectors.ids[end]
                id_a, id_b, sims = id_a[keep], id_b[keep], sims[keep]
            writer.add((id_a, id_b, sims))
        if generation:
            for pairs in self._earlier_pairs(rows, bounds[generation], lambda n: None):
                writer.add(pairs)
        writer.close()
        return {"queries": rows.stop - rows.start, "edges": writer.edges}

    def fingerprint(self) -> str:
        from dedup.stages.index import index_paths

        settings = {"threshold": self.threshold, "knn_cap": self.knn_cap, "rows": self.rows_per_task,
                    "join": "cell-major" if self._cell_major() else "row-blocks"}
        _, lineage = self._generations()
        if lineage is not None:  # an extended index: earlier generations' tasks stay valid
            return fingerprint([], {**settings, "lineage": lineage})
        return fingerprint(index_paths(self.run_dir.index_dir, self.descriptor), settings)

    def reset(self) -> None:
        import shutil

        shutil.rmtree(self.run_dir.neighbors_dir(self.descriptor), ignore_errors=True)

    def close(self) -> None:
        self._loaded = self._bounds = None


class _EdgeWriter:
    """Buffers a task's pairs and writes part_{task}.parquet, then part_{task}.{k}.parquet every EDGES_PER_FILE."""

    def __init__(self, folder: Path, task_id: str, descriptor: str, keys: RowKeys, ids: np.ndarray) -> None:
        self.folder, self.task_id, self.descriptor, self.keys, self.ids = folder, task_id, descriptor, keys, ids
        self.pending: list = []
        self.buffered = self.edges = self.files = 0

    def add(self, pairs) -> None:
        for start in range(0, len(pairs[0]), EDGES_PER_FILE):
            piece = tuple(column[start : start + EDGES_PER_FILE] for column in pairs)
            self.pending.append(piece)
            self.buffered += len(piece[0])
            if self.buffered >= EDGES_PER_FILE:
                self._flush()

    def close(self) -> None:
        if self.pending or not self.files:  # an empty task still writes its (empty) part
            self._flush()

    def _flush(self) -> None:
        id_a = np.concatenate([p[0] for p in self.pending]) if self.pending else np.zeros(0, np.int64)
        id_b = np.concatenate([p[1] for p in self.pending]) if self.pending else np.zeros(0, np.int64)
        sim = np.concatenate([p[2] for p in self.pending]) if self.pending else np.zeros(0, np.float32)
        # Keys by row, taken as Arrow strings: no Python object per edge.
        rows_a, rows_b = np.searchsorted(self.ids, id_a), np.searchsorted(self.ids, id_b)
        table = pa.table({
            "id_a": pa.array(id_a.astype(np.int64)),
            "id_b": pa.array(id_b.astype(np.int64)),
            "key_a": self.keys.take(rows_a),
            "key_b": self.keys.take(rows_b),
            "similarity": pa.array(sim.astype(np.float32)),
            "descriptor": pa.repeat(pa.scalar(self.descriptor, pa.string()), len(id_a)),
        })
        suffix = f".{self.files}" if self.files else ""
        # Keys are unique per row: dictionary-encoding them only costs time.
        write_record(table, self.folder / f"part_{self.task_id}{suffix}.parquet", EDGES, ["descriptor"])
        self.edges += len(id_a)
        self.files += 1
        self.pending, self.buffered = [], 0


def find_neighbors(run: Run, gpu: bool | None = None) -> dict[str, StageReport]:
    """Search every descriptor at its search threshold (run.json) behind the engine."""
    from dedup.stages.index import faiss_gpu_available

    gpu = faiss_gpu_available() if gpu is None else gpu
    reports = {}
    for name in run.settings.descriptors:
        knn_cap = 2048 if gpu else None  # faiss-gpu's k limit; saturated queries are redone exactly
        reports[name] = run_stage(run, neighbors_stage(run, name, knn_cap), unit="queries")
    return reports


def neighbors_stage(run: Run, name: str, knn_cap: int | None) -> NeighborsStage:
    """The neighbour stage of one descriptor as the run's settings make it (the cluster stage checks its markers)."""
    return NeighborsStage(run, name, run.settings.search_thresholds[name], knn_cap,
                          rows_per_task=_rows_per_task(run, name, run.settings))


def _rows_per_task(run: RunDir, name: str, config: Settings) -> int:
    """From the run's --memory; a resumed search keeps the block size its finished tasks used."""
    marker_dir = run.root / "_markers" / f"neighbors-{name}"
    recorded = run.neighbors_dir(name) / "_rows_per_task"
    if marker_dir.exists() and recorded.exists():
        return int(recorded.read_text())
    vectors = open_embeddings(run, name)
    transform = query_transform_for(name)
    variants = len(transform(np.asarray(vectors[:1], np.float32))) if transform is not None else 1
    rows = rows_per_task_for(config.memory_budget_bytes, vectors.dim, variants)
    recorded.parent.mkdir(parents=True, exist_ok=True)
    recorded.write_text(str(rows))
    return rows


def clear_stage(run: RunDir, stage: str, folder: Path) -> None:
    import shutil

    shutil.rmtree(run.root / "_markers" / stage, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
