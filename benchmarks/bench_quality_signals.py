"""Cost of the --keep best quality signals in the decode workers (dedup/image_quality.py).

Decodes the demo shards once, then compares the CPU time of `quality_signals` per image with the
decode worker's CPU time per sample without it (decode, sha256, perceptual prepare):

    PYTHONPATH=. python benchmarks/bench_quality_signals.py [--repeats 10]

CPU time (process_time), best of the repeats, so other load on the machine matters less.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dedup.decode import DecodeFailure, decode_image
from dedup.descriptors.base import DescriptorBuilder
from dedup.image_quality import quality_signals
from dedup.stages import embed_worker
from dedup.stages.read import read_shard
from dedup.synth import build_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        shards, _ = build_demo(Path(folder))
        raws = [sample for i, shard in enumerate(shards) for sample in read_shard(str(shard), i)]
    images = []
    for raw in raws:
        try:
            images.append(decode_image(raw.image_bytes or b"", 128).image)
        except DecodeFailure:
            pass
    embed_worker.quality_signals = lambda image: (None, None)  # the worker without the signals
    builders = (DescriptorBuilder("perceptual", {}),)
    signals, worker = [], []
    for _ in range(args.repeats):
        started = time.process_time()
        for image in images:
            quality_signals(image)
        signals.append(time.process_time() - started)
        started = time.process_time()
        embed_worker.process_chunk(raws, builders, 10**9)
        worker.append(time.process_time() - started)
    per_image, per_sample = min(signals) / len(images) * 1e3, min(worker) / len(raws) * 1e3
    print(f"{len(raws)} demo samples: quality_signals {per_image:.3f} ms CPU per image; decode worker without it "
          f"{per_sample:.3f} ms per sample; overhead {100 * per_image / per_sample:.0f}%")


if __name__ == "__main__":
    main()
