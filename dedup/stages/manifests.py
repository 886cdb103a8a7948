"""Write manifests: per-shard keep/drop tables and a global list of removed keys.

Files (see README "Manifests"): `manifests/<stem>-<hash>.parquet` per shard (name
from `dedup.run.manifest_name`), `manifests/_index.parquet` (shard location ->
file) and `remove_keys.parquet`. A sample is (shard, key, occurrence), never a key
alone: img2dataset outputs all start their keys at 000000000.

Keep policies (one kept sample per cluster unless `max-copies=N`):
- `best` (the default): colour over grayscale (`colourfulness` of the decoded
  image, see dedup/image_quality.py), then the most content pixels (original_width
  x original_height where the metadata has it, else the decoded size, times the
  share inside letterbox bars, `content_fraction`; compared in ~4% steps), then
  a copy without bars, then a lossless format (png, bmp, tiff) over a lossy one,
  then the fewest bytes lost to re-encoding (the most bytes per content pixel
  relative to the median of the same format in the run), ties to the earliest.
  Colour comes first because a grayscale copy has lost information no
  resolution gives back. Size cannot tell an upscaled copy from its original:
  an upscale with more pixels wins;
- `first`: the earliest sample in shard order (the smallest sample_id);
- `largest`: the sample with the most pixels (ties -> earliest);
- `max-copies=N`: keep the N earliest, drop the rest (limits repetition
  without removing an image entirely).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dedup.decode import SHARD_ERROR
from dedup.engine import run_stage
from dedup.errors import DedupError
from dedup.records import MANIFEST, MANIFEST_INDEX, REMOVE_LIST, RunDir, fingerprint, load_samples, write_record
from dedup.run import Run

# The contracts live in dedup/records.py. `occurrence` tells repeated keys inside one
# shard apart: the n-th sample with key K in a shard (in tar order) has occurrence n,
# from 0 -- the loader counts the same way. manifests/_index.parquet: one row per shard;
# `complete` is False when the run could not read the shard to its end (a `shard_error` row).
MANIFEST_COLUMNS, REMOVE_COLUMNS, INDEX_COLUMNS = MANIFEST.names, REMOVE_LIST.names, MANIFEST_INDEX.names


@dataclass(frozen=True)
class KeepPolicy:
    name: str  # "first" | "largest" | "max-copies"
    max_copies: int = 1

    @classmethod
    def parse(cls, text: str) -> KeepPolicy:
        if text in ("best", "first", "largest"):
            return cls(text)
        if text.startswith("max-copies="):
            try:
                count = int(text.split("=", 1)[1])
            except ValueError:
                count = 0
            if count >= 1:
                return cls("max-copies", count)
        raise DedupError(f"unknown keep policy {text!r}", hint="use --keep best, first, largest or max-copies=N (N >= 1)")


def decide_keep(clusters: pd.DataFrame, policy: KeepPolicy, pinned: set[int] | None = None) -> pd.DataFrame:
    """Add `keep` and `reason` columns. Failed samples are dropped with reason `status:<kind>`.

    `pinned` samples (review overrides) come first in their cluster, whatever the policy.
    """
    frame = clusters.copy()
    frame["pixels"] = frame.get("width", pd.Series(0, index=frame.index)).fillna(0).astype(np.int64) * frame.get(
        "height", pd.Series(0, index=frame.index)
    ).fillna(0).astype(np.int64)
    if policy.name == "largest":
        frame = frame.sort_values(["cluster_id", "pixels", "sample_id"], ascending=[True, False, True])
    elif policy.name == "best":
        frame = best_first(frame)
    else:
        frame = frame.sort_values(["cluster_id", "sample_id"])
    is_pinned = frame["sample_id"].isin(pinned or set())
    frame = frame.assign(_pinned=is_pinned).sort_values(["cluster_id", "_pinned"], ascending=[True, False], kind="stable")
    order_in_cluster = frame.groupby("cluster_id").cumcount()
    frame["keep"] = order_in_cluster < policy.max_copies
    frame["reason"] = np.where(frame["keep"], np.where(frame["cluster_size"] > 1, "kept_copy", "unique"), "duplicate")
    frame.loc[frame["_pinned"] & frame["keep"], "reason"] = "kept_by_review"
    frame = frame.drop(columns=["_pinned"])
    failed = frame["status"] != "ok"
    frame.loc[failed, "keep"] = False
    frame.loc[failed, "reason"] = "status:" + frame.loc[failed, "status"].astype(str)
    return frame.sort_values("sample_id").drop(columns=["pixels"]).reset_index(drop=True)


LOSSLESS_EXTENSIONS = ("png", "bmp", "tif", "tiff")
UNPADDED_MIN = 0.98  # content_fraction at or above this counts as "no bars"
BEST_COLUMNS = ["original_width", "original_height", "colourfulness", "content_fraction", "image_bytes", "image_member"]


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column that older runs may lack (then all unknown)."""
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index, dtype="float64")


def quality_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """The `best` policy's sort keys, larger = better (see the module docstring)."""
    from dedup.image_quality import GRAYSCALE_MAX

    decoded = _column(frame, "width").astype("float64") * _column(frame, "height").astype("float64")
    original = _column(frame, "original_width").astype("float64") * _column(frame, "original_height").astype("float64")
    colour = _column(frame, "colourfulness").astype("float64")
    content = _column(frame, "content_fraction").astype("float64").fillna(1.0)  # letterbox bars are not resolution
    ext = _column(frame, "image_member").map(lambda m: m.rsplit(".", 1)[-1].lower() if isinstance(m, str) else "")
    # Bars compress to almost nothing: bytes are spread over the content pixels only.
    per_pixel = _column(frame, "image_bytes").astype("float64") / (decoded * content).where(decoded * content > 0)
    relative = per_pixel / per_pixel.groupby(ext).transform("median")
    return pd.DataFrame({
        "_ok": frame["status"] == "ok",
        "_colour": ~(colour < GRAYSCALE_MAX),  # unknown (older runs) counts as colour
        "_pixels": _resolution_step(original.fillna(decoded) * content),
        "_unpadded": content >= UNPADDED_MIN,
        "_lossless": ext.isin(LOSSLESS_EXTENSIONS),
        "_quality": relative.fillna(0.0),
    }, index=frame.index)


# Content pixels compare in steps of 2**(1/16) (~4.4%): bar trimming is measured on a reduced
# copy, so a padded copy's content estimate must not beat the unpadded original by rounding.
RESOLUTION_STEPS_PER_DOUBLING = 16


def _resolution_step(pixels: pd.Series) -> pd.Series:
    steps = np.floor(np.log2(pixels.where(pixels > 0)) * RESOLUTION_STEPS_PER_DOUBLING + 0.5)
    return steps.fillna(-1.0)


def best_first(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by cluster, then best copy first; ties keep sample order."""
    keys = quality_keys(frame)
    ranked = pd.concat([frame, keys], axis=1)
    order = ["cluster_id", *keys.columns, "sample_id"]
    ranked = ranked.sort_values(order, ascending=[True] + [False] * len(keys.columns) + [True], kind="stable")
    return ranked.drop(columns=list(keys.columns))


def with_occurrence(frame: pd.DataFrame) -> pd.DataFrame:
    """Number repeated keys within a shard by order of appearance (sample_id order is tar order)."""
    frame = frame.sort_values("sample_id", ignore_index=True)
    occurrence = frame.groupby(["shard_index", "key"], sort=False, dropna=False).cumcount()
    return frame.assign(occurrence=occurrence.astype(np.int32))


def write_manifests(run: RunDir, clusters: pd.DataFrame, policy: KeepPolicy) -> dict[str, int]:
    from dedup.stages.overrides import pinned_samples

    decided = with_occurrence(decide_keep(clusters, policy, pinned_samples(run)))
    index = _write_shard_manifests(run, decided)
    removed = decided[~decided["keep"]]
    write_record(removed.reset_index(drop=True), run.remove_keys, REMOVE_LIST)
    # The index goes last: a loader that finds it finds every file it names.
    write_record(index, run.manifest_index, MANIFEST_INDEX)
    return {
        "kept": int(decided["keep"].sum()),
        "removed_duplicates": int((removed["reason"] == "duplicate").sum()),
        "removed_failed": int(removed["reason"].str.startswith("status:").sum()),
        "manifests": len(index),
    }


def _write_shard_manifests(run: RunDir, decided: pd.DataFrame) -> pd.DataFrame:
    """One file per shard, named from its location (see `dedup.run.manifest_name`); returns the index."""
    rows = []
    for shard_index, part in decided.groupby("shard_index", sort=True):
        shard = str(part["shard"].iloc[0])
        path = run.manifest_part(shard)
        write_record(part.reset_index(drop=True), path, MANIFEST)
        complete = not (part["status"] == SHARD_ERROR).any()
        rows.append((int(shard_index), shard, path.name, len(part), int((~part["keep"]).sum()), complete))
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    _check_unique_names(index)
    _remove_stale(run, set(index["manifest"]))
    return index


def _check_unique_names(index: pd.DataFrame) -> None:
    # Same stem and same 48-bit hash: never seen, but two shards must never share a file.
    clash = index[index["manifest"].duplicated(keep=False)]
    if len(clash):
        raise DedupError(
            f"shards {clash['shard'].tolist()[:2]} map to one manifest file {clash['manifest'].iloc[0]!r}",
            hint="report this as a bug; rename one of the shards meanwhile",
        )


def _remove_stale(run: RunDir, current: set[str]) -> None:
    """Drop manifests of an earlier write (other shards, older naming) so the folder matches the index."""
    for path in run.manifests_dir.glob("*.parquet"):
        if path.name not in current and path != run.manifest_index:
            path.unlink(missing_ok=True)


class ManifestsStage:
    """One task: clusters + keep policy -> manifests/ and remove_keys.parquet."""

    name = "manifests"

    def __init__(self, run: Run) -> None:
        self.run_dir = run
        self.keep = run.settings.keep

    def task_ids(self) -> list[str]:
        return ["0"]

    def fingerprint(self) -> str:
        return fingerprint([self.run_dir.clusters, self.run_dir.overrides], {"keep": self.keep})

    def reset(self) -> None:
        import shutil

        shutil.rmtree(self.run_dir.manifests_dir, ignore_errors=True)
        self.run_dir.remove_keys.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        clusters = pd.read_parquet(self.run_dir.clusters)
        sizes = load_samples(self.run_dir, ["sample_id", "width", "height", *_present(self.run_dir, BEST_COLUMNS)])
        return write_manifests(self.run_dir, clusters.merge(sizes, on="sample_id", how="left"), KeepPolicy.parse(self.keep))

    def close(self) -> None:
        pass


def manifests_stage(run: Run) -> dict[str, int]:
    """Write manifests with the run's keep policy behind the engine; returns kept/removed counts."""
    report = run_stage(run, ManifestsStage(run))
    return {k: int(v) for k, v in report.stats.items()}


def _present(run: RunDir, columns: list[str]) -> list[str]:
    """The columns the run's samples table has (runs embedded before a column existed lack it)."""
    import pyarrow.parquet as pq

    parts = sorted((run.root / "samples").glob("samples_*.parquet"))
    names = set(pq.read_schema(parts[0]).names) if parts else set()
    return [c for c in columns if c in names]
