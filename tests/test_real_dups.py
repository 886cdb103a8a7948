"""The whole pipeline on real photos with known duplicate groups (../shared/data/real-dups).

groups.csv has label errors that the pixels contradict (found independently by
three people, see BENCHMARKS.md); the test applies these corrections and says so:
- `JImageHash:highQuality_png` is the forest photo (merged into `forest`);
- `mismatch-1.jpg` is `forest-high.jpg` with an EXIF rotation (a copy, not a negative);
- `mismatch-3.jpg` is a re-encode of `match-r0-f0.jpg` (a copy, not a negative);
- bridge `I16.png` / `LA.png` from python-threatexchange are noise fixtures, and the four
  `exif-rotn` images are separate shots of one desk: excluded from pairs and negatives.
"""

from __future__ import annotations

import csv
import itertools
from collections import defaultdict

import pandas as pd
import pytest
from conftest import make_run, write_tar

from dedup import pipeline
from dedup.records import RunDir

LABEL_FIXES = {
    "JImageHash:highQuality_png": "forest",
}
RELABELLED = {
    "jenssegers-imagehash__tests__images__orientation__mismatch-1.jpg": "forest",
    "jenssegers-imagehash__tests__images__orientation__mismatch-3.jpg": "jenssegers:orientation",
}
EXCLUDED = (
    "threatexchange__tests__hashing__resources__I16.png",
    "threatexchange__tests__hashing__resources__LA.png",
    "exif-rotn",
)


def _truth(real_dups) -> pd.DataFrame:
    rows = []
    with open(real_dups / "groups.csv") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            name = row["file"].split("/", 1)[1]
            if any(part in name for part in EXCLUDED):
                continue
            group = RELABELLED.get(name, LABEL_FIXES.get(row["group_id"], row["group_id"]))
            kind = "near" if name in RELABELLED else row["kind"]
            rows.append({"key": f"img{i:04d}", "file": name, "group_id": group, "kind": kind})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def real_run(real_dups, tmp_path_factory):
    root = tmp_path_factory.mktemp("realdups")
    truth = _truth(real_dups)
    members = []
    for row in truth.itertuples():
        ext = row.file.rsplit(".", 1)[1].lower()
        members.append((f"{row.key}.{ext}", (real_dups / "images" / row.file).read_bytes()))
        members.append((f"{row.key}.txt", row.file.encode()))
    half = len(members) // 2 // 2 * 2
    shards = [write_tar(root / "00000.tar", members[:half]), write_tar(root / "00001.tar", members[half:])]
    pipeline.run_all(make_run(root / "run", shards), with_report=False)
    clusters = pd.read_parquet(RunDir(root / "run").clusters)
    return truth.merge(clusters[["key", "cluster_id", "status"]], on="key")


def test_every_real_image_decodes(real_run):
    failed = real_run[real_run["status"] != "ok"]
    assert failed.empty, failed[["file", "status"]]


def test_at_least_96_percent_of_same_group_pairs_cluster_together(real_run):
    groups = real_run[real_run["kind"] == "near"].groupby("group_id")
    together = total = 0
    split = defaultdict(int)
    for group_id, members in groups:
        for a, b in itertools.combinations(members["cluster_id"], 2):
            total += 1
            together += a == b
            split[group_id] += a != b
    recall = together / total
    missed = {g: n for g, n in split.items() if n}
    # The groups that split are named so a regression is easy to trace (BENCHMARKS.md tracks them).
    # 0.965 measured (BENCHMARKS.md): what splits are the 128 px Grace Hopper face crops and 6 of the
    # 24 Kodak 500x500 crops: parts of a photo a global descriptor cannot place in it (issue 12).
    assert recall >= 0.96, f"pair recall {recall:.3f}; split pairs per group: {missed}"


def test_no_hard_negative_or_distinct_photo_is_merged(real_run):
    loners = real_run[real_run["kind"].isin(["hard_negative", "distinct"])]
    sizes = real_run["cluster_id"].value_counts()
    merged = loners[loners["cluster_id"].map(sizes) > 1]
    assert merged.empty, f"merged with something: {merged['file'].tolist()}"


def test_no_cluster_mixes_two_groups(real_run):
    mixed = real_run.groupby("cluster_id")["group_id"].nunique()
    assert (mixed == 1).all(), real_run[real_run["cluster_id"].isin(mixed[mixed > 1].index)][["file", "group_id"]]
