from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes, sample_members, write_tar
from PIL import Image

from dedup import decode
from dedup.errors import ShardSpecError
from dedup.stages.read import (
    SHARD_HTTP_ERROR,
    SHARD_TIMEOUT,
    SHARD_TRUNCATED,
    SHARD_UNREADABLE,
    ShardStream,
    Timeouts,
    expand_shard_specs,
    read_shard,
    shard_location,
    split_member_name,
)


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


def _jpeg_with_orientation(orientation: int | None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    photo(3, size=(300, 200)).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_every_exif_orientation_decodes_to_pillows_exif_transpose(orientation):
    from PIL import ImageOps

    data = _jpeg_with_orientation(orientation)
    expected = Image.open(io.BytesIO(data))
    expected.draft("RGB", (128, 128))
    expected = ImageOps.exif_transpose(expected).convert("RGB")
    decoded = decode.decode_image(data, target_side=128)
    assert decoded.image.size == expected.size
    assert np.array_equal(np.asarray(decoded.image), np.asarray(expected))
    assert (decoded.width, decoded.height) == ((200, 300) if orientation in (5, 6, 7, 8) else (300, 200))


def test_upright_images_are_not_copied_by_exif_transpose(monkeypatch):
    from PIL import ImageOps

    calls = []
    real = ImageOps.exif_transpose
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda image, **kw: calls.append(1) or real(image, **kw))
    for orientation in (None, 1):
        decode.decode_image(_jpeg_with_orientation(orientation), target_side=128)
    assert calls == []  # exif_transpose copies an upright image's pixels; decode keeps them as they are
    decode.decode_image(_jpeg_with_orientation(6), target_side=128)
    assert calls == [1]


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


# ---------------------------------------------------------------- shards cut short, remote failures


def _five_sample_tar(tmp_path):
    members = [m for i in range(5) for m in sample_members(f"k{i}", jpeg_bytes(photo(i)))]
    return write_tar(tmp_path / "full.tar", members)


def _cut(shard, tmp_path, size, name="cut.tar"):
    cut = tmp_path / name
    cut.write_bytes(shard.read_bytes()[:size])
    return cut


def test_tar_cut_at_a_member_boundary_is_reported_truncated(tmp_path):
    shard = _five_sample_tar(tmp_path)
    with tarfile.open(shard) as tar:
        headers = {m.name: m.offset for m in tar.getmembers()}
    # Cut exactly where sample k3 begins: tarfile and webdataset see a clean end of archive.
    samples = list(read_shard(str(_cut(shard, tmp_path, headers["k3.jpg"])), 0))
    assert [s.key for s in samples[:-1]] == ["k0", "k1", "k2"]
    assert samples[-1].failure[0] == "shard_error" and "truncated" in samples[-1].failure[1]
    stream = ShardStream(str(_cut(shard, tmp_path, headers["k3.jpg"])), 0)
    assert len(list(stream)) == 3
    assert stream.failure.status == SHARD_TRUNCATED and stream.failure.samples_read == 3


def test_tar_cut_inside_a_sample_or_after_one_zero_block_is_truncated(tmp_path):
    shard = _five_sample_tar(tmp_path)
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
        end = tar.offset  # where the end-of-archive blocks start
    cuts = {
        "between two members of one sample": members["k2.txt"].offset,
        "after a header, before its data": members["k2.txt"].offset_data,
        "after the first of the two zero blocks": end + 512,
    }
    for what, size in cuts.items():
        stream = ShardStream(str(_cut(shard, tmp_path, size)), 0)
        keys = [s.key for s in stream]
        assert stream.failure is not None and stream.failure.status == SHARD_TRUNCATED, what
        assert keys[:2] == ["k0", "k1"], what  # readable samples are kept


def test_complete_tar_has_no_failure(tmp_path):
    stream = ShardStream(str(_five_sample_tar(tmp_path)), 0)
    assert [s.key for s in stream] == [f"k{i}" for i in range(5)]
    assert stream.failure is None and stream.repeated_keys == 0 and stream.repeated_members == 0


def test_repeated_keys_and_members_each_keep_their_own_sample(tmp_path):
    images = [jpeg_bytes(photo(i)) for i in range(5)]
    members = [("k1.jpg", images[0]), ("k1.txt", b"first"), ("k2.jpg", images[1]),
               ("k1.jpg", images[2]), ("k1.txt", b"second"),  # k1 again, later in the shard
               ("k3.jpg", images[3]), ("k3.jpg", images[4])]  # a member name repeated inside one sample
    stream = ShardStream(str(write_tar(tmp_path / "00000.tar", members)), 0)
    samples = list(stream)
    assert [(s.key, s.occurrence) for s in samples] == [("k1", 0), ("k2", 0), ("k1", 1), ("k3", 0), ("k3", 1)]
    assert [s.image_bytes for s in samples] == [images[0], images[1], images[2], images[3], images[4]]
    assert [s.caption for s in samples[:3]] == ["first", None, "second"]
    assert stream.repeated_keys == 2 and stream.repeated_members == 1


def test_globs_and_folders_take_only_tar_files(tmp_path):
    # img2dataset writes 00000.tar, 00000.parquet and 00000_stats.json side by side.
    write_tar(tmp_path / "00000.tar", sample_members("k0", jpeg_bytes(photo(0))))
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert expand_shard_specs([str(tmp_path / "*")]) == [str(tmp_path / "00000.tar")]
    assert expand_shard_specs([str(tmp_path)]) == [str(tmp_path / "00000.tar")]
    with pytest.raises(ShardSpecError, match="match no shard"):
        expand_shard_specs([str(tmp_path / "*.json")])


def test_shard_location_is_absolute_for_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shard_location("data/00000.tar") == str(tmp_path / "data" / "00000.tar")
    assert shard_location("https://host/a.tar") == "https://host/a.tar"


def test_failing_pipe_command_is_a_failure_and_works_when_retried(tmp_path):
    shard = write_tar(tmp_path / "00000.tar", sample_members("k0", jpeg_bytes(photo(0))))
    flag = tmp_path / "failed_once"
    command = f"pipe:sh -c 'if [ ! -e {flag} ]; then touch {flag}; echo bucket busy >&2; exit 1; fi; cat {shard}'"
    stream = ShardStream(command, 0)
    assert list(stream) == []
    assert stream.failure.status == SHARD_UNREADABLE and "bucket busy" in stream.failure.message
    assert [s.key for s in stream] == ["k0"] and stream.failure is None


class _Server:
    """A local HTTP server on 127.0.0.1 whose handler behaviour is chosen per path."""

    def __init__(self, payload: bytes) -> None:
        import http.server
        import threading

        payload_ = payload

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/error.tar":
                    self.send_error(500, "backend exploded")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload_)))
                self.end_headers()
                if self.path == "/short.tar":  # the connection closes before Content-Length bytes
                    self.wfile.write(payload_[: len(payload_) // 2])
                    return
                if self.path == "/stall.tar":
                    self.wfile.write(payload_[: len(payload_) // 2])
                    self.wfile.flush()
                    time.sleep(30)  # stalls far past the test's read timeout
                    return
                self.wfile.write(payload_)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_shards(tmp_path):
    server = _Server(_five_sample_tar(tmp_path).read_bytes())
    yield server.base
    server.close()


def test_http_shard_streams_with_timeouts(http_shards):
    stream = ShardStream(f"{http_shards}/ok.tar", 0, Timeouts(connect=2, read=2))
    assert len(list(stream)) == 5 and stream.failure is None


def test_http_500_names_the_url_and_status(http_shards):
    stream = ShardStream(f"{http_shards}/error.tar", 0, Timeouts(connect=2, read=2))
    assert list(stream) == []
    assert stream.failure.status == SHARD_HTTP_ERROR
    assert f"{http_shards}/error.tar: HTTP 500" in stream.failure.message and "curl" not in stream.failure.message


def test_stalled_server_is_a_timeout_in_bounded_time(http_shards):
    started = time.monotonic()
    stream = ShardStream(f"{http_shards}/stall.tar", 0, Timeouts(connect=2, read=0.5))
    samples = list(stream)
    assert time.monotonic() - started < 10  # the 0.5 s read timeout, not the 30 s stall
    assert stream.failure.status == SHARD_TIMEOUT and "stall.tar" in stream.failure.message
    assert 0 < len(samples) < 5  # what arrived before the stall is kept


def test_server_closing_early_is_truncated(http_shards):
    stream = ShardStream(f"{http_shards}/short.tar", 0, Timeouts(connect=2, read=2))
    samples = list(stream)
    assert stream.failure.status == SHARD_TRUNCATED and 0 < len(samples) < 5


def test_connection_refused_is_unreadable():
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stream = ShardStream(f"http://127.0.0.1:{port}/a.tar", 0, Timeouts(connect=1, read=1))
    assert list(stream) == [] and stream.failure.status == SHARD_UNREADABLE
    assert f"127.0.0.1:{port}" in stream.failure.message


# ---------------------------------------------------------------- decoding cost bounded from the header


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def sixteen_bit_png(width: int, height: int) -> bytes:
    """A real, valid all-black 16-bit greyscale PNG, built row by row (never held decoded)."""
    import struct
    import zlib

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + 2 * width)  # filter byte + 2 bytes a pixel
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def test_sixteen_bit_bomb_is_refused_from_its_header(monkeypatch):
    from PIL import ImageFile

    bomb = sixteen_bit_png(10000, 8900)
    assert len(bomb) < 400_000  # ~173 KB on disk, 178 MB of pixels, GBs once rescaled
    assert Image.open(io.BytesIO(bomb)).size == (10000, 8900)

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(decode.DecodeFailure) as info:
        decode.decode_image(bomb)
    assert info.value.status == "too_large" and "10000x8900" in info.value.message


def test_pixel_limit_is_pillows_and_small_deep_images_still_decode():
    assert decode.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    decoded = decode.decode_image(sixteen_bit_png(300, 200))
    assert decoded.image.mode == "RGB" and decoded.image.size == (300, 200)
    # An 8-bit image between Pillow's warning and our old 120 MP limit is refused, not warned about.
    big = png_bytes(Image.new("L", (9500, 9500)))
    with pytest.raises(decode.DecodeFailure) as info:
        decode.decode_image(big)
    assert info.value.status == "too_large"


def _outcome(path: Path):
    stream = ShardStream(str(path), 0)
    samples = [(s.key, s.image_bytes, s.caption, s.failure) for s in stream]
    return samples, stream.failure


def test_member_data_read_from_the_stream_matches_tarfiles_reader_wherever_the_tar_is_cut(tmp_path, monkeypatch):
    """Member data is read straight from the tar stream; extractfile's reader (the reference) gives the same."""
    import gzip

    shard = _five_sample_tar(tmp_path)
    data = shard.read_bytes()
    gz = tmp_path / "whole.tar.gz"
    gz.write_bytes(gzip.compress(data, mtime=0))
    cuts = [_cut(shard, tmp_path, size, f"cut{size}.tar") for size in range(0, len(data) + 1, 173)]
    calls = []
    extractfile = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, member: calls.append(1) or extractfile(tar, member))
    fast = [_outcome(path) for path in [shard, gz, *cuts]]
    assert calls == []  # no member went through extractfile
    monkeypatch.setattr(tarfile.TarInfo, "issparse", lambda self: True)  # every member through extractfile
    reference = [_outcome(path) for path in [shard, gz, *cuts]]
    assert calls and fast == reference
    assert fast[0][1] is None and len(fast[0][0]) == 5 and fast[1] == fast[0]
    assert {failure.status for _, failure in fast[2:] if failure} == {SHARD_TRUNCATED, SHARD_UNREADABLE}


# ---------------------------------------------------------------- image data read by offset (decode workers, report)


def _members_with_long_names_and_repeats() -> list[tuple[str, bytes]]:
    images = [jpeg_bytes(photo(20 + i)) for i in range(4)]
    long_key = "d/" + "x" * 140  # past ustar's 100-byte name field: a pax or GNU long-name header first
    return [*sample_members("k0", images[0]), *sample_members(long_key, images[1]),
            ("k0.jpg", images[2]), ("k0.txt", b"k0 again"),  # a key repeated later in the shard
            *sample_members("k3", images[3], ext="png")]


def _by_offset(path: Path):
    """Samples as a decode worker sees them: headers read by the main process, image bytes at their offsets."""
    stream = ShardStream(str(path), 0, defer_images=True)
    samples = []
    for sample in stream:
        deferred = sample.deferred is not None and sample.image_bytes is None
        sample.load_deferred()
        samples.append((sample.key, sample.image_bytes, sample.caption, sample.failure, sample.occurrence,
                        sample.image_offset, deferred))
    return samples, stream.failure


def _streamed(path: Path):
    stream = ShardStream(str(path), 0)
    samples = [(s.key, s.image_bytes, s.caption, s.failure, s.occurrence, s.image_offset, False) for s in stream]
    return samples, stream.failure


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_images_read_at_their_offsets_equal_the_streamed_ones_wherever_the_tar_is_cut(tmp_path, tar_format):
    members = _members_with_long_names_and_repeats()
    if tar_format == tarfile.USTAR_FORMAT:
        members = [m for m in members if not m[0].startswith("d/")]  # ustar cannot hold the long name
    shard = write_tar(tmp_path / "whole.tar", members, tar_format)
    data = shard.read_bytes()
    whole, failure = _by_offset(shard)
    assert failure is None and [s[:2] for s in whole] == [s[:2] for s in _streamed(shard)[0]]
    assert all(s[6] for s in whole)  # every image came by offset, none through the main process
    assert all(data[s[5] : s[5] + len(s[1])] == s[1] for s in whole)  # the recorded offset holds the bytes
    for size in [*range(0, len(data) + 1, 97), *(o + d for s in whole for o in (s[5],) for d in (-1, 0, 1))]:
        cut = _cut(shard, tmp_path, size, f"cut{size}.tar")
        by_offset, streamed = _by_offset(cut), _streamed(cut)
        strip = lambda outcome: ([s[:6] for s in outcome[0]], outcome[1])  # noqa: E731
        assert strip(by_offset) == strip(streamed), size


def test_compressed_and_remote_shards_are_not_read_by_offset(tmp_path):
    import gzip

    shard = write_tar(tmp_path / "a.tar", sample_members("k0", jpeg_bytes(photo(1))))
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes(), mtime=0))
    for url in (str(gz), f"pipe:cat {shard}"):
        [sample] = list(ShardStream(url, 0, defer_images=True))
        assert sample.deferred is None and sample.image_bytes == jpeg_bytes(photo(1))
    [gz_sample] = list(ShardStream(str(gz), 0))
    [piped] = list(ShardStream(f"pipe:cat {shard}", 0))
    assert gz_sample.image_offset is None  # an offset into the decompressed stream locates nothing on disk
    assert piped.image_offset == 512  # an uncompressed stream: the offset is the file's


def test_a_shard_cut_after_its_headers_were_read_is_an_error_not_other_bytes(tmp_path):
    from dedup.stages.read import ShardChanged

    shard = write_tar(tmp_path / "a.tar", [m for i in range(2) for m in sample_members(f"k{i}", jpeg_bytes(photo(i)))])
    samples = list(ShardStream(str(shard), 0, defer_images=True))
    shard.write_bytes(shard.read_bytes()[: samples[1].deferred[1] + 10])  # rewritten while queued for decoding
    samples[0].load_deferred()
    assert samples[0].image_bytes == jpeg_bytes(photo(0))
    with pytest.raises(ShardChanged, match="the shard changed while it was read"):
        samples[1].load_deferred()
