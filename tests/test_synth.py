"""Tests for dedup.synth (copy transforms, bad samples, shard writer, demo) and benchmarks/make_benchmark.py."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import random
import re
import sys
import tarfile
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dedup.decode import DecodeFailure, decode_image
from dedup.errors import DedupError
from dedup.synth import (
    BAD_KIND_EXPECTED_STATUS,
    BENIGN,
    HARD,
    MIN_SIDE,
    TRANSFORMS,
    SynthSample,
    apply_transform,
    bad_samples,
    build_demo,
    demo_photos,
    make_laion_like,
    random_copy,
    write_shards,
    zipf_group_sizes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared" / "data" / "real-dups"
STATUS_NAMES = {"ok", "truncated", "empty", "decode_error", "too_small", "missing_image"}
JSON_KEYS = {"key", "url", "caption", "width", "height", "original_width", "original_height", "sha256",
             "status", "error_message"}


@pytest.fixture(scope="module")
def photos():
    return {photo.name: photo for photo in demo_photos()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    shards, truth = build_demo(out, seed=0)
    return out, shards, truth


def read_tar(path: Path) -> dict[str, dict[str, tarfile.TarInfo | bytes]]:
    """key -> {ext: bytes}, read with plain tarfile."""
    samples: dict[str, dict] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tar.extractfile(member).read()
            samples[key]["_info_" + ext] = member
    return dict(samples)


def decoded_status(data: bytes) -> str:
    try:
        decode_image(data)
    except DecodeFailure as failure:
        return failure.status
    return "ok"


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


# --------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_returns_a_sane_rgb_image(photos, name):
    source = photos["hopper"].image
    out = apply_transform(source, name, random.Random(7))
    again = apply_transform(source, name, random.Random(7))
    assert out.mode == "RGB"
    assert min(out.size) >= MIN_SIDE
    assert max(out.size) <= 2 * max(source.size)
    assert out.width * out.height <= 4 * source.width * source.height
    assert np.array_equal(np.asarray(out), np.asarray(again)), "same seed must give the same copy"
    if name not in ("exact", "png"):
        changed = out.size != source.size or not np.array_equal(np.asarray(out), np.asarray(source))
        assert changed, f"{name} left the picture untouched"


def test_lossless_transforms_keep_pixels(photos):
    source = photos["kodim05"].image
    for name in ("exact", "png"):
        assert np.array_equal(np.asarray(apply_transform(source, name, random.Random(0))), np.asarray(source))


def test_geometric_hard_transforms_move_pixels_as_named(photos):
    source = np.asarray(photos["kodim05"].image)
    rng = random.Random(0)
    assert np.array_equal(np.asarray(apply_transform(photos["kodim05"].image, "hflip", rng)), source[:, ::-1])
    assert np.array_equal(np.asarray(apply_transform(photos["kodim05"].image, "rot180", rng)), source[::-1, ::-1])


def test_random_copy_draws_from_the_named_family(photos):
    rng = random.Random(3)
    for _ in range(40):
        _, benign = random_copy(photos["kodim01"].image, "benign", rng)
        _, hard = random_copy(photos["kodim01"].image, "hard", rng)
        assert benign and all(name in BENIGN for name in benign)
        assert sum(name in ("jpeg", "webp", "png") for name in benign) <= 1
        assert len(hard) == 1 and hard[0] in HARD


def test_unknown_names_raise_dedup_errors(photos):
    with pytest.raises(DedupError, match="unknown transform"):
        apply_transform(photos["kodim01"].image, "sepia", random.Random(0))
    with pytest.raises(DedupError, match="unknown copy family"):
        random_copy(photos["kodim01"].image, "medium", random.Random(0))


# --------------------------------------------------------------------------
# Bad samples
# --------------------------------------------------------------------------


def test_bad_samples_cover_six_kinds_with_the_expected_decode_status():
    produced = dict(bad_samples())
    assert set(produced) == set(BAD_KIND_EXPECTED_STATUS)
    assert set(BAD_KIND_EXPECTED_STATUS.values()) <= STATUS_NAMES
    for kind, files in produced.items():
        expected = BAD_KIND_EXPECTED_STATUS[kind]
        if expected == "missing_image":
            assert files == {}
        else:
            assert set(files) == {"jpg"}
            assert decoded_status(files["jpg"]) == expected, kind


# --------------------------------------------------------------------------
# Shard writer and determinism
# --------------------------------------------------------------------------


def small_set(photos, seed: int):
    sources = [(name, photos[name].image) for name in ("kodim01", "kodim05", "kodim23")]
    return make_laion_like(sources, 40, seed, hard_negatives=[("kodim10", photos["kodim10"].image, "kodim05")],
                           bad_fraction=0.15, samples_per_shard=20, largest_group=8)


def test_same_seed_gives_identical_tar_bytes(photos, tmp_path):
    tars = {}
    for run, seed in (("a", 5), ("b", 5), ("c", 6)):
        samples, _ = small_set(photos, seed)
        tars[run] = [path.read_bytes() for path in write_shards(samples, tmp_path / run, 20)]
    assert len(tars["a"]) == 2
    assert tars["a"] == tars["b"]
    assert tars["a"] != tars["c"]


def test_small_set_truth_counts_and_bad_kinds(photos):
    samples, truth = small_set(photos, 5)
    assert len(samples) == len(truth) == 40
    assert list(truth["key"]) == [sample.key for sample in samples]
    assert truth["key"].str.fullmatch(r"\d{9}").all()
    assert truth.groupby("group_id").size().max() == 8
    assert set(truth.loc[truth["family"] == "bad", "bad_kind"]) == set(BAD_KIND_EXPECTED_STATUS)
    negatives = truth[truth["family"] == "hard_negative"]
    assert list(negatives["negative_of"]) == ["kodim05"]


def test_write_shards_rejects_repeated_keys(tmp_path):
    sample = SynthSample(key="000000000", image_bytes=b"x", ext="jpg", caption="c", url="https://a.example/x.jpg")
    with pytest.raises(DedupError, match="appears twice"):
        write_shards([sample, sample], tmp_path, 10)


def test_make_laion_like_rejects_an_unknown_resembled_source(photos):
    with pytest.raises(DedupError, match="resemble unknown sources"):
        make_laion_like([("kodim01", photos["kodim01"].image)], 20, 0,
                        hard_negatives=[("kodim10", photos["kodim10"].image, "kodim99")])


def test_singleton_sources_are_cropped_from_real_photos_never_noise(photos):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    flat = Image.new("RGB", (256, 256), (90, 140, 220))
    sources = [("kodim05", photos["kodim05"].image), ("noise", noise), ("sky", flat)]
    _, truth = make_laion_like(sources, 30, 1, bad_fraction=0, largest_group=4)
    derived = truth[truth["crop_box"] != ""]
    assert len(derived) > 10
    assert set(derived["parent"]) == {"kodim05"}
    assert derived["group_id"].str.startswith("kodim05~crop").all()
    with pytest.raises(DedupError, match="no detailed natural photo"):
        make_laion_like([("noise", noise), ("sky", flat)], 30, 1, bad_fraction=0)


def test_zipf_group_sizes_are_skewed_and_sum_to_n():
    sizes = zipf_group_sizes(5000, 250, 1.3, random.Random(0))
    assert sum(sizes) == 5000
    assert sizes[0] == 250
    assert sizes.count(1) > 0.8 * len(sizes)
    assert 20 <= sum(size >= 2 for size in sizes) <= 80


# --------------------------------------------------------------------------
# Demo build
# --------------------------------------------------------------------------


def test_demo_tars_have_the_img2dataset_layout(demo):
    out, shards, truth = demo
    assert [path.name for path in shards] == [f"{i:05d}.tar" for i in range(4)]
    assert (out / "truth.parquet").is_file()
    expected_status = dict(zip(truth["key"], truth["expected_status"], strict=True))
    for shard_index, path in enumerate(shards):
        samples = read_tar(path)
        parquet = pd.read_parquet(path.with_suffix(".parquet"))
        assert list(parquet["key"]) == sorted(samples)
        for key, files in samples.items():
            assert re.fullmatch(rf"{shard_index:05d}\d{{4}}", key)
            assert files["_info_json"].mtime == files["_info_txt"].mtime and files["_info_json"].uid == 0
            meta = json.loads(files["json"])
            assert set(meta) == JSON_KEYS and meta["key"] == key and meta["status"] == "success"
            assert files["txt"].decode() == meta["caption"]
            image_exts = [ext for ext in ("jpg", "png", "webp") if ext in files]
            if expected_status[key] == "missing_image":
                assert image_exts == [] and meta["sha256"] is None
                continue
            data = files[image_exts[0]]
            assert meta["sha256"] == hashlib.sha256(data).hexdigest()
            assert decoded_status(data) == expected_status[key], key
            if expected_status[key] == "ok":
                with Image.open(io.BytesIO(data)) as image:
                    assert image.size == (meta["width"], meta["height"])


def test_demo_truth_matches_the_shards(demo):
    _, shards, truth = demo
    keys = [key for path in shards for key in read_tar(path)]
    assert len(keys) == len(set(keys)) == len(truth) == 300
    assert set(keys) == set(truth["key"])
    assert set(truth["family"]) == {"original", "benign", "hard", "hard_negative", "bad"}
    originals = truth[truth["family"] == "original"].groupby("group_id").size()
    assert (originals == 1).all(), "every clean group has exactly one original"
    copies = truth[truth["family"].isin(["benign", "hard"])]
    assert set(copies["group_id"]) <= set(originals.index)
    assert (copies["transforms"] != "").all()


def test_demo_has_the_planted_duplicate_structure(demo):
    _, _, truth = demo
    sizes = truth.groupby("group_id").size().sort_values(ascending=False)
    assert sizes.iloc[0] == 40
    assert ((sizes >= 5) & (sizes <= 17)).sum() >= 3
    assert (sizes == 1).sum() > 0.8 * len(sizes), "most pictures appear once"
    negatives = truth[truth["family"] == "hard_negative"]
    assert len(negatives) == 3 and negatives["group_id"].is_unique
    assert all(sizes[target] >= 2 for target in negatives["negative_of"])
    assert sorted(truth["bad_kind"].dropna()) == sorted(BAD_KIND_EXPECTED_STATUS)


def test_demo_copies_are_really_copies_of_their_original(demo):
    _, shards, truth = demo
    images = {}
    for path in shards:
        for key, files in read_tar(path).items():
            images[key] = next((files[ext] for ext in ("jpg", "png", "webp") if ext in files), None)
    truth = truth.assign(data=truth["key"].map(images))
    original = truth[truth["family"] == "original"].set_index("group_id")["data"]
    reencodes = truth[truth["transforms"].isin(["exact", "jpeg", "webp", "png"])]
    assert len(reencodes) >= 5
    for row in reencodes.itertuples():
        source = original[row.group_id]
        if row.transforms == "exact":
            assert row.data == source
        else:
            assert np.abs(pixels(row.data) - pixels(source)).mean() < 12, row.key
    for row in truth[truth["family"] == "hard_negative"].itertuples():
        lookalike = pixels(original[row.negative_of])
        mine = pixels(row.data)
        assert mine.shape != lookalike.shape or np.abs(mine - lookalike).mean() > 20


def test_demo_captions_and_urls_look_like_laion(demo):
    _, shards, truth = demo
    metas = {}
    for path in shards:
        for key, files in read_tar(path).items():
            metas[key] = json.loads(files["json"])
    truth = truth.assign(caption=truth["key"].map(lambda k: metas[k]["caption"]),
                         url=truth["key"].map(lambda k: metas[k]["url"]))
    assert truth["url"].is_unique
    assert truth["url"].map(lambda url: urlparse(url).netloc).nunique() >= 4
    biggest = truth[truth["group_id"] == truth.groupby("group_id").size().idxmax()]
    captions = biggest["caption"].value_counts()
    assert captions.iloc[0] >= 5, "some copies share the exact alt text"
    assert len(captions) >= 5, "other copies vary it"


# --------------------------------------------------------------------------
# benchmarks/make_benchmark.py
# --------------------------------------------------------------------------


def load_make_benchmark():
    spec = importlib.util.spec_from_file_location("make_benchmark", REPO_ROOT / "benchmarks" / "make_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_make_benchmark_cli_with_demo_sources(tmp_path, capsys):
    make_benchmark = load_make_benchmark()
    code = make_benchmark.main(["--out", str(tmp_path), "--n", "120", "--seed", "3", "--sources", "demo",
                                "--samples-per-shard", "50"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    truth = pd.read_parquet(tmp_path / "truth.parquet")
    assert len(truth) == 120
    printed = capsys.readouterr().out
    assert "samples: 120 in 3 shards" in printed
    assert f"largest group: {truth.groupby('group_id').size().max()}" in printed


def test_make_benchmark_drops_hard_negatives_that_are_the_same_picture():
    if not (SHARED_DIR / "groups.csv").is_file():
        pytest.skip(f"shared real-dups data not found at {SHARED_DIR}")
    make_benchmark = load_make_benchmark()
    groups = make_benchmark.read_groups(SHARED_DIR)
    subset = groups[groups["file"].str.contains("jenssegers-imagehash__tests__images__(?:orientation|forest)")]
    notes: list[str] = []
    photos = make_benchmark._load_rows(SHARED_DIR, subset, notes)
    sources = make_benchmark._pick_sources(photos, notes)
    negatives = make_benchmark._pick_hard_negatives(photos, sources, notes)
    kept = {photo.file.rsplit("__", 1)[-1]: target for _, photo, target in negatives}
    # mismatch-1 is the forest photo turned by EXIF, mismatch-3 a re-encode of the orientation photo.
    assert kept == {"mismatch-2.jpg": "jenssegers:orientation"}
    assert sum("mislabelled" in note for note in notes) == 2
