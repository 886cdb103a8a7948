"""Rank stage: clusters.parquet -> top_duplicates.parquet (largest clusters first, or riskiest with --by risk).

Memorisation risk (see docs_risk.md for the reasons):

    risk = log1p(copies) * (0.5 + caption_sameness) * (1 + log10(max(url_domains, 1)))

`caption_sameness` is the share of a cluster's members whose normalised caption
(lowercase, punctuation removed, whitespace collapsed) equals the
representative's; `verbatim_copies` counts those members (Webster et al.'s
"verbatim" copies: same image, same caption).

Memory is bounded by BUCKET_ROWS member rows, not by the clusters with copies: above that many,
one scan of clusters.parquet (a row group at a time) spills the members into buckets by a hash of
their cluster id (a cluster is never split), each bucket is summarised alone, and the summaries,
each sorted, are merged in order into top_duplicates.parquet chunk by chunk.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup.engine import done_task_ids, forget_tasks, run_stage
from dedup.errors import DedupError, StoreError
from dedup.records import TOP_DUPLICATES, RunDir, atomic_output, conform, fingerprint, write_json, write_table
from dedup.run import Run

TOP_COLUMNS = TOP_DUPLICATES.names  # the contract lives in dedup/records.py

RANK_ORDERS = ("copies", "risk")
# Member rows of clusters with copies held at once (a read batch, one bucket on average).
BUCKET_ROWS = 1 << 19
MAX_BUCKETS = 512  # open bucket writers; past BUCKET_ROWS * MAX_BUCKETS members buckets grow instead
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")


def normalise_caption(caption: object) -> str | None:
    """Lowercase, punctuation removed, whitespace collapsed; None for a missing or empty caption."""
    if not isinstance(caption, str):
        return None
    text = _SPACES.sub(" ", _PUNCTUATION.sub(" ", caption.lower())).strip()
    return text or None


def risk_score(copies: float, caption_sameness: float, url_domains: float) -> float:
    """The documented memorisation-risk formula (module docstring, docs_risk.md)."""
    return math.log1p(copies) * (0.5 + caption_sameness) * (1.0 + math.log10(max(url_domains, 1.0)))


def _caption_columns(dups: pd.DataFrame) -> pd.DataFrame:
    """Per cluster: verbatim_copies (members captioned as the representative) and caption_sameness."""
    normalised = dups["caption"].map(normalise_caption)
    reps = dups["is_representative"].to_numpy()
    rep_caption = pd.Series(normalised[reps].to_numpy(), index=dups.loc[reps, "cluster_id"].to_numpy())
    same = normalised.notna() & (normalised == dups["cluster_id"].map(rep_caption))
    verbatim = same.groupby(dups["cluster_id"]).sum().astype("int64")
    sizes = dups.groupby("cluster_id").size()
    return pd.DataFrame({"verbatim_copies": verbatim, "caption_sameness": (verbatim / sizes).astype("float64")})


def url_domain(url: object) -> str | None:
    if not isinstance(url, str) or not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.lower().removeprefix("www.") if host else None


def rank_clusters(clusters: pd.DataFrame, by: str = "copies") -> pd.DataFrame:
    """One row per cluster of >= 2 members: copies, caption/domain/shard spread, memorisation risk."""
    summary = _ordered(cluster_summaries(clusters), by)
    summary.insert(0, "rank", range(1, len(summary) + 1))
    return summary[TOP_COLUMNS].reset_index(drop=True)


def cluster_summaries(clusters: pd.DataFrame) -> pd.DataFrame:
    """`rank_clusters` without the order: one row per cluster of >= 2 members, from all of its members."""
    dups = clusters[clusters["cluster_size"] >= 2].copy()
    if dups.empty:
        return TOP_DUPLICATES.empty_table().to_pandas().drop(columns="rank")
    dups["domain"] = dups["url"].map(url_domain)
    grouped = dups.groupby("cluster_id")
    summary = pd.DataFrame(
        {
            "copies": grouped.size(),
            "distinct_captions": grouped["caption"].nunique(dropna=True),
            "url_domains": grouped["domain"].nunique(dropna=True),
            "shards_spanned": grouped["shard_index"].nunique(),
        }
    )
    reps = dups[dups["is_representative"]].set_index("cluster_id")
    summary["representative_key"] = reps["key"]
    summary["representative_url"] = reps["url"]
    summary["representative_caption"] = reps["caption"]
    summary = summary.join(_caption_columns(dups))
    summary["risk"] = [risk_score(*v) for v in zip(summary["copies"], summary["caption_sameness"], summary["url_domains"], strict=False)]
    return summary.reset_index()


def _ordered(summary: pd.DataFrame, by: str) -> pd.DataFrame:
    return summary.sort_values([by, "copies", "cluster_id"], ascending=[False, False, True])


# What `rank_clusters` reads of a member.
RANK_COLUMNS = ["sample_id", "shard_index", "key", "url", "caption", "cluster_id", "cluster_size", "is_representative"]


def read_copies(path) -> pd.DataFrame:
    """The rows of clusters with copies, the columns ranking reads: singletons (most samples) are
    filtered out while the file is scanned, never loaded."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=RANK_COLUMNS, filters=[("cluster_size", ">=", 2)]).to_pandas()


def write_ranking(run: RunDir, by: str) -> int:
    """clusters.parquet -> top_duplicates.parquet in this process (the three rank sub-stages' steps in a row,
    in a temporary folder); returns the clusters ranked."""
    folder = run.scratch_dir("rank")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ranking-", dir=folder) as tmp:
        buckets = split_members(run.clusters, Path(tmp))
        summaries = [path.with_suffix(".summary.parquet") for path in buckets]
        for bucket, summary in zip(buckets, summaries, strict=True):
            summarise_bucket(bucket, summary, by)
        return write_merged(run.top_duplicates, summaries, by)


def bucket_count(members: int) -> int:
    return max(1, min(MAX_BUCKETS, -(-members // BUCKET_ROWS)))


def split_members(clusters: Path, folder: Path) -> list[Path]:
    """The members of clusters with copies into bucket files by cluster (as many as BUCKET_ROWS asks for)."""
    return _split(clusters, folder, bucket_count(_members_with_copies(clusters)))


def write_merged(path: Path, summaries: list[Path], by: str) -> int:
    """The sorted bucket summaries merged into the ranking at `path` (atomic), chunk by chunk; returns its rows."""
    ranked = 0
    with atomic_output(path) as out, pq.ParquetWriter(out, TOP_DUPLICATES) as writer:
        for chunk in _merged(summaries, by, max(1, BUCKET_ROWS // max(1, len(summaries)))):
            chunk.insert(0, "rank", np.arange(ranked + 1, ranked + len(chunk) + 1))
            writer.write_table(conform(chunk, TOP_DUPLICATES))
            ranked += len(chunk)
        if not ranked:
            writer.write_table(TOP_DUPLICATES.empty_table())
    return ranked


def _members_with_copies(path: Path) -> int:
    handle = pq.ParquetFile(path)
    return sum(int(pc.sum(pc.greater_equal(batch.column(0), 2)).as_py() or 0)
               for batch in handle.iter_batches(batch_size=BUCKET_ROWS, columns=["cluster_size"]))


def _bucket_of(cluster_id: np.ndarray, count: int) -> np.ndarray:
    # A multiplicative hash: representatives' ids are shard << 32 | position, so the low bits alone cluster.
    return ((cluster_id.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) % np.uint64(count)


def _split(clusters: Path, folder: Path, count: int) -> list[Path]:
    """The members of clusters with copies (RANK_COLUMNS), a batch at a time, into `count` bucket files."""
    paths = [folder / f"bucket_{i}.parquet" for i in range(count)]
    handle = pq.ParquetFile(clusters)
    schema = handle.schema_arrow
    schema = pa.schema([schema.field(name) for name in RANK_COLUMNS])
    writers = [pq.ParquetWriter(path, schema) for path in paths]
    try:
        for batch in handle.iter_batches(batch_size=BUCKET_ROWS, columns=RANK_COLUMNS):
            table = pa.Table.from_batches([batch]).filter(pc.greater_equal(batch.column("cluster_size"), 2))
            bucket = _bucket_of(table["cluster_id"].to_numpy(), count)
            order = np.argsort(bucket, kind="stable")
            table, bounds = table.take(pa.array(order)), np.searchsorted(bucket[order], np.arange(count + 1))
            for i in np.flatnonzero(np.diff(bounds)):
                writers[i].write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]))
    finally:
        for writer in writers:
            writer.close()
    return paths


def summarise_bucket(bucket: Path, path: Path, by: str) -> int:
    """A bucket's cluster summaries in ranking order -> `path` (atomic); returns its clusters."""
    summary = _ordered(cluster_summaries(pd.read_parquet(bucket)), by)
    write_table(summary.reset_index(drop=True), path)
    return len(summary)


def _merged(summaries: list[Path], by: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Sorted summaries merged in ranking order, a chunk of at most about len(summaries) * chunk_rows rows at a time.

    Every summary's rows up to the smallest of the last keys read are final (no later row of any summary
    sorts before it), so they are emitted; then each summary with no row left in hand reads its next chunk.
    """
    readers = [pq.ParquetFile(path).iter_batches(batch_size=chunk_rows) for path in summaries]
    hand = [_next(reader) for reader in readers]
    while any(frame is not None for frame in hand):
        live = [frame for frame in hand if frame is not None]
        bound = min(_key(frame, by, len(frame) - 1) for frame in live if len(frame))
        ready = [frame[_at_most(frame, by, bound)] for frame in live]
        yield _ordered(pd.concat(ready, ignore_index=True), by).reset_index(drop=True)
        hand = [None if frame is None else frame[~_at_most(frame, by, bound)] for frame in hand]
        hand = [_next(readers[i]) if frame is not None and not len(frame) else frame for i, frame in enumerate(hand)]


def _next(reader) -> pd.DataFrame | None:
    """The reader's next non-empty chunk, None when it is done."""
    for batch in reader:
        if batch.num_rows:
            return batch.to_pandas()
    return None


def _key(frame: pd.DataFrame, by: str, row: int) -> tuple:
    """The ranking order as an ascending tuple: larger `by`, then more copies, then the smaller cluster id first."""
    return (-frame[by].iat[row], -frame["copies"].iat[row], frame["cluster_id"].iat[row])


def _at_most(frame: pd.DataFrame, by: str, bound: tuple) -> np.ndarray:
    """Rows whose key is <= bound (lexicographic)."""
    first, second, third = -frame[by].to_numpy(), -frame["copies"].to_numpy(), frame["cluster_id"].to_numpy()
    return (first < bound[0]) | ((first == bound[0]) & ((second < bound[1]) | ((second == bound[1]) & (third <= bound[2]))))


def check_order(by: str) -> str:
    if by not in RANK_ORDERS:
        raise DedupError(f"unknown ranking order {by!r}", hint="use --by copies or --by risk")
    return by


# ---------------------------------------------------------------- the stages behind the engine
#
# Three stages share one fingerprint (clusters.parquet, the order), so any change runs all three:
# rank_split (one task: the members of clusters with copies, scanned a row group at a time, into bucket
# files by cluster id under OUT/_scratch/rank/), rank_buckets (one task per bucket: its summaries, sorted;
# on the cluster with --engine ray) and rank (one task: the summaries merged into top_duplicates.parquet;
# the scratch is removed after).

BUCKETS_FILE = "buckets.json"


class _RankInputs:
    """What the three rank stages share: the run, the order, one fingerprint, the scratch folder."""

    def __init__(self, run: RunDir, by: str = "copies") -> None:
        self.run_dir, self.by = run, check_order(by)

    def fingerprint(self) -> str:
        return fingerprint([self.run_dir.clusters], {"by": self.by})

    def scratch(self, name: str) -> Path:
        return self.run_dir.scratch_dir("rank") / name

    def buckets(self) -> int:
        """How many buckets rank_split wrote (0 before it ran or after rank removed the scratch)."""
        path = self.scratch(BUCKETS_FILE)
        return int(json.loads(path.read_text())["buckets"]) if path.exists() else 0

    def bucket_path(self, i: int) -> Path:
        return self.scratch(f"bucket_{i}.parquet")

    def summary_path(self, i: int) -> Path:
        return self.scratch(f"summary_{i}.parquet")

    def close(self) -> None:
        pass


class RankSplitStage(_RankInputs):
    name = "rank_split"

    def task_ids(self) -> list[str]:
        return ["0"]

    def reset(self) -> None:
        shutil.rmtree(self.run_dir.scratch_dir("rank"), ignore_errors=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        require_clusters(self.run_dir)
        self.reset()  # a split is whole: no bucket of an earlier one may stay
        folder = self.run_dir.scratch_dir("rank")
        folder.mkdir(parents=True, exist_ok=True)
        buckets = split_members(self.run_dir.clusters, folder)
        write_json({"buckets": len(buckets)}, self.scratch(BUCKETS_FILE))  # last: the split is complete
        return {"buckets": len(buckets)}


class RankBucketsStage(_RankInputs):
    name = "rank_buckets"

    def task_ids(self) -> list[str]:
        return [str(i) for i in range(self.buckets())]

    def reset(self) -> None:
        for path in self.run_dir.scratch_dir("rank").glob("summary_*.parquet"):
            path.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        clusters = summarise_bucket(self.bucket_path(int(task_id)), self.summary_path(int(task_id)), self.by)
        progress(1)
        return {"clusters": clusters}


class RankStage(_RankInputs):
    """The last step, one task: the bucket summaries merged into top_duplicates.parquet."""

    name = "rank"

    def task_ids(self) -> list[str]:
        return ["0"]

    def reset(self) -> None:
        self.run_dir.top_duplicates.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        summaries = [self.summary_path(i) for i in range(self.buckets())]
        lost = [path.name for path in summaries if not path.exists()]
        if not summaries or lost:
            raise StoreError(f"the rank scratch in {self.scratch('')} is incomplete ({len(lost)} summaries missing)",
                             hint="rerun the same command: the rank steps redo what is missing")
        ranked = write_merged(self.run_dir.top_duplicates, summaries, self.by)
        shutil.rmtree(self.run_dir.scratch_dir("rank"), ignore_errors=True)
        progress(ranked)
        return {"clusters_ranked": ranked}


def require_clusters(run: RunDir) -> None:
    if not run.clusters.exists():
        raise StoreError(f"{run.root} has no clusters.parquet", hint=f"run 'dedup cluster {run.root}' first")


def forget_lost_outputs(run: RunDir, by: str) -> list[str]:
    """Remove the markers of rank sub-stage tasks whose outputs are gone (top_duplicates.parquet deleted,
    the scratch cleaned up or lost in a crash), so that those tasks run again; returns their names."""
    final, split, buckets = RankStage(run, by), RankSplitStage(run, by), RankBucketsStage(run, by)
    if run.top_duplicates.exists() and run.marker(final.name, "0").exists():
        return []  # done: nothing needs the scratch (removed after the merge)
    lost = [(final.name, "0")]
    count = final.buckets()
    if not count or not all(final.bucket_path(i).exists() for i in range(count)):
        # The split is redone, and every summary with it (bucket numbers follow the new split).
        lost += [(split.name, "0"), *((buckets.name, task) for task in done_task_ids(run, buckets.name))]
    else:
        lost += [(buckets.name, str(i)) for i in range(count) if not final.summary_path(i).exists()]
    return forget_tasks(run, lost)


def run_rank_stages(run: RunDir, by: str) -> dict[str, int]:
    """Split, bucket summaries (one task per bucket) and the merge, each behind the run's engine."""
    require_clusters(run)
    forget_lost_outputs(run, by)
    run_stage(run, RankSplitStage(run, by))
    run_stage(run, RankBucketsStage(run, by), unit="buckets")
    report = run_stage(run, RankStage(run, by), unit="clusters")
    return {k: int(v) for k, v in report.stats.items()}


# Rows of the ranking `rank` hands back (to print, to test): the whole one is OUT/top_duplicates.parquet, which
# at LAION-2B holds ~3e8 clusters, far more than a caller should hold as one frame.
RETURNED_ROWS = 100_000


def rank(run: Run) -> pd.DataFrame:
    """Rank behind the engine; returns the first RETURNED_ROWS of the ranking (read back when it was done)."""
    run_rank_stages(run, run.settings.rank_by)
    return ranking_head(run, RETURNED_ROWS)


def ranking_head(run: RunDir, rows: int) -> pd.DataFrame:
    """The first `rows` rows of top_duplicates.parquet, read batch by batch (never the whole file)."""
    import pyarrow as pa

    handle = pq.ParquetFile(run.top_duplicates)
    batches, read = [], 0
    for batch in handle.iter_batches(batch_size=min(rows, 65_536) or 1):
        batches.append(batch)
        read += batch.num_rows
        if read >= rows:
            break
    return pa.Table.from_batches(batches, schema=handle.schema_arrow).slice(0, rows).to_pandas()
