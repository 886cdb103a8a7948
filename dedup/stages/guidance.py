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
"""

from __future__ import annotations

import html
import itertools
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dedup.records import RunDir

CURVE_POINTS = 24
BANDS = 6
PAIRS_PER_BAND = 3


def stored_edges(run: RunDir, descriptor: str) -> pd.DataFrame:
    """Every stored pair once: id_a, id_b, similarity (empty when the descriptor has no edges)."""
    parts = sorted(run.neighbors_dir(descriptor).glob("part_*.parquet"))
    if not parts:
        return pd.DataFrame({"id_a": pd.Series(dtype="int64"), "id_b": pd.Series(dtype="int64"),
                             "similarity": pd.Series(dtype="float32")})
    edges = pd.concat([pq.read_table(p, columns=["id_a", "id_b", "similarity"]).to_pandas() for p in parts])
    return edges.sort_values("similarity", ascending=False).drop_duplicates(["id_a", "id_b"], ignore_index=True)


def _exact_pairs(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    from dedup.records import load_samples

    samples = load_samples(run, ["sample_id", "sha256"]).dropna(subset=["sha256"])
    first = samples.groupby("sha256")["sample_id"].transform("min")
    joined = samples[samples["sample_id"] != first]
    return first[joined.index].to_numpy(np.int64), joined["sample_id"].to_numpy(np.int64)


def removal_curve(edges: pd.DataFrame, exact: tuple[np.ndarray, np.ndarray], cuts: np.ndarray) -> np.ndarray:
    """Samples removed (one kept per connected group) at each cut, edges >= cut plus identical bytes.

    One pass from the highest cut down (Kruskal's order): each step joins only the edges between
    it and the previous cut, on the groups found so far, so the cost is O(edges + cuts * nodes).
    """
    from dedup.search.union_find import connected_components

    ids = np.unique(np.concatenate([edges["id_a"].to_numpy(np.int64), edges["id_b"].to_numpy(np.int64), *exact]))
    a = np.searchsorted(ids, edges["id_a"].to_numpy(np.int64))
    b = np.searchsorted(ids, edges["id_b"].to_numpy(np.int64))
    similarity = edges["similarity"].to_numpy(np.float32)
    labels = connected_components(len(ids), np.searchsorted(ids, exact[0]), np.searchsorted(ids, exact[1]))
    removed = np.zeros(len(cuts), dtype=np.int64)
    done = np.zeros(len(similarity), dtype=bool)
    for position in np.argsort(-np.asarray(cuts, dtype=np.float64), kind="stable"):
        step = ~done & (similarity >= np.float32(cuts[position]))
        labels = connected_components(len(ids), labels[a[step]], labels[b[step]])[labels]
        done |= step
        removed[position] = len(ids) - len(np.unique(labels))
    return removed


def band_pairs(edges: pd.DataFrame, low: float, bands: int = BANDS, per_band: int = PAIRS_PER_BAND) -> list[tuple[float, float, pd.DataFrame]]:
    """(band low, band high, up to `per_band` pairs spread evenly over the band) from `low` to 1."""
    limits = np.linspace(low, 1.0, bands + 1)
    result = []
    for left, right in itertools.pairwise(limits):
        last = right >= 1.0
        inside = edges[(edges["similarity"] >= left) & ((edges["similarity"] <= right) if last else (edges["similarity"] < right))]
        inside = inside.sort_values(["similarity", "id_a", "id_b"], ignore_index=True)
        if len(inside) > per_band:
            inside = inside.iloc[np.unique(np.linspace(0, len(inside) - 1, per_band).round().astype(int))]
        result.append((float(left), float(right), inside))
    return result


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

    edges = stored_edges(run, descriptor)
    if edges.empty:
        return f"<h3>{html.escape(descriptor)}</h3><p class='muted'>no neighbour pairs stored</p>"
    low = float((config.get("search_thresholds") or {}).get(descriptor, edges["similarity"].min()))
    threshold = (config.get("thresholds") or {}).get(descriptor)
    cuts = np.linspace(low, 1.0, CURVE_POINTS)
    curve = _curve_svg(descriptor, cuts, removal_curve(edges, _exact_pairs(run), cuts), threshold)
    bands = band_pairs(edges, low)
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
