"""Query: how many copies of X exist? X is an image file, a folder of images, a sample key or a text prompt.

Images are described with the run's own descriptor settings (run.json) and
range-searched against the run's index at the run's threshold, so the count is
exact (no top-k cap). A key is answered from clusters.parquet directly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dedup import settings as cfg
from dedup.decode import DecodeFailure, decode_image
from dedup.descriptors import DescriptorBuilder
from dedup.errors import QueryError, StoreError
from dedup.records import RunDir

MATCH_COLUMNS = ["sample_id", "key", "url", "caption", "similarity", "cluster_id"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TEXT_TOP = 50  # a prompt has no "copy" threshold; list the best-matching images


@dataclass
class QueryResult:
    query: str
    descriptor: str
    copies: int  # samples of the run above the threshold (exact copies included)
    cluster_id: int | None  # cluster of the best match
    cluster_size: int  # size of that cluster (transitive copies)
    matches: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MATCH_COLUMNS))
    error: str | None = None

    def to_dict(self, limit: int = 20) -> dict[str, Any]:
        return {
            "query": self.query,
            "descriptor": self.descriptor,
            "copies": self.copies,
            "cluster_id": self.cluster_id,
            "cluster_size": self.cluster_size,
            "error": self.error,
            "matches": self.matches.head(limit).replace({np.nan: None}).to_dict("records"),
        }


class RunIndex:
    """What a query needs from a run: config, clusters, samples, and one loaded index."""

    def __init__(self, out: str | Path, descriptor: str | None) -> None:
        self.run = RunDir(out)
        self.config = cfg.RunConfig.load(self.run)
        if not self.run.clusters.exists():
            raise StoreError(f"{self.run.root} has no clusters yet", hint=f"run 'dedup run' (or 'dedup cluster {self.run.root}') first")
        self.clusters = pd.read_parquet(self.run.clusters)
        self.by_id = self.clusters.set_index("sample_id")
        self.descriptor = descriptor or self.config.descriptors[0]
        if self.descriptor not in self.config.descriptors:
            raise QueryError(
                f"the run has no {self.descriptor!r} descriptor (it holds {self.config.descriptors})",
                hint=f"use one of {self.config.descriptors}, or embed again with '--descriptor {self.descriptor}' into a new --out",
            )
        self._index = None
        self._describer = None

    @property
    def threshold(self) -> float:
        return float(self.config.thresholds[self.descriptor])

    def index(self):
        if self._index is None:
            from dedup.records import load_embeddings
            from dedup.stages.index import load_index

            index, spec = load_index(self.run.index_dir, self.descriptor)
            ids, stored = load_embeddings(self.run, self.descriptor)
            self._index = (index, spec, ids, stored)
        return self._index

    def describer(self):
        if self._describer is None:
            options = self.config.descriptor_options.get(self.descriptor, {})
            self._describer = DescriptorBuilder(self.descriptor, options).build()
        return self._describer

    def matches_for_vectors(self, vectors: np.ndarray, threshold: float) -> list[pd.DataFrame]:
        from dedup.descriptors import query_transform_for

        index, spec, ids, stored = self.index()
        q, pos, sim = search_external(index, spec, stored, vectors, threshold, query_transform_for(self.descriptor))
        return [self._frame(ids[pos[q == i]], sim[q == i]) for i in range(len(vectors))]

    def _frame(self, sample_ids: np.ndarray, similarity: np.ndarray) -> pd.DataFrame:
        rows = self.by_id.loc[sample_ids, ["key", "url", "caption", "cluster_id"]].reset_index()
        rows["similarity"] = similarity.astype(np.float32)
        return rows[MATCH_COLUMNS].sort_values("similarity", ascending=False, ignore_index=True)

    def exact_matches(self, sha256: str) -> pd.DataFrame:
        from dedup.records import load_samples

        samples = load_samples(self.run, ["sample_id", "sha256"])
        hit = samples.loc[samples["sha256"] == sha256, "sample_id"].to_numpy()
        return self._frame(hit, np.ones(len(hit), np.float32))


# Compressed indexes (PQ) give approximate scores: search this far below the
# threshold, then re-score the candidates exactly against the stored vectors.
RERANK_MARGIN = 0.05


def search_external(index, spec, stored: np.ndarray, queries: np.ndarray, threshold: float, transform=None):
    """Every stored row within `threshold` of each query (max over the query's variants): exact, uncapped."""
    from dedup.search.faiss_index import apply_search_params

    apply_search_params(index, spec)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    variants = transform(queries) if transform is not None else queries[None]
    radius = threshold - (0.0 if spec.kind in ("flat", "ivf_flat") else RERANK_MARGIN)
    hits = []
    for variant in np.ascontiguousarray(variants, dtype=np.float32):
        lims, _, labels = index.range_search(variant, float(np.nextafter(np.float32(radius), np.float32(-1))))
        hits.append(np.stack([np.repeat(np.arange(len(variant)), np.diff(lims).astype(np.int64)), labels]))
    q, pos = np.unique(np.concatenate(hits, axis=1), axis=1) if hits else (np.zeros(0, int), np.zeros(0, int))
    exact = np.max(np.einsum("tnd,nd->tn", variants[:, q], stored[pos]), axis=0) if len(q) else np.zeros(0, np.float32)
    keep = exact >= np.float32(threshold)
    return q[keep], pos[keep], exact[keep].astype(np.float32)


def _result(name: str, run_index: RunIndex, matches: pd.DataFrame) -> QueryResult:
    if matches.empty:
        return QueryResult(name, run_index.descriptor, 0, None, 0, matches)
    best = int(matches["cluster_id"].iloc[0])
    size = int(run_index.clusters.loc[run_index.clusters["cluster_id"] == best].shape[0])
    return QueryResult(name, run_index.descriptor, int(matches["sample_id"].nunique()), best, size, matches)


def query_images(run_index: RunIndex, paths: list[Path]) -> list[QueryResult]:
    describer = run_index.describer()
    results: list[QueryResult | None] = [None] * len(paths)
    prepared, positions = [], []
    for i, path in enumerate(paths):
        try:
            data = path.read_bytes()
            prepared.append(describer.prepare(decode_image(data, describer.min_side).image))
            positions.append((i, hashlib.sha256(data).hexdigest()))
        except (OSError, DecodeFailure) as exc:
            message = exc.message if isinstance(exc, DecodeFailure) else str(exc)
            results[i] = QueryResult(str(path), run_index.descriptor, 0, None, 0, error=message)
    if prepared:
        vectors = describer.embed(np.stack(prepared))
        for (i, digest), matches in zip(positions, run_index.matches_for_vectors(vectors, run_index.threshold), strict=True):
            merged = pd.concat([run_index.exact_matches(digest), matches]).drop_duplicates("sample_id")
            results[i] = _result(str(paths[i]), run_index, merged.sort_values("similarity", ascending=False, ignore_index=True))
    return [r for r in results if r is not None]


def query_key(run_index: RunIndex, key: str) -> QueryResult:
    rows = run_index.clusters[run_index.clusters["key"] == key]
    if rows.empty:
        raise QueryError(f"no sample with key {key!r} in {run_index.run.root}", hint="keys are the tar member names without extension")
    cluster_id = int(rows["cluster_id"].iloc[0])
    members = run_index.clusters[run_index.clusters["cluster_id"] == cluster_id]
    matches = members.assign(similarity=members["similarity_to_representative"])[MATCH_COLUMNS]
    matches = matches.sort_values("similarity", ascending=False, ignore_index=True)
    return QueryResult(f"key:{key}", "clusters", len(members), cluster_id, len(members), matches)


def query_text(run_index: RunIndex, text: str) -> QueryResult:
    if run_index.descriptor != "clip":
        raise QueryError(
            "text queries need CLIP embeddings, and this run has none selected",
            hint="embed with '--descriptor clip' and pass '--descriptor clip' to the query",
        )
    vector = run_index.describer().embed_text([text])
    index, _spec, ids, _ = run_index.index()
    scores, positions = index.search(vector.astype(np.float32), min(TEXT_TOP, len(ids)))
    keep = positions[0] >= 0
    matches = run_index._frame(ids[positions[0][keep]], scores[0][keep])
    best = int(matches["cluster_id"].iloc[0]) if len(matches) else None
    size = int((run_index.clusters["cluster_id"] == best).sum()) if best is not None else 0
    return QueryResult(f"text:{text}", "clip", size, best, size, matches)


def query(out: str | Path, *, image: Path | None = None, images: Path | None = None, key: str | None = None,
          text: str | None = None, descriptor: str | None = None) -> list[QueryResult]:
    chosen = [name for name, value in (("--image", image), ("--images", images), ("--key", key), ("--text", text)) if value]
    if len(chosen) != 1:
        raise QueryError("give exactly one of --image, --images, --key, --text", hint="e.g. dedup query OUT --image photo.jpg")
    run_index = RunIndex(out, "clip" if text and descriptor is None else descriptor)
    if key is not None:
        return [query_key(run_index, key)]
    if text is not None:
        return [query_text(run_index, text)]
    if image is not None:
        if not image.is_file():
            raise QueryError(f"{image} is not a file", hint="pass an image path, or --images DIR for a folder")
        return query_images(run_index, [image])
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if images and images.is_dir() else []
    if not files:
        raise QueryError(f"no images found in {images}", hint=f"the folder must hold files ending in {sorted(IMAGE_SUFFIXES)}")
    return query_images(run_index, files)


def print_results(results: list[QueryResult], console: Console, limit: int = 20) -> None:
    for result in results:
        if result.error:
            console.print(f"[red]{escape(result.query)}: {escape(result.error)}[/]")
            continue
        console.print(f"[bold]{escape(result.query)}[/]: {result.copies} copies above threshold "
                      f"({result.descriptor}); best match's cluster has {result.cluster_size} members")
        table = Table("similarity", "key", "caption", "url")
        for row in result.matches.head(limit).itertuples():
            # Keys, captions and URLs are web content: plain Text, never console markup.
            table.add_row(f"{row.similarity:.3f}", Text(str(row.key)), Text(str(row.caption or "")[:50]), Text(str(row.url or "")[:60]))
        if len(result.matches):
            console.print(table)
