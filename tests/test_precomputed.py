"""Runs from precomputed embeddings (clip-retrieval / LAION layout): no images, same on-disk contracts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import precomputed_run

from dedup.errors import DedupError, StoreError
from dedup.pipeline import run_from_embeddings
from dedup.records import RunDir, load_samples, open_embeddings
from dedup.search.pairs import brute_force_pairs
from dedup.stages.precomputed import (
    PRECOMPUTED,
    PRECOMPUTED_THRESHOLD,
    ingest_embeddings,
    shard_and_key,
)

DIM = 48


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write_folder(root, parts, image_path=True, key=False, dtype=np.float16, scale=1.0, seed=0):
    """A clip-retrieval folder; part 1 plants 30 copies of one image. Returns all float32 rows."""
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    rows = []
    for p, n in enumerate(parts):
        x = _unit(rng.standard_normal((n, DIM)))
        if p == 1:
            x[:30] = _unit(x[40] + 0.01 * rng.standard_normal((30, DIM)))
        rows.append(x)
        np.save(root / "img_emb" / f"img_emb_{p}.npy", (x * scale).astype(dtype))
        meta = {"url": [f"https://site{p}.example/{r}.jpg" for r in range(n)], "caption": [f"c {r}" for r in range(n)]}
        if image_path:
            meta["image_path"] = [f"data/{p:05d}.tar/{p:05d}{r:04d}.jpg" for r in range(n)]
        if key:
            meta["key"] = [f"k{p}_{r}" for r in range(n)]
        pd.DataFrame(meta).to_parquet(root / "metadata" / f"metadata_{p}.parquet")
    return np.concatenate(rows).astype(np.float32)


def test_shard_and_key_from_image_path():
    assert shard_and_key("s3://b/laion/00012.tar/000120034.jpg") == ("s3://b/laion/00012.tar", "000120034")
    assert shard_and_key("000120034.jpg") == (None, "000120034")
    assert shard_and_key(None) == (None, None)


def test_ingest_writes_run_contracts_and_links_unit_float16(tmp_path, single_faiss_thread):
    rows = _write_folder(tmp_path / "emb", [200, 150])
    report = ingest_embeddings(precomputed_run(str(tmp_path / "emb"), tmp_path / "out"), str(tmp_path / "emb"))
    run = RunDir(tmp_path / "out")
    assert report.stats["samples"] == 350 and report.stats["linked_parts"] == 2
    assert run.embedding_part(PRECOMPUTED, 0).is_symlink()
    samples = load_samples(run)
    assert samples["shard"].iloc[0] == "data/00000.tar" and samples["key"].iloc[201] == "000010001"
    assert (samples["sample_id"].to_numpy() >> 32).tolist() == [0] * 200 + [1] * 150
    vectors = open_embeddings(run, PRECOMPUTED)
    np.testing.assert_allclose(vectors[:].astype(np.float32), rows, atol=2e-3)


def test_float32_and_unnormalised_parts_are_stored_as_unit_float16(tmp_path):
    _write_folder(tmp_path / "emb", [120], dtype=np.float32, scale=3.0)
    ingest_embeddings(precomputed_run(str(tmp_path / "emb"), tmp_path / "out"), str(tmp_path / "emb"))
    stored = np.load(RunDir(tmp_path / "out").embedding_part(PRECOMPUTED, 0))
    assert stored.dtype == np.float16 and not RunDir(tmp_path / "out").embedding_part(PRECOMPUTED, 0).is_symlink()
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_run_from_embeddings_finds_planted_copies_and_writes_removal_lists(tmp_path, single_faiss_thread):
    rows = _write_folder(tmp_path / "emb", [200, 150, 90], key=True)
    ranking = run_from_embeddings(precomputed_run(tmp_path / "emb", tmp_path / "out"), with_report=True)
    run = RunDir(tmp_path / "out")
    truth = brute_force_pairs(rows, np.arange(len(rows), dtype=np.int64), PRECOMPUTED_THRESHOLD)
    assert len(truth[0]) == 31 * 30 // 2  # the copies and nothing else pass the cut
    assert ranking["copies"].iloc[0] == 31  # 30 planted copies + the original
    removed = pd.read_parquet(run.remove_keys)
    assert len(removed) == 30 and set(removed["shard"]) == {"data/00001.tar"}
    by_url = pd.read_parquet(run.root / "remove_urls.parquet")
    assert by_url["url"].str.startswith("https://site1.example/").all() and by_url["key"].str.startswith("k1_").all()
    assert (run.report_dir / "index.html").exists()


def test_query_by_key_works_on_a_precomputed_run(tmp_path, single_faiss_thread):
    from dedup.stages.query import query

    _write_folder(tmp_path / "emb", [200, 150], key=True)
    run_from_embeddings(precomputed_run(tmp_path / "emb", tmp_path / "out"), with_report=False)
    (result,) = query(tmp_path / "out", key="k1_3")
    assert result.cluster_size == 31


def test_misaligned_metadata_is_a_user_error(tmp_path):
    _write_folder(tmp_path / "emb", [50])
    pd.DataFrame({"url": ["u"] * 49}).to_parquet(tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    with pytest.raises(StoreError, match="50 vectors but 49 metadata rows"):
        ingest_embeddings(precomputed_run(str(tmp_path / "emb"), tmp_path / "out"), str(tmp_path / "emb"))


def test_folder_without_parts_names_the_layout(tmp_path):
    (tmp_path / "emb").mkdir()
    with pytest.raises(DedupError, match="img_emb"):
        ingest_embeddings(precomputed_run(str(tmp_path / "emb"), tmp_path / "out"), str(tmp_path / "emb"))


def test_ingest_reads_fsspec_urls(tmp_path):
    rows = _write_folder(tmp_path / "emb", [80])
    ingest_embeddings(precomputed_run(f"file://{tmp_path / 'emb'}", tmp_path / "out"), f"file://{tmp_path / 'emb'}")
    stored = open_embeddings(RunDir(tmp_path / "out"), PRECOMPUTED)
    np.testing.assert_allclose(stored[:].astype(np.float32), rows, atol=2e-3)


def test_cli_run_with_embeddings(tmp_path):
    from typer.testing import CliRunner

    from dedup.cli import app

    _write_folder(tmp_path / "emb", [100, 60], key=True)
    result = CliRunner().invoke(app, ["run", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "out"),
                                      "--memory", "1GB", "--no-report"])
    assert result.exit_code == 0, result.output
    index = pd.read_parquet(tmp_path / "out" / "manifests" / "_index.parquet")
    assert len(index) == 2 and all((tmp_path / "out" / "manifests" / name).exists() for name in index["manifest"])
    # Beside shards the flag is taken (tests/test_precomputed_beside.py): a shard that is not there is the error.
    both = CliRunner().invoke(app, ["run", "x.tar", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "o2")])
    assert both.exit_code == 2 and "x.tar" in both.output and "Traceback" not in both.output
