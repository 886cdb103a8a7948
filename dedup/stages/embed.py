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
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from rich.console import Console

from dedup import decode
from dedup import settings as cfg
from dedup.descriptors import choose_default_descriptors, vector_descriptor_names
from dedup.descriptors.base import Descriptor, DescriptorBuilder
from dedup.engine import StageReport, TaskIncomplete, make_engine
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
from dedup.stages.read import DEFAULT_TIMEOUTS, RawSample, ShardStream, Timeouts

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
        self.pending.append(prepared)
        self.rows.append(row)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            embedded = self.descriptor.embed(np.stack(self.pending))
            self.vectors.append(np.asarray(embedded, dtype=np.float16))
            self.pending = []

    def result(self) -> tuple[np.ndarray, pa.Table]:
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
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.run_dir = run
        self.shards = shards
        self.builders = tuple(builders)
        self.workers = workers
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.timeouts = timeouts
        self._pool = None
        self._main_descriptors: dict[str, Descriptor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_main_descriptors"] = None
        return state

    def task_ids(self) -> list[str]:
        return [str(i) for i in range(len(self.shards))]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        """Embed one shard; a shard not read to its end raises TaskIncomplete after writing what it read."""
        shard_index = int(task_id)
        batchers = [
            _Batcher(name, descriptor, self.batch_size) for name, descriptor in self._descriptors().items()
        ]
        rows: list[dict[str, Any]] = []
        stream = ShardStream(self.shards[shard_index], shard_index, self.timeouts)
        for processed in self._processed(stream):
            for sample in processed:
                rows.append(sample.row)
                for batcher in batchers:
                    if batcher.name in sample.prepared:
                        batcher.add(sample.row, sample.prepared[batcher.name])
            progress(len(processed))
        stats = _shard_stats(rows, stream)
        if stream.failure is None:
            self._write(shard_index, rows, batchers)
            return stats
        # The readable samples are used (clustered, in the manifests) until the shard reads in full;
        # a worse retry (fewer samples) never replaces what an earlier attempt read.
        if len(rows) >= _rows_on_disk(self.run_dir.samples_part(shard_index)):
            self._write(shard_index, rows, batchers)
        raise TaskIncomplete(stream.failure.status, _with_url(self.shards[shard_index], stream.failure.message), stats)

    def describe_task(self, task_id: str) -> dict[str, Any]:
        """Columns of OUT/failed_shards.parquet besides the engine's own."""
        return {"shard_index": int(task_id), "url": self.shards[int(task_id)]}

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
            # Workers ignore SIGINT: Ctrl-C reaches the whole process group, and only this process
            # should act on it (by terminating the pool), not workers dying mid-task.
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)
            )
        return self._pool

    def _write(self, shard_index: int, rows: list[dict[str, Any]], batchers: list[_Batcher]) -> None:
        for batcher in batchers:
            vectors, metadata = batcher.result()
            write_array(vectors, self.run_dir.embedding_part(batcher.name, shard_index))
            write_table(metadata, self.run_dir.metadata_part(batcher.name, shard_index))
        columns = {name: [r[name] for r in rows] for name in SAMPLES_SCHEMA.names}
        write_table(pa.Table.from_pydict(columns, schema=SAMPLES_SCHEMA), self.run_dir.samples_part(shard_index))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def abort(self) -> None:
        """Ctrl-C: stop the workers now; queued chunks are dropped (nothing unfinished is marked done)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def _shard_stats(rows: list[dict[str, Any]], stream: ShardStream) -> dict[str, int]:
    stats = {"samples": len(rows), "keys.repeated_in_shard": stream.repeated_keys,
             "members.repeated": stream.repeated_members}
    for row in rows:
        stats[f"status.{row['status']}"] = stats.get(f"status.{row['status']}", 0) + 1
    return stats


def _rows_on_disk(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def _with_url(url: str, message: str) -> str:
    return message if url in message else f"{url}: {message}"


def keys_in_several_shards(run: RunDir) -> int:
    """Distinct keys that occur in more than one shard (e.g. two img2dataset outputs both starting at 000000000).

    Keys are hashed to 64 bits, so memory is 8 bytes a sample; a collision can only add a spurious count.
    """
    import pyarrow.parquet as pq

    per_shard = []
    for part in sorted((run.root / "samples").glob("samples_*.parquet")):
        keys = pq.read_table(part, columns=["key"])["key"].to_pandas()
        per_shard.append(np.unique(pd.util.hash_array(keys.to_numpy(dtype=object))))
    if not per_shard:
        return 0
    _, counts = np.unique(np.concatenate(per_shard), return_counts=True)
    return int((counts > 1).sum())


def require_decoded(report: StageReport, run: RunDir) -> None:
    """A run in which nothing decodes is a bad input, not an empty result."""
    if report.stats.get("status.ok", 0) > 0:
        return
    statuses = {k.split(".", 1)[1]: int(v) for k, v in report.stats.items() if k.startswith("status.")}
    failed = f"; {len(report.failures)} of {report.tasks_total} shards could not be read" if report.failures else ""
    first = next(iter(report.failures.values()), None)
    raise DedupError(
        f"no image decoded: {int(report.stats.get('samples', 0)):,} samples {statuses or ''}{failed}"
        + (f" (first: {first.summary})" if first else ""),
        hint=f"check that the shards are webdataset tars of images ({{key}}.jpg / .png / .webp ...); "
             f"{run.samples_part(0).parent}/ and {run.failed_shards.name} list every failure",
    )


# ---------------------------------------------------------------- stage wiring


@dataclass
class EmbedOptions:
    descriptors: list[str] = field(default_factory=list)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # None: chosen by resolve_workers
    engine: str = "local"
    ray_address: str | None = None
    show_progress: bool = True
    # Failed shards: tried 1 + retries times, waiting retry_backoff_s, then twice that, ... between tries.
    retries: int = 2
    retry_backoff_s: float = 1.0
    connect_timeout_s: float = DEFAULT_TIMEOUTS.connect
    read_timeout_s: float = DEFAULT_TIMEOUTS.read



def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_descriptors(options: EmbedOptions, log: Console | None = None) -> list[str]:
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
    builders = []
    for name in names:
        opts: dict[str, Any] = {}
        if name == "clip":
            opts = {"model": _resolved_if_file(options.clip_model),
                    "pretrained": _resolved_if_file(options.clip_pretrained), "device": options.device}
        builders.append(DescriptorBuilder(name, opts))
    return builders


def _resolved_if_file(value: str) -> str:
    """A local model file becomes absolute, so query and report find it from any working directory
    (run.json keeps it); tags and model names stay as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.is_file() else value


def embed(shard_specs: list[str], out: str | Path, options: EmbedOptions, log: Console | None = None) -> StageReport:
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
    timeouts = Timeouts(options.connect_timeout_s, options.read_timeout_s)
    stage = EmbedStage(run, shards, builders, workers=workers, batch_size=options.batch_size, timeouts=timeouts)
    engine = make_engine(options.engine, run, show_progress=options.show_progress, ray_address=options.ray_address,
                         retries=options.retries, backoff_s=options.retry_backoff_s)
    report = engine.run(stage)
    config.save(run)
    report.stats["keys.in_several_shards"] = keys_in_several_shards(run)
    require_decoded(report, run)
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
