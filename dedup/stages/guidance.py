"""Threshold guidance: the report's "Choosing a threshold" section, one block per descriptor.

CLIP and precomputed embeddings cannot be calibrated offline here (no labelled copies, no
weights), so the report lets the user pick a cut by looking:

- a curve of removals against the cut, computed from the stored neighbour edges (everything
  from the search threshold up): at cut t, every edge with similarity >= t plus the
  identical-bytes groups are joined and removals = samples in groups - groups. It leaves out
  the chaining guard, so it is an upper bound on what `dedup cluster --threshold NAME=t`
  removes; the run's own cut is marked;
- sample pairs from each similarity band (PAIRS_PER_BAND per band, spread evenly over the
  band), side by side, so the user sees what a pair at 0.93 looks like against one at 0.97.

Edges are streamed, never held (`distinct_edges`: batches of EDGE_BATCH_ROWS, repeats removed
through hash partitions spilled to OUT/_scratch/report). The curve is exact: its nodes come from the
cluster stage's out-of-core builder, and its union-find parent is a memory map in the same scratch
when it is large beside the run's budget (removals are counted as merges, never by a scan of all
nodes); the band pairs are exact up to BAND_SAMPLE_ROWS pairs a band, and beyond it the lowest and
highest pair stay exact while the middle ones come from a uniform sample of that many pairs (a pair
near the same rank, not the very one).
"""

from __future__ import annotations

import html
import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dedup.records import RunDir

CURVE_POINTS = 24
BANDS = 6
PAIRS_PER_BAND = 3

# Memory is O(EDGE_BATCH_ROWS) for the edges, whatever their number: parts are read in batches of this
# many rows, and above it the pairs are de-duplicated through hash partitions of about this many rows
# spilled to the run's scratch folder. The removal curve adds O(samples) union-find state (a memory map when large).
EDGE_BATCH_ROWS = 1 << 20
# Pairs kept per band to pick the shown ones from: up to this many in a band, the shown pairs are exactly
# the evenly spread ones of all its pairs; above it the first and last are still exact (the band's lowest
# and highest pair) and the middle ones come from a uniform sample of this many (a pair near that rank).
BAND_SAMPLE_ROWS = 1 << 16

# One stored pair: sample ids (or node indices once mapped) and the similarity as stored (float32).
EDGE = np.dtype([("a", "<i8"), ("b", "<i8"), ("s", "<f4")])
EdgePasses = Callable[[], Iterable[np.ndarray]]  # a fresh pass over the pairs, EDGE records a batch at a time


def edge_part_paths(run: RunDir, descriptor: str) -> list[Path]:
    return sorted(run.neighbors_dir(descriptor).glob("part_*.parquet"))


def _read_batches(paths: list[Path], batch_rows: int) -> Iterator[np.ndarray]:
    for path in paths:
        handle = pq.ParquetFile(path)
        for batch in handle.iter_batches(batch_size=batch_rows, columns=["id_a", "id_b", "similarity"]):
            records = np.empty(batch.num_rows, dtype=EDGE)
            for field, column in zip(EDGE.names, batch.columns, strict=True):
                records[field] = column.to_numpy(zero_copy_only=False)
            yield records


def _distinct(records: np.ndarray) -> np.ndarray:
    """Each (a, b) once, with its highest similarity (a pair can be stored from both ends, in two parts)."""
    records = records[np.lexsort((-records["s"], records["b"], records["a"]))]
    first = np.ones(len(records), dtype=bool)
    first[1:] = (records["a"][1:] != records["a"][:-1]) | (records["b"][1:] != records["b"][:-1])
    return records[first]


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A splitmix64 hash of each pair: spill partitions, and the priorities of the band samples."""
    x = a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ b.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _Spill:
    """EDGE records appended to `count` raw files under `folder`, read back one file at a time."""

    def __init__(self, folder: Path, count: int) -> None:
        self.paths = [folder / f"{i}.edges" for i in range(count)]
        for path in self.paths:
            path.touch()

    def add(self, which: np.ndarray, records: np.ndarray) -> None:
        order = np.argsort(which, kind="stable")
        which, records = which[order], records[order]
        bounds = np.searchsorted(which, np.arange(len(self.paths) + 1))
        for i in np.flatnonzero(np.diff(bounds)):
            with open(self.paths[i], "ab") as handle:  # open per write: thousands of partitions, few handles
                records[bounds[i] : bounds[i + 1]].tofile(handle)

    def replace(self, i: int, records: np.ndarray) -> None:
        records.tofile(self.paths[i])

    def read(self, i: int, chunk_rows: int) -> Iterator[np.ndarray]:
        rows = self.paths[i].stat().st_size // EDGE.itemsize
        for start in range(0, rows, chunk_rows):
            yield np.fromfile(self.paths[i], dtype=EDGE, count=min(chunk_rows, rows - start),
                              offset=start * EDGE.itemsize)


@contextmanager
def distinct_edges(run: RunDir, descriptor: str, batch_rows: int | None = None) -> Iterator[EdgePasses]:
    """Passes over the descriptor's stored pairs, each pair once, never more than about `batch_rows` held.

    Up to `batch_rows` pairs in all they are read once and held; above, one read spills them to hash
    partitions (a pair and its repeats land in the same one), each then de-duplicated in place, and
    every pass reads the partitions back in chunks.
    """
    batch_rows = batch_rows or EDGE_BATCH_ROWS
    paths = edge_part_paths(run, descriptor)
    total = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    if total <= batch_rows:
        held = _distinct(np.concatenate([np.empty(0, dtype=EDGE), *_read_batches(paths, batch_rows)]))
        yield lambda: iter([held])
        return
    folder = run.scratch_dir("report")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edges-", dir=folder) as tmp:
        spill = _Spill(Path(tmp), -(-total // batch_rows))
        for records in _read_batches(paths, batch_rows):
            spill.add(_mix(records["a"], records["b"]) % np.uint64(len(spill.paths)), records)
        for i in range(len(spill.paths)):  # about batch_rows pairs each (hash-spread): read whole, repeats meet
            spill.replace(i, _distinct(np.concatenate([np.empty(0, dtype=EDGE), *spill.read(i, 4 * batch_rows)])))
        yield lambda: (chunk for i in range(len(spill.paths)) for chunk in spill.read(i, batch_rows))


def lowest_similarity(passes: EdgePasses) -> float | None:
    """The lowest stored similarity (None when there is no pair)."""
    lows = [float(records["s"].min()) for records in passes() if len(records)]
    return min(lows) if lows else None


@contextmanager
def run_nodes(run: RunDir, memory_bytes: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(every sample id, sorted; each node's identical-bytes head) as read-only memory maps, valid inside the with.

    Identical bytes of any status count (a failed decode of an ok sample's bytes is still a copy); the
    grouping is the cluster stage's out-of-core one (`dedup.stages.cluster.build_nodes`: prefixes
    hash-partitioned into buckets within `memory_bytes`, candidates verified on the full sha256). The maps
    live in a temporary folder under the report's scratch, removed on exit.
    """
    from dedup.settings import DEFAULT_MEMORY
    from dedup.stages.cluster import build_nodes

    folder = run.scratch_dir("report")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nodes-", dir=folder) as tmp:
        nodes, _ = build_nodes(run, Path(tmp), memory_bytes or DEFAULT_MEMORY, require_ok=False)
        yield nodes.ids, nodes.head


def exact_joins(head: np.ndarray, block_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(head, node) node indices of every node joined to another's identical bytes, a block of nodes at a time."""
    block_rows = block_rows or EDGE_BATCH_ROWS
    for start in range(0, len(head), block_rows):
        block = np.asarray(head[start : start + block_rows])
        joined = np.flatnonzero(block != np.arange(start, start + len(block)))
        yield block[joined], start + joined


# The curve's union-find parent stays in memory while it takes at most this share of the run's budget;
# above, it is an int64 memory map in the scratch folder (its pages are the page cache's, not the process's).
PARENT_BUDGET_SHARE = 4


def removal_curve(ids: np.ndarray, joins: Iterable[tuple[np.ndarray, np.ndarray]], passes: EdgePasses,
                  cuts: np.ndarray, scratch: Path, chunk_rows: int | None = None,
                  memory_bytes: int | None = None) -> np.ndarray:
    """Samples removed (one kept per connected group) at each cut, edges >= cut plus identical bytes.

    `ids`: every node's sample id, sorted (a superset of the pairs' ends: a lone node changes no count).
    `joins`: identical bytes as (node, node) index blocks joined at every cut (`exact_joins` of a head array).
    One read spills each edge, as node indices, to the band between its two nearest cuts; then the
    bands are joined from the highest cut down (Kruskal's order) on one union-find over the nodes,
    counting the merges as they happen (removals = merges): O(chunk) edges at a time, and the O(nodes)
    parent a memory map in `scratch` when it is large beside `memory_bytes`.
    """
    chunk_rows = chunk_rows or EDGE_BATCH_ROWS
    values = np.unique(np.asarray(cuts, dtype=np.float32))  # compared in float32, as the stored similarities
    removed = np.zeros(len(values), dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="curve-", dir=scratch) as tmp:
        parent = _parent(len(ids), Path(tmp), memory_bytes, chunk_rows)
        merged = sum(_joined(parent, a, b) for a, b in joins)
        spill = _band_spill(ids, passes, values, Path(tmp))
        for k in range(len(values) - 1, -1, -1):
            merged += sum(_joined(parent, chunk["a"], chunk["b"]) for chunk in spill.read(k, chunk_rows))
            removed[k] = merged
        del parent  # a memory map closed before its folder goes
    return removed[np.searchsorted(values, np.asarray(cuts, dtype=np.float32))]


def _parent(nodes: int, folder: Path, memory_bytes: int | None, block_rows: int) -> np.ndarray:
    """Every node its own root: in memory when small beside the budget, else an int64 memory map in `folder`."""
    from dedup.settings import DEFAULT_MEMORY

    if 8 * nodes <= (memory_bytes or DEFAULT_MEMORY) // PARENT_BUDGET_SHARE:
        return np.arange(nodes, dtype=np.int64)
    parent = np.lib.format.open_memmap(folder / "parent.npy", mode="w+", dtype=np.int64, shape=(nodes,))
    for start in range(0, nodes, block_rows):  # filled in blocks: no O(nodes) temporary
        parent[start : start + block_rows] = np.arange(start, min(start + block_rows, nodes), dtype=np.int64)
    return parent


def _joined(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> int:
    """Union the pairs; returns how many groups merged (only the pairs' roots can stop being roots)."""
    from dedup.search.union_find import _find, _union_part

    if not len(a):
        return 0
    roots = np.unique(_find(parent, np.concatenate([a, b])))
    _union_part(parent, a, b)
    return len(roots) - len(np.unique(_find(parent, roots)))


def _band_spill(ids: np.ndarray, passes: EdgePasses, values: np.ndarray, folder: Path) -> _Spill:
    """Every edge at or above the lowest cut as node indices, in band k: values[k] <= similarity < values[k + 1]."""
    spill = _Spill(folder, len(values))
    for records in passes():
        band = np.searchsorted(values, records["s"], side="right") - 1
        kept = (band >= 0) & ~np.isnan(records["s"])
        nodes = records[kept].copy()
        nodes["a"], nodes["b"] = np.searchsorted(ids, nodes["a"]), np.searchsorted(ids, nodes["b"])
        spill.add(band[kept], nodes)
    return spill


@dataclass
class _Band:
    """One similarity band's pairs as they stream by: count, lowest and highest, a bounded uniform sample."""

    left: float
    right: float
    count: int = 0
    ends: np.ndarray | None = None  # the lowest and the highest pair seen, (similarity, a, b) order
    sample: np.ndarray | None = None  # the BAND_SAMPLE_ROWS pairs of smallest hash so far
    priority: np.ndarray | None = None

    def add(self, records: np.ndarray, sample_rows: int) -> None:
        self.count += len(records)
        both = _sorted(np.concatenate([*([self.ends] if self.ends is not None else []), records]))
        self.ends = both[[0, -1]]
        rows = np.concatenate([*([self.sample] if self.sample is not None else []), records])
        priority = np.concatenate([*([self.priority] if self.priority is not None else []), _mix(records["a"], records["b"])])
        # The pairs of smallest hash: a uniform sample that does not depend on the read order.
        keep = np.lexsort((rows["b"], rows["a"], priority))[:sample_rows]
        self.sample, self.priority = rows[keep], priority[keep]

    def shown(self, per_band: int) -> pd.DataFrame:
        if not self.count:
            return pd.DataFrame({"id_a": np.zeros(0, np.int64), "id_b": np.zeros(0, np.int64),
                                 "similarity": np.zeros(0, np.float32)})
        sample = _sorted(self.sample)
        if self.count <= per_band:
            chosen = sample
        elif len(sample) == self.count:  # every pair at hand: exactly the evenly spread ranks
            chosen = sample[np.unique(np.linspace(0, self.count - 1, per_band).round().astype(int))]
        else:  # the ends exactly, the middle ones at the same quantiles of the uniform sample
            chosen = sample[np.unique(np.linspace(0, len(sample) - 1, per_band).round().astype(int))]
            chosen[0], chosen[-1] = self.ends[0], self.ends[1]
        return pd.DataFrame({"id_a": chosen["a"], "id_b": chosen["b"], "similarity": chosen["s"]})


def _sorted(records: np.ndarray) -> np.ndarray:
    return records[np.lexsort((records["b"], records["a"], records["s"]))]


def band_pairs(passes: EdgePasses, low: float, bands: int = BANDS, per_band: int = PAIRS_PER_BAND,
               sample_rows: int | None = None) -> list[tuple[float, float, pd.DataFrame]]:
    """(band low, band high, up to `per_band` pairs spread evenly over the band) from `low` to 1, in one pass.

    Exact (the evenly spread pairs of each band in (similarity, id_a, id_b) order) while a band holds at
    most `sample_rows` pairs; above, see BAND_SAMPLE_ROWS.
    """
    sample_rows = sample_rows or BAND_SAMPLE_ROWS
    limits = np.linspace(low, 1.0, bands + 1)
    states = [_Band(float(left), float(right)) for left, right in itertools.pairwise(limits)]
    for records in passes():
        similarity = records["s"]
        for (left, right), state in zip(itertools.pairwise(limits), states, strict=True):
            # As the whole-table version compared: float32 similarities against float64 limits.
            inside = (similarity >= left) & ((similarity <= right) if right >= 1.0 else (similarity < right))
            if inside.any():
                state.add(records[inside], sample_rows)
    return [(state.left, state.right, state.shown(per_band)) for state in states]


@dataclass(frozen=True)
class Guidance:
    low: float
    cuts: np.ndarray
    removed: np.ndarray
    bands: list[tuple[float, float, pd.DataFrame]]


def descriptor_guidance(run: RunDir, descriptor: str, config: dict[str, Any]) -> Guidance | None:
    """The curve and the band pairs of one descriptor, edges streamed (None when it has no stored pair)."""
    with distinct_edges(run, descriptor) as passes:
        lowest = lowest_similarity(passes)
        if lowest is None:
            return None
        low = float((config.get("search_thresholds") or {}).get(descriptor, lowest))
        cuts = np.linspace(low, 1.0, CURVE_POINTS)
        memory = config.get("memory_budget_bytes")
        scratch = run.scratch_dir("report")
        with run_nodes(run, memory) as (ids, head):
            removed = removal_curve(ids, exact_joins(head), passes, cuts, scratch, memory_bytes=memory)
        return Guidance(low, cuts, removed, band_pairs(passes, low))


# ---------------------------------------------------------------- HTML


def _curve_svg(descriptor: str, cuts: np.ndarray, removed: np.ndarray, threshold: float | None) -> str:
    from dedup.stages.report import _BOTTOM, _H, _LEFT, _RIGHT, _TOP, _W, _axes, _Scale, _svg

    title = f"Removals against threshold: {descriptor}"
    x = _Scale(float(cuts[0]), float(cuts[-1]), _LEFT, _W - _RIGHT)
    y = _Scale(0, max(1.0, float(removed.max()) * 1.1), _H - _BOTTOM, _TOP, integer=True)
    parts = _axes(x, y, "threshold (cosine similarity)", "samples removed (upper bound)", title)
    points = " ".join(f"{x(float(c)):.1f},{y(float(r)):.1f}" for c, r in zip(cuts, removed, strict=False))
    parts.append(f"<polyline points='{points}' fill='none' stroke='#2456b3' stroke-width='2'/>")
    parts += [f"<circle cx='{x(float(c)):.1f}' cy='{y(float(r)):.1f}' r='3' class='dot'><title>{float(c):.3f}: "
              f"{int(r):,} removed</title></circle>" for c, r in zip(cuts, removed, strict=False)]
    if threshold is not None and cuts[0] <= threshold <= cuts[-1]:
        px = x(float(threshold))
        parts.append(f"<line x1='{px:.1f}' y1='{_TOP}' x2='{px:.1f}' y2='{_H - _BOTTOM}' class='cut'/>"
                     f"<text x='{px - 4:.1f}' y='{_TOP + 12}' text-anchor='end' class='cut-label'>run threshold {threshold:g}</text>")
    return _svg(parts, title)


def _pair_html(pair: Any, thumb, keys: dict[int, str]) -> str:
    from dedup.stages.report import MAX_KEY_CHARS, _text

    return (f"<figure class='member'>{thumb(pair.id_a, 'copy a')}{thumb(pair.id_b, 'copy b')}"
            f"<figcaption><b>{float(pair.similarity):.3f}</b> <code>{_text(keys.get(int(pair.id_a)), MAX_KEY_CHARS)}</code>"
            f" / <code>{_text(keys.get(int(pair.id_b)), MAX_KEY_CHARS)}</code></figcaption></figure>")


def _descriptor_block(run: RunDir, descriptor: str, config: dict[str, Any]) -> str:
    from dedup.stages.report import _ThumbnailHtml, read_thumbnails, sample_rows

    guidance = descriptor_guidance(run, descriptor, config)
    if guidance is None:
        return f"<h3>{html.escape(descriptor)}</h3><p class='muted'>no neighbour pairs stored</p>"
    threshold = (config.get("thresholds") or {}).get(descriptor)
    curve = _curve_svg(descriptor, guidance.cuts, guidance.removed, threshold)
    bands = guidance.bands
    ids = sorted({int(i) for _, _, pairs in bands for i in (*pairs["id_a"], *pairs["id_b"])})
    thumb = _ThumbnailHtml(read_thumbnails(run.root, ids))
    keys = dict(zip(*sample_rows(run, ids, ["key"])[["sample_id", "key"]].to_numpy().T, strict=False))
    keys = {int(k): v for k, v in keys.items()}
    rows = "".join(
        f"<h4>{left:.3f} &ndash; {right:.3f} <span class='muted small'>{len(pairs)} shown</span></h4>"
        f"<div class='members'>{''.join(_pair_html(p, thumb, keys) for p in pairs.itertuples())}</div>"
        for left, right, pairs in reversed(bands) if len(pairs)
    )
    return f"<h3>{html.escape(descriptor)}</h3><div class='plots'>{curve}</div>{rows}"


def threshold_guidance_section(run: RunDir, config: dict[str, Any]) -> str:
    """The report section: removal curve and band samples for every descriptor of the run."""
    blocks = "".join(_descriptor_block(run, str(name), config) for name in config.get("descriptors") or [])
    return ("<section id='thresholds'><h2>Choosing a threshold <span class='muted small'>removals if every stored pair "
            "at or above the cut were joined (no chaining guard: an upper bound), and pairs from each similarity band; "
            "CLIP and precomputed embeddings are not calibrated, so look before you cut "
            "(<code>dedup cluster OUT --threshold NAME=VALUE</code>)</span></h2>"
            f"{blocks}</section>")
