"""`dedup eval`: score a run's clusters against labelled ground truth.

Truth: a parquet with `key` and `group_id` (samples sharing a group_id are
copies of one image), optionally `family` (`original`, `benign`, `hard`,
`hard_negative`, `bad`) for per-family recall and hard-negative merges.
Pair counts come from the cluster x group contingency table, so no pair list
is ever materialised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dedup.errors import DedupError
from dedup.records import RunDir


def _pairs(counts: pd.Series | np.ndarray) -> float:
    values = np.asarray(counts, dtype=np.float64)
    return float((values * (values - 1) / 2).sum())


def load_truth(path: str | Path) -> pd.DataFrame:
    try:
        truth = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid is a ValueError, a missing file an OSError
        raise DedupError(f"cannot read {path} as a Parquet truth table: {exc}",
                         hint="pass a .parquet file with 'key' and 'group_id' columns (e.g. the demo's truth.parquet)") from None
    missing = {"key", "group_id"} - set(truth.columns)
    if missing:
        raise DedupError(f"{path} lacks columns {sorted(missing)}", hint="the truth table needs 'key' and 'group_id' columns")
    if "family" not in truth.columns:
        truth["family"] = "unknown"
    return truth


def joined(clusters: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    frame = truth.merge(clusters[["key", "cluster_id", "cluster_size"]], on="key", how="inner")
    if frame.empty:
        raise DedupError("no key of the truth table is in the run", hint="check that the truth table describes these shards")
    return frame[frame["family"] != "bad"].copy()


def pair_scores(frame: pd.DataFrame) -> dict[str, float]:
    together = _pairs(frame.groupby(["cluster_id", "group_id"]).size())
    predicted = _pairs(frame.groupby("cluster_id").size())
    actual = _pairs(frame.groupby("group_id").size())
    precision = together / predicted if predicted else 1.0
    recall = together / actual if actual else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"pair_precision": precision, "pair_recall": recall, "pair_f1": f1, "true_pairs": actual, "predicted_pairs": predicted}


def bcubed_f1(frame: pd.DataFrame) -> dict[str, float]:
    cell = frame.groupby(["cluster_id", "group_id"])["key"].transform("size")
    cluster_size = frame.groupby("cluster_id")["key"].transform("size")
    group_size = frame.groupby("group_id")["key"].transform("size")
    precision = float((cell / cluster_size).mean())
    recall = float((cell / group_size).mean())
    return {"bcubed_precision": precision, "bcubed_recall": recall, "bcubed_f1": 2 * precision * recall / (precision + recall)}


def recall_by_family(frame: pd.DataFrame) -> dict[str, float]:
    """Per family: of the true partners of its samples, the share found in the same cluster."""
    cell = frame.groupby(["cluster_id", "group_id"])["key"].transform("size") - 1
    partners = frame.groupby("group_id")["key"].transform("size") - 1
    result = {}
    for family, rows in frame.assign(found=cell, partners=partners).groupby("family"):
        if rows["partners"].sum() > 0 and family not in ("hard_negative",):
            result[str(family)] = float(rows["found"].sum() / rows["partners"].sum())
    return result


def hard_negative_merges(frame: pd.DataFrame) -> int:
    """Hard negatives that share a cluster with a sample of another group."""
    groups_per_cluster = frame.groupby("cluster_id")["group_id"].nunique()
    negatives = frame[frame["family"] == "hard_negative"]
    return int((negatives["cluster_id"].map(groups_per_cluster) > 1).sum())


def largest_groups(frame: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """True size of the largest groups beside the size the run reports for them."""
    sizes = frame.groupby("group_id").size().sort_values(ascending=False).head(top)
    rows = []
    for group_id, true_size in sizes.items():
        members = frame[frame["group_id"] == group_id]
        # The cluster holding most of the group stands for it (what a user would look at).
        main_cluster = members["cluster_id"].value_counts().idxmax()
        reported = int(members.loc[members["cluster_id"] == main_cluster, "cluster_size"].iloc[0])
        rows.append({"group_id": group_id, "true_copies": int(true_size), "reported_copies": reported,
                     "relative_error": abs(reported - true_size) / true_size})
    return pd.DataFrame(rows)


def copy_count_spearman(frame: pd.DataFrame) -> float:
    true_counts = frame.groupby("group_id")["key"].transform("size")
    reported = frame["cluster_size"]
    if true_counts.nunique() < 2 or reported.nunique() < 2:
        return float("nan")
    return float(true_counts.rank().corr(reported.rank()))


def evaluate(clusters: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    frame = joined(clusters, truth)
    top = largest_groups(frame)
    return {
        "samples": int(len(frame)),
        **pair_scores(frame),
        **bcubed_f1(frame),
        "recall_by_family": recall_by_family(frame),
        "hard_negative_merges": hard_negative_merges(frame),
        "top10_mean_relative_error": float(top["relative_error"].mean()) if len(top) else 0.0,
        "top10": top.to_dict("records"),
        "copy_count_spearman": copy_count_spearman(frame),
    }


def evaluate_run(out: str | Path, truth_path: str | Path) -> dict[str, Any]:
    run = RunDir(out)
    if not run.clusters.exists():
        raise DedupError(f"{run.root} has no clusters.parquet", hint=f"run 'dedup run' or 'dedup cluster {run.root}' first")
    return evaluate(pd.read_parquet(run.clusters), load_truth(truth_path))
