"""Manifests stage: the engine tasks against the one-task stage they replaced, on a synthetic run.

    PYTHONPATH=. python benchmarks/bench_manifests_tasks.py --shards 200 --per-shard 10000

Writes a run by hand (shards.parquet, samples parts, clusters.parquet in sample_id order with
streamed row groups; a `--dup-fraction` of the samples in clusters of Zipf sizes spread over
random shards), then, each in its own process so peak RSS is its own:
  one-task  the stage before it became tasks: all of clusters.parquet and all samples in pandas
            (`write_manifests`, kept as the in-memory reference);
  tasks     `manifests_stage` on the local engine (prepare / median / keep / shards / index);
and checks that both wrote the same manifests and remove_keys.parquet. Prints wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 262_144


def build_run(root: Path, shards: int, per_shard: int, dup_fraction: float, seed: int) -> None:
    from dedup.records import CLUSTERS, SAMPLES, write_table
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings

    rng = np.random.default_rng(seed)
    n = shards * per_shard
    shard_of = np.repeat(np.arange(shards), per_shard)
    ids = (shard_of.astype(np.int64) << 32) | np.tile(np.arange(per_shard), shards)
    cluster = ids.copy()
    copies = rng.choice(n, size=int(n * dup_fraction), replace=False)
    sizes = np.minimum(rng.zipf(2.0, size=len(copies)), 10_000)
    groups = np.repeat(np.arange(len(sizes)), sizes)[: len(copies)]
    rep = pd.Series(ids[copies]).groupby(groups).transform("min").to_numpy()
    cluster[copies] = rep
    size = pd.Series(cluster).map(pd.Series(cluster).value_counts()).to_numpy()
    urls = [f"/data/{i:05d}.tar" for i in range(shards)]
    settings = Settings.build(shard_specs=urls, descriptors=["perceptual"], keep="best",
                              engine=EngineSettings(show_progress=False))
    Run(root, settings).save()
    write_table(pd.DataFrame({"shard_index": np.arange(shards, dtype=np.int32), "url": urls, "location": urls}),
                root / "shards.parquet")
    ext = rng.choice(["jpg", "png", "webp"], size=n, p=[0.8, 0.15, 0.05])
    frame = pd.DataFrame({
        "sample_id": ids, "shard_index": shard_of.astype(np.int32), "shard": np.array(urls)[shard_of],
        "key": [f"{p:09d}" for p in np.tile(np.arange(per_shard), shards)], "url": None, "caption": None,
        "width": rng.integers(64, 1024, n).astype(np.int32), "height": rng.integers(64, 1024, n).astype(np.int32),
        "original_width": None, "original_height": None, "sha256": None,
        "image_member": [f"{p:09d}.{e}" for p, e in zip(np.tile(np.arange(per_shard), shards), ext, strict=True)],
        "status": np.where(rng.random(n) < 0.01, "decode_error", "ok"), "error": None,
        "colourfulness": rng.uniform(0, 60, n).astype(np.float32), "content_fraction": rng.uniform(0.5, 1, n).astype(np.float32),
        "image_bytes": rng.integers(1_000, 400_000, n),
    })
    for shard in range(shards):
        part = frame.iloc[shard * per_shard:(shard + 1) * per_shard]
        write_table(pa.Table.from_pandas(part, schema=SAMPLES, preserve_index=False), root / "samples" / f"samples_{shard}.parquet")
    clusters = frame[["sample_id", "shard_index", "shard", "key", "url", "caption", "status"]].assign(
        cluster_id=cluster, cluster_size=size, is_representative=cluster == ids,
        similarity_to_representative=np.float32(1.0), matched_by="self")
    table = pa.Table.from_pandas(clusters, schema=CLUSTERS, preserve_index=False)
    pq.write_table(table, root / "clusters.parquet", row_group_size=ROW_GROUP)


def run_one(root: Path, mode: str) -> dict:
    from dedup.records import load_samples
    from dedup.run import Run
    from dedup.stages import manifests

    run = Run.open(root)
    began = time.perf_counter()
    if mode == "one-task":
        clusters = pd.read_parquet(run.clusters)
        sizes = load_samples(run, ["sample_id", "width", "height", *manifests._present(run, manifests.BEST_COLUMNS)])
        manifests.write_manifests(run, clusters.merge(sizes, on="sample_id", how="left"), manifests.KeepPolicy.parse("best"))
    else:
        manifests.manifests_stage(run)
    seconds = time.perf_counter() - began
    return {"mode": mode, "seconds": round(seconds, 2), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def _same(a: Path, b: Path) -> bool:
    index = pd.read_parquet(a / "manifests" / "_index.parquet")
    pd.testing.assert_frame_equal(index, pd.read_parquet(b / "manifests" / "_index.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(a / "remove_keys.parquet"), pd.read_parquet(b / "remove_keys.parquet"))
    for name in index["manifest"]:
        pd.testing.assert_frame_equal(pd.read_parquet(a / "manifests" / name), pd.read_parquet(b / "manifests" / name))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--dup-fraction", type=float, default=0.3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_manifests_tasks"))
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(Path(args.child[0]), args.child[1])))
        return
    shutil.rmtree(args.work, ignore_errors=True)
    build_run(args.work / "one-task", args.shards, args.per_shard, args.dup_fraction, seed=1)
    shutil.copytree(args.work / "one-task", args.work / "tasks")
    print(f"{args.shards} shards x {args.per_shard:,} samples, {args.dup_fraction:.0%} in clusters with copies")
    for mode in ("one-task", "tasks"):
        out = subprocess.run([sys.executable, __file__, "--child", str(args.work / mode), mode],
                             check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1])
    print("same manifests and remove_keys:", _same(args.work / "one-task", args.work / "tasks"))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
