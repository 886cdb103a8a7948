"""Same-group pair recall on ../shared/data/real-dups with and without the large-crop search (issue 12).

Runs the whole pipeline (as tests/test_real_dups.py does, with its label corrections) twice, crop search
off and on, and prints pair recall, the groups that split, merged hard negatives / distinct photos and
clusters mixing groups.

    PYTHONPATH=. python benchmarks/crops_realdups.py
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_real_dups  # noqa: E402  (the label corrections live there)
from conftest import make_run, write_tar  # noqa: E402

from dedup import pipeline  # noqa: E402
from dedup.records import RunDir  # noqa: E402

REAL_DUPS = REPO.parent / "shared" / "data" / "real-dups"


def clustered(root: Path, crop_search: bool) -> pd.DataFrame:
    truth = test_real_dups._truth(REAL_DUPS)
    members = []
    for row in truth.itertuples():
        members.append((f"{row.key}.{row.file.rsplit('.', 1)[1].lower()}", (REAL_DUPS / "images" / row.file).read_bytes()))
        members.append((f"{row.key}.txt", row.file.encode()))
    half = len(members) // 4 * 2
    shards = [write_tar(root / "00000.tar", members[:half]), write_tar(root / "00001.tar", members[half:])]
    pipeline.run_all(make_run(root / "run", shards, large_crops=crop_search), with_report=False)
    clusters = pd.read_parquet(RunDir(root / "run").clusters)
    return truth.merge(clusters[["key", "cluster_id"]], on="key")


def summary(frame: pd.DataFrame) -> str:
    together = total = 0
    split: dict[str, int] = defaultdict(int)
    for group, members in frame[frame["kind"] == "near"].groupby("group_id"):
        for a, b in itertools.combinations(members["cluster_id"], 2):
            total, together = total + 1, together + (a == b)
            split[group] += a != b
    sizes = frame["cluster_id"].value_counts()
    loners = frame[frame["kind"].isin(["hard_negative", "distinct"])]
    merged = int((loners["cluster_id"].map(sizes) > 1).sum())
    mixed = int((frame.groupby("cluster_id")["group_id"].nunique() > 1).sum())
    splits = {g: n for g, n in split.items() if n}
    return (f"pair recall {together / total:.4f} ({together}/{total}); split pairs {splits}; "
            f"hard negatives / distinct merged {merged}; clusters mixing groups {mixed}")


def main() -> int:
    for crop_search in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"crop search {'on' if crop_search else 'off'}: {summary(clustered(Path(tmp), crop_search))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
