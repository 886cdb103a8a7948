"""Apply a run's manifests in a training loader: `DropDuplicates` for webdataset pipelines."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from dedup.run import RunDir


def load_removed_keys(run_or_path: str | Path) -> set[tuple[str, str]]:
    """(shard URL, key) pairs to drop; accepts a run directory or a remove_keys.parquet path."""
    path = Path(run_or_path)
    if path.is_dir():
        path = RunDir(path).remove_keys
    table = pd.read_parquet(path, columns=["shard", "key"])
    return set(zip(table["shard"], table["key"], strict=True))


def load_removed_key_set(run_or_path: str | Path) -> set[str]:
    """Keys to drop, for loaders that know keys but not shard URLs (keys unique per dataset)."""
    return {key for _, key in load_removed_keys(run_or_path)}


class DropDuplicates:
    """A webdataset pipeline stage that drops removed samples while streaming.

        import webdataset as wds
        from dedup import DropDuplicates
        ds = wds.WebDataset(urls).compose(DropDuplicates("runs/laion"))

    Samples are matched on `__key__` (img2dataset keys are unique per dataset).
    """

    def __init__(self, run_or_path: str | Path) -> None:
        self.removed = load_removed_key_set(run_or_path)

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            if sample.get("__key__") not in self.removed:
                yield sample

    def keep(self, sample: dict) -> bool:
        """For `dataset.select(dropper.keep)`."""
        return sample.get("__key__") not in self.removed
