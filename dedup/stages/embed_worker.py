"""Decode-worker side of the embed stage: raw samples -> rows + `prepare` outputs.

Kept free of pandas/pyarrow/torch imports so spawned workers start fast (pandas
alone is ~1 s of CPU a worker): the samples-row columns come from the parent
through `init_worker`; a descriptor's own module (e.g. clip -> torch) loads only
when a builder needs it.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dedup import decode
from dedup.descriptors.base import Descriptor, DescriptorBuilder
from dedup.ids import make_sample_id
from dedup.image_quality import quality_signals
from dedup.stages.read import RawSample, meta_int, meta_str


@dataclass
class ProcessedSample:
    row: dict[str, Any]
    prepared: dict[str, np.ndarray] = field(default_factory=dict)


_worker_descriptors: dict[str, Descriptor] = {}
_row_columns: tuple[str, ...] | None = None  # the SAMPLES columns, set by init_worker (or read from records)


def init_worker(sample_columns: Sequence[str]) -> None:
    """Decode-pool initializer: the row's columns without importing dedup.records (pyarrow + pandas).

    Workers ignore SIGINT: Ctrl-C reaches the whole process group, and only the
    parent should act on it (by terminating the pool), not workers dying mid-task.
    """
    global _row_columns
    _row_columns = tuple(sample_columns)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _empty_row() -> dict[str, Any]:
    global _row_columns
    if _row_columns is None:  # in-process decoding: the parent has dedup.records loaded anyway
        from dedup.records import SAMPLES

        _row_columns = tuple(SAMPLES.names)
    return dict.fromkeys(_row_columns)


def cached_descriptor(builder: DescriptorBuilder) -> Descriptor:
    """Build once per process (workers and the model-owning process alike): a model loads once.

    Builders are plain data; models are never shipped between processes.
    """
    cache_key = builder.cache_key()
    if cache_key not in _worker_descriptors:
        _worker_descriptors[cache_key] = builder.build()
    return _worker_descriptors[cache_key]


def process_chunk(
    chunk: list[RawSample], builders: tuple[DescriptorBuilder, ...], max_pixels: int
) -> list[ProcessedSample]:
    descriptors = [(b.name, cached_descriptor(b)) for b in builders]
    target_side = max((d.min_side for _, d in descriptors), default=0)
    return [_process_sample(raw, descriptors, target_side, max_pixels) for raw in chunk]


def _process_sample(raw: RawSample, descriptors, target_side: int, max_pixels: int) -> ProcessedSample:
    raw.load_deferred()
    row = _base_row(raw)
    if raw.image_bytes is not None:
        row["sha256"] = hashlib.sha256(raw.image_bytes).hexdigest()
    if raw.failure is not None:
        row["status"], row["error"] = raw.failure
        return ProcessedSample(row)
    try:
        decoded = decode.decode_image(raw.image_bytes or b"", target_side, max_pixels)
    except decode.DecodeFailure as failure:
        row["status"], row["error"] = failure.status, failure.message
        return ProcessedSample(row)
    row["width"], row["height"] = decoded.width, decoded.height
    row["colourfulness"], row["content_fraction"] = quality_signals(decoded.image)
    prepared = {}
    for name, descriptor in descriptors:
        try:
            prepared[name] = descriptor.prepare(decoded.image)
        except Exception as exc:  # noqa: BLE001 - a pathological image is the sample's failure
            row["status"], row["error"] = decode.DECODE_ERROR, f"{name}: {type(exc).__name__}: {exc}"
            return ProcessedSample(row)
    return ProcessedSample(row, prepared)


def _base_row(raw: RawSample) -> dict[str, Any]:
    meta = raw.meta
    row = _empty_row()
    row.update(
        sample_id=make_sample_id(raw.shard_index, raw.position), shard_index=raw.shard_index, shard=raw.shard,
        key=raw.key, url=meta_str(meta, "url"), caption=raw.caption, image_member=raw.image_member,
        original_width=meta_int(meta, "original_width"), original_height=meta_int(meta, "original_height"),
        status=decode.OK, image_bytes=len(raw.image_bytes) if raw.image_bytes is not None else None,
        image_offset=raw.image_offset,
    )
    return row
