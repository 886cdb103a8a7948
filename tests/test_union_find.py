from __future__ import annotations

import numpy as np
import pytest

from dedup.search.pairs import brute_force_pairs, pair_similarity
from dedup.search.union_find import choose_representatives, cluster_with_guard, connected_components


def reference_components(n_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain Python union-find; label = smallest node of the component."""
    parent = list(range(n_nodes))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in zip(a.tolist(), b.tolist(), strict=True):
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    return np.array([find(x) for x in range(n_nodes)])


def test_components_small_graph():
    labels = connected_components(7, np.array([0, 1, 5, 4]), np.array([1, 2, 6, 6]))
    assert labels.tolist() == [0, 0, 0, 3, 4, 4, 4]


def test_components_without_edges_are_singletons():
    assert connected_components(4, np.array([], np.int64), np.array([], np.int64)).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_match_reference_union_find(seed):
    rng = np.random.default_rng(seed)
    n_nodes, n_edges = 20_000, 15_000  # below the giant-component threshold: many components
    a, b = rng.integers(0, n_nodes, n_edges), rng.integers(0, n_nodes, n_edges)
    assert np.array_equal(connected_components(n_nodes, a, b), reference_components(n_nodes, a, b))


def test_long_path_in_random_order():
    # A path visiting the nodes in random order is the slow case for label propagation.
    order = np.random.default_rng(5).permutation(100_000)
    labels = connected_components(100_000, order[:-1], order[1:])
    assert np.all(labels == 0)


def test_components_reject_bad_edges():
    with pytest.raises(ValueError, match="node indices"):
        connected_components(3, np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="equally long"):
        connected_components(3, np.array([0, 1]), np.array([1]))


def test_representative_is_highest_degree_then_smallest_index():
    # Star around node 4 plus a separate pair (1, 3) where both have degree 1.
    a, b = np.array([4, 4, 4, 1]), np.array([0, 2, 5, 3])
    labels = connected_components(6, a, b)
    degree = np.bincount(np.concatenate([a, b]), minlength=6)
    nodes = np.arange(6)
    assert choose_representatives(labels, degree, nodes).tolist() == [4, 1, 4, 1, 4, 4]


def unit_angles(degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def edges_of(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    a, b, _ = brute_force_pairs(vectors, np.arange(len(vectors), dtype=np.int64), threshold)
    return a, b


def test_chain_is_split_by_the_guard():
    # A~B~C~D at 20 degree steps: cos 20 = 0.94 links neighbours, cos 60 = 0.5 (A vs D).
    vectors = unit_angles([0, 20, 40, 60])
    a, b = edges_of(vectors, 0.9)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 1), (1, 2), (2, 3)]
    assert np.all(connected_components(4, a, b) == 0)  # plain components chain all four

    clusters = cluster_with_guard(4, a, b, pair_similarity(vectors), guard_threshold=0.9)
    assert clusters.labels.tolist() == [1, 1, 1, 3]  # B (degree 2, smaller than C) leads
    assert clusters.is_representative.tolist() == [False, True, False, True]
    cos20 = np.cos(np.deg2rad(20))
    assert np.allclose(clusters.similarity_to_representative, [cos20, 1.0, cos20, 1.0])


def test_long_chain_is_cut_into_tight_pieces_over_several_passes():
    vectors = unit_angles([0, 20, 40, 60, 80, 100, 120, 140])
    a, b = edges_of(vectors, 0.9)
    clusters = cluster_with_guard(8, a, b, pair_similarity(vectors), guard_threshold=0.9)
    assert clusters.labels.tolist() == [1, 1, 1, 4, 4, 4, 6, 6]
    assert clusters.passes == 3
    assert np.all(clusters.similarity_to_representative >= 0.9)


def test_max_passes_leaves_unresolved_nodes_as_singletons():
    vectors = unit_angles([0, 20, 40, 60, 80, 100, 120, 140])
    a, b = edges_of(vectors, 0.9)
    clusters = cluster_with_guard(8, a, b, pair_similarity(vectors), guard_threshold=0.9, max_passes=1)
    assert clusters.labels.tolist() == [1, 1, 1, 3, 4, 5, 6, 7]
    assert clusters.is_representative[3:].all()


def test_tight_group_is_untouched():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(32)
    vectors = np.concatenate([base + 0.02 * rng.standard_normal((5, 32)), rng.standard_normal((3, 32))])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    a, b = edges_of(vectors, 0.9)
    assert len(a) == 10  # the 5 copies are all pairwise linked, the others not
    guarded = cluster_with_guard(8, a, b, pair_similarity(vectors), guard_threshold=0.95)
    unguarded = cluster_with_guard(8, a, b, pair_similarity(vectors), guard_threshold=None)
    assert guarded.labels.tolist() == unguarded.labels.tolist() == [0, 0, 0, 0, 0, 5, 6, 7]
    assert guarded.sizes().tolist() == [5] * 5 + [1] * 3
    assert np.all(guarded.similarity_to_representative[:5] > 0.99)
    assert guarded.passes == 1


def test_no_guard_keeps_whole_chain_with_similarities():
    vectors = unit_angles([0, 20, 40, 60])
    a, b = edges_of(vectors, 0.9)
    clusters = cluster_with_guard(4, a, b, pair_similarity(vectors), guard_threshold=None)
    assert clusters.labels.tolist() == [1, 1, 1, 1]
    assert clusters.similarity_to_representative[3] == pytest.approx(np.cos(np.deg2rad(40)), abs=1e-6)


# --- support check: a hub similar to two unrelated pictures must not join them ------------------


def matrix_similarity(matrix: np.ndarray):
    return lambda rows_a, rows_b: matrix[np.asarray(rows_a), np.asarray(rows_b)]


def test_blend_of_two_unrelated_photos_does_not_chain_them():
    from pathlib import Path

    from PIL import Image

    from dedup.descriptors import descriptor_policy
    from dedup.descriptors.perceptual import describe, dihedral_variants
    from dedup.stages.cluster import SUPPORT_SLACK

    demo = Path(__file__).resolve().parents[1] / "dedup" / "demo_images"
    house, boats = (Image.open(demo / name).convert("RGB") for name in ("kodim01.jpg", "kodim09.jpg"))
    vectors = describe([house, Image.blend(house, boats, 0.5), boats])  # A, B = A/C blend, C
    similarity = pair_similarity(vectors, dihedral_variants)
    assert similarity(np.array([0]), np.array([2]))[0] < 0.05  # A and C: unrelated (cosine ~0.03)
    a, b = edges_of_variants(vectors, descriptor_policy("perceptual").threshold())
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 1), (1, 2)]  # B resembles both
    policy = descriptor_policy("perceptual")
    guard = policy.threshold() - policy.guard_offset
    old = cluster_with_guard(3, a, b, similarity, guard_threshold=guard)
    assert len(set(old.labels.tolist())) == 1  # the representative-only guard chains A and C

    clusters = cluster_with_guard(3, a, b, similarity, guard_threshold=guard, support_threshold=guard - SUPPORT_SLACK)
    assert clusters.labels[0] != clusters.labels[2]
    assert clusters.labels[1] == clusters.labels[2]  # B stays with the photo it resembles most (0.69 vs 0.65)


def edges_of_variants(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    from dedup.descriptors.perceptual import dihedral_variants

    a, b, _ = brute_force_pairs(vectors, np.arange(len(vectors), dtype=np.int64), threshold, dihedral_variants)
    return a, b


# Parent photo P (0), its left crop L (1) and right crop R (2), which share little; a blend B (3) of
# two unrelated photos A (4) and C (5). Full-picture similarity is symmetric; containment is not.
SIMILARITY = np.array([
    # P    L    R    B    A    C
    [1.0, 0.3, 0.3, 0.0, 0.0, 0.0],
    [0.3, 1.0, 0.1, 0.0, 0.0, 0.0],
    [0.3, 0.1, 1.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 1.0, 0.7, 0.7],
    [0.0, 0.0, 0.0, 0.7, 1.0, 0.03],
    [0.0, 0.0, 0.0, 0.7, 0.03, 1.0],
], dtype=np.float32)
CONTAINS = np.zeros((6, 6), dtype=np.float32)
CONTAINS[0, 1] = CONTAINS[0, 2] = 0.8  # a window of P matches each crop; B contains neither A nor C


def test_crops_join_through_their_parent_but_a_blend_does_not_chain():
    a, b = np.array([0, 0, 3, 3]), np.array([1, 2, 4, 5])  # crops found by P's windows; B matches A and C
    clusters = cluster_with_guard(6, a, b, matrix_similarity(SIMILARITY), guard_threshold=0.5,
                                  support_threshold=0.3, contains=matrix_similarity(CONTAINS))
    assert clusters.labels[:3].tolist() == [0, 0, 0]  # both crops join the parent's cluster
    assert clusters.similarity_to_representative[1:3].tolist() == pytest.approx([0.8, 0.8])
    assert clusters.labels[4] != clusters.labels[5]  # A and C stay apart
    assert clusters.sizes()[3:].tolist() == [2, 2, 1]


def test_without_containment_the_sibling_crops_are_detached():
    a, b = np.array([0, 0]), np.array([1, 2])
    clusters = cluster_with_guard(6, a, b, matrix_similarity(SIMILARITY), guard_threshold=0.5, support_threshold=0.3)
    assert clusters.sizes()[:3].tolist() == [1, 1, 1]  # 0.3 to the parent: the containment score is what joins them


def test_support_check_keeps_a_family_of_mutually_similar_copies():
    rng = np.random.default_rng(3)
    base = rng.standard_normal(32)
    vectors = base + 0.6 * rng.standard_normal((12, 32))  # loose copies: ~0.7 to each other
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    a, b = edges_of(vectors, 0.6)
    plain = cluster_with_guard(12, a, b, pair_similarity(vectors), guard_threshold=0.5)
    supported = cluster_with_guard(12, a, b, pair_similarity(vectors), guard_threshold=0.5, support_threshold=0.3)
    assert plain.sizes().max() == 12
    assert supported.labels.tolist() == plain.labels.tolist()


# --- the streamed guard: edges part by part, the same answer as the in-memory guard ------------


def split_into_parts(a: np.ndarray, b: np.ndarray, n_parts: int, seed: int = 0):
    """A fresh-read callable over `n_parts` uneven slices of a shuffled edge list (as neighbour files are)."""
    order = np.random.default_rng(seed).permutation(len(a))
    cuts = np.sort(np.random.default_rng(seed + 1).integers(0, len(a) + 1, n_parts - 1))
    pieces = np.split(order, cuts)
    return lambda: ((a[p], b[p]) for p in pieces)


def clustered_vectors(rng, n: int, groups: int, dim: int = 8) -> np.ndarray:
    """Nodes around a few centres (noise large enough that the guard rejects some members)."""
    centres = rng.standard_normal((groups, dim))
    vectors = centres[rng.integers(0, groups, n)] + 0.7 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def assert_same_clusters(streamed, in_memory) -> None:
    assert np.array_equal(streamed.labels, in_memory.labels)
    assert np.array_equal(streamed.is_representative, in_memory.is_representative)
    assert np.array_equal(streamed.similarity_to_representative, in_memory.similarity_to_representative)
    assert streamed.passes == in_memory.passes


def memmap_allocator(folder, asked: list[str]):
    """An `Allocator` keeping every array as a memory map under `folder`, recording what it was asked for."""

    def alloc(name, n, dtype):
        asked.append(name)
        return np.lib.format.open_memmap(folder / f"{name}_{len(asked)}.npy", mode="w+", dtype=dtype, shape=(n,))

    return alloc


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("block_nodes", [1 << 22, 97])
def test_streamed_guard_equals_the_in_memory_guard_on_random_graphs(seed, block_nodes, tmp_path):
    from dedup.search.union_find import cluster_with_guard_streamed

    rng = np.random.default_rng(seed)
    n = 3_000
    vectors = clustered_vectors(rng, n, groups=40)
    a, b = edges_of(vectors, 0.55)
    extra = rng.integers(0, n, (2, 300))  # unrelated edges: chains the guard must cut
    a, b = np.concatenate([a, extra[0]]), np.concatenate([b, extra[1]])
    similarity = pair_similarity(vectors)
    contains = matrix_like_contains(n, seed) if seed % 2 else None
    kwargs = dict(guard_threshold=0.6, support_threshold=0.35, contains=contains, max_passes=5)
    in_memory = cluster_with_guard(n, a, b, similarity, **kwargs)
    assert in_memory.passes >= 2 and 1 < len(np.unique(in_memory.labels)) < n  # the guard had work to do
    parent = np.lib.format.open_memmap(tmp_path / "parent.npy", mode="w+", dtype=np.int64, shape=(n,))
    asked = []
    streamed = cluster_with_guard_streamed(n, split_into_parts(a, b, 7, seed), similarity, parent=parent,
                                           alloc=memmap_allocator(tmp_path, asked), block_nodes=block_nodes, **kwargs)
    assert_same_clusters(streamed, in_memory)
    # Every O(nodes) array lives where the allocator put it (memory maps here), each allocated once.
    assert isinstance(streamed.labels, np.memmap) and isinstance(streamed.similarity_to_representative, np.memmap)
    assert len(asked) == len(set(asked)) and {"labels", "degree", "rep_node", "anchor", "detached"} <= set(asked)


def test_blocked_guard_keeps_the_tie_rules_across_blocks():
    """Ties on degree and on anchor similarity split over blocks resolve as in memory (smallest node)."""
    from dedup.search.union_find import cluster_with_guard_streamed

    # A star whose two hubs (0 and 5) have equal degree, and members with equal similarities.
    a = np.array([0, 0, 0, 5, 5, 5, 0, 2, 7])
    b = np.array([1, 2, 3, 6, 7, 8, 5, 6, 9])
    sims = lambda r, m: np.where((r + m) % 3 == 0, 0.5, 0.9).astype(np.float32)  # noqa: E731
    kwargs = dict(guard_threshold=0.6, support_threshold=0.4, max_passes=4)
    in_memory = cluster_with_guard(10, a, b, sims, **kwargs)
    for block_nodes in (1, 2, 3, 4, 10):
        streamed = cluster_with_guard_streamed(10, lambda: [(a, b)], sims, block_nodes=block_nodes, **kwargs)
        assert_same_clusters(streamed, in_memory)


def matrix_like_contains(n: int, seed: int):
    """A deterministic pseudo-random containment score per (parent, child) pair."""
    return lambda parents, children: ((parents * 7919 + children * 104_729 + seed) % 97 / 97.0).astype(np.float32)


def test_streamed_guard_splits_a_long_chain_like_the_in_memory_one():
    from dedup.search.union_find import cluster_with_guard_streamed

    vectors = unit_angles([0, 20, 40, 60, 80, 100, 120, 140])
    a, b = edges_of(vectors, 0.9)
    for max_passes in (1, 2, 8):
        in_memory = cluster_with_guard(8, a, b, pair_similarity(vectors), guard_threshold=0.9, max_passes=max_passes)
        streamed = cluster_with_guard_streamed(8, split_into_parts(a, b, 3), pair_similarity(vectors),
                                               guard_threshold=0.9, max_passes=max_passes)
        assert_same_clusters(streamed, in_memory)
    assert streamed.labels.tolist() == [1, 1, 1, 4, 4, 4, 6, 6]


def test_streamed_guard_reads_each_part_once_per_pass_and_holds_one_part():
    """The streamed guard never asks for a part before it is done with the previous one."""
    from dedup.search.union_find import cluster_with_guard_streamed

    rng = np.random.default_rng(4)
    n = 2_000
    vectors = clustered_vectors(rng, n, groups=30)
    a, b = edges_of(vectors, 0.55)
    pieces = np.array_split(np.arange(len(a)), 10)
    held, reads = [], []

    def parts():
        for piece in pieces:
            held.append(piece)  # released when the consumer asks for the next part
            assert len(held) == 1
            reads.append(1)
            yield a[piece], b[piece]
            held.pop()

    result = cluster_with_guard_streamed(n, parts, pair_similarity(vectors), guard_threshold=0.6)
    assert sum(reads) == 10 * result.passes and result.passes >= 2


@pytest.mark.parametrize("seed", [0, 1])
def test_part_summaries_merge_into_the_components_and_degrees_of_all_edges(seed):
    from dedup.search.union_find import merge_summaries, reduce_part

    rng = np.random.default_rng(seed)
    n = 20_000
    a, b = rng.integers(0, n, 16_000), rng.integers(0, n, 16_000)
    summaries = [reduce_part(x, y) for x, y in split_into_parts(a, b, 6, seed)()]
    assert sum(len(s[0]) for s in summaries) < 2 * len(a)  # a summary is at most the part's endpoints
    components, degree = merge_summaries(n, iter(summaries))
    assert np.array_equal(components, connected_components(n, a, b))
    assert np.array_equal(degree, np.bincount(a, minlength=n) + np.bincount(b, minlength=n))


def test_streamed_guard_on_memory_maps_holds_no_array_of_every_node(tmp_path):
    """400k nodes, a few thousand edges, the state as memory maps: the traced peak stays below even one bool
    per node (the old guard held labels, degrees and representatives as n-sized anonymous arrays)."""
    import tracemalloc

    from dedup.search.union_find import cluster_with_guard_streamed

    rng = np.random.default_rng(6)
    n = 400_000
    a, b = rng.integers(0, n, 3_000), rng.integers(0, n, 3_000)
    a = np.concatenate([a, a[:500]])
    b = np.concatenate([b, rng.integers(0, n, 500)])  # hubs: some members fail the guard, so passes repeat
    similarity = matrix_like_contains(n, 1)
    kwargs = dict(guard_threshold=0.3, support_threshold=0.1, max_passes=4)
    expected = cluster_with_guard(n, a, b, similarity, **kwargs)
    tracemalloc.start()
    streamed = cluster_with_guard_streamed(n, split_into_parts(a, b, 4), similarity,
                                           alloc=memmap_allocator(tmp_path, []), block_nodes=2_000, **kwargs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert_same_clusters(streamed, expected)
    assert expected.passes >= 2
    assert peak < n, f"traced peak {peak} bytes for {n} nodes"
