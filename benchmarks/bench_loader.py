"""Benchmark: `DropDuplicates` in a webdataset pipeline -- peak RSS and samples/s against plain iteration.

Data: `--shards` shards x `--per-shard` samples (default 1,000 x 1,000), each sample a
tiny JPEG and a caption. The manifests are what is measured, so the shards are one
template tar hard-linked under `--shards` names (every shard holds the same keys: the
identity case img2dataset outputs create), and the manifests come from the real writer
(`dedup.stages.manifests.write_manifests`) over a synthetic cluster table in which
`--removed` of the samples are copies (random positions in every shard).

Each measurement runs in a fresh interpreter, so its peak RSS is its own; plain and
filtered passes alternate (`--rounds` each) in the same run, and the best pass of each
counts (the machine is shared). samples/s counts the samples *read*.

    python benchmarks/bench_loader.py                      # ~3 min on 2 cores
    python benchmarks/bench_loader.py --shards 100 --rounds 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "_data" / "loader"


def tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def template_tar(path: Path, per_shard: int) -> None:
    image = tiny_jpeg()
    with tarfile.open(path, "w") as tar:
        for position in range(per_shard):
            # One member a sample: plain iteration is fastest, so the ratio below is the strict one.
            info = tarfile.TarInfo(f"{position:09d}.jpg")
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))


def build_shards(folder: Path, shards: int, per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / "template.tar"
    if not template.exists():
        template_tar(template, per_shard)
    urls = []
    for index in range(shards):
        path = folder / f"{index:05d}.tar"
        if not path.exists():
            os.link(template, path)
        urls.append(str(path))
    return urls


def synthetic_clusters(urls: list[str], per_shard: int, removed: float, seed: int):
    """Every shard: a random `removed` share of its samples are copies of its first sample."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    shard_index = np.repeat(np.arange(len(urls), dtype=np.int64), per_shard)
    position = np.tile(np.arange(per_shard, dtype=np.int64), len(urls))
    sample_id = (shard_index << 32) | position
    copy = (rng.random(len(sample_id)) < removed) & (position > 0)
    cluster_id = np.where(copy, shard_index << 32, sample_id)
    sizes = pd.Series(cluster_id).map(pd.Series(cluster_id).value_counts()).to_numpy()
    return pd.DataFrame({
        "sample_id": sample_id, "shard_index": shard_index, "shard": np.asarray(urls, dtype=object)[shard_index],
        "key": [f"{p:09d}" for p in position], "status": "ok", "cluster_id": cluster_id,
        "cluster_size": sizes, "width": 8, "height": 8,
    })


def build_run(out: Path, urls: list[str], per_shard: int, removed: float) -> dict[str, int]:
    from dedup.records import RunDir
    from dedup.stages.manifests import KeepPolicy, write_manifests

    started = time.perf_counter()
    stats = write_manifests(RunDir(out), synthetic_clusters(urls, per_shard, removed, seed=0), KeepPolicy.parse("first"))
    return {**stats, "write_seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- child passes


def child(mode: str, urls_file: Path, run: Path, per_shard: int) -> dict[str, float]:
    urls = urls_file.read_text().split("\n")
    started = time.perf_counter()
    if mode == "keyset":  # the old design: one set of every removed (shard, key) in every worker
        import pandas as pd

        removed = pd.read_parquet(run / "remove_keys.parquet", columns=["shard", "key"])
        kept = len(set(zip(removed["shard"], removed["key"], strict=False)))
        return {"mode": mode, "kept": kept, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
    if mode == "filter":  # DropDuplicates alone on bare sample dicts: no tar reading, no torch import
        import pyarrow.parquet  # imported once a worker: before the clock, as in the dedup pass

        from dedup import DropDuplicates

        keys = [f"{p:09d}" for p in range(per_shard)]
        stream = ({"__url__": url, "__key__": key} for url in urls for key in keys)
        cpu = cpu_seconds()
        kept = sum(1 for _ in DropDuplicates(run)(stream))
        return {"mode": mode, "kept": kept, "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu,
                "peak_rss_mb": peak_rss_mb()}
    import webdataset as wds  # imports torch: most of a pass's RSS

    from dedup import DropDuplicates

    if mode == "dedup":
        import pyarrow.parquet  # noqa: F401 - the loader's import, done once a worker: not part of the rate
    started, cpu = time.perf_counter(), cpu_seconds()  # imports are not the pipeline's rate; reading the index is
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    if mode == "dedup":
        dataset = dataset.compose(DropDuplicates(run))
    kept = sum(1 for _ in dataset)
    return {"mode": mode, "kept": kept, "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """VmHWM: this interpreter's own peak (ru_maxrss would inherit the parent's across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(mode: str, urls_file: Path, run: Path, per_shard: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", mode, "--urls-file", str(urls_file), "--run", str(run),
               "--per-shard", str(per_shard)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--removed", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", choices=["plain", "dedup", "filter", "keyset"])
    parser.add_argument("--urls-file", type=Path)
    parser.add_argument("--run", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.urls_file, args.run, args.per_shard)))
        return
    folder = DATA / f"{args.shards}x{args.per_shard}"
    urls = build_shards(folder / "shards", args.shards, args.per_shard)
    urls_file = folder / "urls.txt"
    urls_file.write_text("\n".join(urls))
    print(f"manifests: {build_run(folder / 'run', urls, args.per_shard, args.removed)}", flush=True)
    passes: dict[str, list[dict]] = {"plain": [], "dedup": []}
    for _ in range(args.rounds):
        for mode, results in passes.items():
            result = run_child(mode, urls_file, folder / "run", args.per_shard)
            results.append(result)
            print(json.dumps(result), flush=True)
    alone = {mode: run_child(mode, urls_file, folder / "run", args.per_shard) for mode in ("filter", "keyset")}
    report(passes, alone, args.shards * args.per_shard)


def report(passes: dict[str, list[dict]], alone: dict[str, dict], total: int) -> None:
    best = {mode: min(results, key=lambda r: r["seconds"]) for mode, results in passes.items()}
    cpu = {mode: min(r["cpu_seconds"] for r in results) for mode, results in passes.items()}
    filt, keyset = alone["filter"], alone["keyset"]
    assert filt["kept"] == best["dedup"]["kept"], "the filter alone and in webdataset must keep the same samples"
    print(f"\nsamples read: {total:,}; kept by DropDuplicates: {best['dedup']['kept']:,}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| pass | samples/s (wall) | samples per CPU-second | peak RSS MB |")
    print("|---|---|---|---|")
    for mode, label in (("plain", "plain webdataset"), ("dedup", "webdataset + DropDuplicates")):
        print(f"| {label} | {total / best[mode]['seconds']:,.0f} | {total / cpu[mode]:,.0f} | {best[mode]['peak_rss_mb']:.0f} |")
    print(f"| DropDuplicates alone on bare sample dicts (no webdataset, no torch) | {total / filt['seconds']:,.0f} "
          f"| {total / filt['cpu_seconds']:,.0f} | {filt['peak_rss_mb']:.0f} |")
    print(f"| old design: one set of all {keyset['kept']:,} removed (shard, key), loading it only | - | - "
          f"| {keyset['peak_rss_mb']:.0f} ({keyset['seconds']:.1f} s) |")
    wall = best["plain"]["seconds"] / best["dedup"]["seconds"]
    by_cpu = cpu["plain"] / cpu["dedup"]
    # The filter's own cost added to a plain pass: the ratio without the noise of a shared machine.
    added = cpu["plain"] / (cpu["plain"] + filt["cpu_seconds"])
    print(f"DropDuplicates / plain rate (target >= 0.95): wall {wall:.3f}, CPU {by_cpu:.3f}, "
          f"plain + the filter's own CPU {added:.3f}")
    print(f"peak RSS (target < 200 MB): loader alone {filt['peak_rss_mb']:.0f} MB; added to the webdataset "
          f"process {best['dedup']['peak_rss_mb'] - best['plain']['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
