"""Index stage: one FAISS index per descriptor, its type chosen before any vector is read."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss

from dedup import settings as cfg
from dedup.descriptors import query_transform_for
from dedup.errors import StoreError
from dedup.records import RunDir, load_embeddings
from dedup.search.faiss_index import _to_gpu, apply_search_params, faiss_gpu_count
from dedup.search.index_choice import IndexSpec


def build_indexes(out: str | Path, memory: str = "8GB", gpu: bool = False) -> dict[str, Any]:
    from dedup.search.faiss_index import build_index
    from dedup.search.index_choice import choose_index

    run = RunDir(out)
    config = cfg.RunConfig.load(run)
    budget = cfg.parse_size(memory)
    specs = {}
    for name in config.descriptors:
        _ids, vectors = load_embeddings(run, name)
        transform = query_transform_for(name)
        variants = len(transform(vectors[:1])) if transform is not None else 1
        spec = choose_index(len(vectors), vectors.shape[1], budget, gpu=gpu, query_variants=variants)
        index = build_index(spec, vectors)
        save_index(index, spec, run.index_dir, name)
        specs[name] = spec
    return specs


def faiss_gpu_available() -> bool:
    """faiss-gpu installed and a GPU visible (then `dedup run` indexes and searches on it)."""
    return faiss_gpu_count() > 0


def index_stale(run: RunDir) -> bool:
    """Rebuild indexes when any embedding part is newer than the index files."""
    config = cfg.RunConfig.load(run)
    for name in config.descriptors:
        index_file = run.index_dir / f"{name}.faiss"
        parts = list((run.embedding_dir(name) / "img_emb").glob("*.npy"))
        if not index_file.exists() or any(p.stat().st_mtime > index_file.stat().st_mtime for p in parts):
            return True
    return False


# ---------------------------------------------------------------- save / load


def index_paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"{name}.faiss", directory / f"{name}.json"


def save_index(index, spec: IndexSpec, directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `<name>.faiss` and `<name>.json` atomically (temp file + rename)."""
    index_path, spec_path = index_paths(directory, name)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_index = index_path.with_name(index_path.name + ".tmp")
    if spec.is_binary:
        faiss.write_index_binary(index, str(tmp_index))
    else:
        faiss.write_index(faiss.index_gpu_to_cpu(index) if spec.use_gpu else index, str(tmp_index))
    tmp_spec = spec_path.with_name(spec_path.name + ".tmp")
    tmp_spec.write_text(replace(spec, n_vectors=int(index.ntotal)).to_json())
    os.replace(tmp_index, index_path)
    # The spec goes last: its presence marks a complete pair.
    os.replace(tmp_spec, spec_path)
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
