"""Benchmark: index build + all-pairs neighbour search + connected components.

Synthetic 512-d L2-normalised vectors: a uniform random background (the hard
case for IVF: no cluster structure to exploit) plus planted near-duplicate
groups whose sizes follow a Zipf law. Copies are base + Gaussian noise with a
per-group noise level, so within-group similarities straddle the threshold.

Methods (each runs in a forked child, so its time and peak RSS are its own):

* ``flat``      exact: IndexFlatIP + `find_pairs` (range search)
* ``ivf_range`` IVF-Flat (nlist = 4 sqrt(n), nprobe from the spec) + `find_pairs`
* ``ivf_join``  same IVF index + `find_pairs_ivf_join` (BLAS cell join)
* ``semdedup``  SemDeDup-style: faiss k-means into k clusters, exact pairs only
  inside each cluster (no probing of neighbouring clusters)

Pair recall is measured against exact search: all pairs when ``flat`` runs
(its output is exact), otherwise for a random sample of query rows searched
exhaustively.

    python benchmarks/bench_graph.py --n 100000
    python benchmarks/bench_graph.py --n 1000000 --methods ivf_join,semdedup
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import faiss
import numpy as np

from dedup.search.faiss_index import build_index
from dedup.search.index_choice import spec_for_kind
from dedup.search.pairs import find_pairs, find_pairs_ivf_join, iter_blocks
from dedup.search.union_find import connected_components

METHODS = ("flat", "ivf_range", "ivf_join", "semdedup")


# ---------------------------------------------------------------- data


def zipf_group_sizes(n_planted: int, exponent: float, max_size: int, rng: np.random.Generator) -> list[int]:
    sizes, total = [], 0
    while total < n_planted:
        size = int(min(max(rng.zipf(exponent), 2), max_size, n_planted - total))
        if size < 2:
            break
        sizes.append(size)
        total += size
    return sizes


def synthetic_vectors(n: int, dim: int, planted_fraction: float, exponent: float, max_group: int, seed: int):
    """(vectors, group sizes). Rows are shuffled so groups are spread over blocks."""
    rng = np.random.default_rng(seed)
    sizes = zipf_group_sizes(int(n * planted_fraction), exponent, max_group, rng)
    vectors = np.empty((n, dim), dtype=np.float32)
    n_background = n - sum(sizes)
    for block in iter_blocks(n_background, 65536):
        vectors[block] = rng.standard_normal((block.stop - block.start, dim), dtype=np.float32)
    row = n_background
    for size in sizes:
        base = rng.standard_normal(dim, dtype=np.float32)
        base /= np.linalg.norm(base)
        # pairwise cosine ~ 1 / (1 + dim * sigma^2): 0.99 .. 0.83 over this sigma range
        sigma = rng.uniform(0.005, 0.02)
        vectors[row : row + size] = base + sigma * rng.standard_normal((size, dim), dtype=np.float32)
        row += size
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors[rng.permutation(n)], sizes


# ---------------------------------------------------------------- methods


def collect_keys(pair_blocks, ids_are_rows_n: int) -> np.ndarray:
    """Sorted int64 keys a*n+b of every yielded pair (ids are rows in this benchmark)."""
    keys = [id_a * ids_are_rows_n + id_b for id_a, id_b, _ in pair_blocks]
    return np.sort(np.concatenate(keys)) if keys else np.empty(0, np.int64)


def run_index_method(kind: str, engine: str, vectors: np.ndarray, threshold: float, nprobe: int | None):
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64)
    stages = {}
    start = time.perf_counter()
    spec = spec_for_kind(kind, n, dim, nprobe=nprobe)
    index = build_index(spec, vectors)
    stages["build"] = time.perf_counter() - start
    start = time.perf_counter()
    if engine == "join":
        keys = collect_keys(find_pairs_ivf_join(index, vectors, ids, threshold), n)
    else:
        keys = collect_keys(find_pairs(index, vectors, ids, threshold), n)
    stages["pairs"] = time.perf_counter() - start
    return keys, stages, spec.factory + (f" nprobe={spec.nprobe}" if spec.nprobe else "")


def run_semdedup(vectors: np.ndarray, threshold: float, k: int, seed: int):
    """k-means, then exact all-pairs inside each cluster only."""
    n, dim = vectors.shape
    stages = {}
    start = time.perf_counter()
    kmeans = faiss.Kmeans(dim, k, niter=10, seed=seed, spherical=True, max_points_per_centroid=64)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 64 * k), replace=False))
    kmeans.train(vectors[sample])
    _, assignment = kmeans.index.search(vectors, 1)
    stages["build"] = time.perf_counter() - start
    start = time.perf_counter()
    order = np.argsort(assignment[:, 0], kind="stable")
    bounds = np.searchsorted(assignment[order, 0], np.arange(k + 1))
    keys = []
    for cluster in range(k):
        rows = order[bounds[cluster] : bounds[cluster + 1]]
        members = vectors[rows]
        q, r = np.nonzero(np.triu(members @ members.T >= np.float32(threshold), k=1))
        a, b = rows[q], rows[r]
        keys.append(np.minimum(a, b) * n + np.maximum(a, b))
    stages["pairs"] = time.perf_counter() - start
    return np.sort(np.concatenate(keys)), stages, f"k-means k={k}, pairs within each cluster"


def run_method(name: str, vectors: np.ndarray, args, out_dir: Path, result_queue) -> None:
    """Child process body: run one method, write its pair keys, report stats."""
    rss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    total = time.perf_counter()
    if name == "semdedup":
        keys, stages, detail = run_semdedup(vectors, args.threshold, args.semdedup_k or max(1, len(vectors) // 1000),
                                            args.seed)
    else:
        kind, engine = ("flat", "range") if name == "flat" else ("ivf_flat", name.split("_")[1])
        keys, stages, detail = run_index_method(kind, engine, vectors, args.threshold, args.nprobe)
    start = time.perf_counter()
    n = len(vectors)
    labels = connected_components(n, keys // n, keys % n)
    stages["components"] = time.perf_counter() - start
    stages["total"] = time.perf_counter() - total
    _, numpy_peak = tracemalloc.get_traced_memory()
    np.save(out_dir / f"{name}.npy", keys)
    sizes = np.bincount(labels, minlength=n)
    result_queue.put({
        "method": name,
        "detail": detail,
        "stages": stages,
        "pairs": len(keys),
        "clusters": int(np.count_nonzero(sizes >= 2)),
        "largest": int(sizes.max()),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_at_fork_gb": rss_at_start / 2**20,
        "numpy_peak_gb": numpy_peak / 2**30,
    })


def run_in_child(name: str, vectors: np.ndarray, args, out_dir: Path) -> dict:
    context = multiprocessing.get_context("fork")  # the child shares `vectors` copy-on-write
    queue = context.Queue()
    child = context.Process(target=run_method, args=(name, vectors, args, out_dir, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


# ---------------------------------------------------------------- recall


def sampled_truth_keys(vectors: np.ndarray, threshold: float, n_queries: int, seed: int):
    """Exact pairs (as keys) involving a random sample of query rows; and the sample."""
    n = len(vectors)
    queries = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(n, n_queries), replace=False))
    keys = []
    for chunk in iter_blocks(len(queries), 32):  # 32 x n float32 similarities per step
        rows = queries[chunk]
        q, r = np.nonzero(vectors[rows] @ vectors.T >= np.float32(threshold))
        a, b = rows[q], r
        off_diagonal = a != b
        keys.append(np.minimum(a, b)[off_diagonal] * n + np.maximum(a, b)[off_diagonal])
    return np.unique(np.concatenate(keys)), queries


def recall_of(found: np.ndarray, truth: np.ndarray, queries: np.ndarray | None, n: int) -> tuple[float, float]:
    """(pair recall, row-averaged recall) of `found` against the true pair keys.

    Pair recall is dominated by the largest groups (a group of s copies has
    s^2/2 pairs); the row average -- for each query row with true partners, the
    fraction of them found, averaged over rows -- weighs every image equally.
    """
    if not len(truth):
        return float("nan"), float("nan")
    hit = np.isin(truth, found).astype(np.float64)
    endpoints = np.concatenate([truth // n, truth % n])
    hits = np.concatenate([hit, hit])
    if queries is not None:  # only rows that were searched exhaustively know all their partners
        sampled = np.isin(endpoints, queries)
        endpoints, hits = endpoints[sampled], hits[sampled]
    partners = np.bincount(endpoints, minlength=n)
    found_partners = np.bincount(endpoints, weights=hits, minlength=n)
    rows = partners > 0
    return float(hit.mean()), float((found_partners[rows] / partners[rows]).mean())


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=float, default=1e5, help="number of vectors (1e5, 1e6, ...)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF nprobe (default: the spec's)")
    parser.add_argument("--semdedup-k", type=int, default=None, help="k-means clusters (default n/1000)")
    parser.add_argument("--planted-fraction", type=float, default=0.1)
    parser.add_argument("--zipf", type=float, default=2.0, help="Zipf exponent of group sizes")
    parser.add_argument("--max-group", type=int, default=2000)
    parser.add_argument("--recall-queries", type=int, default=3000, help="sampled exact queries when flat is not run")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = [name for name in args.methods.split(",") if name]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    # faiss (OpenMP) and numpy (OpenBLAS) both use every core we are allowed.
    faiss.omp_set_num_threads(args.threads)
    n = int(args.n)
    start = time.perf_counter()
    vectors, sizes = synthetic_vectors(n, args.dim, args.planted_fraction, args.zipf, args.max_group, args.seed)
    print(f"data: n={n:,} dim={args.dim} groups={len(sizes):,} planted rows={sum(sizes):,} "
          f"largest group={max(sizes):,} ({time.perf_counter() - start:.1f}s), threads={args.threads}, "
          f"threshold={args.threshold}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        for name in methods:
            results.append(run_in_child(name, vectors, args, out_dir))
            print(f"  {name}: {results[-1]['stages']['total']:.1f}s", flush=True)
        report_recall(results, vectors, args, out_dir)
    print_table(results)


def report_recall(results: list[dict], vectors: np.ndarray, args, out_dir: Path) -> None:
    n = len(vectors)
    if any(result["method"] == "flat" for result in results):
        truth, queries, source = np.load(out_dir / "flat.npy"), None, "all pairs of the exact flat search"
    else:
        start = time.perf_counter()
        truth, queries = sampled_truth_keys(vectors, args.threshold, args.recall_queries, args.seed)
        source = f"exact search of {len(queries):,} random query rows ({len(truth):,} true pairs, " \
                 f"{time.perf_counter() - start:.0f}s)"
    print(f"recall reference: {source}")
    for result in results:
        found = np.load(out_dir / f"{result['method']}.npy")
        result["recall"], result["row_recall"] = recall_of(found, truth, queries, n)


def print_table(results: list[dict]) -> None:
    header = (f"{'method':<10} {'build s':>8} {'pairs s':>8} {'cc s':>6} {'total s':>8} {'pairs':>11} "
              f"{'recall':>7} {'row rec':>7} {'clusters':>9} {'largest':>8} {'peak RSS GB':>12} {'numpy peak GB':>14}  detail")
    print(header)
    for r in results:
        s = r["stages"]
        print(f"{r['method']:<10} {s['build']:>8.1f} {s['pairs']:>8.1f} {s['components']:>6.2f} {s['total']:>8.1f} "
              f"{r['pairs']:>11,} {r['recall']:>7.4f} {r['row_recall']:>7.4f} {r['clusters']:>9,} {r['largest']:>8,} "
              f"{r['peak_rss_gb']:>5.2f} ({r['rss_at_fork_gb']:.2f}) {r['numpy_peak_gb']:>14.2f}  {r['detail']}")
    print("peak RSS in parentheses: RSS inherited at fork (mostly the vectors themselves)")


if __name__ == "__main__":
    main()
