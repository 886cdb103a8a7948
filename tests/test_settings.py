"""dedup/settings.py and dedup/run.py: options parsed once, validated before work, and run.json is the truth."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dedup.cli import app
from dedup.errors import DedupError
from dedup.run import Run
from dedup.settings import Settings, SettingsError, parse_assignments, parse_size
from dedup.stages.query import RunIndex

runner = CliRunner()


def test_guard_follows_the_applied_threshold():
    settings = Settings.build(descriptors=["perceptual"], thresholds={"perceptual": 0.5})
    assert settings.thresholds["perceptual"] == 0.5
    assert settings.guards["perceptual"] == pytest.approx(0.42)
    assert settings.search_thresholds["perceptual"] == pytest.approx(0.46)


def test_a_given_guard_wins_and_survives_a_later_cut_of_another_descriptor():
    settings = Settings.build(descriptors=["perceptual"], thresholds={"perceptual": 0.7}, guards={"perceptual": 0.3})
    assert settings.guards["perceptual"] == 0.3


def test_cluster_cuts_never_lower_the_search_threshold():
    settings = Settings.build(descriptors=["perceptual"])
    searched = settings.search_thresholds["perceptual"]
    assert settings.with_cuts({"perceptual": 0.3}, {}, search=False).search_thresholds["perceptual"] == searched
    assert settings.with_cuts({"perceptual": 0.3}, {}).search_thresholds["perceptual"] == pytest.approx(0.26)


@pytest.mark.parametrize("kwargs", [
    {"thresholds": {"perceptual": 2.0}},
    {"thresholds": {"perceptual": 0.0}},
    {"thresholds": {"clip": 0.9}},  # a descriptor the run does not compute
    {"keep": "random"},
    {"memory": "lots"},
    {"batch_size": 0},
    {"workers": -1},
    {"device": "tpu"},
])
def test_out_of_range_settings_are_refused(kwargs):
    with pytest.raises(DedupError):
        Settings.build(descriptors=["perceptual"], **kwargs)


@pytest.mark.parametrize("text", ["perceptual", "perceptual=high", "=0.5", "perceptual=nan"])
def test_bad_assignments_are_refused(text):
    with pytest.raises(SettingsError):
        parse_assignments([text], "threshold")


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "", "GB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(SettingsError):
        parse_size(text)


def test_sizes():
    assert parse_size("8GB") == 8 * 1024**3
    assert parse_size("512MB") == 512 * 1024**2
    assert parse_size("1.5G") == int(1.5 * 1024**3)


def test_run_json_round_trips(tmp_path):
    settings = Settings.build(shard_specs=["a.tar"], descriptors=["perceptual"], keep="largest", memory="2GB")
    run = Run.start(tmp_path / "out", settings)
    loaded = Settings.load(run.run_config)
    assert loaded == run.settings
    assert json.loads(run.run_config.read_text())["keep"] == "largest"


def test_resuming_keeps_saved_choices_unless_given(tmp_path):
    Run.start(tmp_path / "out", Settings.build(descriptors=["perceptual"], keep="largest", memory="2GB"))
    resumed = Run.start(tmp_path / "out", Settings.build(descriptors=["perceptual"]), given=frozenset())
    assert resumed.settings.keep == "largest" and resumed.settings.memory_budget_bytes == 2 * 1024**3
    changed = Run.start(tmp_path / "out", Settings.build(descriptors=["perceptual"], keep="first"),
                        given=frozenset({"keep"}))
    assert changed.settings.keep == "first"


def test_resuming_with_other_descriptors_is_refused(tmp_path):
    Run.start(tmp_path / "out", Settings.build(descriptors=["perceptual"]))
    with pytest.raises(SettingsError, match="embedded with"):
        Run.start(tmp_path / "out", Settings.build(descriptors=["perceptual", "clip"]))


def test_out_on_an_existing_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = runner.invoke(app, ["run", "nothing.tar", "--out", str(target)])
    assert result.exit_code == 2 and "is a file" in result.output


@pytest.mark.parametrize("option", [
    ["--memory", "lots"], ["--keep", "random"], ["--threshold", "perceptual=2"], ["--batch-size", "0"],
    ["--workers", "-1"], ["--device", "tpu"], ["--top", "-1"], ["--engine", "spark"], ["--ray-actors", "0"],
])
def test_cli_rejects_bad_options_before_reading_shards(tmp_path, option):
    # The shard does not exist: a run that got as far as reading it would fail differently.
    result = runner.invoke(app, ["run", str(tmp_path / "missing.tar"), "--out", str(tmp_path / "out"), *option])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "shards.parquet").exists()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("dedup ")


def test_run_json_query_and_report_agree_with_what_was_applied(demo_out_settings):
    """`dedup run -t perceptual=0.5 --keep largest`: clusters at 0.5, and run.json/query say 0.5 and largest."""
    out, clusters_at_default = demo_out_settings
    saved = json.loads((out / "run.json").read_text())
    assert saved["thresholds"]["perceptual"] == 0.5
    assert saved["guards"]["perceptual"] == pytest.approx(0.42)
    assert saved["keep"] == "largest"
    assert RunIndex(out, None).threshold == 0.5
    import pandas as pd

    clusters = pd.read_parquet(out / "clusters.parquet")
    # A looser cut merges at least as much as the default one did.
    assert clusters["cluster_id"].nunique() <= clusters_at_default
    report = (out / "report" / "index.html").read_text()
    assert "largest" in report and "0.5" in report


@pytest.fixture(scope="module")
def demo_out_settings(tmp_path_factory):
    import pandas as pd

    from dedup.synth import build_demo

    root = tmp_path_factory.mktemp("settings")
    shards, _ = build_demo(root / "shards")
    specs = [str(p) for p in shards]
    base = ["--descriptor", "perceptual", "--workers", "0", "--no-progress", "--no-report"]
    assert runner.invoke(app, ["run", *specs, "--out", str(root / "default"), *base]).exit_code == 0
    default = pd.read_parquet(root / "default" / "clusters.parquet")["cluster_id"].nunique()
    result = runner.invoke(app, ["run", *specs, "--out", str(root / "loose"), "-t", "perceptual=0.5",
                                 "--keep", "largest", "--descriptor", "perceptual", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return root / "loose", default


def test_how_the_vectors_are_computed_may_change_on_resume_but_not_what(tmp_path):
    def clip(**options):
        return Settings.build(descriptors=["clip"], model_options={"model": "ViT-B-32", "pretrained": "tag", **options})

    Run.start(tmp_path / "out", clip(gpu_decode=True))
    resumed = Run.start(tmp_path / "out", clip(gpu_decode=False))
    assert resumed.settings.descriptor_options["clip"]["gpu_decode"] is False
    assert resumed.settings.descriptor_options["clip"]["model"] == "ViT-B-32"
    with pytest.raises(SettingsError, match="made with"):
        Run.start(tmp_path / "out", Settings.build(descriptors=["clip"], model_options={"model": "ViT-L-14"}))
