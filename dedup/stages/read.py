"""Read shards: expand shard specs and stream img2dataset-style samples.

A shard is a tar whose members are grouped by key (`{key}.jpg`, `{key}.txt`,
`{key}.json`). Tars are read as streams, one member at a time, so memory is
bounded by the largest allowed member, whatever the number of shards.

A shard is only "read" when its tar ends as a tar must (two 512-byte zero
blocks): `tarfile` and webdataset silently accept an archive cut at a member or
header boundary (a partial download, a server closing the connection cleanly),
so `ShardStream` checks the end itself and reports such a shard as `truncated`.
Remote reads have connect and read timeouts; failures name the URL and the
HTTP status (see `ShardFailure`).

Samples are grouped like webdataset groups them: consecutive members with one
key form a sample, and a member name repeated inside a sample starts a new
sample. A key that comes back later in the shard (or a repeated member name)
therefore gives one more sample with the same key; such samples are told apart
by their order of appearance (`RawSample.occurrence`: 0 for the first sample
with that key in the shard, 1 for the next...) and counted in
`ShardStream.repeated_keys` / `repeated_members`.
"""

from __future__ import annotations

import glob
import json
import os
import select
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException, HTTPSConnection, IncompleteRead
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from braceexpand import braceexpand

from dedup.errors import DedupError, ShardSpecError, require

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif")
# Web content decides member sizes; we decide what we allocate for them.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_TEXT_BYTES = 256 * 1024
MAX_CAPTION_CHARS = 4096
MAX_URL_CHARS = 4096
_REMOTE_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "hf://", "ais://", "az://", "abfs://")
# What a glob or a folder contributes: tar files only, never img2dataset's .parquet / _stats.json beside them.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

# Shard failure statuses (OUT/failed_shards.parquet `status`).
SHARD_TRUNCATED = "truncated"  # the tar ends before its end-of-archive blocks: samples read so far are kept
SHARD_UNREADABLE = "unreadable"  # cannot be opened, is not a tar, or a pipe: command failed
SHARD_HTTP_ERROR = "http_error"  # the server answered with a status other than 200
SHARD_TIMEOUT = "timeout"  # no connection, or no data, within the timeouts
_REDIRECTS = 5


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for a connection, and for each read once connected (a stalled server)."""

    connect: float = 30.0
    read: float = 60.0


DEFAULT_TIMEOUTS = Timeouts()


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
    # Earlier samples with this key in this shard (0 = first appearance).
    occurrence: int = 0
    # Where the image member's data starts in the tar, when the tar is not compressed (None otherwise):
    # the samples table keeps it, so the report reads a shown image back without scanning the shard.
    image_offset: int | None = None
    # `ShardStream(defer_images=True)`: (local file, offset, size) of image bytes not read yet; the decode
    # worker reads them itself (`load_deferred`), so image bytes never pass through the main process.
    deferred: tuple[str, int, int] | None = None

    def load_deferred(self) -> None:
        """Read deferred image bytes from the shard file (a shard changed or cut since its headers were read
        raises ShardChanged: the shard's task fails and is retried, it never decodes other bytes)."""
        if self.deferred is None:
            return
        path, offset, size = self.deferred
        with open(path, "rb") as handle:
            data = os.pread(handle.fileno(), size, offset)
        if len(data) != size:
            raise ShardChanged(f"{path}: {size:,} image bytes expected at offset {offset:,}, "
                               f"{len(data):,} found (the shard changed while it was read)")
        self.image_bytes, self.deferred = data, None


@dataclass(frozen=True)
class ShardFailure:
    """Why a shard was not read to its end; `samples_read` samples before it are usable."""

    status: str
    message: str
    samples_read: int


class ShardChanged(OSError):
    """A shard file no longer holds what its headers said when it was read (rewritten or cut meanwhile)."""


class ShardOpenError(OSError):
    """Opening a shard failed in a way with a status of its own (HTTP error, timeout)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_remote(spec: str) -> bool:
    return spec.startswith(_REMOTE_SCHEMES)


def is_shard_file(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def shard_location(url: str) -> str:
    """Where a shard is, independent of the working directory: URLs unchanged, local paths absolute."""
    return url if is_remote(url) else str(Path(url).resolve())


def expand_shard_specs(specs: Iterable[str], missing: list[str] | None = None) -> list[str]:
    """Brace patterns, globs and URLs -> ordered list of distinct shard URLs.

    A local shard that does not exist is an error, unless `missing` is a list: then it is
    appended there (img2dataset leaves gaps in a brace range when a shard failed to download).
    """
    shards: list[str] = []
    for spec in specs:
        for expanded in braceexpand(spec):
            shards.extend(_expand_one(expanded, missing))
    unique = list(dict.fromkeys(shards))
    if not unique:
        raise ShardSpecError(
            f"the shard specs {list(specs)!r} match no shard",
            hint="pass tar files, a glob ('data/*.tar') or a brace pattern ('data/{00000..00099}.tar')",
        )
    return unique


def _expand_one(spec: str, missing: list[str] | None = None) -> list[str]:
    if is_remote(spec):
        return [spec]
    if any(ch in spec for ch in "*?["):
        return sorted(p for p in glob.glob(spec) if is_shard_file(p) and not Path(p).is_dir())
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if is_shard_file(p.name) and p.is_file())
    if not path.exists():
        if missing is not None:
            missing.append(spec)
            return []
        raise ShardSpecError(f"shard {spec!r} does not exist",
                             hint="check the path or the brace pattern's range (--allow-missing records gaps and goes on)")
    return [spec]


@contextmanager
def open_shard(url: str, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Iterator[IO[bytes]]:
    """Open a local path, an http(s) URL, a `pipe:` command or an fsspec URL as a byte stream."""
    if not is_remote(url):
        with open(url, "rb") as handle:
            yield handle
    elif url.startswith(("http://", "https://")):
        with _open_http(url, timeouts) as handle:
            yield handle
    elif url.startswith("pipe:"):
        with _open_pipe(url.removeprefix("pipe:"), timeouts) as handle:
            yield handle
    else:
        with _open_fsspec(url) as handle:
            yield handle


@contextmanager
def _open_http(url: str, timeouts: Timeouts) -> Iterator[IO[bytes]]:
    """GET with a connect timeout and a per-read timeout, following a few redirects."""
    for _ in range(_REDIRECTS + 1):
        connection, response = _http_get(url, timeouts)
        location = response.getheader("Location")
        if response.status in (301, 302, 303, 307, 308) and location:
            connection.close()
            url = urljoin(url, location)
            continue
        try:
            if response.status != 200:
                raise ShardOpenError(SHARD_HTTP_ERROR, f"{url}: HTTP {response.status} {response.reason}")
            yield response
        finally:
            connection.close()
        return
    raise ShardOpenError(SHARD_HTTP_ERROR, f"{url}: more than {_REDIRECTS} redirects")


def _http_get(url: str, timeouts: Timeouts):
    parts = urlsplit(url)
    kind = HTTPSConnection if parts.scheme == "https" else HTTPConnection
    connection = kind(parts.hostname or "", parts.port, timeout=timeouts.connect)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.connect()
    except TimeoutError:
        connection.close()
        raise ShardOpenError(SHARD_TIMEOUT, f"{url}: no connection within {timeouts.connect:g}s") from None
    except OSError as exc:
        connection.close()
        raise ShardOpenError(SHARD_UNREADABLE, f"{url}: cannot connect: {exc.strerror or exc}") from None
    connection.sock.settimeout(timeouts.read)  # from here on, each read waits at most this long
    try:
        connection.request("GET", target, headers={"User-Agent": "dedup", "Accept-Encoding": "identity"})
        return connection, connection.getresponse()
    except TimeoutError:
        connection.close()
        raise ShardOpenError(SHARD_TIMEOUT, f"{url}: no response within {timeouts.read:g}s (server stalled)") from None
    except (OSError, HTTPException) as exc:
        connection.close()
        raise ShardOpenError(SHARD_UNREADABLE, f"{url}: {type(exc).__name__}: {exc}") from None


class _PipeReader:
    """stdout of a `pipe:` command, each read bounded by the read timeout (a stalled command is a timeout)."""

    def __init__(self, command: str, timeouts: Timeouts) -> None:
        self.command, self.timeout = command, timeouts.read
        # A file, not a pipe, for stderr: a chatty command can never block on a full stderr pipe.
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr)
        self.at_end = False

    def read(self, size: int = -1) -> bytes:
        chunks, wanted = [], size if size >= 0 else 1 << 62
        while wanted > 0 and not self.at_end:
            ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
            if not ready:
                raise ShardOpenError(SHARD_TIMEOUT, f"pipe:{self.command}: no data for {self.timeout:g}s (stalled)")
            chunk = os.read(self.process.stdout.fileno(), min(wanted, 1 << 20))
            self.at_end = not chunk
            chunks.append(chunk)
            wanted -= len(chunk)
        return b"".join(chunks)

    def problem(self) -> str | None:
        """After the whole output was read: the command's failure, if it failed."""
        if not self.at_end:
            return None
        try:
            code = self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return f"pipe:{self.command}: did not exit within {self.timeout:g}s of closing its output"
        if code == 0:
            return None
        self._stderr.seek(0)
        tail = self._stderr.read()[-400:].decode("utf-8", errors="replace").strip()
        return f"pipe:{self.command}: exited with status {code}" + (f": {tail}" if tail else "")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # stopped early (e.g. the report found its members): no need for the rest
        self.process.wait()
        self.process.stdout.close()
        self._stderr.close()


@contextmanager
def _open_pipe(command: str, timeouts: Timeouts) -> Iterator[_PipeReader]:
    reader = _PipeReader(command, timeouts)
    try:
        yield reader
    finally:
        reader.close()


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


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records on the TarFile how its member list ended: at the end-of-archive blocks, or cut short."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            # tarfile stops at the first zero block; a complete archive has a second one.
            second = tar.fileobj.read(tarfile.BLOCKSIZE)
            tar.dedup_complete = len(second) == tarfile.BLOCKSIZE and not second.strip(b"\0")
            raise
        except tarfile.HeaderError:
            tar.dedup_complete = False  # cut at a header boundary, or a garbage header: tarfile just stops
            raise


class ShardStream:
    """The samples of one shard; after iterating, `failure` says whether the shard was read to its end.

    Iterating never raises for a broken shard: the samples read before the
    break are yielded, and `failure` holds the status and message.
    """

    def __init__(self, url: str, shard_index: int, timeouts: Timeouts = DEFAULT_TIMEOUTS,
                 defer_images: bool = False) -> None:
        self.url, self.shard_index, self.timeouts = url, shard_index, timeouts
        # Local uncompressed tars only: headers are read, image data is seeked past (RawSample.deferred).
        self.defer_images = defer_images
        self.failure: ShardFailure | None = None
        self.samples_read = 0
        self.repeated_keys = 0  # samples whose key appeared earlier in this shard
        self.repeated_members = 0  # member names repeated inside one sample (each started a new sample)
        self._key_counts: dict[str, int] = {}

    def __iter__(self) -> Iterator[RawSample]:
        self.failure, self.samples_read, self._key_counts = None, 0, {}
        self.repeated_keys = self.repeated_members = 0
        try:
            with open_shard(self.url, self.timeouts) as stream:
                try:
                    yield from self._samples(stream)
                except (tarfile.TarError, EOFError) as exc:
                    self._fail(_status_of(exc), f"{type(exc).__name__}: {exc}")
                self._check_command(stream)
        except ShardOpenError as exc:
            self._fail(exc.status, exc.message)
        except TimeoutError:
            self._fail(SHARD_TIMEOUT, f"{self.url}: no data for {self.timeouts.read:g}s (stalled)")
        except (OSError, HTTPException) as exc:
            self._fail(_status_of(exc), f"{self.url}: {type(exc).__name__}: {exc}")

    def _samples(self, stream: IO[bytes]) -> Iterator[RawSample]:
        seekable = self.defer_images and not is_remote(self.url) and _plain_tar(stream)
        # Seekable mode seeks past member data; its end and cut checks are tarfile.next()'s, as in stream mode.
        with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|*", tarinfo=_EndCheckingTarInfo) as tar:
            plain = seekable or getattr(tar.fileobj, "comptype", None) == "tar"
            source = os.path.abspath(self.url) if seekable else None
            for key, files in self._group_members(tar, source, plain):
                yield self._sample(key, files)
            if not getattr(tar, "dedup_complete", False):
                self._fail(SHARD_TRUNCATED, "the tar ends without its end-of-archive blocks (cut at a member boundary)")

    def _check_command(self, stream: IO[bytes]) -> None:
        """A `pipe:` command that failed explains the broken tar better than the tar error does."""
        problem = getattr(stream, "problem", lambda: None)()
        if problem:
            self._fail(SHARD_UNREADABLE, problem)

    def _sample(self, key: str, files: dict[str, Any]) -> RawSample:
        sample = _make_sample(self.url, self.shard_index, self.samples_read, key, files)
        sample.occurrence = self._key_counts.get(key, 0)
        self._key_counts[key] = sample.occurrence + 1
        self.repeated_keys += sample.occurrence > 0
        self.samples_read += 1
        return sample

    def _fail(self, status: str, message: str) -> None:
        if status == SHARD_TRUNCATED or self.samples_read:
            message = f"{message}; {self.samples_read} samples read before it"
        self.failure = ShardFailure(status, message, self.samples_read)

    def _group_members(self, tar: tarfile.TarFile, source: str | None,
                       plain: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (key, {ext: payload}) for consecutive members sharing a key, as webdataset groups them.

        A payload is the member's bytes, a message (too large), or with `source` (seekable, deferred images)
        an image's `_Located`; `plain` (an uncompressed tar) records where each image's data starts.
        """
        current_key: str | None = None
        files: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if key.startswith("__") or not ext:
                continue
            if key != current_key or ext in files:
                if current_key is not None:
                    yield current_key, files
                self.repeated_members += key == current_key
                current_key, files = key, {}
            files[ext] = _member_payload(tar, member, ext, source, plain)
        if current_key is not None:
            yield current_key, files


def _status_of(exc: BaseException) -> str:
    text = str(exc).lower()
    # IncompleteRead: the server closed before Content-Length bytes; the others: tarfile/gzip data cut short.
    cut = isinstance(exc, (EOFError, IncompleteRead)) or "unexpected end" in text or "ended before" in text
    return SHARD_TRUNCATED if cut else SHARD_UNREADABLE


def read_shard(url: str, shard_index: int, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Iterator[RawSample]:
    """Stream the samples of one shard; a shard not read to its end ends with a `shard_error` sample."""
    stream = ShardStream(url, shard_index, timeouts)
    yield from stream
    if stream.failure is not None:
        position = stream.samples_read
        yield RawSample(
            shard_index, url, position, f"__shard_error_{position}",
            failure=("shard_error", f"shard {stream.failure.status}: {stream.failure.message}"),
        )


@dataclass(frozen=True)
class _Located:
    """An image member's data: its bytes (None while deferred) and where it starts in an uncompressed tar."""

    data: bytes | None
    offset: int | None
    deferred: tuple[str, int, int] | None = None


def _plain_tar(stream: IO[bytes]) -> bool:
    """A local file that starts with a ustar header (not compressed, and seekable): read in seekable mode."""
    try:
        head = os.pread(stream.fileno(), tarfile.BLOCKSIZE, 0)
    except (OSError, AttributeError, ValueError):
        return False
    return head[257:262] == b"ustar"


def _member_payload(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, source: str | None,
                    plain: bool) -> bytes | str | _Located:
    if ext not in IMAGE_EXTENSIONS or member.issparse() or member.size > MAX_IMAGE_BYTES:
        return _read_member(tar, member, ext)  # text, sparse, or the size message (nothing read)
    offset = member.offset_data if plain else None
    if source is not None:
        return _Located(None, offset, (source, member.offset_data, member.size))
    return _Located(_read_member(tar, member, ext), offset)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str) -> bytes | str:
    limit = MAX_IMAGE_BYTES if ext in IMAGE_EXTENSIONS else MAX_TEXT_BYTES
    if member.size > limit:
        return f"member {member.name!r} is {member.size:,} bytes, above the {limit:,}-byte limit"
    if not member.issparse() and tar.fileobj.tell() == member.offset_data:
        # The data follows the header in the stream: read it at once. extractfile's buffered reader
        # costs about a sixth of reading a shard; a short read is what tarfile's own reader raises on.
        data = tar.fileobj.read(member.size)
        if len(data) != member.size:
            raise tarfile.ReadError("unexpected end of data")
        return data
    handle = tar.extractfile(member)
    return handle.read() if handle else b""


def _make_sample(url: str, shard_index: int, position: int, key: str, files: dict[str, Any]) -> RawSample:
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
    elif isinstance(payload, _Located):
        sample.image_bytes, sample.image_offset, sample.deferred = payload.data, payload.offset, payload.deferred
    else:
        sample.image_bytes = payload  # a sparse member, read through tarfile: no plain offset
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


def chunked(samples: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    """Samples in lists of `size` (the last one shorter): what a decode worker gets at a time."""
    chunk: list[RawSample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
