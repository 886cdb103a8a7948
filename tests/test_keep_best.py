"""`--keep best` (the default): colour over grayscale, most pixels, least re-encoded, ties to the first."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from dedup import pipeline
from dedup.image_quality import GRAYSCALE_MAX, colourfulness
from dedup.records import RunDir, load_samples
from dedup.stages.manifests import KeepPolicy, decide_keep, manifests_stage
from dedup.synth import build_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep_best")
    shards, _ = build_demo(root / "shards")
    options = pipeline.EmbedOptions(descriptors=["perceptual"], workers=0, show_progress=False)
    pipeline.run_all([str(p) for p in shards], root / "run", options, None, "1GB", "first", False, Console(quiet=True))
    return RunDir(root / "run")


def _largest_cluster_kept(run: RunDir, keep: str) -> tuple[pd.Series, pd.DataFrame]:
    manifests_stage(run.root, keep)
    top = pd.read_parquet(run.top_duplicates).iloc[0]
    manifests = pd.concat([pd.read_parquet(p) for p in sorted(run.manifests_dir.glob("*.parquet"))])
    samples = load_samples(run)
    members = manifests[manifests["cluster_id"] == top["cluster_id"]].merge(samples, on=["sample_id", "key"])
    return members[members["keep"]].iloc[0], members


def test_first_policy_keeps_the_grayscale_copy_of_the_demo_largest_cluster(demo_run):
    kept, _ = _largest_cluster_kept(demo_run, "first")
    assert kept["colourfulness"] < GRAYSCALE_MAX  # the old default's choice


def test_best_keeps_a_colour_copy_with_the_most_pixels(demo_run):
    kept, members = _largest_cluster_kept(demo_run, "best")
    colour = members[(members["colourfulness"] >= GRAYSCALE_MAX) & (members["status"] == "ok")]
    pixels = colour["original_width"] * colour["original_height"]
    assert kept["colourfulness"] >= GRAYSCALE_MAX
    assert kept["original_width"] * kept["original_height"] == pixels.max()
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
    import inspect

    assert inspect.signature(manifests_stage).parameters["keep"].default == "best"
