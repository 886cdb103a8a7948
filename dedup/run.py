"""The run directory: one place that knows every path a run reads or writes.

Stages never build a path by hand; they ask the run for it, so the layout in
ARCHITECTURE.md is defined here once.
"""

from __future__ import annotations

from pathlib import Path


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
    def remove_keys(self) -> Path:
        return self.root / "remove_keys.parquet"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def run_config(self) -> Path:
        return self.root / "run.json"

    @property
    def failed_shards(self) -> Path:
        """Shards the last embed run could not read to their end (see dedup.engine for the columns)."""
        return self.failed_tasks("embed")

    def failed_tasks(self, stage: str) -> Path:
        # The embed stage's tasks are shards: its table is named for what a user looks for.
        return self.root / ("failed_shards.parquet" if stage == "embed" else f"failed_{stage}.parquet")

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def marker(self, stage: str, task_id: str) -> Path:
        return self.root / "_markers" / stage / f"{task_id}.done"

    def descriptors(self) -> list[str]:
        base = self.root / "embeddings"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []
