"""`dedup export OUT --out DIR`: what a rewrite job needs, kept samples only.

- `DIR/urls.parquet`: `url`, `caption`, `key` (the source key), `shard` of every kept sample
  with a URL, which img2dataset downloads again:
  `img2dataset --url_list DIR/urls.parquet --input_format parquet --url_col url --caption_col caption`.
- with `--shards`: `DIR/shards/{shard_index:05d}.tar`, one per source shard, holding the kept
  samples' members byte-identical and in their original order (headers keep name, mtime, mode,
  owner). One task per shard with a completion marker under `DIR/_markers/export/`, so a killed
  export resumes at the first unfinished shard.

Kept = `keep` in OUT/manifests, minus every (shard, key) in the `--remove` lists (any file in the
remove-list schema: OUT/remove_keys.parquet, `dedup compare`'s remove_from_train.parquet).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pandas as pd

from dedup.errors import StoreError
from dedup.records import RunDir, load_samples, write_table

URL_COLUMNS = ["url", "caption", "key", "shard"]


def kept_samples(run: RunDir, remove_lists: list[Path] | None = None) -> pd.DataFrame:
    """`sample_id`, `shard_index`, `shard`, `key`, `url`, `caption` of the samples an export keeps."""
    parts = sorted(run.manifests_dir.glob("*.parquet"))
    if not parts:
        raise StoreError(f"{run.root} has no manifests", hint=f"run 'dedup manifests {run.root}' first")
    manifests = pd.concat([pd.read_parquet(p, columns=["sample_id", "keep"]) for p in parts], ignore_index=True)
    samples = load_samples(run, ["sample_id", "shard_index", "shard", "key", "url", "caption"])
    kept = samples.merge(manifests[manifests["keep"]][["sample_id"]], on="sample_id")
    removed = _removed_pairs(remove_lists or [])
    if removed:
        pairs = pd.Series(list(zip(kept["shard"], kept["key"])), index=kept.index)
        kept = kept[~pairs.isin(removed)]
    return kept.sort_values("sample_id", ignore_index=True)


def _removed_pairs(paths: list[Path]) -> set[tuple[str, str]]:
    from dedup.loader import load_removed_keys

    removed: set[tuple[str, str]] = set()
    for path in paths:
        if not Path(path).is_file():
            raise StoreError(f"remove list {path} does not exist", hint="pass a parquet file with shard and key columns")
        removed |= load_removed_keys(path)
    return removed


def write_url_list(kept: pd.DataFrame, folder: Path) -> int:
    with_url = kept[kept["url"].notna() & (kept["url"].astype(str) != "")]
    write_table(with_url[URL_COLUMNS].reset_index(drop=True), folder / "urls.parquet")
    return len(with_url)


class ExportShardsStage:
    """One task per source shard: copy the kept samples' members into DIR/shards/{i:05d}.tar."""

    name = "export"

    def __init__(self, folder: Path, shard_urls: dict[int, str], kept_keys: dict[int, set[str]]) -> None:
        self.folder, self.shard_urls, self.kept_keys = folder, shard_urls, kept_keys

    def task_ids(self) -> list[str]:
        return [str(i) for i in sorted(self.shard_urls)]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        index = int(task_id)
        target = self.folder / "shards" / f"{index:05d}.tar"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp")
        stats = copy_members(self.shard_urls[index], self.kept_keys.get(index, set()), partial)
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
    kept = kept_samples(run, remove_lists)
    stats = {"kept": len(kept), "urls": write_url_list(kept, folder)}
    if shards:
        urls = dict(zip(read_shards(run)["shard_index"].astype(int), read_shards(run)["url"]))
        keys = {int(i): set(group["key"]) for i, group in kept.groupby("shard_index")}
        report = make_engine("local", RunDir(folder), show_progress=show_progress).run(ExportShardsStage(folder, urls, keys))
        stats.update({"shards": report.tasks_total, "shard_samples": int(report.stats.get("samples", 0)),
                      "shard_members": int(report.stats.get("members", 0))})
    return stats
