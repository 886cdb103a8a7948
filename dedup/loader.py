"""Apply a run's manifests in a training loader: `DropDuplicates` for webdataset pipelines.

A sample is identified by (shard, key, occurrence): the shard is the `__url__`
webdataset gives it, the key its `__key__`, and the occurrence tells repeated
keys inside one shard apart (the n-th sample with key K in a shard has
occurrence n, from 0, in tar order -- as the run counted them).

Memory is O(one shard) plus one small row per shard: the shard -> manifest
lookup (`manifests/_index.parquet`) is read once, and a shard's removed keys
are read from its own manifest when its first sample arrives.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from dedup.errors import DedupError, StoreError
from dedup.run import RunDir

# Shards whose removed keys stay in memory at once: a shuffle buffer after the
# loader mixes samples of a few shards, and each switch must not re-read a file.
OPEN_SHARDS = 4


class MissingManifestWarning(UserWarning):
    """A shard the loader reads has no manifest in the run, or one of part of it: those samples pass unfiltered."""


def run_root(run_or_path: str | Path) -> Path:
    """A run directory, or any file inside it (`remove_keys.parquet`, `manifests/_index.parquet`)."""
    path = Path(run_or_path)
    if path.is_dir():
        return path.parent if path.name == "manifests" else path
    if path.name == "remove_keys.parquet":
        return path.parent
    if path.name == "_index.parquet":
        return path.parent.parent
    raise StoreError(f"{path} is not a dedup run directory", hint="pass the --out directory of 'dedup run'")


def load_manifest_index(run: RunDir, prefix_map: Mapping[str, str] | None = None) -> tuple[dict[str, str], set[str]]:
    """Shard location (as the loader will see it) -> manifest file name, and the shards the run read only in part."""
    import pyarrow.parquet as pq

    if not run.manifest_index.exists():
        raise StoreError(
            f"{run.root} has no {run.manifest_index.relative_to(run.root)}",
            hint=f"run 'dedup manifests {run.root}' (runs written before dedup 0.3 need it once)",
        )
    table = pq.ParquetFile(run.manifest_index).read(columns=["shard", "manifest", "complete"], use_threads=False)
    shards = [map_prefix(shard, prefix_map) for shard in table.column("shard").to_pylist()]
    complete = table.column("complete").to_pylist()
    incomplete = {shard for shard, whole in zip(shards, complete, strict=True) if not whole}
    return dict(zip(shards, table.column("manifest").to_pylist(), strict=True)), incomplete


def map_prefix(shard: str, prefix_map: Mapping[str, str] | None) -> str:
    """Rewrite the longest matching run prefix: {"s3://bucket/laion/": "/data/laion/"}."""
    for prefix in sorted(prefix_map or {}, key=len, reverse=True):
        if shard.startswith(prefix):
            return prefix_map[prefix] + shard[len(prefix):]
    return shard


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


class ShardFilter:
    """The removed keys of a shard whose keys are all distinct (the usual case): one set lookup a sample."""

    def __init__(self, removed: set[str]) -> None:
        self.removed = removed

    def keep(self, key: str) -> bool:
        return key not in self.removed

    def remove(self, key: str, occurrence: int) -> None:
        # Keys are distinct in this shard (its manifest says so): only occurrence 0 exists.
        if occurrence == 0:
            self.removed.add(key)

    @staticmethod
    def read(path: Path) -> ShardFilter | RepeatedKeyFilter:
        import pyarrow.parquet as pq

        # One thread: on a 1,000-row file, starting the thread pool costs 10x the read.
        table = pq.ParquetFile(path).read(columns=["key", "occurrence", "keep"], use_threads=False)
        keys, occurrences, keep = (table.column(name).to_pylist() for name in ("key", "occurrence", "keep"))
        if not any(occurrences):
            return ShardFilter({key for key, kept in zip(keys, keep, strict=True) if not kept})
        copies: dict[str, int] = {}
        for key, occurrence in zip(keys, occurrences, strict=True):
            copies[key] = max(copies.get(key, 0), occurrence + 1)
        removed = {(key, n) for key, n, kept in zip(keys, occurrences, keep, strict=True) if not kept}
        return RepeatedKeyFilter(removed, {key: n for key, n in copies.items() if n > 1})


class RepeatedKeyFilter:
    """A shard with repeated keys: samples are (key, occurrence), counted in order of appearance."""

    def __init__(self, removed: set[tuple[str, int]], copies: dict[str, int]) -> None:
        self.removed = removed
        self.copies = copies  # keys that repeat in this shard -> how many times
        self.seen: dict[str, int] = {}

    def keep(self, key: str) -> bool:
        occurrence = self.seen.get(key, 0)
        if occurrence >= self.copies.get(key, 1):
            # More copies of the key than the shard holds: the shard is being read again
            # (next epoch, resampling), so counting starts over.
            self.seen.clear()
            occurrence = 0
        self.seen[key] = occurrence + 1
        return (key, occurrence) not in self.removed

    def remove(self, key: str, occurrence: int) -> None:
        self.removed.add((key, int(occurrence)))


class DropDuplicates:
    """A webdataset pipeline stage that drops the samples a run removed, while streaming.

        import webdataset as wds
        from dedup import DropDuplicates
        ds = wds.WebDataset(urls).compose(DropDuplicates("runs/laion"))
        # shards copied elsewhere since the run:
        DropDuplicates("runs/laion", prefix_map={"s3://bucket/laion/": "/data/laion/"})

    Drops exactly the samples of `remove_keys.parquet`, matched on (`__url__`,
    `__key__`, occurrence). `__url__` must be the shard location as given to the
    run (or, for a local path, resolve to it), after `prefix_map` rewrote run
    prefixes into the loader's. Compose it straight after `wds.WebDataset`, before
    any shuffle, so repeated keys arrive in tar order. A shard without manifest
    passes through unfiltered with one `MissingManifestWarning`.
    """

    def __init__(self, run_or_path: str | Path, prefix_map: Mapping[str, str] | None = None,
                 also_remove: Iterable[str | Path] = ()) -> None:
        self.run = RunDir(run_root(run_or_path))
        self.manifest_of, self.incomplete = load_manifest_index(self.run, prefix_map)
        # Extra remove lists (e.g. `dedup compare`'s remove_from_train.parquet), read per shard as it arrives.
        self.also_remove = [str(check_remove_list(path)) for path in also_remove]
        self.prefix_map = dict(prefix_map or {})
        self._open: OrderedDict[str, ShardFilter | RepeatedKeyFilter | None] = OrderedDict()
        self._warned: set[str] = set()

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        url, shard = None, None
        for sample in samples:
            key = sample.get("__key__")
            if sample.get("__url__") != url or key.__class__ is not str:
                url = sample.get("__url__")
                shard = self._shard_of(sample)
            if shard is None or shard.keep(key):
                yield sample

    def keep(self, sample: dict) -> bool:
        """For `dataset.select(dropper.keep)`."""
        shard = self._shard_of(sample)
        return shard is None or shard.keep(sample["__key__"])

    def _shard_of(self, sample: dict) -> ShardFilter | RepeatedKeyFilter | None:
        url, key = sample.get("__url__"), sample.get("__key__")
        if not isinstance(url, str) or not isinstance(key, str):
            raise DedupError(
                "DropDuplicates needs each sample's __url__ and __key__ (a sample is its shard plus its key)",
                hint="compose it straight after wds.WebDataset(urls), before .decode()/.to_tuple()",
            )
        return self._shard(url)

    def _shard(self, url: str) -> ShardFilter | RepeatedKeyFilter | None:
        if url in self._open:
            self._open.move_to_end(url)
            return self._open[url]
        self._open[url] = shard = self._read(url)
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return shard

    def _read(self, url: str) -> ShardFilter | RepeatedKeyFilter | None:
        location = self._location(url)
        if location is None or not (self.run.manifests_dir / self.manifest_of[location]).exists():
            self._warn(url, "has no manifest in the run: its samples pass unfiltered "
                            "(a shard the run did not read; or pass prefix_map= for shards moved since)")
            return None
        if location in self.incomplete:
            self._warn(url, "was not read to its end by the run: samples after the part it read pass "
                            "unfiltered; rerun 'dedup run' with the same shards to retry it")
        shard_filter = ShardFilter.read(self.run.manifests_dir / self.manifest_of[location])
        for key, occurrence in self._extra_removed(location):
            shard_filter.remove(key, occurrence)
        return shard_filter

    def _extra_removed(self, location: str) -> list[tuple[str, int]]:
        """(key, occurrence) of `location` in the extra remove lists (which name shards as the run does)."""
        import pyarrow.parquet as pq

        names = [shard for shard in self._run_names(location)]
        found: list[tuple[str, int]] = []
        for path in self.also_remove:
            table = pq.read_table(path, columns=["key", "occurrence"], filters=[("shard", "in", names)])
            found += zip(table.column("key").to_pylist(), table.column("occurrence").to_pylist(), strict=True)
        return found

    def _run_names(self, location: str) -> list[str]:
        """The run's own names for a loader location: `prefix_map` maps run names to loader names."""
        names = {location}
        for run_prefix, loader_prefix in self.prefix_map.items():
            if location.startswith(loader_prefix):
                names.add(run_prefix + location[len(loader_prefix):])
        return sorted(names)

    def _location(self, url: str) -> str | None:
        """The run's name for the shard at `url`: as given, or for a local path its absolute / resolved form."""
        candidates = [url] if _is_remote(url) else [url, os.path.abspath(url), os.path.realpath(url)]
        return next((c for c in candidates if c in self.manifest_of), None)

    def _warn(self, url: str, problem: str) -> None:
        if url not in self._warned:
            self._warned.add(url)
            warnings.warn(f"shard {url!r} {problem} [{self.run.root}]", MissingManifestWarning, stacklevel=4)


def check_remove_list(path: str | Path) -> Path:
    """A parquet file in the remove-list schema (shard, key, occurrence, ...), or a clear error."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        names = set(pq.read_schema(path).names)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is not a readable remove list ({exc})",
                         hint="pass OUT/remove_keys.parquet or a file 'dedup compare --remove-from' wrote") from None
    if not {"shard", "key", "occurrence"} <= names:
        raise StoreError(f"{path} lacks the shard, key and occurrence columns of a remove list",
                         hint="pass OUT/remove_keys.parquet or a file 'dedup compare --remove-from' wrote")
    return path


def load_removed_keys(run_or_path: str | Path) -> set[tuple[str, str, int]]:
    """(shard, key, occurrence) of every removed sample: a run directory, or any remove-list parquet file."""
    import pyarrow.parquet as pq

    path = Path(run_or_path)
    source = path if path.is_file() and path.name != "_index.parquet" else RunDir(run_root(run_or_path)).remove_keys
    table = pq.read_table(check_remove_list(source), columns=["shard", "key", "occurrence"])
    columns = [table.column(name).to_pylist() for name in ("shard", "key", "occurrence")]
    return set(zip(*columns, strict=True))
