"""CLI: exit codes, error messages that name the next step, and JSON output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dedup.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return out


def test_demo_runs_the_whole_pipeline_and_prints_the_top_clusters(demo_out):
    run = demo_out / "run"
    for name in ("clusters.parquet", "top_duplicates.parquet", "remove_keys.parquet", "report/index.html"):
        assert (run / name).exists(), name
    assert (run / "embeddings/perceptual/img_emb/img_emb_0.npy").exists()
    assert (run / "embeddings/perceptual/metadata/metadata_0.parquet").exists()


def test_query_json_is_machine_readable(demo_out):
    import pandas as pd

    top = pd.read_parquet(demo_out / "run" / "top_duplicates.parquet").iloc[0]
    result = runner.invoke(app, ["query", str(demo_out / "run"), "--key", top["representative_key"], "--json"])
    assert result.exit_code == 0, result.output
    (answer,) = json.loads(result.stdout)
    assert answer["copies"] == int(top["copies"])
    assert {m["key"] for m in answer["matches"]} >= {top["representative_key"]}


def test_eval_prints_metrics(demo_out):
    result = runner.invoke(app, ["eval", str(demo_out / "run"), "--truth", str(demo_out / "shards" / "truth.parquet"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["hard_negative_merges"] == 0
    assert metrics["pair_precision"] > 0.95 and metrics["pair_recall"] > 0.85


def test_missing_shards_exit_2_with_a_hint(tmp_path):
    result = runner.invoke(app, ["embed", str(tmp_path / "{00000..00003}.tar"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "hint:" in result.output


def test_unknown_descriptor_names_the_choices(tmp_path, demo_out):
    shard = str(demo_out / "shards" / "00000.tar")
    result = runner.invoke(app, ["embed", shard, "--out", str(tmp_path / "o"), "--descriptor", "sift"])
    assert result.exit_code == 2
    assert "perceptual" in result.output and "clip" in result.output


def test_query_needs_exactly_one_target(demo_out):
    result = runner.invoke(app, ["query", str(demo_out / "run")])
    assert result.exit_code == 2 and "exactly one" in result.output


def test_text_query_without_clip_says_what_to_do(demo_out):
    result = runner.invoke(app, ["query", str(demo_out / "run"), "--text", "a lighthouse"])
    assert result.exit_code == 2 and "--descriptor clip" in result.output


def test_stage_out_of_order_names_the_missing_stage(tmp_path):
    result = runner.invoke(app, ["rank", str(tmp_path)])
    assert result.exit_code == 2 and "dedup cluster" in result.output


def test_bad_keep_policy_is_rejected(demo_out):
    result = runner.invoke(app, ["manifests", str(demo_out / "run"), "--keep", "max-copies=0"])
    assert result.exit_code == 2 and "max-copies=N" in result.output


def test_threshold_below_search_threshold_asks_for_a_new_search(demo_out):
    result = runner.invoke(app, ["cluster", str(demo_out / "run"), "--threshold", "perceptual=0.3"])
    assert result.exit_code == 2 and "dedup neighbors" in result.output


def test_descriptors_lists_the_registry():
    result = runner.invoke(app, ["descriptors"])
    assert result.exit_code == 0
    for name in ("sha256", "perceptual", "clip"):
        assert name in result.output


def test_resumed_run_with_other_shards_is_refused(tmp_path, demo_out):
    run = demo_out / "run"
    result = runner.invoke(app, ["embed", str(demo_out / "shards" / "00000.tar"), "--out", str(run), "--descriptor", "perceptual"])
    assert result.exit_code == 2 and "new --out" in result.output
