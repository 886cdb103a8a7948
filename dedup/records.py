"""Every on-disk contract: Arrow schemas, the one atomic write, and readers of what stages wrote.

Layout (see ARCHITECTURE.md): the embeddings follow clip-retrieval's
`img_emb/img_emb_{i}.npy` + `metadata/metadata_{i}.parquet`, so
embedding-reader and autofaiss read them unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.errors import DedupError, StoreError
from dedup.ids import SAMPLE_ID_SHIFT, make_sample_id, split_sample_id  # noqa: F401 - re-exported
from dedup.run import RunDir

# ---------------------------------------------------------------- atomic writes


def _atomic_target(path: Path) -> Path:
    """A fresh temporary beside `path` (same filesystem, so the final rename is atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(handle)
    # mkstemp creates 0600; outputs are read by other users (training jobs), so honour the umask instead.
    os.chmod(tmp, 0o666 & ~current_umask())
    return Path(tmp)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable read is a set-and-restore
    os.umask(mask)
    return mask


def write_error(path: Path, exc: OSError) -> DedupError:
    """An OSError while writing an output -> a user-facing error naming the path."""
    # pyarrow's OSErrors carry no errno, only the OS message.
    if exc.errno == errno.ENOSPC or "no space left" in str(exc).lower():
        return DedupError(f"no space left on device while writing {path}",
                          hint="free some space (or pass another --out) and rerun the same command: finished work is kept")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) or (path.parent.exists() and not path.parent.is_dir()):
        blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), path.parent)
        return DedupError(f"cannot write {path}: {blocker} is a file, not a directory",
                          hint="pass an --out path that is a directory or does not exist yet")
    return DedupError(f"cannot write {path}: {exc.strerror or exc}", hint="check the permissions and free space of the output directory")


def _publish(tmp: Path, path: Path) -> None:
    # fsync before rename so a machine crash cannot leave a renamed-but-empty file.
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary to write; on success it replaces `path`, on any failure it is removed."""
    tmp = _atomic_target(path)
    try:
        yield tmp
        _publish(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_table(table: pa.Table | pd.DataFrame, path: Path, dictionary_columns: list[str] | None = None) -> None:
    """Write parquet atomically: a reader (or a resumed run) never sees half a table.

    `dictionary_columns`: dictionary-encode only these (few distinct values); the
    default tries every column, which costs ~40% more time on columns of unique keys.
    """
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, use_dictionary=True if dictionary_columns is None else dictionary_columns)


def write_array(array: np.ndarray, path: Path) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def write_json(value: Any, path: Path) -> None:
    write_text(json.dumps(value, indent=2, sort_keys=True, default=str), path)


def write_text(text: str, path: Path) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- schemas
#
# Every table dedup writes or reads, with its column names and types. These
# are the stable contracts documented in ARCHITECTURE.md: a data engineer opens
# them with pandas, DuckDB or Polars without dedup installed.


def _schema(*columns: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(columns))


# url: the shard as given to the run (its identity); location: an absolute path for local shards.
SHARDS = _schema(("shard_index", pa.int32()), ("url", pa.string()), ("location", pa.string()))
SAMPLES = _schema(
    ("sample_id", pa.int64()), ("shard_index", pa.int32()), ("shard", pa.string()), ("key", pa.string()),
    ("url", pa.string()), ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
    ("image_member", pa.string()), ("status", pa.string()), ("error", pa.string()),
    # For --keep best (dedup/image_quality.py): Hasler-Suesstrunk colourfulness of the decoded
    # image, its share inside letterbox bars, and the size of the stored image bytes.
    ("colourfulness", pa.float32()), ("content_fraction", pa.float32()), ("image_bytes", pa.int64()),
    # Where the image member's data starts in its shard, for an uncompressed tar (null otherwise): the
    # report reads a shown image at this offset and checks its sha256 instead of scanning the shard.
    ("image_offset", pa.int64()),
)
EMBEDDING_METADATA = _schema(
    ("sample_id", pa.int64()), ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("shard_index", pa.int32()),
)
EDGES = _schema(
    ("id_a", pa.int64()), ("id_b", pa.int64()), ("key_a", pa.string()), ("key_b", pa.string()),
    ("similarity", pa.float32()), ("descriptor", pa.string()),
)
CLUSTERS = _schema(
    ("sample_id", pa.int64()), ("shard_index", pa.int32()), ("shard", pa.string()), ("key", pa.string()),
    ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()), ("cluster_id", pa.int64()),
    ("cluster_size", pa.int64()), ("is_representative", pa.bool_()),
    ("similarity_to_representative", pa.float32()), ("matched_by", pa.string()),
)
TOP_DUPLICATES = _schema(
    ("rank", pa.int64()), ("cluster_id", pa.int64()), ("copies", pa.int64()), ("representative_key", pa.string()),
    ("representative_url", pa.string()), ("representative_caption", pa.string()),
    ("distinct_captions", pa.int64()), ("url_domains", pa.int64()), ("shards_spanned", pa.int64()),
    # Memorisation risk (README: "Memorisation risk"): share and count of copies captioned like the representative.
    ("caption_sameness", pa.float64()), ("verbatim_copies", pa.int64()), ("risk", pa.float64()),
)
MANIFEST = _schema(
    ("shard", pa.string()), ("key", pa.string()), ("occurrence", pa.int32()), ("sample_id", pa.int64()),
    ("keep", pa.bool_()), ("cluster_id", pa.int64()), ("reason", pa.string()),
)
REMOVE_LIST = _schema(
    ("shard", pa.string()), ("key", pa.string()), ("occurrence", pa.int32()), ("sample_id", pa.int64()),
    ("cluster_id", pa.int64()), ("reason", pa.string()),
)
# OUT/remove_urls.parquet (runs from precomputed embeddings): what a rewrite job that knows no shard drops.
REMOVE_URLS = _schema(
    ("url", pa.string()), ("key", pa.string()), ("shard", pa.string()), ("sample_id", pa.int64()),
    ("cluster_id", pa.int64()), ("reason", pa.string()),
)
# OUT/precomputed_coverage/coverage_{shard_index}.parquet (`dedup run SHARDS --embeddings DIR`): every sample of
# the shard and whether DIR gave it a vector. precomputed: shard_key | url (matched; the vector is row
# precomputed_row of DIR/img_emb/img_emb_{precomputed_part}.npy) or why not: no_vector, url_differs,
# sha256_differs, unconfirmed, ambiguous, not_decoded (dedup/stages/precomputed_join.py).
PRECOMPUTED_COVERAGE = _schema(
    ("sample_id", pa.int64()), ("shard", pa.string()), ("key", pa.string()), ("url", pa.string()),
    ("precomputed", pa.string()), ("precomputed_part", pa.int32()), ("precomputed_row", pa.int64()),
)
# OUT/missing_shards.parquet (--allow-missing): shards of the specs that did not exist when the run read them.
MISSING_SHARDS = _schema(("url", pa.string()))
# manifests/_index.parquet: shard location -> its manifest file, read once by the loader.
MANIFEST_INDEX = _schema(
    ("shard_index", pa.int32()), ("shard", pa.string()), ("manifest", pa.string()), ("samples", pa.int64()),
    ("removed", pa.int64()), ("complete", pa.bool_()),
)
# `dedup compare`: one row per evaluation sample, and every (eval, train) match (dedup/stages/compare.py).
CONTAMINATION = _schema(
    ("shard", pa.string()), ("key", pa.string()), ("sample_id", pa.int64()), ("status", pa.string()),
    ("train_copies", pa.int64()), ("best_similarity", pa.float32()), ("train_cluster_id", pa.int64()),
    ("best_train_key", pa.string()), ("matched_by", pa.string()),
)
CONTAMINATION_PAIRS = _schema(
    ("eval_sample_id", pa.int64()), ("eval_shard", pa.string()), ("eval_key", pa.string()),
    ("train_sample_id", pa.int64()), ("train_shard", pa.string()), ("train_key", pa.string()),
    ("train_cluster_id", pa.int64()), ("similarity", pa.float32()), ("matched_by", pa.string()),
)
# OUT/overrides.parquet: a reviewer's decisions, appended by `dedup review` (dedup/stages/overrides.py).
OVERRIDES = _schema(
    ("kind", pa.string()), ("cluster_id", pa.int64()), ("sample_id_a", pa.int64()), ("sample_id_b", pa.int64()),
    ("keep_sample_id", pa.int64()), ("members", pa.list_(pa.int64())), ("note", pa.string()), ("created_at", pa.string()),
)
# `dedup export`: DIR/urls.parquet, kept samples for img2dataset to download again.
EXPORT_URLS = _schema(("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("shard", pa.string()))
# `dedup eval --truth`: key and group_id required; family optional ("bad" rows are not scored).
EVALUATION_TRUTH = _schema(("key", pa.string()), ("group_id", pa.string()), ("family", pa.string()))
# The per-shard parquet img2dataset writes beside each tar (read as input, never written by a run).
IMG2DATASET_PARQUET = _schema(
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("sha256", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
)

TABLES: dict[str, pa.Schema] = {
    "shards": SHARDS, "samples": SAMPLES, "embedding_metadata": EMBEDDING_METADATA, "edges": EDGES,
    "clusters": CLUSTERS, "top_duplicates": TOP_DUPLICATES, "manifest": MANIFEST, "manifest_index": MANIFEST_INDEX, "remove_list": REMOVE_LIST, "remove_urls": REMOVE_URLS, "missing_shards": MISSING_SHARDS,
    "precomputed_coverage": PRECOMPUTED_COVERAGE,
    "contamination": CONTAMINATION, "contamination_pairs": CONTAMINATION_PAIRS, "evaluation_truth": EVALUATION_TRUTH,
    "overrides": OVERRIDES, "export_urls": EXPORT_URLS, "img2dataset_parquet": IMG2DATASET_PARQUET,
}
# Older names, kept for callers outside the package.
SAMPLES_SCHEMA, METADATA_SCHEMA = SAMPLES, EMBEDDING_METADATA


def conform(table: pa.Table | pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """The table with exactly the schema's columns, in order and type; a missing or mistyped column is an error."""
    columns = table.columns if isinstance(table, pd.DataFrame) else table.column_names
    missing = [name for name in schema.names if name not in columns]
    if missing:
        raise StoreError(f"table lacks columns {missing} of its contract", hint="this is a bug in dedup: please report it")
    try:
        if isinstance(table, pd.DataFrame):
            return pa.Table.from_pandas(table[schema.names], schema=schema, preserve_index=False)
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise StoreError(f"table does not match its contract: {exc}", hint="this is a bug in dedup: please report it") from None


def write_record(table: pa.Table | pd.DataFrame, path: Path, schema: pa.Schema,
                 dictionary_columns: list[str] | None = None) -> None:
    """Validate against the table's schema, then write atomically: every dedup table goes through here."""
    write_table(conform(table, schema), path, dictionary_columns)


def empty_sample_row() -> dict[str, Any]:
    """A samples row with every column of the contract, all null: the one definition of the row."""
    return dict.fromkeys(SAMPLES.names)


# ---------------------------------------------------------------- shard list


def record_shards(run: RunDir, shards: list[str]) -> list[str]:
    """Write the shard list and return every shard of the run, in shard_index order.

    Shard ids are append-only: a resumed run may add shards (they get the next
    indices, in the order given), but never renumbers or drops the recorded ones,
    so sample ids, embedding parts and manifests of earlier shards stay valid.
    """
    existing = pd.read_parquet(run.shards_table)["url"].tolist() if run.shards_table.exists() else []
    missing = sorted(set(existing) - set(shards))
    if missing:
        raise StoreError(
            f"{run.root} was started on {len(existing)} shards, {len(missing)} of which are not given now "
            f"(first: {missing[0]})",
            hint="pass all of the run's shards again (plus any new ones), or choose a new --out directory",
        )
    known = set(existing)
    added = [s for s in dict.fromkeys(shards) if s not in known]
    if added or not run.shards_table.exists():
        every = existing + added
        from dedup.stages.read import shard_location

        # url: the shard as given to the run; location: where it is, whatever the working directory later is.
        frame = pd.DataFrame({"shard_index": np.arange(len(every), dtype=np.int32), "url": every,
                              "location": [shard_location(url) for url in every]})
        write_record(frame, run.shards_table, SHARDS)
    return existing + added


def read_shards(run: RunDir) -> pd.DataFrame:
    """The shard list (`shard_index`, `url`) that sample ids refer to; later stages never re-expand the specs."""
    if not run.shards_table.exists():
        raise StoreError(f"{run.root} holds no ingested shards", hint=f"run 'dedup embed SHARDS --out {run.root}' first")
    return pd.read_parquet(run.shards_table)


# ---------------------------------------------------------------- readers


class FilteredRows:
    """Parquet files read by filter (a pyarrow dataset scan that holds only the matching rows): how queries and
    reviews look up a few samples of a LAION-2B run without loading its 2e9-row clusters.parquet or samples."""

    def __init__(self, paths: Path | list[Path]) -> None:
        import pyarrow.dataset as ds

        self.dataset = ds.dataset([str(p) for p in paths] if isinstance(paths, list) else str(paths), format="parquet")

    def where(self, expression, columns: list[str] | None = None) -> pd.DataFrame:
        return self.dataset.to_table(filter=expression, columns=columns).to_pandas()

    def count(self, expression) -> int:
        return int(self.dataset.count_rows(filter=expression))


def column(name: str):
    """A column of a `FilteredRows` filter expression (pyarrow.dataset.field)."""
    import pyarrow.dataset as ds

    return ds.field(name)


def load_samples(run: RunDir, columns: list[str] | None = None) -> pd.DataFrame:
    """Every sample row (failed ones included) from the per-shard parts; `columns` keeps memory to what is used."""
    parts = sorted((run.root / "samples").glob("samples_*.parquet"), key=_part_number)
    if not parts:
        raise StoreError(f"{run.root} has no samples table", hint=f"run 'dedup embed SHARDS --out {run.root}' first")
    return pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True)


def embedding_parts(run: RunDir, descriptor: str) -> list[int]:
    """Shard numbers with an embedding part, in numeric order (img_emb_10 after img_emb_9)."""
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
    `ids`: the sample ids in row order, or the path of an .npy holding them (memory-mapped where
    opened, so a worker never pickles or holds every id: see `open_embeddings`).
    """

    def __init__(self, paths: list[Path], ids: np.ndarray | Path) -> None:
        self.paths = [Path(p) for p in paths]
        self.ids_path = Path(ids) if isinstance(ids, (str, Path)) else None
        self._ids = None if self.ids_path is not None else np.asarray(ids, dtype=np.int64)
        self._maps = None
        lengths = [len(m) for m in self._parts()]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        if self.offsets[-1] != len(self.ids):
            raise StoreError(f"{self.offsets[-1]} vectors but {len(self.ids)} ids", hint="rerun the embed stage")
        first = self._parts()[0]
        self.dtype, self.dim = first.dtype, int(first.shape[1])

    def __getstate__(self):
        return {**self.__dict__, "_maps": None, "_ids": None if self.ids_path is not None else self._ids}

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.load(self.ids_path, mmap_mode="r")
        return self._ids

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


# Above this many vectors a descriptor's sample ids are one .npy under OUT/_cache/ids, memory-mapped by every
# task that opens the vectors (2e9 ids are 16 GB: no worker may hold them, nor re-read every metadata part).
IDS_IN_MEMORY = 1 << 22


def open_embeddings(run: RunDir, descriptor: str) -> VectorParts:
    """A descriptor's vectors as memory maps (see `VectorParts`); ids in sample_id order."""
    parts = embedding_parts(run, descriptor)
    if not parts:
        raise StoreError(
            f"{run.root} holds no '{descriptor}' embeddings",
            hint=f"run 'dedup embed SHARDS --out {run.root} --descriptor {descriptor}'",
        )
    paths = [run.embedding_part(descriptor, p) for p in parts]
    metadata = [run.metadata_part(descriptor, p) for p in parts]
    if _metadata_rows(metadata) > IDS_IN_MEMORY:
        return VectorParts(paths, _cached_ids(run, descriptor, metadata))
    flat = np.concatenate([_part_ids(m) for m in metadata]).astype(np.int64)
    _check_ascending(flat, descriptor)
    return VectorParts(paths, flat)


def _metadata_rows(metadata: list[Path]) -> int:
    return sum(_part_rows(m) for m in metadata)


def _part_rows(metadata: Path) -> int:
    """Rows of a metadata part, from its footer (no column read)."""
    return pq.ParquetFile(metadata).metadata.num_rows


def _part_ids(metadata: Path) -> np.ndarray:
    return pq.read_table(metadata, columns=["sample_id"])["sample_id"].to_numpy()


def _check_ascending(ids: np.ndarray, descriptor: str, previous: int | None = None) -> None:
    ascending = (np.diff(ids) > 0).all() and (previous is None or not len(ids) or ids[0] > previous)
    if len(ids) and not ascending:
        raise StoreError(f"'{descriptor}' embedding ids are not in sample_id order", hint="rerun the embed stage")


def _cached_ids(run: RunDir, descriptor: str, metadata: list[Path]) -> Path:
    """OUT/_cache/ids/<descriptor>-<fingerprint of the metadata parts>.npy, written part by part once."""

    def write(tmp: Path) -> None:
        counts = [_part_rows(m) for m in metadata]
        ids, start, last = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(sum(counts),)), 0, None
        for part, count in zip(metadata, counts, strict=True):
            values = _part_ids(part).astype(np.int64)
            _check_ascending(values, descriptor, last)
            ids[start : start + count], start, last = values, start + count, (values[-1] if count else last)
        ids.flush()

    return _cache_file(run, "ids", descriptor, metadata, ".npy", write)


def _cache_file(run: RunDir, kind: str, descriptor: str, metadata: list[Path], suffix: str, write) -> Path:
    """OUT/_cache/<kind>/<descriptor>-<fingerprint><suffix>: `write(tmp)` once, renamed into place, stale ones removed.

    Concurrent tasks each write their own temporary and one rename wins (the contents are the same)."""
    folder = run.root / "_cache" / kind
    path = folder / f"{descriptor}-{fingerprint(metadata, {'descriptor': descriptor})[:16]}{suffix}"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    write(tmp)
    os.replace(tmp, path)
    for stale in folder.glob(f"{descriptor}-*{suffix}"):  # made from metadata since rewritten
        if stale != path:
            stale.unlink(missing_ok=True)
    return path


class RowKeys:
    """Each row's `key` of a descriptor's metadata, taken by row without holding every key.

    `chunks`: one string array per embedding part (in memory for small runs, else zero-copy views of a
    memory-mapped Arrow IPC cache: see `open_row_keys`).
    """

    def __init__(self, chunks: list[pa.Array]) -> None:
        self.chunks = chunks
        self.offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks], dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> pa.Array:
        """The keys of `rows`, in their order, gathered part by part (never one array of every key)."""
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        order = np.argsort(part, kind="stable")
        parts, starts = np.unique(part[order], return_index=True)  # each part's run in `order`: one sort, no scan per part
        stops = np.append(starts[1:], len(order))[: len(starts)]
        pieces = [pa.array([], pa.string())]
        for p, start, stop in zip(parts, starts, stops, strict=True):
            where = order[start:stop]
            pieces.append(self.chunks[p].take(pa.array(rows[where] - self.offsets[p])).cast(pa.string()))
        gathered = pa.concat_arrays(pieces)
        return gathered.take(pa.array(np.argsort(order, kind="stable")))


# Keys stay in memory up to this many rows (~18 B a key: 600 MB), where a gather from the one in-memory array
# is fastest; above it they come from the memory-mapped cache, gathered part by part (3 s per 4M keys over
# 1,000 parts, measured): the cost a LAION-2B neighbour task pays per edge file instead of holding 36 GB.
KEYS_IN_MEMORY = 1 << 25


def open_row_keys(run: RunDir, descriptor: str) -> RowKeys:
    """The keys of a descriptor's rows: read into memory up to KEYS_IN_MEMORY rows, else memory-mapped
    from OUT/_cache/keys/<descriptor>-<fingerprint>.arrow (one record batch per part, written once)."""
    metadata = [run.metadata_part(descriptor, p) for p in embedding_parts(run, descriptor)]
    if _metadata_rows(metadata) <= KEYS_IN_MEMORY:
        return RowKeys([_part_keys(m) for m in metadata])
    table = pa.ipc.open_file(pa.memory_map(str(_cached_keys(run, descriptor, metadata)))).read_all()
    return RowKeys(list(table.column("key").chunks))


def _part_keys(metadata: Path) -> pa.Array:
    return pq.read_table(metadata, columns=["key"])["key"].combine_chunks().cast(pa.string())


def _cached_keys(run: RunDir, descriptor: str, metadata: list[Path]) -> Path:
    """OUT/_cache/keys/<descriptor>-<fingerprint>.arrow: one record batch per part, so its chunks are the parts."""
    schema = pa.schema([("key", pa.string())])

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for part in metadata:
                writer.write_batch(pa.record_batch([_part_keys(part)], schema=schema))

    return _cache_file(run, "keys", descriptor, metadata, ".arrow", write)


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
    """Neighbour edges at or above `threshold`, each pair once: edges are searched at the lowest cut, so any higher cut is a filter."""
    folder = run.neighbors_dir(descriptor)
    parts = sorted(folder.glob("part_*.parquet"))
    if not parts:
        raise StoreError(f"no neighbour edges for {descriptor} in {folder}", hint=f"run 'dedup neighbors {run.root}' first")
    edges = pd.concat([pd.read_parquet(p, columns=["id_a", "id_b", "similarity"]) for p in parts], ignore_index=True)
    edges = edges[edges["similarity"] >= threshold]
    # A pair is found from both ends (and from several parts); keep it once.
    return edges.sort_values("similarity", ascending=False).drop_duplicates(["id_a", "id_b"])


def fingerprint(paths: Iterator[Path] | list[Path], values: Any = None) -> str:
    """A short digest of files (name, size, mtime) and settings: what a stage's outputs were made from."""
    import hashlib

    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
    for path in sorted(Path(p) for p in paths):
        stat = path.stat() if path.exists() else None
        digest.update(f"{path.name}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1};".encode())
    return digest.hexdigest()[:16]
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
