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
from dedup.records import RunDir

URL_COLUMNS = ["url", "caption", "key", "shard"]
URL_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("shard", pa.string())])


def kept_in_shard(run: RunDir, shard_index: int, removed: set[tuple[str, str]]) -> pd.DataFrame:
    """`sample_id`, `shard`, `key`, `url`, `caption` of one shard's kept samples (memory: one shard)."""
    manifest = run.manifests_dir / f"{shard_index:05d}.parquet"
    samples = run.samples_part(shard_index)
    if not manifest.exists() or not samples.exists():
        return pd.DataFrame({c: pd.Series(dtype="object") for c in ["sample_id", *URL_COLUMNS]})
    keep = pd.read_parquet(manifest, columns=["sample_id", "keep"])
    rows = pd.read_parquet(samples, columns=["sample_id", "shard", "key", "url", "caption"])
    kept = rows.merge(keep[keep["keep"]][["sample_id"]], on="sample_id")
    if removed:
        kept = kept[~pd.Series(list(zip(kept["shard"], kept["key"])), index=kept.index, dtype="object").isin(removed)]
    return kept.sort_values("sample_id", ignore_index=True)


def _removed_pairs(paths: list[Path]) -> set[tuple[str, str]]:
    from dedup.loader import load_removed_keys

    removed: set[tuple[str, str]] = set()
    for path in paths:
        if not Path(path).is_file():
            raise StoreError(f"remove list {path} does not exist", hint="pass a parquet file with shard and key columns")
        removed |= load_removed_keys(path)
    return removed


def write_url_list(run: RunDir, shard_indexes: list[int], removed: set[tuple[str, str]], folder: Path) -> dict[str, int]:
    """DIR/urls.parquet, appended shard by shard (memory: one shard), published atomically."""
    target = folder / "urls.parquet"
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp")
    kept = with_url = 0
    with pq.ParquetWriter(partial, URL_SCHEMA) as writer:
        for index in shard_indexes:
            rows = kept_in_shard(run, index, removed)
            urls = rows[rows["url"].notna() & (rows["url"].astype(str) != "")]
            writer.write_table(pa.Table.from_pandas(urls[URL_COLUMNS], schema=URL_SCHEMA, preserve_index=False))
            kept, with_url = kept + len(rows), with_url + len(urls)
    partial.replace(target)
    return {"kept": kept, "urls": with_url}


class ExportShardsStage:
    """One task per source shard: copy the kept samples' members into DIR/shards/{i:05d}.tar."""

    name = "export"

    def __init__(self, run: RunDir, folder: Path, shard_urls: dict[int, str], removed: set[tuple[str, str]]) -> None:
        self.run_dir, self.folder, self.shard_urls, self.removed = run, folder, shard_urls, removed

    def task_ids(self) -> list[str]:
        return [str(i) for i in sorted(self.shard_urls)]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        index = int(task_id)
        keys = set(kept_in_shard(self.run_dir, index, self.removed)["key"])
        target = self.folder / "shards" / f"{index:05d}.tar"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp")
        stats = copy_members(self.shard_urls[index], keys, partial)
        partial.replace(target)
        progress(stats["samples"])
        return stats

    def close(self) -> None:
        pass


def copy_members(url: str, keys: set[str], target: Path) -> dict[str, int]:
    """Stream a source shard and write every member whose key is kept, bytes and header unchanged."""
    from dedup.stages.read import open_shard, split_member_name

    members = 0
    written: set[str] = set()
    with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as source, \
            tarfile.open(target, "w", format=source.format) as out:
        for member in source:
            key = split_member_name(member.name)[0]
            if not member.isfile() or key not in keys:
                continue
            out.addfile(member, source.extractfile(member))
            members += 1
            written.add(key)
    return {"samples": len(written), "members": members}


def export(out: str | Path, dest: str | Path, shards: bool = False, remove_lists: list[Path] | None = None,
           show_progress: bool = True) -> dict[str, int]:
    from dedup.engine import make_engine
    from dedup.records import read_shards

    run, folder = RunDir(out), Path(dest)
    if not any(run.manifests_dir.glob("*.parquet")):
        raise StoreError(f"{run.root} has no manifests", hint=f"run 'dedup manifests {run.root}' first")
    table = read_shards(run)
    urls = dict(zip(table["shard_index"].astype(int), table["url"]))
    removed = _removed_pairs(remove_lists or [])
    stats = write_url_list(run, sorted(urls), removed, folder)
    if shards:
        report = make_engine("local", RunDir(folder), show_progress=show_progress).run(ExportShardsStage(run, folder, urls, removed))
        stats.update({"shards": report.tasks_total, "shard_samples": int(report.stats.get("samples", 0)),
                      "shard_members": int(report.stats.get("members", 0))})
    return stats
