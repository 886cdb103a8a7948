"""Incremental runs: more shards or embedding parts on an existing OUT extend the index and search only the new rows.

Every grown run is compared with a run from scratch over the same inputs:
identical edges (pairs, similarity within 1e-6), clusters, rankings and manifests.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import make_run, precomputed_run

from dedup import pipeline
from dedup.records import RunDir, open_embeddings
from dedup.search.new_pairs import pairs_with_earlier
from dedup.search.pairs import CellLists, brute_force_pairs
from dedup.stages.increment import generations_path
from dedup.stages.neighbors import NeighborsStage
from dedup.stages.precomputed import PRECOMPUTED

DIM = 48


# ---------------------------------------------------------------- comparing two runs


def _edges(run: RunDir, descriptor: str) -> pd.DataFrame:
    parts = sorted(run.neighbors_dir(descriptor).glob("part_*.parquet"))
    edges = pd.concat([pd.read_parquet(p, columns=["id_a", "id_b", "similarity"]) for p in parts], ignore_index=True)
    assert not edges.duplicated(["id_a", "id_b"]).any(), "a pair was reported twice"
    return edges.sort_values(["id_a", "id_b"], ignore_index=True)


def _manifests(run: RunDir) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_parquet(p) for p in sorted(run.manifests_dir.glob("*.parquet"))}


def assert_same_results(grown: RunDir, scratch: RunDir, descriptor: str) -> None:
    a, b = _edges(grown, descriptor), _edges(scratch, descriptor)
    assert len(a) > 0
    pd.testing.assert_frame_equal(a[["id_a", "id_b"]], b[["id_a", "id_b"]])
    np.testing.assert_allclose(a["similarity"], b["similarity"], atol=1e-6)
    for table in ("clusters", "top_duplicates", "remove_keys"):
        pd.testing.assert_frame_equal(pd.read_parquet(getattr(grown, table)), pd.read_parquet(getattr(scratch, table)))
    grown_manifests, scratch_manifests = _manifests(grown), _manifests(scratch)
    assert grown_manifests.keys() == scratch_manifests.keys()
    for name, frame in grown_manifests.items():
        pd.testing.assert_frame_equal(frame, scratch_manifests[name])


def _stamps(paths) -> dict:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _neighbour_markers(run: RunDir, descriptor: str) -> dict:
    return {p.name: json.loads(p.read_text()) for p in (run.root / "_markers" / f"neighbors-{descriptor}").glob("*.done")}


# ---------------------------------------------------------------- shards: a brace range with a gap, filled later


@pytest.fixture(scope="module")
def grown_demo(tmp_path_factory):
    """Demo shards 0, 1, 3 of a range `{00000..00003}` (2 is missing: --allow-missing), then the same OUT with all four."""
    from dedup.synth import build_demo

    root = tmp_path_factory.mktemp("incremental")
    shards, _ = build_demo(root / "demo")
    folder = root / "shards"
    folder.mkdir()
    for i in (0, 1, 3):
        shutil.copy(shards[i], folder / f"{i:05d}.tar")
    spec = str(folder / "{00000..00003}.tar")
    first = make_run(root / "grown", [spec], allow_missing=True)
    pipeline.run_all(first, with_report=False)
    before = {"edges": _stamps(first.neighbors_dir("perceptual").glob("part_*.parquet")),
              "markers": _neighbour_markers(first, "perceptual"),
              "rows": len(open_embeddings(first, "perceptual")),
              "missing": pd.read_parquet(first.missing_shards)["url"].tolist()}
    shutil.copy(shards[2], folder / "00002.tar")  # the download finally succeeded
    grown = make_run(root / "grown", [spec], allow_missing=True)
    pipeline.run_all(grown, with_report=False)
    order = pd.read_parquet(grown.shards_table)["url"].tolist()  # 00002 appended: the others keep their ids
    scratch = make_run(root / "scratch", order)
    pipeline.run_all(scratch, with_report=False)
    return grown, scratch, before, folder


def test_a_grown_shard_run_equals_a_run_from_scratch(grown_demo):
    grown, scratch, before, folder = grown_demo
    assert before["missing"] == [str(folder / "00002.tar")]
    assert not grown.missing_shards.exists()  # filled: no longer missing
    assert pd.read_parquet(grown.shards_table)["url"].tolist()[-1] == str(folder / "00002.tar")
    assert_same_results(grown, scratch, "perceptual")
    edges = _edges(grown, "perceptual")
    shard_a, shard_b = edges["id_a"].to_numpy() >> 32, edges["id_b"].to_numpy() >> 32
    assert ((shard_a != 3) & (shard_b == 3)).any()  # pairs across the growth (shard 3 is the one added)


def test_a_grown_run_searches_only_the_new_rows_and_keeps_the_old_edge_parts(grown_demo):
    grown, _, before, _ = grown_demo
    rows = len(open_embeddings(grown, "perceptual"))
    markers = _neighbour_markers(grown, "perceptual")
    kept = {name: m for name, m in markers.items() if name in before["markers"]}
    assert kept == before["markers"], "a task of the first run was searched again"
    new = [m for name, m in markers.items() if name not in before["markers"]]
    assert sum(m["stats"]["queries"] for m in new) == rows - before["rows"] > 0
    assert _stamps(before["edges"]) == before["edges"], "an old edge part was rewritten"
    record = json.loads(generations_path(grown.index_dir, "perceptual").read_text())
    assert record["bounds"] == [0, before["rows"], rows]


# ---------------------------------------------------------------- precomputed parts, IVF index with cells


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _planted_parts(sizes=(220, 180, 150, 130), seed=1) -> list[np.ndarray]:
    """Random rows plus copy groups within the old parts, old-new (part 1 -> 2, 3; part 0 -> 3) and new-new (2 -> 3)."""
    rng = np.random.default_rng(seed)
    parts = [_unit(rng.standard_normal((n, DIM))) for n in sizes]

    def plant(source: tuple[int, int], where: list[tuple[int, slice]]) -> None:
        original = parts[source[0]][source[1]]
        for part, rows in where:
            count = len(range(*rows.indices(len(parts[part]))))
            parts[part][rows] = _unit(original + 0.01 * rng.standard_normal((count, DIM)))

    plant((1, 40), [(1, slice(0, 20)), (2, slice(0, 8)), (3, slice(0, 4))])
    plant((2, 100), [(2, slice(20, 32)), (3, slice(10, 15))])
    plant((0, 5), [(0, slice(100, 103)), (3, slice(30, 36))])
    return parts


def _write_parts(root, parts: list[np.ndarray], which) -> None:
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    for p in which:
        np.save(root / "img_emb" / f"img_emb_{p}.npy", parts[p].astype(np.float16))
        n = len(parts[p])
        pd.DataFrame({"url": [f"https://site{p}.example/{r}.jpg" for r in range(n)],
                      "image_path": [f"data/{p:05d}.tar/{p:05d}{r:04d}.jpg" for r in range(n)],
                      "caption": [f"c {p} {r}" for r in range(n)]}).to_parquet(root / "metadata" / f"metadata_{p}.parquet")


@pytest.fixture
def forced_ivf(monkeypatch):
    """Exact search never affordable (IVF-Flat with ~14 cells at this size) and 3 of them probed, not all."""
    import dedup.search.index_choice as choice

    monkeypatch.setattr(choice, "EXACT_FLOP_BUDGET_CPU", 0.0)
    monkeypatch.setattr(choice, "DEFAULT_NPROBE", 3)


def _precomputed(source, out) -> RunDir:
    pipeline.run_from_embeddings(precomputed_run(source, out), with_report=False)
    return RunDir(out)


def test_grown_embedding_parts_extend_the_ivf_index_and_equal_a_run_from_scratch(tmp_path, forced_ivf,
                                                                                 single_faiss_thread):
    parts = _planted_parts()
    _write_parts(tmp_path / "emb", parts, [0, 1])
    first = _precomputed(tmp_path / "emb", tmp_path / "grown")
    quantizer = first.index_dir / f"{PRECOMPUTED}.quantizer.faiss"
    old = {"quantizer": _stamps([quantizer]), "edges": _stamps(first.neighbors_dir(PRECOMPUTED).glob("part_*.parquet")),
           "markers": _neighbour_markers(first, PRECOMPUTED)}
    _write_parts(tmp_path / "emb", parts, [2, 3])
    grown = _precomputed(tmp_path / "emb", tmp_path / "grown")
    scratch = _precomputed(tmp_path / "emb", tmp_path / "scratch")
    spec = json.loads((grown.index_dir / f"{PRECOMPUTED}.json").read_text())
    assert spec["kind"] == "ivf_flat" and spec["nprobe"] < spec["nlist"] and spec["n_vectors"] == sum(map(len, parts))
    assert _stamps([quantizer]) == old["quantizer"], "the quantizer was trained again"
    assert np.load(grown.index_dir / f"{PRECOMPUTED}.probes.npy").shape[0] == sum(map(len, parts))
    assert _stamps(old["edges"]) == old["edges"]
    markers = _neighbour_markers(grown, PRECOMPUTED)
    assert {k: markers[k] for k in old["markers"]} == old["markers"]
    new = [m["stats"]["queries"] for k, m in markers.items() if k not in old["markers"]]
    assert sum(new) == len(parts[2]) + len(parts[3])
    assert_same_results(grown, scratch, PRECOMPUTED)
    copies = pd.read_parquet(grown.top_duplicates)["copies"].tolist()
    assert copies == [33, 18, 10]  # 1 + 20 + 8 + 4, 1 + 12 + 5, 1 + 3 + 6: old-new and new-new pairs all found


def test_an_index_outgrowing_ram_keeps_extending_its_cell_layout(tmp_path, monkeypatch, single_faiss_thread):
    """The first run's IVF fits in RAM, the grown run's would need on-disk lists: both are the same cell layout.

    So the grown run extends it (quantizer kept, no .ivfdata anywhere), equals a
    run from scratch, and `query`'s searcher over it holds every row, once.
    """
    from dataclasses import replace

    import faiss

    import dedup.stages.increment as increment
    import dedup.stages.index as index_stage
    from dedup.search.index_choice import spec_for_kind
    from dedup.search.pairs import CellSearcher
    from dedup.stages.index import load_index

    def ram_then_disk(n, dim, budget, gpu=False, query_variants=1):  # 12 cells, 3 probed; on disk above 400 rows
        return replace(spec_for_kind("ivf_flat", n, dim, nlist=12, nprobe=3), on_disk=n > 400)

    for module in (index_stage, increment):
        monkeypatch.setattr(module, "choose_index_streaming", ram_then_disk)
    parts = _planted_parts()
    _write_parts(tmp_path / "emb", parts, [0, 1])
    first = _precomputed(tmp_path / "emb", tmp_path / "grown")
    quantizer = _stamps([first.index_dir / f"{PRECOMPUTED}.quantizer.faiss"])
    _write_parts(tmp_path / "emb", parts, [2, 3])
    grown = _precomputed(tmp_path / "emb", tmp_path / "grown")
    assert _stamps(quantizer) == quantizer, "the quantizer was trained again"
    assert json.loads(generations_path(grown.index_dir, PRECOMPUTED).read_text())["bounds"] == [0, 400, 680]
    assert not list(grown.index_dir.glob("*ivfdata"))
    assert_same_results(grown, _precomputed(tmp_path / "emb", tmp_path / "scratch"), PRECOMPUTED)
    searcher, spec = load_index(grown.index_dir, PRECOMPUTED)
    assert isinstance(searcher, CellSearcher) and spec.storage == "cells" and spec.nlist == 12
    assert spec.n_vectors == searcher.ntotal == sum(map(len, parts))
    searcher.nprobe = spec.nlist  # every cell: the range search is exact
    x = open_embeddings(grown, PRECOMPUTED)[:].astype(np.float32)
    lims, _, labels = searcher.range_search(x[::9], 0.9)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    flat_lims, _, flat_labels = flat.range_search(x[::9], 0.9)
    assert np.array_equal(lims, flat_lims) and len(labels) > len(x[::9])
    for q in range(len(lims) - 1):
        assert sorted(labels[lims[q] : lims[q + 1]]) == sorted(flat_labels[flat_lims[q] : flat_lims[q + 1]])


def test_a_changed_old_part_rebuilds_the_index_and_searches_everything_again(tmp_path, forced_ivf,
                                                                              single_faiss_thread):
    parts = _planted_parts()
    _write_parts(tmp_path / "emb", parts, [0, 1])
    first = _precomputed(tmp_path / "emb", tmp_path / "grown")
    lineage = json.loads(generations_path(first.index_dir, PRECOMPUTED).read_text())["lineage"]
    old_markers = _neighbour_markers(first, PRECOMPUTED)
    parts[0][150:160] = _unit(parts[0][150] + 0.01 * np.random.default_rng(7).standard_normal((10, DIM)))
    _write_parts(tmp_path / "emb", parts, [0, 2, 3])  # part 0 re-exported with a new copy group
    grown = _precomputed(tmp_path / "emb", tmp_path / "grown")
    record = json.loads(generations_path(grown.index_dir, PRECOMPUTED).read_text())
    assert record["bounds"] == [0, sum(map(len, parts))] and record["lineage"] != lineage
    markers = _neighbour_markers(grown, PRECOMPUTED)
    assert all(markers.get(name) != marker for name, marker in old_markers.items()), "an old search was kept"
    assert sum(m["stats"]["queries"] for m in markers.values()) == sum(map(len, parts))
    assert_same_results(grown, _precomputed(tmp_path / "emb", tmp_path / "scratch"), PRECOMPUTED)
    assert 10 in pd.read_parquet(grown.top_duplicates)["copies"].tolist()


def test_a_cell_layout_extends_only_with_the_settings_and_growth_it_was_built_for(tmp_path, forced_ivf, monkeypatch):
    """Another threshold (another nprobe), budget or GPU setting, or more than MAX_GROWTH x the rows: rebuild."""
    import dedup.stages.increment as increment
    from dedup.stages.precomputed import ingest_embeddings

    parts = _planted_parts()
    _write_parts(tmp_path / "emb", parts, [0, 1])
    run = _precomputed(tmp_path / "emb", tmp_path / "out")
    _write_parts(tmp_path / "emb", parts, [2, 3])
    ingest_embeddings(precomputed_run(tmp_path / "emb", tmp_path / "out"), str(tmp_path / "emb"))  # parts 2, 3 in
    settings = json.loads(generations_path(run.index_dir, PRECOMPUTED).read_text())["settings"]
    assert set(settings) == {"memory", "gpu", "threshold"}
    assert increment.growth_rows(run, PRECOMPUTED, settings) == 400
    for changed in ({"threshold": 0.5}, {"memory": settings["memory"] * 2}, {"gpu": True}):
        assert increment.growth_rows(run, PRECOMPUTED, {**settings, **changed}) is None, changed
    monkeypatch.setattr(increment, "MAX_GROWTH", 1.5)  # 680 rows > 1.5 x the 400 the quantizer was trained on
    assert increment.growth_rows(run, PRECOMPUTED, settings) is None


def test_blocks_of_every_generation_find_each_pair_once(tmp_path, forced_ivf, single_faiss_thread):
    """Small row blocks across three generations, the first one's blocks rerun after the extensions."""
    parts = _planted_parts()
    for which in ([0, 1], [2], [3]):
        _write_parts(tmp_path / "emb", parts, which)
        run = _precomputed(tmp_path / "emb", tmp_path / "out")
    assert json.loads(generations_path(run.index_dir, PRECOMPUTED).read_text())["bounds"] == [0, 400, 550, 680]
    threshold = json.loads(run.run_config.read_text())["search_thresholds"][PRECOMPUTED]
    stage = NeighborsStage(run, PRECOMPUTED, threshold, rows_per_task=97)
    shutil.rmtree(run.neighbors_dir(PRECOMPUTED))
    for task in stage.task_ids():
        stage.run_task(task, lambda n: None)
    assert "g2-1" in stage.task_ids() and "4" in stage.task_ids()
    vectors = open_embeddings(run, PRECOMPUTED)
    truth = brute_force_pairs(vectors[:].astype(np.float32), vectors.ids, threshold)
    found = _edges(run, PRECOMPUTED)
    assert list(zip(found["id_a"], found["id_b"], strict=True)) == sorted(zip(truth[0], truth[1], strict=True))


# ---------------------------------------------------------------- the backward join alone


@pytest.mark.parametrize("variants", [1, 3])
def test_pairs_with_earlier_rows_are_the_brute_force_pairs_across_the_boundary(variants):
    rng = np.random.default_rng(3)
    x = _unit(rng.standard_normal((300, 16)))
    x[250:270] = _unit(x[10] + 0.05 * rng.standard_normal((20, 16)))
    x[280:290] = _unit(x[260] + 0.05 * rng.standard_normal((10, 16)))

    def transform(rows):  # the identity, a sign flip of half the coordinates, its negative: a group of symmetries
        flip = np.where(np.arange(16) < 8, -1.0, 1.0).astype(np.float32)
        return np.stack([rows, rows * flip, -rows][:variants])

    ids = np.arange(300, dtype=np.int64) * 7
    earlier, threshold = 200, 0.9
    truth = brute_force_pairs(x, ids, threshold, query_transform=transform if variants > 1 else None)
    across = (truth[0] < ids[earlier]) & (truth[1] >= ids[earlier])
    expected = sorted(zip(truth[0][across], truth[1][across], strict=True))
    exact = list(pairs_with_earlier(x, ids, threshold, slice(200, 300), earlier, block_size=37,
                                    query_transform=transform if variants > 1 else None))
    assert sorted(zip(np.concatenate([p[0] for p in exact]), np.concatenate([p[1] for p in exact]), strict=True)) == expected
    import faiss

    quantizer = faiss.IndexFlatIP(16)
    quantizer.add(x[::30])  # 10 cells
    _, probes = quantizer.search(x, 10)  # every cell probed: the cell join is exact
    cells = list(pairs_with_earlier(x, ids, threshold, slice(200, 300), earlier, lists=CellLists.from_probes(probes, 10),
                                    quantizer=quantizer, block_size=37,
                                    query_transform=transform if variants > 1 else None))
    got = sorted(zip(np.concatenate([p[0] for p in cells]), np.concatenate([p[1] for p in cells]), strict=True))
    assert got == expected and len(expected) > 20
