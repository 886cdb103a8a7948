"""Find-neighbours stage: all-vs-all range search per descriptor -> neighbors/<descriptor>/part_{j}.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dedup.descriptors import query_transform_for
from dedup.engine import StageReport, run_stage
from dedup.records import EDGES, RunDir, fingerprint, load_embeddings, load_samples, write_record
from dedup.run import Run


class NeighborsStage:
    """All-vs-all range search in row blocks; block j's edges -> neighbors/<descriptor>/part_{j}.parquet.

    Rows are the descriptor's vectors in sample_id order, so block boundaries
    are stable and a killed search resumes at the first unfinished block.
    """

    def __init__(self, run: RunDir, descriptor: str, threshold: float, knn_cap: int | None = None,
                 rows_per_task: int = 65536) -> None:
        self.run_dir, self.descriptor, self.threshold, self.knn_cap = run, descriptor, threshold, knn_cap
        self.rows_per_task = rows_per_task
        self.name = f"neighbors-{descriptor}"
        self._loaded = None

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None}

    def _load(self):
        if self._loaded is None:
            from dedup.stages.index import load_index

            index, _spec = load_index(self.run_dir.index_dir, self.descriptor)
            ids, vectors = load_embeddings(self.run_dir, self.descriptor)
            keys = load_samples(self.run_dir, ["sample_id", "key"]).set_index("sample_id")["key"]
            self._loaded = (index, ids, vectors, keys)
        return self._loaded

    def task_ids(self) -> list[str]:
        from dedup.records import embedding_parts

        if self._uses_ivf_join():
            return ["0"]
        rows = sum(len(np.load(self.run_dir.embedding_part(self.descriptor, p), mmap_mode="r"))
                   for p in embedding_parts(self.run_dir, self.descriptor))
        return [str(j) for j in range(max(1, -(-rows // self.rows_per_task)))]

    def _uses_ivf_join(self) -> bool:
        # IVF-Flat on CPU: the BLAS cell join is ~2.5x faster than per-query range search
        # (benchmarks/bench_graph.py, 1e6 vectors: 227 s vs 570 s) but runs as one task.
        from dedup.search.index_choice import IndexSpec

        spec_file = self.run_dir.index_dir / f"{self.descriptor}.json"
        spec = IndexSpec.from_json(spec_file.read_text()) if spec_file.exists() else None
        return spec is not None and spec.kind == "ivf_flat" and not spec.use_gpu and self.knn_cap is None

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        from dedup.search.pairs import find_pairs, find_pairs_ivf_join

        index, ids, vectors, keys = self._load()
        transform = query_transform_for(self.descriptor)
        if self._uses_ivf_join():
            rows = slice(0, len(vectors))
            found = list(find_pairs_ivf_join(index, vectors, ids, self.threshold, query_transform=transform))
            progress(len(vectors))
        else:
            start = int(task_id) * self.rows_per_task
            rows = slice(start, min(start + self.rows_per_task, len(vectors)))
            found = list(find_pairs(index, vectors, ids, self.threshold, query_transform=transform,
                                    knn_cap=self.knn_cap, rows=rows, progress=progress))
        id_a = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64)
        id_b = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.int64)
        sim = np.concatenate([f[2] for f in found]) if found else np.zeros(0, np.float32)
        edges = pd.DataFrame({
            "id_a": id_a.astype(np.int64),
            "id_b": id_b.astype(np.int64),
            "key_a": keys.reindex(id_a).to_numpy(),
            "key_b": keys.reindex(id_b).to_numpy(),
            "similarity": sim.astype(np.float32),
            "descriptor": self.descriptor,
        })
        write_record(edges, self.run_dir.neighbors_dir(self.descriptor) / f"part_{task_id}.parquet", EDGES)
        return {"queries": rows.stop - rows.start, "edges": len(edges)}

    def fingerprint(self) -> str:
        from dedup.stages.index import index_paths

        return fingerprint(index_paths(self.run_dir.index_dir, self.descriptor),
                           {"threshold": self.threshold, "knn_cap": self.knn_cap, "rows": self.rows_per_task})

    def reset(self) -> None:
        import shutil

        shutil.rmtree(self.run_dir.neighbors_dir(self.descriptor), ignore_errors=True)

    def close(self) -> None:
        self._loaded = None




def find_neighbors(run: Run, gpu: bool | None = None) -> dict[str, StageReport]:
    """Search every descriptor at its search threshold (run.json) behind the engine."""
    from dedup.stages.index import faiss_gpu_available

    gpu = faiss_gpu_available() if gpu is None else gpu
    reports = {}
    for name in run.settings.descriptors:
        knn_cap = 2048 if gpu else None  # faiss-gpu's k limit; saturated queries are redone exactly
        stage = NeighborsStage(run, name, run.settings.search_thresholds[name], knn_cap)
        reports[name] = run_stage(run, stage, unit="queries")
    return reports


def clear_stage(run: RunDir, stage: str, folder: Path) -> None:
    import shutil

    shutil.rmtree(run.root / "_markers" / stage, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


