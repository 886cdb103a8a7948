from __future__ import annotations

import numpy as np
import pytest

from dedup.errors import DedupError
from dedup.search.faiss_index import build_index
from dedup.search.index_choice import spec_for_kind
from dedup.search.pairs import (
    brute_force_pairs,
    find_pairs,
    find_pairs_ivf_join,
    iter_blocks,
    pair_similarity,
)

DIM = 64


pytestmark = pytest.mark.usefixtures("single_faiss_thread")

THRESHOLD = 0.9


def planted(n_background: int, group_sizes: list[int], seed: int = 0) -> np.ndarray:
    """Unit vectors: random background plus near-duplicate groups, rows shuffled.

    Copies are base + noise with per-group noise chosen so that within-group
    similarities straddle the threshold (some pairs pass, some do not).
    """
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((n_background, DIM))]
    for size in group_sizes:
        base = rng.standard_normal(DIM)
        parts.append(base + rng.standard_normal((size, DIM)) * rng.uniform(0.05, 0.35))
    vectors = np.concatenate(parts).astype(np.float32)
    vectors = vectors[rng.permutation(len(vectors))]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def shuffled_ids(n: int, seed: int = 1) -> np.ndarray:
    """Sample ids that are not monotone in the row order (as after a shard merge)."""
    return np.random.default_rng(seed).permutation(n).astype(np.int64) * 3 + (5 << 32)


def collect(blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = list(blocks)
    if not blocks:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return tuple(np.concatenate([block[i] for block in blocks]) for i in range(3))


def pair_keys(pairs) -> np.ndarray:
    """(2, m) array of the pairs in sorted order, for exact comparisons."""
    id_a, id_b, _ = pairs
    order = np.lexsort((id_b, id_a))
    return np.stack([id_a[order], id_b[order]])


def as_set(pairs) -> set[tuple[int, int]]:
    return set(zip(pairs[0].tolist(), pairs[1].tolist(), strict=True))


def rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    sorter = np.argsort(ids)
    return sorter[np.searchsorted(ids, wanted, sorter=sorter)]


def row_keys(pairs, ids: np.ndarray) -> np.ndarray:
    """One int64 per pair (via row positions, which are small), sorted."""
    row_a, row_b = rows_of(ids, pairs[0]), rows_of(ids, pairs[1])
    return np.sort(np.minimum(row_a, row_b) * len(ids) + np.maximum(row_a, row_b))


def assert_contract(pairs) -> None:
    id_a, id_b, sims = pairs
    assert id_a.dtype == np.int64 and id_b.dtype == np.int64 and sims.dtype == np.float32
    assert np.all(id_a < id_b)
    keys = pair_keys(pairs)
    assert not np.any(np.all(keys[:, 1:] == keys[:, :-1], axis=0))  # each unordered pair once
    assert np.all(sims >= np.float32(THRESHOLD))


def recall(found, truth, ids: np.ndarray) -> float:
    return float(np.isin(row_keys(truth, ids), row_keys(found, ids)).mean())


def is_subset(found, truth, ids: np.ndarray) -> bool:
    return bool(np.isin(row_keys(found, ids), row_keys(truth, ids)).all())


@pytest.fixture(scope="module")
def groups_data():
    vectors = planted(6000, [2, 3, 5, 8, 13, 40] * 40)
    ids = shuffled_ids(len(vectors))
    return vectors, ids, brute_force_pairs(vectors, ids, THRESHOLD)


def test_iter_blocks_covers_range():
    blocks = list(iter_blocks(10, 4))
    assert blocks == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert list(iter_blocks(0, 4)) == []
    with pytest.raises(ValueError):
        list(iter_blocks(10, 0))


def test_oracle_matches_definition():
    vectors = planted(200, [4, 6])
    ids = np.arange(len(vectors), dtype=np.int64)
    id_a, id_b, sims = brute_force_pairs(vectors, ids, THRESHOLD)
    dense = vectors @ vectors.T
    rows, cols = np.nonzero(np.triu(dense >= np.float32(THRESHOLD), k=1))
    assert as_set((id_a, id_b, sims)) == set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert np.allclose(sims, dense[id_a, id_b], atol=1e-5)
    assert len(rows) >= 10  # the planted groups produce pairs


def test_flat_range_search_equals_oracle(groups_data):
    vectors, ids, truth = groups_data
    index = build_index(spec_for_kind("flat", len(vectors), DIM), vectors)
    found = collect(find_pairs(index, vectors, ids, THRESHOLD, block_size=1000))
    assert_contract(found)
    assert np.array_equal(pair_keys(found), pair_keys(truth))
    order_found, order_truth = np.lexsort(found[:2]), np.lexsort(truth[:2])
    assert np.allclose(found[2][order_found], truth[2][order_truth], atol=1e-5)


def test_knn_cap_two_gives_identical_pairs(groups_data):
    vectors, ids, truth = groups_data
    index = build_index(spec_for_kind("flat", len(vectors), DIM), vectors)
    ranged = collect(find_pairs(index, vectors, ids, THRESHOLD))
    capped = collect(find_pairs(index, vectors, ids, THRESHOLD, knn_cap=2))
    assert_contract(capped)
    assert np.array_equal(pair_keys(capped), pair_keys(ranged))
    assert np.array_equal(pair_keys(ranged), pair_keys(truth))


def test_results_do_not_depend_on_block_size(groups_data):
    vectors, ids, truth = groups_data
    index = build_index(spec_for_kind("flat", len(vectors), DIM), vectors)
    small = collect(find_pairs(index, vectors, ids, THRESHOLD, block_size=333))
    assert np.array_equal(pair_keys(small), pair_keys(truth))


def test_progress_counts_every_row(groups_data):
    vectors, ids, _ = groups_data
    index = build_index(spec_for_kind("flat", len(vectors), DIM), vectors)
    seen = []
    collect(find_pairs(index, vectors, ids, THRESHOLD, block_size=1000, progress=seen.append))
    assert sum(seen) == len(vectors) and len(seen) == -(-len(vectors) // 1000)


@pytest.fixture(scope="module")
def ivf_index(groups_data):
    vectors, _, _ = groups_data
    return build_index(spec_for_kind("ivf_flat", len(vectors), DIM, nlist=64, nprobe=8), vectors)


def test_ivf_range_search_recall(groups_data, ivf_index):
    vectors, ids, truth = groups_data
    found = collect(find_pairs(ivf_index, vectors, ids, THRESHOLD))
    assert_contract(found)
    assert is_subset(found, truth, ids)  # IVF-Flat scores are exact: no false pairs
    assert recall(found, truth, ids) >= 0.99


def test_ivf_join_equals_ivf_range_search(groups_data, ivf_index):
    vectors, ids, truth = groups_data
    ranged = collect(find_pairs(ivf_index, vectors, ids, THRESHOLD))
    joined = collect(find_pairs_ivf_join(ivf_index, vectors, ids, THRESHOLD))
    assert_contract(joined)
    assert recall(joined, truth, ids) >= 0.99
    # Same cells probed, same forward rule: the same pairs up to float rounding at the threshold.
    assert len(as_set(joined) ^ as_set(ranged)) <= 2


def test_ivf_join_with_all_cells_probed_is_exact(groups_data, ivf_index):
    vectors, ids, truth = groups_data
    joined = collect(find_pairs_ivf_join(ivf_index, vectors, ids, THRESHOLD, nprobe=64))
    assert np.array_equal(pair_keys(joined), pair_keys(truth))


def test_ivf_join_works_on_trained_empty_index(groups_data):
    vectors, ids, truth = groups_data
    spec = spec_for_kind("ivf_flat", len(vectors), DIM, nlist=32, nprobe=8)
    trained = build_index(spec, vectors)
    trained.reset()  # keeps the quantizer, drops the vectors
    joined = collect(find_pairs_ivf_join(trained, vectors, ids, THRESHOLD))
    assert recall(joined, truth, ids) >= 0.99


def test_three_thousand_copies_are_not_truncated_by_knn_cap():
    vectors = planted(4000, [3000, 5, 7, 9])
    ids = shuffled_ids(len(vectors))
    truth = brute_force_pairs(vectors, ids, THRESHOLD)
    index = build_index(spec_for_kind("ivf_flat", len(vectors), DIM, nlist=32, nprobe=8), vectors)
    found = collect(find_pairs(index, vectors, ids, THRESHOLD, knn_cap=64))
    assert_contract(found)
    assert recall(found, truth, ids) >= 0.99
    # Members of the big group have far more than 64 neighbours each; all were kept.
    degree = np.bincount(np.concatenate([found[0], found[1]]) - (5 << 32))
    assert degree.max() > 1000


def test_query_transform_finds_flipped_copies():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((500, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[400:450] = vectors[:50, ::-1]  # "mirrored" copies: reversed coordinates
    ids = np.arange(len(vectors), dtype=np.int64)

    def flips(block: np.ndarray) -> np.ndarray:
        return np.stack([block, block[:, ::-1]])

    index = build_index(spec_for_kind("flat", len(vectors), DIM), vectors)
    plain = collect(find_pairs(index, vectors, ids, THRESHOLD))
    flipped = collect(find_pairs(index, vectors, ids, THRESHOLD, query_transform=flips))
    expected = {(i, i + 400) for i in range(50)}
    assert not expected & as_set(plain)
    assert expected <= as_set(flipped)
    assert np.allclose(flipped[2], 1.0, atol=1e-5)
    oracle = brute_force_pairs(vectors, ids, THRESHOLD, query_transform=flips)
    assert as_set(oracle) == as_set(flipped)
    joined = collect(find_pairs_ivf_join(
        build_index(spec_for_kind("ivf_flat", 500, DIM, nlist=8, nprobe=8), vectors),
        vectors, ids, THRESHOLD, query_transform=flips,
    ))
    assert as_set(joined) == as_set(oracle)


def test_compressed_index_is_rescored_exactly(groups_data):
    vectors, ids, truth = groups_data
    spec = spec_for_kind("ivf_pq", len(vectors), DIM, nlist=32, nprobe=8, pq_m=16)
    index = build_index(spec, vectors, train_sample=4000)
    found = collect(find_pairs(index, vectors, ids, THRESHOLD))
    assert_contract(found)
    assert is_subset(found, truth, ids)
    assert recall(found, truth, ids) >= 0.95
    exact = pair_similarity(vectors)(rows_of(ids, found[0]), rows_of(ids, found[1]))
    assert np.allclose(found[2], exact, atol=1e-6)


def test_hnsw_needs_knn_cap(groups_data):
    vectors, ids, truth = groups_data
    index = build_index(spec_for_kind("hnsw", len(vectors), DIM), vectors)
    with pytest.raises(DedupError, match="knn_cap"):
        collect(find_pairs(index, vectors, ids, THRESHOLD))
    found = collect(find_pairs(index, vectors, ids, THRESHOLD, knn_cap=16))
    assert is_subset(found, truth, ids)
    assert recall(found, truth, ids) >= 0.99


def test_mismatched_inputs_are_rejected(groups_data):
    vectors, ids, _ = groups_data
    index = build_index(spec_for_kind("flat", len(vectors), DIM), vectors)
    with pytest.raises(ValueError, match="same length"):
        collect(find_pairs(index, vectors[:-1], ids[:-1], THRESHOLD))
    with pytest.raises(ValueError, match="int64"):
        collect(find_pairs(index, vectors, ids.astype(np.int32), THRESHOLD))
    with pytest.raises(ValueError, match="knn_cap"):
        collect(find_pairs(index, vectors, ids, THRESHOLD, knn_cap=0))
    with pytest.raises(ValueError, match="float rows"):
        collect(find_pairs(index, (vectors * 100).astype(np.uint8), ids, THRESHOLD))
    with pytest.raises(DedupError, match="IVF"):
        collect(find_pairs_ivf_join(index, vectors, ids, THRESHOLD))
