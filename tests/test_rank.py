"""Ranking: caption sameness, verbatim copies and the memorisation-risk score; `--by copies|risk`."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from dedup.cli import app
from dedup.errors import DedupError
from dedup.run import Run
from dedup.settings import Settings
from dedup.stages.rank import normalise_caption, rank, rank_clusters, risk_score


def _members(cluster_id: int, captions: list, urls: list[str]) -> list[dict]:
    return [
        {"sample_id": cluster_id + i, "cluster_id": cluster_id, "cluster_size": len(captions), "is_representative": i == 0,
         "caption": caption, "url": url, "shard_index": i % 2, "key": f"k{cluster_id + i}"}
        for i, (caption, url) in enumerate(zip(captions, urls, strict=False))
    ]


def test_normalise_caption_ignores_case_punctuation_and_spacing():
    assert normalise_caption("Photo of a CAT!!  ") == normalise_caption("photo of a cat") == "photo of a cat"
    assert normalise_caption("photo-of_a cat") == "photo of a cat"
    assert normalise_caption(None) is None and normalise_caption(" ... ") is None
    assert normalise_caption("a dog") != normalise_caption("a cat")


def test_caption_sameness_and_verbatim_copies_count_the_representatives_caption():
    clusters = pd.DataFrame(_members(100, ["A cat.", "a cat", "A  CAT!", "a dog", None], ["https://a.com/1"] * 5))
    row = rank_clusters(clusters).iloc[0]
    assert row["verbatim_copies"] == 3
    assert row["caption_sameness"] == pytest.approx(3 / 5)


def test_missing_representative_caption_is_never_verbatim():
    clusters = pd.DataFrame(_members(100, [None, None, "x"], ["https://a.com/1"] * 3))
    assert rank_clusters(clusters).iloc[0]["verbatim_copies"] == 0


def test_risk_follows_the_documented_formula_and_can_reorder():
    template = _members(0, [f"caption {i}" for i in range(10)], ["https://shop.com/x"] * 10)  # many copies, one site
    verbatim = _members(1000, ["the same caption"] * 6, [f"https://site{i}.org/a.jpg" for i in range(6)])
    clusters = pd.DataFrame(template + verbatim)
    by_copies, by_risk = rank_clusters(clusters, "copies"), rank_clusters(clusters, "risk")
    assert by_copies["cluster_id"].tolist() == [0, 1000]
    assert by_risk["cluster_id"].tolist() == [1000, 0] and by_risk["rank"].tolist() == [1, 2]
    row = by_risk.iloc[0]
    assert row["risk"] == pytest.approx(math.log1p(6) * (0.5 + 1.0) * (1 + math.log10(6)))
    assert row["risk"] == pytest.approx(risk_score(row["copies"], row["caption_sameness"], row["url_domains"]))


def test_unknown_order_is_a_user_error(tmp_path):
    with pytest.raises(DedupError, match="ranking order"):
        Settings(rank_by="size").validated()


@pytest.fixture(scope="module")
def demo_run(demo_copy):
    return demo_copy  # a private copy of the shared demo run


def test_demo_ranking_has_the_new_columns_and_sorts_by_risk(demo_run):
    ranking = rank(Run.open(demo_run.root, rank_by="risk"))
    assert {"caption_sameness", "verbatim_copies", "risk"} <= set(ranking.columns)
    assert ranking["risk"].is_monotonic_decreasing
    assert ((ranking["caption_sameness"] >= 0) & (ranking["caption_sameness"] <= 1)).all()
    assert (ranking["verbatim_copies"] <= ranking["copies"]).all()
    # The demo's captions vary per copy ("Photo of ...", "Buy ..."), and some copies repeat the caption exactly.
    assert ranking["verbatim_copies"].max() >= 2 and ranking["caption_sameness"].min() < 1
    stored = pd.read_parquet(demo_run.top_duplicates)
    pd.testing.assert_frame_equal(stored, ranking)


def test_cli_rank_by_risk(demo_run):
    result = CliRunner().invoke(app, ["rank", str(demo_run.root), "--by", "risk", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "risk" in result.output
    bad = CliRunner().invoke(app, ["rank", str(demo_run.root), "--by", "size"])
    assert bad.exit_code == 2 and "--by copies" in bad.output


def test_ranking_reads_only_clusters_with_copies_and_ranks_as_over_the_whole_table(demo_session_run):
    from dedup.stages.rank import read_copies

    run = demo_session_run[0]
    whole = pd.read_parquet(run.clusters)
    copies = read_copies(run.clusters)
    assert len(copies) == int((whole["cluster_size"] >= 2).sum()) < len(whole)
    for by in ("copies", "risk"):
        pd.testing.assert_frame_equal(rank_clusters(copies, by), rank_clusters(whole, by))
    pd.testing.assert_frame_equal(pd.read_parquet(run.top_duplicates), rank_clusters(whole, "copies"))


# ---------------------------------------------------------------- bounded memory: buckets, merged summaries


def _random_clusters(path, seed: int = 4, n_clusters: int = 300):
    """A clusters.parquet with many ties: equal sizes, equal captions (equal risk), singletons between, shuffled rows."""
    import numpy as np

    from dedup.records import CLUSTERS, write_record

    rng = np.random.default_rng(seed)
    rows, next_id = [], 0
    for c in range(n_clusters):
        size = int(rng.choice([1, 1, 2, 2, 2, 3, 5]))
        cluster_id = (int(rng.integers(0, 4)) << 32) + next_id
        captions = rng.choice(["a cat", "A cat!", "a dog", None], size)
        for i in range(size):
            rows.append({"sample_id": cluster_id + i, "shard_index": int((cluster_id >> 32) + i % 2), "shard": "s.tar",
                         "key": f"k{c}-{i}", "url": None if i == 3 else f"https://site{int(rng.integers(0, 3))}.org/{c}/{i}",
                         "caption": captions[i], "status": "ok", "cluster_id": cluster_id, "cluster_size": size,
                         "is_representative": i == 0, "similarity_to_representative": 1.0, "matched_by": "self"})
        next_id += size
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    write_record(frame, path, CLUSTERS)
    return frame


class _FrameSpy:
    """Records the largest member table `cluster_summaries` is given."""

    def __init__(self, monkeypatch) -> None:
        from dedup.stages import rank as rank_module

        self.largest, original = 0, rank_module.cluster_summaries

        def spy(frame):
            self.largest = max(self.largest, len(frame))
            return original(frame)

        monkeypatch.setattr(rank_module, "cluster_summaries", spy)


@pytest.mark.parametrize(("bucket_rows", "max_buckets"), [(120, 512), (120, 3), (10_000, 512)])
@pytest.mark.parametrize("by", ["copies", "risk"])
def test_bounded_ranking_equals_the_whole_table_one(tmp_path, monkeypatch, bucket_rows, max_buckets, by):
    import oracles

    from dedup.records import RunDir
    from dedup.stages import rank as rank_module

    run = RunDir(tmp_path / "run")
    frame = _random_clusters(run.clusters)
    members = int((frame["cluster_size"] >= 2).sum())
    expected = oracles.ranking_of(run.clusters, by)
    assert expected[by].duplicated().any()  # ties, broken by copies then cluster id
    monkeypatch.setattr(rank_module, "BUCKET_ROWS", bucket_rows)
    monkeypatch.setattr(rank_module, "MAX_BUCKETS", max_buckets)
    spy = _FrameSpy(monkeypatch)
    assert rank_module.write_ranking(run, by) == len(expected)
    pd.testing.assert_frame_equal(pd.read_parquet(run.top_duplicates), expected)
    if bucket_rows < members and max_buckets > 3:
        assert spy.largest <= 3 * bucket_rows < members  # no table of every member with copies
    assert not any(run.scratch_dir("rank").rglob("*.parquet"))  # buckets and summaries removed


def test_bounded_ranking_writes_the_contract_schema(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from dedup.records import TOP_DUPLICATES, RunDir
    from dedup.stages import rank as rank_module

    run = RunDir(tmp_path / "run")
    _random_clusters(run.clusters)
    monkeypatch.setattr(rank_module, "BUCKET_ROWS", 120)
    rank_module.write_ranking(run, "risk")
    assert pq.read_schema(run.top_duplicates).remove_metadata().equals(TOP_DUPLICATES.remove_metadata())
    assert pq.ParquetFile(run.top_duplicates).metadata.num_row_groups > 1  # written in merged chunks


def _rank_context(root):
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings

    return Run(root, Settings(engine=EngineSettings(show_progress=False), rank_by="risk"))


def test_rank_sub_stages_equal_the_whole_table_ranking_and_redo_what_is_lost(tmp_path, monkeypatch):
    import oracles

    from dedup.engine import run_stage
    from dedup.stages import rank as rank_module

    run = _rank_context(tmp_path / "run")
    _random_clusters(run.clusters)
    expected = oracles.ranking_of(run.clusters, "risk")
    monkeypatch.setattr(rank_module, "BUCKET_ROWS", 120)
    pd.testing.assert_frame_equal(rank(run), expected)
    markers = run.root / "_markers"
    assert len(list((markers / "rank_buckets").glob("*.done"))) == rank_module.bucket_count(
        int((pd.read_parquet(run.clusters)["cluster_size"] >= 2).sum())) > 2
    assert not run.scratch_dir("rank").exists()  # removed once merged
    # 1. the ranking deleted under its marker: every step redone, the same answer.
    run.top_duplicates.unlink()
    pd.testing.assert_frame_equal(rank(run), expected)
    # 2. a crash after the split and the bucket tasks, then a lost summary: only that bucket is redone.
    stages = [rank_module.RankSplitStage(run, "risk"), rank_module.RankBucketsStage(run, "risk")]
    run.top_duplicates.unlink()
    for marker in markers.glob("rank*/*.done"):
        marker.unlink()
    for stage in stages:
        run_stage(run, stage)
    summaries = {p.name: p.stat().st_mtime_ns for p in run.scratch_dir("rank").glob("summary_*.parquet")}
    run.scratch_dir("rank").joinpath("summary_1.parquet").unlink()
    assert rank_module.forget_lost_outputs(run, "risk") == ["rank_buckets/1"]
    for stage in stages:
        run_stage(run, stage)
    changed = [p.name for p in run.scratch_dir("rank").glob("summary_*.parquet") if p.stat().st_mtime_ns != summaries.get(p.name)]
    assert changed == ["summary_1.parquet"]
    # 3. a lost bucket file: the split and every summary are redone.
    run.scratch_dir("rank").joinpath("bucket_0.parquet").unlink()
    assert "rank_split/0" in rank_module.forget_lost_outputs(run, "risk")
    pd.testing.assert_frame_equal(rank(run), expected)
    # 4. done, scratch gone: nothing reruns.
    stamp = (markers / "rank" / "0.done").stat().st_mtime_ns
    rank(run)
    assert (markers / "rank" / "0.done").stat().st_mtime_ns == stamp


def test_ranking_of_clusters_without_copies_is_the_empty_contract_table(tmp_path):
    import oracles

    from dedup.records import CLUSTERS, write_record

    run = _rank_context(tmp_path / "run")
    frame = pd.DataFrame(_members(100, ["a"], ["https://a.com/1"]))  # one singleton
    frame = frame.assign(shard="s.tar", status="ok", similarity_to_representative=1.0, matched_by="self")
    write_record(frame, run.clusters, CLUSTERS)
    ranking = rank(run)
    assert ranking.empty and list(ranking.columns) == list(oracles.ranking_of(run.clusters).columns)
    pd.testing.assert_frame_equal(ranking, oracles.ranking_of(run.clusters))


@pytest.mark.parametrize("rows", [0, 1, 7, 10_000])
def test_the_returned_ranking_is_the_head_of_the_file_read_batch_by_batch(tmp_path, monkeypatch, rows):
    """`rank` hands back at most RETURNED_ROWS (a LAION-2B ranking holds ~3e8 clusters): the file's first rows."""
    from dedup.records import RunDir
    from dedup.stages import rank as rank_module

    run = RunDir(tmp_path / "run")
    _random_clusters(run.clusters)
    monkeypatch.setattr(rank_module, "BUCKET_ROWS", 120)
    total = rank_module.write_ranking(run, "copies")
    whole = pd.read_parquet(run.top_duplicates)
    head = rank_module.ranking_head(run, rows)
    assert total > 7 and len(head) == min(rows, total)
    pd.testing.assert_frame_equal(head, whole.head(rows))
