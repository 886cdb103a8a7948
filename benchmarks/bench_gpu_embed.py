"""GPU embedding: bare model forward, batched decode+resize and the whole pipeline, on the same shards in one run.

    # on a GPU machine (the figures issue 14 asks for):
    python benchmarks/bench_gpu_embed.py --device cuda --n 50000 --per-shard 1000 --out results/gpu_embed
    # the same code paths on a CPU, small (how it is checked without a GPU):
    python benchmarks/bench_gpu_embed.py --device cpu --model small224 --n 300 --per-shard 100 --batch-size 32 \
        --readers 2 --out /tmp/gpu_embed_cpu

Shards are built from the demo photos (`dedup.synth`): a base set of LAION-like
samples (JPEG copies, PNG/WebP copies, a few bad files) replicated under new keys
to --n samples. Weights are random (`pretrained=None` saved to a file): speed does
not depend on their values and none can be downloaded offline.

Prints one JSON object (also written to OUT/bench_gpu_embed.json), images/s:
* model_per_s: `ClipDescriptor.encode_normalised` on device-resident input with
  the pipeline's settings; model_variants_per_s for each precision /
  channels_last / CUDA-graph variant asked for, model_batch_sweep_per_s for each
  --model-batch-sizes (how the defaults are to be chosen);
* decode_per_s (nvJPEG alone) and decode_resize_per_s (decode + batched resize,
  crop and normalise) over the JPEGs the pipeline sends to the GPU;
* readers_per_s: the parallel shard readers alone (read, hash, route, CPU-decode
  the rest);
* pipeline_per_s: `dedup embed --descriptor clip` from tar shards to the written
  store (the engine's time; pipeline_wall_per_s also counts the model load);
* pipeline_over_bound: pipeline / min(model, decode_resize) - issue 14's target
  is >= 0.85; pipeline_over_all_bounds also takes the readers into the minimum;
* gpu_utilisation: mean and samples of the GPU's utilisation during the pipeline
  (torch.cuda.utilization via NVML, else nvidia-smi), null on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

# Spawned shard readers re-run this file's top level as __mp_main__: they must not pay for torch
# and open_clip here (the stage's reader module keeps them out so readers start at once).
if __name__ != "__mp_main__":
    import open_clip
    import torch

    from dedup.descriptors import DescriptorBuilder
    from dedup.descriptors.clip import ClipDescriptor
    from dedup.descriptors.gpu_decode import BatchPreprocess, gpu_route
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings
    from dedup.stages import embed as embed_stage
    from dedup.stages.embed_gpu_read import ReaderPool
    from dedup.stages.read import read_shard
    from dedup.synth import demo_photos, make_laion_like, write_shards

# 224 px input like ViT-B/32 but 2 narrow layers: the CPU check runs the same code in seconds.
SMALL_224 = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
BASE_SAMPLES = 600


# ---------------------------------------------------------------- shards


_BASE: list = []  # the base samples, shared with forked shard writers


def _write_copies(job: tuple[str, int, int, int]) -> str:
    folder, shard, per_shard, n = job
    start = shard * per_shard
    copies = [dataclasses.replace(_BASE[i % len(_BASE)], key=f"{i:09d}") for i in range(start, min(n, start + per_shard))]
    return str(write_shards(copies, Path(folder), per_shard, prefix=f"{shard:05d}_")[0])


def build_shards(folder: Path, n: int, per_shard: int, seed: int = 7) -> list[str]:
    """A LAION-like base set from the demo photos, replicated under fresh keys to n samples (shards in parallel)."""
    global _BASE
    photos = demo_photos()
    sources = [(p.name, p.image) for p in photos if not p.negative_of]
    _BASE, _ = make_laion_like(sources, min(n, BASE_SAMPLES), seed=seed, bad_fraction=0.01,
                               samples_per_shard=per_shard, captions={p.name: p.caption for p in photos})
    jobs = [(str(folder), shard, per_shard, n) for shard in range(-(-n // per_shard))]
    # fork: nothing has started CUDA or torch threads yet, and the base set is not pickled per job.
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_write_copies, jobs))


def jpeg_bytes_for_gpu(shards: list[str], limit: int) -> list[bytes]:
    found = []
    for index, url in enumerate(shards):
        for raw in read_shard(url, index):
            if gpu_route(raw.image_bytes) is not None:
                found.append(raw.image_bytes)
                if len(found) >= limit:
                    return found
    return found


# ---------------------------------------------------------------- model


def model_files(work: Path, model: str) -> tuple[str, str, str]:
    """(model argument for ClipDescriptor, random-weights checkpoint, open_clip name)."""
    if model == "small224":
        config = work / "dedup-bench-small224.json"
        config.write_text(json.dumps(SMALL_224))
        open_clip.add_model_config(config)
        model, name = str(config), config.stem
    else:
        name = model
    torch.manual_seed(0)
    checkpoint = work / f"{name}-random.pt"
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), checkpoint)
    return model, str(checkpoint), name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_rate(descriptor: ClipDescriptor, batch_size: int, batches: int) -> float:
    side = descriptor.image_size[0]
    batch = torch.randn(batch_size, 3, side, side, device=descriptor.device)
    descriptor.encode_normalised(batch)  # warm-up: weights, kernel choice, graph capture
    _sync(descriptor.device)
    start = time.perf_counter()
    for _ in range(batches):
        descriptor.encode_normalised(batch)
    _sync(descriptor.device)
    return batch_size * batches / (time.perf_counter() - start)


def model_variants(args, model: str, checkpoint: str) -> dict[str, float]:
    rates = {}
    for precision in args.precisions.split(","):
        for channels_last in (True, False):
            for graphs in ((False, True) if args.device.startswith("cuda") and args.cuda_graphs else (False,)):
                descriptor = ClipDescriptor(model=model, pretrained=checkpoint, device=args.device,
                                            precision=precision, batch_size=args.batch_size,
                                            channels_last=channels_last, cuda_graphs=graphs)
                label = f"{descriptor.precision}{'_cl' if channels_last else ''}{'_graphs' if graphs else ''}"
                rates[label] = round(model_rate(descriptor, args.batch_size, args.model_batches), 1)
    return rates


# ---------------------------------------------------------------- decode, readers


def decode_rates(preprocess: BatchPreprocess, datas: list[bytes], batch_size: int) -> tuple[float, float]:
    """(nvJPEG decode alone, decode + resize + crop + normalise), images/s."""
    batches = [datas[i : i + batch_size] for i in range(0, len(datas), batch_size)]
    preprocess(batches[0])  # warm-up: decoder handles, pinned buffers
    rates = []
    for step in (preprocess.decode, preprocess):
        _sync(preprocess.device)
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        _sync(preprocess.device)
        rates.append(len(datas) / (time.perf_counter() - start))
    return rates[0], rates[1]


def nvjpeg_rejects_corrupt_scan(preprocess: BatchPreprocess, data: bytes) -> bool:
    """Whether this decoder rejects a JPEG whose scan is garbage (libjpeg does; the CPU path says decode_error)."""
    corrupt = data[:300] + bytes(range(256)) * 8 + b"\xff\xd9"
    return preprocess.decode([corrupt])[0] is None


def readers_rate(shards: list[str], builder: DescriptorBuilder, readers: int) -> tuple[float, dict[str, int]]:
    """Parallel readers alone, messages consumed and dropped; also counts samples per route."""
    plan = list(enumerate(shards))
    # eager: each reader imports torch before its first shard, so the clock measures reading, not start-up.
    pool = ReaderPool(plan, builder, max(1, min(readers, len(plan))), 120_000_000, eager=True)
    routes = {"gpu": 0, "cpu": 0, "failed": 0}
    ended, count, start = 0, 0, None
    try:
        while ended < len(plan):
            message = pool.get(timeout=0.5)
            if message is None:
                continue
            start = start or time.perf_counter()  # the clock starts at the first message: spawn time is excluded
            kind, _, payload = message
            if kind == "error":
                raise RuntimeError(payload)
            if kind == "end":
                ended += 1
                continue
            count += len(payload)
            for sample in payload:
                routes["gpu" if sample.jpeg is not None else "cpu" if sample.prepared is not None else "failed"] += 1
    finally:
        pool.close()
    return count / (time.perf_counter() - start), routes


# ---------------------------------------------------------------- pipeline and utilisation


class UtilisationSampler:
    """Samples GPU utilisation (%) every `interval` s in a thread: NVML through torch, else nvidia-smi."""

    def __init__(self, device: torch.device, interval: float = 0.2) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> float | None:
        try:
            value = float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - pynvml missing or NVML unsupported: try the CLI
            return self._read_nvidia_smi()
        self.source = "torch.cuda.utilization"
        return value

    def _read_nvidia_smi(self) -> float | None:
        if shutil.which("nvidia-smi") is None:
            return None
        out = subprocess.run(["nvidia-smi", f"--id={self.device.index or 0}", "--query-gpu=utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5, check=False)
        self.source = "nvidia-smi"
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 and out.stdout.strip() else None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self):
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        return {"mean_percent": round(float(np.mean(self.samples)), 1), "samples": len(self.samples),
                "interval_s": self.interval, "source": self.source}


def pipeline_rates(shards: list[str], out: Path, args, model: str, checkpoint: str) -> tuple[float, float, dict]:
    """`dedup embed --descriptor clip` as the CLI runs it (settings, run.json, engine), timed two ways."""
    requested = Settings.build(shard_specs=shards, descriptors=["clip"], workers=args.readers, device=args.device,
                               batch_size=args.batch_size, engine=EngineSettings(show_progress=False),
                               model_options={"model": model, "pretrained": checkpoint, "gpu_decode": True})
    with UtilisationSampler(torch.device(args.device)) as sampler:
        start = time.perf_counter()
        report = embed_stage.embed(Run.start(out, requested))
        wall = time.perf_counter() - start
    samples = report.stats["samples"]
    statuses = {k.split(".", 1)[1]: v for k, v in report.stats.items() if k.startswith("status.")}
    return samples / report.seconds, samples / wall, {"statuses": statuses, "gpu_utilisation": sampler.summary()}


# ---------------------------------------------------------------- main


def machine(device: str) -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name, or small224 (tiny, for CPU checks)")
    parser.add_argument("--n", type=int, default=50_000, help="samples in the shards")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (one reader reads one shard)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--readers", type=int, default=os.cpu_count() or 1, help="shard reader processes")
    parser.add_argument("--precisions", default="auto", help="comma-separated: auto, fp16, bf16, fp32")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time the model with CUDA-graph replay")
    parser.add_argument("--model-batches", type=int, default=20, help="timed model batches per variant")
    parser.add_argument("--model-batch-sizes", default="", help="comma-separated batch sizes to time the model at")
    parser.add_argument("--decode-samples", type=int, default=20_000, help="JPEGs timed for decode / resize")
    parser.add_argument("--shards", type=Path, default=None, help="reuse (or build once into) this shard folder")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/gpu_embed")))
    return parser.parse_args()


def prepared_shards(args, work: Path) -> list[str]:
    folder = args.shards or work / "shards"
    existing = sorted(str(p) for p in folder.glob("*.tar")) if folder.is_dir() else []
    return existing or build_shards(folder, args.n, args.per_shard)


def _save(result: dict, out: Path) -> None:
    """Written after every step: a run cut short by its time limit still leaves what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu_embed.json").write_text(json.dumps(result, indent=2))


def _ratios(result: dict) -> None:
    bound = min(result["model_per_s"], result["decode_resize_per_s"])
    result["pipeline_over_bound"] = round(result["pipeline_per_s"] / bound, 3)
    if "readers_per_s" in result:
        result["pipeline_over_all_bounds"] = round(result["pipeline_per_s"] / min(bound, result["readers_per_s"]), 3)


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_embed_"))
    result: dict = {"benchmark": "gpu_embed", "device": args.device, "machine": machine(args.device),
                    "readers": args.readers, "batch_size": args.batch_size}
    try:
        began = time.perf_counter()
        shards = prepared_shards(args, work)
        result.update(shards=len(shards), shard_build_s=round(time.perf_counter() - began, 1))
        model, checkpoint, name = model_files(work, args.model)
        descriptor = ClipDescriptor(model=model, pretrained=checkpoint, device=args.device,
                                    batch_size=args.batch_size)
        result.update(model=name, precision=descriptor.precision, channels_last=descriptor.channels_last)
        # The three figures first (model, decode+resize, pipeline), then the extras.
        result["model_per_s"] = round(model_rate(descriptor, args.batch_size, args.model_batches), 1)
        _save(result, args.out)
        preprocess = descriptor.batch_preprocess()
        jpegs = jpeg_bytes_for_gpu(shards, args.decode_samples)
        decode_only, decode_resize = decode_rates(preprocess, jpegs, args.batch_size)
        result.update(decode_per_s=round(decode_only, 1), decode_resize_per_s=round(decode_resize, 1),
                      decoder_rejects_corrupt_scan=nvjpeg_rejects_corrupt_scan(preprocess, jpegs[0]))
        _save(result, args.out)
        pipe, pipe_wall, details = pipeline_rates(shards, work / "run", args, model, checkpoint)
        result.update(pipeline_per_s=round(pipe, 1), pipeline_wall_per_s=round(pipe_wall, 1), **details)
        _ratios(result)
        _save(result, args.out)
        builder = DescriptorBuilder("clip", {"model": model, "pretrained": checkpoint, "device": args.device})
        reader_rate, routes = readers_rate(shards, builder, args.readers)
        result.update(readers_per_s=round(reader_rate, 1), samples=sum(routes.values()), routes=routes)
        _ratios(result)
        _save(result, args.out)
        result["model_batch_sweep_per_s"] = {int(b): round(model_rate(descriptor, int(b), args.model_batches), 1)
                                             for b in args.model_batch_sizes.split(",") if b}
        _save(result, args.out)
        result["model_variants_per_s"] = model_variants(args, model, checkpoint)
        _save(result, args.out)
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
