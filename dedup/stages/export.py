"""`dedup export OUT --out DIR`: what a rewrite job needs, kept samples only.

- `DIR/urls.parquet`: `url`, `caption`, `key` (the source key), `shard` of every kept sample
  with a URL, which img2dataset downloads again:
  `img2dataset --url_list DIR/urls.parquet --input_format parquet --url_col url --caption_col caption`.
- with `--shards`: `DIR/shards/{shard_index:05d}.tar`, one per source shard, holding the kept
  samples' members byte-identical and in their original order (headers keep name, mtime, mode,
  owner). One task per shard with a completion marker under `DIR/_markers/export/`, so a killed
  export resumes at the first unfinished shard (after new manifests, export into a new DIR).

Both are built shard by shard, so memory follows the largest shard, not the dataset.

Kept = `keep` in OUT/manifests, minus every (shard, key) in the `--remove` lists (any file in the
remove-list schema: OUT/remove_keys.parquet, `dedup compare`'s remove_from_train.parquet).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.errors import StoreError
from dedup.records import EXPORT_URLS, RunDir

URL_COLUMNS = ["url", "caption", "key", "shard"]
URL_SCHEMA = EXPORT_URLS  # the contract lives in dedup/records.py


def kept_in_shard(run: RunDir, shard_index: int, shard: str, removed: set[tuple[str, str, int]]) -> pd.DataFrame:
    """`sample_id`, `shard`, `key`, `occurrence`, `url`, `caption` of one shard's kept samples (memory: one shard)."""
    manifest = run.manifest_part(shard)
    samples = run.samples_part(shard_index)
    if not manifest.exists() or not samples.exists():
        return pd.DataFrame({c: pd.Series(dtype="object") for c in ["sample_id", "occurrence", *URL_COLUMNS]})
    keep = pd.read_parquet(manifest, columns=["sample_id", "keep", "occurrence"])
    rows = pd.read_parquet(samples, columns=["sample_id", "shard", "key", "url", "caption"])
    kept = rows.merge(keep[keep["keep"]][["sample_id", "occurrence"]], on="sample_id")
    if removed:
        identity = pd.Series(list(zip(kept["shard"], kept["key"], kept["occurrence"], strict=False)), index=kept.index, dtype="object")
        kept = kept[~identity.isin(removed)]
    return kept.sort_values("sample_id", ignore_index=True)


def _removed_pairs(paths: list[Path]) -> set[tuple[str, str, int]]:
    """(shard, key, occurrence) of every sample in the remove lists: the loader's identity."""
    from dedup.loader import load_removed_keys

    removed: set[tuple[str, str, int]] = set()
    for path in paths:
        if not Path(path).is_file():
            raise StoreError(f"remove list {path} does not exist", hint="pass a parquet file with shard and key columns")
        removed |= load_removed_keys(path)
    return removed


def write_url_list(run: RunDir, shards: dict[int, str], removed: set[tuple[str, str, int]], folder: Path) -> dict[str, int]:
    """DIR/urls.parquet, appended shard by shard (memory: one shard), published atomically."""
    target = folder / "urls.parquet"
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp")
    kept = with_url = 0
    with pq.ParquetWriter(partial, URL_SCHEMA) as writer:
        for index in sorted(shards):
            rows = kept_in_shard(run, index, shards[index], removed)
            urls = rows[rows["url"].notna() & (rows["url"].astype(str) != "")]
            writer.write_table(pa.Table.from_pandas(urls[URL_COLUMNS], schema=URL_SCHEMA, preserve_index=False))
            kept, with_url = kept + len(rows), with_url + len(urls)
    partial.replace(target)
    return {"kept": kept, "urls": with_url}


class ExportShardsStage:
    """One task per source shard: copy the kept samples' members into DIR/shards/{i:05d}.tar."""

    name = "export"

    def __init__(self, run: RunDir, folder: Path, shard_urls: dict[int, str], removed: set[tuple[str, str, int]]) -> None:
        self.run_dir, self.folder, self.shard_urls, self.removed = run, folder, shard_urls, removed

    def task_ids(self) -> list[str]:
        return [str(i) for i in sorted(self.shard_urls)]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        index = int(task_id)
        kept = kept_in_shard(self.run_dir, index, self.shard_urls[index], self.removed)
        keys = set(zip(kept["key"], kept["occurrence"].astype(int), strict=False))
        target = self.folder / "shards" / f"{index:05d}.tar"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp")
        stats = copy_members(self.shard_urls[index], keys, partial)
        partial.replace(target)
        progress(stats["samples"])
        return stats

    def close(self) -> None:
        pass


def copy_members(url: str, kept: set[tuple[str, int]], target: Path) -> dict[str, int]:
    """Stream a source shard and write every member of a kept (key, occurrence), bytes and header unchanged.

    Samples are told apart as the reader tells them apart: a new key, or a member
    name repeated inside the current sample, starts the next sample, and the n-th
    sample with a key has occurrence n.
    """
    from dedup.stages.read import open_shard, split_member_name

    members, written = 0, set()
    seen: dict[str, int] = {}
    current, extensions = None, set()
    with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as source, \
            tarfile.open(target, "w", format=source.format) as out:
        for member in source:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if key != current or ext in extensions:
                seen[key] = seen.get(key, -1) + 1
                current, extensions = key, set()
            extensions.add(ext)
            if (key, seen[key]) in kept:
                out.addfile(member, source.extractfile(member))
                members += 1
                written.add((key, seen[key]))
    return {"samples": len(written), "members": members}


def export(out: str | Path, dest: str | Path, shards: bool = False, remove_lists: list[Path] | None = None,
           show_progress: bool = True) -> dict[str, int]:
    from dedup.engine import make_engine
    from dedup.records import read_shards
    from dedup.settings import EngineSettings

    run, folder = RunDir(out), Path(dest)
    if not run.manifest_index.exists():
        raise StoreError(f"{run.root} has no manifests", hint=f"run 'dedup manifests {run.root}' first")
    table = read_shards(run)
    urls = dict(zip(table["shard_index"].astype(int), table["url"], strict=False))
    removed = _removed_pairs(remove_lists or [])
    stats = write_url_list(run, urls, removed, folder)
    if shards:
        engine = make_engine(RunDir(folder), EngineSettings(show_progress=show_progress))
        report = engine.run(ExportShardsStage(run, folder, urls, removed))
        stats.update({"shards": report.tasks_total, "shard_samples": int(report.stats.get("samples", 0)),
                      "shard_members": int(report.stats.get("members", 0))})
    return stats
