"""Scale design: memory-mapped vector parts, one-pass IVF build, query-block cell join, on-disk lists."""

from __future__ import annotations

import pickle

import faiss
import numpy as np
import pandas as pd
import pytest
from conftest import precomputed_run

from dedup.errors import IndexInfeasible
from dedup.records import VectorParts, load_edges, open_embeddings
from dedup.search.faiss_index import probe_cells, quantizer_of, train_cells_quantizer, train_index
from dedup.search.index_choice import choose_index_streaming, index_stage_bytes, spec_for_kind
from dedup.search.pairs import (
    CellLists,
    ProbeLists,
    brute_force_pairs,
    cell_work,
    find_pairs,
    find_pairs_by_cell,
    find_pairs_cells,
    find_pairs_ivf_join,
    split_cells,
)
from dedup.stages.index import build_descriptor_index, cell_paths, group_rows_by_cell, load_index
from dedup.stages.precomputed import ingest_embeddings

DIM = 32


def _grouped(n=3000, groups=120, copies=8, noise=0.08, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((groups, DIM))
    x = np.concatenate([rng.standard_normal((n - groups * copies, DIM)),
                        np.repeat(base, copies, axis=0) + noise * rng.standard_normal((groups * copies, DIM))])
    x = x[rng.permutation(n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _parts(tmp_path, x, sizes):
    paths, start = [], 0
    for p, size in enumerate(sizes):
        paths.append(tmp_path / f"img_emb_{p}.npy")
        np.save(paths[-1], x[start : start + size])
        start += size
    return VectorParts(paths, np.arange(len(x), dtype=np.int64) * 3)


def _pair_set(blocks):
    return {(int(a), int(b)) for block in blocks for a, b in zip(block[0], block[1], strict=True)}


def test_vector_parts_reads_rows_across_parts(tmp_path):
    x = _grouped(n=500, groups=20)
    parts = _parts(tmp_path, x, [100, 1, 250, 149])
    assert parts.shape == (500, DIM) and parts.dtype == np.float16
    np.testing.assert_array_equal(parts[95:360], x[95:360])
    rows = np.array([499, 0, 100, 101, 100, 350])
    np.testing.assert_array_equal(parts[rows], x[rows])
    np.testing.assert_array_equal(parts[7], x[7])
    blocks = list(parts.blocks(128))
    assert [b[0].stop for b in blocks] == [128, 256, 384, 500] and blocks[0][1].dtype == np.float32
    again = pickle.loads(pickle.dumps(parts))
    np.testing.assert_array_equal(again[98:103], x[98:103])


def _ivf(x, nlist, nprobe):
    spec = spec_for_kind("ivf_flat", len(x), DIM, nlist=nlist, nprobe=nprobe)
    index = train_index(spec, x)
    probes = probe_cells(quantizer_of(index), x, nprobe, np.empty((len(x), nprobe), np.int32))
    return index, CellLists.from_probes(probes, nlist)


@pytest.mark.parametrize("transform", [None, "flip"])
def test_cell_join_in_blocks_equals_whole_ivf_join(tmp_path, single_faiss_thread, transform):
    x = _grouped()
    flip = (lambda rows: np.stack([rows, rows[:, ::-1]])) if transform else None
    index, lists = _ivf(x, nlist=24, nprobe=3)
    vectors = _parts(tmp_path, x, [1000, 1200, 800])
    ids = vectors.ids
    whole = _pair_set(find_pairs_ivf_join(index, x.astype(np.float32), ids, 0.9, nprobe=3, query_transform=flip))
    blocked = set()
    for rows in (slice(0, 700), slice(700, 2222), slice(2222, 3000)):
        blocked |= _pair_set(find_pairs_cells(vectors, ids, 0.9, lists, rows=rows, quantizer=quantizer_of(index),
                                              query_transform=flip, block_size=500, max_pairs=7))
    assert len(whole) > 400 and blocked == whole


def test_cell_join_probing_every_cell_is_exact_and_never_repeats_a_pair(tmp_path, single_faiss_thread):
    x = _grouped(copies=30, groups=40, noise=0.05)
    _, lists = _ivf(x, nlist=16, nprobe=16)
    found = list(find_pairs_cells(x, np.arange(len(x), dtype=np.int64), 0.92, lists, block_size=333, max_pairs=50))
    a = np.concatenate([f[0] for f in found])
    truth = brute_force_pairs(x.astype(np.float32), np.arange(len(x), dtype=np.int64), 0.92)
    assert len(found) > 3  # split by max_pairs
    assert len(a) == len(_pair_set(found)) == len(truth[0]) and _pair_set(found) == _pair_set([truth])


def test_knn_saturation_redo_works_on_memory_mapped_parts(tmp_path, single_faiss_thread):
    """The GPU path's interface (knn_cap, exact redo of saturated queries), run on CPU over float16 maps."""
    x = _grouped(copies=12, groups=60, noise=0.05)
    vectors = _parts(tmp_path, x, [1500, 1500])
    index = faiss.IndexFlatIP(DIM)
    index.add(x.astype(np.float32))
    capped = _pair_set(find_pairs(index, vectors, vectors.ids, 0.9, knn_cap=3, block_size=400))
    truth = _pair_set([brute_force_pairs(x.astype(np.float32), vectors.ids, 0.9)])
    assert len(truth) > 60 * 12 * 11 // 2 * 0.9 and capped == truth


def test_streaming_choice_goes_on_disk_only_when_nothing_fits():
    in_ram = choose_index_streaming(2_000_000, 768, 8 << 30)
    assert not in_ram.on_disk
    # 200M x 64-d: even PQ8 codes (20 B a vector) exceed 3 GiB, so the lists go to disk.
    tight = choose_index_streaming(200_000_000, 64, 3 << 30)
    assert tight.kind == "ivf_flat" and tight.on_disk
    assert tight.memory_bytes == index_stage_bytes(tight, 3 << 30) <= 3 << 30
    with pytest.raises(IndexInfeasible, match="training vectors"):
        choose_index_streaming(2_000_000_000, 768, 4 << 30)


def _run_from(tmp_path, x, sizes, memory):
    root = tmp_path / "emb"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    start = 0
    for p, size in enumerate(sizes):
        np.save(root / "img_emb" / f"img_emb_{p}.npy", x[start : start + size])
        pd.DataFrame({"key": [f"{p}_{r}" for r in range(size)]}).to_parquet(root / "metadata" / f"metadata_{p}.parquet")
        start += size
    run = precomputed_run(root, tmp_path / "out", memory=memory)
    ingest_embeddings(run, str(root))
    return run


def test_cell_layout_holds_no_vectors_and_its_query_search_is_exact(tmp_path, single_faiss_thread, monkeypatch):
    """Index = quantizer + rows by cell (no copy of the vectors); query and neighbour search score from the maps."""
    import dedup.stages.index as index_stage
    from dedup.search.pairs import CellSearcher
    from dedup.stages.neighbors import find_neighbors

    x = _grouped(n=4000, copies=10, groups=100, noise=0.05)
    run = _run_from(tmp_path, x, [1500, 1500, 1000], memory=64 << 20)
    monkeypatch.setattr(index_stage, "choose_index_streaming", lambda *a, **k: spec_for_kind(
        "ivf_flat", 4000, DIM, nlist=30, nprobe=4))
    spec = build_descriptor_index(run, "precomputed", budget=64 << 20)
    assert spec.storage == "cells" and spec.nprobe == 4 and 2 <= spec.nlist <= 30
    files = [p for p in run.index_dir.iterdir() if p.is_file()]
    assert not cell_paths(run.index_dir, "precomputed")["ivfdata"].exists()
    # No file holds the vectors: the largest, the inverse probe lists, is nprobe int64 a row (32 B < 64 B a row).
    assert max(p.stat().st_size for p in files) < x.nbytes * 0.6
    index, loaded = load_index(run.index_dir, "precomputed")
    assert isinstance(index, CellSearcher) and loaded == spec and index.ntotal == 4000
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x.astype(np.float32))
    index.nprobe = spec.nlist  # every cell: the range search must equal the exact one, labels and scores
    lims, sims, labels = index.range_search(x[:50].astype(np.float32), 0.9)
    flat_lims, flat_sims, flat_labels = flat.range_search(x[:50].astype(np.float32), 0.9)
    np.testing.assert_array_equal(lims, flat_lims)
    for q in range(50):
        mine, theirs = np.argsort(labels[lims[q]:lims[q + 1]]), np.argsort(flat_labels[lims[q]:lims[q + 1]])
        np.testing.assert_array_equal(labels[lims[q]:lims[q + 1]][mine], flat_labels[lims[q]:lims[q + 1]][theirs])
        np.testing.assert_allclose(sims[lims[q]:lims[q + 1]][mine], flat_sims[lims[q]:lims[q + 1]][theirs], atol=1e-5)
    find_neighbors(run, gpu=False)
    edges = load_edges(run, "precomputed", 0.94)
    vectors = open_embeddings(run, "precomputed")
    truth = brute_force_pairs(x.astype(np.float32), vectors.ids, 0.94)
    found = set(zip(edges["id_a"], edges["id_b"], strict=True))
    recall = len(found & _pair_set([truth])) / len(truth[0])
    assert recall >= 0.98 and found <= _pair_set([truth])


def test_neighbour_stage_does_not_read_the_full_index(tmp_path, single_faiss_thread, monkeypatch):
    import dedup.stages.index as index_stage
    from dedup.stages.neighbors import find_neighbors

    x = _grouped(n=3000)
    run = _run_from(tmp_path, x, [3000], memory=1 << 30)
    spec = choose_index_streaming(3000, DIM, 1 << 30)
    monkeypatch.setattr(index_stage, "choose_index_streaming", lambda *a, **k: spec_for_kind(
        "ivf_flat", 3000, DIM, nlist=20, nprobe=20))
    build_descriptor_index(run, "precomputed", budget=1 << 30)
    assert spec.kind == "flat"  # the automatic choice at this size, overridden above

    def refuse(*args, **kwargs):
        raise AssertionError("the neighbour stage read the full index")

    monkeypatch.setattr(index_stage, "load_index", refuse)
    find_neighbors(run, gpu=False)
    edges = load_edges(run, "precomputed", 0.94)
    truth = brute_force_pairs(x.astype(np.float32), open_embeddings(run, "precomputed").ids, 0.94)
    assert set(zip(edges["id_a"], edges["id_b"], strict=True)) == _pair_set([truth])


def test_rows_grouped_by_cell_out_of_core_equal_a_stable_argsort(tmp_path):
    home = np.random.default_rng(3).integers(0, 37, size=10_000).astype(np.int32)
    bounds = group_rows_by_cell(home, 40, tmp_path / "rows.npy", block_rows=777)
    rows = np.load(tmp_path / "rows.npy")
    np.testing.assert_array_equal(rows, np.argsort(home, kind="stable"))
    np.testing.assert_array_equal(bounds, np.searchsorted(np.sort(home), np.arange(41)))


def test_components_from_streamed_edge_parts_equal_in_memory_components(tmp_path):
    from dedup.search.union_find import components_from_edge_parts, connected_components

    rng = np.random.default_rng(5)
    n = 5000
    a, b = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    chain = np.arange(1000, 1400)  # a long chain arriving in reverse order stresses path lengths
    a, b = np.concatenate([a, chain[::-1][1:]]), np.concatenate([b, chain[::-1][:-1]])
    labels = np.lib.format.open_memmap(tmp_path / "labels.npy", mode="w+", dtype=np.int64, shape=(n,))
    parts = ((a[s : s + 250], b[s : s + 250]) for s in range(0, len(a), 250))
    streamed = components_from_edge_parts(n, parts, labels=labels, block_nodes=999)
    np.testing.assert_array_equal(np.asarray(streamed), connected_components(n, a, b))
    assert len(np.unique(streamed[chain])) == 1


def test_a_task_with_many_edges_writes_several_files_with_the_same_edges(tmp_path, single_faiss_thread, monkeypatch):
    from dedup.stages import neighbors

    x = _grouped(n=2000, copies=40, groups=10, noise=0.03)
    run = _run_from(tmp_path, x, [2000], memory=1 << 30)
    build_descriptor_index(run, "precomputed", budget=1 << 30)
    neighbors.find_neighbors(run, gpu=False)
    whole = load_edges(run, "precomputed", 0.94)
    neighbors.clear_stage(run, "neighbors-precomputed", run.neighbors_dir("precomputed"))
    monkeypatch.setattr(neighbors, "EDGES_PER_FILE", 1000)
    neighbors.find_neighbors(run, gpu=False)
    files = sorted(p.name for p in run.neighbors_dir("precomputed").glob("part_*.parquet"))
    split = load_edges(run, "precomputed", 0.94)
    assert len(files) > 3 and "part_0.1.parquet" in files
    assert len(whole) == len(split) >= 10 * 40 * 39 // 2
    pd.testing.assert_frame_equal(whole.sort_values(["id_a", "id_b"], ignore_index=True),
                                  split.sort_values(["id_a", "id_b"], ignore_index=True))


def test_query_block_size_follows_the_memory_budget():
    from dedup.stages.neighbors import rows_per_task_for

    small, large = rows_per_task_for(256 << 20, 768, 1), rows_per_task_for(8 << 30, 768, 1)
    assert 1024 <= small < large and small * 768 * 4 * 4 <= (256 << 20) // 4
    assert rows_per_task_for(8 << 30, 256, 8) < rows_per_task_for(8 << 30, 256, 1)


def test_a_large_duplicate_group_is_not_split_over_many_cells(single_faiss_thread):
    """k-means spends many centroids on a dense 1,500-copy blob; merged, the blob is one cell."""
    rng = np.random.default_rng(11)

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    background = unit(rng.standard_normal((4500, DIM)))
    base = unit(rng.standard_normal(DIM))
    copies = base + 0.1 * unit(rng.standard_normal((1500, DIM)))  # any two copies at cosine >= 0.98
    x = unit(np.concatenate([background, copies])).astype(np.float16)
    group = np.arange(4500, 6000)
    spec = spec_for_kind("ivf_flat", len(x), DIM, nlist=60, nprobe=2)

    def home_cells(index):
        cells = probe_cells(quantizer_of(index), x, 2, np.empty((len(x), 2), np.int32))
        return cells, len(np.unique(cells[group, 0]))

    _, split = home_cells(train_index(spec, x, merge_cosine=None))
    merged_index = train_index(spec, x)
    cells, merged = home_cells(merged_index)
    assert split > 2 and merged == 1  # more cells than nprobe=2 reaches, then one
    lists = CellLists.from_probes(cells, faiss.extract_index_ivf(merged_index).nlist)
    found = _pair_set(find_pairs_cells(x, np.arange(len(x), dtype=np.int64), 0.96, lists))
    in_group = {(a, b) for a, b in found if a >= 4500}
    assert len(in_group) == 1500 * 1499 // 2
    # The cell layout's quantizer (bounded sample, nprobe 2) merges the blob the same way.
    quantizer = train_cells_quantizer(spec, x, points=len(x))
    cells = probe_cells(quantizer, x, 2, np.empty((len(x), 2), np.int32))
    unmerged = train_cells_quantizer(spec, x, points=len(x), merge_cosine=None)
    assert quantizer.ntotal < unmerged.ntotal and len(np.unique(cells[group, 0])) == 1


def test_streaming_choice_counts_the_training_sample():
    from dedup.search.index_choice import choose_index

    n, dim = 1_000_000, 768
    ivf_flat = spec_for_kind("ivf_flat", n, dim)
    budget = ivf_flat.memory_bytes + 1  # the index alone fits, index + training sample does not
    assert choose_index(n, dim, budget).kind == "ivf_flat"
    streamed = choose_index_streaming(n, dim, budget)
    assert streamed.kind == "ivf_pq" and index_stage_bytes(streamed) <= budget


def test_gpu_build_goes_through_the_same_block_interface(tmp_path, single_faiss_thread, monkeypatch):
    """gpu=True: k-means and the probe pass on the 'GPU' (a recording stand-in here), cells, exact join."""
    import dedup.search.faiss_index as faiss_index
    import dedup.stages.index as index_stage
    from dedup.stages.neighbors import find_neighbors

    x = _grouped(n=3000, copies=10, groups=80, noise=0.05)
    run = _run_from(tmp_path, x, [2000, 1000], memory=1 << 30)
    calls = {"kmeans_gpu": [], "searched_rows": 0}
    real_kmeans = faiss_index._kmeans

    class FakeGpuIndex:  # what index_cpu_to_all_gpus returns: the same `search` interface
        def __init__(self, index):
            self.index = index

        def search(self, block, k):
            calls["searched_rows"] += len(block)
            return self.index.search(block, k)

    monkeypatch.setattr(faiss_index, "_require_gpu", lambda: None)
    monkeypatch.setattr(faiss_index, "_to_gpu", FakeGpuIndex)
    monkeypatch.setattr(faiss_index, "_kmeans", lambda sample, k, seed, gpu=False: (
        calls["kmeans_gpu"].append(gpu), real_kmeans(sample, k, seed))[1])
    monkeypatch.setattr(index_stage, "choose_index_streaming", lambda *a, **k: spec_for_kind(
        "ivf_flat", 3000, DIM, nlist=20, nprobe=3, gpu=True))
    spec = build_descriptor_index(run, "precomputed", budget=1 << 30, gpu=True)
    assert spec.use_gpu and spec.storage == "cells" and "HNSW" not in spec.factory
    assert calls == {"kmeans_gpu": [True], "searched_rows": 3000}  # one probe pass, on the device
    find_neighbors(run, gpu=True)  # knn_cap 2048 on GPU: the cell layout is joined instead, exactly
    edges = load_edges(run, "precomputed", 0.94)
    probes = np.load(cell_paths(run.index_dir, "precomputed")["probes.npy"])
    lists = CellLists.from_probes(probes, spec.nlist)
    vectors = open_embeddings(run, "precomputed")
    same = _pair_set(find_pairs_cells(x, vectors.ids, 0.94, lists))
    assert set(zip(edges["id_a"], edges["id_b"], strict=True)) == same
    truth = _pair_set([brute_force_pairs(x.astype(np.float32), vectors.ids, 0.94)])
    assert same <= truth and len(same) >= 0.98 * len(truth)


def test_query_search_on_a_cell_layout_is_exact(tmp_path, single_faiss_thread, monkeypatch):
    """query.search_external over a CellSearcher: every match re-scored, none missed when all cells are probed."""
    import dedup.search.index_choice as index_choice
    import dedup.stages.index as index_stage
    from dedup.stages.query import search_external

    x = _grouped(n=3000, copies=10, groups=80, noise=0.05)
    run = _run_from(tmp_path, x, [3000], memory=1 << 30)
    monkeypatch.setattr(index_stage, "choose_index_streaming", lambda *a, **k: spec_for_kind(
        "ivf_flat", 3000, DIM, nlist=12, nprobe=2))
    build_descriptor_index(run, "precomputed", budget=1 << 30)
    monkeypatch.setattr(index_choice, "QUERY_MIN_NPROBE", 10**6)  # every cell
    index, spec = load_index(run.index_dir, "precomputed")
    assert index.nprobe == spec.nlist
    stored = x.astype(np.float32)
    queries = stored[::97] + 0.01
    q, pos, sim = search_external(index, spec, stored, queries, 0.93)
    want_q, want_pos = np.nonzero((queries @ stored.T) >= np.float32(0.93))
    assert len(q) > 31 and set(zip(q, pos, strict=True)) == set(zip(want_q, want_pos, strict=True))
    np.testing.assert_allclose(sim, (queries @ stored.T)[q, pos], rtol=1e-5)


# ---------------------------------------------------------------- cell-major join


def test_probe_lists_invert_the_probes_once_per_cell():
    probes = np.array([[2, 0, 2], [1, -1, -1], [0, 2, 1], [2, 2, 2]], dtype=np.int32)
    lists = ProbeLists.from_probes(probes, nlist=4)
    got = {c: list(lists.rows[lists.bounds[c]:lists.bounds[c + 1]]) for c in range(4)}
    assert got == {0: [0, 2], 1: [1, 2], 2: [0, 2, 3], 3: []}


def test_split_cells_is_a_partition_of_about_equal_work():
    work = np.array([5, 1, 1, 1, 40, 1, 1, 1, 1, 1, 8, 0, 0], dtype=np.float64)
    ranges = split_cells(work, 4)
    assert [c for r in ranges for c in r] == list(range(len(work)))
    assert 2 <= len(ranges) <= 4 and all(len(r) for r in ranges)
    assert split_cells(np.zeros(0), 3) == [range(0, 0)] and split_cells(work, 1) == [range(0, 13)]


@pytest.mark.parametrize("member_rows, chunks", [(1 << 15, 8), (7, 3)])
def test_cell_major_join_equals_the_row_block_join(tmp_path, single_faiss_thread, monkeypatch, member_rows, chunks):
    """Every cell once, in any partition of the cells, gives exactly the row-block join's pairs."""
    import dedup.search.pairs as pairs_module

    monkeypatch.setattr(pairs_module, "CELL_MEMBER_ROWS", member_rows)  # large cells read in slices
    monkeypatch.setattr(pairs_module, "QUERY_CHUNK_MIN_ROWS", chunks)
    x = _grouped(copies=25, groups=60, noise=0.08)
    _, lists = _ivf(x, nlist=24, nprobe=3)
    vectors = _parts(tmp_path, x, [1000, 1200, 800])
    probe_lists = ProbeLists.from_probes(lists.probes, lists.nlist)
    rows_major = _pair_set(find_pairs_cells(vectors, vectors.ids, 0.9, lists, block_size=500))
    found, sims = set(), {}
    for cells in split_cells(cell_work(lists, probe_lists), 5):
        for block in find_pairs_by_cell(vectors, vectors.ids, 0.9, lists, probe_lists, cells, max_pairs=40):
            assert np.all(block[0] < block[1]) and np.all(block[2] >= np.float32(0.9))
            pairs = list(zip(block[0].tolist(), block[1].tolist(), strict=True))
            assert not found & set(pairs)  # never the same pair twice
            found |= set(pairs)
            sims.update(zip(pairs, block[2].tolist(), strict=True))
    assert len(rows_major) > 1000 and found == rows_major
    a, b = next(iter(found))
    rows = np.searchsorted(vectors.ids, [a, b])
    exact = np.float32(x[rows[0]].astype(np.float32) @ x[rows[1]].astype(np.float32))
    assert sims[(a, b)] == pytest.approx(exact, abs=1e-6)


def test_cell_major_join_keeps_rows_below_the_limit(tmp_path, single_faiss_thread):
    x = _grouped(copies=20, groups=40, noise=0.05)
    _, lists = _ivf(x, nlist=16, nprobe=4)
    probe_lists = ProbeLists.from_probes(lists.probes, lists.nlist)
    ids = np.arange(len(x), dtype=np.int64)
    limited = _pair_set(find_pairs_by_cell(x, ids, 0.92, lists, probe_lists, range(16), row_limit=1700))
    every = _pair_set(find_pairs_by_cell(x, ids, 0.92, lists, probe_lists, range(16)))
    assert limited == {p for p in every if p[1] < 1700} and len(limited) < len(every)


@pytest.mark.parametrize("data", ["grouped", "isotropic"])
def test_pruned_probes_lose_no_pair_of_the_unpruned_probes(single_faiss_thread, data):
    """The triangle bound drops probes, never a pair: the join over pruned probes equals the unpruned join."""
    from dedup.search.pairs import prune_probes

    rng = np.random.default_rng(7)
    if data == "grouped":
        x = _grouped(n=4000, copies=12, groups=150, noise=0.06).astype(np.float32)
    else:  # copies straddle cell borders: no cell structure to lean on
        base = rng.standard_normal((1500, DIM))
        x = np.concatenate([base, base[:500] + 0.06 * rng.standard_normal((500, DIM))])
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    index, _ = _ivf(x.astype(np.float16), nlist=40, nprobe=6)
    quantizer = quantizer_of(index)
    similarities, cells = quantizer.search(x, 6)
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    ids = np.arange(len(x), dtype=np.int64)
    for threshold in (0.9, 0.97):
        pruned = prune_probes(similarities, cells, centroids, threshold)
        assert (pruned[:, 1:] == -1).mean() > (0.02 if data == "grouped" else 0.0)  # not vacuous
        assert np.array_equal(pruned[:, 0], cells[:, 0])
        kept = _pair_set(find_pairs_cells(x, ids, threshold, CellLists.from_probes(pruned, 40)))
        every = _pair_set(find_pairs_cells(x, ids, threshold, CellLists.from_probes(cells, 40)))
        assert len(every) > 100 and kept == every


def test_neighbour_stage_joins_cell_major_with_the_row_block_join_edges(tmp_path, single_faiss_thread, monkeypatch):
    import dedup.stages.index as index_stage
    from dedup.errors import StoreError
    from dedup.stages import neighbors

    x = _grouped(n=4000, copies=10, groups=100, noise=0.05)
    run = _run_from(tmp_path, x, [1500, 1500, 1000], memory=64 << 20)
    monkeypatch.setattr(index_stage, "choose_index_streaming", lambda *a, **k: spec_for_kind(
        "ivf_flat", 4000, DIM, nlist=30, nprobe=4))
    spec = build_descriptor_index(run, "precomputed", budget=64 << 20, threshold=0.94)
    assert spec.probe_threshold == 0.94
    assert (np.load(cell_paths(run.index_dir, "precomputed")["probes.npy"]) == -1).any()  # some probes pruned
    stage = neighbors.NeighborsStage(run, "precomputed", 0.94, rows_per_task=1000)
    assert stage._cell_major() and len(stage.task_ids()) == 4
    for task in stage.task_ids():
        stage.run_task(task, lambda n: None)
    cell_major = load_edges(run, "precomputed", 0.94)
    monkeypatch.setattr(neighbors.NeighborsStage, "_cell_major", lambda self: False)
    neighbors.clear_stage(run, "neighbors-precomputed", run.neighbors_dir("precomputed"))
    neighbors.find_neighbors(run, gpu=False)
    row_blocks = load_edges(run, "precomputed", 0.94)
    truth = brute_force_pairs(x.astype(np.float32), open_embeddings(run, "precomputed").ids, 0.94)
    key = ["id_a", "id_b"]
    pd.testing.assert_frame_equal(cell_major.sort_values(key, ignore_index=True),
                                  row_blocks.sort_values(key, ignore_index=True), atol=1e-6)
    assert len(cell_major) >= 0.98 * len(truth[0])
    with pytest.raises(StoreError, match="rebuild"):  # a search below the pruning threshold would miss pairs
        neighbors.NeighborsStage(run, "precomputed", 0.9).run_task("0", lambda n: None)


def test_crowded_cells_are_split_and_a_duplicate_blob_stays_whole(single_faiss_thread):
    """Diffuse rows crowd a few cells (everyone probes them): those are split; a blob of copies is merged back."""
    from dedup.search.faiss_index import split_crowded_cells

    rng = np.random.default_rng(11)

    def unit(v):
        return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)

    topics = unit(rng.standard_normal((30, DIM)))
    clustered = unit(np.repeat(topics, 100, axis=0) + 0.3 * rng.standard_normal((3000, DIM)))
    diffuse = unit(rng.standard_normal((3000, DIM)))  # close to no centroid
    blob = unit(unit(rng.standard_normal(DIM)) + 0.05 * rng.standard_normal((600, DIM)))
    x = np.concatenate([clustered, diffuse, blob])
    spec = spec_for_kind("ivf_flat", len(x), DIM, nlist=40, nprobe=4)
    quantizer = train_cells_quantizer(spec, x.astype(np.float16), points=len(x))
    plain = faiss.Kmeans(DIM, 40, niter=10, spherical=True, seed=0)
    plain.train(x)
    counts = np.bincount(plain.index.search(x, 1)[1][:, 0], minlength=40)
    assert counts.max() > 3 * counts.mean()  # the plain k-means has crowded cells
    split = split_crowded_cells(x, plain.centroids, seed=0)
    assert len(split) > 40
    home = quantizer.search(x, 1)[1][:, 0]
    after = np.bincount(home[:6000], minlength=quantizer.ntotal)
    assert after.max() <= 3 * len(x) / quantizer.ntotal * 2 and len(np.unique(home[6000:])) == 1


def test_many_ids_are_one_memory_map_shared_by_every_task(tmp_path, monkeypatch):
    """Above IDS_IN_MEMORY the ids are a cached .npy memory map: equal to the parts' ids, not pickled with
    the vectors (a Ray task would otherwise carry every id), rewritten only when the metadata changes."""
    import dedup.records as records

    x = _grouped(n=600, groups=30)
    run = _run_from(tmp_path, x, [250, 350], memory=1 << 30)
    expected = np.array(open_embeddings(run, "precomputed").ids)
    monkeypatch.setattr(records, "IDS_IN_MEMORY", 100)
    vectors = open_embeddings(run, "precomputed")
    assert isinstance(vectors.ids, np.memmap) and np.array_equal(vectors.ids, expected)
    assert len(pickle.dumps(vectors)) < expected.nbytes / 4
    assert np.array_equal(pickle.loads(pickle.dumps(vectors)).ids, expected)
    cached = list((run.root / "_cache" / "ids").glob("precomputed-*.npy"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    open_embeddings(run, "precomputed")
    assert cached[0].stat().st_mtime_ns == stamp  # built once, then reused


def test_ids_out_of_order_across_parts_are_refused_when_cached(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import dedup.records as records
    from dedup.errors import StoreError

    run = _run_from(tmp_path, _grouped(n=600, groups=30), [250, 350], memory=1 << 30)
    meta = run.metadata_part("precomputed", 1)
    table = pq.read_table(meta)
    ids = table["sample_id"].to_numpy().copy()
    ids[0] = 0  # below the ids of part 0: the parts no longer concatenate in sample_id order
    pq.write_table(table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(ids)), meta)
    monkeypatch.setattr(records, "IDS_IN_MEMORY", 100)
    with pytest.raises(StoreError, match="not in sample_id order"):
        open_embeddings(run, "precomputed")


def test_row_keys_taken_part_by_part_equal_the_concatenated_keys(tmp_path, monkeypatch):
    """Keys by row from per-part chunks, in memory or from the memory-mapped cache, in any row order."""
    import dedup.records as records
    from dedup.records import open_row_keys

    run = _run_from(tmp_path, _grouped(n=600, groups=30), [250, 1, 349], memory=1 << 30)
    rows = np.random.default_rng(1).integers(0, 600, 2_000)
    every = [f"{p}_{r}" for p, size in enumerate([250, 1, 349]) for r in range(size)]
    assert open_row_keys(run, "precomputed").take(rows).to_pylist() == [every[r] for r in rows]
    monkeypatch.setattr(records, "KEYS_IN_MEMORY", 100)
    cached = open_row_keys(run, "precomputed")
    assert len(list((run.root / "_cache" / "keys").glob("precomputed-*.arrow"))) == 1
    assert cached.take(rows).to_pylist() == [every[r] for r in rows]
    assert cached.take(np.zeros(0, np.int64)).to_pylist() == []


def test_neighbour_edges_are_the_same_with_the_row_caches(tmp_path, single_faiss_thread, monkeypatch):
    """Above IDS_IN_MEMORY the neighbour tasks take ids and keys from the caches: byte-for-byte the same edges."""
    import dedup.records as records
    from dedup.stages.neighbors import find_neighbors

    x = _grouped(n=3000)
    edges = []
    for limit in (records.IDS_IN_MEMORY, 100):
        monkeypatch.setattr(records, "IDS_IN_MEMORY", limit)
        monkeypatch.setattr(records, "KEYS_IN_MEMORY", limit)
        run = _run_from(tmp_path / str(limit), x, [1000, 2000], memory=1 << 30)
        build_descriptor_index(run, "precomputed", budget=1 << 30)
        find_neighbors(run, gpu=False)
        parts = sorted(run.neighbors_dir("precomputed").glob("part_*.parquet"))
        frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        edges.append(frame.sort_values(["id_a", "id_b", "similarity"], ignore_index=True))
    assert (tmp_path / "100" / "out" / "_cache" / "keys").exists() and len(edges[0]) > 100
    assert edges[0]["key_a"].notna().all() and edges[0]["key_a"].str.contains("_").all()
    pd.testing.assert_frame_equal(edges[0], edges[1])
