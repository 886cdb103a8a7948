"""How dedup's index, neighbour and cluster stages grow with n, on synthetic perceptual-like vectors.

    python benchmarks/bench_scale.py --n 10000 100000 300000
    python benchmarks/bench_scale.py --n 1000000 --memory 8GB

For each n, a run directory is written in dedup's store layout (`samples/`,
`embeddings/perceptual/img_emb` + `metadata`, `shards.parquet`, `run.json`),
then `dedup.pipeline.build_indexes`, `find_neighbors` and `cluster` run on it
exactly as `dedup run` calls them, each stage in its own spawned process so its
wall time and peak RSS (`ru_maxrss`) are its own.

The vectors imitate the `perceptual` descriptor: 256-d, L2-normalised, drawn
from a zero-mean Gaussian (random basis) whose eigenvalues fall as i**-0.7, the
exponent at which unrelated pairs match real perceptual vectors: best-orientation
cosine of unrelated make_benchmark photos (different source photo) at the 50 /
99 / 99.9 / 99.99th percentile is 0.105 / 0.257 / 0.329 / 0.403, synthetic
0.093 / 0.256 / 0.343 / 0.415 (each run records its own). Planted near-duplicate groups have Zipf sizes;
each copy is its group's base plus Gaussian noise, some copies are
flipped/rotated (a dihedral variant in DCT space, which the search must undo)
and some are byte-identical (same sha256, same vector).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dedup.descriptors.perceptual import DIM, dihedral_variants
from dedup.records import METADATA_SCHEMA, SAMPLES_SCHEMA, RunDir, record_shards, write_array, write_table
from dedup.run import Run
from dedup.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = REPO_ROOT / "benchmarks" / "_work" / "speed_scale"
RESULTS_FILE = REPO_ROOT / "benchmarks" / "results" / "speed_scale.json"
DESCRIPTOR = "perceptual"
ROWS_PER_SHARD = 100_000  # one embedding part per "shard", as a 100k-sample tar would give
SPECTRUM_EXPONENT = 0.7  # eigenvalue i ~ i**-0.7 (see module doc)
PLANTED_FRACTION = 0.1  # share of samples that are copies of some other sample
ZIPF_EXPONENT = 2.0
MAX_GROUP = 1000
FLIPPED_SHARE = 0.2  # copies stored flipped/rotated
EXACT_SHARE = 0.1  # copies with identical bytes
# Copies' cosine to their base is spread over this range (threshold 0.6 cuts inside it only at the low end).
COPY_SIMILARITY_RANGE = (0.7, 0.99)
STAGES = ("index", "neighbors", "cluster")


# ---------------------------------------------------------------- synthetic vectors


def background(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 256) unit rows from a Gaussian with a power-law spectrum in a random basis."""
    scales = np.arange(1, DIM + 1, dtype=np.float32) ** (-SPECTRUM_EXPONENT / 2)
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    rotation = basis.T.astype(np.float32)
    rows = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 65536):  # in chunks: the float64 draw would double peak memory at 1e6
        stop = min(n, start + 65536)
        rows[start:stop] = (rng.standard_normal((stop - start, DIM)).astype(np.float32) * scales) @ rotation
    return _normalise(rows)


def _normalise(rows: np.ndarray) -> np.ndarray:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def zipf_group_sizes(n_copies: int, rng: np.random.Generator) -> list[int]:
    """Group sizes (copies + 1 base each) drawn from a Zipf law until `n_copies` copies are planted."""
    sizes, planted = [], 0
    while planted < n_copies:
        size = int(min(MAX_GROUP, rng.zipf(ZIPF_EXPONENT) + 1))
        size = min(size, n_copies - planted + 1)
        sizes.append(size)
        planted += size - 1
    return sizes


def plant_copies(vectors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Overwrite rows with copies of base rows in place; returns (base row of each row, groups)."""
    n = len(vectors)
    base_of = np.arange(n)
    order = rng.permutation(n)
    cursor = 0
    sizes = zipf_group_sizes(int(n * PLANTED_FRACTION), rng)
    for size in sizes:
        base, copies = order[cursor], order[cursor + 1 : cursor + size]
        cursor += size
        vectors[copies] = _noisy_copies(vectors[base], len(copies), rng)
        base_of[copies] = base
    return base_of, len(sizes)


def _noisy_copies(base: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Copies at cosine ~U(COPY_SIMILARITY_RANGE) to `base`; some flipped, some exact."""
    target = rng.uniform(*COPY_SIMILARITY_RANGE, size=(count, 1)).astype(np.float32)
    noise = _normalise(rng.standard_normal((count, DIM)).astype(np.float32))
    noise -= (noise @ base)[:, None] * base  # orthogonal to base, so cosine = target exactly
    noise = _normalise(noise)
    copies = target * base + np.sqrt(1 - target**2) * noise
    exact = rng.random(count) < EXACT_SHARE
    copies[exact] = base
    flipped = np.flatnonzero(~exact & (rng.random(count) < FLIPPED_SHARE))
    if len(flipped):
        variants = dihedral_variants(copies[flipped])  # (8, k, 256)
        copies[flipped] = variants[rng.integers(1, 8, size=len(flipped)), np.arange(len(flipped))]
    return copies


# ---------------------------------------------------------------- run directory


def write_run(root: Path, n: int, seed: int) -> dict[str, Any]:
    """A run directory in the store layout as `dedup embed` would leave it, for `n` samples."""
    shutil.rmtree(root, ignore_errors=True)
    run = RunDir(root)
    rng = np.random.default_rng(seed)
    vectors = background(n, rng)
    base_of, groups = plant_copies(vectors, rng)
    # Identical bytes <=> identical vector: exact copies share their base's hash.
    same_as_base = np.all(vectors == vectors[base_of], axis=1)
    hash_source = np.where(same_as_base, base_of, np.arange(n))
    n_shards = -(-n // ROWS_PER_SHARD)
    shards = [f"synthetic/{i:05d}.tar" for i in range(n_shards)]
    record_shards(run, shards)
    for shard_index in range(n_shards):
        rows = slice(shard_index * ROWS_PER_SHARD, min(n, (shard_index + 1) * ROWS_PER_SHARD))
        _write_shard(run, shard_index, shards[shard_index], rows, vectors, hash_source)
    Run.start(root, Settings.build(shard_specs=shards, descriptors=[DESCRIPTOR]))
    background_sims = _background_similarity_percentiles(vectors, base_of, rng)
    return {"groups": groups, "planted_copies": int((base_of != np.arange(n)).sum()),
            "background_similarity_percentiles": background_sims}


def _write_shard(run: RunDir, shard_index: int, shard: str, rows: slice, vectors: np.ndarray,
                 hash_source: np.ndarray) -> None:
    positions = np.arange(rows.stop - rows.start, dtype=np.int64)
    sample_ids = (np.int64(shard_index) << 32) | positions
    keys = [f"{shard_index:05d}{p:07d}" for p in positions]
    samples = {
        "sample_id": sample_ids, "shard_index": np.full(len(positions), shard_index, np.int32),
        "shard": [shard] * len(positions), "key": keys, "url": [f"https://example.com/{k}.jpg" for k in keys],
        "caption": [None] * len(positions), "width": np.full(len(positions), 256, np.int32),
        "height": np.full(len(positions), 256, np.int32), "original_width": [None] * len(positions),
        "original_height": [None] * len(positions),
        "sha256": [f"{h:064x}" for h in hash_source[rows]], "image_member": [f"{k}.jpg" for k in keys],
        "status": ["ok"] * len(positions), "error": [None] * len(positions),
        "colourfulness": [None] * len(positions), "content_fraction": [None] * len(positions), "image_bytes": [None] * len(positions),
    }
    write_table(pa.table(samples, schema=SAMPLES_SCHEMA), run.samples_part(shard_index))
    metadata = {name: samples[name] for name in METADATA_SCHEMA.names}
    write_table(pa.table(metadata, schema=METADATA_SCHEMA), run.metadata_part(DESCRIPTOR, shard_index))
    write_array(vectors[rows].astype(np.float16), run.embedding_part(DESCRIPTOR, shard_index))


def _background_similarity_percentiles(vectors: np.ndarray, base_of: np.ndarray,
                                       rng: np.random.Generator) -> dict[str, float]:
    """Best-orientation cosine of 2,000 x 2,000 unrelated rows: comparable with real perceptual vectors."""
    from dedup.descriptors.perceptual import dihedral_similarity

    unplanted = np.flatnonzero(base_of == np.arange(len(vectors)))
    picked = rng.choice(unplanted, size=min(4000, len(unplanted)), replace=False)
    half = len(picked) // 2
    sims = dihedral_similarity(vectors[picked[:half]], vectors[picked[half:]])
    return {f"p{q:g}": round(float(np.percentile(sims, q)), 3) for q in (50, 99, 99.9, 99.99)}


# ---------------------------------------------------------------- stages


def run_stage(stage: str, root: Path, memory: str) -> dict[str, Any]:
    """One pipeline stage on `root`, in this process; returns its seconds, peak RSS and facts."""
    from dedup import pipeline
    from dedup.settings import EngineSettings, parse_size

    run = Run.open(root, memory_budget_bytes=parse_size(memory), engine=EngineSettings(show_progress=False))
    started = time.perf_counter()
    if stage == "index":
        specs = pipeline.build_indexes(run, gpu=False)
        facts = {"index": specs[DESCRIPTOR].factory}
    elif stage == "neighbors":
        reports = pipeline.find_neighbors(run, gpu=False)
        facts = {"edges": int(reports[DESCRIPTOR].stats.get("edges", 0))}
    else:
        facts = pipeline.cluster(run)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1), **facts}


def _stage_child(stage: str, root: str, memory: str, queue) -> None:
    queue.put(run_stage(stage, Path(root), memory))


def run_stage_in_child(stage: str, root: Path, memory: str) -> dict[str, Any]:
    """Spawned (not forked) so the child's ru_maxrss starts from a bare interpreter."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_stage_child, args=(stage, str(root), memory, queue))
    child.start()
    result = queue.get()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"stage {stage} on {root} exited with {child.exitcode}")
    return result


def bench_one(n: int, seed: int, memory: str) -> dict[str, Any]:
    root = WORK_DIR / f"n{n}"
    started = time.perf_counter()
    planted = write_run(root, n, seed)
    result: dict[str, Any] = {"n": n, "write_seconds": round(time.perf_counter() - started, 1), **planted,
                              "load_average_before": [round(x, 2) for x in os.getloadavg()], "stages": {}}
    for stage in STAGES:
        result["stages"][stage] = run_stage_in_child(stage, root, memory)
        print(f"n={n:,} {stage}: {result['stages'][stage]}", flush=True)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    shutil.rmtree(root, ignore_errors=True)
    return result


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| n | index (kind) | index s | neighbours s | edges | cluster s | total s | peak RSS MB (largest stage) "
             "| load avg (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        stages = r["stages"]
        total = sum(s["seconds"] for s in stages.values())
        peak = max(s["peak_rss_mb"] for s in stages.values())
        lines.append(
            f"| {r['n']:,} | {stages['index']['index']} | {stages['index']['seconds']:.1f} "
            f"| {stages['neighbors']['seconds']:.1f} | {stages['neighbors']['edges']:,} "
            f"| {stages['cluster']['seconds']:.1f} | {total:.1f} | {peak:,.0f} | {r['load_average_before'][0]:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 300_000], help="sizes to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", default="8GB", help="index memory budget, as `dedup run --memory` (default 8GB)")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help=f"results JSON (default {RESULTS_FILE})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    for n in args.n:
        results.append(bench_one(n, args.seed, args.memory))
        # Saved after every size: a later, larger size may be stopped for time.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                                        "results": results}, indent=2) + "\n")
    print(markdown_table(results))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
