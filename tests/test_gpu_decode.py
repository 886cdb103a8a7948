"""Batched decode + resize + crop + normalise (dedup.descriptors.gpu_decode), run on the CPU device.

The same code runs on CUDA with nvJPEG; here decode_jpeg works on CPU tensors,
so every step but the decoder library is the one the GPU runs. Stated
tolerance against the per-image CPU path (PIL decode, open_clip's preprocess):
* geometry on identical pixels: at most 2 levels (of 255) off anywhere, mean
  under 0.05 (rounding of PIL's fixed-point passes);
* whole path from JPEG bytes, images small enough that PIL does not
  DCT-downscale: mean under 0.5 levels; each embedding lies closer to its CPU
  twin than 1% of the distance from that twin to the nearest other image;
* large JPEGs, which the CPU path DCT-downscales (PIL draft, down to 1/8) and
  the batched path decodes at full size: under 50% of that distance, so the
  nearest CPU vector is still always the same image's.
Distances are relative because a random-weight tiny model maps all images
close together (cosine ~0.99 between unrelated ones): a bare cosine bound
would not tell right from wrong.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg
from PIL import Image

from dedup import decode
from dedup.descriptors.clip import ClipDescriptor, geometry_transform
from dedup.descriptors.gpu_decode import (
    BatchPreprocess,
    gpu_route,
    padding_groups,
    resample_weights,
    supports_preprocess,
)
from dedup.errors import DedupError

# torchvision 0.29 deprecates its decoders; pytest resets the filter gpu_decode sets for real runs.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like content (smooth, some edges): JPEG keeps it, so decoders agree closely."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 16 + 2, width // 16 + 2, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def encoded(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def preprocess_cfg(size: int, **overrides) -> dict:
    cfg = asdict(PreprocessCfg())
    cfg.update(size=size, **overrides)
    return cfg


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> ClipDescriptor:
    directory = tmp_path_factory.mktemp("tiny_gpu_clip")
    config = directory / "dedup-test-gpu-tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    checkpoint = directory / "tiny.pt"
    torch.save(open_clip.create_model("dedup-test-gpu-tiny-clip").state_dict(), checkpoint)
    return ClipDescriptor(model=str(config), pretrained=str(checkpoint), device="cpu", precision="fp32")


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_resize_crop_matches_open_clip_on_pil(resize_mode):
    cfg = preprocess_cfg(64, resize_mode=resize_mode)
    reference = geometry_transform(cfg)
    batch = BatchPreprocess(cfg, "cpu")
    # Down- and upscaling, both orientations, one side already at size, odd sizes (crop rounding).
    sizes = [(130, 90), (64, 64), (50, 200), (33, 47), (301, 64), (64, 301), (97, 1000)]
    images = [smooth_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    expected = np.stack([np.asarray(reference(im)).transpose(2, 0, 1) for im in images]).astype(np.float32)
    tensors = [torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()) for im in images]
    got = batch.resize_crop(tensors).numpy()
    difference = np.abs(got - expected)
    assert difference.max() <= 2.0
    assert difference.mean() < 0.05


def test_resample_weights_are_normalised_and_antialiased():
    down = resample_weights(100, 64, 0, 64, "bicubic")
    assert down.shape == (64, 100)
    np.testing.assert_allclose(down.sum(axis=1), 1.0, atol=1e-12)
    # A downscale widens the kernel (antialiasing): more taps than the 4 of plain bicubic.
    assert int((down[32] != 0).sum()) > 4
    # Same size, no offset: the identity (bicubic is interpolating).
    np.testing.assert_allclose(resample_weights(50, 50, 0, 50, "bilinear"), np.eye(50), atol=1e-12)
    # The crop offset selects later rows of the same resize.
    np.testing.assert_allclose(resample_weights(300, 90, 13, 64, "bicubic"),
                               resample_weights(300, 90, 0, 90, "bicubic")[13:77])


def test_padding_groups_cover_every_image_once_and_split_odd_sizes():
    shapes = [(300, 400), (64, 64), (310, 400), (64, 70), (2000, 2000)]
    groups = padding_groups(shapes)
    assert sorted(i for g in groups for i in g) == list(range(len(shapes)))
    big = next(g for g in groups if 4 in g)
    assert big == [4]  # never pads small images up to the huge one
    small = next(g for g in groups if 1 in g)
    assert 3 in small and 0 not in small


def test_reduced_copies_equal_the_cpu_quality_copy():
    """colourfulness / content_fraction are measured on this copy: it must be PIL's NEAREST reduce, pixel for pixel."""
    from dedup.image_quality import _reduced

    batch = BatchPreprocess(preprocess_cfg(64), "cpu")
    rng = np.random.default_rng(5)
    # Sizes where a naive (i + 0.5) * step index picks other pixels than PIL's running sum does.
    sizes = [(239, 232), (237, 196), (234, 298), (224, 265), (278, 212), (384, 288), (100, 90), (1001, 333)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    tensors = [torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()) for im in images]
    for image, reduced in zip(images, batch.reduced_copies(tensors), strict=True):
        np.testing.assert_array_equal(reduced, _reduced(image))


def test_unsupported_preprocess_is_refused_with_hint():
    assert not supports_preprocess(preprocess_cfg(64, resize_mode="longest"))
    assert not supports_preprocess(preprocess_cfg((64, 96)))
    with pytest.raises(DedupError) as info:
        BatchPreprocess(preprocess_cfg(64, resize_mode="longest"))
    assert "gpu_decode=False" in info.value.hint


# ---------------------------------------------------------------- routing


def exif_rotated_jpeg(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, exif=exif.tobytes())


def test_gpu_route_takes_plain_jpegs_only():
    photo = smooth_image(120, 80, seed=1)
    plain = encoded(photo, quality=90)
    assert gpu_route(plain) == (80, 120)
    assert gpu_route(encoded(photo.convert("L"))) == (80, 120)  # gray: decoded as RGB by both paths
    not_for_gpu = {
        "png": encoded(photo, "PNG"),
        "webp": encoded(photo, "WEBP"),
        "progressive": encoded(photo, progressive=True),
        "cmyk": encoded(photo.convert("CMYK")),
        "exif_rotated": exif_rotated_jpeg(photo),
        "truncated": plain[: len(plain) * 6 // 10],
        "one_pixel": encoded(photo.resize((1, 1))),
        "empty": b"",
        "text": b"<html>404 not found</html>",
    }
    for name, data in not_for_gpu.items():
        assert gpu_route(data) is None, name
    assert gpu_route(plain, max_pixels=120 * 80 - 1) is None
    assert gpu_route(plain, max_gpu_pixels=100) is None


# ---------------------------------------------------------------- decode and the whole path


def test_decode_rejects_a_bad_jpeg_without_failing_the_batch():
    batch = BatchPreprocess(preprocess_cfg(64), "cpu")
    good = encoded(smooth_image(90, 70, seed=2), quality=92)
    corrupt = corrupt_scan(good)
    decoded = batch.decode([good, corrupt, good])
    assert decoded[1] is None
    assert decoded[0].shape == (3, 70, 90) and decoded[0].dtype == torch.uint8
    pil = np.asarray(Image.open(io.BytesIO(good)).convert("RGB")).transpose(2, 0, 1)
    assert np.abs(decoded[2].numpy().astype(int) - pil).max() <= 1  # both libjpeg-turbo
    normalised, rejected = batch([good, corrupt])
    assert rejected == [1] and normalised.shape == (1, 3, 64, 64)


def per_image_path(descriptor: ClipDescriptor, datas: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The existing CPU path: decode_image (with PIL draft) + prepare, then embed."""
    prepared = np.stack([descriptor.prepare(decode.decode_image(d, descriptor.min_side).image) for d in datas])
    return prepared, descriptor.embed(prepared)


def batched_path(descriptor: ClipDescriptor, datas: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    batch = descriptor.batch_preprocess()
    pixels = batch.resize_crop(batch.decode(datas))
    return pixels.numpy(), descriptor.encode_normalised(batch.normalise(pixels))


def relative_error(reference: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per image: distance to its reference vector over the reference's distance to the nearest other image."""
    error = np.linalg.norm(reference - vectors, axis=1)
    spread = np.linalg.norm(reference[:, None] - reference[None], axis=2)
    spread[spread < 1e-6] = np.inf  # itself, and planted exact copies: not "other images"
    return error / spread.min(axis=1)


def test_batched_path_matches_per_image_cpu_path(tiny_clip):
    # All below 2x the model's 64 px side, so PIL draft does not downscale in the DCT domain.
    datas = [encoded(smooth_image(w, h, seed=10 + i), quality=90) for i, (w, h) in
             enumerate([(100, 70), (64, 64), (90, 127), (120, 65)])]
    cpu_pixels, cpu_vectors = per_image_path(tiny_clip, datas)
    gpu_pixels, gpu_vectors = batched_path(tiny_clip, datas)
    assert np.abs(gpu_pixels - cpu_pixels).mean() < 0.5
    assert np.all(relative_error(cpu_vectors, gpu_vectors) < 0.01)
    np.testing.assert_allclose(np.linalg.norm(gpu_vectors, axis=1), 1.0, atol=1e-5)
    # Different images stay different (a constant output would pass the cosine check against itself).
    assert np.abs(gpu_vectors[0] - gpu_vectors[1]).max() > 1e-3


def test_large_jpegs_stay_within_draft_tolerance(tiny_clip):
    # >= 2x the model side: the CPU path decodes at 1/2 or 1/4 scale, the batched path at full size.
    datas = [encoded(smooth_image(w, h, seed=20 + i), quality=90) for i, (w, h) in
             enumerate([(400, 300), (260, 520), (700, 700)])]
    _, cpu_vectors = per_image_path(tiny_clip, datas)
    _, gpu_vectors = batched_path(tiny_clip, datas)
    assert np.all(relative_error(cpu_vectors, gpu_vectors) < 0.5)


def test_clip_gpu_decode_option(tiny_clip):
    assert tiny_clip.gpu_decode is False  # auto: only on CUDA
    forced = ClipDescriptor(model=tiny_clip.spec.open_clip_name, pretrained=tiny_clip.spec.pretrained,
                            device="cpu", gpu_decode=True)
    assert forced.gpu_decode is True
    with pytest.raises(DedupError, match="gpu_decode"):
        ClipDescriptor(model=tiny_clip.spec.open_clip_name, pretrained=tiny_clip.spec.pretrained,
                       device="cpu", gpu_decode="sometimes")


def test_channels_last_gives_the_same_vectors(tiny_clip):
    datas = [encoded(smooth_image(80, 80, seed=s)) for s in range(3)]
    batch = tiny_clip.batch_preprocess()
    model_input = batch.normalise(batch.resize_crop(batch.decode(datas)))
    plain = tiny_clip.encode_normalised(model_input)
    tiny_clip.channels_last = True
    try:
        np.testing.assert_allclose(tiny_clip.encode_normalised(model_input), plain, atol=1e-5)
    finally:
        tiny_clip.channels_last = False


def test_graph_batch_sizes_are_few_and_waste_under_half():
    from dedup.descriptors.cuda_graphs import graph_batch_size

    sizes = {graph_batch_size(n, 256) for n in range(1, 257)}
    assert sizes == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    assert all(n <= graph_batch_size(n, 256) < 2 * n for n in range(1, 257))
    assert graph_batch_size(200, 128) == 128  # larger batches are split into cap-sized ones


# ---------------------------------------------------------------- real GPU (skipped without CUDA)


def corrupt_scan(data: bytes) -> bytes:
    """Header intact, scan replaced by garbage, end marker kept: libjpeg (PIL, torchvision CPU) rejects it."""
    return data[:300] + bytes(range(256)) * 8 + b"\xff\xd9"


@pytest.mark.gpu
def test_nvjpeg_batch_survives_a_corrupt_jpeg_and_matches_pil():
    batch = BatchPreprocess(preprocess_cfg(224), "cuda")
    datas = [encoded(smooth_image(w, h, seed=s), quality=90) for s, (w, h) in enumerate([(384, 288), (500, 333)])]
    decoded = batch.decode([datas[0], corrupt_scan(datas[0]), datas[1]])
    # nvJPEG may reject the corrupt scan (None: the CPU decoder then records decode_error, as the CPU
    # path does) or decode it to garbage of the header's size; bench_gpu_embed.py records which.
    assert decoded[1] is None or tuple(decoded[1].shape) == (3, 288, 384)
    for data, image in zip(datas, [decoded[0], decoded[2]], strict=True):
        assert image.is_cuda
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1).astype(np.float32)
        assert np.abs(image.cpu().numpy().astype(np.float32) - pil).mean() < 1.5


@pytest.mark.gpu
def test_cuda_batched_path_matches_cpu_path(tiny_clip):
    gpu = ClipDescriptor(model=tiny_clip.spec.open_clip_name, pretrained=tiny_clip.spec.pretrained, device="cuda")
    assert gpu.gpu_decode is True and gpu.channels_last is True
    datas = [encoded(smooth_image(w, h, seed=30 + i), quality=90) for i, (w, h) in
             enumerate([(100, 70), (64, 64), (90, 127), (120, 65)])]
    _, cpu_vectors = per_image_path(tiny_clip, datas)
    _, gpu_vectors = batched_path(gpu, datas)
    assert np.all(relative_error(cpu_vectors, gpu_vectors) < 0.1)  # fp16 autocast + nvJPEG's own IDCT


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager(tiny_clip):
    common = {"model": tiny_clip.spec.open_clip_name, "pretrained": tiny_clip.spec.pretrained, "device": "cuda",
              "batch_size": 8}
    eager, graphed = ClipDescriptor(**common), ClipDescriptor(**common, cuda_graphs=True)
    batch = torch.randn(5, 3, 64, 64, device="cuda")  # short batch: padded to the graph's 8
    reference = eager.encode_normalised(batch)
    assert np.all(relative_error(reference, graphed.encode_normalised(batch)) < 0.01)
    other = torch.randn(5, 3, 64, 64, device="cuda")
    # Replay must read the new input, not the captured one.
    assert np.all(relative_error(eager.encode_normalised(other), graphed.encode_normalised(other)) < 0.01)
