"""The run directory: one place that knows every path a run reads or writes.

Stages never build a path by hand; they ask the run for it, so the layout in
ARCHITECTURE.md is defined here once.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from dedup.settings import Settings

# Characters kept from a shard's file name in its manifest's name; the rest become '_'.
_STEM_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MANIFEST_HASH_CHARS = 12


class RunDir:
    """Paths of one run's outputs; every path a stage writes comes from here."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __fspath__(self) -> str:
        # Path-like: functions taking `out: str | Path` accept a run (or a Run context) as well.
        return str(self.root)

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
    def remove_urls(self) -> Path:
        """Runs from precomputed embeddings: url and key of every removed sample (dedup/stages/precomputed.py)."""
        return self.root / "remove_urls.parquet"

    def precomputed_coverage_part(self, shard_index: int) -> Path:
        """Runs of shards beside --embeddings: which samples got a precomputed vector (dedup/stages/precomputed_join.py)."""
        return self.root / "precomputed_coverage" / f"coverage_{shard_index}.parquet"

    def scratch_dir(self, stage: str) -> Path:
        """Intermediate files one stage's tasks hand to its later steps (removed when the stage ends)."""
        return self.root / "_scratch" / stage

    @property
    def missing_shards(self) -> Path:
        return self.root / "missing_shards.parquet"

    @property
    def overrides(self) -> Path:
        """Review decisions (dedup/stages/overrides.py), applied by cluster and manifests on every rerun."""
        return self.root / "overrides.parquet"

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


class Run(RunDir):
    """The run context handed to every stage: the run directory, its settings, and where to log.

    `Run.start` (embed, run, demo) creates or resumes a run from the CLI's
    settings; `Run.open` (every later stage, query, report) reads run.json and
    applies the few options that command takes. Either way run.json is written
    before the stage that uses a value runs, so the record never lags the work.
    """

    def __init__(self, root: str | Path, settings: Settings, console: Any = None) -> None:
        super().__init__(root)
        self.settings = settings
        self.console = console

    def __getstate__(self) -> dict[str, Any]:
        # The console holds terminal handles; stages shipped to workers log through the engine.
        return {**self.__dict__, "console": None}

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, soft_wrap=True, markup=False)

    def save(self) -> None:
        from dedup.records import write_json

        write_json(self.settings.to_json(), self.run_config)

    @classmethod
    def start(cls, root: str | Path, requested: Settings, console: Any = None,
              given: frozenset[str] = frozenset({"descriptors", "keep", "memory_budget_bytes", "large_crops",
                                                 "nprobe"})) -> Run:
        """A new run with `requested`, or the existing one at `root` resumed with them (checked)."""
        from dedup.settings import SettingsError

        root = Path(root)
        if root.exists() and not root.is_dir():
            raise SettingsError(f"--out {root} is a file, not a directory",
                                hint="choose a new --out directory (it is created)")
        run = cls(root, requested, console)
        if run.run_config.exists():
            saved = Settings.load(run.run_config)
            run.settings = saved.resumed_with(requested, set(given))
        run.save()
        return run

    @classmethod
    def open(cls, root: str | Path, console: Any = None, *, thresholds: dict[str, float] | None = None,
             guards: dict[str, float] | None = None, save: bool = True, search: bool = True, **changes: Any) -> Run:
        """An existing run; `thresholds`/`guards`/`changes` (e.g. keep=...) update run.json when given."""
        from dataclasses import replace

        path = Path(root) / "run.json"
        # Stages that need no settings (rank) name their missing input instead of run.json.
        optional = changes.pop("optional", False)
        settings = Settings.load(path) if path.exists() or not optional else Settings()
        if thresholds or guards:
            settings = settings.with_cuts(thresholds or {}, guards or {}, search=search)
        settings = replace(settings, **{k: v for k, v in changes.items() if v is not None}).validated()
        run = cls(root, settings, console)
        if save and path.exists() and (thresholds or guards or any(v is not None for v in changes.values())):
            run.save()
        return run
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
