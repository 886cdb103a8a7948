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

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup.decode import SHARD_ERROR
from dedup.engine import run_stage, unfinished_tasks
from dedup.errors import DedupError, StoreError
from dedup.ids import make_sample_id
from dedup.records import (
    MANIFEST,
    MANIFEST_INDEX,
    REMOVE_LIST,
    RunDir,
    atomic_output,
    conform,
    fingerprint,
    read_shards,
    write_json,
    write_record,
    write_table,
)
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


def decide_keep(clusters: pd.DataFrame, policy: KeepPolicy, pinned: set[int] | None = None,
                medians: dict[str, float] | None = None) -> pd.DataFrame:
    """Add `keep` and `reason` columns. Failed samples are dropped with reason `status:<kind>`.

    `pinned` samples (review overrides) come first in their cluster, whatever the policy.
    `medians` (`best` only): bytes per content pixel per format over the whole run, when `clusters`
    holds only some of its samples (see `run_medians`); by default they are taken over `clusters`.
    """
    frame = clusters.copy()
    frame["pixels"] = frame.get("width", pd.Series(0, index=frame.index)).fillna(0).astype(np.int64) * frame.get(
        "height", pd.Series(0, index=frame.index)
    ).fillna(0).astype(np.int64)
    if policy.name == "largest":
        frame = frame.sort_values(["cluster_id", "pixels", "sample_id"], ascending=[True, False, True])
    elif policy.name == "best":
        frame = best_first(frame, medians)
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


def bytes_per_pixel(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(format extension, image bytes per content pixel) of every row: what `best` compares re-encoding by."""
    decoded = _column(frame, "width").astype("float64") * _column(frame, "height").astype("float64")
    content = _column(frame, "content_fraction").astype("float64").fillna(1.0)
    ext = _column(frame, "image_member").map(lambda m: m.rsplit(".", 1)[-1].lower() if isinstance(m, str) else "")
    # Bars compress to almost nothing: bytes are spread over the content pixels only.
    return ext, _column(frame, "image_bytes").astype("float64") / (decoded * content).where(decoded * content > 0)


def quality_keys(frame: pd.DataFrame, medians: dict[str, float] | None = None) -> pd.DataFrame:
    """The `best` policy's sort keys, larger = better (see the module docstring)."""
    from dedup.image_quality import GRAYSCALE_MAX

    decoded = _column(frame, "width").astype("float64") * _column(frame, "height").astype("float64")
    original = _column(frame, "original_width").astype("float64") * _column(frame, "original_height").astype("float64")
    colour = _column(frame, "colourfulness").astype("float64")
    content = _column(frame, "content_fraction").astype("float64").fillna(1.0)  # letterbox bars are not resolution
    ext, per_pixel = bytes_per_pixel(frame)
    # Relative to the format's median over the run: a bucket of clusters passes the run's medians.
    median = per_pixel.groupby(ext).transform("median") if medians is None else ext.map(medians).astype("float64")
    relative = per_pixel / median
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


def best_first(frame: pd.DataFrame, medians: dict[str, float] | None = None) -> pd.DataFrame:
    """Rows sorted by cluster, then best copy first; ties keep sample order."""
    keys = quality_keys(frame, medians)
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


# ====================================================================== the stage, as engine tasks
#
# `manifests_stage` runs four small stages behind the run's engine, so that with --engine ray every step
# runs on the cluster and no step holds more than one shard's rows or one bucket of clusters:
#   manifests-prepare  one task per shard: that shard's rows of clusters.parquet (row groups chosen by
#                      their sample_id statistics) + its samples part -> the rows of clusters with copies
#                      (scratch), and for `best` the shard's bytes per content pixel;
#   manifests-median   `best` only, one task: the exact median bytes per pixel per format over the run,
#                      in two streaming passes (a histogram of the values' bits, then the middle bins);
#   manifests-keep     one task per bucket of clusters (cluster_id modulo the bucket count): the keep
#                      decision of every member of a cluster with copies (the same `decide_keep`);
#   manifests-shards   one task per shard: its rows decided (singletons locally, the others from the
#                      buckets) -> its manifest file, its removed rows and its index row (scratch);
#   manifests          one task: remove_keys.parquet streamed shard by shard, then the index, last.
# Outputs equal `write_manifests` over the whole table (tests/test_manifests.py checks it).

# Rows of clusters with copies per manifests-keep task: a bucket is held in memory whole.
KEEP_BUCKET_ROWS = 2_000_000
# Bits of a float64's order-preserving key kept by the median's first pass (2**20 bins per format).
MEDIAN_BIN_BITS = 20


def shard_rows(path: Path, shard_index: int, columns: list[str] | None = None) -> pa.Table:
    """The rows of one shard in a table in sample_id order, reading only row groups whose
    sample_id statistics overlap the shard (its ids are `shard_index << 32 | position`)."""
    low, high = make_sample_id(shard_index, 0), make_sample_id(shard_index + 1, 0)
    parquet = pq.ParquetFile(path)
    groups = [g for g in range(parquet.metadata.num_row_groups) if _may_hold(parquet.metadata.row_group(g), low, high)]
    if not groups:
        schema = parquet.schema_arrow
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    table = parquet.read_row_groups(groups, columns=columns)
    ids = table.column("sample_id")
    return table.filter(pc.and_(pc.greater_equal(ids, low), pc.less(ids, high)))


def _may_hold(row_group, low: int, high: int) -> bool:
    for index in range(row_group.num_columns):
        column = row_group.column(index)
        if column.path_in_schema == "sample_id":
            stats = column.statistics
            if stats is None or not stats.has_min_max:
                return True  # no statistics: the group is read and filtered
            return stats.max >= low and stats.min < high
    return True


# What each step reads of clusters.parquet (captions and urls stay on disk).
_PREPARE_COLUMNS = ["sample_id", "cluster_id", "cluster_size", "status"]
_SHARD_COLUMNS = ["sample_id", "shard_index", "shard", "key", "cluster_id", "cluster_size", "status"]


def _shard_frame(run: RunDir, shard_index: int, sample_columns: list[str]) -> pd.DataFrame:
    """One shard's clusters rows joined with the sample columns the keep policy reads."""
    clusters = shard_rows(run.clusters, shard_index, _PREPARE_COLUMNS).to_pandas()
    part = run.samples_part(shard_index)
    if part.exists():
        sizes = pd.read_parquet(part, columns=["sample_id", *sample_columns])
    else:
        sizes = pd.DataFrame({c: pd.Series(dtype="float64") for c in sample_columns}).assign(sample_id=pd.Series(dtype="int64"))
    return clusters.merge(sizes, on="sample_id", how="left")


def _policy_columns(frame: pd.DataFrame) -> list[str]:
    """What `decide_keep` reads of a member, written for the bucket tasks."""
    wanted = ["sample_id", "cluster_id", "cluster_size", "status", "width", "height", *BEST_COLUMNS]
    return [c for c in wanted if c in frame.columns]


class _ManifestStep:
    """What the five steps share: the run, the policy, one fingerprint, scratch paths."""

    name = "manifests-step"

    def __init__(self, run: Run, buckets: int = 1) -> None:
        self.run_dir = run
        self.keep = run.settings.keep
        self.buckets = buckets

    def fingerprint(self) -> str:
        # The bucket count is the same for the same inputs; it changes with KEEP_BUCKET_ROWS only
        # (the prepare and median steps, made with the default, do not depend on it).
        return fingerprint([self.run_dir.clusters, self.run_dir.overrides], {"keep": self.keep, "buckets": self.buckets})

    def shard_indices(self) -> list[int]:
        return [int(i) for i in read_shards(self.run_dir)["shard_index"]]

    def scratch(self, name: str) -> Path:
        return self.run_dir.scratch_dir("manifests") / name

    def policy(self) -> KeepPolicy:
        return KeepPolicy.parse(self.keep)

    def sample_columns(self) -> list[str]:
        return ["width", "height", *_present(self.run_dir, BEST_COLUMNS)]

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class PrepareStep(_ManifestStep):
    """One task per shard: its rows of clusters with copies (+ bytes per pixel for `best`) -> scratch."""

    name = "manifests-prepare"

    def task_ids(self) -> list[str]:
        return [str(i) for i in self.shard_indices()]

    def reset(self) -> None:
        import shutil

        shutil.rmtree(self.run_dir.scratch_dir("manifests"), ignore_errors=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        frame = _shard_frame(self.run_dir, int(task_id), self.sample_columns())
        members = frame[frame["cluster_size"] > 1]
        write_table(members[_policy_columns(frame)].reset_index(drop=True), self.scratch(f"members_{task_id}.parquet"))
        if self.policy().name == "best":
            ext, per_pixel = bytes_per_pixel(frame)
            known = per_pixel.notna()
            write_table(pd.DataFrame({"ext": ext[known], "per_pixel": per_pixel[known]}).reset_index(drop=True),
                        self.scratch(f"per_pixel_{task_id}.parquet"))
        progress(len(frame))
        return {"samples": len(frame), "members": len(members)}


class MedianStep(_ManifestStep):
    """`best` only, one task: the run's median bytes per content pixel per format -> scratch JSON."""

    name = "manifests-median"

    def task_ids(self) -> list[str]:
        return ["0"] if self.policy().name == "best" else []

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        paths = [self.scratch(f"per_pixel_{i}.parquet") for i in self.shard_indices()]
        medians = exact_medians(paths)
        write_json({ext: repr(value) for ext, value in medians.items()}, self.scratch("medians.json"))
        return {"formats": len(medians)}


def run_medians(run: RunDir) -> dict[str, float] | None:
    """The medians the median step wrote (exact floats, kept as their repr), None before it ran."""
    path = run.scratch_dir("manifests") / "medians.json"
    return {ext: float(text) for ext, text in json.loads(path.read_text()).items()} if path.exists() else None


def _order_key(values: np.ndarray) -> np.ndarray:
    """uint64 keys sorting as the float64 values do (sign bit flipped, negatives inverted)."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    return np.where(bits >> np.uint64(63) == 1, ~bits, bits | np.uint64(1 << 63))


def _per_format(paths: list[Path]):
    """(format, values) of every scratch part, one part at a time."""
    for path in paths:
        frame = pd.read_parquet(path)
        for ext, values in frame.groupby("ext", sort=False)["per_pixel"]:
            yield str(ext), values.to_numpy(np.float64)


def exact_medians(paths: list[Path]) -> dict[str, float]:
    """Per format, the median as pandas' groupby median computes it (the mean of the two middle values
    for an even count), in two passes over the parts: never more than one part plus the middle bins held."""
    shift = np.uint64(64 - MEDIAN_BIN_BITS)
    counts: dict[str, np.ndarray] = {}
    for ext, values in _per_format(paths):
        histogram = np.bincount((_order_key(values) >> shift).astype(np.int64), minlength=1 << MEDIAN_BIN_BITS)
        counts[ext] = counts[ext] + histogram if ext in counts else histogram
    targets = {ext: _middle_bins(histogram) for ext, histogram in counts.items()}
    middle: dict[str, list[np.ndarray]] = {ext: [] for ext in counts}
    for ext, values in _per_format(paths):
        bins = (_order_key(values) >> shift).astype(np.int64)
        middle[ext].append(values[np.isin(bins, targets[ext][0])])
    return {ext: _median_of_middle(np.sort(np.concatenate(middle[ext])), *targets[ext][1:]) for ext in counts}


def _middle_bins(histogram: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """(bins holding the middle ranks, values before them, the two middle ranks) of a histogram."""
    total = int(histogram.sum())
    ranks = ((total - 1) // 2, total // 2)
    cumulative = np.cumsum(histogram)
    bins = np.unique(np.searchsorted(cumulative, ranks, side="right"))
    before = int(cumulative[bins[0] - 1]) if bins[0] > 0 else 0
    return bins, before, *ranks


def _median_of_middle(values: np.ndarray, before: int, low: int, high: int) -> float:
    # The two middle ranks are consecutive: bins between theirs are empty, so the sorted middle
    # bins hold both at their rank less the values of the lower bins.
    return float((values[low - before] + values[high - before]) / 2) if low != high else float(values[low - before])


class KeepStep(_ManifestStep):
    """One task per bucket of clusters with copies: the keep decision of each member -> scratch."""

    name = "manifests-keep"

    def task_ids(self) -> list[str]:
        return [str(j) for j in range(self.buckets)]

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        from dedup.stages.overrides import pinned_samples

        bucket = int(task_id)
        frames = [self._bucket_rows(self.scratch(f"members_{i}.parquet"), bucket) for i in self.shard_indices()]
        members = pd.concat(frames, ignore_index=True)
        decided = decide_keep(members, self.policy(), pinned_samples(self.run_dir), run_medians(self.run_dir))
        write_table(decided[["sample_id", "keep", "reason"]], self.scratch(f"keep_{bucket}.parquet"))
        return {"members": len(decided)}

    def _bucket_rows(self, path: Path, bucket: int) -> pd.DataFrame:
        frame = pd.read_parquet(path)
        return frame[frame["cluster_id"].to_numpy(np.int64) % self.buckets == bucket]


def decide_singletons(frame: pd.DataFrame, pinned: set[int]) -> pd.DataFrame:
    """`decide_keep` for samples alone in their cluster, without its sort: every policy keeps them
    (a review pin says so), failed ones are dropped; rows with copies get `keep`/`reason` later."""
    keep = frame["status"] == "ok"
    reason = np.where(frame["sample_id"].isin(pinned), "kept_by_review", "unique").astype(object)
    reason = np.where(keep, reason, ("status:" + frame["status"].astype(str)).to_numpy(object))
    return frame.assign(keep=keep.to_numpy(bool), reason=reason).sort_values("sample_id").reset_index(drop=True)


class ShardStep(_ManifestStep):
    """One task per shard: its rows decided -> its manifest, its removed rows and index row (scratch)."""

    name = "manifests-shards"

    def task_ids(self) -> list[str]:
        return [str(i) for i in self.shard_indices()]

    def reset(self) -> None:
        import shutil

        # Before any shard writes: the folder then holds only this policy's files.
        shutil.rmtree(self.run_dir.manifests_dir, ignore_errors=True)
        self.run_dir.remove_keys.unlink(missing_ok=True)

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        from dedup.stages.overrides import pinned_samples

        shard_index = int(task_id)
        frame = shard_rows(self.run_dir.clusters, shard_index, _SHARD_COLUMNS).to_pandas()
        if frame.empty:
            return {"kept": 0, "removed_duplicates": 0, "removed_failed": 0, "manifests": 0}
        # Singletons are decided here; members of clusters with copies take their bucket's decision.
        decided = decide_singletons(frame, pinned_samples(self.run_dir))
        decided = with_occurrence(self._apply_buckets(decided, shard_index))
        shard = str(decided["shard"].iloc[0])
        path = self.run_dir.manifest_part(shard)
        write_record(decided, path, MANIFEST)
        removed = decided[~decided["keep"]].reset_index(drop=True)
        write_record(removed, self.scratch(f"removed_{shard_index}.parquet"), REMOVE_LIST)
        complete = not (decided["status"] == SHARD_ERROR).any()
        write_json([shard_index, shard, path.name, len(decided), len(removed), bool(complete)],
                   self.scratch(f"index_{shard_index}.json"))
        progress(len(decided))
        return {"kept": int(decided["keep"].sum()), "removed_duplicates": int((removed["reason"] == "duplicate").sum()),
                "removed_failed": int(removed["reason"].str.startswith("status:").sum()), "manifests": 1}

    def _apply_buckets(self, decided: pd.DataFrame, shard_index: int) -> pd.DataFrame:
        copies = decided["cluster_size"] > 1
        if not copies.any():
            return decided
        parts = [shard_rows(self.scratch(f"keep_{j}.parquet"), shard_index).to_pandas() for j in range(self.buckets)]
        chosen = pd.concat(parts, ignore_index=True).set_index("sample_id")
        ids = decided.loc[copies, "sample_id"]
        if not ids.isin(chosen.index).all():
            raise StoreError(f"shard {shard_index}: members without a keep decision in {self.scratch('')}",
                             hint="rerun the same command: the manifests steps start over when their scratch is incomplete")
        decided.loc[copies, "keep"] = ids.map(chosen["keep"]).to_numpy(bool)
        decided.loc[copies, "reason"] = ids.map(chosen["reason"]).to_numpy(object)
        return decided


class ManifestsStage(_ManifestStep):
    """The last step, one task: remove_keys.parquet streamed shard by shard, then manifests/_index.parquet."""

    name = "manifests"

    def task_ids(self) -> list[str]:
        return ["0"]

    def run_task(self, task_id: str, progress) -> dict[str, int]:
        import shutil

        shards = [i for i in self.shard_indices() if self.scratch(f"index_{i}.json").exists()]
        index = pd.DataFrame([json.loads(self.scratch(f"index_{i}.json").read_text()) for i in shards],
                             columns=INDEX_COLUMNS)
        index = index.astype({"shard_index": "int64", "samples": "int64", "removed": "int64", "complete": bool})
        _check_unique_names(index)
        _remove_stale(self.run_dir, set(index["manifest"]))
        removed = _stream_removed(self.run_dir.remove_keys, [self.scratch(f"removed_{i}.parquet") for i in shards])
        # The index goes last: a loader that finds it finds every file it names.
        write_record(index, self.run_dir.manifest_index, MANIFEST_INDEX)
        shutil.rmtree(self.run_dir.scratch_dir("manifests"), ignore_errors=True)
        return {"removed": removed}


def _stream_removed(target: Path, parts: list[Path]) -> int:
    """Concatenate the shards' removed rows (shard order is sample_id order), one part in memory at a time."""
    rows = 0
    with atomic_output(target) as tmp:
        schema = conform(REMOVE_LIST.empty_table(), REMOVE_LIST).schema
        with pq.ParquetWriter(tmp, schema) as writer:
            for part in parts:
                table = pq.read_table(part).cast(schema)
                writer.write_table(table)
                rows += table.num_rows
    return rows


def manifests_stage(run: Run) -> dict[str, int]:
    """Write manifests with the run's keep policy behind the engine; returns kept/removed counts."""
    prepare = PrepareStep(run)
    buckets = max(1, math.ceil(int(run_stage(run, prepare).stats.get("members", 0)) / KEEP_BUCKET_ROWS))
    later = [MedianStep(run), KeepStep(run, buckets), ShardStep(run, buckets), ManifestsStage(run, buckets)]
    if not run.scratch_dir("manifests").exists() and any(unfinished_tasks(run, step) for step in later):
        # A finished stage removes its hand-over files; a later step that must run again needs them back.
        for task_id in prepare.task_ids():
            run.marker(prepare.name, task_id).unlink(missing_ok=True)
        run_stage(run, prepare)
    reports = [run_stage(run, step) for step in later]
    return {k: int(reports[2].stats.get(k, 0)) for k in ("kept", "removed_duplicates", "removed_failed", "manifests")}


def _present(run: RunDir, columns: list[str]) -> list[str]:
    """The columns the run's samples table has (runs embedded before a column existed lack it)."""
    import pyarrow.parquet as pq

    parts = sorted((run.root / "samples").glob("samples_*.parquet"))
    names = set(pq.read_schema(parts[0]).names) if parts else set()
    return [c for c in columns if c in names]
