"""dedup/descriptors/__init__.py: the registry owns each descriptor's policy; a new one is one class + one entry."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from conftest import make_run
from PIL import Image

from dedup import pipeline
from dedup.descriptors import (
    REGISTRY,
    DescriptorInfo,
    builder_options,
    descriptor_policy,
    query_transform_for,
    register,
    resolve_descriptor_names,
    unregister,
)
from dedup.descriptors.base import l2_normalize
from dedup.errors import DedupError
from dedup.settings import Settings
from dedup.stages.embed import descriptor_builders
from dedup.synth import build_demo


class GridColour:
    """A toy descriptor: mean colour of a 4x4 grid (48-d). Enough to find exact and resized copies."""

    name: ClassVar[str] = "grid"
    dim = 48
    min_side = 16

    def __init__(self, cells: int = 4) -> None:
        self.cells = cells

    def prepare(self, image: Image.Image) -> np.ndarray:
        small = image.convert("RGB").resize((self.cells, self.cells), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32).reshape(-1)

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        centred = prepared - prepared.mean(axis=1, keepdims=True)
        return l2_normalize(centred)


@pytest.fixture
def toy_descriptor():
    register(DescriptorInfo("grid", "test_descriptors", "GridColour", "vector", False, "toy", default_threshold=0.99,
                            guard_offset=0.02, extra_options={"cells": 4}))
    yield
    unregister("grid")


def test_policy_lives_in_the_registry():
    assert descriptor_policy("clip").supports_text and descriptor_policy("clip").warm_up
    assert not descriptor_policy("perceptual").supports_text
    assert query_transform_for("perceptual") is not None and query_transform_for("clip") is None
    assert builder_options("clip", {"model": "m", "pretrained": "p", "device": "cpu", "other": 1}) == {
        "model": "m", "pretrained": "p", "device": "cpu"}
    assert builder_options("perceptual", {"model": "m"}) == {}


def test_default_descriptors_follow_the_gpu():
    assert resolve_descriptor_names([], cuda=False) == ["perceptual"]
    assert resolve_descriptor_names([], cuda=True) == ["perceptual", "clip"]
    with pytest.raises(DedupError):
        resolve_descriptor_names(["sha256"])
    with pytest.raises(DedupError):
        resolve_descriptor_names(["nonesuch"])


def test_a_registered_toy_descriptor_runs_end_to_end(toy_descriptor, tmp_path):
    settings = Settings.build(descriptors=["grid"])
    assert settings.thresholds["grid"] == 0.99 and settings.guards["grid"] == pytest.approx(0.97)
    assert [b.options for b in descriptor_builders(settings)] == [{"cells": 4}]
    shards, _truth = build_demo(tmp_path / "shards")
    run = make_run(tmp_path / "run", shards, descriptors=["grid"])
    pipeline.run_all(run, with_report=False)
    clusters = pd.read_parquet(run.clusters)
    assert "grid" in set(clusters["matched_by"])
    assert np.load(run.embedding_part("grid", 0)).shape[1] == 48
    # Every planted exact copy (same bytes) is in its original's cluster, whatever the toy finds.
    ok = clusters[clusters["status"] == "ok"]
    assert (ok.groupby("cluster_id").size() > 1).any()


def test_registry_lists_every_entry():
    assert {"sha256", "perceptual", "clip"} <= set(REGISTRY)


def test_cuda_check_needs_no_torch_import_where_no_gpu_driver_is_loaded(tmp_path, monkeypatch):
    import sys
    import types

    import dedup.descriptors as registry

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake)  # a torch that would say yes
    monkeypatch.setattr(registry.sys, "platform", "linux")
    monkeypatch.setattr(registry, "GPU_DRIVER_PATHS", (str(tmp_path / "no-driver"),))
    assert registry.cuda_available() is False  # answered from the driver files, torch never asked
    (tmp_path / "no-driver").touch()
    assert registry.cuda_available() is True  # a driver: torch decides


def test_choosing_default_descriptors_does_not_import_torch_on_a_machine_without_gpu():
    import subprocess
    import sys

    from dedup.descriptors import gpu_driver_present

    if gpu_driver_present():
        pytest.skip("a GPU driver is loaded here: torch is asked, as it should be")
    code = ("import sys; from dedup.settings import Settings; from dedup.descriptors import default_reason; "
            "s = Settings.build(shard_specs=['x.tar']); default_reason(); print(s.descriptors, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['perceptual'] False"
