"""Embed stage: one task per shard -> samples table part + one embedding part per descriptor.

The main process reads the tar's headers and hands decode workers (processes)
chunks of raw samples; for a local uncompressed tar it seeks past the image data
and each worker reads its images at their offsets (`RawSample.deferred`), so no
image bytes pass through the pool's pipes. Workers decode, hash and `prepare`, and
the main process batches `prepare` outputs through each descriptor's `embed`
while the workers decode the next chunks. At most `window` chunks are in
flight, so memory stays bounded whatever the shard size. Once a shard's tar is
read to its end, the window is topped up from the next shard (with the local
engine), so the workers keep decoding while the main process waits for the
shard's last chunks and writes its parts.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dedup import decode
from dedup.console import terminal_safe
from dedup.descriptors import builder_options, cuda_available, describable, descriptor_policy
from dedup.descriptors.base import Descriptor, DescriptorBuilder
from dedup.engine import StageReport, TaskIncomplete, run_stage
from dedup.errors import DedupError
from dedup.records import (
    EMBEDDING_METADATA,
    SAMPLES,
    RunDir,
    record_shards,
    remove_stale_temp_files,
    write_array,
    write_record,
)
from dedup.run import Run
from dedup.settings import Settings
from dedup.stages.embed_worker import ProcessedSample, cached_descriptor, init_worker, process_chunk
from dedup.stages.read import DEFAULT_TIMEOUTS, RawSample, ShardStream, Timeouts, chunked

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
        columns = {name: [r[name] for r in self.rows] for name in EMBEDDING_METADATA.names}
        return vectors, pa.Table.from_pydict(columns, schema=EMBEDDING_METADATA)


class _ShardFeed:
    """One shard's chunks on their way through the pool: the tar is read only as far as the window needs."""

    def __init__(self, shard_index: int, stream: ShardStream) -> None:
        self.shard_index, self.stream = shard_index, stream
        self.chunks = chunked(stream, CHUNK_SIZE)
        self.window: deque = deque()
        self.read_to_end = False

    def submit_one(self, submit) -> bool:
        """Read one more chunk and hand it to `submit`; False once the tar is read to its end."""
        chunk = None if self.read_to_end else next(self.chunks, None)
        if chunk is None:
            self.read_to_end = True
            return False
        self.window.append(submit(chunk))
        return True

    def discard(self) -> None:
        """Not needed after all (another task came next): close the shard; queued chunks are dropped."""
        self.chunks.close()
        self.window.clear()


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
        prefetch: bool = False,
    ) -> None:
        self.run_dir = run
        self.shards = shards
        self.builders = tuple(builders)
        self.workers = workers
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.timeouts = timeouts
        # Start the next shard while this one drains: only where tasks run in shard order in this process.
        self.prefetch = prefetch
        self._pool = None
        self._main_descriptors: dict[str, Descriptor] | None = None
        self._next: _ShardFeed | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_main_descriptors"] = None
        state["_next"] = None
        return state

    def task_ids(self) -> list[str]:
        """One task per shard: the unit of retry and resume."""
        return [str(i) for i in range(len(self.shards))]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        """Embed one shard; a shard not read to its end raises TaskIncomplete after writing what it read."""
        shard_index = int(task_id)
        batchers = [
            _Batcher(name, descriptor, self.batch_size) for name, descriptor in self._descriptors().items()
        ]
        rows: list[dict[str, Any]] = []
        feed = self._take_feed(shard_index)
        stream = feed.stream
        for processed in self._processed(feed):
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

    def _take_feed(self, shard_index: int) -> _ShardFeed:
        """The shard's feed: the one prefetched while the previous shard drained, or a new one."""
        feed, self._next = self._next, None
        if feed is not None and feed.shard_index == shard_index:
            return feed
        if feed is not None:
            feed.discard()
        return _ShardFeed(shard_index, self._stream(shard_index))

    def _stream(self, shard_index: int) -> ShardStream:
        # With a pool, workers read their images from a local tar themselves: no image bytes through pipes.
        return ShardStream(self.shards[shard_index], shard_index, self.timeouts, defer_images=self.workers > 0)

    def _processed(self, feed: _ShardFeed) -> Iterator[list[ProcessedSample]]:
        if self.workers <= 0:
            for chunk in feed.chunks:
                yield process_chunk(chunk, self.builders, self.max_pixels)
            return
        pool = self._get_pool()

        def submit(chunk: list[RawSample]):
            return pool.apply_async(process_chunk, (chunk, self.builders, self.max_pixels))

        while True:
            while self._in_flight(feed) < self.workers * 3 and (
                feed.submit_one(submit) or self._prefetch_one(feed.shard_index + 1, submit)
            ):
                pass
            if not feed.window:
                return
            yield feed.window.popleft().get()

    def _in_flight(self, feed: _ShardFeed) -> int:
        return len(feed.window) + (len(self._next.window) if self._next is not None else 0)

    def _prefetch_one(self, shard_index: int, submit) -> bool:
        """One chunk of the next shard into the window; False where there is none to prefetch."""
        if not self.prefetch or shard_index >= len(self.shards):
            return False
        if self._next is None:
            if self.run_dir.marker(self.name, str(shard_index)).exists():
                return False  # done in an earlier run: the engine skips it
            self._next = _ShardFeed(shard_index, self._stream(shard_index))
        return self._next.shard_index == shard_index and self._next.submit_one(submit)

    def _get_pool(self):
        if self._pool is None:
            # spawn: the parent may hold torch/OpenMP threads that fork would copy mid-state.
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.workers, initializer=init_worker, initargs=(SAMPLES.names,)
            )
        return self._pool

    def _write(self, shard_index: int, rows: list[dict[str, Any]], batchers: list[_Batcher]) -> None:
        for batcher in batchers:
            vectors, metadata = batcher.result()
            write_array(vectors, self.run_dir.embedding_part(batcher.name, shard_index))
            write_record(metadata, self.run_dir.metadata_part(batcher.name, shard_index), EMBEDDING_METADATA)
        columns = {name: [r[name] for r in rows] for name in SAMPLES.names}
        write_record(pa.Table.from_pydict(columns, schema=SAMPLES), self.run_dir.samples_part(shard_index), SAMPLES)

    def close(self) -> None:
        """Stop the decode pool; the engine calls this after the last task, also when one failed."""
        self._drop_prefetched()
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def abort(self) -> None:
        """Ctrl-C: stop the workers now; queued chunks are dropped (nothing unfinished is marked done)."""
        self._drop_prefetched()
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


    def _drop_prefetched(self) -> None:
        if self._next is not None:
            self._next.discard()
            self._next = None


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


def record_missing(run: Run, missing: list[str]) -> None:
    """OUT/missing_shards.parquet lists the absent shards of this run (none: no file); a later run adds them."""
    import pandas as pd

    from dedup.records import MISSING_SHARDS, write_record

    if not missing:
        run.missing_shards.unlink(missing_ok=True)
        return
    write_record(pd.DataFrame({"url": missing}), run.missing_shards, MISSING_SHARDS)
    run.log(f"warning: {len(missing):,} shards do not exist (first: {terminal_safe(missing[0])}); "
            f"recorded in {run.missing_shards.name}, rerun to add them once they do")


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


def resolve_workers(settings: Settings) -> int:
    """Decode processes: one per core, except where a descriptor's model needs every core on a CPU.

    Measured on 2 cores (benchmarks/bench_embed.py, ViT-B-32): decode+prepare
    costs ~5% of the CPU forward pass; decoding inline reaches 0.95 of the bare
    model rate, one decode process 0.73 (it preempts torch's threads).
    """
    if settings.workers is not None:
        return settings.workers
    on_cpu = settings.device == "cpu" or (settings.device == "auto" and not cuda_available())
    greedy = any(descriptor_policy(n).uses_all_cores_on_cpu for n in settings.descriptors)
    return 0 if (greedy and on_cpu) else (os.cpu_count() or 1)


def descriptor_builders(settings: Settings) -> list[DescriptorBuilder]:
    """Picklable recipes, built inside each worker; options come from the registry entry and run.json."""
    values = {"device": settings.device}
    # Vectors made outside dedup (`precomputed`) are not computed from images: dedup/stages/precomputed_join.py.
    return [DescriptorBuilder(name, builder_options(name, {**values, **settings.descriptor_options.get(name, {})}))
            for name in describable(settings.descriptors)]


def embed(run: Run) -> StageReport:
    """Read every shard, store hashes + descriptors; resumes shard by shard."""
    from dedup.data_manifest import expand_inputs
    from dedup.stages.embed_gpu import gpu_stage_for

    remove_stale_temp_files(run)
    missing: list[str] | None = [] if run.settings.allow_missing else None
    shards = record_shards(run, expand_inputs(run.settings.shard_specs, missing))
    record_missing(run, missing or [])
    builders = descriptor_builders(run.settings)
    timeouts = Timeouts(run.settings.connect_timeout_s, run.settings.read_timeout_s)
    gpu_stage = gpu_stage_for(run, shards, builders, run.settings.engine.name, run.settings.workers,
                              run.settings.batch_size, timeouts)
    if gpu_stage is not None:
        gpu_stage.prestart()  # its shard readers start while _check_builders loads the model
    try:
        _check_builders(builders, run)
    except BaseException:
        if gpu_stage is not None:
            gpu_stage.close()
        raise
    if gpu_stage is not None:
        run.log(f"clip: batched decoding, {gpu_stage.readers} shard readers")
        stage = gpu_stage
    else:
        workers = resolve_workers(run.settings)
        run.log(f"decode workers: {workers}")
        stage = EmbedStage(run, shards, builders, workers=workers, batch_size=run.settings.batch_size,
                           timeouts=timeouts, prefetch=run.settings.engine.name == "local")
    report = run_stage(run, stage)
    report.stats["keys.in_several_shards"] = keys_in_several_shards(run)
    require_decoded(report, run)
    return report


def _check_builders(builders: list[DescriptorBuilder], run: Run) -> None:
    """Build each descriptor once up front so a bad model name fails before any shard is read."""
    for builder in builders:
        descriptor = cached_descriptor(builder)
        if descriptor_policy(builder.name).warm_up:
            # One tiny forward pass loads the weights: a bad checkpoint fails here, not mid-shard.
            side = descriptor.min_side
            descriptor.embed(np.zeros((1, 3, side, side), dtype=np.uint8))
        if hasattr(descriptor, "describe_device"):
            run.log(f"{builder.name}: {descriptor.describe_device()}")
