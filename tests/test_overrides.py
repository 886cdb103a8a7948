"""Review overrides: OUT/overrides.parquet, written by `dedup review`, respected by cluster and manifests.

The tests share one demo run; the one that records decisions runs last.
"""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from dedup import pipeline
from dedup.cli import app
from dedup.errors import DedupError
from dedup.records import RunDir, load_samples
from dedup.run import Run
from dedup.stages.cluster import cluster
from dedup.stages.manifests import manifests_stage
from dedup.stages.overrides import OVERRIDES_SCHEMA, load_overrides, overrides_path, review_row
from dedup.stages.report import build_report_html

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(demo_copy):
    return demo_copy  # a private copy of the shared demo run


def _review(run: RunDir, *args: str) -> None:
    result = runner.invoke(app, ["review", str(run.root), *args])
    assert result.exit_code == 0, result.output


def _clusters(run: RunDir) -> pd.DataFrame:
    return pd.read_parquet(run.clusters)


def _manifest(run: RunDir) -> pd.DataFrame:
    return pd.read_parquet(run.manifests_dir)  # the dataset reader skips _index.parquet


def test_without_overrides_nothing_changes(demo):
    before = _clusters(demo)
    cluster(Run.open(demo.root))
    pd.testing.assert_frame_equal(_clusters(demo), before)
    assert not overrides_path(demo).exists()
    assert "Review overrides" not in build_report_html(demo.root, top=3)


def test_bad_references_are_user_errors(demo):
    with pytest.raises(DedupError, match="no sample"):
        review_row(demo, "keep", ["no-such-key"])
    with pytest.raises(DedupError, match="no copies"):
        singleton = _clusters(demo).query("cluster_size == 1").iloc[0]
        review_row(demo, "not_duplicate_cluster", [str(int(singleton["cluster_id"]))])
    result = runner.invoke(app, ["review", str(demo.root), "keep"])
    assert result.exit_code == 2 and "not-duplicate-pair" in result.output


def test_all_three_decisions_apply_on_every_rerun_and_show_in_the_report(demo):
    before = _clusters(demo)
    sizes = before.groupby("cluster_id").size().sort_values(ascending=False)
    largest, pair_cluster = int(sizes.index[0]), int(sizes[sizes == 2].index[0])
    pair_keys = before.loc[before["cluster_id"] == pair_cluster, "key"].tolist()
    pinned_cluster = int(sizes.index[1])
    manifest = _manifest(demo)
    not_kept = manifest[(manifest["cluster_id"] == pinned_cluster) & ~manifest["keep"]].iloc[0]

    _review(demo, "not-duplicate-cluster", str(largest), "--note", "<b>distinct</b> shots")
    _review(demo, "not-duplicate-pair", *pair_keys)
    _review(demo, "keep", f"id:{int(not_kept['sample_id'])}")
    table = load_overrides(demo)
    assert list(table.columns) == OVERRIDES_SCHEMA.names and len(table) == 3

    for _ in range(2):  # and again: the file is re-read on every rerun
        cluster(Run.open(demo.root))
        manifests_stage(Run.open(demo.root))
        after = _clusters(demo)
        reviewed = after[after["sample_id"].isin(before.loc[before["cluster_id"] == largest, "sample_id"])]
        # No two reviewed members share a cluster now, except byte-identical ones: identical bytes are one
        # image whatever a reviewer says (issue 9: identical images always end in one cluster).
        sha = load_samples(demo, ["sample_id", "sha256"]).set_index("sample_id")["sha256"]
        distinct_images = reviewed.assign(sha=reviewed["sample_id"].map(sha)).groupby("cluster_id")["sha"].nunique()
        assert distinct_images.max() == 1
        assert reviewed["cluster_id"].nunique() > 1  # the reviewed cluster did fall apart
        assert after.loc[after["key"].isin(pair_keys), "cluster_size"].tolist() == [1, 1]
        decided = _manifest(demo).set_index("sample_id")
        assert decided.loc[int(not_kept["sample_id"]), "keep"]
        assert decided.loc[int(not_kept["sample_id"]), "reason"] == "kept_by_review"
        assert decided[decided["cluster_id"] == decided.loc[int(not_kept["sample_id"]), "cluster_id"]]["keep"].sum() == 1

    pipeline.rank(Run.open(demo.root))
    page = build_report_html(demo.root, top=5)
    assert "Review overrides" in page and "&lt;b&gt;distinct&lt;/b&gt; shots" in page and "<b>distinct</b>" not in page
    assert f"keep {not_kept['key']}" in page


def test_report_says_when_a_separated_pair_is_still_joined(tmp_path):
    from dedup.stages.overrides import add_override, overrides_section

    run = RunDir(tmp_path)
    pd.DataFrame({"sample_id": [1, 2, 3], "key": ["a", "b", "c"], "cluster_id": [1, 1, 1]}).to_parquet(run.clusters)
    row = {"kind": "not_duplicate_pair", "cluster_id": None, "sample_id_a": 1, "sample_id_b": 2, "keep_sample_id": None,
           "members": [], "note": None, "created_at": "2026-01-01T00:00:00+00:00"}
    add_override(run, row)
    assert "still in one cluster" in overrides_section(run)
    pd.DataFrame({"sample_id": [1, 2, 3], "key": ["a", "b", "c"], "cluster_id": [1, 2, 2]}).to_parquet(run.clusters)
    assert "still in one cluster" not in overrides_section(run)


def test_review_references_are_looked_up_by_filter_not_by_loading_the_clusters(demo, monkeypatch):
    """A review names a few samples of what may be a 2e9-row clusters.parquet: only their rows are read."""
    from dedup.stages.overrides import _keys

    clusters = _clusters(demo)
    pair = clusters[clusters["cluster_size"] >= 2].iloc[:2]

    def whole(*args, **kwargs):
        raise AssertionError("clusters.parquet loaded whole")

    monkeypatch.setattr(pd, "read_parquet", whole)
    keep = review_row(demo, "keep", [f"id:{int(pair['sample_id'].iloc[0])}"])
    assert keep["keep_sample_id"] == int(pair["sample_id"].iloc[0]) and keep["cluster_id"] == int(pair["cluster_id"].iloc[0])
    cluster = review_row(demo, "not_duplicate_cluster", [str(int(pair["cluster_id"].iloc[0]))])
    assert len(cluster["members"]) == int(pair["cluster_size"].iloc[0])
    frame = pd.DataFrame([keep])
    assert _keys(demo, frame) == {keep["keep_sample_id"]: (pair["key"].iloc[0], keep["cluster_id"])}
