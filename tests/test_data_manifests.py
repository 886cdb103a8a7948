"""The data manifests shipped in data_manifests/ load, and their patterns name the shards they claim."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dedup.data_manifest import expand_inputs, load_data_manifest
from dedup.stages.read import expand_shard_specs
from dedup.synth import DEMO_SAMPLES, DEMO_SHARDS, build_demo

MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"
ALL_MANIFESTS = sorted(MANIFESTS.glob("*.json"))


def test_the_expected_manifests_ship():
    assert {p.name for p in ALL_MANIFESTS} >= {"demo.json", "laion400m.json", "laion2b-en.json"}
    assert (MANIFESTS / "README.md").is_file()


@pytest.mark.parametrize("path", ALL_MANIFESTS, ids=lambda p: p.name)
def test_manifest_loads(path):
    manifest = load_data_manifest(path)
    assert manifest["name"] and manifest["description"]
    assert manifest["shards"] and all(isinstance(spec, str) for spec in manifest["shards"])
    for field in ("expected_shards", "expected_samples", "samples_per_shard"):
        assert isinstance(manifest[field], int) and manifest[field] > 0, field


@pytest.mark.parametrize("name", ["laion400m.json", "laion2b-en.json"])
def test_remote_patterns_expand_to_the_stated_shard_count(name):
    manifest = load_data_manifest(MANIFESTS / name)
    shards = expand_shard_specs(manifest["shards"])
    assert len(shards) == manifest["expected_shards"]
    assert all(s.startswith("s3://YOUR-BUCKET/") and s.endswith(".tar") for s in shards[:3] + shards[-3:])
    # Approximate, but consistent: the shards hold about the stated number of samples.
    assert 0.9 < manifest["expected_samples"] / (len(shards) * manifest["samples_per_shard"]) <= 1.0


def test_demo_manifest_matches_what_build_demo_writes(tmp_path):
    # Same relative layout as the repository: <root>/data_manifests/demo.json and <root>/demo_out/shards/.
    manifest_copy = tmp_path / "data_manifests" / "demo.json"
    manifest_copy.parent.mkdir()
    shutil.copy(MANIFESTS / "demo.json", manifest_copy)
    written, truth = build_demo(tmp_path / "demo_out" / "shards")

    manifest = load_data_manifest(manifest_copy)
    expected = [p.resolve() for p in written]
    # Paths come back as '<manifest folder>/../demo_out/...': compare the files they name.
    assert [Path(s).resolve() for s in expand_shard_specs(manifest["shards"])] == expected
    assert [Path(s).resolve() for s in expand_inputs([str(manifest_copy)])] == expected
    assert manifest["expected_shards"] == DEMO_SHARDS == len(written)
    assert manifest["expected_samples"] == DEMO_SAMPLES == len(truth)
