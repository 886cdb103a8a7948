"""Shard readers of the GPU-decode embed stage: read, hash, route each sample; CPU-decode what the GPU won't take.

Kept free of torch at import (like dedup.stages.embed_worker), so spawned
readers start reading at once; the clip descriptor that CPU-routed samples
need is built in a background thread (`LazyDescriptor`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import queue
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dedup.descriptors.base import DescriptorBuilder
from dedup.descriptors.jpeg_route import gpu_route
from dedup.stages.embed_worker import _base_row, _process_sample, cached_descriptor
from dedup.stages.read import DEFAULT_TIMEOUTS, RawSample, ShardStream, Timeouts, chunked

READ_CHUNK = 64  # samples per reader message: large enough to amortise pickling, small enough to interleave


@dataclass(frozen=True)
class ShardEnd:
    """A reader's last message for a shard: how many samples, and whether it was read to its end."""

    count: int
    failure: tuple[str, str] | None  # (status, message) of a shard cut short, as ShardStream reports it
    repeated_keys: int = 0
    repeated_members: int = 0


@dataclass
class RoutedSample:
    """One sample after its reader: a finished CPU result, or JPEG bytes for the GPU."""

    shard_index: int
    position: int
    row: dict[str, Any]
    prepared: np.ndarray | None = None  # the CPU path's (3, S, S) uint8
    jpeg: RawSample | None = None  # kept whole so a rejected JPEG can take the CPU path

    @property
    def needs_model(self) -> bool:
        return self.prepared is not None or self.jpeg is not None


class LazyDescriptor:
    """The clip descriptor, built in a background thread: its torch import must not delay the first JPEGs.

    Only samples for the CPU decoder need it (`prepare`); a reader routes and
    ships plain JPEGs while the import runs and holds the others back until it
    is ready (`read_routed`).
    """

    def __init__(self, builder: DescriptorBuilder) -> None:
        self._future = concurrent.futures.ThreadPoolExecutor(1).submit(cached_descriptor, builder)

    def ready(self) -> bool:
        return self._future.done()

    def get(self):
        return self._future.result()


def gpu_sample(raw: RawSample, shape: tuple[int, int]) -> RoutedSample:
    """A plain JPEG for the batched decoder: row, hash and size from the header, bytes kept."""
    row = _base_row(raw)
    row["sha256"] = hashlib.sha256(raw.image_bytes).hexdigest()
    row["height"], row["width"] = shape
    return RoutedSample(raw.shard_index, raw.position, row, jpeg=raw)


def cpu_sample(raw: RawSample, descriptor, max_pixels: int) -> RoutedSample:
    """Everything else: the CPU pipeline's own per-sample code (decode, status, `prepare`)."""
    processed = _process_sample(raw, [("clip", descriptor)], descriptor.min_side, max_pixels)
    return RoutedSample(raw.shard_index, raw.position, processed.row, processed.prepared.get("clip"))


def gpu_shape(raw: RawSample, max_pixels: int) -> tuple[int, int] | None:
    return gpu_route(raw.image_bytes, max_pixels) if raw.failure is None else None


def cpu_retry(sample: RoutedSample, descriptor, max_pixels: int) -> RoutedSample:
    """A JPEG the batched decoder rejected: decoded alone on the CPU, whose verdict is the status."""
    return cpu_sample(sample.jpeg, descriptor, max_pixels)


def read_routed(shard_index: int, url: str, descriptor: LazyDescriptor, max_pixels: int,
                timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Iterator[tuple]:
    """Messages for one shard: ("items", shard, [RoutedSample]) ..., then ("end", shard, ShardEnd).

    Samples for the CPU decoder wait (in order) until the descriptor is built;
    plain JPEGs never wait. Order inside a shard does not matter downstream:
    every sample carries its position.
    """
    stream = ShardStream(url, shard_index, timeouts)
    count, held = 0, []
    for chunk in chunked(stream, READ_CHUNK):
        items = []
        for raw in chunk:
            shape = gpu_shape(raw, max_pixels)
            if shape is None:
                held.append(raw)
            else:
                items.append(gpu_sample(raw, shape))
        if held and descriptor.ready():
            items += [cpu_sample(raw, descriptor.get(), max_pixels) for raw in held]
            held = []
        count += len(chunk)
        if items:
            yield "items", shard_index, items
    if held:
        yield "items", shard_index, [cpu_sample(raw, descriptor.get(), max_pixels) for raw in held]
    failure = (stream.failure.status, stream.failure.message) if stream.failure is not None else None
    yield "end", shard_index, ShardEnd(count, failure, stream.repeated_keys, stream.repeated_members)


def _reader_process(jobs, results, builder: DescriptorBuilder, max_pixels: int, eager: bool,
                    timeouts: Timeouts) -> None:
    # Readers only `prepare` (resize and crop on the CPU): a CPU descriptor keeps CUDA out of every reader.
    descriptor = LazyDescriptor(DescriptorBuilder(builder.name, {**builder.options, "device": "cpu"}))
    if eager:
        descriptor.get()
    while (job := jobs.get()) is not None:
        shard_index, url = job
        try:
            for message in read_routed(shard_index, url, descriptor, max_pixels, timeouts):
                results.put(message)
        except Exception:  # noqa: BLE001 - sent to the model process, which fails the shard's task
            results.put(("error", shard_index, traceback.format_exc()))


class ReaderPool:
    """`readers` spawned processes reading the planned shards in order into one bounded queue."""

    def __init__(self, plan: list[tuple[int, str]], builder: DescriptorBuilder, readers: int, max_pixels: int,
                 eager: bool = False, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        """`eager`: build the descriptor before reading (benchmarks time steady-state reading that way)."""
        context = multiprocessing.get_context("spawn")  # the parent holds CUDA and torch threads
        self.planned = {index for index, _ in plan}
        self._jobs = context.Queue()
        for job in plan:
            self._jobs.put(job)
        for _ in range(readers):
            self._jobs.put(None)
        # Bounded: readers block rather than pile decoded shards up in memory.
        self._results = context.Queue(maxsize=readers * 4)
        self._procs = [
            context.Process(target=_reader_process, args=(self._jobs, self._results, builder, max_pixels, eager, timeouts),
                            daemon=True)
            for _ in range(readers)
        ]
        for proc in self._procs:
            proc.start()

    def get(self, timeout: float) -> tuple | None:
        try:
            return self._results.get(timeout=timeout)
        except queue.Empty:
            dead = [p.exitcode for p in self._procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a shard reader process died (exit code {dead[0]})") from None
            return None

    def close(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5)


class InlineReader:
    """readers=0: the same messages, read in this process (small runs and tests)."""

    def __init__(self, plan: list[tuple[int, str]], builder: DescriptorBuilder, max_pixels: int,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self.planned = {index for index, _ in plan}
        descriptor = LazyDescriptor(builder)
        self._messages = (m for i, url in plan for m in read_routed(i, url, descriptor, max_pixels, timeouts))

    def get(self, timeout: float) -> tuple | None:
        return next(self._messages, None)

    def close(self) -> None:
        self._messages.close()
