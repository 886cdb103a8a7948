"""The clip embed stage with batched decoding (dedup.gpu_embed), run on the CPU device against the CPU stage.

Same shards, same tiny random-weight model: the samples tables must be equal
(every status, error, size and hash), the embedding metadata equal, and each
vector within 5% of the distance from its CPU twin to the nearest other image
(JPEG decode of libjpeg-turbo in both; PIL-exact resampling weights; the
shards' images are under 2x the model side, so PIL draft does not apply).
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import make_run

from dedup.descriptors.jpeg_route import gpu_route
from dedup.records import RunDir, load_embeddings, load_samples
from dedup.stages import embed as embed_stage
from dedup.stages.embed_gpu import GpuClipEmbedStage
from dedup.stages.read import read_shard
from dedup.synth import demo_photos, make_laion_like, write_shards

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

# 224 px input like ViT-B/32, but 2 layers of width 64: builds and runs in a blink.
SMALL_224 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PER_SHARD = 24


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("gpu_embed_model")
    config = directory / "dedup-test-small224-clip.json"
    config.write_text(json.dumps(SMALL_224))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    checkpoint = directory / "small224.pt"
    torch.save(open_clip.create_model("dedup-test-small224-clip").state_dict(), checkpoint)
    return str(config), str(checkpoint)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """3 shards of demo photos: JPEG copies, PNG/WebP copies and every bad kind."""
    photos = demo_photos()
    sources = [(p.name, p.image) for p in photos if not p.negative_of]
    samples, _ = make_laion_like(sources, 3 * PER_SHARD, seed=3, bad_fraction=0.1, samples_per_shard=PER_SHARD,
                                 max_side=300)
    return [str(p) for p in write_shards(samples, tmp_path_factory.mktemp("gpu_embed_shards"), PER_SHARD)]


def embed(shards, out, model_files, gpu_decode: bool, workers: int = 0, device: str = "cpu"):
    model, pretrained = model_files
    run = make_run(out, shards, descriptors=("clip",), workers=workers, device=device, batch_size=16,
                   model_options={"model": model, "pretrained": pretrained, "gpu_decode": gpu_decode})
    return embed_stage.embed(run)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, shards, model_files) -> RunDir:
    out = tmp_path_factory.mktemp("cpu_run")
    embed(shards, out, model_files, gpu_decode=False)
    return RunDir(out)


def relative_error(reference: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    error = np.linalg.norm(reference - vectors, axis=1)
    spread = np.linalg.norm(reference[:, None] - reference[None], axis=2)
    spread[spread < 1e-6] = np.inf  # itself, and planted exact copies: not "other images"
    return error / spread.min(axis=1)


QUALITY = ["colourfulness", "content_fraction"]


def assert_same_samples(run: RunDir, cpu_run: RunDir, colour_tolerance: float) -> None:
    """Equal samples tables; the quality signals within `colour_tolerance` (0 on the CPU device, where both
    paths decode with libjpeg-turbo; nvJPEG's IDCT moves colourfulness a little)."""
    samples, cpu_samples = load_samples(run), load_samples(cpu_run)
    pd.testing.assert_frame_equal(samples.drop(columns=QUALITY), cpu_samples.drop(columns=QUALITY))
    np.testing.assert_allclose(samples["colourfulness"], cpu_samples["colourfulness"], atol=colour_tolerance, rtol=0)
    np.testing.assert_allclose(samples["content_fraction"], cpu_samples["content_fraction"], atol=0.01)
    assert samples["colourfulness"].notna().sum() == (samples["status"] == "ok").sum()


def assert_same_outputs(run: RunDir, cpu_run: RunDir, tolerance: float) -> None:
    assert_same_samples(run, cpu_run, colour_tolerance=0.0)
    for part in range(3):
        pd.testing.assert_frame_equal(pd.read_parquet(run.metadata_part("clip", part)),
                                      pd.read_parquet(cpu_run.metadata_part("clip", part)))
    ids, vectors = load_embeddings(run, "clip")
    cpu_ids, cpu_vectors = load_embeddings(cpu_run, "clip")
    np.testing.assert_array_equal(ids, cpu_ids)
    assert np.all(relative_error(cpu_vectors, vectors) < tolerance)


def test_shards_exercise_both_routes_and_bad_samples(shards, cpu_run):
    routed = [gpu_route(raw.image_bytes) is not None for i, s in enumerate(shards) for raw in read_shard(s, i)]
    assert 0 < sum(routed) < len(routed)
    statuses = set(load_samples(cpu_run)["status"])
    assert {"ok", "truncated", "empty", "decode_error", "too_small", "missing_image"} <= statuses


def test_inline_gpu_stage_matches_cpu_stage(tmp_path, shards, model_files, cpu_run):
    report = embed(shards, tmp_path, model_files, gpu_decode=True)
    assert report.stats["samples"] == 3 * PER_SHARD
    assert_same_outputs(RunDir(tmp_path), cpu_run, tolerance=0.05)


def test_pipeline_picks_the_gpu_stage_only_for_clip_with_gpu_decode(tmp_path, shards, model_files, monkeypatch):
    seen = []
    original = GpuClipEmbedStage.run_task
    monkeypatch.setattr(GpuClipEmbedStage, "run_task", lambda self, *a: seen.append(1) or original(self, *a))
    embed(shards[:1], tmp_path / "off", model_files, gpu_decode=False)
    assert not seen
    embed(shards[:1], tmp_path / "on", model_files, gpu_decode=True)
    assert seen == [1]


def test_resume_rewrites_only_the_missing_shard(tmp_path, shards, model_files, cpu_run):
    embed(shards, tmp_path, model_files, gpu_decode=True)
    run = RunDir(tmp_path)
    run.marker("embed", "1").unlink()
    run.samples_part(1).unlink()
    kept = run.samples_part(2).stat().st_mtime_ns
    report = embed(shards, tmp_path, model_files, gpu_decode=True)
    assert (report.tasks_run, report.tasks_skipped) == (1, 2)
    assert run.samples_part(2).stat().st_mtime_ns == kept
    assert_same_outputs(run, cpu_run, tolerance=0.05)


@pytest.mark.slow
def test_parallel_readers_give_the_same_outputs(tmp_path, shards, model_files, cpu_run):
    """Two spawned reader processes interleave three shards; outputs are those of the CPU stage."""
    embed(shards, tmp_path, model_files, gpu_decode=True, workers=2)
    assert_same_outputs(RunDir(tmp_path), cpu_run, tolerance=0.05)


@pytest.mark.gpu
def test_cuda_stage_matches_cpu_stage(tmp_path, shards, model_files, cpu_run):
    embed(shards, tmp_path, model_files, gpu_decode=True, workers=2, device="cuda")
    # fp16 and nvJPEG's own IDCT: vectors and colourfulness within wider tolerances.
    assert_same_samples(RunDir(tmp_path), cpu_run, colour_tolerance=1.0)
    _, vectors = load_embeddings(RunDir(tmp_path), "clip")
    assert np.all(relative_error(load_embeddings(cpu_run, "clip")[1], vectors) < 0.2)


def test_gpu_stage_only_for_clip_alone_on_the_local_engine(tmp_path, model_files):
    from dedup.descriptors import DescriptorBuilder
    from dedup.stages.embed_gpu import gpu_stage_for

    model, pretrained = model_files
    clip = DescriptorBuilder("clip", {"model": model, "pretrained": pretrained, "device": "cpu", "gpu_decode": True})
    run = RunDir(tmp_path)
    assert isinstance(gpu_stage_for(run, ["a.tar"], [clip], "local", 3, 64), GpuClipEmbedStage)
    # Ray actors run shards independently; perceptual needs per-image CPU decoding anyway.
    assert gpu_stage_for(run, ["a.tar"], [clip], "ray", 3, 64) is None
    assert gpu_stage_for(run, ["a.tar"], [DescriptorBuilder("perceptual"), clip], "local", 3, 64) is None
    off = DescriptorBuilder("clip", {**clip.options, "gpu_decode": False})
    assert gpu_stage_for(run, ["a.tar"], [off], "local", 3, 64) is None


def test_reader_module_starts_without_torch():
    """Spawned readers import only this module: torch would cost seconds per reader before the first shard."""
    import subprocess
    import sys

    code = "import sys, dedup.stages.embed_gpu_read; print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_failing_gpu_batch_fails_the_task_cleanly(tmp_path, shards, model_files, monkeypatch):
    """An error inside the preprocess thread surfaces as the task's failure (retried, then reported), never a hang."""
    from dedup.descriptors.gpu_decode import BatchPreprocess
    from dedup.engine import StageFailed

    def broken(self, datas):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(BatchPreprocess, "decode", broken)
    with pytest.raises(StageFailed, match="simulated device fault"):
        embed(shards[:1], tmp_path, model_files, gpu_decode=True)
    assert not RunDir(tmp_path).samples_part(0).exists()


def test_a_shard_cut_short_is_kept_and_retried_as_embed_stage_does(tmp_path, model_files):
    """Same contract as EmbedStage (tests/test_embed.py): readable samples written, task not done, failure recorded."""
    import tarfile
    from dataclasses import replace

    from conftest import jpeg_bytes, sample_members, write_tar
    from PIL import Image

    def photo(seed):
        return jpeg_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (80, 90, 3), dtype=np.uint8)))

    full = write_tar(tmp_path / "full.tar", [m for i in range(5) for m in sample_members(f"b{i}", photo(i))])
    with tarfile.open(full) as tar:
        cut_at = next(m.offset for m in tar.getmembers() if m.name == "b3.jpg")
    cut = tmp_path / "00000.tar"
    cut.write_bytes(full.read_bytes()[:cut_at])
    model, pretrained = model_files
    run = make_run(tmp_path / "out", [cut], descriptors=("clip",), device="cpu", batch_size=16,
                   model_options={"model": model, "pretrained": pretrained, "gpu_decode": True})
    run.settings = replace(run.settings, engine=replace(run.settings.engine, retries=1, retry_backoff_s=0))
    report = embed_stage.embed(run)
    assert set(report.failures) == {"0"} and report.stats["samples"] == 3
    assert pd.read_parquet(run.samples_part(0))["key"].tolist() == ["b0", "b1", "b2"]
    assert len(np.load(run.embedding_part("clip", 0))) == 3
    assert not run.marker("embed", "0").exists()
    (row,) = pd.read_parquet(run.failed_shards).to_dict("records")
    assert row["status"] == "truncated" and row["url"] == str(cut)
