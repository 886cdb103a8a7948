from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

# Tests never reach a model hub: only checkpoints the tests write are loaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
REAL_DUPS = REPO.parent / "shared" / "data" / "real-dups"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def single_faiss_thread():
    """Tiny problems: OpenMP threads only add spin-wait overhead (5x on a loaded 2-core box)."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


@pytest.fixture(scope="session")
def real_dups() -> Path:
    if not (REAL_DUPS / "groups.csv").exists():
        pytest.skip(f"real-dups data not found at {REAL_DUPS} (it ships in ../shared beside the repo)")
    return REAL_DUPS


def jpeg_bytes(image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], tar_format: int = tarfile.DEFAULT_FORMAT) -> Path:
    """Deterministic tar with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, image: bytes | None, caption: str = "a photo", url: str | None = None,
                   ext: str = "jpg", extra_json: dict | None = None) -> list[tuple[str, bytes]]:
    meta = {"key": key, "url": url or f"https://example.com/{key}.jpg", "caption": caption}
    if image is not None:
        meta["sha256"] = hashlib.sha256(image).hexdigest()
    meta.update(extra_json or {})
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def make_run(out: Path, shards, *, descriptors=("perceptual",), workers: int = 0, memory: str = "1GB",
             keep: str = "first", engine: str = "local", **settings):
    """A run context as the CLI makes one: validated settings, run.json written, progress off."""
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings

    requested = Settings.build(shard_specs=[str(s) for s in shards], descriptors=list(descriptors), workers=workers,
                               memory=memory, keep=keep, engine=EngineSettings(name=engine, show_progress=False),
                               **settings)
    return Run.start(out, requested)


@pytest.fixture(scope="session")
def demo_session_run(tmp_path_factory):
    """One `dedup demo`-style run (every stage, report included) shared by the tests that only read it.

    Tests that change a run copy it first (shutil.copytree) so the others keep seeing the original.
    """
    from dedup import pipeline
    from dedup.synth import build_demo

    root = tmp_path_factory.mktemp("demo-session")
    shards, truth = build_demo(root / "shards")
    run = make_run(root / "run", shards)
    ranking = pipeline.run_all(run)
    return run, truth, ranking, shards


def precomputed_run(source, out: Path, memory: str | int = "1GB"):
    """A run over a precomputed-embeddings folder, as `dedup run --embeddings` makes one."""
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings

    settings = Settings.build(shard_specs=[str(source)], descriptors=["precomputed"], memory=memory,
                              engine=EngineSettings(show_progress=False))
    return Run.start(out, settings)


@pytest.fixture(scope="module")
def demo_copy(demo_session_run, tmp_path_factory):
    """A private copy of the shared demo run, for tests that rerun stages or write overrides."""
    import shutil

    from dedup.run import RunDir

    run = demo_session_run[0]
    return RunDir(shutil.copytree(run.root, tmp_path_factory.mktemp("demo-copy") / "run", symlinks=True))
