"""Embed stage for clip with batched GPU decoding: parallel shard readers feed one model process.

Used instead of `dedup.stages.embed.EmbedStage` when clip is the only descriptor, its
`gpu_decode` option is on (the default on CUDA) and the engine is local. Same
files, same columns, same per-sample statuses, same resume rule (one task per
shard, written when the shard is complete):

* `readers` processes (one per core) each read whole shards, hash every sample
  and route it from its header (`gpu_decode.gpu_route`): plain JPEGs travel to
  the model process as bytes; everything else is decoded and prepared inside
  the reader by the CPU path (`dedup.stages.embed_worker`), so CPU decoding uses every core.
* The model process mixes the samples of every shard in flight into full
  batches, whatever order the readers deliver them in; the engine's current
  shard is flushed early so it never waits for a batch to fill.
* Two threads overlap the GPU work: one decodes and preprocesses batch k+1 on
  its own CUDA stream while the other runs the model on batch k.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Any

import numpy as np
import pyarrow as pa

from dedup import decode
from dedup.descriptors.base import DescriptorBuilder, l2_normalize
from dedup.engine import TaskIncomplete
from dedup.image_quality import quality_signals_of_reduced
from dedup.records import EMBEDDING_METADATA, SAMPLES, write_array, write_record
from dedup.run import RunDir
from dedup.stages.embed_gpu_read import InlineReader, ReaderPool, RoutedSample, ShardEnd, cpu_retry
from dedup.stages.embed_worker import cached_descriptor
from dedup.stages.read import DEFAULT_TIMEOUTS, Timeouts

_POLL_S = 0.05
_SHORT_POLL_S = 0.002  # while batches are in flight: wait briefly, then look at the other queue


# ---------------------------------------------------------------- model side


class GpuEmbedder:
    """Batches of RoutedSample in, (sample, vector or None) out; preprocess and model overlap in two threads."""

    def __init__(self, descriptor, max_pixels: int, depth: int = 2) -> None:
        import torch

        self.descriptor, self.max_pixels = descriptor, max_pixels
        self.preprocess = descriptor.batch_preprocess()
        cuda = descriptor.device.type == "cuda"
        self._streams = (torch.cuda.Stream(descriptor.device), torch.cuda.Stream(descriptor.device)) if cuda else None
        self._todo: queue.Queue = queue.Queue(maxsize=depth)
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._done: queue.Queue = queue.Queue()
        self.in_flight = 0
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._preprocess_loop,), daemon=True),
            threading.Thread(target=self._guarded, args=(self._model_loop,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, batch: list[RoutedSample]) -> None:
        while True:  # a dead thread must raise here, not leave the put blocked forever
            self._raise_if_failed()
            try:
                self._todo.put(batch, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        self.in_flight += 1

    def results(self, timeout: float | None) -> list[tuple[RoutedSample, np.ndarray | None]]:
        """One finished batch (waiting up to `timeout`; None waits not at all), or []."""
        self._raise_if_failed()
        try:
            done = self._done.get(timeout=timeout) if timeout else self._done.get_nowait()
        except queue.Empty:
            return []
        self.in_flight -= 1
        return done

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._todo.put(None, timeout=1)
        for thread in self._threads:
            thread.join(timeout=5)

    # -- threads -----------------------------------------------------------

    def _guarded(self, loop) -> None:
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc
            self._done.put([])
            with contextlib.suppress(queue.Full):
                self._ready.put_nowait(None)  # let the model thread end too

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"GPU embedding failed: {type(self._error).__name__}: {self._error}") from self._error

    def _stream(self, which: int):
        import torch

        return torch.cuda.stream(self._streams[which]) if self._streams else contextlib.nullcontext()

    def _preprocess_loop(self) -> None:
        while (batch := self._todo.get()) is not None:
            with self._stream(0):
                prepared = self._prepare(batch)
                event = self._record(prepared[1])
            self._ready.put((*prepared, event))
        self._ready.put(None)

    def _model_loop(self) -> None:
        """Launch batch k+1 before waiting for batch k's features: launches overlap the GPU's work."""
        waiting = None
        while True:
            try:
                item = self._ready.get(timeout=_SHORT_POLL_S if waiting else None)
            except queue.Empty:  # nothing new to launch: hand over what is done
                self._deliver(waiting)
                waiting = None
                continue
            if item is None:
                break
            launched = self._launch(*item)
            if waiting is not None:
                self._deliver(waiting)
            waiting = launched
        if waiting is not None:
            self._deliver(waiting)

    def _launch(self, embedded, model_input, skipped, event):
        import torch

        with self._stream(1):
            if event is not None:
                self._streams[1].wait_event(event)
                model_input.record_stream(self._streams[1])  # allocated on the preprocess stream
            if len(model_input) == 0:
                return embedded, torch.zeros((0, self.descriptor.dim)), skipped, None
            features = self.descriptor.launch_encode(model_input)
            if self._streams is None:
                return embedded, features, skipped, None
            host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            host.copy_(features, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._streams[1])
        return embedded, host, skipped, done

    def _deliver(self, launched) -> None:
        embedded, host, skipped, done = launched
        if done is not None:
            done.synchronize()
        vectors = l2_normalize(host.numpy())
        self._done.put(list(zip(embedded, vectors, strict=True)) + [(s, None) for s in skipped])

    def _record(self, tensor):
        if self._streams is None:
            return None
        import torch

        event = torch.cuda.Event()
        event.record(self._streams[0])
        return event

    def _prepare(self, batch: list[RoutedSample]):
        """-> (samples in model-input order, model input, samples that failed on the CPU retry too)."""
        import torch

        jpegs = [s for s in batch if s.jpeg is not None]
        images = self.preprocess.decode([s.jpeg.image_bytes for s in jpegs])
        decoded = [(s, image) for s, image in zip(jpegs, images, strict=True) if image is not None]
        retried = [cpu_retry(s, self.descriptor, self.max_pixels)
                   for s, image in zip(jpegs, images, strict=True) if image is None]
        self._measure_quality(decoded)
        on_cpu = [s for s in batch if s.jpeg is None] + [s for s in retried if s.prepared is not None]
        parts = [self.preprocess.normalise(self.preprocess.resize_crop([image for _, image in decoded]))]
        if on_cpu:
            parts.append(self.preprocess.normalise(self.preprocess.from_prepared(np.stack([s.prepared for s in on_cpu]))))
        return [s for s, _ in decoded] + on_cpu, torch.cat(parts), [s for s in retried if s.prepared is None]

    def _measure_quality(self, decoded: list[tuple[RoutedSample, Any]]) -> None:
        """The samples table's colourfulness / content_fraction, from the same reduced copy the CPU path uses."""
        reduced = self.preprocess.reduced_copies([image for _, image in decoded])
        for (sample, _), pixels in zip(decoded, reduced, strict=True):
            sample.row["colourfulness"], sample.row["content_fraction"] = quality_signals_of_reduced(pixels)


# ---------------------------------------------------------------- the stage


def _stats(rows: list[dict[str, Any]], end: ShardEnd) -> dict[str, int]:
    """EmbedStage's per-shard stats (samples, statuses, repeated keys and members)."""
    stats = {"samples": len(rows), "keys.repeated_in_shard": end.repeated_keys, "members.repeated": end.repeated_members}
    for row in rows:
        stats[f"status.{row['status']}"] = stats.get(f"status.{row['status']}", 0) + 1
    return stats


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({n: [r[n] for r in rows] for n in schema.names}, schema=schema)


class _ShardState:
    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.vectors: dict[int, np.ndarray] = {}
        self.end: ShardEnd | None = None  # the reader's last message: count, and a failure if cut short
        self.waiting = 0  # samples handed to the model and not back yet

    def all_received(self) -> bool:
        return self.end is not None and len(self.rows) >= self.end.count

    def complete(self) -> bool:
        return self.all_received() and self.waiting == 0


class GpuClipEmbedStage:
    """Picklable until it runs: builder and paths only; readers, threads and the model are made lazily."""

    name = "embed"

    def __init__(self, run: RunDir, shards: list[str], builder: DescriptorBuilder, readers: int | None = None,
                 batch_size: int = 256, max_pixels: int = decode.DEFAULT_MAX_PIXELS,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self.run_dir, self.shards, self.builder, self.timeouts = run, shards, builder, timeouts
        self.readers = (os.cpu_count() or 1) if readers is None else readers
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self._feed: ReaderPool | InlineReader | None = None
        self._embedder: GpuEmbedder | None = None
        self._states: dict[int, _ShardState] = {}
        self._pending: list[RoutedSample] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_feed": None, "_embedder": None, "_states": {}, "_pending": []}

    def task_ids(self) -> list[str]:
        return [str(i) for i in range(len(self.shards))]

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        index = int(task_id)
        try:
            self._start(index)
            state = self._states.setdefault(index, _ShardState())
            while not state.complete():
                self._step(state, progress)
            return self._finish(index)
        except BaseException:
            self.close()  # a retry starts from clean readers and empty buffers
            raise

    def prestart(self) -> None:
        """Start the readers on the first unfinished shard now, so their start overlaps the model's load."""
        pending = [i for i in range(len(self.shards)) if not self._done(i)]
        if pending:
            self._start(pending[0])

    # -- plumbing ----------------------------------------------------------

    def _done(self, index: int) -> bool:
        return self.run_dir.marker(self.name, str(index)).exists()

    def _start(self, index: int) -> None:
        if self._feed is not None and index in self._feed.planned:
            return
        self.close()
        later = [i for i in range(index + 1, len(self.shards)) if not self._done(i)]
        plan = [(i, self.shards[i]) for i in [index, *later]]
        if self.readers > 0:
            self._feed = ReaderPool(plan, self.builder, min(self.readers, len(plan)), self.max_pixels,
                                    timeouts=self.timeouts)
        else:
            self._feed = InlineReader(plan, self.builder, self.max_pixels, self.timeouts)
        self._embedder = GpuEmbedder(cached_descriptor(self.builder), self.max_pixels)

    def _step(self, state: _ShardState, progress) -> None:
        """One unit of work: collect a finished batch, flush the current shard's tail, or take a reader message.

        Reader messages keep flowing while the current shard's last batch is on the
        GPU, so later shards' batches queue behind it and the GPU never idles at a
        shard boundary.
        """
        embedder = self._embedder
        if self._collect(embedder.results(timeout=None)):
            return
        if state.all_received() and self._pending:
            self._flush()  # the current shard's tail goes now, in a short batch if need be
            return
        message = self._feed.get(timeout=_SHORT_POLL_S if embedder.in_flight else _POLL_S)
        if message is not None:
            self._handle(message, progress)
        elif embedder.in_flight:
            self._collect(embedder.results(timeout=_SHORT_POLL_S))

    def _handle(self, message: tuple, progress) -> None:
        kind, shard_index, payload = message
        state = self._states.setdefault(shard_index, _ShardState())
        if kind == "error":
            raise RuntimeError(f"reading shard {self.shards[shard_index]} failed:\n{payload}")
        if kind == "end":
            state.end = payload
            return
        for sample in payload:
            state.rows[sample.position] = sample.row
            if sample.needs_model:
                state.waiting += 1
                self._pending.append(sample)
        progress(len(payload))
        if len(self._pending) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
        self._embedder.submit(batch)

    def _collect(self, results: list[tuple[RoutedSample, np.ndarray | None]]) -> bool:
        for sample, vector in results:
            state = self._states[sample.shard_index]
            state.rows[sample.position] = sample.row
            if vector is not None:
                state.vectors[sample.position] = vector
            state.waiting -= 1
        return bool(results)

    def _finish(self, index: int) -> dict[str, Any]:
        """Write the shard's parts as EmbedStage does; a shard cut short raises TaskIncomplete after writing."""
        from dedup.stages.embed import _rows_on_disk, _with_url  # here: stages.embed imports this module

        state = self._states.pop(index)
        rows = [state.rows[p] for p in sorted(state.rows)]
        stats = _stats(rows, state.end)
        if state.end.failure is None or len(rows) >= _rows_on_disk(self.run_dir.samples_part(index)):
            # The readable samples are used until the shard reads in full; a worse retry never replaces them.
            self._write(index, state)
        if state.end.failure is None:
            return stats
        status, message = state.end.failure
        raise TaskIncomplete(status, _with_url(self.shards[index], message), stats)

    def _write(self, index: int, state: _ShardState) -> None:
        embedded = sorted(state.vectors)
        dim = cached_descriptor(self.builder).dim
        vectors = np.stack([state.vectors[p] for p in embedded]) if embedded else np.zeros((0, dim), np.float32)
        write_array(vectors.astype(np.float16), self.run_dir.embedding_part(self.builder.name, index))
        write_record(_table([state.rows[p] for p in embedded], EMBEDDING_METADATA),
                     self.run_dir.metadata_part(self.builder.name, index), EMBEDDING_METADATA)
        write_record(_table([state.rows[p] for p in sorted(state.rows)], SAMPLES), self.run_dir.samples_part(index),
                     SAMPLES)

    def describe_task(self, task_id: str) -> dict[str, Any]:
        """Columns of OUT/failed_shards.parquet besides the engine's own (as EmbedStage)."""
        return {"shard_index": int(task_id), "url": self.shards[int(task_id)]}

    def abort(self) -> None:
        """Ctrl-C: stop readers and threads now; nothing unfinished is marked done."""
        self.close()

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()
        if self._embedder is not None:
            self._embedder.close()
        self._feed, self._embedder, self._states, self._pending = None, None, {}, []


def gpu_stage_for(run: RunDir, shards: list[str], builders: list[DescriptorBuilder], engine: str,
                  readers: int | None, batch_size: int,
                  timeouts: Timeouts = DEFAULT_TIMEOUTS) -> GpuClipEmbedStage | None:
    """The GPU-decode stage where it applies (clip alone, gpu_decode on, local engine), else None.

    Ray actors each run their own shards, so a reader pool planned over the
    following shards would read work that other actors do: Ray keeps EmbedStage.
    """
    if engine != "local" or len(builders) != 1 or builders[0].name != "clip":
        return None
    if not getattr(cached_descriptor(builders[0]), "gpu_decode", False):
        return None
    return GpuClipEmbedStage(run, shards, builders[0], readers=readers, batch_size=batch_size, timeouts=timeouts)
