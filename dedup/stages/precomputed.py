"""Ingest precomputed embeddings: a clip-retrieval / LAION folder in, a run's on-disk contracts out, no images.

Input layout (what clip-retrieval and LAION publish)::

    DIR/img_emb/img_emb_{i}.npy          (n_i, d) float16 or float32
    DIR/metadata/metadata_{i}.parquet    n_i rows, row-aligned: key and/or image_path, url, caption

DIR is a local folder or any fsspec URL (s3://, gs://, hf://, https://...).
Each embedding part i becomes one synthetic shard of the run (shard_index i,
sample_id = i << 32 | row), so samples, embeddings, index, neighbours,
clusters, ranking, manifests, report (text only) and `query --key` work as on
a shard run. The vectors form the descriptor `precomputed` (see
`PRECOMPUTED_THRESHOLD`).

Stored vectors: a local float16 part whose rows are already unit length is
*linked*, not copied: OUT/embeddings/precomputed/img_emb/img_emb_{i}.npy is a
symlink to the input file (moving or deleting the input breaks the run). Any
other part (float32, not unit length, or remote) is written as a normalised
float16 copy, block by block, so no part is ever held in memory whole.

Which sample to drop: where the metadata's `image_path` names the shard a
vector came from (``.../00012.tar/000120034.jpg`` or ``00012/000120034.jpg``:
a parent folder plus a file), the samples table's `shard` is that shard and
`key` the file stem, so remove_keys.parquet (shard, key) drives
`DropDuplicates` per shard and key. Otherwise `shard` is the embedding part
and OUT/remove_urls.parquet (url, key, ...) is the list for a rewrite job
(img2dataset keys and urls identify a sample; keys alone are only unique per
dataset).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.engine import StageReport, run_stage
from dedup.errors import DedupError, StoreError, require
from dedup.ids import make_sample_id
from dedup.records import (
    METADATA_SCHEMA,
    REMOVE_URLS,
    SAMPLES_SCHEMA,
    RunDir,
    record_shards,
    remove_stale_temp_files,
    write_table,
)
from dedup.run import Run

PRECOMPUTED = "precomputed"
# Default cosine cut for CLIP ViT-L/14-style image vectors (LAION's published
# embeddings). NOT calibrated here (no labelled LAION copies offline): it
# follows common LAION near-duplicate practice (0.95-0.97); pass
# --threshold precomputed=VALUE to change it.
PRECOMPUTED_THRESHOLD = 0.96
# Neighbours are searched 0.02 below the cut (the registry entry's search_margin).
# Rows whose norm is within this of 1 count as unit length (float16 rounding).
UNIT_TOLERANCE = 2e-3
BLOCK_ROWS = 65536
REMOVE_URL_COLUMNS = REMOVE_URLS.names  # the contract lives in dedup/records.py
_PART = re.compile(r"img_emb_(\d+)\.npy$")


# ---------------------------------------------------------------- the input folder


def _filesystem(source: str):
    # fsspec arrives with torch; remote protocols need their own package (s3fs, gcsfs, ...).
    fsspec = require("fsspec", "s3fs", "s3", "reading --embeddings folders")
    fs, root = fsspec.core.url_to_fs(source)
    return fs, root.rstrip("/")


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def list_parts(source: str) -> list[int]:
    """Part numbers i of DIR/img_emb/img_emb_{i}.npy, in numeric order."""
    fs, root = _filesystem(source)
    names = fs.ls(f"{root}/img_emb", detail=False) if fs.exists(f"{root}/img_emb") else []
    parts = sorted(int(m.group(1)) for m in (_PART.search(str(n)) for n in names) if m)
    if not parts:
        raise DedupError(
            f"no img_emb/img_emb_*.npy under {source}",
            hint="point --embeddings at a clip-retrieval folder holding img_emb/ and metadata/",
        )
    return parts


def shard_and_key(image_path: object) -> tuple[str | None, str | None]:
    """'.../00012.tar/000120034.jpg' -> ('.../00012.tar', '000120034'); a bare name has no shard."""
    if not isinstance(image_path, str) or not image_path:
        return None, None
    parent, _, name = image_path.rstrip("/").rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return (parent or None), stem


def metadata_path(fs, root: str, part: int) -> str:
    """DIR/metadata/metadata_{part}.parquet, which must exist beside its img_emb part."""
    path = f"{root}/metadata/metadata_{part}.parquet"
    if not fs.exists(path):
        raise StoreError(f"{path} is missing", hint="every img_emb_{i}.npy needs its metadata/metadata_{i}.parquet")
    return path


def _read_metadata(fs, root: str, part: int, rows: int) -> pd.DataFrame:
    with fs.open(metadata_path(fs, root, part), "rb") as handle:
        schema = pq.read_schema(handle)
        wanted = [c for c in ("key", "image_path", "url", "caption") if c in schema.names]
        handle.seek(0)
        frame = pq.read_table(handle, columns=wanted).to_pandas()
    if len(frame) != rows:
        raise StoreError(
            f"part {part}: {rows} vectors but {len(frame)} metadata rows",
            hint="the img_emb and metadata parts must be row-aligned (as clip-retrieval writes them)",
        )
    return frame


def _sample_frame(meta: pd.DataFrame, part: int, part_name: str) -> pd.DataFrame:
    """Samples-table rows of one part: synthetic shard index, real shard and key where image_path names them."""
    n = len(meta)
    derived = [shard_and_key(p) for p in meta["image_path"]] if "image_path" in meta else [(None, None)] * n
    shard = [s or part_name for s, _ in derived]
    key = meta["key"].astype("string") if "key" in meta else pd.Series([k for _, k in derived], dtype="string")
    key = key.fillna(pd.Series([f"{part}_{r}" for r in range(n)], dtype="string"))
    return pd.DataFrame({
        "sample_id": make_sample_id(part, 0) + np.arange(n, dtype=np.int64),
        "shard_index": np.full(n, part, dtype=np.int32),
        "shard": shard,
        "key": key.to_numpy(dtype=object),
        "url": meta["url"].to_numpy(dtype=object) if "url" in meta else None,
        "caption": meta["caption"].to_numpy(dtype=object) if "caption" in meta else None,
        "status": "ok",
    })


# ---------------------------------------------------------------- vectors


def _check_vectors(vectors: np.ndarray, part: int) -> None:
    check_vector_layout(vectors.shape, vectors.dtype, f"img_emb_{part}.npy")


def check_vector_layout(shape: tuple[int, ...], dtype, name: str) -> None:
    """An img_emb part holds (n, d) float16 or float32 rows (checked from an array or from a .npy header)."""
    if len(shape) != 2 or np.dtype(dtype) not in (np.float16, np.float32):
        raise StoreError(
            f"{name} holds {np.dtype(dtype)} of shape {shape}",
            hint="expected (n, d) float16 or float32 rows, as clip-retrieval writes them",
        )


def _unit_length(vectors: np.ndarray) -> bool:
    for start in range(0, len(vectors), BLOCK_ROWS):
        norms = np.linalg.norm(np.asarray(vectors[start : start + BLOCK_ROWS], dtype=np.float32), axis=1)
        if np.any(np.abs(norms - 1.0) > UNIT_TOLERANCE):
            return False
    return True


def _write_normalised(vectors: np.ndarray, target: Path) -> None:
    """float16 unit rows, written block by block into a memory-mapped .npy, published atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=vectors.shape)
    for start in range(0, len(vectors), BLOCK_ROWS):
        block = np.asarray(vectors[start : start + BLOCK_ROWS], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block / np.maximum(norms, 1e-12)  # zero rows stay zero
    out.flush()
    del out
    tmp.replace(target)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(source.resolve())
    tmp.replace(target)


class PrecomputedStage:
    """One task per embedding part: samples part, metadata part and the (linked or normalised) vectors."""

    def __init__(self, run: RunDir, source: str, parts: list[int], descriptor: str = PRECOMPUTED,
                 link: bool = True) -> None:
        self.run_dir, self.source, self.parts, self.descriptor, self.link = run, source, parts, descriptor, link
        self.name = f"ingest-{descriptor}"

    def task_ids(self) -> list[str]:
        return [str(p) for p in self.parts]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        part = int(task_id)
        fs, root = _filesystem(self.source)
        vectors_path = f"{root}/img_emb/img_emb_{part}.npy"
        vectors, linked = self._vectors(fs, vectors_path, part)
        meta = _read_metadata(fs, root, part, len(vectors))
        samples = _sample_frame(meta, part, f"{self.source.rstrip('/')}/img_emb/img_emb_{part}.npy")
        self._write_tables(samples, part)
        progress(len(samples))
        return {"samples": len(samples), "linked_parts": int(linked), "dim": int(vectors.shape[1])}

    def _vectors(self, fs, path: str, part: int) -> tuple[np.ndarray, bool]:
        target = self.run_dir.embedding_part(self.descriptor, part)
        if _is_local(fs):
            local = Path(fs._strip_protocol(path))
        else:  # memory maps need a local file: fetch the part once into the run
            local = target.with_name(f"{target.stem}.download.npy")
            fs.get(path, str(local))
        vectors = np.load(local, mmap_mode="r")
        _check_vectors(vectors, part)
        linked = self.link and _is_local(fs) and vectors.dtype == np.float16 and _unit_length(vectors)
        if linked:
            _link(local, target)
        else:
            _write_normalised(vectors, target)
        if not _is_local(fs):
            local.unlink(missing_ok=True)
        return np.load(target, mmap_mode="r"), linked

    def _write_tables(self, samples: pd.DataFrame, part: int) -> None:
        meta = pa.Table.from_pandas(samples[METADATA_SCHEMA.names], schema=METADATA_SCHEMA, preserve_index=False)
        write_table(meta, self.run_dir.metadata_part(self.descriptor, part))
        full = samples.reindex(columns=SAMPLES_SCHEMA.names)
        write_table(pa.Table.from_pandas(full, schema=SAMPLES_SCHEMA, preserve_index=False),
                    self.run_dir.samples_part(part))

    def close(self) -> None:
        return None


def ingest_embeddings(run: Run, source: str, link: bool = True) -> StageReport:
    """Turn a clip-retrieval embedding folder into the run's parts (resumable: finished parts are skipped)."""
    remove_stale_temp_files(run)
    parts = list_parts(source)
    if parts != list(range(len(parts))):
        raise StoreError(f"embedding parts of {source} are not numbered 0..{len(parts) - 1}",
                         hint="rename the parts so that img_emb_{i} and metadata_{i} run from 0 without gaps")
    record_shards(run, [f"{source.rstrip('/')}/img_emb/img_emb_{p}.npy" for p in parts])
    return run_stage(run, PrecomputedStage(run, source, parts, run.settings.descriptors[0], link))


# ---------------------------------------------------------------- outputs only such a run needs


def write_url_remove_list(out: str | Path) -> int:
    """OUT/remove_urls.parquet: url and key of every removed sample, for a rewrite job that knows no shard.

    Streamed: one row group of remove_keys.parquet (its rows are in shard order) and the urls of
    its shards' removed samples at a time, never the whole list.
    """
    from dedup.records import atomic_output, conform

    run = RunDir(out)
    removed_keys = pq.ParquetFile(run.remove_keys)
    schema = conform(REMOVE_URLS.empty_table(), REMOVE_URLS).schema
    rows = 0
    with atomic_output(run.remove_urls) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for group in range(removed_keys.num_row_groups):
            for table in _with_urls(run, removed_keys.read_row_group(group).to_pandas()):
                writer.write_table(conform(table, REMOVE_URLS).cast(schema))
                rows += len(table)
    return rows


def _with_urls(run: RunDir, removed: pd.DataFrame):
    """Per shard of `removed`: its rows with the url of each, read from that shard's samples part."""
    shard_of = removed["sample_id"].to_numpy(np.int64) >> 32
    for shard_index in np.unique(shard_of):
        ids = removed.loc[shard_of == shard_index, "sample_id"].tolist()
        urls = pd.read_parquet(run.samples_part(int(shard_index)), columns=["sample_id", "url"],
                               filters=[("sample_id", "in", ids)])
        yield removed[shard_of == shard_index].merge(urls, on="sample_id", how="left")[REMOVE_URL_COLUMNS]
