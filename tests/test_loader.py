"""DropDuplicates: a sample is (shard, key, occurrence), matched on webdataset's __url__ and __key__."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_run, sample_members, write_tar
from PIL import Image

from dedup.errors import DedupError, StoreError
from dedup.loader import OPEN_SHARDS, DropDuplicates, MissingManifestWarning, load_removed_keys
from dedup.records import RunDir
from dedup.stages.manifests import KeepPolicy, write_manifests

wds = pytest.importorskip("webdataset")


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def img2dataset_output(folder: Path, images: list[bytes], per_shard: int = 10) -> list[Path]:
    """img2dataset layout: 00000.tar, 00001.tar, ... with keys 000000000, 000000001, ... across shards."""
    folder.mkdir(parents=True)
    shards = []
    for start in range(0, len(images), per_shard):
        members = []
        for key_number in range(start, min(start + per_shard, len(images))):
            members += sample_members(f"{key_number:09d}", images[key_number], ext="png")
        shards.append(write_tar(folder / f"{start // per_shard:05d}.tar", members))
    return shards


def keys_read(urls: list[str], dropper: DropDuplicates) -> list[tuple[str, str]]:
    dataset = wds.WebDataset(urls, shardshuffle=False).compose(dropper)
    return [(sample["__url__"], sample["__key__"]) for sample in dataset]


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory):
    """One run over two img2dataset outputs whose keys both start at 000000000."""
    from dedup import pipeline

    root = tmp_path_factory.mktemp("two_outputs")
    a = [png(i) for i in range(20)]
    b = [png(100 + i) for i in range(20)]
    a[12] = a[3]  # a copy inside output a
    b[5] = a[7]  # a copy across outputs; key 000000005 also names a unique image in a
    b[15] = b[1]
    b[18] = b""  # a 0-byte image: failed, removed with its status
    shards = img2dataset_output(root / "a", a) + img2dataset_output(root / "b", b)
    urls = [str(p) for p in shards]
    out = root / "run"
    pipeline.run_all(make_run(out, urls), with_report=False)
    return out, urls


def test_overlapping_keys_of_two_outputs_drop_exactly_the_removed_samples(two_outputs):
    out, urls = two_outputs
    _, a1, b0, b1 = urls
    expected_removed = {(a1, "000000012"), (b0, "000000005"), (b1, "000000015"), (b1, "000000018")}
    removed = pd.read_parquet(RunDir(out).remove_keys)
    assert set(zip(removed["shard"], removed["key"], strict=False)) == expected_removed
    kept = keys_read(urls, DropDuplicates(out))
    everything = {(url, f"{n:09d}") for url, numbers in zip(urls, [range(10), range(10, 20)] * 2, strict=False) for n in numbers}
    assert set(kept) == everything - expected_removed
    assert len(kept) == len(set(kept)) == 36
    assert load_removed_keys(out) == {(shard, key, 0) for shard, key in expected_removed}


def test_two_outputs_with_the_same_shard_names_get_their_own_manifests(two_outputs):
    out, urls = two_outputs
    run = RunDir(out)
    index = pd.read_parquet(run.manifest_index)
    assert sorted(index["shard"]) == sorted(urls)
    assert index["manifest"].nunique() == 4
    assert set(index["manifest"].str.split("-").str[0]) == {"00000", "00001"}
    for row in index.itertuples():
        manifest = pd.read_parquet(run.manifests_dir / row.manifest)
        assert (manifest["shard"] == row.shard).all() and len(manifest) == row.samples == 10
        assert (~manifest["keep"]).sum() == row.removed


def test_whole_manifest_folder_reads_as_one_table(two_outputs):
    out, _ = two_outputs
    table = pd.read_parquet(RunDir(out).manifests_dir)  # parquet dataset readers skip _index.parquet
    assert len(table) == 40 and {"shard", "key", "occurrence", "keep", "reason"} <= set(table.columns)


def test_dedup_and_compat_imports_are_one_class():
    import dedup
    from dedup.manifests import DropDuplicates as alias

    assert dedup.DropDuplicates is alias is DropDuplicates


# ---------------------------------------------------------------- synthetic manifests


def manifests_for(out: Path, shards: dict[str, list[str]], removed: set[tuple[str, int]],
                  status: dict[tuple[str, int], str] | None = None) -> RunDir:
    """Manifests for shards {location: keys in tar order}; `removed` = (location, position) pairs."""
    rows = []
    for shard_index, (shard, keys) in enumerate(shards.items()):
        for position, key in enumerate(keys):
            gone = (shard, position) in removed
            rows.append({"sample_id": (shard_index << 32) | position, "shard_index": shard_index, "shard": shard,
                         "key": key, "status": (status or {}).get((shard, position), "ok"), "cluster_id": -1 if gone else (shard_index << 32) | position,
                         "cluster_size": 2 if gone else 1, "width": 8, "height": 8})
    frame = pd.DataFrame(rows)
    # a removed sample joins the cluster of a kept copy with a smaller sample_id (cluster -1 sorts first)
    keeper = frame.iloc[[0]].assign(sample_id=-1, cluster_id=-1, cluster_size=2, key="__keeper__")
    write_manifests(RunDir(out), pd.concat([keeper, frame], ignore_index=True), KeepPolicy.parse("first"))
    return RunDir(out)


def tar_of(path: Path, keys: list[str]) -> str:
    members = []
    for i, key in enumerate(keys):
        members += sample_members(key, b"%d" % i)
    return str(write_tar(path, members))


def test_repeated_keys_in_a_shard_are_told_apart_by_order(tmp_path):
    keys = ["k1", "k2", "k1", "k3", "k1"]  # not consecutive: webdataset yields five samples
    url = tar_of(tmp_path / "00000.tar", keys)
    manifests_for(tmp_path / "run", {url: keys}, removed={(url, 2)})
    removed = pd.read_parquet(RunDir(tmp_path / "run").remove_keys)
    assert removed.loc[removed["key"] == "k1", "occurrence"].tolist() == [1]
    kept = [k for _, k in keys_read([url], DropDuplicates(tmp_path / "run"))]
    assert kept == ["k1", "k2", "k3", "k1"]


def test_a_shard_read_twice_in_a_row_is_filtered_both_times(tmp_path):
    keys = ["k1", "k2", "k1"]
    url = tar_of(tmp_path / "00000.tar", keys)
    manifests_for(tmp_path / "run", {url: keys}, removed={(url, 1), (url, 2)})
    kept = [k for _, k in keys_read([url, url], DropDuplicates(tmp_path / "run"))]
    assert kept == ["k1", "k1"]


def test_the_loader_reads_only_the_manifests_of_the_shards_it_sees(tmp_path):
    """Memory O(one shard): neither remove_keys.parquet nor other shards' manifests are read."""
    urls = [tar_of(tmp_path / f"{i:05d}.tar", ["a", "b"]) for i in range(10)]
    run = manifests_for(tmp_path / "run", {url: ["a", "b"] for url in urls}, removed={(url, 1) for url in urls})
    names = pd.read_parquet(run.manifest_index).set_index("shard")["manifest"]
    run.remove_keys.write_bytes(b"not parquet")
    for url in urls[1:]:
        (run.manifests_dir / names[url]).write_bytes(b"not parquet")
    assert keys_read(urls[:1], DropDuplicates(run.root)) == [(urls[0], "a")]
    manifests_for(tmp_path / "run", {url: ["a", "b"] for url in urls}, removed={(url, 1) for url in urls})
    dropper = DropDuplicates(run.root)
    assert len(keys_read(urls, dropper)) == 10
    assert len(dropper._open) <= OPEN_SHARDS  # shards already passed are let go


def test_prefix_map_finds_shards_copied_elsewhere(tmp_path):
    local = tmp_path / "copy" / "laion"
    local.mkdir(parents=True)
    url = tar_of(local / "00000.tar", ["a", "b", "c"])
    remote = "s3://bucket/laion/00000.tar"
    manifests_for(tmp_path / "run", {remote: ["a", "b", "c"]}, removed={(remote, 1)})
    mapped = DropDuplicates(tmp_path / "run", prefix_map={"s3://bucket/laion/": f"{local}/", "s3://": "/nowhere/"})
    assert [k for _, k in keys_read([url], mapped)] == ["a", "c"]


def test_a_shard_without_manifest_passes_with_one_warning(tmp_path):
    known = tar_of(tmp_path / "00000.tar", ["a", "b"])
    (tmp_path / "other").mkdir()
    unknown = tar_of(tmp_path / "other" / "00000.tar", ["a", "b", "c"])
    manifests_for(tmp_path / "run", {known: ["a", "b"]}, removed={(known, 0), (known, 1)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = keys_read([known, unknown, known, unknown], DropDuplicates(tmp_path / "run"))
    assert kept == [(unknown, "a"), (unknown, "b"), (unknown, "c")] * 2
    missing = [w for w in caught if issubclass(w.category, MissingManifestWarning)]
    assert len(missing) == 1 and unknown in str(missing[0].message)


def test_a_shard_the_run_read_in_part_warns_and_passes_the_rest(tmp_path):
    url = tar_of(tmp_path / "00000.tar", ["a", "b", "c", "d"])
    manifests_for(tmp_path / "run", {url: ["a", "b", "__shard_error_2"]}, removed={(url, 0)},
                  status={(url, 2): "shard_error"})
    assert not pd.read_parquet(RunDir(tmp_path / "run").manifest_index)["complete"].iloc[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = [k for _, k in keys_read([url, url], DropDuplicates(tmp_path / "run"))]
    assert kept == ["b", "c", "d"] * 2
    (warning,) = [w for w in caught if issubclass(w.category, MissingManifestWarning)]
    assert "not read to its end" in str(warning.message)


def test_a_relative_loader_path_matches_an_absolute_run_location(tmp_path, monkeypatch):
    url = tar_of(tmp_path / "00000.tar", ["a", "b"])
    manifests_for(tmp_path / "run", {str(Path(url).resolve()): ["a", "b"]}, removed={(str(Path(url).resolve()), 0)})
    monkeypatch.chdir(tmp_path)
    assert [k for _, k in keys_read(["00000.tar"], DropDuplicates(tmp_path / "run"))] == ["b"]


def test_manifest_names_do_not_change_when_shards_are_added(tmp_path):
    first = manifests_for(tmp_path / "one", {"x/00000.tar": ["a"], "x/00001.tar": ["b"]}, set())
    later = manifests_for(tmp_path / "two", {"w/00000.tar": ["c"], "x/00000.tar": ["a"], "x/00001.tar": ["b"]}, set())
    before = pd.read_parquet(first.manifest_index).set_index("shard")["manifest"]
    after = pd.read_parquet(later.manifest_index).set_index("shard")["manifest"]
    assert after.loc[before.index].tolist() == before.tolist()
    assert after.loc["w/00000.tar"] != after.loc["x/00000.tar"]
    keys = pd.read_parquet(later.manifests_dir / after.loc["x/00001.tar"])["key"].tolist()
    assert keys == ["b"]


def test_a_rewrite_leaves_no_stale_manifests(tmp_path):
    run = manifests_for(tmp_path / "run", {"x/00000.tar": ["a"], "x/00001.tar": ["b"]}, set())
    (run.manifests_dir / "00000.parquet").write_bytes(b"old naming")
    manifests_for(tmp_path / "run", {"x/00001.tar": ["b"]}, set())
    names = sorted(p.name for p in run.manifests_dir.glob("*.parquet"))
    assert names == sorted(["_index.parquet", *pd.read_parquet(run.manifest_index)["manifest"]]) and len(names) == 2


def test_hostile_shard_names_give_safe_file_names(tmp_path):
    run = manifests_for(tmp_path / "run", {"pipe:curl -s 'https://h/../../x y;rm.tar'": ["a"], "/d/.hidden.tar": ["b"]}, set())
    for name in pd.read_parquet(run.manifest_index)["manifest"]:
        assert (run.manifests_dir / name).exists() and "/" not in name and not name.startswith((".", "_"))


def test_samples_without_url_are_refused(tmp_path):
    manifests_for(tmp_path / "run", {"x/00000.tar": ["a"]}, set())
    with pytest.raises(DedupError, match="__url__"):
        DropDuplicates(tmp_path / "run").keep({"__key__": "a"})


def test_a_run_without_manifest_index_says_what_to_run(tmp_path):
    (tmp_path / "run" / "manifests").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"_index\.parquet") as error:
        DropDuplicates(tmp_path / "run")
    assert "dedup manifests" in error.value.hint


def test_select_and_pickled_copies_filter_the_same(tmp_path):
    """`.select(dropper.keep)` works too, and a DataLoader worker's pickled copy filters alike."""
    import pickle

    keys = ["a", "b", "a", "c"]
    url = tar_of(tmp_path / "00000.tar", keys)
    manifests_for(tmp_path / "run", {url: keys}, removed={(url, 1), (url, 2)})
    dropper = pickle.loads(pickle.dumps(DropDuplicates(tmp_path / "run")))
    selected = [s["__key__"] for s in wds.WebDataset([url], shardshuffle=False).select(dropper.keep)]
    assert selected == [k for _, k in keys_read([url], DropDuplicates(tmp_path / "run"))] == ["a", "c"]


def test_query_by_a_key_that_repeats_across_outputs_needs_the_shard(two_outputs):
    """`dedup query --key` answers for one sample: a key of two outputs is ambiguous, never a silent first pick."""
    from dedup.errors import QueryError
    from dedup.stages.query import query

    out, urls = two_outputs
    with pytest.raises(QueryError, match="--shard"):
        query(out, key="000000005")
    (in_a,) = query(out, key="000000005", shard=urls[0])
    (in_b,) = query(out, key="000000005", shard=urls[2])
    assert in_a.cluster_id != in_b.cluster_id
    assert in_b.copies == 2  # b's 000000005 is a copy of a's 000000007


def test_query_by_a_key_repeated_inside_one_shard_needs_its_occurrence(tmp_path):
    """--shard cannot tell two samples of one tar apart: the hint named it anyway, and no option could."""
    from typer.testing import CliRunner

    from dedup import pipeline
    from dedup.cli import app
    from dedup.errors import QueryError
    from dedup.stages.query import query

    first, second = png(1), png(2)
    members = [*sample_members("k", first, ext="png"), *sample_members("x", first, ext="png"),
               *sample_members("k", second, ext="png"), *sample_members("y", second, ext="png"),
               *sample_members("z", png(3), ext="png")]
    url = str(write_tar(tmp_path / "00000.tar", members))
    out = tmp_path / "run"
    pipeline.run_all(make_run(out, [url]), with_report=False)
    with pytest.raises(QueryError, match="inside shard") as error:
        query(out, key="k", shard=url)
    assert "--occurrence" in error.value.hint
    (nth_0,) = query(out, key="k", shard=url, occurrence=0)
    (nth_1,) = query(out, key="k", occurrence=1)  # one shard holds the key: --shard is not needed
    assert nth_0.cluster_id != nth_1.cluster_id and nth_0.copies == nth_1.copies == 2
    assert set(nth_1.matches["key"]) == {"k", "y"}
    result = CliRunner().invoke(app, ["query", str(out), "--key", "k", "--occurrence", "2"])
    assert result.exit_code == 2 and "no sample with key 'k'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["query", str(out), "--key", "k", "--occurrence", "1", "--json"])
    assert result.exit_code == 0, result.output
