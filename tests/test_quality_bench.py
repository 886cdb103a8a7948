"""benchmarks/quality.py's truth for two distractor crops of one photo: nested ones are large crops of each other."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCHMARKS))  # quality.py imports make_benchmark beside it
    try:
        import quality as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.parametrize(("a", "b", "nested"), [
    ((0, 0, 100, 100), (0, 0, 100, 100), True),  # the same box
    ((0, 0, 100, 100), (10, 10, 90, 90), True),  # inside, 64 % of the area: a large crop
    ((0, 0, 100, 100), (20, 20, 80, 80), False),  # inside, 36 %: a smaller crop is another picture
    ((0, 0, 100, 100), (50, 0, 130, 80), False),  # 62 % of the smaller inside: overlapping, not nested
    ((0, 0, 100, 100), (-4, 0, 76, 80), True),  # 95 % inside, 64 %
    ((0, 0, 50, 50), (60, 60, 100, 100), False),  # apart
])
def test_a_box_is_nested_when_almost_inside_and_at_least_half_the_area(quality, a, b, nested):
    assert bool(quality._nested(np.array([a], float), np.array([b], float))[0]) is nested
    assert bool(quality._nested(np.array([b], float), np.array([a], float))[0]) is nested  # either order


def test_nested_pairs_count_only_two_groups_of_one_parent_in_one_cluster(quality):
    frame = pd.DataFrame({
        "cluster_id": [1, 1, 1, 2, 2, 3, 3],
        "group_id": ["d1", "d2", "d3", "d4", "d4", "d5", "d6"],
        "parent": ["p", "p", "p", "p", "p", "p", "q"],
        "crop_box": ["0,0,100,100", "10,10,90,90", "60,0,140,80", "0,0,100,100", "10,10,90,90",
                     "0,0,100,100", "10,10,90,90"],
    })
    # cluster 1: d1-d2 nested, d1-d3 and d2-d3 overlap only; cluster 2: one group; cluster 3: two photos.
    assert quality.nested_crop_pairs(frame) == 1
