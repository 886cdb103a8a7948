"""`--keep best` (the default): colour over grayscale, most pixels, least re-encoded, ties to the first."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import make_run
from PIL import Image

from dedup import pipeline
from dedup.image_quality import GRAYSCALE_MAX, colourfulness, content_fraction
from dedup.records import RunDir, load_samples
from dedup.run import Run
from dedup.stages.manifests import KeepPolicy, decide_keep, manifests_stage


@pytest.fixture(scope="module")
def demo_run(demo_copy):
    return demo_copy  # a private copy of the shared demo run


def _largest_cluster_kept(run: RunDir, keep: str) -> tuple[pd.Series, pd.DataFrame]:
    manifests_stage(Run.open(run.root, keep=keep))
    top = pd.read_parquet(run.top_duplicates).iloc[0]
    manifests = pd.read_parquet(run.manifests_dir)  # the dataset reader skips _index.parquet
    samples = load_samples(run)
    members = manifests[manifests["cluster_id"] == top["cluster_id"]].merge(samples, on=["sample_id", "key"])
    return members[members["keep"]].iloc[0], members


def test_first_policy_keeps_the_grayscale_copy_of_the_demo_largest_cluster(demo_run):
    kept, _ = _largest_cluster_kept(demo_run, "first")
    assert kept["colourfulness"] < GRAYSCALE_MAX  # the old default's choice


def test_best_keeps_a_colour_copy_with_the_most_content_pixels(demo_run):
    kept, members = _largest_cluster_kept(demo_run, "best")
    colour = members[(members["colourfulness"] >= GRAYSCALE_MAX) & (members["status"] == "ok")]
    content = colour["original_width"] * colour["original_height"] * colour["content_fraction"]
    assert kept["colourfulness"] >= GRAYSCALE_MAX
    assert kept["original_width"] * kept["original_height"] * kept["content_fraction"] >= 0.95 * content.max()
    assert kept["content_fraction"] > 0.95  # not a letterboxed copy
    assert (members["keep"]).sum() == 1


def test_samples_record_colourfulness_and_image_bytes(demo_run):
    samples = load_samples(demo_run).set_index("key")
    shard = pd.read_parquet(demo_run.shards_table)["url"].iloc[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png", ".webp")))
    key = member.name.split(".")[0]
    assert samples.loc[key, "image_bytes"] == member.size
    ok = samples[samples["status"] == "ok"]
    assert ok["colourfulness"].notna().all()
    assert (ok["colourfulness"] < GRAYSCALE_MAX).any() and (ok["colourfulness"] > 15).any()


def _noise(seed: int, size=(96, 96)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def test_colourfulness_separates_grayscale_from_colour():
    photo = _noise(1)
    gray_jpeg = io.BytesIO()
    photo.convert("L").convert("RGB").save(gray_jpeg, "JPEG", quality=60)
    assert colourfulness(photo.convert("L").convert("RGB")) == 0.0
    assert colourfulness(Image.open(gray_jpeg).convert("RGB")) < GRAYSCALE_MAX
    assert colourfulness(photo) > 30


def _cluster(**columns) -> pd.DataFrame:
    count = len(next(iter(columns.values())))
    base = {"sample_id": np.arange(count), "cluster_id": np.zeros(count, np.int64), "cluster_size": count,
            "status": "ok", "width": 100, "height": 100, "original_width": np.nan, "original_height": np.nan,
            "colourfulness": 20.0, "image_bytes": 5000, "image_member": [f"k{i}.jpg" for i in range(count)]}
    return pd.DataFrame({**base, **columns})


def _kept(frame: pd.DataFrame) -> list[int]:
    return decide_keep(frame, KeepPolicy.parse("best")).query("keep")["sample_id"].tolist()


def test_colour_beats_a_larger_grayscale_copy():
    assert _kept(_cluster(width=[400, 100], height=[400, 100], colourfulness=[0.5, 20.0])) == [1]


def test_original_size_from_metadata_beats_decoded_size():
    frame = _cluster(width=[200, 100], height=[200, 100], original_width=[np.nan, 800], original_height=[np.nan, 800])
    assert _kept(frame) == [1]


def test_lossless_then_more_bytes_per_pixel_at_equal_size():
    assert _kept(_cluster(image_member=["a.jpg", "b.png"], image_bytes=[9000, 4000])) == [1]
    assert _kept(_cluster(image_bytes=[3000, 7000, 5000])) == [1]


def test_ties_go_to_the_first_and_failed_samples_never_win():
    assert _kept(_cluster(image_bytes=[5000, 5000])) == [0]
    assert _kept(_cluster(status=["decode_error", "ok"], width=[900, 100], height=[900, 100])) == [1]


def test_runs_without_the_new_columns_still_work():
    frame = _cluster(width=[100, 300], height=[100, 300]).drop(columns=["colourfulness", "image_bytes", "image_member"])
    assert _kept(frame) == [1]


def test_best_is_the_default_policy():
    from dedup.settings import Settings

    assert Settings().keep == "best"
    assert Settings.build(descriptors=["perceptual"]).keep == "best"


def test_content_fraction_measures_letterbox_bars():
    photo = _noise(3, (120, 160))  # 160 wide, 120 high
    padded = Image.new("RGB", (160, 240), (0, 0, 0))
    padded.paste(photo, (0, 60))  # bars above and below: half the area is picture
    assert content_fraction(photo) == 1.0
    assert content_fraction(padded) == pytest.approx(0.5, abs=0.02)


def test_padded_copy_loses_to_the_unpadded_original_of_equal_content():
    frame = _cluster(width=[160, 160], height=[240, 120], content_fraction=[0.5, 1.0], image_bytes=[2100, 2000])
    assert _kept(frame) == [1]
    # 683x384 pillarboxed around a 384x384 picture: the bar estimate (0.563, not 0.5622) must not win by rounding.
    near = _cluster(width=[683, 384], height=[384, 384], content_fraction=[0.563, 1.0], image_bytes=[9000, 9000])
    assert _kept(near) == [1]
    bigger = _cluster(width=[1366, 384], height=[768, 384], content_fraction=[0.563, 1.0])
    assert _kept(bigger) == [0]  # four times the content: resolution first


@pytest.fixture(scope="module")
def real_run(real_dups, tmp_path_factory):
    from conftest import write_tar
    from test_real_dups import _truth

    root = tmp_path_factory.mktemp("keep_best_real")
    truth = _truth(real_dups)
    members = []
    for row in truth.itertuples():
        members.append((f"{row.key}.{row.file.rsplit('.', 1)[1].lower()}", (real_dups / "images" / row.file).read_bytes()))
    shard = write_tar(root / "00000.tar", members)
    pipeline.run_all(make_run(root / "run", [str(shard)], keep="best"), with_report=False)
    return RunDir(root / "run"), truth


def _kept_files(run: RunDir, truth: pd.DataFrame, keep: str) -> pd.DataFrame:
    manifests_stage(Run.open(run.root, keep=keep))
    manifests = pd.read_parquet(run.manifests_dir)  # the dataset reader skips _index.parquet
    samples = load_samples(run, ["sample_id", "width", "height", "colourfulness"])
    return manifests.merge(samples, on="sample_id").merge(truth[["key", "file", "group_id"]], on="key")


def test_real_photos_colour_hopper_beats_its_larger_grayscale_copies(real_run):
    run, truth = real_run
    largest = _kept_files(run, truth, "largest")
    gray = largest[largest["file"].str.contains("hopper_bw_500")].iloc[0]
    cluster = largest[largest["cluster_id"] == gray["cluster_id"]]
    assert cluster.loc[cluster["keep"], "colourfulness"].iloc[0] < GRAYSCALE_MAX  # most pixels = the grayscale one
    best = _kept_files(run, truth, "best")
    kept = best[(best["cluster_id"] == gray["cluster_id"]) & best["keep"]].iloc[0]
    assert kept["colourfulness"] >= GRAYSCALE_MAX and "hopper" in kept["file"]


def test_real_photos_forest_keeps_a_full_size_copy_not_the_thumbnail_or_low_quality(real_run):
    run, truth = real_run
    best = _kept_files(run, truth, "best")
    forest = best[best["group_id"] == "forest"]
    kept = forest[forest["keep"]]
    assert len(kept) == 1
    assert kept["width"].iloc[0] * kept["height"].iloc[0] == (forest["width"] * forest["height"]).max()
    assert not kept["file"].str.contains("thumb|lowQuality|forest-low").any()


# ---------------------------------------------------------------- the stage as engine tasks


def _today_manifests(run: RunDir, keep: str) -> dict[str, pd.DataFrame]:
    """Frozen copy of the one-task stage before it became engine tasks: every table in memory at once."""
    from dedup.stages.manifests import BEST_COLUMNS, _present, with_occurrence
    from dedup.stages.overrides import pinned_samples

    clusters = pd.read_parquet(run.clusters)
    sizes = load_samples(run, ["sample_id", "width", "height", *_present(run, BEST_COLUMNS)])
    decided = with_occurrence(decide_keep(clusters.merge(sizes, on="sample_id", how="left"), KeepPolicy.parse(keep),
                                          pinned_samples(run)))
    tables = {}
    for _, part in decided.groupby("shard_index", sort=True):
        tables[run.manifest_part(str(part["shard"].iloc[0])).name] = part.reset_index(drop=True)
    tables["remove_keys"] = decided[~decided["keep"]].reset_index(drop=True)
    return tables


def _written(run: RunDir) -> dict[str, pd.DataFrame]:
    index = pd.read_parquet(run.manifest_index)
    tables = {name: pd.read_parquet(run.manifests_dir / name) for name in index["manifest"]}
    tables["remove_keys"] = pd.read_parquet(run.remove_keys)
    return tables


def _assert_same_manifests(run: RunDir, expected: dict[str, pd.DataFrame]) -> None:
    from dedup.records import MANIFEST, REMOVE_LIST

    written = _written(run)
    assert sorted(written) == sorted(expected)
    files = sorted(p.name for p in run.manifests_dir.glob("*.parquet"))
    assert files == sorted([*(n for n in expected if n != "remove_keys"), "_index.parquet"])
    for name, frame in expected.items():
        schema = REMOVE_LIST if name == "remove_keys" else MANIFEST
        want = frame[schema.names].astype({"occurrence": "int32"}).reset_index(drop=True)
        pd.testing.assert_frame_equal(written[name], want, check_dtype=False)
        assert pq.read_schema(run.remove_keys if name == "remove_keys" else run.manifests_dir / name).remove_metadata() == schema
    assert not run.scratch_dir("manifests").exists()  # the steps' hand-over files are gone


@pytest.mark.parametrize("keep", ["best", "first", "largest", "max-copies=2"])
def test_manifest_tasks_write_what_the_one_task_stage_wrote(demo_run, keep):
    counts = manifests_stage(Run.open(demo_run.root, keep=keep))
    expected = _today_manifests(demo_run, keep)
    _assert_same_manifests(demo_run, expected)
    removed = expected["remove_keys"]
    assert counts == {"kept": sum(int(f["keep"].sum()) for n, f in expected.items() if n != "remove_keys"),
                      "removed_duplicates": int((removed["reason"] == "duplicate").sum()),
                      "removed_failed": int(removed["reason"].str.startswith("status:").sum()),
                      "manifests": len(expected) - 1}
    index = pd.read_parquet(demo_run.manifest_index)
    assert index["removed"].sum() == len(removed) and index["shard_index"].is_monotonic_increasing


def test_many_keep_buckets_and_a_review_pin_give_the_same_manifests(demo_run, monkeypatch):
    import dedup.stages.manifests as manifests
    from dedup.stages.overrides import add_override, review_row

    clusters = pd.read_parquet(demo_run.clusters)
    big = clusters[clusters["cluster_size"] == clusters["cluster_size"].max()]
    pin = int(big.loc[~big["is_representative"], "sample_id"].iloc[-1])
    add_override(demo_run, review_row(demo_run, "keep", [f"id:{pin}"]))
    monkeypatch.setattr(manifests, "KEEP_BUCKET_ROWS", 3)  # a bucket holds a few clusters' members
    try:
        manifests_stage(Run.open(demo_run.root, keep="best"))
        assert len(list((demo_run.root / "_markers" / "manifests-keep").glob("*.done"))) > 3
        _assert_same_manifests(demo_run, _today_manifests(demo_run, "best"))
        manifest = pd.concat(_written(demo_run).values())
        assert manifest.loc[manifest["sample_id"] == pin, "reason"].tolist()[0] == "kept_by_review"
        # Same inputs, another bucket count: the keep step reruns and finds its hand-over files again.
        monkeypatch.setattr(manifests, "KEEP_BUCKET_ROWS", 5)
        manifests_stage(Run.open(demo_run.root, keep="best"))
        _assert_same_manifests(demo_run, _today_manifests(demo_run, "best"))
    finally:
        demo_run.overrides.unlink(missing_ok=True)


def test_run_medians_equal_pandas_groupby_median(tmp_path):
    from dedup.records import write_table
    from dedup.stages.manifests import exact_medians

    rng = np.random.default_rng(7)
    frames = []
    for part, rows in enumerate([0, 1, 7, 40, 1000, 13]):
        ext = rng.choice(["jpg", "png", "webp", ""], size=rows, p=[0.6, 0.2, 0.15, 0.05])
        values = np.round(rng.lognormal(0.0, 1.0, rows), int(rng.integers(1, 4)))  # ties within and across parts
        frame = pd.DataFrame({"ext": ext, "per_pixel": values})
        write_table(frame, tmp_path / f"p{part}.parquet")
        frames.append(frame)
    whole = pd.concat(frames, ignore_index=True)
    expected = whole.groupby("ext")["per_pixel"].median().to_dict()
    got = exact_medians([tmp_path / f"p{i}.parquet" for i in range(len(frames))])
    assert got == expected  # exact: the same float, not approximately
    even = whole[whole["ext"] == "png"].head(10)
    write_table(even, tmp_path / "even.parquet")
    assert exact_medians([tmp_path / "even.parquet"])["png"] == even["per_pixel"].median()


def test_a_shard_task_reads_only_the_row_groups_of_its_shard(demo_run, monkeypatch, tmp_path):
    import shutil

    from dedup.records import CLUSTERS
    from dedup.stages.manifests import shard_rows

    clusters = pd.read_parquet(demo_run.clusters)
    path = tmp_path / "clusters.parquet"
    with pq.ParquetWriter(path, CLUSTERS) as writer:  # one row group per 7 rows, as a streamed write leaves them
        table = pq.read_table(demo_run.clusters)
        for start in range(0, table.num_rows, 7):
            writer.write_table(table.slice(start, 7))
    shutil.copy(path, demo_run.clusters)
    read: list[list[int]] = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read.append(list(groups)) or original(self, groups, **kw))
    shard = int(clusters["shard_index"].iloc[-1])
    rows = shard_rows(demo_run.clusters, shard).to_pandas()
    pd.testing.assert_frame_equal(rows, clusters[clusters["shard_index"] == shard].reset_index(drop=True))
    own = np.flatnonzero(clusters["shard_index"].to_numpy() == shard) // 7
    assert read == [sorted(set(own.tolist()))]
    read.clear()
    manifests_stage(Run.open(demo_run.root, keep="first"))
    total = pq.ParquetFile(demo_run.clusters).metadata.num_row_groups
    assert read and all(len(groups) < total for groups in read)  # no task read the whole table
    _assert_same_manifests(demo_run, _today_manifests(demo_run, "first"))


def test_singletons_are_decided_as_decide_keep_decides_them():
    from dedup.stages.manifests import decide_singletons

    frame = _cluster(status=["ok", "decode_error", "ok", "ok"], width=[10, 20, 30, 40]).assign(
        cluster_id=[0, 1, 2, 3], cluster_size=1, key=list("abcd"), shard_index=0)
    for policy in ("best", "first", "largest", "max-copies=3"):
        expected = decide_keep(frame, KeepPolicy.parse(policy), {2, 1})
        got = decide_singletons(frame.iloc[::-1], {2, 1})
        assert got["keep"].tolist() == expected["keep"].tolist() == [True, False, True, True]
        assert got["reason"].tolist() == expected["reason"].tolist() == ["unique", "status:decode_error", "kept_by_review", "unique"]


def test_remove_list_by_url_is_streamed_with_the_same_rows(demo_run):
    from dedup.records import REMOVE_URLS
    from dedup.stages.precomputed import REMOVE_URL_COLUMNS, write_url_remove_list

    manifests_stage(Run.open(demo_run.root, keep="first"))
    assert write_url_remove_list(demo_run.root) == len(pd.read_parquet(demo_run.remove_keys))
    # Frozen copy of the one-pass version: every removed row in memory, one merge per shard.
    removed = pd.read_parquet(demo_run.remove_keys)
    shard_of = removed["sample_id"].to_numpy(np.int64) >> 32
    frames = [removed[shard_of == s].merge(pd.read_parquet(demo_run.samples_part(int(s)), columns=["sample_id", "url"]),
                                           on="sample_id", how="left") for s in np.unique(shard_of)]
    expected = pd.concat(frames, ignore_index=True)[REMOVE_URL_COLUMNS]
    written = pd.read_parquet(demo_run.remove_urls)
    assert len(written) > 0 and written["url"].notna().any()
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    assert pq.read_schema(demo_run.remove_urls).remove_metadata() == REMOVE_URLS
