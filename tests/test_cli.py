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


# ---------------------------------------------------------------- bad inputs: two lines, exit 2, no traceback


def _two_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "hint:" in result.output and "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def _demo_image(demo_out, tmp_path):
    import tarfile

    with tarfile.open(demo_out / "shards" / "00000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        data = tar.extractfile(member).read()
    path = tmp_path / "good.jpg"
    path.write_bytes(data)
    return path


def test_query_image_that_is_not_an_image_exits_2(demo_out, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("<html>404 not found</html>")
    _two_line_error(runner.invoke(app, ["query", str(demo_out / "run"), "--image", str(fake)]), "not an image")


def test_query_images_folder_never_reads_devices_fifos_or_outside_links(demo_out, tmp_path):
    import os

    folder = tmp_path / "queries"
    folder.mkdir()
    good = _demo_image(demo_out, tmp_path)
    (folder / "good.jpg").write_bytes(good.read_bytes())
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink(good, folder / "outside.jpg")
    result = runner.invoke(app, ["query", str(demo_out / "run"), "--images", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    answers = {a["query"].rsplit("/", 1)[1]: a for a in json.loads(result.stdout)}
    assert answers["good.jpg"]["copies"] >= 1 and answers["good.jpg"]["error"] is None
    assert "not a regular file" in answers["fifo.jpg"]["error"]
    assert "outside" in answers["zero.jpg"]["error"] and "outside" in answers["outside.jpg"]["error"]


def test_eval_truth_that_is_not_parquet_exits_2(demo_out, tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text("key,group_id\na,1\n")
    _two_line_error(runner.invoke(app, ["eval", str(demo_out / "run"), "--truth", str(truth)]), "Parquet")


def test_out_on_an_existing_file_exits_2(demo_out, tmp_path):
    blocker = tmp_path / "out.txt"
    blocker.write_text("I am a file")
    result = runner.invoke(app, ["embed", str(demo_out / "shards" / "00000.tar"), "--out", str(blocker), "-d", "perceptual"])
    _two_line_error(result, "is a file")


def test_full_disk_exits_2_naming_the_path_and_leaves_no_temporaries(demo_out, tmp_path, monkeypatch):
    import errno

    from dedup import records

    def full_disk(table, where, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.pq, "write_table", full_disk)
    out = tmp_path / "o"
    result = runner.invoke(app, ["embed", str(demo_out / "shards" / "00000.tar"), "--out", str(out), "-d", "perceptual",
                                 "--workers", "0"])
    _two_line_error(result, "no space left", str(out))
    assert list(out.rglob("*.tmp")) == []


def test_unreachable_ray_address_exits_2_at_once(demo_out, tmp_path):
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    result = runner.invoke(app, ["embed", str(demo_out / "shards" / "00000.tar"), "--out", str(tmp_path / "o"),
                                 "-d", "perceptual", "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"])
    _two_line_error(result, "cannot reach the Ray cluster")
    assert time.monotonic() - started < 60


def test_run_where_nothing_decodes_exits_2(tmp_path):
    from conftest import write_tar

    shard = write_tar(tmp_path / "00000.tar", [("k0.jpg", b"<html>403</html>"), ("k1.png", b"")])
    result = runner.invoke(app, ["run", str(shard), "--out", str(tmp_path / "o"), "-d", "perceptual", "--workers", "0"])
    _two_line_error(result, "no image decoded")


def test_failed_shards_are_listed_with_the_retry_command(demo_out, tmp_path, monkeypatch):
    missing_later = tmp_path / "00001.tar"
    missing_later.write_bytes(b"")  # exists when the shards are listed, but is no tar
    args = ["embed", str(demo_out / "shards" / "00000.tar"), str(missing_later), "--out", str(tmp_path / "o"),
            "-d", "perceptual", "--workers", "0"]
    monkeypatch.setattr("sys.argv", ["dedup", *args])
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "1 shards failed" in result.output and str(missing_later) in result.output
    assert "retry with: dedup embed" in result.output
