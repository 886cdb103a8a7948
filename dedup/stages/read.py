"""Read shards: expand shard specs and stream img2dataset-style samples.

A shard is a tar whose members are grouped by key (`{key}.jpg`, `{key}.txt`,
`{key}.json`). Tars are read as streams, one member at a time, so memory is
bounded by the largest allowed member, whatever the number of shards.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from braceexpand import braceexpand

from dedup.errors import DedupError, ShardSpecError, require

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif")
# Web content decides member sizes; we decide what we allocate for them.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_TEXT_BYTES = 256 * 1024
MAX_CAPTION_CHARS = 4096
MAX_URL_CHARS = 4096
_REMOTE_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "hf://", "ais://", "az://", "abfs://")


@dataclass
class RawSample:
    """One sample as found in a shard, before decoding."""

    shard_index: int
    shard: str
    position: int
    key: str
    image_bytes: bytes | None = None
    image_member: str | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Set when the sample is unusable before decoding: (status, message).
    failure: tuple[str, str] | None = None


def is_remote(spec: str) -> bool:
    return spec.startswith(_REMOTE_SCHEMES)


def expand_shard_specs(specs: Iterable[str]) -> list[str]:
    """Brace patterns, globs and URLs -> ordered list of distinct shard URLs."""
    shards: list[str] = []
    for spec in specs:
        for expanded in braceexpand(spec):
            shards.extend(_expand_one(expanded))
    unique = list(dict.fromkeys(shards))
    if not unique:
        raise ShardSpecError(
            f"the shard specs {list(specs)!r} match no shard",
            hint="pass tar files, a glob ('data/*.tar') or a brace pattern ('data/{00000..00099}.tar')",
        )
    return unique


def _expand_one(spec: str) -> list[str]:
    if is_remote(spec):
        return [spec]
    if any(ch in spec for ch in "*?["):
        return sorted(glob.glob(spec))
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    if not path.exists():
        raise ShardSpecError(f"shard {spec!r} does not exist", hint="check the path or the brace pattern's range")
    return [spec]


@contextmanager
def open_shard(url: str) -> Iterator[IO[bytes]]:
    """Open a local path or any URL webdataset/fsspec can stream."""
    if not is_remote(url):
        with open(url, "rb") as handle:
            yield handle
        return
    if url.startswith(("s3://", "gs://", "gcs://", "az://", "abfs://")):
        with _open_fsspec(url) as handle:
            yield handle
        return
    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    try:
        yield stream
    finally:
        stream.close()


def _open_fsspec(url: str):
    scheme = url.split("://")[0]
    fsspec = require("fsspec", "fsspec", "s3", f"Reading {scheme}:// shards")
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exc:
        raise DedupError(
            f"reading {scheme}:// shards needs an fsspec backend: {exc}",
            hint="pip install 'dedup[s3]' (gs:// and az:// need gcsfs / adlfs), or use 'pipe:aws s3 cp URL -'",
        ) from exc


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: key is the path up to the first '.' of the basename."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def read_shard(url: str, shard_index: int) -> Iterator[RawSample]:
    """Stream the samples of one shard; a broken tar ends with a `shard_error` sample."""
    position = 0
    try:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for key, files in _group_members(tar):
                yield _make_sample(url, shard_index, position, key, files)
                position += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield RawSample(
            shard_index, url, position, f"__shard_error_{position}",
            failure=("shard_error", f"shard unreadable after {position} samples: {type(exc).__name__}: {exc}"),
        )


def _group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes | str]]]:
    """Yield (key, {ext: bytes}) for consecutive members sharing a key."""
    current_key: str | None = None
    files: dict[str, bytes | str] = {}
    for member in tar:
        if not member.isfile():
            continue
        key, ext = split_member_name(member.name)
        if key.startswith("__") or not ext:
            continue
        if key != current_key:
            if current_key is not None:
                yield current_key, files
            current_key, files = key, {}
        files[ext] = _read_member(tar, member, ext)
    if current_key is not None:
        yield current_key, files


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str) -> bytes | str:
    limit = MAX_IMAGE_BYTES if ext in IMAGE_EXTENSIONS else MAX_TEXT_BYTES
    if member.size > limit:
        return f"member {member.name!r} is {member.size:,} bytes, above the {limit:,}-byte limit"
    handle = tar.extractfile(member)
    return handle.read() if handle else b""


def _make_sample(url: str, shard_index: int, position: int, key: str, files: dict[str, bytes | str]) -> RawSample:
    sample = RawSample(shard_index, url, position, key[:1024])
    sample.meta = _parse_json(files.get("json"))
    sample.caption = _caption(files.get("txt"), sample.meta)
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
    if image_ext is None:
        sample.failure = ("missing_image", f"no image member for key {key!r} (found: {sorted(files)})")
        return sample
    payload = files[image_ext]
    sample.image_member = f"{key}.{image_ext}"
    if isinstance(payload, str):  # over the size limit: the message says why
        sample.failure = ("too_large", payload)
    else:
        sample.image_bytes = payload
    return sample


def _parse_json(payload: bytes | str | None) -> dict[str, Any]:
    if not isinstance(payload, bytes):
        return {}
    try:
        value = json.loads(payload.decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _caption(payload: bytes | str | None, meta: dict[str, Any]) -> str | None:
    if isinstance(payload, bytes):
        return payload.decode("utf-8", errors="replace")[:MAX_CAPTION_CHARS]
    caption = meta.get("caption")
    return str(caption)[:MAX_CAPTION_CHARS] if caption is not None else None


def meta_str(meta: dict[str, Any], name: str, limit: int = MAX_URL_CHARS) -> str | None:
    value = meta.get(name)
    return str(value)[:limit] if value is not None else None


def meta_int(meta: dict[str, Any], name: str) -> int | None:
    value = meta.get(name)
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 <= number < 2**31 else None
