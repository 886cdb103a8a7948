"""End-to-end: shards -> embed -> index -> neighbours -> clusters -> ranking -> manifests -> query."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_run

from dedup import pipeline
from dedup import settings as cfg
from dedup.loader import DropDuplicates
from dedup.records import RunDir
from dedup.run import Run
from dedup.settings import Settings
from dedup.stages.embed import resolve_workers
from dedup.stages.manifests import KeepPolicy, decide_keep
from dedup.stages.neighbors import NeighborsStage
from dedup.stages.query import query
from dedup.synth import build_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    shards, truth = build_demo(root / "shards")
    out = root / "run"
    ranking = pipeline.run_all(make_run(out, shards), with_report=False)
    return out, truth, ranking, shards


def test_every_sample_has_a_row_and_bad_ones_their_status(demo_run):
    out, truth, _, _ = demo_run
    clusters = pd.read_parquet(RunDir(out).clusters)
    assert len(clusters) == len(truth)
    merged = truth.merge(clusters, on="key")
    bad = merged[merged["family"] == "bad"]
    assert (bad["status"] == bad["expected_status"]).all(), bad[["key", "status", "expected_status"]]
    assert set(bad["status"]) >= {"truncated", "empty", "decode_error", "too_small", "missing_image"}


def test_largest_planted_group_is_ranked_first(demo_run):
    out, truth, ranking, _ = demo_run
    ok_truth = truth[truth["family"] != "bad"]
    biggest = ok_truth["group_id"].value_counts()
    top = ranking.iloc[0]
    members = pd.read_parquet(RunDir(out).clusters).query("cluster_id == @top.cluster_id")
    assert ok_truth.set_index("key").loc[members["key"], "group_id"].value_counts().idxmax() == biggest.index[0]
    # copy count within 10% of the planted count (hard copies may split off)
    assert abs(top["copies"] - biggest.iloc[0]) <= 0.1 * biggest.iloc[0]
    assert list(ranking["copies"]) == sorted(ranking["copies"], reverse=True)


def test_manifests_keep_exactly_one_per_cluster_under_first(demo_run):
    out, _, _, _ = demo_run
    run = RunDir(out)
    clusters = pd.read_parquet(run.clusters)
    manifests = pd.read_parquet(run.manifests_dir)  # one table; parquet readers skip manifests/_index.parquet
    assert len(manifests) == len(clusters)
    ok = clusters[clusters["status"] == "ok"].merge(manifests[["sample_id", "keep"]], on="sample_id")
    kept_per_cluster = ok.groupby("cluster_id")["keep"].sum()
    assert (kept_per_cluster == 1).all()
    # the kept one is the earliest sample of its cluster
    first = ok.sort_values("sample_id").groupby("cluster_id").head(1)
    assert first["keep"].all()
    removed = pd.read_parquet(run.remove_keys)
    assert len(removed) == (~manifests["keep"]).sum()
    assert set(removed.columns) == {"shard", "key", "occurrence", "sample_id", "cluster_id", "reason"}


def test_max_copies_policy_keeps_n(demo_run):
    out, _, _, _ = demo_run
    clusters = pd.read_parquet(RunDir(out).clusters)
    decided = decide_keep(clusters.assign(width=10, height=10), KeepPolicy.parse("max-copies=3"))
    ok = decided[decided["status"] == "ok"]
    kept = ok.groupby("cluster_id")["keep"].sum()
    sizes = ok.groupby("cluster_id").size()
    assert (kept == np.minimum(sizes, 3)).all()


def test_drop_duplicates_filters_a_webdataset_stream(demo_run):
    import webdataset as wds

    out, _, _, shards = demo_run
    removed = pd.read_parquet(RunDir(out).remove_keys)
    dataset = wds.WebDataset([str(p) for p in shards], shardshuffle=False).compose(DropDuplicates(out))
    kept = [(sample["__url__"], sample["__key__"]) for sample in dataset]
    assert kept and not (set(kept) & set(zip(removed["shard"], removed["key"], strict=False)))
    manifests = pd.read_parquet(RunDir(out).manifests_dir)
    assert set(kept) == set(zip(manifests.loc[manifests["keep"], "shard"], manifests.loc[manifests["keep"], "key"], strict=False))


def test_query_by_key_counts_equal_cluster_sizes(demo_run):
    out, _, ranking, _ = demo_run
    clusters = pd.read_parquet(RunDir(out).clusters)
    for row in ranking.head(5).itertuples():
        member = clusters[clusters["cluster_id"] == row.cluster_id].iloc[-1]
        (result,) = query(out, key=member["key"])
        assert result.copies == row.copies == result.cluster_size
        assert set(result.matches["key"]) == set(clusters.loc[clusters["cluster_id"] == row.cluster_id, "key"])


def _representative_image(out, shards, cluster_id, folder):
    """(the image file of the cluster's representative, copied out of its shard; its clusters.parquet row)."""
    import tarfile

    clusters = pd.read_parquet(RunDir(out).clusters)
    rep = clusters[(clusters["cluster_id"] == cluster_id) & clusters["is_representative"]].iloc[0]
    with tarfile.open(shards[int(rep["shard_index"])]) as tar:
        member = next(m for m in tar.getmembers() if m.name.split(".")[0] == rep["key"] and not m.name.endswith((".txt", ".json")))
        image = folder / ("query." + member.name.rsplit(".", 1)[1])
        image.write_bytes(tar.extractfile(member).read())
    return image, rep


def test_query_by_image_finds_the_cluster(demo_run, tmp_path):
    out, _, ranking, shards = demo_run
    top = ranking.iloc[0]
    image, _ = _representative_image(out, shards, top.cluster_id, tmp_path)
    (result,) = query(out, image=image)
    assert result.cluster_id == top.cluster_id
    # direct matches cover the cluster (up to a few transitive members)
    assert result.copies >= 0.9 * top.copies
    assert result.matches["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-3)


def test_queries_read_only_the_rows_they_need(demo_run, tmp_path, monkeypatch):
    """Key, image and copy-count answers come from filtered scans and memory-mapped vectors: a LAION-2B run's
    clusters.parquet (2e9 rows), samples and float32 vectors (6 TB) are never loaded whole."""
    import dedup.records as records

    out, _, ranking, shards = demo_run
    top = ranking.iloc[0]
    image, rep = _representative_image(out, shards, top.cluster_id, tmp_path)

    def whole(*args, **kwargs):
        raise AssertionError("a query loaded a whole table")

    monkeypatch.setattr(pd, "read_parquet", whole)
    monkeypatch.setattr(records, "load_embeddings", whole)
    monkeypatch.setattr(records, "load_samples", whole)
    (by_image,) = query(out, image=image)
    (by_key,) = query(out, key=rep["key"])
    assert by_image.cluster_id == by_key.cluster_id == top.cluster_id
    assert by_key.copies == top.copies == by_image.cluster_size


def test_run_resumes_without_redoing_stages(demo_run, tmp_path):
    out, _, ranking, shards = demo_run
    before = {p: p.stat().st_mtime_ns for p in RunDir(out).root.glob("embeddings/*/img_emb/*.npy")}
    again = pipeline.run_all(make_run(out, shards), with_report=False)
    after = {p: p.stat().st_mtime_ns for p in RunDir(out).root.glob("embeddings/*/img_emb/*.npy")}
    assert before == after
    pd.testing.assert_frame_equal(again, ranking)


# ---------------------------------------------------------------- kill -9 and resume

def _run_embed(shards: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dedup.cli", "embed", *shards, "--out", str(out), "--descriptor", "perceptual", "--workers", "1"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "120"})


def _tree(out: Path) -> dict[str, bytes]:
    result = {}
    for path in sorted(out.rglob("*")):
        # Markers hold timings, run.json the invocation, .lock the pid of the last writer: not outputs.
        if path.is_file() and "_markers" not in path.parts and path.name not in ("run.json", ".lock"):
            result[str(path.relative_to(out))] = path.read_bytes() if path.suffix == ".npy" else pd.read_parquet(path).to_json().encode() if path.suffix == ".parquet" else path.read_bytes()
    return result


def test_killed_embed_resumes_to_identical_output(tmp_path):
    shards, _ = build_demo(tmp_path / "shards")
    specs = [str(p) for p in shards]
    reference = tmp_path / "reference"
    assert _run_embed(specs, reference).wait(timeout=300) == 0

    out = tmp_path / "killed"
    proc = _run_embed(specs, out)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "_markers" / "embed").glob("*.done")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "_markers" / "embed").glob("*.done")))
    assert 1 <= done_before < len(shards), "kill must land mid-run for this test to mean anything"
    assert _run_embed(specs, out).wait(timeout=300) == 0
    assert _tree(out) == _tree(reference)
    leftovers = [p for p in out.rglob("*.tmp")]
    assert leftovers == []


def test_neighbour_search_in_small_row_blocks_equals_one_pass(demo_run, tmp_path):
    import shutil

    out, _, _, _ = demo_run
    run = RunDir(shutil.copytree(out, tmp_path / "copy"))
    threshold = cfg.Settings.load(run.run_config).search_thresholds["perceptual"]

    def edges(rows_per_task):
        stage = NeighborsStage(run, "perceptual", threshold, rows_per_task=rows_per_task)
        parts = []
        shutil.rmtree(run.neighbors_dir("perceptual"), ignore_errors=True)
        for task in stage.task_ids():
            stage.run_task(task, lambda n: None)
            parts.append(pd.read_parquet(run.neighbors_dir("perceptual") / f"part_{task}.parquet"))
        return pd.concat(parts).sort_values(["id_a", "id_b"], ignore_index=True)

    blocked = edges(37)
    whole = edges(10**6)
    assert len(blocked) > 0
    pd.testing.assert_frame_equal(blocked[["id_a", "id_b"]], whole[["id_a", "id_b"]])
    # a pair appears once, smaller id first
    assert (blocked["id_a"] < blocked["id_b"]).all() and not blocked.duplicated(["id_a", "id_b"]).any()


def test_ivf_runs_find_the_same_duplicates_as_exact_ones(demo_run, tmp_path):
    """An IVF-Flat index (the choice for large runs) takes the cell-join path; probing every cell it must be exact."""
    import shutil

    from dedup.records import load_embeddings
    from dedup.search.faiss_index import build_index
    from dedup.search.index_choice import spec_for_kind
    from dedup.stages.index import save_index

    out, _, _, _ = demo_run
    copy = RunDir(shutil.copytree(out, tmp_path / "ivf"))
    _, vectors = load_embeddings(copy, "perceptual")
    spec = spec_for_kind("ivf_flat", len(vectors), vectors.shape[1], gpu=False, nlist=8, nprobe=8)
    save_index(build_index(spec, vectors), spec, copy.index_dir, "perceptual")
    shutil.rmtree(copy.neighbors_dir("perceptual"))
    shutil.rmtree(copy.root / "_markers" / "neighbors-perceptual")
    reopened = Run.open(copy.root)
    pipeline.find_neighbors(reopened)
    pipeline.cluster(reopened)
    exact = pd.read_parquet(RunDir(out).clusters).set_index("sample_id")["cluster_id"]
    ivf = pd.read_parquet(copy.clusters).set_index("sample_id")["cluster_id"]
    assert (exact == ivf.reindex(exact.index)).all()


def test_decode_workers_leave_the_cores_to_a_cpu_model():
    cores = os.cpu_count() or 1
    assert resolve_workers(Settings(descriptors=["perceptual"])) == cores
    assert resolve_workers(Settings(descriptors=["perceptual", "clip"], device="cpu")) == 0
    assert resolve_workers(Settings(descriptors=["clip"], workers=3, device="cpu")) == 3


def test_adding_shards_embeds_only_the_new_ones_and_equals_a_run_from_scratch(tmp_path):
    shards, _ = build_demo(tmp_path / "shards")
    first, everything = shards[:2], shards
    grown = make_run(tmp_path / "grown", first)
    pipeline.run_all(grown, with_report=False)
    old_parts = {p: p.stat().st_mtime_ns for p in grown.root.glob("embeddings/*/img_emb/*.npy")}
    grown = make_run(tmp_path / "grown", everything)
    pipeline.run_all(grown, with_report=False)
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in old_parts.items()), "an old shard was embedded again"
    assert len(list(grown.root.glob("embeddings/*/img_emb/*.npy"))) == len(everything)
    scratch = make_run(tmp_path / "scratch", everything)
    pipeline.run_all(scratch, with_report=False)
    pd.testing.assert_frame_equal(pd.read_parquet(grown.clusters), pd.read_parquet(scratch.clusters))
    pd.testing.assert_frame_equal(pd.read_parquet(grown.remove_keys), pd.read_parquet(scratch.remove_keys))
    assert pd.read_parquet(grown.shards_table)["url"].tolist()[:2] == [str(s) for s in first]


def test_a_run_never_drops_or_renumbers_its_shards(tmp_path):
    from dedup.errors import StoreError

    shards, _ = build_demo(tmp_path / "shards")
    run = make_run(tmp_path / "run", shards)
    pipeline.embed(run)
    with pytest.raises(StoreError, match="not given now"):
        pipeline.embed(make_run(tmp_path / "run", shards[1:]))
