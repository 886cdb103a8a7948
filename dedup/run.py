"""The run directory: one place that knows every path a run reads or writes.

Stages never build a path by hand; they ask the run for it, so the layout in
ARCHITECTURE.md is defined here once.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# Characters kept from a shard's file name in its manifest's name; the rest become '_'.
_STEM_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MANIFEST_HASH_CHARS = 12


class RunDir:
    """Paths of one run's outputs; every path a stage writes comes from here."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ingest
    @property
    def shards_table(self) -> Path:
        return self.root / "shards.parquet"

    def samples_part(self, shard_index: int) -> Path:
        return self.root / "samples" / f"samples_{shard_index}.parquet"

    def embedding_dir(self, descriptor: str) -> Path:
        return self.root / "embeddings" / descriptor

    def embedding_part(self, descriptor: str, shard_index: int) -> Path:
        return self.embedding_dir(descriptor) / "img_emb" / f"img_emb_{shard_index}.npy"

    def metadata_part(self, descriptor: str, shard_index: int) -> Path:
        return self.embedding_dir(descriptor) / "metadata" / f"metadata_{shard_index}.parquet"

    # later stages
    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    def neighbors_dir(self, descriptor: str) -> Path:
        return self.root / "neighbors" / descriptor

    @property
    def clusters(self) -> Path:
        return self.root / "clusters.parquet"

    @property
    def top_duplicates(self) -> Path:
        return self.root / "top_duplicates.parquet"

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    @property
    def manifest_index(self) -> Path:
        """One row per shard: location -> manifest file (the `_` prefix keeps parquet dataset readers off it)."""
        return self.manifests_dir / "_index.parquet"

    def manifest_part(self, shard: str) -> Path:
        return self.manifests_dir / manifest_name(shard)

    @property
    def remove_keys(self) -> Path:
        return self.root / "remove_keys.parquet"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def run_config(self) -> Path:
        return self.root / "run.json"

    def marker(self, stage: str, task_id: str) -> Path:
        return self.root / "_markers" / stage / f"{task_id}.done"

    def descriptors(self) -> list[str]:
        base = self.root / "embeddings"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []


def manifest_name(shard: str) -> str:
    """`<stem>-<hash>.parquet` for a shard location, e.g. `00002-1f0c9a3b7d21.parquet`.

    The hash is of the full location as given to the run, so two outputs that both
    hold a `00000.tar` never share a file, and a name never changes when shards are
    added. The stem is only for people; it never reaches a path unsanitised.
    """
    digest = hashlib.sha256(shard.encode("utf-8", errors="surrogatepass")).hexdigest()[:MANIFEST_HASH_CHARS]
    base = shard.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    stem = _STEM_UNSAFE.sub("_", base)[:40].strip("_") or "shard"
    return f"{stem}-{digest}.parquet"
