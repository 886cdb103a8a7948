"""Precomputed embeddings beside shards: `dedup run SHARDS --embeddings DIR` (issue 11).

The run reads its shards as usual (exact hashes, its own descriptors) and also
takes DIR's vectors (clip-retrieval / LAION layout) as the descriptor
`precomputed` for the samples they cover. A vector is given to a sample only
when its metadata row names that sample, never by key alone (img2dataset keys
repeat across outputs):

* **shard and key**: the row's `image_path` names a shard and a file
  (``.../00012.tar/000120034.jpg``) and the run has that shard: the same path
  as the run's url or location (exact), or a shard of the same file name
  (``00012`` or ``00012.tar``, the longest agreeing path tail) *confirmed* by
  an equal url or sha256 on both sides. A row whose url or sha256 disagrees
  with the sample's is refused (embeddings of another download or another
  version of the shard).
* **url** (where no row names the sample's shard and key): the one row with
  the sample's url, or several rows of that url with one and the same sha256;
  where both sides carry a sha256 it must be equal, and a row without one
  serves no sample of a url whose samples in the run hold different bytes.

Every sample gets a status in OUT/precomputed_coverage/ (`PRECOMPUTED_COVERAGE`
in dedup/records.py): matched `shard_key` or `url`, or why not (`no_vector`,
`url_differs`, `sha256_differs`, `unconfirmed`, `ambiguous`, `not_decoded`).
Samples without a vector are still compared by the run's other descriptors.

Out of core, four engine stages (none holds more than one part, one shard
group or one bucket of join keys):

    precomputed-keys     one task per embedding part: its rows' join keys,
                         hash-partitioned into buckets (one row group each)
    precomputed-samples  one task per group of run shards: the samples' join keys, likewise
    precomputed-join     one task per bucket: rows meet samples, the rules above decide
    precomputed-parts    one task per group of run shards: each shard's
                         embeddings/precomputed part (unit float16 rows gathered
                         from DIR's memory maps) and its coverage table

A part whose content is unchanged is not rewritten, so a run that grew by
shards extends its index instead of rebuilding it (dedup/stages/increment.py).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.engine import run_stage
from dedup.errors import DedupError, StoreError
from dedup.records import (
    EMBEDDING_METADATA,
    PRECOMPUTED_COVERAGE,
    RunDir,
    _part_rows,
    fingerprint,
    read_shards,
    write_array,
    write_record,
)
from dedup.run import Run
from dedup.stages.precomputed import (
    PRECOMPUTED,
    _check_vectors,
    _filesystem,
    _is_local,
    check_vector_layout,
    list_parts,
    metadata_path,
    shard_and_key,
)

# Run shards per group (a samples-keys task and a parts task) at most; fewer where --memory asks for it.
GROUP_SHARDS = 256
# Bytes a join-key row costs in a join task, and a sample in a group task (strings, frame overhead, the merge;
# measured: benchmarks/bench_precomputed_join.py): buckets and groups are sized from these.
JOIN_ROW_BYTES = 800
GROUP_ROW_BYTES = 1200
METADATA_BATCH_ROWS = 131_072
SEP = "\x1f"  # between shard index and key in a join key: never in a path or a key we compare
MATCHED = ("shard_key", "url")
# The reason kept where no vector was matched: the first of these a sample has.
REASON_ORDER = ("url_differs", "sha256_differs", "unconfirmed", "ambiguous", "no_vector")

PRE_KEYS = pa.schema([("bucket", pa.int32()), ("kind", pa.string()), ("join", pa.string()), ("part", pa.int32()),
                      ("row", pa.int64()), ("url", pa.string()), ("sha256", pa.string()), ("exact", pa.bool_())])
SAMPLE_KEYS = pa.schema([("bucket", pa.int32()), ("kind", pa.string()), ("join", pa.string()),
                         ("sample_id", pa.int64()), ("url", pa.string()), ("sha256", pa.string())])
OUTCOMES = pa.schema([("group", pa.int32()), ("sample_id", pa.int64()), ("kind", pa.string()),
                      ("status", pa.string()), ("part", pa.int32()), ("row", pa.int64())])


# ---------------------------------------------------------------- pure rules


def _strip_tar(name: str) -> str:
    return name[:-4] if name.endswith(".tar") else name


def _components(path: str) -> list[str]:
    parts = [p for p in path.rstrip("/").split("/") if p]
    if parts:
        parts[-1] = _strip_tar(parts[-1])
    return parts


class ShardNames:
    """The run's shards by exact path and by file name, for the rows' `image_path` parents."""

    def __init__(self, shards: pd.DataFrame) -> None:
        self.exact: dict[str, int] = {}
        self.by_name: dict[str, list[tuple[int, list[str]]]] = {}
        self._seen: dict[str, tuple[list[int], bool]] = {}  # a shard's ~10,000 rows share one parent
        for index, url, location in shards[["shard_index", "url", "location"]].itertuples(index=False):
            for name in {str(url).rstrip("/"), str(location).rstrip("/")}:
                self.exact.setdefault(name, int(index))
                parts = _components(name)
                if parts:
                    self.by_name.setdefault(parts[-1], []).append((int(index), parts))

    def candidates(self, parent: str) -> tuple[list[int], bool]:
        """(shard indices, exact): the shard of that path, or those of its name sharing the longest path tail."""
        if parent not in self._seen:
            if len(self._seen) > 1 << 16:
                self._seen.clear()
            self._seen[parent] = self._candidates(parent.rstrip("/"))
        return self._seen[parent]

    def _candidates(self, parent: str) -> tuple[list[int], bool]:
        if parent in self.exact:
            return [self.exact[parent]], True
        wanted = _components(parent)
        if not wanted:
            return [], False
        scored: dict[int, int] = {}
        for index, parts in self.by_name.get(wanted[-1], []):
            scored[index] = max(scored.get(index, 0), _common_tail(parts, wanted))
        best = max(scored.values(), default=0)
        return sorted(i for i, s in scored.items() if s == best), False


def _common_tail(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def shard_join(shard_index: int, key: str) -> str:
    return f"{shard_index}{SEP}{key}"


def buckets_of(joins: pd.Series, buckets: int) -> np.ndarray:
    """Bucket of each join key: a fixed hash (pandas' default key), the same in every process."""
    if buckets == 1 or not len(joins):
        return np.zeros(len(joins), dtype=np.int32)
    hashed = pd.util.hash_array(joins.to_numpy(dtype=object))
    return (hashed % np.uint64(buckets)).astype(np.int32)


def _same(a: pd.Series, b: pd.Series) -> pd.Series:
    return a.notna() & b.notna() & (a == b)


def _differ(a: pd.Series, b: pd.Series) -> pd.Series:
    return a.notna() & b.notna() & (a != b)


def decide_shard_keys(pre: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Outcome of each sample row under the shard-and-key rule (columns of OUTCOMES but group)."""
    pre = pre[pre["kind"] == "s"]
    samples = samples[samples["kind"] == "s"]
    rows_per_join = pre.groupby("join").size().rename("rows")
    samples_per_join = samples.groupby("join").size().rename("twins")
    merged = samples.merge(pre, on="join", how="left", suffixes=("", "_pre"))
    merged = merged.join(rows_per_join, on="join").join(samples_per_join, on="join")
    status = np.full(len(merged), "shard_key", dtype=object)
    found = merged["part"].notna().to_numpy()
    confirmed = (merged["exact"].fillna(False).astype(bool) | _same(merged["url"], merged["url_pre"])
                 | _same(merged["sha256"], merged["sha256_pre"])).to_numpy()
    rules = [  # later rules win: a refusal by content beats any other reason
        (~confirmed, "unconfirmed"),
        ((merged["rows"] > 1).to_numpy() | (merged["twins"] > 1).to_numpy(), "ambiguous"),
        (_differ(merged["sha256"], merged["sha256_pre"]).to_numpy(), "sha256_differs"),
        (_differ(merged["url"], merged["url_pre"]).to_numpy(), "url_differs"),
        (~found, "no_vector"),
    ]
    for mask, name in rules:
        status[mask] = name
    return _outcomes(merged, status, "s")


def decide_urls(pre: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Outcome of each sample row under the url rule: one image of that url, equal sha256 where both have one."""
    merged = _url_rows(pre[pre["kind"] == "u"], samples[samples["kind"] == "u"])
    chosen = _one_image(merged[merged["usable"]])
    rest = merged[~merged["sample_id"].isin(chosen["sample_id"])].drop_duplicates("sample_id")
    matched = _outcomes(chosen, np.full(len(chosen), "url", dtype=object), "u")
    refused = _outcomes(rest.assign(part=np.nan, row=np.nan), _url_reasons(merged, rest["sample_id"]), "u")
    return pd.concat([matched, refused], ignore_index=True)


def _url_rows(pre: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Each sample beside every row of its url: found, differs (both sha256 known, unequal), usable.

    A row without a sha256 cannot say which image it was made from where the run's samples of that url hold
    different bytes (the url's image changed between downloads): it serves none of them.
    """
    images_of_url = samples.groupby("join")["sha256"].nunique()
    merged = samples.merge(pre, on="join", how="left", suffixes=("", "_pre"))
    found = merged["part"].notna()
    differs = found & _differ(merged["sha256"], merged["sha256_pre"])
    blind = merged["sha256_pre"].isna() & (merged["join"].map(images_of_url).fillna(0) > 1)
    return merged.assign(found=found.to_numpy(), differs=differs.to_numpy(),
                         usable=(found & ~differs & ~blind).to_numpy())


def _one_image(candidates: pd.DataFrame) -> pd.DataFrame:
    """The chosen row of each sample with one usable row, or several carrying one and the same sha256."""
    by_sample = candidates.groupby("sample_id")
    hashed = ~candidates["sha256_pre"].isna().groupby(candidates["sample_id"]).any()
    one_image = (by_sample["sha256_pre"].nunique() == 1) & hashed
    counts = by_sample.size()
    single = counts.index[(counts == 1).to_numpy() | one_image.reindex(counts.index).to_numpy()]
    chosen = candidates[candidates["sample_id"].isin(single)].sort_values(["sample_id", "part", "row"])
    return chosen.drop_duplicates("sample_id")


def _url_reasons(merged: pd.DataFrame, sample_ids: pd.Series) -> np.ndarray:
    """Why a sample has no url match: no row of its url, every row of another sha256, or no single image."""
    per_sample = merged.groupby("sample_id")[["found", "differs"]].sum().reindex(sample_ids)
    no_row = per_sample["found"].to_numpy() == 0
    all_differ = (per_sample["differs"] == per_sample["found"]).to_numpy()
    return np.where(no_row, "no_vector", np.where(all_differ, "sha256_differs", "ambiguous")).astype(object)


def _outcomes(merged: pd.DataFrame, status: np.ndarray, kind: str) -> pd.DataFrame:
    matched = np.isin(status, MATCHED)
    return pd.DataFrame({
        "sample_id": merged["sample_id"].to_numpy(np.int64),
        "kind": kind,
        "status": status,
        "part": pd.array(np.where(matched, merged["part"], np.nan), dtype="Int32"),
        "row": pd.array(np.where(matched, merged["row"], np.nan), dtype="Int64"),
    })


def final_outcome(outcomes: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: a shard-and-key match, else a url match, else the first reason of REASON_ORDER."""
    rank = {"shard_key": 0, "url": 1, **{name: 2 + 2 * i for i, name in enumerate(REASON_ORDER)}}
    # Between equal reasons, the shard rule's names the sample more closely than the url rule's.
    tie = ((outcomes["kind"] == "u") & ~outcomes["status"].isin(MATCHED)).astype(int)
    order = outcomes.assign(_r=outcomes["status"].map(rank) + tie)
    best = order.sort_values(["sample_id", "_r"], kind="stable").drop_duplicates("sample_id")
    return best.drop(columns=["_r"]).reset_index(drop=True)


# ---------------------------------------------------------------- on-disk steps


def _write_buckets(frame: pd.DataFrame, schema: pa.Schema, path: Path, column: str = "bucket") -> None:
    """One row group per value of `column` (a later task reads its bucket or group by row-group statistics); atomic."""
    from dedup.records import atomic_output

    with atomic_output(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        _write_by(writer, frame, schema, column)


def _write_by(writer: pq.ParquetWriter, frame: pd.DataFrame, schema: pa.Schema, column: str) -> None:
    frame = frame.sort_values(column, kind="stable")
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    bounds = np.flatnonzero(np.diff(frame[column].to_numpy())) + 1
    for start, stop in zip([0, *bounds], [*bounds, len(frame)], strict=True):
        writer.write_table(table.slice(start, stop - start))


def _read_bucket(paths: list[Path], column: str, value: int) -> pd.DataFrame:
    frames = [pq.read_table(p, filters=[(column, "=", value)]).to_pandas() for p in paths if p.exists()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@dataclass(frozen=True)
class JoinPlan:
    """How the join is cut: hash buckets of join keys, run shards per group, the inputs' fingerprint, and
    the vectors' dimension (read once from the .npy headers)."""

    buckets: int
    group_shards: int
    stamp: str
    dim: int


class _JoinStep:
    """What the four steps share: the run, the embeddings folder, its parts, the run's shard count, the plan."""

    def __init__(self, run: RunDir, source: str, parts: list[int], shards: int, plan: JoinPlan) -> None:
        self.run_dir, self.source, self.parts, self.shards, self.plan = run, source, parts, shards, plan
        self.buckets, self.group_shards = plan.buckets, plan.group_shards

    def fingerprint(self) -> str:
        return self.plan.stamp

    def scratch(self, name: str) -> Path:
        return self.run_dir.scratch_dir("precomputed") / name

    def groups(self) -> list[int]:
        return list(range(math.ceil(self.shards / self.group_shards)))

    def group_of(self, group: int) -> range:
        return range(group * self.group_shards, min(self.shards, (group + 1) * self.group_shards))

    def close(self) -> None:
        return None


class KeysStep(_JoinStep):
    """One task per embedding part: join keys of its rows (shard and key where image_path names a run shard; url)."""

    name = "precomputed-keys"

    def task_ids(self) -> list[str]:
        return [str(p) for p in self.parts]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        from dedup.records import atomic_output

        part = int(task_id)
        vectors = _local_vectors(self.run_dir, self.source, part)
        names, rows = ShardNames(read_shards(self.run_dir)), 0
        with atomic_output(self.scratch(f"pre_{part}.parquet")) as tmp, pq.ParquetWriter(tmp, PRE_KEYS) as writer:
            for meta in metadata_batches(self.source, part):
                frame = pre_keys(meta, part, names, first_row=rows)
                frame["bucket"] = buckets_of(frame["join"], self.buckets)
                _write_by(writer, frame, PRE_KEYS, "bucket")
                rows += len(meta)
                progress(len(meta))
            if rows != len(vectors):
                raise StoreError(f"part {part}: {len(vectors)} vectors but {rows} metadata rows",
                                 hint="the img_emb and metadata parts must be row-aligned (as clip-retrieval writes them)")
        return {"rows": rows}


def metadata_batches(source: str, part: int):
    """metadata_{part}.parquet in batches of METADATA_BATCH_ROWS rows (a LAION part has ~1M), only the columns used."""
    fs, root = _filesystem(source)
    with fs.open(metadata_path(fs, root, part), "rb") as handle:
        reader = pq.ParquetFile(handle)
        wanted = [c for c in ("image_path", "url", "sha256") if c in reader.schema_arrow.names]
        if not wanted:  # no column to read: the rows still count (checked against the vectors)
            for start in range(0, reader.metadata.num_rows, METADATA_BATCH_ROWS):
                yield pd.DataFrame(index=range(min(METADATA_BATCH_ROWS, reader.metadata.num_rows - start)))
            return
        for batch in reader.iter_batches(batch_size=METADATA_BATCH_ROWS, columns=wanted):
            yield batch.to_pandas()


def pre_keys(meta: pd.DataFrame, part: int, names: ShardNames, first_row: int = 0) -> pd.DataFrame:
    """Join-key rows of one metadata batch (rows first_row...): an 's' row per candidate shard, a 'u' row per url."""
    n = len(meta)
    urls, hashes = _text(meta, "url"), _text(meta, "sha256")
    records: list[tuple] = []
    paths = meta["image_path"].tolist() if "image_path" in meta else [None] * n
    for row, image_path in enumerate(paths):
        parent, key = shard_and_key(image_path)
        if parent is None:
            continue  # a key without its shard is never matched (keys repeat across img2dataset outputs)
        shards, exact = names.candidates(parent)
        records.extend(("s", shard_join(s, key), row, exact) for s in shards)
    shard_rows = pd.DataFrame(records, columns=["kind", "join", "row", "exact"])
    url_rows = pd.DataFrame({"kind": "u", "join": urls, "row": np.arange(n), "exact": False})[urls.notna().to_numpy()]
    frame = pd.concat([shard_rows, url_rows], ignore_index=True)
    local = frame["row"].to_numpy(np.int64)
    frame["part"] = np.int32(part)
    frame["url"] = urls.to_numpy(dtype=object)[local] if n else None
    frame["sha256"] = hashes.to_numpy(dtype=object)[local] if n else None
    frame["url"] = frame["url"].where(pd.notna(frame["url"]), None)
    frame["sha256"] = frame["sha256"].where(pd.notna(frame["sha256"]), None)
    frame["row"] = local + first_row
    return frame


def _text(frame: pd.DataFrame, name: str) -> pd.Series:
    """A text column with empty strings as missing (an empty url or hash names nothing)."""
    if name not in frame:
        return pd.Series([pd.NA] * len(frame), dtype="string")
    values = frame[name].astype("string")
    return values.mask(values == "", pd.NA).reset_index(drop=True)


class SampleKeysStep(_JoinStep):
    """One task per group of run shards: the join keys of its decoded samples."""

    name = "precomputed-samples"

    def task_ids(self) -> list[str]:
        return [str(g) for g in self.groups()]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        group = int(task_id)
        frames = [sample_keys(_samples(self.run_dir, s)) for s in self.group_of(group)]
        frame = pd.concat(frames, ignore_index=True)
        frame["bucket"] = buckets_of(frame["join"], self.buckets)
        _write_buckets(frame, SAMPLE_KEYS, self.scratch(f"samples_{group}.parquet"))
        progress(len(frame))
        return {"keys": len(frame)}


def _samples(run: RunDir, shard_index: int) -> pd.DataFrame:
    path = run.samples_part(shard_index)
    columns = ["sample_id", "shard", "key", "url", "caption", "sha256", "status"]
    return pd.read_parquet(path, columns=columns) if path.exists() else pd.DataFrame(columns=columns)


def sample_keys(samples: pd.DataFrame) -> pd.DataFrame:
    """Join-key rows of decoded samples: an 's' row each (shard index and key), a 'u' row per url."""
    ok = samples[samples["status"] == "ok"].reset_index(drop=True)
    ids = ok["sample_id"].to_numpy(np.int64)
    urls, hashes = _text(ok, "url").astype(object), _text(ok, "sha256").astype(object)
    urls, hashes = urls.where(urls.notna(), None), hashes.where(hashes.notna(), None)
    joins = [shard_join(s, k) for s, k in zip(ids >> 32, ok["key"], strict=True)]
    by_key = pd.DataFrame({"kind": "s", "join": joins, "sample_id": ids, "url": urls, "sha256": hashes})
    has_url = urls.notna().to_numpy()
    by_url = pd.DataFrame({"kind": "u", "join": urls[has_url], "sample_id": ids[has_url], "url": urls[has_url],
                           "sha256": hashes[has_url]})
    frame = pd.concat([by_key, by_url], ignore_index=True)
    return frame.astype({"sample_id": np.int64}).reset_index(drop=True)


class JoinStep(_JoinStep):
    """One task per bucket: each sample row meets the embedding rows of its join key; the rules decide."""

    name = "precomputed-join"

    def task_ids(self) -> list[str]:
        return [str(b) for b in range(self.buckets)]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        bucket = int(task_id)
        pre = _read_bucket([self.scratch(f"pre_{p}.parquet") for p in self.parts], "bucket", bucket)
        samples = _read_bucket([self.scratch(f"samples_{g}.parquet") for g in self.groups()], "bucket", bucket)
        outcomes = join_bucket(pre, samples)
        outcomes["group"] = ((outcomes["sample_id"].to_numpy(np.int64) >> 32) // self.group_shards).astype(np.int32)
        outcomes = outcomes.sort_values(["group", "sample_id"], kind="stable")
        _write_buckets(outcomes, OUTCOMES, self.scratch(f"join_{bucket}.parquet"), column="group")
        progress(len(samples))
        return {"sample_keys": len(samples), "vector_keys": len(pre)}


def _no_outcomes() -> pd.DataFrame:
    columns = {"sample_id": np.int64, "kind": object, "status": object, "part": "Int32", "row": "Int64"}
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def join_bucket(pre: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    if not len(samples):
        return _no_outcomes()
    if not len(pre):
        pre = pd.DataFrame({c: pd.Series(dtype=object) for c in PRE_KEYS.names if c != "bucket"})
    pre = pre.drop(columns=["bucket"], errors="ignore")
    samples = samples.drop(columns=["bucket"], errors="ignore")
    return pd.concat([decide_shard_keys(pre, samples), decide_urls(pre, samples)], ignore_index=True)


class PartsStep(_JoinStep):
    """One task per group of run shards: each shard's `precomputed` part and coverage table."""

    name = "precomputed-parts"

    def task_ids(self) -> list[str]:
        return [str(g) for g in self.groups()]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        group = int(task_id)
        outcomes = _read_bucket([self.scratch(f"join_{b}.parquet") for b in range(self.buckets)], "group", group)
        final = final_outcome(outcomes) if len(outcomes) else _no_outcomes()
        counts: dict[str, int] = {}
        maps = _VectorMaps(self.run_dir, self.source, self.plan.dim)
        for shard_index in self.group_of(group):
            samples = _samples(self.run_dir, shard_index)
            lo, hi = shard_index << 32, (shard_index + 1) << 32
            mine = final[(final["sample_id"] >= lo) & (final["sample_id"] < hi)] if len(final) else final
            coverage = coverage_table(samples, mine)
            self._write_part(shard_index, samples, coverage, maps)
            for status, n in coverage["precomputed"].value_counts().items():
                counts[f"status.{status}"] = counts.get(f"status.{status}", 0) + int(n)
            progress(len(samples))
        return counts

    def _write_part(self, shard_index: int, samples: pd.DataFrame, coverage: pd.DataFrame, maps) -> None:
        matched = coverage[coverage["precomputed"].isin(MATCHED)].sort_values("sample_id")
        vectors = maps.gather(matched["precomputed_part"].to_numpy(np.int64), matched["precomputed_row"].to_numpy(np.int64))
        meta = matched[["sample_id"]].merge(samples[["sample_id", "key", "url", "caption"]], on="sample_id", how="left")
        meta["shard_index"] = np.int32(shard_index)
        _write_if_changed(vectors, meta, self.run_dir, shard_index)
        write_record(coverage, self.run_dir.precomputed_coverage_part(shard_index), PRECOMPUTED_COVERAGE)


def coverage_table(samples: pd.DataFrame, outcome: pd.DataFrame) -> pd.DataFrame:
    """Every sample of one shard with its precomputed status (samples that did not decode: `not_decoded`)."""
    table = samples[["sample_id", "shard", "key", "url", "status"]].merge(
        outcome[["sample_id", "status", "part", "row"]].rename(
            columns={"status": "precomputed", "part": "precomputed_part", "row": "precomputed_row"}),
        on="sample_id", how="left")
    decoded = (table["status"] == "ok").to_numpy()
    table["precomputed"] = np.where(decoded, table["precomputed"].fillna("no_vector"), "not_decoded")
    return table.drop(columns=["status"]).reset_index(drop=True)


class _VectorMaps:
    """DIR's parts as memory maps, opened on first use; rows come back as unit float16."""

    def __init__(self, run: RunDir, source: str, dim: int) -> None:
        self.run_dir, self.source, self.dim, self.maps = run, source, dim, {}

    def gather(self, parts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(parts), self.dim), dtype=np.float32)
        for part in np.unique(parts):
            where = np.flatnonzero(parts == part)
            order = where[np.argsort(rows[where], kind="stable")]  # sequential reads of the map
            out[order] = self._map(int(part))[rows[order]]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float16)

    def _map(self, part: int) -> np.ndarray:
        if part not in self.maps:
            self.maps[part] = _local_vectors(self.run_dir, self.source, part)
        return self.maps[part]


def _local_vectors(run: RunDir, source: str, part: int) -> np.ndarray:
    """A part as a memory map: local files in place, remote ones fetched once into the run's scratch."""
    fs, root = _filesystem(source)
    path = f"{root}/img_emb/img_emb_{part}.npy"
    if _is_local(fs):
        local = Path(fs._strip_protocol(path))
    else:
        local = run.scratch_dir("precomputed") / "img_emb" / f"img_emb_{part}.npy"
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.tmp")
            fs.get(path, str(tmp))
            tmp.replace(local)
    vectors = np.load(local, mmap_mode="r")
    _check_vectors(vectors, part)
    return vectors


def _write_if_changed(vectors: np.ndarray, meta: pd.DataFrame, run: RunDir, shard_index: int) -> None:
    """Unchanged parts keep their files (and mtimes), so an index over them can grow instead of rebuilding."""
    vectors_path = run.embedding_part(PRECOMPUTED, shard_index)
    meta_path = run.metadata_part(PRECOMPUTED, shard_index)
    if vectors_path.exists() and meta_path.exists():
        old = np.load(vectors_path, mmap_mode="r")
        old_ids = pq.read_table(meta_path, columns=["sample_id"])["sample_id"].to_numpy()
        if old.shape == vectors.shape and np.array_equal(old_ids, meta["sample_id"].to_numpy(np.int64)) \
                and np.array_equal(np.asarray(old), vectors):
            return
    write_record(meta, meta_path, EMBEDDING_METADATA)
    write_array(vectors, vectors_path)


# ---------------------------------------------------------------- the stage


def plan_sizes(vector_rows: int, samples: int, shards: int, memory_bytes: int) -> tuple[int, int]:
    """(buckets, shards per group): one join task's key rows (every vector's, two per sample) and one group
    task's samples each fit in half the budget."""
    half = max(1, memory_bytes // 2)
    buckets = max(1, math.ceil((vector_rows + 2 * samples) * JOIN_ROW_BYTES / half))
    per_shard = max(1, math.ceil(samples / max(1, shards)))
    return buckets, max(1, min(GROUP_SHARDS, half // (per_shard * GROUP_ROW_BYTES)))


def attach_precomputed(run: Run) -> dict[str, int]:
    """Give the run's samples DIR's vectors where a metadata row names them (see the module docstring)."""
    source = run.settings.embeddings
    parts = list_parts(source)
    shards = len(read_shards(run))
    vector_rows, dim = _vector_shape(source, parts)
    buckets, group_shards = plan_sizes(vector_rows, _sample_rows(run, shards), shards, run.settings.memory_budget_bytes)
    plan = JoinPlan(buckets, group_shards, _stamp(run, source, parts, shards, (buckets, group_shards)), dim)
    steps = [KeysStep, SampleKeysStep, JoinStep, PartsStep]
    reports = [run_stage(run, step(run, source, parts, shards, plan)) for step in steps]
    # Every step is done (markers): the parts now hold the gathered vectors, so nothing reads the scratch again.
    shutil.rmtree(run.scratch_dir("precomputed"), ignore_errors=True)
    stats = {k.removeprefix("status."): int(v) for k, v in reports[-1].stats.items() if k.startswith("status.")}
    _require_matches(stats, source)
    return {**stats, "buckets": buckets, "shards_per_group": group_shards}


def _vector_shape(source: str, parts: list[int]) -> tuple[int, int]:
    """(rows of every part, their one dimension), from the .npy headers alone (a remote part is fetched later,
    by its keys task)."""
    shapes = {p: npy_shape(source, p) for p in parts}
    dims = sorted({shape[1] for shape in shapes.values()})
    if len(dims) > 1:
        raise StoreError(f"the parts of {source} hold vectors of {len(dims)} dimensions ({dims})",
                         hint="every img_emb part of one folder must come from the same model")
    return sum(shape[0] for shape in shapes.values()), dims[0]


def npy_shape(source: str, part: int) -> tuple[int, ...]:
    """The shape in img_emb_{part}.npy's header: a few hundred bytes read, local or remote."""
    fs, root = _filesystem(source)
    path = f"{root}/img_emb/img_emb_{part}.npy"
    try:
        with fs.open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(handle)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is not a readable .npy file ({exc})",
                         hint="img_emb parts are numpy .npy files, as clip-retrieval writes them") from None
    check_vector_layout(shape, dtype, path)
    return shape


def _sample_rows(run: Run, shards: int) -> int:
    paths = [run.samples_part(s) for s in range(shards)]
    return sum(_part_rows(p) for p in paths if p.exists())


def _stamp(run: Run, source: str, parts: list[int], shards: int, sizes_planned: tuple[int, int]) -> str:
    files = [run.shards_table, *(run.samples_part(s) for s in range(shards))]
    fs, root = _filesystem(source)
    inputs = {p: fs.info(f"{root}/metadata/metadata_{p}.parquet").get("size") for p in parts}
    sizes = {p: fs.info(f"{root}/img_emb/img_emb_{p}.npy").get("size") for p in parts}
    return fingerprint(files, {"source": source, "metadata": inputs, "vectors": sizes, "plan": sizes_planned,
                               "rules": 1})


def _require_matches(stats: dict[str, int], source: str) -> None:
    if not any(stats.get(name, 0) for name in MATCHED):
        seen = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items())) or "no samples"
        raise DedupError(
            f"no sample of the shards has a vector in {source} ({seen})",
            hint="its metadata must name each sample by image_path (shard/key) or url; OUT/precomputed_coverage says why",
        )


def embeddings_location(source: str) -> str:
    """A local folder as an absolute path (a URL of any fsspec protocol unchanged)."""
    return source if "://" in source else str(Path(source).resolve())


def check_embeddings_beside_shards(source: str) -> None:
    """Before any shard is read: the folder is a clip-retrieval layout with metadata that can name samples."""
    part = list_parts(source)[0]
    first = next(metadata_batches(source, part), pd.DataFrame())
    if "url" in first:
        return
    named = [p for p in first.get("image_path", pd.Series(dtype=object)).tolist() if shard_and_key(p)[0]]
    if not named:  # clip-retrieval over webdataset writes the bare key as image_path
        what = "bare keys as image_path and no url" if "image_path" in first else "neither image_path nor url"
        raise DedupError(
            f"metadata_{part}.parquet of {source} has {what}, so no vector can be matched to a sample of the shards",
            hint="keys alone repeat across img2dataset outputs: give metadata with image_path (shard/key) or url",
        )
