from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest

from dedup.errors import DedupError, IndexInfeasible, StoreError
from dedup.search.faiss_index import build_index
from dedup.search.index_choice import (
    HNSW_QUANTIZER_FROM_NLIST,
    KINDS,
    IndexSpec,
    cells_nlist,
    cells_stage_bytes,
    check_fits,
    choose_cells_index,
    choose_index,
    choose_nprobe,
    default_nlist,
    estimate_memory_bytes,
    flat_quantizer_cost,
    hnsw_quantizer_cost,
    spec_for_kind,
    train_points,
)
from dedup.stages.index import load_index, save_index

GB = 10**9


pytestmark = pytest.mark.usefixtures("single_faiss_thread")

MB = 10**6

# n, dim, budget, gpu -> expected kind
CHOICES = [
    pytest.param(10_000, 512, 8 * GB, False, "flat", id="small-cpu-flat"),
    pytest.param(50_000, 512, 8 * GB, False, "flat", id="5e4-cpu-exact-affordable"),
    pytest.param(100_000, 512, 8 * GB, False, "ivf_flat", id="1e5-cpu-ivf-cheaper-than-exact"),
    pytest.param(1_000_000, 512, 8 * GB, False, "ivf_flat", id="1e6-cpu-too-many-flops-for-exact"),
    pytest.param(100_000, 512, 150 * MB, False, "ivf_pq", id="flat-does-not-fit"),
    pytest.param(1_000_000, 512, 1 * GB, False, "ivf_pq", id="ivf-flat-does-not-fit"),
    pytest.param(2_000_000, 512, 64 * GB, True, "flat", id="2e6-gpu-exact"),
    pytest.param(10_000_000, 512, 64 * GB, True, "ivf_flat", id="1e7-gpu-ivf"),
    pytest.param(2_000_000_000, 512, 64 * GB, False, "ivf_pq", id="laion-2b-64GB"),
    pytest.param(2_000_000_000, 512, 64 * GB, True, "ivf_pq", id="laion-2b-64GB-gpu"),
]


@pytest.mark.parametrize(
    ("n", "variants", "kind"),
    [(20_000, 1, "flat"), (20_000, 8, "flat"), (40_000, 1, "flat"), (40_000, 8, "ivf_flat")],
)
def test_query_variants_make_exact_search_costlier(n, variants, kind):
    assert choose_index(n, 256, 8 * GB, query_variants=variants).kind == kind


@pytest.mark.parametrize("n, dim, budget, gpu, kind", CHOICES)
def test_choose_index_table(n, dim, budget, gpu, kind):
    spec = choose_index(n, dim, budget, gpu=gpu)
    assert spec.kind == kind
    assert spec.memory_bytes <= budget
    assert spec.n_vectors == n and spec.dim == dim
    assert spec.metric == "ip"
    assert spec.use_gpu == gpu
    if spec.nlist:
        assert 1 <= spec.nprobe <= spec.nlist
        assert f"IVF{spec.nlist}" in spec.factory


INFEASIBLE = [
    pytest.param(2_000_000_000, 512, 1 * GB, id="laion-2b-1GB"),
    pytest.param(1_000, 512, 10_000, id="tiny-budget"),
]


@pytest.mark.parametrize("n, dim, budget", INFEASIBLE)
def test_choose_index_raises_when_nothing_fits(n, dim, budget):
    with pytest.raises(IndexInfeasible) as caught:
        choose_index(n, dim, budget)
    assert "--memory" in caught.value.hint
    assert "smaller descriptor" in caught.value.hint


def test_laion_scale_spec_details():
    spec = choose_index(2_000_000_000, 512, 64 * GB)
    # 4*sqrt(2e9) lists behind an HNSW coarse quantizer; the largest PQ code that fits.
    assert spec.nlist == default_nlist(2_000_000_000) == 178_885
    assert spec.factory == f"IVF{spec.nlist}_HNSW32,PQ{spec.pq_m}x8"
    assert 512 % spec.pq_m == 0
    bigger = estimate_memory_bytes("ivf_pq", 2_000_000_000, 512, spec.nlist, spec.pq_m * 2)
    assert bigger > 64 * GB


def test_hnsw_is_never_chosen_automatically():
    for n in (10**3, 10**5, 10**6, 10**8):
        for budget in (10**8, 10**10, 10**12):
            for gpu in (False, True):
                try:
                    assert choose_index(n, 256, budget, gpu=gpu).kind != "hnsw"
                except IndexInfeasible:
                    pass


def test_nlist_rule():
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(10**14) == 1 << 18  # clipped
    assert default_nlist(1_000) == 1_000 // 39  # enough points per list to train


def test_more_memory_never_picks_a_less_exact_index():
    order = ["flat", "ivf_flat", "ivf_pq"]
    kinds = [choose_index(500_000, 512, budget).kind for budget in (500 * MB, 2 * GB, 8 * GB)]
    assert [order.index(kind) for kind in kinds] == sorted((order.index(kind) for kind in kinds), reverse=True)


def test_spec_json_roundtrip_and_validation():
    spec = choose_index(1_000_000, 512, 8 * GB)
    assert IndexSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown index kind"):
        dataclasses.replace(spec, kind="lsh")
    with pytest.raises(ValueError, match="metric"):
        dataclasses.replace(spec, metric="hamming")


def test_check_fits_rejects_forced_spec_over_budget():
    spec = spec_for_kind("flat", 1_000_000, 512)
    check_fits(spec, spec.memory_bytes)
    with pytest.raises(IndexInfeasible, match="budget"):
        check_fits(spec, spec.memory_bytes - 1)


def _unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


BUILDS = [
    ("flat", {}),
    ("ivf_flat", {"nlist": 32, "nprobe": 4}),
    ("ivf_pq", {"nlist": 32, "nprobe": 4, "pq_m": 8}),
    ("hnsw", {}),
]


@pytest.mark.parametrize("kind, options", BUILDS, ids=[kind for kind, _ in BUILDS])
def test_build_save_load_roundtrip(tmp_path, kind, options):
    n, dim = 10_000, 32
    spec = spec_for_kind(kind, n, dim, **options)
    vectors = _unit_vectors(n, dim)
    index = build_index(spec, vectors)
    assert index.ntotal == n
    queries = vectors[:50]
    _, labels = index.search(queries, 1)
    assert np.mean(labels[:, 0] == np.arange(50)) >= 0.9  # each row finds itself

    index_path, spec_path = save_index(index, spec, tmp_path, "clip")
    assert index_path.name == "clip.faiss" and spec_path.name == "clip.json"
    loaded, loaded_spec = load_index(tmp_path, "clip")
    assert loaded_spec == spec
    assert loaded.ntotal == n
    if spec.nprobe:
        ivf = faiss.extract_index_ivf(loaded)
        assert ivf.nprobe == spec.nprobe  # not stored in .faiss, restored from the spec
    _, loaded_labels = loaded.search(queries, 1)
    assert np.array_equal(loaded_labels, labels)


def test_ivf_build_reserves_lists_exactly():
    n, dim = 20_000, 32
    spec = spec_for_kind("ivf_flat", n, dim, nlist=64)
    index = build_index(spec, _unit_vectors(n, dim))
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    sizes = [invlists.list_size(list_no) for list_no in range(spec.nlist)]
    assert sum(sizes) == n
    stored = len(faiss.serialize_index(index))
    assert n * (dim * 4 + 8) <= stored <= spec.memory_bytes


def test_build_index_rejects_wrong_shapes():
    spec = spec_for_kind("flat", 100, 32)
    with pytest.raises(ValueError, match="dim=32"):
        build_index(spec, _unit_vectors(100, 16))
    with pytest.raises(ValueError, match="choose_index"):
        build_index(spec, _unit_vectors(101, 32))
    with pytest.raises(ValueError, match="unknown index kind"):
        spec_for_kind("binary_flat", 100, 64)  # no descriptor makes binary codes: the kinds are gone


def test_gpu_spec_on_faiss_cpu_names_the_swap():
    # faiss-gpu installs the same `faiss` module as faiss-cpu: no extra can add it, the hint swaps them.
    if hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-gpu is installed; the faiss-cpu error cannot be provoked")
    spec = spec_for_kind("flat", 100, 32, gpu=True)
    assert spec.use_gpu
    with pytest.raises(DedupError) as caught:
        build_index(spec, _unit_vectors(100, 32))
    assert caught.value.hint == "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12"
    assert "faiss-cpu" in caught.value.message


def test_load_missing_index_raises_store_error(tmp_path):
    with pytest.raises(StoreError, match="index stage"):
        load_index(tmp_path, "clip")


def test_every_kind_has_a_memory_estimate():
    for kind in KINDS:
        dim = 64
        assert estimate_memory_bytes(kind, 1_000, dim, nlist=16, pq_m=8) > 0


# ---------------------------------------------------------------- cell layout choices (builds from memory maps)



@pytest.mark.parametrize(("threshold", "nprobe"), [
    (0.96, 4), (0.94, 4), (0.93, 4), (0.929, 8), (0.90, 8), (0.85, 8), (0.80, 16), (None, 16)])
def test_nprobe_follows_the_search_threshold(threshold, nprobe):
    assert choose_nprobe(threshold) == nprobe


@pytest.mark.parametrize(("n", "nprobe", "nlist", "hnsw"), [
    (1_000_000, 16, 4000, False),  # = the autofaiss rule 4 sqrt(n) at nprobe 16
    (1_000_000, 4, 2000, False),
    (3_000_000, 4, 3464, False),
    (10_000_000, 4, 6324, False),
    (1_000, 4, 1_000 // 39, False),  # enough points per list to train
    (100_000_000, 4, 65536, True),  # past ~65M the HNSW quantizer is cheaper per query
    (2_000_000_000, 4, 1 << 18, True),  # clipped at MAX_NLIST
])
def test_cells_nlist_table(n, nprobe, nlist, hnsw):
    assert cells_nlist(n, nprobe) == (nlist, hnsw)


def test_cells_nlist_picks_the_cheaper_quantizer():
    for n in (10**5, 10**6, 10**7, 6 * 10**7, 7 * 10**7, 10**8, 10**9):
        _, hnsw = cells_nlist(n, 4)
        assert hnsw == (flat_quantizer_cost(n, 4) > hnsw_quantizer_cost(4))


def test_flat_nlist_balances_the_quantizer_scan_and_the_join():
    n, nprobe = 3_000_000, 4
    nlist, _ = cells_nlist(n, nprobe)

    def products(lists):
        return lists + nprobe * n / lists

    assert products(nlist) <= min(products(nlist * 0.7), products(nlist * 1.4))


@pytest.mark.parametrize(("n", "nlist", "budget", "points"), [
    (1_000_000, 2000, 4 * GB, 64 * 2000),  # at most 64 a list
    (50_000, 2000, 4 * GB, 50_000),  # never more than there are
    (2_000_000_000, 1 << 18, 64 * GB, int(64 * GB * 0.5) // (768 * 4)),  # half the budget
    (2_000_000_000, 1 << 18, 4 * GB, 8 << 18),  # never below 8 a list
])
def test_training_sample_is_bounded(n, nlist, budget, points):
    assert train_points(n, nlist, 768, budget) == points


def test_cells_choice_for_laion_like_vectors():
    spec = choose_cells_index(1_000_000, 768, 4 * GB, threshold=0.94)
    assert (spec.kind, spec.storage, spec.nlist, spec.nprobe, spec.factory) == ("ivf_flat", "cells", 2000, 4, "IVF2000,Flat")
    assert spec.memory_bytes == cells_stage_bytes(1_000_000, 768, 2000, 4, False, 4 * GB) <= 1 * GB
    big = choose_cells_index(2_000_000_000, 768, 64 * GB, threshold=0.94)
    assert big.factory == f"IVF{1 << 18}_HNSW32,Flat" and big.nlist >= HNSW_QUANTIZER_FROM_NLIST
    assert not choose_cells_index(2_000_000_000, 768, 64 * GB, threshold=0.94, gpu=True).factory.count("HNSW")
    with pytest.raises(IndexInfeasible, match="training vectors"):
        choose_cells_index(2_000_000_000, 768, 4 * GB, threshold=0.94)


def test_cell_storage_is_only_an_exact_ivf_layout():
    spec = choose_cells_index(1_000_000, 768, 4 * GB)
    assert IndexSpec.from_json(spec.to_json()) == spec
    assert IndexSpec.from_json(spec_for_kind("flat", 10, 8).to_json()).storage == "index"  # older spec files
    with pytest.raises(ValueError, match="cell storage"):
        dataclasses.replace(spec, kind="ivf_pq")
    with pytest.raises(ValueError, match="storage"):
        dataclasses.replace(spec, storage="disk")
