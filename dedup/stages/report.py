"""Report stage: one self-contained HTML file showing what is duplicated and how.

`write_report(out)` writes `OUT/report/index.html`: summary numbers, a ranked
gallery of the most-copied images, inline-SVG plots and one section per top
cluster. Everything is inline (CSS, SVG, thumbnails as `data:` URIs), so the
file opens from disk with no server and no network.

Captions, URLs, keys and JSON come from the web: every value goes through
`html.escape` (attributes too), URLs are shown as text and never become links
or image sources, and a Content-Security-Policy forbids any network load or
script other than the report's own, should an escape ever be missed.

Only the shown samples' images are read back, grouped by shard: from a local
uncompressed tar each at the offset the samples table records (one read), and
where that is missing or its bytes are no longer the ones the run hashed, by a
header scan (data is seeked past); remote shards are streamed with
`read_shard`. Every image shown has the sha256 the run recorded for its sample.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from rich.markup import escape

from dedup.console import terminal_safe
from dedup.decode import OK, DecodeFailure, decode_image
from dedup.errors import StoreError
from dedup.records import RunDir, fingerprint, make_sample_id, read_shards, split_sample_id, write_table, write_text
from dedup.stages.guidance import distinct_edges, lowest_similarity, threshold_guidance_section
from dedup.stages.overrides import overrides_section
from dedup.stages.rank import url_domain
from dedup.stages.read import MAX_IMAGE_BYTES, is_remote, read_shard, split_member_name

THUMB_SIDE = 128
THUMB_QUALITY = 70
MAX_CAPTION_CHARS = 300
MAX_URL_CHARS = 200
MAX_KEY_CHARS = 120
# Copies shown next to the representative in the gallery (the cluster's own section shows more).
GALLERY_COPIES = 4
# Domain names listed per cluster in the gallery; the count is always exact.
GALLERY_DOMAINS = 4
# Shards beyond this are grouped into equal runs of consecutive shards in the per-shard plot.
MAX_SHARD_BARS = 120
SIMILARITY_BINS = 40
SHOWN_SHARD_SPECS = 5
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069]")

# Counts images that really decoded, for the headless-browser test and for anyone reading the DOM.
_LOAD_SCRIPT = (
    "window.addEventListener('load',function(){var imgs=document.images,n=0;"
    "for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){n++;}}"
    "document.body.setAttribute('data-loaded-images',String(n));"
    "document.body.setAttribute('data-total-images',String(imgs.length));});"
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_LOAD_SCRIPT.encode()).digest()).decode()
# No network, no plugins, no injected script: only data: images, inline style and our own script.
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)


# ====================================================================== thumbnails


@dataclass(frozen=True)
class Thumbnail:
    """A shown sample's small image, or why there is none."""

    image: Image.Image | None
    problem: str | None = None


@dataclass(frozen=True)
class _Wanted:
    sample_id: int
    member_key: tuple[str, str]  # (key, lower-case extension), as the shard reader names members
    sha256: str | None = None  # of the bytes the run read: what is shown must be those bytes
    offset: int | None = None  # where the member's data starts in an uncompressed tar
    size: int | None = None


_THUMBNAIL_COLUMNS = ["shard_index", "image_member", "status", "error", "sha256", "image_offset", "image_bytes"]
CHANGED = "the image in the shard is not the one the run read (its sha256 differs: the shard changed since the run)"


def read_thumbnails(out: str | Path, sample_ids: Iterable[int], side: int = THUMB_SIDE) -> dict[int, Thumbnail]:
    """Thumbnails (longest side <= `side`) of the given samples, read back from their shards.

    Every requested id gets an entry: a sample whose image cannot be read, or whose bytes are no longer
    the ones the run hashed, gets `Thumbnail(None, reason)` instead of raising.
    """
    run = RunDir(out)
    wanted_ids = sorted({int(i) for i in sample_ids})
    samples = sample_rows(run, wanted_ids, _THUMBNAIL_COLUMNS).set_index("sample_id")
    shards = read_shards(run)
    shard_urls = dict(zip(shards["shard_index"].astype(int), shard_locations(shards), strict=False))
    result = {i: Thumbnail(None, "sample not in the samples table") for i in wanted_ids if i not in samples.index}
    by_shard: dict[int, list[_Wanted]] = {}
    for sample_id, row in samples.iterrows():
        problem = _unreadable_reason(row)
        if problem:
            result[int(sample_id)] = Thumbnail(None, problem)
            continue
        by_shard.setdefault(int(row["shard_index"]), []).append(_wanted(int(sample_id), row))
    for shard_index, wanted in by_shard.items():
        url = shard_urls.get(shard_index)
        if url is None:
            result.update({w.sample_id: Thumbnail(None, f"shard {shard_index} is not in shards.parquet") for w in wanted})
            continue
        result.update(_thumbnails_from_shard(url, shard_index, wanted, side))
    return result


def _wanted(sample_id: int, row: pd.Series) -> _Wanted:
    sha256 = row["sha256"] if isinstance(row["sha256"], str) and row["sha256"] else None
    offset, size = _optional_int(row["image_offset"]), _optional_int(row["image_bytes"])
    return _Wanted(sample_id, split_member_name(str(row["image_member"])), sha256, offset, size)


def _optional_int(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def shard_locations(shards: pd.DataFrame) -> list[str]:
    """Where to read each shard from: the resolved `location` recorded by the run, whatever the working
    directory is now; runs recorded before that column existed fall back to the given `url`."""
    if "location" not in shards.columns:
        return shards["url"].astype(str).tolist()
    return [loc if isinstance(loc, str) and loc else str(url) for loc, url in zip(shards["location"], shards["url"], strict=False)]


def sample_rows(run: RunDir, sample_ids: Sequence[int], columns: list[str]) -> pd.DataFrame:
    """`sample_id` + `columns` of the given samples, reading only their shards' samples parts.

    A column that a part does not have (written by an older dedup) comes back null.
    """
    by_shard: dict[int, list[int]] = {}
    for sample_id in sample_ids:
        by_shard.setdefault(split_sample_id(int(sample_id))[0], []).append(int(sample_id))
    frames = [pd.DataFrame({"sample_id": pd.Series(dtype="int64"), **{c: pd.Series(dtype="object") for c in columns}})]
    for shard_index, ids in sorted(by_shard.items()):
        part = run.samples_part(shard_index)
        if part.exists():
            present = [c for c in columns if c in pq.read_schema(part).names]
            frame = pd.read_parquet(part, columns=["sample_id", *present], filters=[("sample_id", "in", ids)])
            frames.append(frame.reindex(columns=["sample_id", *columns]))
    return pd.concat(frames, ignore_index=True)


def _unreadable_reason(row: pd.Series) -> str | None:
    if row["status"] != OK:
        detail = f": {row['error']}" if isinstance(row["error"], str) and row["error"] else ""
        return f"status {row['status']}{detail}"
    if not isinstance(row["image_member"], str) or not row["image_member"]:
        return "no image member recorded"
    return None


def _thumbnails_from_shard(url: str, shard_index: int, wanted: list[_Wanted], side: int) -> dict[int, Thumbnail]:
    if is_remote(url):
        found = _image_bytes_streamed(url, shard_index, wanted)
    elif not Path(url).is_file():
        return {w.sample_id: Thumbnail(None, "shard file not found (moved since the run?)") for w in wanted}
    else:
        found = _image_bytes_local(Path(url), wanted)
    thumbs: dict[int, Thumbnail] = {}
    for item in wanted:
        payload = found.get(item.sample_id)
        if payload is None:
            thumbs[item.sample_id] = Thumbnail(None, "image member not found in its shard")
        elif isinstance(payload, str):
            thumbs[item.sample_id] = Thumbnail(None, payload)
        else:
            thumbs[item.sample_id] = make_thumbnail(payload, side)
    return thumbs


def _same_bytes(item: _Wanted, data: bytes) -> bool:
    return item.sha256 is None or hashlib.sha256(data).hexdigest() == item.sha256


def _image_bytes_local(path: Path, wanted: list[_Wanted]) -> dict[int, bytes | str]:
    """Each image at its recorded offset (one read, its sha256 checked); the rest by a header scan."""
    found: dict[int, bytes | str] = {}
    try:
        with open(path, "rb") as handle:
            for item in wanted:
                data = _at_offset(handle, item)
                if data is not None:
                    found[item.sample_id] = data
    except OSError as exc:
        return {w.sample_id: f"shard unreadable: {type(exc).__name__}: {exc}" for w in wanted}
    rest = [w for w in wanted if w.sample_id not in found]
    return found | (_scanned(path, rest) if rest else {})


def _at_offset(handle, item: _Wanted) -> bytes | None:
    """The member's bytes read at the run's offset, or None where there is none or they are not the same bytes
    (a shard rewritten since the run: the scan looks for the member by name instead)."""
    if item.offset is None or item.size is None or item.sha256 is None:
        return None
    if item.offset < 0 or not 0 <= item.size <= MAX_IMAGE_BYTES:
        return None  # not what the embed stage writes: the scan decides
    data = os.pread(handle.fileno(), item.size, item.offset)
    return data if len(data) == item.size and _same_bytes(item, data) else None


def _scanned(path: Path, wanted: list[_Wanted]) -> dict[int, bytes | str]:
    """Scan a local tar's headers (data is seeked past) and extract the wanted members.

    A key can repeat in a shard (keys are web data): a member goes to the wanted sample of that name whose
    sha256 it has, so one sample is never shown with another's image.
    """
    pending: dict[tuple[str, str], list[_Wanted]] = {}
    for item in wanted:
        pending.setdefault(item.member_key, []).append(item)
    found: dict[int, bytes | str] = {}
    changed: set[int] = set()
    try:
        with tarfile.open(path, "r:*") as tar:
            while pending:
                member = tar.next()
                if member is None:
                    break
                name = split_member_name(member.name)
                items = pending.get(name) if member.isfile() else None
                if items:
                    _assign(_member_bytes(tar, member), items, found, changed)
                    if not items:
                        del pending[name]
    except (tarfile.TarError, OSError, EOFError) as exc:
        # Members already read stay; the rest report the broken shard.
        message = f"shard unreadable: {type(exc).__name__}: {exc}"
        found.update({w.sample_id: message for w in wanted if w.sample_id not in found})
    found.update({i: CHANGED for i in changed if i not in found})
    return found


def _assign(payload: bytes | str, items: list[_Wanted], found: dict[int, bytes | str], changed: set[int]) -> None:
    """Give a scanned member to the first pending sample of its name it belongs to (same sha256)."""
    for item in items:
        if isinstance(payload, str) or _same_bytes(item, payload):
            found[item.sample_id] = payload
            items.remove(item)
            return
    changed.update(item.sample_id for item in items)


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | str:
    if member.size > MAX_IMAGE_BYTES:
        return f"image member is {member.size:,} bytes, above the {MAX_IMAGE_BYTES:,}-byte limit"
    handle = tar.extractfile(member)
    return handle.read() if handle else "image member is not a regular file"


def _image_bytes_streamed(url: str, shard_index: int, wanted: list[_Wanted]) -> dict[int, bytes | str]:
    """Stream a remote shard once, keeping only the wanted samples' image bytes."""
    by_id = {w.sample_id: w for w in wanted}
    found: dict[int, bytes | str] = {}
    samples = read_shard(url, shard_index)
    try:
        for sample in samples:
            if sample.failure and sample.failure[0] == "shard_error":
                found.update({i: sample.failure[1] for i in by_id if i not in found})
                break
            item = by_id.get(make_sample_id(shard_index, sample.position))
            # Position and member name must both agree with the run's record, as in the local lookup.
            if item and sample.image_bytes is not None and split_member_name(sample.image_member or "") == item.member_key:
                found[item.sample_id] = sample.image_bytes if _same_bytes(item, sample.image_bytes) else CHANGED
            if item:
                found.setdefault(item.sample_id, "image member not found in its shard")
            if len(found) == len(by_id):
                break
    finally:
        samples.close()  # stop the download as soon as every wanted sample is in
    return found


def make_thumbnail(image_bytes: bytes, side: int = THUMB_SIDE) -> Thumbnail:
    """Decode untrusted bytes safely (size guards of dedup.decode) and shrink to `side`."""
    try:
        decoded = decode_image(image_bytes, target_side=side)
    except DecodeFailure as failure:
        return Thumbnail(None, f"{failure.status}: {failure.message}")
    image = decoded.image.copy()
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return Thumbnail(image)


@dataclass(frozen=True)
class EncodedThumbnail:
    """A thumbnail as the page shows it (a JPEG data: URI and its size), or why there is none: what a
    report-thumbnails task hands to the step that writes the page."""

    src: str | None
    width: int = 0
    height: int = 0
    problem: str | None = None


def encode_thumbnail(thumb: Thumbnail) -> EncodedThumbnail:
    if thumb.image is None:
        return EncodedThumbnail(None, problem=thumb.problem)
    return EncodedThumbnail(thumbnail_data_uri(thumb.image), thumb.image.width, thumb.image.height)


def thumbnail_data_uri(image: Image.Image, quality: int = THUMB_QUALITY) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ====================================================================== loading the run


# Rows per batch when streaming the large tables (clusters, remove_keys): bounded memory at any run size.
SCAN_BATCH_ROWS = 262_144


@dataclass
class _ClusterScan:
    """What the report needs from clusters.parquet, gathered in one streaming pass."""

    copies_distribution: pd.Series
    duplicates_per_shard: np.ndarray
    samples_in_duplicates: int
    top_members: pd.DataFrame  # every row of the shown clusters


@dataclass
class _RunTables:
    config: dict[str, Any]
    shards: pd.DataFrame
    statuses: pd.Series  # samples per status
    ranking: pd.DataFrame  # the first `top` rows of top_duplicates.parquet
    duplicate_cluster_count: int
    removed: pd.Series | None  # dropped samples per reason; None before manifests are written
    clusters: _ClusterScan


def _load_run(run: RunDir, top: int, order: str = "copies") -> _RunTables:
    needed = (
        (run.run_config, f"dedup run SHARDS --out {run.root}"),
        (run.clusters, f"dedup cluster {run.root}"),
        (run.top_duplicates, f"dedup rank {run.root}"),
    )
    for path, command in needed:
        if not path.exists():
            raise StoreError(f"{run.root} has no {path.name}", hint=f"run '{command}' first")
    config = json.loads(run.run_config.read_text())
    shards = read_shards(run)
    ranking = gallery_rows(run.top_duplicates, top, order)
    parts = sorted((run.root / "samples").glob("samples_*.parquet"))
    if not parts:
        raise StoreError(f"{run.root} has no samples table", hint=f"run 'dedup embed SHARDS --out {run.root}' first")
    return _RunTables(
        config=config,
        shards=shards,
        statuses=_count_values(parts, "status"),
        ranking=ranking,
        duplicate_cluster_count=pq.ParquetFile(run.top_duplicates).metadata.num_rows,
        removed=_count_values([run.remove_keys], "reason") if run.remove_keys.exists() else None,
        clusters=_scan_clusters(run.clusters, set(ranking["cluster_id"].astype(int)), len(shards)),
    )


def gallery_rows(path: Path, top: int, order: str) -> pd.DataFrame:
    """The `top` clusters the gallery shows: by copies (the file's rank order) or by memorisation risk."""
    from dedup.stages.rank import check_order

    if check_order(order) == "copies" or "risk" not in pq.read_schema(path).names:
        return _first_rows(path, top).sort_values("rank").reset_index(drop=True)
    chosen = _riskiest(path, top)
    rows = pd.read_parquet(path, filters=[("cluster_id", "in", chosen)]) if chosen else _first_rows(path, 0)
    return rows.set_index("cluster_id").loc[chosen].reset_index()[rows.columns] if chosen else rows


def _riskiest(path: Path, top: int) -> list[int]:
    """Cluster ids of the `top` riskiest clusters (ties: the better rank), streamed: O(top + batch) rows held."""
    best = pd.DataFrame({"cluster_id": [], "risk": [], "rank": []})
    for batch in pq.ParquetFile(path).iter_batches(batch_size=SCAN_BATCH_ROWS, columns=["cluster_id", "risk", "rank"]):
        best = pd.concat([best, batch.to_pandas()], ignore_index=True) if len(best) else batch.to_pandas()
        best = best.sort_values(["risk", "rank"], ascending=[False, True]).head(top)
    return [int(i) for i in best["cluster_id"]]


def _first_rows(path: Path, count: int) -> pd.DataFrame:
    """The first `count` rows of a Parquet file, reading no further than needed."""
    frames, rows = [], 0
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=max(1, min(count, SCAN_BATCH_ROWS))):
        if rows >= count:
            break
        frames.append(batch.to_pandas())
        rows += batch.num_rows
    if not frames:
        return parquet.schema_arrow.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True).head(count)


def _count_values(paths: Sequence[Path], column: str) -> pd.Series:
    counts = pd.Series(dtype="int64")
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=SCAN_BATCH_ROWS, columns=[column]):
            counts = counts.add(batch.column(0).to_pandas().value_counts(), fill_value=0)
    return counts.astype("int64").sort_values(ascending=False)


def _scan_clusters(path: Path, top_ids: set[int], shard_count: int) -> _ClusterScan:
    distribution = pd.Series(dtype="int64")
    per_shard = np.zeros(shard_count, dtype=np.int64)
    in_duplicates = 0
    kept: list[pd.DataFrame] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=SCAN_BATCH_ROWS):
        frame = batch.to_pandas()
        distribution = distribution.add(copies_distribution(frame), fill_value=0)
        per_shard += duplicates_per_shard(frame, shard_count)
        in_duplicates += int((frame["cluster_size"] >= 2).sum())
        kept.append(frame[frame["cluster_id"].isin(top_ids)])
    members = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=pq.read_schema(path).names)
    return _ClusterScan(distribution.astype("int64").sort_index(), per_shard, in_duplicates, members)


# ====================================================================== text helpers


def _text(value: object, limit: int = MAX_CAPTION_CHARS) -> str:
    """Untrusted value -> escaped, bounded text (missing values show as a dash)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "&mdash;"
    text = _CONTROL_CHARS.sub("", str(value))
    if len(text) > limit:
        text = text[:limit] + "\u2026"
    return html.escape(text, quote=True)


def _number(value: object) -> str:
    return f"{int(value):,}" if value is not None and not pd.isna(value) else "&mdash;"


def _known_size(width: object, height: object) -> tuple[int, int] | None:
    if width is None or height is None or pd.isna(width) or pd.isna(height):
        return None
    return int(width), int(height)


def _size(width: object, height: object) -> str:
    size = _known_size(width, height)
    return f"{size[0]}&times;{size[1]}" if size else "&mdash;"


# ====================================================================== summary


def _summary_section(tables: _RunTables) -> str:
    statuses = tables.statuses
    total = int(statuses.sum())
    rows = [
        ("samples", _number(total)),
        ("decoded ok", _number(int(statuses.get(OK, 0)))),
        ("failed", _number(total - int(statuses.get(OK, 0)))),
        ("shards", _number(len(tables.shards))),
        ("duplicate clusters (2+ copies)", _number(tables.duplicate_cluster_count)),
        ("samples in duplicate clusters", _number(tables.clusters.samples_in_duplicates)),
        ("duplicates to remove", _removed_count(tables.removed, "duplicate")),
        ("failed samples to remove", _removed_count(tables.removed, "status:")),
    ]
    facts = "".join(f"<div class='fact'><div class='value'>{v}</div><div class='label'>{k}</div></div>" for k, v in rows)
    return (
        "<section id='summary'><h2>Summary</h2>"
        f"<div class='facts'>{facts}</div>"
        "<div class='two'>"
        f"<div><h3>Samples by status</h3>{_status_table(statuses)}</div>"
        f"<div><h3>Descriptors and thresholds</h3>{_settings_table(tables.config)}</div>"
        "</div></section>"
    )


def _removed_count(removed: pd.Series | None, reason_prefix: str) -> str:
    if removed is None:
        return "<span class='muted'>no manifests yet</span>"
    return _number(int(removed[removed.index.astype(str).str.startswith(reason_prefix)].sum()))


def _status_table(statuses: pd.Series) -> str:
    body = "".join(
        f"<tr><td>{_text(status)}</td><td class='num'>{_number(count)}</td></tr>"
        for status, count in statuses.sort_values(ascending=False).items()
    )
    return f"<table class='grid'><tr><th>status</th><th>samples</th></tr>{body}</table>"


def _settings_table(config: dict[str, Any]) -> str:
    def setting(kind: str, name: str) -> str:
        value = (config.get(kind) or {}).get(name)
        return _text(value) if value is not None else "&mdash;"

    rows = "".join(
        f"<tr><td>{_text(name)}</td><td class='num'>{setting('thresholds', name)}</td>"
        f"<td class='num'>{setting('guards', name)}</td><td class='num'>{setting('search_thresholds', name)}</td></tr>"
        for name in config.get("descriptors") or []
    )
    keep = _text(config.get("keep", "first"))
    all_specs = config.get("shard_specs") or []
    specs = "<br>".join(_text(spec, MAX_URL_CHARS) for spec in all_specs[:SHOWN_SHARD_SPECS])
    if len(all_specs) > SHOWN_SHARD_SPECS:
        specs += f"<br>&hellip; and {len(all_specs) - SHOWN_SHARD_SPECS:,} more"
    return (
        "<table class='grid'><tr><th>descriptor</th><th>threshold</th><th>guard</th><th>searched from</th></tr>"
        f"{rows}</table><p class='muted'>keep policy: <b>{keep}</b></p>"
        f"<p class='muted small'>shard specs:<br>{specs or '&mdash;'}</p>"
    )


# ====================================================================== choosing what to show


def _shown_members(members: pd.DataFrame, copies_shown: int) -> pd.DataFrame:
    """The representative, then copies spread evenly over the similarity range.

    Evenly spaced picks show both the closest copies and the most different
    ones, which is what tells a reader how far the cluster stretches.
    """
    representative = members[members["is_representative"]]
    others = members[~members["is_representative"]].sort_values(
        ["similarity_to_representative", "sample_id"], ascending=[False, True]
    )
    slots = max(0, copies_shown - len(representative))
    if len(others) > slots:
        picks = np.unique(np.linspace(0, len(others) - 1, num=slots).round().astype(int)) if slots else []
        others = others.iloc[picks]
    return pd.concat([representative, others])


def _top_clusters(run: RunDir, tables: _RunTables, copies_shown: int) -> list[tuple[Any, pd.DataFrame, pd.DataFrame]]:
    """(ranking row, shown members with their sizes, all members) per top cluster, in rank order."""
    members = tables.clusters.top_members
    groups = dict(iter(members.groupby("cluster_id"))) if len(members) else {}
    shown = {cluster_id: _shown_members(group, copies_shown) for cluster_id, group in groups.items()}
    shown_ids = [int(i) for group in shown.values() for i in group["sample_id"]]
    sizes = sample_rows(run, shown_ids, ["width", "height", "original_width", "original_height"])
    return [
        (row, shown[row.cluster_id].merge(sizes, on="sample_id", how="left"), groups[row.cluster_id])
        for row in tables.ranking.itertuples()
        if row.cluster_id in groups
    ]


# ====================================================================== gallery and sections


class _ThumbnailHtml:
    """`<img>` (data: URI) or placeholder markup per sample, each image encoded once though shown twice."""

    def __init__(self, thumbs: dict[int, Thumbnail] | dict[int, EncodedThumbnail]) -> None:
        self.thumbs = thumbs
        self._markup: dict[int, str] = {}

    def __call__(self, sample_id: int, alt: str) -> str:
        sample_id = int(sample_id)
        if sample_id not in self._markup:
            self._markup[sample_id] = self._render(self.thumbs.get(sample_id))
        return self._markup[sample_id].replace("alt=''", f"alt='{alt}'", 1)

    @staticmethod
    def _render(thumb: Thumbnail | EncodedThumbnail | None) -> str:
        encoded = encode_thumbnail(thumb) if isinstance(thumb, Thumbnail) else thumb
        if encoded is None or encoded.src is None:
            reason = encoded.problem if encoded is not None and encoded.problem else "image not read"
            return (f"<div class='thumb placeholder' role='img' title='{_text(reason)}'>"
                    f"<span>{_text(reason, 140)}</span></div>")
        return f"<img class='thumb' alt='' width='{encoded.width}' height='{encoded.height}' src='{encoded.src}'>"


def _domains(members: pd.DataFrame) -> list[str]:
    # Not Series.map: it turns the None of a missing URL into NaN, which is truthy and does not sort with str.
    return sorted({d for d in map(url_domain, members["url"].tolist()) if isinstance(d, str) and d})


def _gallery_card(row: Any, shown: pd.DataFrame, members: pd.DataFrame, thumb: _ThumbnailHtml) -> str:
    representative = shown.loc[shown["is_representative"], "sample_id"]
    rep_html = thumb(representative.iloc[0], "representative") if len(representative) else ""
    copies = shown.loc[~shown["is_representative"], "sample_id"].head(GALLERY_COPIES)
    strip = "".join(thumb(sample_id, "copy") for sample_id in copies)
    domains = _domains(members)
    domain_list = ", ".join(_text(d, 60) for d in domains[:GALLERY_DOMAINS])
    more = f" +{len(domains) - GALLERY_DOMAINS}" if len(domains) > GALLERY_DOMAINS else ""
    rank = int(row.rank)
    return (
        f"<article class='card'><a class='rank' href='#cluster-{rank}'>#{rank}</a>"
        f"<div class='rep'>{rep_html}</div>"
        f"<div class='copies-strip'>{strip}</div>"
        f"<div class='count'><b>{_number(row.copies)}</b> copies</div>"
        f"<div class='caption'>{_text(row.representative_caption, 140)}</div>"
        "<dl class='stats'>"
        f"<dt>captions</dt><dd>{_number(row.distinct_captions)}</dd>"
        f"<dt>domains</dt><dd>{_number(row.url_domains)}</dd>"
        f"<dt>shards</dt><dd>{_number(row.shards_spanned)}</dd>{_risk_stats(row)}</dl>"
        f"<div class='domains small'>{domain_list}{more}</div>"
        f"<a class='more' href='#cluster-{rank}'>see how the copies differ &rarr;</a></article>"
    )


def _risk_stats(row: Any) -> str:
    """Verbatim copies and memorisation risk (top_duplicates files older than these columns show none)."""
    if not hasattr(row, "risk"):
        return ""
    return f"<dt>verbatim</dt><dd>{_number(row.verbatim_copies)}</dd><dt>risk</dt><dd>{float(row.risk):.2f}</dd>"


def _member_figure(member: Any, thumb: _ThumbnailHtml) -> str:
    original = ""
    source_size = _known_size(member.original_width, member.original_height)
    if source_size and source_size != _known_size(member.width, member.height):
        original = f" <span class='muted'>(source {_size(*source_size)})</span>"
    similarity = member.similarity_to_representative
    similarity_text = "&mdash;" if pd.isna(similarity) else f"{float(similarity):.3f}"
    badge = "<span class='badge'>representative</span>" if member.is_representative else ""
    return (
        f"<figure class='member'>{thumb(member.sample_id, 'copy')}<figcaption>{badge}"
        f"<div><span class='k'>key</span> <code>{_text(member.key, MAX_KEY_CHARS)}</code></div>"
        f"<div><span class='k'>similarity</span> {similarity_text} <span class='k'>by</span> {_text(member.matched_by, 40)}</div>"
        f"<div><span class='k'>size</span> {_size(member.width, member.height)}{original}</div>"
        f"<div><span class='k'>domain</span> {_text(url_domain(member.url), 80)}</div>"
        f"<div class='caption'>{_text(member.caption)}</div>"
        f"<div class='url small'>{_text(member.url, MAX_URL_CHARS)}</div>"
        "</figcaption></figure>"
    )


def _cluster_section(row: Any, shown: pd.DataFrame, total: int, thumb: _ThumbnailHtml) -> str:
    figures = "".join(_member_figure(member, thumb) for member in shown.itertuples())
    count = f"{len(shown)} of {_number(total)} members shown" if len(shown) < total else f"all {len(shown)} members"
    return (
        f"<section class='cluster' id='cluster-{int(row.rank)}'>"
        f"<h3>#{int(row.rank)} &middot; {_number(row.copies)} copies "
        f"<span class='muted small'>cluster {int(row.cluster_id)} &middot; {count}, closest to most different "
        f"&middot; <a href='#gallery'>back to gallery</a></span></h3>"
        f"<div class='members'>{figures}</div></section>"
    )


# ====================================================================== SVG plots


@dataclass(frozen=True)
class _Scale:
    low: float
    high: float
    start: float  # pixel position of `low`
    end: float  # pixel position of `high`
    log: bool = False
    integer: bool = False  # ticks only at whole numbers (counts, indices)

    def __call__(self, value: float) -> float:
        low, high, v = (math.log10(self.low), math.log10(self.high), math.log10(value)) if self.log else (self.low, self.high, value)
        span = (high - low) or 1.0
        return self.start + (v - low) / span * (self.end - self.start)


_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 560, 300, 64, 16, 28, 48


def _ticks(scale: _Scale) -> list[float]:
    low, high = scale.low, scale.high
    if scale.log:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        # Few decades: 2x and 5x ticks too, so short axes still have a few labels.
        mantissas = (1, 2, 5) if len(decades) <= 3 else (1,)
        return [m * 10.0**e for e in decades for m in mantissas if low <= m * 10.0**e <= high * 1.0001]
    # A "nice" step (1, 2 or 5 times a power of ten) giving about five ticks.
    raw = ((high - low) or 1.0) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(nice * magnitude for nice in (1, 2, 5, 10) if nice * magnitude >= raw)
    if scale.integer:
        step = max(1.0, round(step))
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _tick_label(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:g}"


def _axes(x: _Scale, y: _Scale, x_label: str, y_label: str, title: str) -> list[str]:
    parts = [
        f"<text x='{_W / 2}' y='16' class='title' text-anchor='middle'>{html.escape(title)}</text>",
        f"<line x1='{_LEFT}' y1='{_H - _BOTTOM}' x2='{_W - _RIGHT}' y2='{_H - _BOTTOM}' class='axis'/>",
        f"<line x1='{_LEFT}' y1='{_TOP}' x2='{_LEFT}' y2='{_H - _BOTTOM}' class='axis'/>",
        f"<text x='{(_LEFT + _W - _RIGHT) / 2}' y='{_H - 10}' text-anchor='middle'>{html.escape(x_label)}</text>",
        f"<text transform='translate(14,{(_TOP + _H - _BOTTOM) / 2}) rotate(-90)' text-anchor='middle'>{html.escape(y_label)}</text>",
    ]
    for tick in _ticks(x):
        px = x(tick)
        parts.append(f"<line x1='{px:.1f}' y1='{_H - _BOTTOM}' x2='{px:.1f}' y2='{_H - _BOTTOM + 4}' class='axis'/>"
                     f"<text x='{px:.1f}' y='{_H - _BOTTOM + 16}' text-anchor='middle'>{_tick_label(tick)}</text>")
    for tick in _ticks(y):
        py = y(tick)
        parts.append(f"<line x1='{_LEFT}' y1='{py:.1f}' x2='{_W - _RIGHT}' y2='{py:.1f}' class='gridline'/>"
                     f"<text x='{_LEFT - 6}' y='{py + 4:.1f}' text-anchor='end'>{_tick_label(tick)}</text>")
    return parts


def _svg(parts: Sequence[str], label: str) -> str:
    body = "".join(parts)
    return f"<svg class='plot' viewBox='0 0 {_W} {_H}' role='img' aria-label='{html.escape(label, quote=True)}'>{body}</svg>"


def _empty_plot(title: str, message: str) -> str:
    return _svg([f"<text x='{_W / 2}' y='16' class='title' text-anchor='middle'>{html.escape(title)}</text>",
                 f"<text x='{_W / 2}' y='{_H / 2}' text-anchor='middle' class='muted'>{html.escape(message)}</text>"], title)


def copies_distribution(clusters: pd.DataFrame) -> pd.Series:
    """Number of distinct images (clusters) per copy count, singletons included.

    Counted on representatives (one per cluster), so it can be summed over
    batches of clusters.parquet.
    """
    sizes = clusters.loc[clusters["is_representative"], "cluster_size"].astype("int64")
    return sizes.value_counts().sort_index()


def _copies_plot(distribution: pd.Series) -> str:
    title = "Copies per image (log-log)"
    if distribution.empty:
        return _empty_plot(title, "no samples")
    xs, ys = distribution.index.to_numpy(float), distribution.to_numpy(float)
    # Lower bounds just under 1 keep the many "1 image, 1 copy" points off the axis lines.
    x = _Scale(0.8, max(10.0, xs.max() * 1.25), _LEFT, _W - _RIGHT, log=True)
    y = _Scale(0.7, max(10.0, ys.max() * 1.5), _H - _BOTTOM, _TOP, log=True)
    parts = _axes(x, y, "copies of an image", "images with that many copies", title)
    for copies, count in zip(xs, ys, strict=True):
        parts.append(f"<circle cx='{x(copies):.1f}' cy='{y(count):.1f}' r='4' class='dot'>"
                     f"<title>{int(count):,} images with {int(copies):,} copies</title></circle>")
    return _svg(parts, title)


def duplicates_per_shard(clusters: pd.DataFrame, shard_count: int) -> np.ndarray:
    """Per shard: members of duplicate clusters other than the representative (the removable copies)."""
    extra = clusters.loc[(clusters["cluster_size"] >= 2) & ~clusters["is_representative"], "shard_index"]
    return np.bincount(extra.to_numpy(np.int64), minlength=shard_count)[:shard_count]


def _shard_plot(counts: np.ndarray) -> str:
    title = "Duplicate copies per shard"
    if counts.size == 0:
        return _empty_plot(title, "no shards")
    group = math.ceil(counts.size / MAX_SHARD_BARS)
    if group > 1:  # many shards: one bar per run of `group` consecutive shards, showing their mean
        padded = np.pad(counts.astype(float), (0, group * math.ceil(counts.size / group) - counts.size), constant_values=np.nan)
        counts = np.nanmean(padded.reshape(-1, group), axis=1)
        title += f" (mean per shard over runs of {group})"
    x = _Scale(-0.5, counts.size - 0.5, _LEFT, _W - _RIGHT, integer=True)
    y = _Scale(0, max(1.0, float(counts.max()) * 1.1), _H - _BOTTOM, _TOP, integer=True)
    parts = _axes(x, y, "shard index" if group == 1 else f"shard index / {group}", "copies beyond the first", title)
    width = max(1.0, (x(1) - x(0)) * 0.85)
    for index, value in enumerate(counts):
        top = y(float(value))
        label = f"shard {index}" if group == 1 else f"shards {index * group}-{index * group + group - 1}"
        parts.append(f"<rect x='{x(index) - width / 2:.1f}' y='{top:.1f}' width='{width:.1f}' height='{y(0) - top:.1f}' class='bar'>"
                     f"<title>{label}: {value:g}</title></rect>")
    return _svg(parts, title)


def similarity_histogram(run: RunDir, descriptor: str, low: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges, counts) of the stored neighbour similarities, each pair counted once.

    Streamed (`guidance.distinct_edges`): one pass finds the lowest similarity, a second adds each batch
    to the fixed bins, so memory is O(batch + bins) however many pairs are stored.
    """
    with distinct_edges(run, descriptor) as passes:
        lowest = lowest_similarity(passes)
        if lowest is None:
            return np.array([]), np.array([])
        start = min(low if low is not None else lowest, lowest)
        edges = np.linspace(start, 1.0, SIMILARITY_BINS + 1) if start < 1.0 else np.array([start - 0.01, 1.0])
        counts = np.zeros(len(edges) - 1, dtype=np.int64)
        for records in passes():
            similarity = records["s"].astype(np.float64)
            counts += np.histogram(np.clip(similarity, edges[0], edges[-1]), bins=edges)[0]
    return edges, counts


def _similarity_plot(run: RunDir, descriptor: str, config: dict[str, Any]) -> str:
    title = f"Neighbour similarity: {descriptor}"
    edges, counts = similarity_histogram(run, descriptor, (config.get("search_thresholds") or {}).get(descriptor))
    if counts.size == 0:
        return _empty_plot(title, "no neighbour pairs stored for this descriptor")
    x = _Scale(float(edges[0]), float(edges[-1]), _LEFT, _W - _RIGHT)
    y = _Scale(0, max(1.0, float(counts.max()) * 1.1), _H - _BOTTOM, _TOP, integer=True)
    parts = _axes(x, y, "similarity", "pairs", title)
    for left, right, count in zip(edges[:-1], edges[1:], counts, strict=True):
        top = y(float(count))
        parts.append(f"<rect x='{x(left):.1f}' y='{top:.1f}' width='{max(0.5, x(right) - x(left) - 1):.1f}' "
                     f"height='{y(0) - top:.1f}' class='bar'><title>{left:.3f}-{right:.3f}: {int(count):,}</title></rect>")
    threshold = (config.get("thresholds") or {}).get(descriptor)
    if isinstance(threshold, (int, float)) and edges[0] <= threshold <= edges[-1]:
        px = x(float(threshold))
        # Label on the side with more room, so it never runs off the plot.
        right_half = px > (_LEFT + _W - _RIGHT) / 2
        label_x, anchor = (px - 4, "end") if right_half else (px + 4, "start")
        parts.append(f"<line x1='{px:.1f}' y1='{_TOP}' x2='{px:.1f}' y2='{_H - _BOTTOM}' class='cut'/>"
                     f"<text x='{label_x:.1f}' y='{_TOP + 12}' text-anchor='{anchor}' class='cut-label'>"
                     f"threshold {float(threshold):g}</text>")
    return _svg(parts, title)


def _plots_section(run: RunDir, tables: _RunTables) -> str:
    descriptors = [str(d) for d in tables.config.get("descriptors") or []]
    plots = [_copies_plot(tables.clusters.copies_distribution), _shard_plot(tables.clusters.duplicates_per_shard)]
    plots += [_similarity_plot(run, name, tables.config) for name in descriptors]
    return "<section id='plots'><h2>Distributions</h2><div class='plots'>" + "".join(plots) + "</div></section>"


# ====================================================================== page


_CSS = """
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1d2330;background:#f4f5f8}
header{background:#1d2a44;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#c5cee0}
nav{margin-top:8px}nav a{color:#9fc2ff;margin-right:16px;text-decoration:none}
main{padding:8px 28px 40px;max-width:1500px}h2{margin:28px 0 12px;font-size:19px}h3{font-size:15px;margin:16px 0 8px}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.fact{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0002}
.fact .value{font-size:22px;font-weight:600}.fact .label{color:#5b6478;font-size:12px}
.two{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:24px}
table.grid{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
table.grid td,table.grid th{padding:4px 12px;border-bottom:1px solid #e4e7ee;text-align:left}td.num{text-align:right}
.muted{color:#6b7385}.small{font-size:12px}code{font-size:12px;background:#eef0f5;padding:0 3px;border-radius:3px;word-break:break-all}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.card{background:#fff;border-radius:10px;padding:12px;box-shadow:0 1px 3px #0002;position:relative}
.card .rank{position:absolute;top:8px;left:10px;background:#1d2a44;color:#fff;border-radius:12px;padding:1px 9px;text-decoration:none;font-weight:600}
.card .rep{display:flex;justify-content:center;min-height:128px;align-items:center}
.copies-strip{display:flex;gap:4px;margin:8px 0;min-height:52px}.copies-strip .thumb{width:52px;height:52px;object-fit:cover}
.copies-strip .placeholder span{display:none}
.count{font-size:18px}.caption{overflow-wrap:anywhere;margin:4px 0}
.stats{display:grid;grid-template-columns:auto 1fr auto 1fr auto 1fr;gap:0 6px;margin:6px 0;font-size:12px}.stats dt{color:#6b7385}.stats dd{margin:0;font-weight:600}
.domains{color:#3c5a8a;overflow-wrap:anywhere}.more{display:inline-block;margin-top:6px;color:#2456b3;text-decoration:none}
.thumb{max-width:128px;max-height:128px;border-radius:4px;background:#dde1ea;display:block}
.placeholder{width:128px;height:96px;display:flex;align-items:center;justify-content:center;text-align:center;
 background:repeating-linear-gradient(45deg,#f3e3e3,#f3e3e3 8px,#fbeeee 8px,#fbeeee 16px);color:#8a2b2b;font-size:11px;padding:6px;overflow:hidden;border:1px dashed #c88}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px}
.plot{background:#fff;border-radius:8px;box-shadow:0 1px 2px #0002;width:100%;height:auto;font-size:11px}
.plot .axis{stroke:#5b6478}.plot .gridline{stroke:#e4e7ee}.plot .dot{fill:#2456b3;opacity:.8}.plot .bar{fill:#4a7bd0}
.plot .title{font-size:13px;font-weight:600}.plot .cut{stroke:#d0463b;stroke-dasharray:4 3;stroke-width:2}.plot .cut-label{fill:#d0463b}
.plot text{fill:#39404f}
.cluster{background:#fff;border-radius:10px;padding:4px 14px 14px;margin:16px 0;box-shadow:0 1px 3px #0002}
.cluster h3 a{color:#2456b3}.members{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.member{margin:0;padding:8px;border:1px solid #e4e7ee;border-radius:6px}.member figcaption{font-size:12px;margin-top:6px}
.member .k{color:#6b7385}.url{color:#6b7385;overflow-wrap:anywhere}
.badge{background:#2f8f4e;color:#fff;border-radius:8px;padding:0 7px;font-size:11px}
"""


def _page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='referrer' content='no-referrer'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{subtitle}</p>"
        "<nav><a href='#summary'>Summary</a><a href='#gallery'>Most duplicated</a><a href='#plots'>Distributions</a>"
        "<a href='#clusters'>Clusters in detail</a></nav></header>"
        f"<main>{''.join(sections)}</main><script>{_LOAD_SCRIPT}</script></body></html>"
    )


@dataclass(frozen=True)
class ThumbnailCount:
    """Shown samples whose image could be read back, and why the others could not."""

    shown: int
    missing: int
    reasons: Counter

    def warning(self) -> str | None:
        if not self.missing:
            return None
        reason, count = self.reasons.most_common(1)[0]
        return (f"{self.missing:,} of {self.shown:,} thumbnails could not be read and show as placeholders "
                f"(most common, {count:,}x: {reason})")


def count_thumbnails(thumbs: dict[int, Thumbnail] | dict[int, EncodedThumbnail]) -> ThumbnailCount:
    missing = (t for t in thumbs.values() if (t.image if isinstance(t, Thumbnail) else t.src) is None)
    problems = [t.problem or "image not read" for t in missing]
    # The reason's kind, not its per-sample detail: "status decode_error: ..." -> "status decode_error".
    return ThumbnailCount(len(thumbs), len(problems), Counter(p.split(":", 1)[0][:120] for p in problems))


def build_report_html(out: str | Path, top: int = 50, copies_shown: int = 12, order: str = "copies") -> str:
    """The report as one HTML string (see `write_report`); `order` = copies | risk for the gallery."""
    return _build_report(out, top, copies_shown, order)[0]


def _build_report(out: str | Path, top: int, copies_shown: int, order: str = "copies",
                  thumbs: dict[int, EncodedThumbnail] | None = None) -> tuple[str, ThumbnailCount]:
    """The page and its thumbnail count; `thumbs` (read by the report-thumbnails tasks) or, when
    None, the shown samples' images read here."""
    run = RunDir(out)
    tables = _load_run(run, top, order)
    clusters = _top_clusters(run, tables, copies_shown)
    if thumbs is None:
        thumbs = read_thumbnails(run.root, [int(i) for _, shown, _ in clusters for i in shown["sample_id"]])
    thumb = _ThumbnailHtml(thumbs)
    cards = "".join(_gallery_card(row, shown, members, thumb) for row, shown, members in clusters)
    sections = "".join(_cluster_section(row, shown, len(members), thumb) for row, shown, members in clusters)
    total = tables.duplicate_cluster_count
    gallery_note = f"top {len(clusters)} of {total:,} duplicate clusters" if clusters else "no duplicate clusters found"
    subtitle = f"{int(tables.statuses.sum()):,} samples in {len(tables.shards):,} shards &middot; {gallery_note}"
    document = _page(
        "dedup report",
        subtitle,
        [
            _summary_section(tables),
            (
                f"<section id='gallery'><h2>Most duplicated images <span class='muted small'>{gallery_note}</span></h2>"
                f"<div class='gallery'>{cards}</div></section>"
            ),
            _plots_section(run, tables),
            overrides_section(run),
            threshold_guidance_section(run, tables.config),
            f"<section id='clusters'><h2>Clusters in detail</h2>{sections}</section>",
        ],
    )
    return document, count_thumbnails(thumbs)


def write_report(out: str | Path, top: int = 50, copies_shown: int = 12, order: str = "copies", log=None,
                 thumbs: dict[int, EncodedThumbnail] | None = None) -> Path:
    """Write `OUT/report/index.html`, a single self-contained file, and return its path.

    `log` (a rich Console) gets a warning when shown thumbnails could not be read
    (shards moved or unreachable since the run): the report is written anyway.
    """
    run = RunDir(out)
    document, thumbnails = _build_report(run.root, top, copies_shown, order, thumbs)
    path = run.report_dir / "index.html"
    write_text(document, path)
    warning = thumbnails.warning()
    if warning and log is not None:
        log.print(f"[yellow]warning:[/] {escape(terminal_safe(warning))}", soft_wrap=True)
    return path


# ====================================================================== the stage, as engine tasks
#
# `report_stage` runs three steps behind the run's engine, so that with --engine ray the images are
# read on the cluster, shard by shard:
#   report-plan        one task: the shown samples (top clusters' ids from top_duplicates.parquet, their
#                      members read from clusters.parquet with a filter on cluster_id, four columns);
#   report-thumbnails  one task per shard holding shown samples: their thumbnails, encoded as the page
#                      shows them, to a scratch file (OUT/_scratch/report/thumbs_<shard>.parquet);
#   report             one task: the page, as `write_report` builds it, with those thumbnails.
# The page equals `write_report`'s for the same run (tests/test_report.py checks it byte for byte).

_PLAN_COLUMNS = ["sample_id", "cluster_id", "is_representative", "similarity_to_representative"]
_THUMBS = pa.schema([("sample_id", pa.int64()), ("src", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                     ("problem", pa.string())])


def shown_sample_ids(run: RunDir, top: int, copies_shown: int, order: str = "copies") -> list[int]:
    """The samples whose thumbnails the page shows, as `_top_clusters` chooses them (same function)."""
    ranking = gallery_rows(run.top_duplicates, top, order)
    wanted = [int(i) for i in ranking["cluster_id"]]
    if not wanted:
        return []
    members = pq.read_table(run.clusters, columns=_PLAN_COLUMNS, filters=[("cluster_id", "in", wanted)]).to_pandas()
    groups = dict(iter(members.groupby("cluster_id")))
    return [int(i) for cluster_id in wanted if cluster_id in groups
            for i in _shown_members(groups[cluster_id], copies_shown)["sample_id"]]


class _ReportStep:
    """What the three steps share: the run, the page's options, one fingerprint, scratch paths."""

    name = "report-step"

    def __init__(self, run: RunDir, top: int = 50, copies_shown: int = 12, order: str = "copies") -> None:
        self.run_dir, self.top, self.copies_shown, self.order = run, top, copies_shown, order

    def fingerprint(self) -> str:
        inputs = [self.run_dir.clusters, self.run_dir.top_duplicates, self.run_dir.run_config, self.run_dir.overrides,
                  *self.run_dir.root.glob("neighbors/*/part_*.parquet")]
        return fingerprint(inputs, {"top": self.top, "copies_shown": self.copies_shown, "order": self.order})

    def scratch(self, name: str) -> Path:
        return self.run_dir.scratch_dir("report") / name

    def shown(self) -> pd.DataFrame:
        """The plan: `sample_id` and `shard_index` of every shown sample (empty before the plan ran)."""
        path = self.scratch("shown.parquet")
        return pd.read_parquet(path) if path.exists() else pd.DataFrame({"sample_id": [], "shard_index": []}, dtype="int64")

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class PlanStep(_ReportStep):
    name = "report-plan"

    def task_ids(self) -> list[str]:
        return ["0"]

    def reset(self) -> None:
        import shutil

        shutil.rmtree(self.run_dir.scratch_dir("report"), ignore_errors=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        ids = np.array(shown_sample_ids(self.run_dir, self.top, self.copies_shown, self.order), dtype=np.int64)
        write_table(pd.DataFrame({"sample_id": ids, "shard_index": ids >> 32}), self.scratch("shown.parquet"))
        return {"shown": len(ids)}


class ThumbnailStep(_ReportStep):
    """One task per shard with shown samples: their thumbnails -> a scratch file."""

    name = "report-thumbnails"

    def task_ids(self) -> list[str]:
        return [str(i) for i in sorted(set(self.shown()["shard_index"].astype(int)))]

    def reset(self) -> None:
        for path in self.run_dir.scratch_dir("report").glob("thumbs_*.parquet"):
            path.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        shown = self.shown()
        ids = shown.loc[shown["shard_index"] == int(task_id), "sample_id"].astype(int).tolist()
        encoded = {i: encode_thumbnail(t) for i, t in read_thumbnails(self.run_dir.root, ids).items()}
        rows = [{"sample_id": i, "src": e.src, "width": e.width, "height": e.height, "problem": e.problem}
                for i, e in encoded.items()]
        write_table(pa.Table.from_pylist(rows, schema=_THUMBS), self.scratch(f"thumbs_{task_id}.parquet"))
        progress(len(rows))
        return {"thumbnails": len(rows), "missing": sum(e.src is None for e in encoded.values())}


class ReportStage(_ReportStep):
    """The last step, one task: clusters + ranking + the tasks' thumbnails -> report/index.html."""

    name = "report"

    def task_ids(self) -> list[str]:
        return ["0"]

    def reset(self) -> None:
        (self.run_dir.report_dir / "index.html").unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        path = write_report(self.run_dir, top=self.top, copies_shown=self.copies_shown, order=self.order,
                            log=getattr(self.run_dir, "console", None), thumbs=self._thumbnails())
        return {"report_bytes": path.stat().st_size}

    def _thumbnails(self) -> dict[int, EncodedThumbnail]:
        shown = self.shown()
        thumbs: dict[int, EncodedThumbnail] = {}
        for shard_index in sorted(set(shown["shard_index"].astype(int))):
            # Rows as Python values: a missing src or problem stays None (pandas would make it NaN).
            for row in pq.read_table(self.scratch(f"thumbs_{shard_index}.parquet")).to_pylist():
                thumbs[row["sample_id"]] = EncodedThumbnail(row["src"], row["width"], row["height"], row["problem"])
        lost = set(shown["sample_id"].astype(int)) - set(thumbs)
        if lost:
            raise StoreError(f"{len(lost)} shown samples have no thumbnail in {self.scratch('')}",
                             hint="rerun the same command: the report steps redo what is missing")
        return thumbs


def forget_lost_outputs(run: RunDir, **steps) -> list[str]:
    """Remove the markers of report steps whose files are gone (the page deleted, the scratch cleaned up or
    lost in a crash), so that those tasks run again; returns their names. A lost plan redoes every thumbnail
    (the shards follow the plan); a lost thumbnail file redoes its shard's task."""
    from dedup.engine import done_task_ids, forget_tasks

    final, plan, thumbs = ReportStage(run, **steps), PlanStep(run, **steps), ThumbnailStep(run, **steps)
    if (run.report_dir / "index.html").exists() and run.marker(final.name, "0").exists():
        return []  # done: nothing needs the scratch
    lost = [(final.name, "0")]
    if not plan.scratch("shown.parquet").exists():
        lost += [(plan.name, "0"), *((thumbs.name, task) for task in done_task_ids(run, thumbs.name))]
    else:
        lost += [(thumbs.name, task) for task in thumbs.task_ids() if not thumbs.scratch(f"thumbs_{task}.parquet").exists()]
    return forget_tasks(run, lost)


def report_stage(run: RunDir, top: int = 50, order: str = "copies") -> Path:
    """Write the report behind the engine (plan, thumbnails per shard, page); returns its path."""
    from dedup.engine import run_stage
    from dedup.stages.rank import check_order

    steps = {"top": top, "order": check_order(order)}
    forget_lost_outputs(run, **steps)
    run_stage(run, PlanStep(run, **steps))
    run_stage(run, ThumbnailStep(run, **steps), unit="thumbnails")
    run_stage(run, ReportStage(run, **steps))
    return run.report_dir / "index.html"
