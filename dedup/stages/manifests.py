"""Write manifests: per-shard keep/drop tables and a global list of removed keys.

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
from pathlib import Path

import numpy as np
import pandas as pd

from dedup.errors import DedupError
from dedup.records import RunDir, load_samples, write_table

MANIFEST_COLUMNS = ["key", "sample_id", "keep", "cluster_id", "reason"]
REMOVE_COLUMNS = ["shard", "key", "sample_id", "cluster_id", "reason"]


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


def write_manifests(run: RunDir, clusters: pd.DataFrame, policy: KeepPolicy) -> dict[str, int]:
    from dedup.stages.overrides import pinned_samples

    decided = decide_keep(clusters, policy, pinned_samples(run))
    for shard_index, part in decided.groupby("shard_index"):
        write_table(part[MANIFEST_COLUMNS].reset_index(drop=True), run.manifests_dir / f"{int(shard_index):05d}.parquet")
    removed = decided[~decided["keep"]]
    write_table(removed[REMOVE_COLUMNS].reset_index(drop=True), run.remove_keys)
    return {
        "kept": int(decided["keep"].sum()),
        "removed_duplicates": int((removed["reason"] == "duplicate").sum()),
        "removed_failed": int(removed["reason"].str.startswith("status:").sum()),
    }


def manifests_stage(out: str | Path, keep: str = "best") -> dict[str, int]:
    run = RunDir(out)
    policy = KeepPolicy.parse(keep)
    clusters = pd.read_parquet(run.clusters)
    sizes = load_samples(run, ["sample_id", "width", "height", *_present(run, BEST_COLUMNS)])
    return write_manifests(run, clusters.merge(sizes, on="sample_id", how="left"), policy)


def _present(run: RunDir, columns: list[str]) -> list[str]:
    """The columns the run's samples table has (runs embedded before a column existed lack it)."""
    import pyarrow.parquet as pq

    parts = sorted((run.root / "samples").glob("samples_*.parquet"))
    names = set(pq.read_schema(parts[0]).names) if parts else set()
    return [c for c in columns if c in names]
