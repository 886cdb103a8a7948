"""Every on-disk contract: Arrow schemas, the one atomic write, and readers of what stages wrote.

Layout (see ARCHITECTURE.md): the embeddings follow clip-retrieval's
`img_emb/img_emb_{i}.npy` + `metadata/metadata_{i}.parquet`, so
embedding-reader and autofaiss read them unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.errors import StoreError
from dedup.ids import SAMPLE_ID_SHIFT, make_sample_id, split_sample_id  # noqa: F401 - re-exported
from dedup.run import RunDir

# ---------------------------------------------------------------- atomic writes


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    # fsync before rename so a machine crash cannot leave a renamed-but-empty file.
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_table(table: pa.Table | pd.DataFrame, path: Path) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    tmp = _atomic_target(path)
    try:
        pq.write_table(table, tmp)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_array(array: np.ndarray, path: Path) -> None:
    tmp = _atomic_target(path)
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(value: Any, path: Path) -> None:
    tmp = _atomic_target(path)
    try:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- schemas

SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("shard_index", pa.int32()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("image_member", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

METADATA_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("shard_index", pa.int32()),
    ]
)


# ---------------------------------------------------------------- shard list


def record_shards(run: RunDir, shards: list[str]) -> None:
    """Write the shard list, or check that a resumed run expands to the same one."""
    if run.shards_table.exists():
        existing = pd.read_parquet(run.shards_table)["url"].tolist()
        if existing != shards:
            raise StoreError(
                f"{run.root} was started on {len(existing)} other shards (first: {existing[:1]})",
                hint="pass the same shard specs to resume, or choose a new --out directory",
            )
        return
    frame = pd.DataFrame({"shard_index": np.arange(len(shards), dtype=np.int32), "url": shards})
    write_table(frame, run.shards_table)


def read_shards(run: RunDir) -> pd.DataFrame:
    if not run.shards_table.exists():
        raise StoreError(f"{run.root} holds no ingested shards", hint=f"run 'dedup embed SHARDS --out {run.root}' first")
    return pd.read_parquet(run.shards_table)


# ---------------------------------------------------------------- readers


def load_samples(run: RunDir, columns: list[str] | None = None) -> pd.DataFrame:
    parts = sorted((run.root / "samples").glob("samples_*.parquet"), key=_part_number)
    if not parts:
        raise StoreError(f"{run.root} has no samples table", hint=f"run 'dedup embed SHARDS --out {run.root}' first")
    return pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True)


def embedding_parts(run: RunDir, descriptor: str) -> list[int]:
    folder = run.embedding_dir(descriptor) / "img_emb"
    return sorted(_part_number(p) for p in folder.glob("img_emb_*.npy"))


def iter_embeddings(run: RunDir, descriptor: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (sample_ids, float16 vectors) one shard part at a time."""
    for part in embedding_parts(run, descriptor):
        vectors = np.load(run.embedding_part(descriptor, part), mmap_mode="r")
        ids = pq.read_table(run.metadata_part(descriptor, part), columns=["sample_id"])["sample_id"].to_numpy()
        if len(ids) != len(vectors):
            raise StoreError(
                f"part {part} of {descriptor}: {len(vectors)} vectors but {len(ids)} metadata rows",
                hint="delete that part and its marker under _markers/embed, then rerun 'dedup embed'",
            )
        yield ids, vectors


class VectorParts:
    """Every embedding part of a descriptor as one read-only (n, d) array, memory-mapped part by part.

    Rows are the parts concatenated in part order (= sample_id order: a part's
    ids are its shard index << 32 | position). Indexing with a slice or an int
    array reads only those rows and returns them in the stored dtype (float16
    for dedup's own runs), so no caller ever holds every vector, let alone as
    float32. Picklable: engine workers reopen the maps where they run.
    """

    def __init__(self, paths: list[Path], ids: np.ndarray) -> None:
        self.paths = [Path(p) for p in paths]
        self.ids = np.asarray(ids, dtype=np.int64)
        self._maps = None
        lengths = [len(m) for m in self._parts()]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        if self.offsets[-1] != len(self.ids):
            raise StoreError(f"{self.offsets[-1]} vectors but {len(self.ids)} ids", hint="rerun the embed stage")
        first = self._parts()[0]
        self.dtype, self.dim = first.dtype, int(first.shape[1])

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _parts(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.load(p, mmap_mode="r") for p in self.paths]
        return self._maps

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.ids), self.dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return len(self.ids) * self.dim * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item) -> np.ndarray:
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            item = np.arange(start, stop, step)
        if isinstance(item, (int, np.integer)):
            return self._take(np.array([item], dtype=np.int64))[0]
        return self._take(np.asarray(item, dtype=np.int64))

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            part_stop = min(stop, int(self.offsets[first + 1]))
            base = int(self.offsets[first])
            pieces.append(self._parts()[first][start - base : part_stop - base])
            start, first = part_stop, first + 1
        if len(pieces) == 1:
            return np.asarray(pieces[0])
        return np.concatenate(pieces) if pieces else np.zeros((0, self.dim), self.dtype)

    def _take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row index out of range [0, {len(self)})")
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(part):
            where = np.flatnonzero(part == p)
            local = rows[where] - self.offsets[p]
            order = np.argsort(local, kind="stable")  # sequential reads of the map
            out[where[order]] = self._parts()[p][local[order]]
        return out

    def blocks(self, rows: int) -> Iterator[tuple[slice, np.ndarray]]:
        """(row slice, float32 block) of at most `rows` rows each: the only float32 copy is one block."""
        for start in range(0, len(self), rows):
            stop = min(start + rows, len(self))
            yield slice(start, stop), np.ascontiguousarray(self._range(start, stop), dtype=np.float32)


def open_embeddings(run: RunDir, descriptor: str) -> VectorParts:
    """A descriptor's vectors as memory maps (see `VectorParts`); ids in sample_id order."""
    parts = embedding_parts(run, descriptor)
    if not parts:
        raise StoreError(
            f"{run.root} holds no '{descriptor}' embeddings",
            hint=f"run 'dedup embed SHARDS --out {run.root} --descriptor {descriptor}'",
        )
    ids = [_part_ids(run, descriptor, part) for part in parts]
    flat = np.concatenate(ids).astype(np.int64)
    if len(flat) > 1 and not (np.diff(flat) > 0).all():
        raise StoreError(f"'{descriptor}' embedding ids are not in sample_id order", hint="rerun the embed stage")
    return VectorParts([run.embedding_part(descriptor, p) for p in parts], flat)


def _part_ids(run: RunDir, descriptor: str, part: int) -> np.ndarray:
    return pq.read_table(run.metadata_part(descriptor, part), columns=["sample_id"])["sample_id"].to_numpy()


def load_embeddings(run: RunDir, descriptor: str) -> tuple[np.ndarray, np.ndarray]:
    """All (sample_ids, float32 vectors) of a descriptor, sorted by sample_id."""
    pieces = list(iter_embeddings(run, descriptor))
    if not pieces:
        raise StoreError(
            f"{run.root} holds no '{descriptor}' embeddings",
            hint=f"run 'dedup embed SHARDS --out {run.root} --descriptor {descriptor}'",
        )
    ids = np.concatenate([p[0] for p in pieces]).astype(np.int64)
    vectors = np.concatenate([np.asarray(p[1], dtype=np.float32) for p in pieces])
    order = np.argsort(ids, kind="stable")
    return ids[order], vectors[order]


def _part_number(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def remove_stale_temp_files(run: RunDir) -> int:
    """Delete half-written temporaries a killed run left behind (they never carry a marker)."""
    stale = list(run.root.rglob(".*.tmp")) if run.root.exists() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def load_edges(run: RunDir, descriptor: str, threshold: float) -> pd.DataFrame:
    folder = run.neighbors_dir(descriptor)
    parts = sorted(folder.glob("part_*.parquet"))
    if not parts:
        raise StoreError(f"no neighbour edges for {descriptor} in {folder}", hint=f"run 'dedup neighbors {run.root}' first")
    edges = pd.concat([pd.read_parquet(p, columns=["id_a", "id_b", "similarity"]) for p in parts], ignore_index=True)
    edges = edges[edges["similarity"] >= threshold]
    # A pair is found from both ends (and from several parts); keep it once.
    return edges.sort_values("similarity", ascending=False).drop_duplicates(["id_a", "id_b"])


def edge_part_paths(run: RunDir, descriptor: str) -> list[Path]:
    folder = run.neighbors_dir(descriptor)
    parts = sorted(folder.glob("part_*.parquet"))
    if not parts:
        raise StoreError(f"no neighbour edges for {descriptor} in {folder}", hint=f"run 'dedup neighbors {run.root}' first")
    return parts


def iter_edge_parts(run: RunDir, descriptor: str, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(id_a, id_b) of the edges >= threshold, one neighbour file at a time (never all edges at once).

    The neighbour stage reports every pair once (forward rule), so no
    cross-file de-duplication is needed.
    """
    for path in edge_part_paths(run, descriptor):
        table = pq.read_table(path, columns=["id_a", "id_b", "similarity"])
        # Compared in float32, as the stored similarities (a float64 cut would drop a pair at exactly the cut).
        keep = table["similarity"].to_numpy() >= np.float32(threshold)
        yield table["id_a"].to_numpy()[keep], table["id_b"].to_numpy()[keep]
