"""`dedup compare`: evaluation samples with copies in a training run (real photos split into train and eval)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_run, write_tar
from test_real_dups import _truth

from dedup import pipeline
from dedup import settings as cfg
from dedup.descriptors.perceptual import dihedral_variants
from dedup.errors import DedupError
from dedup.loader import load_removed_keys
from dedup.records import RunDir, load_embeddings
from dedup.run import Run
from dedup.stages.compare import _pair_row, compare, summary_line
from dedup.stages.manifests import REMOVE_COLUMNS

TWO_IN_EVAL = "bridge"  # this group puts two members in eval: their mutual match must not count


def _split(truth: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """First member of every near group (two of TWO_IN_EVAL's) in eval, the rest in train; loners alternate."""
    truth = truth.reset_index(drop=True)
    near = truth[truth["kind"] == "near"]
    rank = near.groupby("group_id").cumcount()
    limit = np.where(near["group_id"].str.contains(TWO_IN_EVAL), 2, 1)
    eval_index = set(near.index[rank < limit])
    loners = truth.index[truth["kind"] != "near"]
    eval_index |= set(loners[::2])
    in_eval = truth.index.isin(sorted(eval_index))
    return truth[~in_eval], truth[in_eval]


def _shards(real_dups, part: pd.DataFrame, root, prefix: str) -> list[str]:
    members = []
    for row in part.itertuples():
        ext = row.file.rsplit(".", 1)[1].lower()
        members.append((f"{row.key}.{ext}", (real_dups / "images" / row.file).read_bytes()))
        members.append((f"{row.key}.txt", row.file.encode()))
    half = len(members) // 4 * 2
    return [str(write_tar(root / f"{prefix}0.tar", members[:half])), str(write_tar(root / f"{prefix}1.tar", members[half:]))]


@pytest.fixture(scope="module")
def split_runs(real_dups, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    train, evaluation = _split(_truth(real_dups))
    train_shards = _shards(real_dups, train, root, "train")
    pipeline.run_all(make_run(root / "train", train_shards, keep="first"), with_report=False)
    eval_shards = _shards(real_dups, evaluation, root, "eval")
    summary = compare(root / "train", root / "cmp", eval_shards=eval_shards, remove_from="train", workers=0)
    table = pd.read_parquet(root / "cmp" / "contamination.parquet")
    return {"root": root, "train": train, "eval": evaluation, "summary": summary, "table": table.merge(evaluation, on="key")}


def _known_cross_copies(train: pd.DataFrame, evaluation: pd.DataFrame) -> pd.Series:
    """Per eval key: does its group have a member in train?"""
    train_groups = set(train.loc[train["kind"] == "near", "group_id"])
    return evaluation.set_index("key").apply(lambda r: r["kind"] == "near" and r["group_id"] in train_groups, axis=1)


def test_one_row_per_eval_sample_with_documented_columns(split_runs):
    table = pd.read_parquet(split_runs["root"] / "cmp" / "contamination.parquet")
    assert list(table.columns) == ["shard", "key", "sample_id", "status", "train_copies", "best_similarity",
                                   "train_cluster_id", "best_train_key", "matched_by"]
    assert sorted(table["key"]) == sorted(split_runs["eval"]["key"])
    assert table["train_copies"].dtype == np.int64


# Crop groups: Kodak images beside their 500x500 crops, Grace Hopper beside Pillow's 128 px crops. The
# perceptual descriptor misses large crops (README, known limits), so they are scored apart.
CROP_GROUPS = ("kodak:", "grace_hopper")


def test_known_cross_set_copies_are_found_and_loners_are_not(split_runs):
    table = split_runs["table"].set_index("key")
    truth = _known_cross_copies(split_runs["train"], split_runs["eval"]).reindex(table.index)
    found = table["train_copies"] > 0
    crops = table["group_id"].str.contains("|".join(CROP_GROUPS))
    missed = table[truth & ~found & ~crops]
    assert missed.empty, f"missed: {missed['file'].tolist()}"
    crop_recall = (found & truth & crops).sum() / (truth & crops).sum()
    assert crop_recall >= 0.6, crop_recall
    false_hits = table[~truth & found]
    assert false_hits.empty, false_hits[["file", "kind", "best_train_key"]]


def test_best_match_lies_in_the_same_group(split_runs):
    table = split_runs["table"]
    hits = table[table["train_copies"] > 0]
    group_of_train = split_runs["train"].set_index("key")["group_id"]
    assert (hits["best_train_key"].map(group_of_train) == hits["group_id"]).all()


def test_train_copies_are_direct_uncapped_matches_against_train_only(split_runs):
    """train_copies equals a brute-force count over the training vectors (eval siblings never count)."""
    root = split_runs["root"]
    threshold = cfg.Settings.load(RunDir(root / "train").run_config).thresholds["perceptual"]
    _, train_vectors = load_embeddings(RunDir(root / "train"), "perceptual")
    eval_ids, eval_vectors = load_embeddings(RunDir(root / "cmp" / "eval_run"), "perceptual")
    similarity = np.max(np.einsum("tnd,md->tnm", dihedral_variants(eval_vectors), train_vectors), axis=0)
    brute = pd.Series((similarity >= threshold).sum(axis=1), index=eval_ids)
    table = split_runs["table"].set_index("sample_id")
    # sha256 matches can only add to the count; the real-dups files hold no byte-identical cross-set copies.
    assert (table["train_copies"] == brute.reindex(table.index)).all()
    bridge = table[table["group_id"].str.contains(TWO_IN_EVAL)]
    assert len(bridge) == 2 and bridge["train_copies"].max() > 10


def test_summary_reports_the_contaminated_share(split_runs):
    summary, table = split_runs["summary"], split_runs["table"]
    assert summary["eval_samples"] == len(table)
    assert summary["contaminated"] == int((table["train_copies"] > 0).sum())
    assert summary["share_contaminated"] == pytest.approx(summary["contaminated"] / len(table), abs=1e-6)
    assert f"{summary['contaminated']:,} of {len(table):,}" in summary_line(summary)


def test_remove_from_train_uses_the_remove_list_schema_and_loader_reads_it(split_runs):
    path = split_runs["root"] / "cmp" / "remove_from_train.parquet"
    removed = pd.read_parquet(path)
    assert list(removed.columns) == REMOVE_COLUMNS
    pairs = pd.read_parquet(split_runs["root"] / "cmp" / "contamination_pairs.parquet")
    direct = removed[removed["reason"] == "eval_copy"]
    assert set(direct["sample_id"]) == set(pairs["train_sample_id"])
    assert {key for _, key, _ in load_removed_keys(path)} == set(removed["key"])


def test_eval_run_mode_gives_the_same_table(split_runs):
    root = split_runs["root"]
    compare(root / "train", root / "cmp2", eval_out=root / "cmp" / "eval_run", with_report=False)
    again = pd.read_parquet(root / "cmp2" / "contamination.parquet")
    pd.testing.assert_frame_equal(again, pd.read_parquet(root / "cmp" / "contamination.parquet"))


def test_report_shows_pairs_side_by_side_and_shares_per_shard(split_runs):
    from dedup.stages.compare import per_shard

    page = (split_runs["root"] / "cmp" / "report" / "index.html").read_text()
    pairs = pd.read_parquet(split_runs["root"] / "cmp" / "contamination_pairs.parquet")
    shards = per_shard(split_runs["table"])
    assert len(shards) == 2 and shards["contaminated"].sum() == split_runs["summary"]["contaminated"]
    assert page.count("<tr>") == min(len(pairs), 200) + 1 + len(shards) + 1
    assert page.count("<img") == 2 * min(len(pairs), 200)
    files = split_runs["eval"].set_index("key")["file"]
    assert all(files[key] in page for key in pairs["eval_key"])  # captions (here: file names) beside the images


def test_report_escapes_keys():
    pair = pd.DataFrame([{"eval_sample_id": 1, "eval_key": "<script>x</script>", "train_sample_id": 2,
                          "train_key": "a'b", "similarity": 0.9, "matched_by": "perceptual", "train_cluster_id": 2,
                          "eval_caption": "<img src=x onerror=alert(1)>", "train_caption": None}])
    row = _pair_row(next(pair.itertuples()), lambda i, alt: "", lambda i, alt: "")
    assert "<script>" not in row and "&lt;script&gt;" in row and "a&#x27;b" in row
    assert "<img" not in row and "&lt;img src=x" in row


def test_needs_exactly_one_eval_source(tmp_path):
    with pytest.raises(DedupError):
        compare(tmp_path, tmp_path / "cmp")


def test_best_match_compares_margins_over_each_descriptors_cut():
    from dedup.stages.compare import best_per_pair

    pairs = pd.DataFrame({"eval_sample_id": [1, 1, 1], "train_sample_id": [5, 6, 6],
                          "similarity": np.array([0.96, 0.90, 0.97], np.float32), "matched_by": ["clip", "perceptual", "clip"]})
    best = best_per_pair(pairs, {"clip": 0.95, "perceptual": 0.6})
    assert best[["train_sample_id", "matched_by"]].values.tolist() == [[6, "perceptual"], [5, "clip"]]


def test_remove_from_eval_lists_the_contaminated_eval_samples(split_runs):
    root = split_runs["root"]
    compare(root / "train", root / "cmp3", eval_out=root / "cmp" / "eval_run", remove_from="eval", with_report=False)
    removed = pd.read_parquet(root / "cmp3" / "remove_from_eval.parquet")
    assert list(removed.columns) == REMOVE_COLUMNS
    assert set(removed["key"]) == set(split_runs["table"].query("train_copies > 0")["key"])
    with pytest.raises(DedupError, match="remove-from"):
        compare(root / "train", root / "cmp4", eval_out=root / "cmp" / "eval_run", remove_from="both")


def test_eval_run_with_other_descriptor_settings_is_refused(split_runs, tmp_path):
    import shutil

    root = split_runs["root"]
    other = tmp_path / "other_eval"
    shutil.copytree(root / "cmp" / "eval_run", other)
    config = cfg.Settings.load(RunDir(other).run_config)
    config.descriptor_options = {"perceptual": {"variant": "other"}}
    Run(other, config).save()
    with pytest.raises(DedupError, match="settings differ"):
        compare(root / "train", tmp_path / "cmp", eval_out=other, with_report=False)


def test_cli_prints_the_summary_line(split_runs, tmp_path):
    from typer.testing import CliRunner

    from dedup.cli import app

    root = split_runs["root"]
    result = CliRunner().invoke(app, ["compare", str(root / "train"), "--eval-run", str(root / "cmp" / "eval_run"),
                                      "--out", str(tmp_path / "c"), "--no-report"])
    assert result.exit_code == 0, result.output
    assert summary_line(split_runs["summary"]) in result.stdout.replace("\n", " ")
    both = CliRunner().invoke(app, ["compare", str(root / "train"), "x.tar", "--eval-run", str(root), "--out", str(tmp_path)])
    assert both.exit_code == 2 and "not both" in both.output


def test_identical_bytes_match_by_sha256(split_runs, real_dups, tmp_path):
    train_row = split_runs["train"][split_runs["train"]["kind"] == "distinct"].iloc[0]
    data = (real_dups / "images" / train_row.file).read_bytes()
    shard = write_tar(tmp_path / "eval.tar", [(f"copy.{train_row.file.rsplit('.', 1)[1]}", data), ("copy.txt", b"x")])
    compare(split_runs["root"] / "train", tmp_path / "cmp", eval_shards=[str(shard)], workers=0, with_report=False)
    row = pd.read_parquet(tmp_path / "cmp" / "contamination.parquet").iloc[0]
    assert row["matched_by"] == "sha256" and row["best_similarity"] == 1.0
    assert row["best_train_key"] == train_row.key and row["train_copies"] >= 1


def test_the_loader_filter_drops_the_training_copies_of_the_eval_set(split_runs):
    import webdataset as wds

    from dedup import DropDuplicates

    root = split_runs["root"]
    removed = pd.read_parquet(root / "cmp" / "remove_from_train.parquet")
    train_removed = pd.read_parquet(root / "train" / "remove_keys.parquet")
    urls = sorted(pd.read_parquet(root / "train" / "shards.parquet")["url"])
    plain = DropDuplicates(root / "train")
    both = DropDuplicates(root / "train", also_remove=[root / "cmp" / "remove_from_train.parquet"])
    kept_plain = {(s["__url__"], s["__key__"]) for s in plain(iter(wds.WebDataset(urls, shardshuffle=False)))}
    kept_both = {(s["__url__"], s["__key__"]) for s in both(iter(wds.WebDataset(urls, shardshuffle=False)))}
    extra = set(zip(removed["shard"], removed["key"], strict=False)) - set(zip(train_removed["shard"], train_removed["key"], strict=False))
    assert extra, "the eval set must hold copies the training run kept"
    assert kept_both == kept_plain - extra


def test_descriptor_pairs_read_the_training_vectors_through_memory_maps(split_runs, monkeypatch):
    """The training side of a compare is a LAION-scale run: its vectors are never loaded whole as float32."""
    import dedup.records as records
    import dedup.stages.compare as compare_stage

    root = split_runs["root"]
    expected = compare_stage.descriptor_pairs(RunDir(root / "train"), RunDir(root / "cmp" / "eval_run"), "perceptual", 0.9)

    def whole(*args, **kwargs):
        raise AssertionError("compare loaded every vector")

    monkeypatch.setattr(records, "load_embeddings", whole)
    monkeypatch.setattr(compare_stage, "load_embeddings", whole, raising=False)
    pairs = compare_stage.descriptor_pairs(RunDir(root / "train"), RunDir(root / "cmp" / "eval_run"), "perceptual", 0.9)
    pd.testing.assert_frame_equal(pairs, expected)
    assert len(pairs) > 10
