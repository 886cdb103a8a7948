"""Index stage: one FAISS index per descriptor, its type chosen before any vector is read."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss

from dedup.descriptors import query_transform_for
from dedup.engine import run_stage
from dedup.errors import StoreError
from dedup.records import RunDir, atomic_output, fingerprint, load_embeddings
from dedup.run import Run
from dedup.search.faiss_index import _to_gpu, apply_search_params, faiss_gpu_count
from dedup.search.index_choice import IndexSpec


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
        for path in index_paths(self.run_dir.index_dir, self.descriptor):
            path.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        from dedup.search.faiss_index import build_index
        from dedup.search.index_choice import choose_index

        _ids, vectors = load_embeddings(self.run_dir, self.descriptor)
        transform = query_transform_for(self.descriptor)
        variants = len(transform(vectors[:1])) if transform is not None else 1
        spec = choose_index(len(vectors), vectors.shape[1], self.memory_budget_bytes, gpu=self.gpu,
                            query_variants=variants)
        save_index(build_index(spec, vectors), spec, self.run_dir.index_dir, self.descriptor)
        progress(len(vectors))
        return {"vectors": len(vectors)}

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


def faiss_gpu_available() -> bool:
    """faiss-gpu installed and a GPU visible (then `dedup run` indexes and searches on it)."""
    return faiss_gpu_count() > 0


# ---------------------------------------------------------------- save / load


def index_paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"{name}.faiss", directory / f"{name}.json"


def save_index(index, spec: IndexSpec, directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `<name>.faiss` and `<name>.json` atomically (temp file + rename)."""
    index_path, spec_path = index_paths(directory, name)
    with atomic_output(index_path) as tmp_index:
        if spec.is_binary:
            faiss.write_index_binary(index, str(tmp_index))
        else:
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
        spec = replace(spec, use_gpu=gpu and not spec.is_binary)
    index = faiss.read_index_binary(str(index_path)) if spec.is_binary else faiss.read_index(str(index_path))
    if spec.use_gpu:
        index = _to_gpu(index)
    apply_search_params(index, spec)
    return index, spec
