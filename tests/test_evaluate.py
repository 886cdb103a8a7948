"""dedup.stages.evaluate on small hand-made clusters and truth tables whose answers are worked out by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dedup.errors import DedupError
from dedup.stages.evaluate import (
    bcubed_f1,
    copy_count_spearman,
    evaluate,
    evaluate_run,
    hard_negative_merges,
    joined,
    largest_groups,
    load_truth,
    pair_scores,
    recall_by_family,
)


def make_clusters(clusters: list[list[str]]) -> pd.DataFrame:
    """One row per key; cluster_id is the cluster's position, cluster_size its length."""
    rows = [{"key": key, "cluster_id": index, "cluster_size": len(members)}
            for index, members in enumerate(clusters) for key in members]
    return pd.DataFrame(rows)


def make_truth(groups: dict[str, list[str]], families: dict[str, str] | None = None) -> pd.DataFrame:
    rows = [{"key": key, "group_id": group, "family": (families or {}).get(key, "original")}
            for group, keys in groups.items() for key in keys]
    return pd.DataFrame(rows)


# Truth: A = {a1, a2, a3}, B = {b1, b2}, C = {c1}  ->  3 + 1 = 4 true pairs.
# Clusters: {a1, a2, a3, c1}, {b1}, {b2}  ->  6 predicted pairs, 3 of them true.
GROUPS = {"A": ["a1", "a2", "a3"], "B": ["b1", "b2"], "C": ["c1"]}
CLUSTERS = [["a1", "a2", "a3", "c1"], ["b1"], ["b2"]]


@pytest.fixture
def frame() -> pd.DataFrame:
    return joined(make_clusters(CLUSTERS), make_truth(GROUPS))


def test_pair_scores_count_pairs_from_the_contingency_table(frame: pd.DataFrame) -> None:
    scores = pair_scores(frame)
    assert scores["true_pairs"] == 4
    assert scores["predicted_pairs"] == 6
    assert scores["pair_precision"] == pytest.approx(3 / 6)
    assert scores["pair_recall"] == pytest.approx(3 / 4)
    assert scores["pair_f1"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)


def test_pair_scores_without_predicted_or_true_pairs_are_perfect() -> None:
    frame = joined(make_clusters([["x"], ["y"]]), make_truth({"X": ["x"], "Y": ["y"]}))
    scores = pair_scores(frame)
    assert (scores["pair_precision"], scores["pair_recall"], scores["pair_f1"]) == (1.0, 1.0, 1.0)


def test_bcubed_averages_per_sample_precision_and_recall(frame: pd.DataFrame) -> None:
    scores = bcubed_f1(frame)
    # precision: a* 3/4 each, c1 1/4, b1 and b2 1 each -> 4.5 / 6; recall: a* 1, c1 1, b* 1/2 -> 5 / 6
    assert scores["bcubed_precision"] == pytest.approx(0.75)
    assert scores["bcubed_recall"] == pytest.approx(5 / 6)
    assert scores["bcubed_f1"] == pytest.approx(2 * 0.75 * (5 / 6) / (0.75 + 5 / 6))


def test_recall_by_family_counts_found_partners_and_skips_hard_negatives() -> None:
    truth = make_truth({"A": ["a1", "a2", "a3"], "N": ["n1"]},
                       {"a1": "original", "a2": "benign", "a3": "hard", "n1": "hard_negative"})
    frame = joined(make_clusters([["a1", "a2", "n1"], ["a3"]]), truth)
    recall = recall_by_family(frame)
    # a1 and a2 each find 1 of their 2 partners; a3 finds neither.
    assert recall == pytest.approx({"original": 0.5, "benign": 0.5, "hard": 0.0})
    assert "hard_negative" not in recall


def test_hard_negative_merges_count_negatives_sharing_a_cluster_with_another_group() -> None:
    truth = make_truth({"A": ["a1", "a2"], "N1": ["n1"], "N2": ["n2"]},
                       {"n1": "hard_negative", "n2": "hard_negative"})
    frame = joined(make_clusters([["a1", "a2", "n1"], ["n2"]]), truth)
    assert hard_negative_merges(frame) == 1
    alone = joined(make_clusters([["a1", "a2"], ["n1"], ["n2"]]), truth)
    assert hard_negative_merges(alone) == 0


def test_largest_groups_report_the_size_of_the_cluster_holding_most_of_each_group() -> None:
    truth = make_truth({"A": ["a1", "a2", "a3", "a4"], "B": ["b1", "b2"], "C": ["c1"]})
    # A: three members in a cluster of 5 (c1 and an unlabelled key x9 ride along), a4 elsewhere.
    clusters = make_clusters([["a1", "a2", "a3", "c1", "x9"], ["a4", "b1", "b2"]])
    top = largest_groups(joined(clusters, truth), top=2).set_index("group_id")
    assert list(top.index) == ["A", "B"]
    assert top.loc["A", "true_copies"] == 4
    assert top.loc["A", "reported_copies"] == 5
    assert top.loc["A", "relative_error"] == pytest.approx(0.25)
    assert top.loc["B", "reported_copies"] == 3
    assert top.loc["B", "relative_error"] == pytest.approx(0.5)


def test_spearman_is_one_when_reported_sizes_rank_like_true_sizes() -> None:
    truth = make_truth({"A": ["a1", "a2", "a3"], "B": ["b1", "b2"], "C": ["c1"]})
    perfect = joined(make_clusters([["a1", "a2", "a3"], ["b1", "b2"], ["c1"]]), truth)
    assert copy_count_spearman(perfect) == pytest.approx(1.0)
    reversed_sizes = joined(make_clusters([["a1"], ["a2"], ["a3"], ["b1", "b2"], ["c1", "x1", "x2"]]), truth)
    assert copy_count_spearman(reversed_sizes) < 0


def test_spearman_is_nan_when_every_reported_size_is_equal() -> None:
    truth = make_truth({"A": ["a1", "a2"], "B": ["b1"]})
    frame = joined(make_clusters([["a1"], ["a2"], ["b1"]]), truth)
    assert math.isnan(copy_count_spearman(frame))


def test_evaluate_drops_bad_samples_and_scores_a_perfect_clustering() -> None:
    truth = make_truth({"A": ["a1", "a2"], "B": ["b1"], "bad:0": ["z1"]}, {"z1": "bad"})
    # z1 sits in A's cluster; as a bad sample it must not count as a false pair.
    metrics = evaluate(make_clusters([["a1", "a2", "z1"], ["b1"]]), truth)
    assert metrics["samples"] == 3
    assert metrics["pair_precision"] == 1.0
    assert metrics["pair_recall"] == 1.0
    assert metrics["bcubed_f1"] == pytest.approx(1.0)
    assert metrics["hard_negative_merges"] == 0


def test_evaluate_ignores_cluster_rows_without_truth() -> None:
    truth = make_truth({"A": ["a1", "a2"]})
    metrics = evaluate(make_clusters([["a1", "a2"], ["stray1", "stray2"]]), truth)
    assert metrics["samples"] == 2
    assert metrics["predicted_pairs"] == 1
    assert metrics["top10_mean_relative_error"] == 0.0


def test_load_truth_rejects_a_table_missing_columns(tmp_path) -> None:
    path = tmp_path / "truth.parquet"
    pd.DataFrame({"key": ["a", "b"], "family": ["original", "benign"]}).to_parquet(path)
    with pytest.raises(DedupError, match="group_id"):
        load_truth(path)


def test_load_truth_fills_a_missing_family_column(tmp_path) -> None:
    path = tmp_path / "truth.parquet"
    pd.DataFrame({"key": ["a", "b"], "group_id": ["g", "g"]}).to_parquet(path)
    assert load_truth(path)["family"].tolist() == ["unknown", "unknown"]


def test_joined_rejects_truth_that_shares_no_key_with_the_run() -> None:
    with pytest.raises(DedupError, match="no key"):
        joined(make_clusters([["a1"]]), make_truth({"B": ["b1"]}))


def test_evaluate_run_needs_clusters(tmp_path) -> None:
    truth_path = tmp_path / "truth.parquet"
    make_truth({"A": ["a1"]}).to_parquet(truth_path)
    with pytest.raises(DedupError, match=r"clusters\.parquet"):
        evaluate_run(tmp_path / "run", truth_path)
