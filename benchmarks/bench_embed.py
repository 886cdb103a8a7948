"""Embed-stage throughput beside its two bounds, on the same shards in one run.

    python benchmarks/bench_embed.py --n 600 --descriptor perceptual
    python benchmarks/bench_embed.py --n 256 --descriptor clip      # ViT-B-32, random weights (none downloadable offline)

Prints (samples/s): the bare decode rate (decode + `prepare` in the same worker
pool the pipeline uses), the bare model forward rate (`embed` on prepared
batches), and the pipeline (`dedup embed`), then pipeline / min(decode, model).
The issue's target is >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from dedup import pipeline
from dedup.descriptors import DescriptorBuilder
from dedup.stages.embed import CHUNK_SIZE
from dedup.stages.embed_worker import process_chunk
from dedup.stages.read import read_shard
from dedup.synth import demo_photos, make_laion_like, write_shards


def build_shards(folder: Path, n: int, per_shard: int) -> list[str]:
    photos = demo_photos()
    sources = [(p.name, p.image) for p in photos if not p.negative_of]
    samples, _ = make_laion_like(sources, n, seed=7, bad_fraction=0.0, samples_per_shard=per_shard,
                                 captions={p.name: p.caption for p in photos})
    return [str(p) for p in write_shards(samples, folder, per_shard)]


def _chunks(shards: list[str]):
    chunk = []
    for index, url in enumerate(shards):
        for sample in read_shard(url, index):
            chunk.append(sample)
            if len(chunk) == CHUNK_SIZE:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def bare_decode_rate(shards: list[str], builder: DescriptorBuilder, workers: int) -> tuple[float, list[np.ndarray]]:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.apply(process_chunk, ([], (builder,), 10**8))  # start workers and build descriptors before timing
        start = time.perf_counter()
        results = [r for batch in pool.imap(_work, [(c, builder) for c in _chunks(shards)]) for r in batch]
        seconds = time.perf_counter() - start
    prepared = [r.prepared[builder.name] for r in results if builder.name in r.prepared]
    return len(results) / seconds, prepared


def _work(args):
    chunk, builder = args
    return process_chunk(chunk, (builder,), 120_000_000)


def bare_model_rate(builder: DescriptorBuilder, prepared: list[np.ndarray], batch_size: int) -> float:
    descriptor = builder.build()
    stacked = np.stack(prepared)
    descriptor.embed(stacked[:batch_size])  # warm-up: weights loaded, kernels chosen
    start = time.perf_counter()
    for i in range(0, len(stacked), batch_size):
        descriptor.embed(stacked[i : i + batch_size])
    return len(stacked) / (time.perf_counter() - start)


def pipeline_rate(shards: list[str], out: Path, builder: DescriptorBuilder, workers: int, batch_size: int) -> float:
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings

    settings = Settings.build(shard_specs=shards, descriptors=[builder.name], workers=workers, batch_size=batch_size,
                              device=builder.options.get("device", "auto"), model_options=builder.options,
                              engine=EngineSettings(show_progress=False))
    report = pipeline.embed(Run.start(out, settings))
    return report.stats["samples"] / report.seconds


def random_clip_checkpoint(folder: Path, model: str) -> str:
    import open_clip
    import torch

    path = folder / f"{model}-random.pt"
    torch.save(open_clip.create_model(model, pretrained=None).state_dict(), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--descriptor", choices=["perceptual", "clip"], default="perceptual")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (clip only)")
    parser.add_argument("--workers", type=int, default=None, help="default: what dedup embed chooses")
    parser.add_argument("--batch-size", type=int, default=64)
    # img2dataset writes 10,000 samples per shard; tiny shards exaggerate the per-shard drain of the pool.
    parser.add_argument("--per-shard", type=int, default=10_000, help="samples per shard")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        shards = build_shards(work / "shards", args.n, args.per_shard)
        options = {}
        if args.descriptor == "clip":
            options = {"model": args.model, "pretrained": random_clip_checkpoint(work, args.model), "device": args.device}
        builder = DescriptorBuilder(args.descriptor, options)
        # The decode bound gets every core; the pipeline gets what `dedup embed` would choose.
        decode_rate, prepared = bare_decode_rate(shards, builder, args.workers or os.cpu_count() or 1)
        model_rate = bare_model_rate(builder, prepared, args.batch_size)
        pipe_rate = pipeline_rate(shards, work / "run", builder, args.workers, args.batch_size)
        bound = min(decode_rate, model_rate)
        print(json.dumps({"descriptor": args.descriptor, "samples": args.n, "workers": "auto" if args.workers is None else args.workers,
                          "decode_per_s": round(decode_rate, 1), "model_per_s": round(model_rate, 1),
                          "pipeline_per_s": round(pipe_rate, 1), "pipeline_over_bound": round(pipe_rate / bound, 3)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
