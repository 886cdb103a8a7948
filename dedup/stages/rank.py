"""Rank stage: clusters.parquet -> top_duplicates.parquet (largest clusters first, or riskiest with --by risk).

Memorisation risk (see docs_risk.md for the reasons):

    risk = log1p(copies) * (0.5 + caption_sameness) * (1 + log10(max(url_domains, 1)))

`caption_sameness` is the share of a cluster's members whose normalised caption
(lowercase, punctuation removed, whitespace collapsed) equals the
representative's; `verbatim_copies` counts those members (Webster et al.'s
"verbatim" copies: same image, same caption).
"""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

import pandas as pd

from dedup.engine import run_stage
from dedup.errors import DedupError, StoreError
from dedup.records import TOP_DUPLICATES, RunDir, fingerprint, write_record
from dedup.run import Run

TOP_COLUMNS = TOP_DUPLICATES.names  # the contract lives in dedup/records.py

RANK_ORDERS = ("copies", "risk")
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
    summary = summary.join(_caption_columns(dups))
    summary["risk"] = [risk_score(*v) for v in zip(summary["copies"], summary["caption_sameness"], summary["url_domains"], strict=False)]
    summary = summary.reset_index().sort_values([by, "copies", "cluster_id"], ascending=[False, False, True])
    summary.insert(0, "rank", range(1, len(summary) + 1))
    return summary[TOP_COLUMNS].reset_index(drop=True)


# What `rank_clusters` reads of a member.
RANK_COLUMNS = ["sample_id", "shard_index", "key", "url", "caption", "cluster_id", "cluster_size", "is_representative"]


def read_copies(path) -> pd.DataFrame:
    """The rows of clusters with copies, the columns ranking reads: singletons (most samples) are
    filtered out while the file is scanned, never loaded."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=RANK_COLUMNS, filters=[("cluster_size", ">=", 2)]).to_pandas()


def check_order(by: str) -> str:
    if by not in RANK_ORDERS:
        raise DedupError(f"unknown ranking order {by!r}", hint="use --by copies or --by risk")
    return by


class RankStage:
    """One task: clusters.parquet -> top_duplicates.parquet."""

    name = "rank"

    def __init__(self, run: RunDir, by: str = "copies") -> None:
        self.run_dir, self.by = run, check_order(by)

    def task_ids(self) -> list[str]:
        return ["0"]

    def fingerprint(self) -> str:
        return fingerprint([self.run_dir.clusters], {"by": self.by})

    def reset(self) -> None:
        self.run_dir.top_duplicates.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        if not self.run_dir.clusters.exists():
            raise StoreError(f"{self.run_dir.root} has no clusters.parquet",
                             hint=f"run 'dedup cluster {self.run_dir.root}' first")
        ranking = rank_clusters(read_copies(self.run_dir.clusters), self.by)
        write_record(ranking, self.run_dir.top_duplicates, TOP_DUPLICATES)
        return {"clusters_ranked": len(ranking)}

    def close(self) -> None:
        pass


def rank(run: Run) -> pd.DataFrame:
    """Rank behind the engine; returns the ranking (read back when the stage was already done)."""
    run_stage(run, RankStage(run, run.settings.rank_by))
    return pd.read_parquet(run.top_duplicates)
