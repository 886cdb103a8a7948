"""Choose the faiss index of one descriptor: a pure function of (vectors, dim, memory budget, GPU).

Index choice is a pure function of (n_vectors, dim, memory budget, gpu)
so that it can be tested table-driven and checked *before* any vector is read
(in the spirit of autofaiss). The rules, in order:

* **flat** (exact) while the exact all-vs-all pass is affordable and the raw
  vectors fit the budget. All-vs-all costs ``2 * n^2 * d`` flops (one multiply
  and one add per coordinate per pair); see ``EXACT_FLOP_BUDGET_*``.
* **ivf_flat** beyond that, when the uncompressed vectors plus ids fit.
* **ivf_pq** when IVF-Flat does not fit: the largest PQ code that fits.
* **hnsw** is never chosen automatically. Duplicate search is an all-vs-all
  *range* search with unbounded result lists; faiss' HNSW range search only
  explores ``efSearch`` candidates (it silently truncates groups larger than
  that), it is not faster than IVF for a full self-join, and its graph costs
  ``2*M`` int32 links per vector on top of the raw vectors. It stays available
  through ``spec_for_kind("hnsw", ...)`` for low-latency interactive queries.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from dedup.errors import IndexInfeasible

KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
STORAGES = ("index", "cells")

# Exact all-vs-all budget in flops. 3e12 is ~1 min at the ~50 GFLOP/s a 2-core
# AVX2 machine sustains (measured); at d=512 it allows n <= 54k. Beyond, IVF is
# far cheaper at the same recall (benchmarks/bench_graph.py, 1e5 x 512: flat
# 144 s, IVF cell join 11.5 s, pair recall 1.0000). Query variants (the 8
# flips/rotations of `perceptual`) multiply the flops. On a GPU (~20-50 TFLOP/s
# fp32) 1e16 flops is a few minutes and allows n <= 3.1M at d=512.
EXACT_FLOP_BUDGET_CPU = 3e12
EXACT_FLOP_BUDGET_GPU = 1e16

# nlist ~ 4*sqrt(n) (autofaiss / faiss wiki guideline), clipped. Above 2^16
# lists the coarse quantizer itself becomes an HNSW graph so that assigning a
# vector does not cost a scan over every centroid.
NLIST_PER_SQRT_N = 4
MAX_NLIST = 1 << 18
HNSW_QUANTIZER_FROM_NLIST = 1 << 16
QUANTIZER_HNSW_M = 32
MIN_TRAIN_POINTS_PER_LIST = 39  # faiss k-means warns below this
# Range-search recall of near-duplicates (cosine >= 0.9, 512-d, uniform
# background -- the hardest case for IVF) measured at nlist = 4*sqrt(n):
# nprobe 4 -> 0.988, 8 -> 0.995, 16 -> 0.998. 16 keeps >= 0.99 with margin.
DEFAULT_NPROBE = 16
HNSW_M = 32
DEFAULT_EF_SEARCH = 256
PQ_NBITS = 8
PQ_M_CANDIDATES = (64, 48, 32, 24, 16, 12, 8)
# faiss GPU IVF-PQ supports at most 32 dimensions per sub-quantizer.
GPU_MAX_DIMS_PER_SUBQUANTIZER = 32
# faiss' StandardGpuResources reserves scratch memory on top of the index.
GPU_SCRATCH_BYTES = 1536 << 20
ID_BYTES = 8  # faiss stores one int64 id per vector in inverted lists
ASSIGNMENT_BYTES = 4  # build keeps one int32 list number per vector
ADD_CHUNK = 65536
# faiss-cpu and faiss-gpu-cu12 install the same `faiss` module, so no extra can add GPU support: swap them.
GPU_INSTALL_HINT = "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12"


@dataclass(frozen=True)
class IndexSpec:
    """Everything needed to rebuild or reopen an index; stored as `<name>.json`."""

    kind: str
    factory: str
    dim: int
    n_vectors: int
    nlist: int = 0
    pq_m: int = 0
    nprobe: int = 0
    ef_search: int = 0
    metric: str = "ip"
    use_gpu: bool = False
    memory_bytes: int = 0
    # IVF lists in faiss' OnDiskInvertedLists (<name>.ivfdata, memory-mapped) because
    # they exceed the memory budget; memory_bytes is then the build's working set.
    on_disk: bool = False
    # "index": the vectors live in the faiss index. "cells": only the quantizer and the
    # rows grouped by cell are stored; every score is computed from the embeddings'
    # memory maps (no second copy of the vectors; see `choose_cells_index`).
    storage: str = "index"
    # Cells: the stored probes omit cells that cannot hold a pair at this similarity
    # (`dedup.search.pairs.prune_probes`); a search below it needs a rebuilt index.
    probe_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; use one of {KINDS}")
        if self.storage not in STORAGES:
            raise ValueError(f"unknown index storage {self.storage!r}; use one of {STORAGES}")
        if self.storage == "cells" and self.kind != "ivf_flat":
            raise ValueError(f"cell storage is an exact IVF layout (kind 'ivf_flat'), not {self.kind!r}")
        if self.metric != "ip":
            raise ValueError(f"index kind {self.kind!r} uses metric 'ip', not {self.metric!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexSpec:
        return cls(**json.loads(text))


# ---------------------------------------------------------------- choice


def default_nlist(n_vectors: int) -> int:
    """~4*sqrt(n) lists, at most MAX_NLIST, and enough points per list to train."""
    nlist = min(int(NLIST_PER_SQRT_N * math.sqrt(n_vectors)), MAX_NLIST)
    return max(1, min(nlist, n_vectors // MIN_TRAIN_POINTS_PER_LIST))


def exact_search_affordable(n_vectors: int, dim: int, gpu: bool, query_variants: int = 1) -> bool:
    """Is the exact all-vs-all self-join (each query searched in `query_variants` forms) within budget?"""
    budget = EXACT_FLOP_BUDGET_GPU if gpu else EXACT_FLOP_BUDGET_CPU
    return 2.0 * float(n_vectors) ** 2 * dim * query_variants <= budget


def _uses_hnsw_quantizer(nlist: int, gpu: bool) -> bool:
    # On GPU the flat quantizer is fast enough and the GPU cloner cannot copy an HNSW one.
    return nlist >= HNSW_QUANTIZER_FROM_NLIST and not gpu


def _ivf_prefix(nlist: int, gpu: bool) -> str:
    if _uses_hnsw_quantizer(nlist, gpu):
        return f"IVF{nlist}_HNSW{QUANTIZER_HNSW_M}"
    return f"IVF{nlist}"


def _factory(kind: str, nlist: int, pq_m: int, gpu: bool) -> str:
    factories = {
        "flat": "Flat",
        "ivf_flat": f"{_ivf_prefix(nlist, gpu)},Flat",
        "ivf_pq": f"{_ivf_prefix(nlist, gpu)},PQ{pq_m}x{PQ_NBITS}",
        "hnsw": f"HNSW{HNSW_M},Flat",
    }
    return factories[kind]


def _quantizer_bytes(nlist: int, dim: int, gpu: bool) -> int:
    graph = nlist * 2 * QUANTIZER_HNSW_M * 4 if _uses_hnsw_quantizer(nlist, gpu) else 0
    return nlist * dim * 4 + graph


def estimate_memory_bytes(kind: str, n_vectors: int, dim: int, nlist: int = 0, pq_m: int = 0, gpu: bool = False) -> int:
    """Peak bytes of building and holding the index (excluding the caller's vectors).

    IVF builds reserve every inverted list at its final size (see
    `_add_ivf_without_slack`), so the loaded size is exact; the build adds one
    int32 list number per vector and one add chunk.
    """
    n = int(n_vectors)
    add_chunk = min(ADD_CHUNK, n)
    if kind == "flat":
        size = n * dim * 4
    elif kind == "hnsw":
        # level 0 holds 2*M links per vector; upper levels add ~1/M of that.
        size = n * (dim * 4 + int(2 * HNSW_M * 4 * (1 + 1 / HNSW_M)) + ID_BYTES)
    elif kind == "ivf_flat":
        size = n * (dim * 4 + ID_BYTES + ASSIGNMENT_BYTES) + _quantizer_bytes(nlist, dim, gpu) + add_chunk * dim * 4
    elif kind == "ivf_pq":
        codebooks = (1 << PQ_NBITS) * dim * 4
        size = n * (pq_m + ID_BYTES + ASSIGNMENT_BYTES) + _quantizer_bytes(nlist, dim, gpu) + codebooks
        size += add_chunk * dim * 4
    else:
        raise ValueError(f"unknown index kind {kind!r}; use one of {KINDS}")
    return int(size + (GPU_SCRATCH_BYTES if gpu else 0))


def spec_for_kind(
    kind: str,
    n_vectors: int,
    dim: int,
    *,
    gpu: bool = False,
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
) -> IndexSpec:
    """The spec of one given kind (defaults as `choose_index` would pick them)."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; use one of {KINDS}")
    uses_lists = kind in ("ivf_flat", "ivf_pq")
    lists = (nlist or default_nlist(n_vectors)) if uses_lists else 0
    m = (pq_m or _largest_pq_m(dim, gpu)) if kind == "ivf_pq" else 0
    if kind == "ivf_pq" and dim % m:
        raise ValueError(f"pq_m={m} must divide dim={dim}")
    use_gpu = gpu and kind != "hnsw"  # faiss GPU has no HNSW index
    return IndexSpec(
        kind=kind,
        factory=_factory(kind, lists, m, use_gpu),
        dim=dim,
        n_vectors=int(n_vectors),
        nlist=lists,
        pq_m=m,
        nprobe=min(nprobe or DEFAULT_NPROBE, lists) if uses_lists else 0,
        ef_search=DEFAULT_EF_SEARCH if kind == "hnsw" else 0,
        metric="ip",
        use_gpu=use_gpu,
        memory_bytes=estimate_memory_bytes(kind, n_vectors, dim, lists, m, use_gpu),
    )


def _pq_m_options(dim: int, gpu: bool) -> list[int]:
    options = [m for m in PQ_M_CANDIDATES if dim % m == 0]
    if gpu:
        options = [m for m in options if dim // m <= GPU_MAX_DIMS_PER_SUBQUANTIZER]
    return options


def _largest_pq_m(dim: int, gpu: bool) -> int:
    options = _pq_m_options(dim, gpu)
    if not options:
        raise ValueError(f"no PQ code size in {PQ_M_CANDIDATES} divides dim={dim}")
    return options[0]


def _candidates(n_vectors: int, dim: int, gpu: bool, query_variants: int = 1) -> list[IndexSpec]:
    """Specs in order of preference; the first that fits the budget wins."""
    exact = exact_search_affordable(n_vectors, dim, gpu, query_variants)
    specs = [spec_for_kind("flat", n_vectors, dim, gpu=gpu)] if exact else []
    specs.append(spec_for_kind("ivf_flat", n_vectors, dim, gpu=gpu))
    specs += [spec_for_kind("ivf_pq", n_vectors, dim, gpu=gpu, pq_m=m) for m in _pq_m_options(dim, gpu)]
    return specs


def choose_index(
    n_vectors: int, dim: int, memory_budget_bytes: int, gpu: bool = False, query_variants: int = 1,
) -> IndexSpec:
    """Pick the most exact index that fits `memory_budget_bytes` (see module doc).

    `query_variants`: how many forms of each query the neighbour search runs
    (8 for `perceptual`'s flips/rotations), which scales the exact search's cost.
    """
    if n_vectors < 1 or dim < 1:
        raise ValueError(f"need n_vectors >= 1 and dim >= 1, got n_vectors={n_vectors}, dim={dim}")
    candidates = _candidates(n_vectors, dim, gpu, query_variants)
    for spec in candidates:
        if spec.memory_bytes <= memory_budget_bytes:
            return spec
    smallest = min(candidates, key=lambda spec: spec.memory_bytes)
    raise IndexInfeasible(
        f"no index for {n_vectors:,} vectors of {dim} dims fits "
        f"{_gib(memory_budget_bytes)}: the smallest, {smallest.kind} ({smallest.factory}), "
        f"needs {_gib(smallest.memory_bytes)}",
        hint=f"raise --memory to at least {_gib(smallest.memory_bytes)}, "
        "or use a smaller descriptor (fewer dimensions)",
    )


def choose_index_streaming(
    n_vectors: int, dim: int, memory_budget_bytes: int, gpu: bool = False, query_variants: int = 1,
) -> IndexSpec:
    """`choose_index` for a build from memory maps; when no index fits in RAM, IVF-Flat with on-disk lists.

    The on-disk build holds the quantizer, the training sample and one part's
    lists (`on_disk_part_rows`), never the whole index; see `index_stage_bytes`.
    """
    if n_vectors < 1 or dim < 1:
        raise ValueError(f"need n_vectors >= 1 and dim >= 1, got n_vectors={n_vectors}, dim={dim}")
    for spec in _candidates(n_vectors, dim, gpu, query_variants):
        if index_stage_bytes(spec) <= memory_budget_bytes:  # the index plus the stage's own training sample
            return spec
    if gpu:
        return choose_index(n_vectors, dim, memory_budget_bytes, gpu=gpu, query_variants=query_variants)
    spec = spec_for_kind("ivf_flat", n_vectors, dim)
    on_disk = IndexSpec(**{**asdict(spec), "on_disk": True})
    working = index_stage_bytes(on_disk, memory_budget_bytes)
    if working > memory_budget_bytes:
        raise IndexInfeasible(
            f"even an on-disk IVF index for {n_vectors:,} vectors needs {_gib(working)} to build "
            f"(quantizer, {default_train_size(on_disk):,} training vectors, one part of lists), "
            f"more than {_gib(memory_budget_bytes)}",
            hint=f"raise --memory to at least {_gib(working)}",
        )
    return IndexSpec(**{**asdict(on_disk), "memory_bytes": working})


MAX_ON_DISK_PART_ROWS = 1 << 20


def on_disk_part_rows(memory_budget_bytes: int, dim: int) -> int:
    """Rows per temporary index merged into on-disk lists: a quarter of the budget, 1,024..2^20."""
    per_row = dim * 4 + ID_BYTES + ASSIGNMENT_BYTES
    return int(max(1024, min(MAX_ON_DISK_PART_ROWS, memory_budget_bytes // 4 // per_row)))


def index_stage_bytes(spec: IndexSpec, memory_budget_bytes: int | None = None) -> int:
    """The index stage's own working set: the index (or one on-disk part) plus the training sample.

    The probes and the grouping of rows by cell are written to memory maps
    block by block (file pages, not the stage's memory).
    """
    train = default_train_size(spec) * spec.dim * 4
    if spec.on_disk:
        part = min(spec.n_vectors, on_disk_part_rows(memory_budget_bytes or 0, spec.dim))
        lists = estimate_memory_bytes(spec.kind, part, spec.dim, spec.nlist, spec.pq_m)
        return int(lists + train)
    return int(spec.memory_bytes + train)


def respec_nlist(spec: IndexSpec, nlist: int) -> IndexSpec:
    """The same spec with `nlist` lists (after merging close centroids): factory, nprobe and memory follow."""
    fields = {**asdict(spec), "nlist": nlist, "factory": _factory(spec.kind, nlist, spec.pq_m, spec.use_gpu),
              "nprobe": min(spec.nprobe, nlist)}
    if not spec.on_disk:
        fields["memory_bytes"] = estimate_memory_bytes(spec.kind, spec.n_vectors, spec.dim, nlist, spec.pq_m, spec.use_gpu)
    return IndexSpec(**fields)


def check_fits(spec: IndexSpec, memory_budget_bytes: int) -> None:
    """Raise IndexInfeasible when a (possibly user-forced) spec exceeds the budget."""
    if spec.memory_bytes > memory_budget_bytes:
        raise IndexInfeasible(
            f"index {spec.kind} ({spec.factory}) for {spec.n_vectors:,} vectors needs "
            f"{_gib(spec.memory_bytes)}, more than the {_gib(memory_budget_bytes)} budget",
            hint=f"raise --memory to at least {_gib(spec.memory_bytes)}, or pick a smaller index",
        )


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 30):.2f} GiB"


# ---------------------------------------------------------------- build


def default_train_size(spec: IndexSpec) -> int:
    """Training points for the coarse quantizer (and PQ codebooks)."""
    if spec.kind not in ("ivf_flat", "ivf_pq"):
        return 0
    needed = MIN_TRAIN_POINTS_PER_LIST * spec.nlist
    if spec.kind == "ivf_pq":
        needed = max(needed, MIN_TRAIN_POINTS_PER_LIST * (1 << PQ_NBITS))
    return min(spec.n_vectors, needed)


# ---------------------------------------------------------------- cell layout (builds from memory maps)

# Probes per query by search threshold. Copies above a high cut almost always
# share their home cell: measured on the LAION-like benchmark vectors (768-d,
# 200k, planted groups at cosine 0.97-0.995, nlist = sqrt(nprobe * n)):
# see BENCHMARKS.md, "LAION scale", recall vs nprobe. Rows: (lowest threshold, nprobe).
NPROBE_BY_THRESHOLD = ((0.93, 4), (0.85, 8))
# HNSW quantizer cost per query in flat-centroid equivalents: 20,000 queries against
# 32,768 random 768-d centroids took 12.2 CPU s at efSearch 16 against 16.9 s for a
# flat scan (this machine), i.e. ~24,000 centroid products. Random points are HNSW's
# worst case; clustered centroids cost less.
HNSW_QUERY_COST = 24_000
# Mean rows per cell with an HNSW quantizer: the join then costs nprobe * 2,048
# products a query whatever n is, so the whole search grows as n log n.
HNSW_CELL_ROWS = 2048
# Training points per list: faiss warns below 39; more than 64 buys nothing for
# finding copies (the join is exact inside the probed cells) and k-means costs
# points * lists * dim, i.e. grows with lists^2.
MAX_TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN_POINTS_FLOOR = 8  # a budget-limited sample never falls below this per list
TRAIN_BUDGET_FRACTION = 0.5  # of --memory, for the float32 training sample
# Queries probe at least this many cells (interactive `query`, a handful of vectors:
# a re-encoded or cropped image lies further from its copies than two copies of one file).
QUERY_MIN_NPROBE = 16


def choose_nprobe(threshold: float | None) -> int:
    """Cells probed per query for a search at `threshold` (None: the general default)."""
    if threshold is None:
        return DEFAULT_NPROBE
    for lowest, nprobe in NPROBE_BY_THRESHOLD:
        if threshold >= lowest:
            return nprobe
    return DEFAULT_NPROBE


def flat_quantizer_cost(n_vectors: int, nprobe: int) -> float:
    """Products per query at the balanced flat layout: nlist centroids + nprobe cells of n/nlist rows."""
    return 2.0 * math.sqrt(nprobe * n_vectors)


def hnsw_quantizer_cost(nprobe: int) -> float:
    return HNSW_QUERY_COST + nprobe * HNSW_CELL_ROWS


def cells_nlist(n_vectors: int, nprobe: int) -> tuple[int, bool]:
    """(nlist, HNSW quantizer?) minimising the products per query of the cell join.

    Flat quantizer: the query scans all nlist centroids, then nprobe cells of
    n / nlist rows; the sum is least at nlist = sqrt(nprobe * n) (= 4 sqrt(n) at
    nprobe 16, the autofaiss rule), and the search grows as n^1.5. HNSW
    quantizer: about constant per query, so cells stay at HNSW_CELL_ROWS and
    the search grows as n log n; it wins once the flat cost exceeds it
    (~65M vectors at nprobe 4).
    """
    n = int(n_vectors)
    if flat_quantizer_cost(n, nprobe) <= hnsw_quantizer_cost(nprobe):
        nlist, hnsw = int(math.sqrt(nprobe * n)), False
    else:
        nlist, hnsw = max(HNSW_QUANTIZER_FROM_NLIST, n // HNSW_CELL_ROWS), True
    nlist = max(1, min(nlist, MAX_NLIST, n // MIN_TRAIN_POINTS_PER_LIST))
    return nlist, hnsw and nlist >= HNSW_QUANTIZER_FROM_NLIST


def train_points(n_vectors: int, nlist: int, dim: int, memory_budget_bytes: int) -> int:
    """k-means sample size: MIN..MAX_TRAIN_POINTS_PER_LIST points a list, within half the budget."""
    wanted = min(int(n_vectors), MAX_TRAIN_POINTS_PER_LIST * nlist)
    wanted = max(wanted, min(int(n_vectors), MIN_TRAIN_POINTS_PER_LIST * nlist))
    affordable = int(memory_budget_bytes * TRAIN_BUDGET_FRACTION) // (dim * 4)
    return max(min(wanted, affordable), min(int(n_vectors), MIN_TRAIN_POINTS_FLOOR * nlist))


def probe_block_rows(dim: int, nprobe: int, memory_budget_bytes: int) -> int:
    """Rows per quantizer pass block: float32 rows + probes within a sixteenth of the budget."""
    per_row = dim * 4 + nprobe * (4 + 8 + 4)  # float32 row, faiss' int64 labels and float32 distances
    return int(max(1024, min(ADD_CHUNK, memory_budget_bytes // 16 // per_row)))


def cells_stage_bytes(n_vectors: int, dim: int, nlist: int, nprobe: int, hnsw: bool,
                      memory_budget_bytes: int) -> int:
    """The cell build's own buffers: quantizer, k-means sample (+ its assignment), one probe block, cell counts.

    Probes and rows grouped by cell go to memory maps (file pages, not the
    stage's memory); the vectors are read from theirs.
    """
    quantizer = nlist * dim * 4 + (nlist * 2 * QUANTIZER_HNSW_M * 4 if hnsw else 0)
    sample = train_points(n_vectors, nlist, dim, memory_budget_bytes)
    kmeans = sample * (dim * 4 + 8 + 4) + nlist * dim * 4  # points, labels and distances, new centroids
    block = probe_block_rows(dim, nprobe, memory_budget_bytes) * (dim * 4 + nprobe * 16)
    return int(quantizer + kmeans + block + (nlist + 1) * 8 * 3)


def check_nprobe(nprobe: int, nlist: int, n_vectors: int, name: str = "") -> None:
    """A per-run `--nprobe` must name between 1 and nlist cells (the lists of this index)."""
    if not 1 <= nprobe <= nlist:
        of = f" of '{name}'" if name else ""
        raise IndexInfeasible(
            f"--nprobe {nprobe} is outside 1..{nlist}: the cell index{of} over {n_vectors:,} vectors has {nlist:,} cells",
            hint=f"pass --nprobe between 1 and {nlist}, or leave it out (the default follows the threshold)",
        )


def choose_cells_index(
    n_vectors: int, dim: int, memory_budget_bytes: int, threshold: float | None = None, gpu: bool = False,
    nprobe: int | None = None, name: str = "",
) -> IndexSpec:
    """The exact IVF layout for a build from memory maps: quantizer + rows by cell, no vectors in the index.

    nprobe follows the search threshold (`choose_nprobe`) unless given
    (`--nprobe`, checked against nlist), nlist and the quantizer the cost model
    of `cells_nlist`; memory_bytes is the stage's own working set. On a GPU the
    flat quantizer stays (faiss cannot clone an HNSW quantizer to the GPU).
    """
    if n_vectors < 1 or dim < 1:
        raise ValueError(f"need n_vectors >= 1 and dim >= 1, got n_vectors={n_vectors}, dim={dim}")
    given, nprobe = nprobe is not None, choose_nprobe(threshold) if nprobe is None else int(nprobe)
    nlist, hnsw = cells_nlist(n_vectors, nprobe)
    hnsw = hnsw and not gpu
    if given:
        check_nprobe(nprobe, nlist, n_vectors, name)
    working = cells_stage_bytes(n_vectors, dim, nlist, nprobe, hnsw, memory_budget_bytes)
    if working > memory_budget_bytes:
        raise IndexInfeasible(
            f"the cell index for {n_vectors:,} vectors needs {_gib(working)} to build (quantizer of "
            f"{nlist:,} lists, {train_points(n_vectors, nlist, dim, memory_budget_bytes):,} training vectors), "
            f"more than {_gib(memory_budget_bytes)}",
            hint=f"raise --memory to at least {_gib(working)}",
        )
    prefix = f"IVF{nlist}_HNSW{QUANTIZER_HNSW_M}" if hnsw else f"IVF{nlist}"
    return IndexSpec(kind="ivf_flat", factory=f"{prefix},Flat", dim=dim, n_vectors=int(n_vectors), nlist=nlist,
                     nprobe=min(nprobe, nlist), metric="ip", use_gpu=gpu, memory_bytes=working, storage="cells")


def respec_cells_nlist(spec: IndexSpec, nlist: int, memory_budget_bytes: int) -> IndexSpec:
    """A cell spec after merging close centroids: fewer lists, the same quantizer kind."""
    hnsw = "_HNSW" in spec.factory
    prefix = f"IVF{nlist}_HNSW{QUANTIZER_HNSW_M}" if hnsw else f"IVF{nlist}"
    working = cells_stage_bytes(spec.n_vectors, spec.dim, nlist, spec.nprobe, hnsw, memory_budget_bytes)
    return IndexSpec(**{**asdict(spec), "nlist": nlist, "nprobe": min(spec.nprobe, nlist),
                        "factory": f"{prefix},Flat", "memory_bytes": max(working, spec.memory_bytes)})
