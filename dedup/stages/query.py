"""Query: how many copies of X exist? X is an image file, a folder of images, a sample key or a text prompt.

Images are described with the run's own descriptor settings (run.json) and
range-searched against the run's index at the run's threshold, so the count is
exact (no top-k cap). A key is answered from clusters.parquet directly.

A run from precomputed embeddings (`dedup run --embeddings`) holds vectors that
dedup did not make: image and text queries name the open_clip model that made
them (`--model`/`--pretrained`), and its vectors must have the run's dimension.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dedup.decode import DecodeFailure, decode_image
from dedup.descriptors import DescriptorBuilder, descriptor_policy, made_outside
from dedup.errors import QueryError, StoreError
from dedup.records import FilteredRows, RunDir
from dedup.records import column as _field
from dedup.settings import Settings
from dedup.stages.read import MAX_IMAGE_BYTES

MATCH_COLUMNS = ["sample_id", "key", "url", "caption", "similarity", "cluster_id"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TEXT_TOP = 50  # best-matching images listed for a prompt (the count above --min-similarity is exact)
# Default --min-similarity of a text query: the image-text cosine LAION used to keep a caption for an
# image (LAION-400M/5B: 0.28 with ViT-B/32, 0.26 with ViT-L/14). An image above it "shows" the prompt.
TEXT_MIN_SIMILARITY = {"ViT-B-32": 0.28, "ViT-B-16": 0.28, "ViT-L-14": 0.26, "ViT-H-14": 0.26}
TEXT_MIN_SIMILARITY_OTHER = 0.28
# Stored vectors scored per matrix product in the exact text scan.
TEXT_SCAN_ROWS = 65_536


@dataclass
class QueryResult:
    query: str
    descriptor: str
    copies: int  # samples of the run above the threshold (exact copies included)
    cluster_id: int | None  # cluster of the best match
    cluster_size: int  # size of that cluster (transitive copies)
    matches: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MATCH_COLUMNS))
    error: str | None = None
    min_similarity: float | None = None  # text queries: `copies` counts images at or above it

    def to_dict(self, limit: int = 20) -> dict[str, Any]:
        return {
            "query": self.query,
            "descriptor": self.descriptor,
            "copies": self.copies,
            "cluster_id": self.cluster_id,
            "cluster_size": self.cluster_size,
            "error": self.error,
            "min_similarity": self.min_similarity,
            "matches": self.matches.head(limit).replace({np.nan: None}).to_dict("records"),
        }


class RunIndex:
    """What a query needs from a run: config, clusters and samples read by filter, and one loaded index.

    `model_options` (open_clip `model`, `pretrained`, `device`) describe queries of a descriptor made outside
    dedup (precomputed embeddings); every other descriptor is described with the run's own settings.
    """

    def __init__(self, out: str | Path, descriptor: str | None, model_options: dict[str, Any] | None = None) -> None:
        self.run = RunDir(out)
        self.config = Settings.load(self.run.run_config)
        if not self.run.clusters.exists():
            raise StoreError(f"{self.run.root} has no clusters yet", hint=f"run 'dedup run' (or 'dedup cluster {self.run.root}') first")
        self.clusters = FilteredRows(self.run.clusters)
        self.descriptor = descriptor or self.config.descriptors[0]
        if self.descriptor not in self.config.descriptors:
            raise QueryError(
                f"the run has no {self.descriptor!r} descriptor (it holds {self.config.descriptors})",
                hint=f"use one of {self.config.descriptors}, or embed again with '--descriptor {self.descriptor}' into a new --out",
            )
        self.model_options = dict(model_options or {})
        if self.model_options and not self.made_outside:
            raise QueryError(
                f"--model/--pretrained name the model of precomputed embeddings; the run's {self.descriptor!r} "
                "vectors are described with the run's own settings (run.json)",
                hint="drop --model/--pretrained (or --device)",
            )
        self._index = None
        self._stored = None
        self._describer = None

    @property
    def threshold(self) -> float:
        return float(self.config.thresholds[self.descriptor])

    def index(self):
        if self._index is None:
            from dedup.stages.index import load_index

            index, spec = load_index(self.run.index_dir, self.descriptor)
            stored = self.stored()
            self._index = (index, spec, stored.ids, stored)
        return self._index

    def stored(self):
        """The descriptor's vectors as memory maps: re-scoring reads the hit rows only."""
        if self._stored is None:
            from dedup.records import open_embeddings

            self._stored = open_embeddings(self.run, self.descriptor)
        return self._stored

    @property
    def made_outside(self) -> bool:
        return made_outside(self.descriptor)

    @property
    def embeds_text(self) -> bool:
        return descriptor_policy(self.descriptor).supports_text or (self.made_outside and bool(self.model_options))

    @property
    def model_name(self) -> str:
        options = self.model_options if self.made_outside else self.config.descriptor_options.get(self.descriptor, {})
        return str(options.get("model", ""))

    def describer(self):
        if self._describer is None:
            self._describer = self._builder().build()
            if self.made_outside:  # dedup's own descriptors made the run's vectors with these very settings
                self._check_dimension(self._describer)
        return self._describer

    def _builder(self) -> DescriptorBuilder:
        if not self.made_outside:
            return DescriptorBuilder(self.descriptor, self.config.descriptor_options.get(self.descriptor, {}))
        if not self.model_options.get("model"):
            raise QueryError(
                f"the run's {self.descriptor!r} vectors were made outside dedup: name the model that made them",
                hint="pass --model NAME --pretrained TAG|CHECKPOINT (open_clip; LAION's: --model ViT-L-14 "
                     "--pretrained openai), or query with --key",
            )
        return DescriptorBuilder("clip", self.model_options)

    def _check_dimension(self, describer) -> None:
        made, stored = describer.dim, self.stored().shape[1]
        if made != stored:
            raise QueryError(
                f"the model makes {made}-d vectors, the run's {self.descriptor!r} vectors are {stored}-d",
                hint="pass the --model/--pretrained that made the run's embeddings",
            )

    def matches_for_vectors(self, vectors: np.ndarray, threshold: float) -> list[pd.DataFrame]:
        from dedup.descriptors import query_transform_for

        index, spec, ids, stored = self.index()
        q, pos, sim = search_external(index, spec, stored, vectors, threshold, query_transform_for(self.descriptor))
        return [self._frame(ids[pos[q == i]], sim[q == i]) for i in range(len(vectors))]

    def _frame(self, sample_ids: np.ndarray, similarity: np.ndarray) -> pd.DataFrame:
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        found = self.clusters.where(_field("sample_id").isin(np.unique(sample_ids)),
                                    ["sample_id", "key", "url", "caption", "cluster_id"]).set_index("sample_id")
        rows = found.loc[sample_ids].reset_index()
        rows["similarity"] = np.asarray(similarity, dtype=np.float32)
        return rows[MATCH_COLUMNS].sort_values("similarity", ascending=False, ignore_index=True)

    def exact_matches(self, sha256: str) -> pd.DataFrame:
        from dedup.stages.cluster import _sample_paths

        samples = FilteredRows(_sample_paths(self.run))
        hit = samples.where(_field("sha256") == sha256, ["sample_id"])["sample_id"].to_numpy()
        return self._frame(hit, np.ones(len(hit), np.float32))

    def cluster_size(self, cluster_id: int) -> int:
        return self.clusters.count(_field("cluster_id") == int(cluster_id))


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
    size = run_index.cluster_size(best)
    return QueryResult(name, run_index.descriptor, int(matches["sample_id"].nunique()), best, size, matches)


def read_image_file(path: Path, root: Path | None = None, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; with `root`, only if it lies inside `root`.

    Never blocks or exhausts memory on what a folder may hold: FIFOs and devices
    (/dev/zero) are refused from an fstat before any read, the read is capped,
    and a symlink leading out of `root` is refused.
    """
    resolved = path.resolve()
    if root is not None and not resolved.is_relative_to(root.resolve()):
        raise OSError(f"{path} links outside {root}; not read")
    # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: no link swapped in since resolve().
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(resolved, flags)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file; not read")
        if info.st_size > limit:
            raise OSError(f"{path} is {info.st_size:,} bytes, above the {limit:,}-byte image limit")
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise OSError(f"{path} is above the {limit:,}-byte image limit")
    return data


def query_images(run_index: RunIndex, paths: list[Path], root: Path | None = None) -> list[QueryResult]:
    describer = run_index.describer()
    results: list[QueryResult | None] = [None] * len(paths)
    prepared, positions = [], []
    for i, path in enumerate(paths):
        try:
            data = read_image_file(path, root)
            prepared.append(describer.prepare(decode_image(data, describer.min_side).image))
            positions.append((i, hashlib.sha256(data).hexdigest()))
        except (OSError, DecodeFailure) as exc:
            message = exc.message if isinstance(exc, DecodeFailure) else (exc.strerror and f"{path}: {exc.strerror}") or str(exc)
            results[i] = QueryResult(str(path), run_index.descriptor, 0, None, 0, error=message)
    if prepared:
        vectors = describer.embed(np.stack(prepared))
        for (i, digest), matches in zip(positions, run_index.matches_for_vectors(vectors, run_index.threshold), strict=True):
            merged = pd.concat([run_index.exact_matches(digest), matches]).drop_duplicates("sample_id")
            results[i] = _result(str(paths[i]), run_index, merged.sort_values("similarity", ascending=False, ignore_index=True))
    return [r for r in results if r is not None]


def query_key(run_index: RunIndex, key: str, shard: str | None = None, occurrence: int | None = None) -> QueryResult:
    """The cluster of the sample a key names. A sample is its shard, its key and its occurrence: keys repeat
    across img2dataset outputs and even inside one shard, so a key naming samples of several clusters needs
    `shard` and, inside a shard, `occurrence` (the manifests' column: 0 for the key's first sample in its
    shard, in tar order). Never a silent first pick."""
    wanted = _field("key") == key
    rows = run_index.clusters.where(wanted if shard is None else wanted & (_field("shard") == shard))
    if occurrence is not None:
        rows = _nth_of_each_shard(rows, occurrence)
    if rows.empty:
        where = f" of shard {shard!r}" if shard is not None else ""
        nth = f" (occurrence {occurrence})" if occurrence is not None else ""
        raise QueryError(f"no sample with key {key!r}{where}{nth} in {run_index.run.root}",
                         hint="keys are the tar member names without extension; shards as given to the run")
    if rows["cluster_id"].nunique() > 1:
        raise _ambiguous_key(key, rows)
    cluster_id = int(rows["cluster_id"].iloc[0])
    members = run_index.clusters.where(_field("cluster_id") == cluster_id)
    matches = members.assign(similarity=members["similarity_to_representative"])[MATCH_COLUMNS]
    matches = matches.sort_values("similarity", ascending=False, ignore_index=True)
    return QueryResult(f"key:{key}", "clusters", len(members), cluster_id, len(members), matches)


def _nth_of_each_shard(rows: pd.DataFrame, occurrence: int) -> pd.DataFrame:
    """The `occurrence`-th sample of the key in each shard, numbered as the manifests number it."""
    from dedup.stages.manifests import with_occurrence

    numbered = with_occurrence(rows)
    return numbered[numbered["occurrence"] == occurrence]


def _ambiguous_key(key: str, rows: pd.DataFrame) -> QueryError:
    shards = sorted(rows["shard"].unique().tolist())
    if len(shards) > 1:
        return QueryError(f"key {key!r} names {len(rows)} different samples (shards: {', '.join(shards[:3])}"
                          f"{', ...' if len(shards) > 3 else ''})",
                          hint="pass --shard SHARD as well (the shard as given to the run)")
    return QueryError(f"key {key!r} names {len(rows)} different samples inside shard {shards[0]!r} "
                      f"(the key repeats in the tar)",
                      hint=f"pass --occurrence N as well: 0 for its first sample in the shard, up to {len(rows) - 1}")


def text_descriptor(out: str | Path, model_given: bool = False) -> str:
    """The run's first descriptor that embeds text too (the registry says which can; vectors made outside
    dedup can where the query names their model)."""
    names = Settings.load(RunDir(out).run_config).descriptors
    for name in names:
        if descriptor_policy(name).supports_text or (model_given and made_outside(name)):
            return name
    raise QueryError(
        f"text queries need a text-capable descriptor (e.g. CLIP), and this run has only {names}",
        hint="embed with '--descriptor clip' into a new --out, then query it",
    )


def default_text_min_similarity(model: str) -> float:
    return TEXT_MIN_SIMILARITY.get(str(model), TEXT_MIN_SIMILARITY_OTHER)


def scan_text(run: RunDir, vector: np.ndarray, min_similarity: float, top: int,
              descriptor: str = "clip") -> tuple[int, np.ndarray, np.ndarray]:
    """Exact scan of every stored vector of a text-capable descriptor: (count at or above min_similarity, top ids, their scores)."""
    from dedup.records import iter_embeddings

    count, best_ids, best_scores = 0, np.zeros(0, np.int64), np.zeros(0, np.float32)
    query = np.asarray(vector, np.float32).reshape(-1)
    for ids, vectors in iter_embeddings(run, descriptor):
        for start in range(0, len(vectors), TEXT_SCAN_ROWS):
            scores = np.asarray(vectors[start:start + TEXT_SCAN_ROWS], np.float32) @ query
            count += int((scores >= np.float32(min_similarity)).sum())
            best_ids = np.concatenate([best_ids, ids[start:start + TEXT_SCAN_ROWS]])
            best_scores = np.concatenate([best_scores, scores])
            keep = np.argsort(-best_scores, kind="stable")[:top]  # only `top` candidates survive a block
            best_ids, best_scores = best_ids[keep], best_scores[keep]
    return count, best_ids, best_scores


def query_text(run_index: RunIndex, text: str, min_similarity: float | None = None) -> QueryResult:
    if not run_index.embeds_text:
        hint = ("name the CLIP model that made the embeddings: --model NAME --pretrained TAG" if run_index.made_outside
                else "pass --descriptor clip (a run embedded with CLIP)")
        raise QueryError(f"the {run_index.descriptor!r} descriptor cannot embed text", hint=hint)
    cut = default_text_min_similarity(run_index.model_name) if min_similarity is None else float(min_similarity)
    vector = run_index.describer().embed_text([text])
    count, ids, scores = scan_text(run_index.run, vector[0], cut, TEXT_TOP, run_index.descriptor)
    matches = run_index._frame(ids, scores)
    best = int(matches["cluster_id"].iloc[0]) if len(matches) else None
    size = run_index.cluster_size(best) if best is not None else 0
    return QueryResult(f"text:{text}", run_index.descriptor, count, best, size, matches, min_similarity=cut)


def query(out: str | Path, *, image: Path | None = None, images: Path | None = None, key: str | None = None,
          text: str | None = None, descriptor: str | None = None, min_similarity: float | None = None,
          shard: str | None = None, model_options: dict[str, Any] | None = None,
          occurrence: int | None = None) -> list[QueryResult]:
    chosen = [name for name, value in (("--image", image), ("--images", images), ("--key", key), ("--text", text)) if value]
    if len(chosen) != 1:
        raise QueryError("give exactly one of --image, --images, --key, --text", hint="e.g. dedup query OUT --image photo.jpg")
    if occurrence is not None and key is None:
        raise QueryError("--occurrence goes with --key", hint="e.g. dedup query OUT --key 000000042 --shard SHARD --occurrence 1")
    chosen_descriptor = text_descriptor(out, bool(model_options)) if text and descriptor is None else descriptor
    run_index = RunIndex(out, chosen_descriptor, model_options)
    if key is not None:
        return [query_key(run_index, key, shard, occurrence)]
    if text is not None:
        return [query_text(run_index, text, min_similarity)]
    if image is not None:
        if not image.is_file():
            raise QueryError(f"{image} is not a file", hint="pass an image path, or --images DIR for a folder")
        return _all_failed_is_an_error(query_images(run_index, [image]), str(image))
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if images and images.is_dir() else []
    if not files:
        raise QueryError(f"no images found in {images}", hint=f"the folder must hold files ending in {sorted(IMAGE_SUFFIXES)}")
    return _all_failed_is_an_error(query_images(run_index, files, root=Path(images)), str(images))


def _all_failed_is_an_error(results: list[QueryResult], what: str) -> list[QueryResult]:
    """A query none of whose images could be read answers nothing: that is an error, not 0 copies."""
    if results and all(r.error for r in results):
        detail = results[0].error if len(results) == 1 else f"none of {len(results)} files (first: {results[0].error})"
        raise QueryError(f"cannot query {what}: {detail}",
                         hint=f"pass a readable image file (JPEG, PNG, WebP...; at most {MAX_IMAGE_BYTES:,} bytes)")
    return results
