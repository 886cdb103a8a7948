"""ClipDescriptor against a tiny open_clip model built in the test (no weights downloaded, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from dedup.descriptors import clip as clip_module
from dedup.descriptors.clip import ClipDescriptor, resolve_precision
from dedup.errors import DedupError, ModelLoadError

# Small enough to build in well under a second; the vocabulary must stay at
# 49408 because open_clip's SimpleTokenizer emits ids up to that.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_NAME = "dedup-test-tiny-clip"


def write_config(directory: Path, name: str, config: dict) -> Path:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A registered tiny model config, a reference model with random weights and its checkpoint."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    config_path = write_config(directory, TINY_NAME, TINY_CONFIG)
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME)
    model.eval()
    checkpoint = directory / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"config": config_path, "model": model, "preprocess": preprocess, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def descriptor(tiny) -> ClipDescriptor:
    return ClipDescriptor(model=str(tiny["config"]), pretrained=str(tiny["checkpoint"]), device="cpu", precision="fp32")


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_prepare_returns_uint8_square_crop_of_model_size(descriptor):
    prepared = descriptor.prepare(noise_image(130, 90, seed=1))
    assert prepared.shape == (3, 64, 64)
    assert prepared.dtype == np.uint8
    assert descriptor.min_side == 64
    assert descriptor.dim == 32


def test_prepare_converts_non_rgb_images(descriptor):
    gray = noise_image(80, 80, seed=2).convert("L")
    assert descriptor.prepare(gray).shape == (3, 64, 64)


def test_embed_returns_unit_rows_of_model_dim(descriptor):
    batch = np.stack([descriptor.prepare(noise_image(100, 70 + i, seed=i)) for i in range(5)])
    vectors = descriptor.embed(batch)
    assert vectors.shape == (5, 32)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Different images must give different vectors (a constant output would also be unit-norm).
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3


def test_same_image_gives_same_vector_across_batches(descriptor):
    image = noise_image(120, 120, seed=7)
    alone = descriptor.embed(descriptor.prepare(image)[None])
    others = [descriptor.prepare(noise_image(90, 90, seed=s)) for s in (8, 9)]
    in_batch = descriptor.embed(np.stack([others[0], descriptor.prepare(image), others[1]]))
    np.testing.assert_allclose(alone[0], in_batch[1], atol=1e-5)


def test_batches_larger_than_batch_size_are_split_and_kept_in_order(tiny, descriptor):
    small_batches = ClipDescriptor(
        model=str(tiny["config"]), pretrained=str(tiny["checkpoint"]), device="cpu", precision="fp32", batch_size=2
    )
    batch = np.stack([descriptor.prepare(noise_image(64, 64, seed=s)) for s in range(5)])
    np.testing.assert_allclose(small_batches.embed(batch), descriptor.embed(batch), atol=1e-5)


def test_checkpoint_reload_matches_in_memory_model_and_open_clip_preprocess(tiny, descriptor):
    """Exact weights and identical preprocessing: the vectors equal open_clip's own pipeline."""
    images = [noise_image(150, 100, seed=11), noise_image(64, 200, seed=12)]
    with torch.inference_mode():
        reference = tiny["model"].encode_image(torch.stack([tiny["preprocess"](im) for im in images]))
    reference = torch.nn.functional.normalize(reference, dim=-1).numpy()
    ours = descriptor.embed(np.stack([descriptor.prepare(im) for im in images]))
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_embed_text_matches_model_text_tower(tiny, descriptor):
    texts = ["a photo of a cat", "a diagram", "a photo of a cat"]
    vectors = descriptor.embed_text(texts)
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(tiny["model"].encode_text(tokenizer(texts)), dim=-1).numpy()
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3


def test_registered_model_name_works_like_config_path(tiny, descriptor):
    by_name = ClipDescriptor(model=TINY_NAME, pretrained=str(tiny["checkpoint"]), device="cpu", precision="fp32")
    image = descriptor.prepare(noise_image(100, 100, seed=3))[None]
    np.testing.assert_allclose(by_name.embed(image), descriptor.embed(image), atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32(tiny, descriptor):
    bf16 = ClipDescriptor(model=str(tiny["config"]), pretrained=str(tiny["checkpoint"]), device="cpu", precision="bf16")
    batch = np.stack([descriptor.prepare(noise_image(80, 80, seed=s)) for s in range(3)])
    cosines = np.sum(bf16.embed(batch) * descriptor.embed(batch), axis=1)
    assert np.all(cosines > 0.98)
    assert bf16.describe_device() == f"clip {tiny['config']}/{tiny['checkpoint']} on cpu (bf16)"


def test_workers_can_prepare_without_loading_weights(tmp_path, tiny):
    """prepare needs only the config: a corrupt checkpoint surfaces at the first embed, not before."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch checkpoint")
    worker = ClipDescriptor(model=str(tiny["config"]), pretrained=str(corrupt), device="cpu")
    prepared = worker.prepare(noise_image(70, 90, seed=5))
    assert prepared.shape == (3, 64, 64)
    with pytest.raises(ModelLoadError) as info:
        worker.embed(prepared[None])
    assert str(corrupt) in info.value.message
    assert "--pretrained PATH" in info.value.hint and "--descriptor perceptual" in info.value.hint


def test_checkpoint_of_another_shape_raises_model_load_error(tmp_path, tiny):
    wider = dict(TINY_CONFIG, vision_cfg=dict(TINY_CONFIG["vision_cfg"], width=96))
    open_clip.add_model_config(write_config(tmp_path, "dedup-test-wider-clip", wider))
    mismatched = tmp_path / "wider.pt"
    torch.save(open_clip.create_model("dedup-test-wider-clip").state_dict(), mismatched)
    descriptor = ClipDescriptor(model=str(tiny["config"]), pretrained=str(mismatched), device="cpu")
    with pytest.raises(ModelLoadError) as info:
        descriptor.embed(np.zeros((1, 3, 64, 64), dtype=np.uint8))
    assert "size mismatch" in info.value.message
    assert "--descriptor perceptual" in info.value.hint


def test_unknown_pretrained_tag_raises_with_hint():
    with pytest.raises(ModelLoadError) as info:
        ClipDescriptor(model="ViT-B-32", pretrained="no_such_tag", device="cpu")
    assert "ViT-B-32" in info.value.message and "no_such_tag" in info.value.message
    assert "laion2b_s34b_b79k" in info.value.message  # lists the tags that do exist
    assert "--pretrained PATH" in info.value.hint and "--descriptor perceptual" in info.value.hint


def test_missing_checkpoint_path_raises_with_hint(tmp_path, tiny):
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(ModelLoadError) as info:
        ClipDescriptor(model=str(tiny["config"]), pretrained=str(missing), device="cpu")
    assert str(missing) in info.value.message
    assert "--pretrained PATH" in info.value.hint


def test_unknown_model_name_raises_with_hint():
    with pytest.raises(ModelLoadError) as info:
        ClipDescriptor(model="ViT-Nonexistent-7", device="cpu")
    assert "ViT-Nonexistent-7" in info.value.message
    assert "--descriptor perceptual" in info.value.hint


def test_config_json_without_model_keys_raises(tmp_path):
    bad = tmp_path / "not-a-model.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ModelLoadError, match="embed_dim"):
        ClipDescriptor(model=str(bad), pretrained="x.pt", device="cpu")


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_uncached_tag_fails_fast_in_offline_mode(monkeypatch, empty_hub_cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    descriptor = ClipDescriptor(model="ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu")
    with pytest.raises(ModelLoadError) as info:
        descriptor.embed(np.zeros((1, 3, 224, 224), dtype=np.uint8))
    assert "ViT-B-32/laion2b_s34b_b79k" in info.value.message
    assert "HF_HUB_OFFLINE" in info.value.message
    assert "--pretrained PATH" in info.value.hint


def test_uncached_hf_hub_model_fails_fast_in_offline_mode(monkeypatch, empty_hub_cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        ClipDescriptor(model="hf-hub:example-org/not-cached-clip", device="cpu")
    assert "hf-hub:example-org/not-cached-clip" in info.value.message
    assert "--descriptor perceptual" in info.value.hint


def test_unreachable_hub_switches_to_offline_for_the_load(monkeypatch, empty_hub_cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(clip_module, "_hub_reachable", lambda: False)
    seen_offline = []

    def fake_create_model(*args, **kwargs):
        seen_offline.append(constants.is_offline_mode())
        raise RuntimeError("not cached")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    descriptor = ClipDescriptor(model="ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu")
    with pytest.raises(ModelLoadError, match="did not answer") as info:
        descriptor.embed(np.zeros((1, 3, 224, 224), dtype=np.uint8))
    assert "not cached" in info.value.message
    assert seen_offline == [True]
    assert constants.is_offline_mode() is False  # restored after the load


def test_preprocess_follows_the_pretrained_tag():
    """SigLIP weights use mean/std 0.5 and squash resizing: prepare must follow the tag, not the defaults."""
    siglip = ClipDescriptor(model="ViT-B-16-SigLIP", pretrained="webli", device="cpu")
    assert siglip.spec.preprocess["mean"] == (0.5, 0.5, 0.5)
    assert siglip.spec.preprocess["resize_mode"] == "squash"
    tall = noise_image(100, 300, seed=4)
    # squash resizes the whole image to the square (no crop, aspect ratio not kept).
    squashed = np.asarray(tall.resize((224, 224), Image.BICUBIC)).transpose(2, 0, 1)
    np.testing.assert_array_equal(siglip.prepare(tall), squashed)


def test_precision_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("auto", cpu) == ("bf16" if clip_module.cpu_has_native_bf16() else "fp32")
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(DedupError, match="precision"):
        resolve_precision("int8", cpu)


def test_cuda_device_without_gpu_raises(tiny):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(DedupError, match="CUDA"):
        ClipDescriptor(model=str(tiny["config"]), pretrained=str(tiny["checkpoint"]), device="cuda")


@pytest.mark.gpu
def test_cuda_fp16_matches_cpu_fp32(tiny, descriptor):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu = ClipDescriptor(model=str(tiny["config"]), pretrained=str(tiny["checkpoint"]), device="auto")
    assert gpu.describe_device().endswith("on cuda (fp16)")
    batch = np.stack([descriptor.prepare(noise_image(90, 90, seed=s)) for s in range(4)])
    cosines = np.sum(gpu.embed(batch) * descriptor.embed(batch), axis=1)
    assert np.all(cosines > 0.99)
    np.testing.assert_allclose(np.linalg.norm(gpu.embed_text(["a cat"]), axis=1), 1.0, atol=1e-3)
