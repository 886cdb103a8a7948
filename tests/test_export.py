"""`dedup export`: img2dataset url list and deduplicated webdataset shards (kept samples, members unchanged)."""

from __future__ import annotations

import tarfile

import pandas as pd
import pytest
from typer.testing import CliRunner

from dedup.cli import app
from dedup.loader import DropDuplicates
from dedup.records import RunDir
from dedup.stages.export import export
from dedup.stages.read import split_member_name


@pytest.fixture(scope="module")
def demo(demo_session_run, tmp_path_factory):
    # The shared demo run is only read: the export goes to its own folder.
    run, _, _, shards = demo_session_run
    root = tmp_path_factory.mktemp("export")
    stats = export(run.root, root / "export", shards=True, show_progress=False)
    return {"root": root, "shards": shards, "stats": stats, "run": RunDir(run.root)}


def _members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def _manifests(run: RunDir) -> pd.DataFrame:
    parts = sorted(p for p in run.manifests_dir.glob("*.parquet") if p != run.manifest_index)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def test_url_list_holds_the_kept_samples_for_img2dataset(demo):
    urls = pd.read_parquet(demo["root"] / "export" / "urls.parquet")
    assert list(urls.columns) == ["url", "caption", "key", "shard"]
    kept = _manifests(demo["run"]).query("keep")
    assert sorted(urls["key"]) == sorted(kept["key"])  # every demo sample has a URL
    assert urls["url"].str.startswith("https://").all()
    assert demo["stats"]["kept"] == len(kept) < len(_manifests(demo["run"]))


def test_exported_shards_are_the_loader_filter_applied_with_members_unchanged(demo):
    dropper = DropDuplicates(demo["run"].root)
    for index, source in enumerate(demo["shards"]):
        original = _members(source)
        exported = _members(demo["root"] / "export" / "shards" / f"{index:05d}.tar")
        wanted = [(n, b) for n, b in original if dropper.keep({"__url__": str(source), "__key__": split_member_name(n)[0]})]
        ok_keys = set(_manifests(demo["run"]).query("keep")["key"])
        wanted = [(n, b) for n, b in wanted if split_member_name(n)[0] in ok_keys]
        assert exported == wanted  # same members, same bytes, same order
        assert len(exported) < len(original)


def test_export_resumes_per_shard(demo):
    folder = demo["root"] / "export"
    done = sorted((folder / "_markers" / "export").glob("*.done"))
    assert len(done) == len(demo["shards"])
    kept_file = folder / "shards" / "00001.tar"
    before = kept_file.stat().st_mtime_ns
    (folder / "_markers" / "export" / "2.done").unlink()
    (folder / "shards" / "00002.tar").unlink()
    export(demo["run"].root, folder, shards=True, show_progress=False)
    assert (folder / "shards" / "00002.tar").exists()
    assert kept_file.stat().st_mtime_ns == before


def test_remove_lists_drop_more_samples(demo, tmp_path):
    urls = pd.read_parquet(demo["root"] / "export" / "urls.parquet")
    extra = urls.head(3)[["shard", "key"]].assign(occurrence=0, sample_id=0, cluster_id=0, reason="eval_copy")
    extra.to_parquet(tmp_path / "remove_from_train.parquet")
    result = CliRunner().invoke(app, ["export", str(demo["run"].root), "--out", str(tmp_path / "x"),
                                      "--remove", str(tmp_path / "remove_from_train.parquet")])
    assert result.exit_code == 0, result.output
    again = pd.read_parquet(tmp_path / "x" / "urls.parquet")
    assert set(again["key"]) == set(urls["key"]) - set(extra["key"])
    assert not (tmp_path / "x" / "shards").exists()


def test_export_without_manifests_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "manifests" in result.output
