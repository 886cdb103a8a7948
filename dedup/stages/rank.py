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
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from dedup.errors import DedupError, StoreError
from dedup.records import RunDir, write_table

TOP_COLUMNS = [
    "rank",
    "cluster_id",
    "copies",
    "representative_key",
    "representative_url",
    "representative_caption",
    "distinct_captions",
    "url_domains",
    "shards_spanned",
    "caption_sameness",
    "verbatim_copies",
    "risk",
]
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
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in TOP_COLUMNS})
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
    summary["risk"] = [risk_score(*v) for v in zip(summary["copies"], summary["caption_sameness"], summary["url_domains"])]
    summary = summary.reset_index().sort_values([by, "copies", "cluster_id"], ascending=[False, False, True])
    summary.insert(0, "rank", range(1, len(summary) + 1))
    return summary[TOP_COLUMNS].reset_index(drop=True)


def _dtype(column: str) -> str:
    if column in ("representative_key", "representative_url", "representative_caption"):
        return "object"
    return "float64" if column in ("caption_sameness", "risk") else "int64"


def check_order(by: str) -> str:
    if by not in RANK_ORDERS:
        raise DedupError(f"unknown ranking order {by!r}", hint="use --by copies or --by risk")
    return by


def rank(out: str | Path, by: str = "copies") -> pd.DataFrame:
    run = RunDir(out)
    check_order(by)
    if not run.clusters.exists():
        raise StoreError(f"{run.root} has no clusters.parquet", hint=f"run 'dedup cluster {run.root}' first")
    ranking = rank_clusters(pd.read_parquet(run.clusters), by)
    write_table(ranking, run.top_duplicates)
    return ranking
