from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import jpeg_bytes, sample_members, write_tar
from PIL import Image

from dedup import decode
from dedup.errors import ShardSpecError
from dedup.stages.read import expand_shard_specs, read_shard, split_member_name


def photo(seed: int = 0, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: a decodable, compressible image.
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 2, y * 3, (x + y)], axis=-1) % 256
    return Image.fromarray((base + rng.integers(0, 20, base.shape)).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_split_member_name_follows_webdataset_convention():
    assert split_member_name("000010023.jpg") == ("000010023", "jpg")
    assert split_member_name("dir/abc.seg.json") == ("dir/abc", "seg.json")
    assert split_member_name("README") == ("README", "")


def test_brace_patterns_globs_and_dirs(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", sample_members(f"k{i}", jpeg_bytes(photo(i))))
    assert expand_shard_specs([str(tmp_path / "{00000..00002}.tar")]) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shard_specs([str(tmp_path / "*.tar")]) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert len(expand_shard_specs([str(tmp_path)])) == 3
    # duplicates collapse, order of first appearance is kept
    assert expand_shard_specs([str(tmp_path / "00001.tar"), str(tmp_path / "{00000..00001}.tar")]) == [
        str(tmp_path / "00001.tar"),
        str(tmp_path / "00000.tar"),
    ]
    assert expand_shard_specs(["pipe:cat x.tar", "https://host/{a,b}.tar"]) == [
        "pipe:cat x.tar",
        "https://host/a.tar",
        "https://host/b.tar",
    ]


def test_missing_shards_raise_with_hint(tmp_path):
    with pytest.raises(ShardSpecError, match="does not exist") as info:
        expand_shard_specs([str(tmp_path / "{0..2}.tar")])
    assert "brace pattern" in str(info.value)
    with pytest.raises(ShardSpecError, match="match no shard"):
        expand_shard_specs([str(tmp_path / "*.tar")])


def _bad_kinds_shard(tmp_path):
    good = jpeg_bytes(photo(1))
    full = jpeg_bytes(photo(2, (256, 256)))
    members = []
    members += sample_members("good", good, caption="a <b>good</b> photo")
    members += sample_members("truncated", full[: len(full) // 2])
    members += sample_members("zero", b"")
    members += sample_members("text", b"<html>404 not found</html>")
    members += sample_members("png_as_jpg", png_bytes(photo(3)))
    members += sample_members("tiny", png_bytes(Image.new("RGB", (1, 1))))
    members += sample_members("noimage", None)
    return write_tar(tmp_path / "00000.tar", members)


def _processed(shard):
    from dedup.stages.embed_worker import process_chunk

    return {p.row["key"]: p for p in process_chunk(list(read_shard(str(shard), 0)), (), decode.DEFAULT_MAX_PIXELS)}


def test_six_bad_kinds_become_rows_with_status(tmp_path):
    rows = {k: p.row for k, p in _processed(_bad_kinds_shard(tmp_path)).items()}
    assert list(rows) == ["good", "truncated", "zero", "text", "png_as_jpg", "tiny", "noimage"]
    expected = {
        "good": "ok",
        "truncated": "truncated",
        "zero": "empty",
        "text": "decode_error",
        "png_as_jpg": "ok",
        "tiny": "too_small",
        "noimage": "missing_image",
    }
    assert {k: r["status"] for k, r in rows.items()} == expected
    for key, row in rows.items():
        assert (row["error"] is None) == (row["status"] == "ok"), key
    assert "text" in rows["text"]["error"]
    assert rows["good"]["caption"] == "a <b>good</b> photo"
    assert rows["good"]["url"] == "https://example.com/good.jpg"
    assert (rows["good"]["width"], rows["good"]["height"]) == (96, 64)
    assert rows["zero"]["sha256"] == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert rows["noimage"]["sha256"] is None


def test_truncated_tar_keeps_samples_read_so_far(tmp_path):
    shard = write_tar(tmp_path / "00000.tar", [m for i in range(4) for m in sample_members(f"k{i}", jpeg_bytes(photo(i)))])
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:6000])  # inside the second sample's image
    samples = list(read_shard(str(cut), 7))
    assert samples[-1].failure[0] == "shard_error"
    assert [s.key for s in samples[:-1]] == [f"k{i}" for i in range(len(samples) - 1)]
    assert all(s.shard_index == 7 for s in samples)


def test_oversized_member_is_refused_without_reading(tmp_path, monkeypatch):
    import dedup.stages.read as shards

    monkeypatch.setattr(shards, "MAX_IMAGE_BYTES", 1000)
    shard = write_tar(tmp_path / "00000.tar", sample_members("big", jpeg_bytes(photo(0, (300, 300)))))
    (sample,) = list(read_shard(str(shard), 0))
    assert sample.failure[0] == "too_large" and sample.image_bytes is None


def test_decompression_bomb_is_refused_before_allocation():
    bomb = png_bytes(Image.new("L", (5000, 5000)))  # small file, 25 MP
    with pytest.raises(decode.DecodeFailure) as info:
        decode.decode_image(bomb, max_pixels=1_000_000)
    assert info.value.status == "too_large"


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "RGBA", "I;16", "I", "F", "L", "1", "PA"])
def test_every_mode_becomes_rgb(mode):
    base = photo(5, (40, 30))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L")).astype("<u2") * 257)
        assert image.mode == "I;16"
    elif mode in ("I", "F"):
        image = base.convert("L").convert(mode)
    elif mode == "PA":
        image = base.convert("P").convert("PA")
    else:
        image = base.convert(mode)
    rgb = decode.to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    # Content survives: correlation with the luma of the source stays high.
    gray = np.asarray(rgb.convert("L"), dtype=float).ravel()
    reference = np.asarray(base.convert("L"), dtype=float).ravel()
    if mode == "1":  # dithered bilevel: only black and white survive
        assert set(np.unique(gray)) <= {0.0, 255.0}
        return
    floor = {"P": 0.75, "PA": 0.75}.get(mode, 0.95)  # palettes quantise
    assert np.corrcoef(gray, reference)[0, 1] > floor


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert decode.to_rgb(transparent).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied_and_reported(real_dups):
    path = real_dups / "images" / "ThreatExchange__pdq__data__reg-test-input__exif-rotn__exif-rotn-6.jpg"
    raw = Image.open(path)
    decoded = decode.decode_image(path.read_bytes())
    assert decoded.image.size == (raw.size[1], raw.size[0])
    assert (decoded.width, decoded.height) == decoded.image.size


def test_jpeg_draft_downscales_in_dct_domain(real_dups):
    path = max((real_dups / "images").glob("*.jpg"), key=lambda p: p.stat().st_size)
    full = Image.open(path).size
    decoded = decode.decode_image(path.read_bytes(), target_side=64)
    assert min(decoded.image.size) >= 64
    assert decoded.image.size[0] < full[0] or full[0] < 256
    assert (decoded.width, decoded.height) in (full, full[::-1])  # full size is still reported


def test_every_real_dups_image_decodes(real_dups):
    failures = {}
    for path in sorted((real_dups / "images").iterdir()):
        try:
            image = decode.decode_image(path.read_bytes(), target_side=128).image
            assert image.mode == "RGB"
        except decode.DecodeFailure as failure:
            failures[path.name] = failure.message
    assert failures == {}


def test_pipe_urls_stream_through_webdataset_gopen(tmp_path):
    shard = write_tar(tmp_path / "00000.tar", sample_members("k0", jpeg_bytes(photo(0))) + sample_members("k1", jpeg_bytes(photo(1))))
    samples = list(read_shard(f"pipe:cat {shard}", 3))
    assert [s.key for s in samples] == ["k0", "k1"]
    assert samples[0].image_bytes == jpeg_bytes(photo(0))


def test_member_names_from_data_never_touch_the_filesystem(tmp_path):
    # A hostile tar member name is only a key: nothing is written or opened with it.
    shard = write_tar(tmp_path / "00000.tar", sample_members("../../etc/passwd", jpeg_bytes(photo(0))))
    (sample,) = list(read_shard(str(shard), 0))
    assert sample.key == "../../etc/passwd" and sample.image_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]
