"""A grown run against a run from scratch: index, neighbours and cluster time when new embedding parts arrive.

    python benchmarks/bench_incremental.py --parts 8 --add 2 --rows 20000 --dim 128

Writes a clip-retrieval folder of `parts` parts (unit float16 rows with
planted copy groups, some spanning old and new parts), runs
`dedup run --embeddings` on it, adds `add` parts, runs again on the same
OUT (the incremental run), then runs from scratch on a new OUT. Prints each
run's stage times, the neighbour queries it ran, and whether the grown run's
edges and clusters equal the scratch run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dedup import pipeline
from dedup.records import RunDir
from dedup.run import Run
from dedup.settings import EngineSettings, Settings
from dedup.stages.precomputed import PRECOMPUTED, ingest_embeddings


def _write_part(root: Path, p: int, rows: np.ndarray) -> None:
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    np.save(root / "img_emb" / f"img_emb_{p}.npy", rows.astype(np.float16))
    n = len(rows)
    pd.DataFrame({"url": [f"https://s{p}.example/{r}.jpg" for r in range(n)],
                  "image_path": [f"data/{p:05d}.tar/{p:05d}{r:05d}.jpg" for r in range(n)]}).to_parquet(
        root / "metadata" / f"metadata_{p}.parquet")


def _parts(count: int, rows: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    """Random unit rows; every part copies 50 rows of the part before it (old-new groups across the boundary)."""
    rng = np.random.default_rng(seed)
    parts = []
    for p in range(count):
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        if p:
            x[:50] = parts[-1][100:150] + 0.02 * rng.standard_normal((50, dim))
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return parts


def _run(source: Path, out: Path, memory: str) -> dict[str, float]:
    settings = Settings.build(shard_specs=[str(source)], descriptors=[PRECOMPUTED], memory=memory,
                              engine=EngineSettings(show_progress=False))
    run = Run.start(out, settings)
    times = {}
    started = time.perf_counter()
    ingest_embeddings(run, str(source))
    times["ingest"] = time.perf_counter() - started
    for stage, call in (("index", lambda: pipeline.build_indexes(run, gpu=False)),
                        ("neighbors", lambda: pipeline.find_neighbors(run, gpu=False)),
                        ("cluster", lambda: pipeline.cluster(run)), ("rank", lambda: pipeline.rank(run)),
                        ("manifests", lambda: pipeline.manifests_stage(run))):
        started = time.perf_counter()
        result = call()
        times[stage] = time.perf_counter() - started
        if stage == "neighbors":
            report = result[PRECOMPUTED]
            times["search_tasks_run"], times["of"] = float(report.tasks_run), float(report.tasks_total)
    return times


def _edges(out: Path) -> set:
    parts = sorted(RunDir(out).neighbors_dir(PRECOMPUTED).glob("part_*.parquet"))
    edges = pd.concat([pd.read_parquet(p, columns=["id_a", "id_b"]) for p in parts])
    return set(zip(edges["id_a"], edges["id_b"], strict=True))


def _planted(out: Path, parts: int, rows: int) -> set:
    """The copy pairs `_parts` planted: row i < 50 of part p and row 100 + i of part p - 1, as sample ids."""
    from dedup.records import open_embeddings

    ids = open_embeddings(RunDir(out), PRECOMPUTED).ids
    pairs = ((ids[(p - 1) * rows + 100 + i], ids[p * rows + i]) for p in range(1, parts) for i in range(50))
    return {(min(a, b), max(a, b)) for a, b in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--add", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--memory", default="4GB")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        parts = _parts(args.parts + args.add, args.rows, args.dim)
        for p in range(args.parts):
            _write_part(root / "emb", p, parts[p])
        first = _run(root / "emb", root / "grown", args.memory)
        for p in range(args.parts, args.parts + args.add):
            _write_part(root / "emb", p, parts[p])
        grown = _run(root / "emb", root / "grown", args.memory)
        scratch = _run(root / "emb", root / "scratch", args.memory)
        spec = json.loads((RunDir(root / "grown").index_dir / f"{PRECOMPUTED}.json").read_text())
        print(f"index: {spec['kind']} ({spec['factory']}), {spec['n_vectors']:,} vectors of {args.dim} dims")
        for name, times in (("first", first), ("grown", grown), ("scratch", scratch)):
            print(f"{name:8s} " + "  ".join(f"{k} {v:.1f}" if not k.endswith(("run", "of")) else f"{k} {v:.0f}" for k, v in times.items()))
        same_edges = _edges(root / "grown") == _edges(root / "scratch")
        same_clusters = pd.read_parquet(RunDir(root / "grown").clusters).equals(
            pd.read_parquet(RunDir(root / "scratch").clusters))
        print(f"grown == scratch: edges {same_edges}, clusters {same_clusters}")
        # An IVF's recall: at a high threshold the cell layout probes few cells (index_choice.choose_nprobe), and
        # the grown run keeps the first run's quantizer, so its misses differ from the scratch run's.
        truth = _planted(root / "grown", args.parts + args.add, args.rows)
        for name in ("grown", "scratch"):
            found = _edges(root / name)
            print(f"{name:8s} planted pairs found {len(found & truth)} of {len(truth)}, other edges {len(found - truth)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
