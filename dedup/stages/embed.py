"""Embed stage: one task per shard -> samples table part + one embedding part per descriptor.

Decode workers (processes) read nothing from disk: the main process streams the
tar and hands them chunks of raw samples; they decode, hash and `prepare`, and
the main process batches `prepare` outputs through each descriptor's `embed`
while the workers decode the next chunks. At most `window` chunks are in
flight, so memory stays bounded whatever the shard size.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console

from dedup import decode
from dedup import settings as cfg
from dedup.descriptors import choose_default_descriptors, vector_descriptor_names
from dedup.descriptors.base import Descriptor, DescriptorBuilder
from dedup.engine import StageReport, make_engine
from dedup.errors import DedupError, StoreError
from dedup.records import (
    METADATA_SCHEMA,
    SAMPLES_SCHEMA,
    RunDir,
    record_shards,
    remove_stale_temp_files,
    write_array,
    write_table,
)
from dedup.stages.embed_worker import ProcessedSample, cached_descriptor, process_chunk
from dedup.stages.read import RawSample, read_shard

CHUNK_SIZE = 32


# ---------------------------------------------------------------- main side


class _Batcher:
    """Accumulates one descriptor's prepared arrays and embeds them in batches."""

    def __init__(self, name: str, descriptor: Descriptor, batch_size: int) -> None:
        self.name, self.descriptor, self.batch_size = name, descriptor, batch_size
        self.pending: list[np.ndarray] = []
        self.vectors: list[np.ndarray] = []
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any], prepared: np.ndarray) -> None:
        """Queue one sample; a full batch goes through the model at once."""
        self.pending.append(prepared)
        self.rows.append(row)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Embed what is queued; vectors are stored as float16 (half the disk and page cache of float32)."""
        if self.pending:
            embedded = self.descriptor.embed(np.stack(self.pending))
            self.vectors.append(np.asarray(embedded, dtype=np.float16))
            self.pending = []

    def result(self) -> tuple[np.ndarray, pa.Table]:
        """The shard's vectors and their metadata rows, in the same order."""
        self.flush()
        dim = self.descriptor.dim
        vectors = np.concatenate(self.vectors) if self.vectors else np.zeros((0, dim), np.float16)
        columns = {name: [r[name] for r in self.rows] for name in METADATA_SCHEMA.names}
        return vectors, pa.Table.from_pydict(columns, schema=METADATA_SCHEMA)


def _chunks(samples: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    chunk: list[RawSample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class EmbedStage:
    """Picklable stage: builders and paths only; pool and models are built lazily where it runs."""

    name = "embed"

    def __init__(
        self,
        run: RunDir,
        shards: list[str],
        builders: list[DescriptorBuilder],
        workers: int = 2,
        batch_size: int = 64,
        max_pixels: int = decode.DEFAULT_MAX_PIXELS,
    ) -> None:
        self.run_dir = run
        self.shards = shards
        self.builders = tuple(builders)
        self.workers = workers
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._pool = None
        self._main_descriptors: dict[str, Descriptor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_main_descriptors"] = None
        return state

    def task_ids(self) -> list[str]:
        """One task per shard: the unit of retry and resume."""
        return [str(i) for i in range(len(self.shards))]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        """Read, decode and embed one shard, then write its samples and embedding parts."""
        shard_index = int(task_id)
        batchers = [
            _Batcher(name, descriptor, self.batch_size) for name, descriptor in self._descriptors().items()
        ]
        rows: list[dict[str, Any]] = []
        for processed in self._processed(read_shard(self.shards[shard_index], shard_index)):
            for sample in processed:
                rows.append(sample.row)
                for batcher in batchers:
                    if batcher.name in sample.prepared:
                        batcher.add(sample.row, sample.prepared[batcher.name])
            progress(len(processed))
        self._write(shard_index, rows, batchers)
        return _shard_stats(rows)

    def _descriptors(self) -> dict[str, Descriptor]:
        if self._main_descriptors is None:
            self._main_descriptors = {b.name: cached_descriptor(b) for b in self.builders}
        return self._main_descriptors

    def _processed(self, samples: Iterable[RawSample]) -> Iterator[list[ProcessedSample]]:
        chunks = _chunks(samples, CHUNK_SIZE)
        if self.workers <= 0:
            for chunk in chunks:
                yield process_chunk(chunk, self.builders, self.max_pixels)
            return
        pool = self._get_pool()
        window: deque = deque()
        for chunk in chunks:
            window.append(pool.apply_async(process_chunk, (chunk, self.builders, self.max_pixels)))
            if len(window) >= self.workers * 3:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def _get_pool(self):
        if self._pool is None:
            # spawn: the parent may hold torch/OpenMP threads that fork would copy mid-state.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self._pool

    def _write(self, shard_index: int, rows: list[dict[str, Any]], batchers: list[_Batcher]) -> None:
        for batcher in batchers:
            vectors, metadata = batcher.result()
            write_array(vectors, self.run_dir.embedding_part(batcher.name, shard_index))
            write_table(metadata, self.run_dir.metadata_part(batcher.name, shard_index))
        columns = {name: [r[name] for r in rows] for name in SAMPLES_SCHEMA.names}
        write_table(pa.Table.from_pydict(columns, schema=SAMPLES_SCHEMA), self.run_dir.samples_part(shard_index))

    def close(self) -> None:
        """Stop the decode pool; the engine calls this after the last task, also when one failed."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def _shard_stats(rows: list[dict[str, Any]]) -> dict[str, int]:
    stats = {"samples": len(rows)}
    for row in rows:
        stats[f"status.{row['status']}"] = stats.get(f"status.{row['status']}", 0) + 1
    return stats


# ---------------------------------------------------------------- stage wiring


@dataclass
class EmbedOptions:
    """What the CLI says about embedding, in one value: descriptors, CLIP model, device, workers, engine."""

    descriptors: list[str] = field(default_factory=list)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # None: chosen by resolve_workers
    engine: str = "local"
    ray_address: str | None = None
    show_progress: bool = True



def _cuda_available() -> bool:
    """CUDA as torch sees it; False on the lean install (no torch), where CLIP cannot run at all."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_descriptors(options: EmbedOptions, log: Console | None = None) -> list[str]:
    """The descriptors to run (named ones, else the registry's default for this machine), logged with the reason."""
    if options.descriptors:
        names = list(dict.fromkeys(options.descriptors))
        reason = "chosen with --descriptor"
        unknown = [n for n in names if n not in vector_descriptor_names()]
        if unknown:
            raise DedupError(
                f"unknown descriptor {unknown[0]!r}",
                hint=f"choose from {', '.join(vector_descriptor_names())} (sha256 is always computed); 'dedup descriptors' lists them",
            )
    else:
        names, reason = choose_default_descriptors(_cuda_available())
    if log is not None:
        log.print(f"descriptors: {', '.join(names)} ({reason})")
    return names


def resolve_workers(options: EmbedOptions, names: list[str]) -> int:
    """Decode processes: one per core, except that CLIP on a CPU needs every core for the model.

    Measured on 2 cores (benchmarks/bench_embed.py, ViT-B-32): decode+prepare
    costs ~5% of the CPU forward pass; decoding inline reaches 0.95 of the bare
    model rate, one decode process 0.73 (it preempts torch's threads).
    """
    if options.workers is not None:
        return options.workers
    cores = os.cpu_count() or 1
    clip_on_cpu = "clip" in names and (options.device == "cpu" or (options.device == "auto" and not _cuda_available()))
    return 0 if clip_on_cpu else cores


def descriptor_builders(names: list[str], options: EmbedOptions) -> list[DescriptorBuilder]:
    """Picklable recipes, not descriptors: workers and Ray actors build their own copy where they run."""
    builders = []
    for name in names:
        opts: dict[str, Any] = {}
        if name == "clip":
            opts = {"model": options.clip_model, "pretrained": options.clip_pretrained, "device": options.device}
        builders.append(DescriptorBuilder(name, opts))
    return builders


def embed(shard_specs: list[str], out: str | Path, options: EmbedOptions, log: Console | None = None) -> StageReport:
    """The embed stage: expand inputs, fix the run's descriptors, check they build, then embed shard by shard behind the engine."""
    from dedup.data_manifest import expand_inputs

    run = RunDir(out)
    remove_stale_temp_files(run)
    shards = expand_inputs(shard_specs)
    names = resolve_descriptors(options, log)
    config = _start_config(run, shard_specs, names, options)
    record_shards(run, shards)
    builders = descriptor_builders(names, options)
    _check_builders(builders, log)
    workers = resolve_workers(options, names)
    if log is not None:
        log.print(f"decode workers: {workers}")
    stage = EmbedStage(run, shards, builders, workers=workers, batch_size=options.batch_size)
    engine = make_engine(options.engine, run, show_progress=options.show_progress, ray_address=options.ray_address)
    report = engine.run(stage)
    config.save(run)
    return report


def _start_config(run: RunDir, shard_specs: list[str], names: list[str], options: EmbedOptions) -> cfg.RunConfig:
    if run.run_config.exists():
        config = cfg.RunConfig.load(run)
        if config.descriptors != names:
            raise StoreError(
                f"{run.root} was embedded with {config.descriptors}, not {names}",
                hint="resume with the same --descriptor list, or use a new --out directory",
            )
        return config
    config = cfg.RunConfig(shard_specs=list(shard_specs), descriptors=names)
    config.descriptor_options = {b.name: b.options for b in descriptor_builders(names, options)}
    config.fill_defaults().save(run)
    return config


def _check_builders(builders: list[DescriptorBuilder], log: Console | None) -> None:
    """Build each descriptor once up front so a bad model name fails before any shard is read."""
    from dedup.stages.embed_worker import cached_descriptor

    for builder in builders:
        descriptor = cached_descriptor(builder)
        if builder.name == "clip":
            # One tiny forward pass loads the weights: a bad checkpoint fails here, not mid-shard.
            side = descriptor.min_side
            descriptor.embed(np.zeros((1, 3, side, side), dtype=np.uint8))
        if log is not None and hasattr(descriptor, "describe_device"):
            log.print(f"{builder.name}: {descriptor.describe_device()}")
