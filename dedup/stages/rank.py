"""Rank stage: clusters.parquet -> top_duplicates.parquet (largest clusters first)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pandas as pd

from dedup.engine import run_stage
from dedup.errors import StoreError
from dedup.records import TOP_DUPLICATES, RunDir, fingerprint, write_record
from dedup.run import Run

TOP_COLUMNS = TOP_DUPLICATES.names  # the contract lives in dedup/records.py


def url_domain(url: object) -> str | None:
    if not isinstance(url, str) or not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.lower().removeprefix("www.") if host else None


def rank_clusters(clusters: pd.DataFrame) -> pd.DataFrame:
    """One row per cluster of >= 2 members: copies, caption/domain/shard spread."""
    dups = clusters[clusters["cluster_size"] >= 2].copy()
    if dups.empty:
        return TOP_DUPLICATES.empty_table().to_pandas()
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
    summary = summary.reset_index().sort_values(["copies", "cluster_id"], ascending=[False, True])
    summary.insert(0, "rank", range(1, len(summary) + 1))
    return summary[TOP_COLUMNS].reset_index(drop=True)



class RankStage:
    """One task: clusters.parquet -> top_duplicates.parquet."""

    name = "rank"

    def __init__(self, run: RunDir) -> None:
        self.run_dir = run

    def task_ids(self) -> list[str]:
        return ["0"]

    def fingerprint(self) -> str:
        return fingerprint([self.run_dir.clusters])

    def reset(self) -> None:
        self.run_dir.top_duplicates.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        if not self.run_dir.clusters.exists():
            raise StoreError(f"{self.run_dir.root} has no clusters.parquet",
                             hint=f"run 'dedup cluster {self.run_dir.root}' first")
        ranking = rank_clusters(pd.read_parquet(self.run_dir.clusters))
        write_record(ranking, self.run_dir.top_duplicates, TOP_DUPLICATES)
        return {"clusters_ranked": len(ranking)}

    def close(self) -> None:
        pass


def rank(run: Run) -> pd.DataFrame:
    """Rank behind the engine; returns the ranking (read back when the stage was already done)."""
    run_stage(run, RankStage(run))
    return pd.read_parquet(run.top_duplicates)
