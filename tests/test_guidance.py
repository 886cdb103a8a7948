"""Threshold guidance in the report (removals against the cut, pairs per band) and the gallery ordered by risk."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from dedup.records import RunDir
from dedup.stages.guidance import _exact_pairs, _pair_html, band_pairs, removal_curve, stored_edges
from dedup.stages.report import build_report_html


def _edges(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["id_a", "id_b", "similarity"]).astype({"similarity": "float32"})


def test_removal_curve_counts_one_kept_per_connected_group():
    edges = _edges([(1, 2, 0.9), (2, 3, 0.8), (10, 11, 0.95)])
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert removal_curve(edges, none, np.array([0.7, 0.85, 0.99])).tolist() == [3, 2, 0]
    exact = (np.array([20]), np.array([21]))  # identical bytes count at every cut
    assert removal_curve(edges, exact, np.array([0.7, 0.99])).tolist() == [4, 1]


def test_one_pass_curve_equals_components_counted_at_each_cut():
    from dedup.search.union_find import connected_components

    rng = np.random.default_rng(3)
    edges = _edges([(int(a), int(b), float(s)) for a, b, s in zip(rng.integers(0, 300, 600), rng.integers(300, 600, 600),
                                                                  rng.uniform(0.5, 1.0, 600), strict=False)])
    exact = (rng.integers(0, 600, 20), rng.integers(600, 650, 20))
    cuts = np.linspace(0.5, 1.0, 11)
    expected = []
    for cut in cuts:
        keep = edges[edges["similarity"] >= np.float32(cut)]
        a = np.concatenate([keep["id_a"].to_numpy(), exact[0]])
        b = np.concatenate([keep["id_b"].to_numpy(), exact[1]])
        nodes = np.unique(np.concatenate([edges["id_a"], edges["id_b"], *exact]))
        labels = connected_components(len(nodes), np.searchsorted(nodes, a), np.searchsorted(nodes, b))
        expected.append(len(nodes) - len(np.unique(labels)))
    assert removal_curve(edges, exact, cuts).tolist() == expected


def test_band_pairs_stay_in_their_band_and_are_bounded():
    rng = np.random.default_rng(0)
    edges = _edges([(i, i + 1000, s) for i, s in enumerate(rng.uniform(0.8, 1.0, 200))])
    bands = band_pairs(edges, 0.8, bands=4, per_band=3)
    assert len(bands) == 4
    for low, high, pairs in bands:
        assert 1 <= len(pairs) <= 3
        assert ((pairs["similarity"] >= np.float32(low) - 1e-6) & (pairs["similarity"] <= high + 1e-6)).all()


def test_pair_html_escapes_keys():
    pair = next(_edges([(1, 2, 0.9)]).itertuples())
    markup = _pair_html(pair, lambda i, alt: "", {1: "<script>", 2: "a'b"})
    assert "<script>" not in markup and "&lt;script&gt;" in markup


@pytest.fixture(scope="module")
def demo_run(demo_session_run):
    return RunDir(demo_session_run[0].root)  # the shared demo run, only read here


def test_demo_curve_bounds_the_real_removals_and_falls_with_the_cut(demo_run):
    import json

    config = json.loads(demo_run.run_config.read_text())
    edges = stored_edges(demo_run, "perceptual")
    cuts = np.array([config["search_thresholds"]["perceptual"], config["thresholds"]["perceptual"], 0.8, 0.95, 1.0])
    curve = removal_curve(edges, _exact_pairs(demo_run), cuts)
    removed = pd.read_parquet(demo_run.remove_keys)
    assert curve[1] >= (removed["reason"] == "duplicate").sum() > 0
    assert (np.diff(curve) <= 0).all() and curve[-1] > 0  # exact copies remain at 1.0


def test_report_has_the_guidance_section_and_orders_the_gallery_by_risk(demo_run):
    page = build_report_html(demo_run.root, top=8, order="risk")
    section = page[page.index("id='thresholds'"):page.index("id='clusters'")]
    assert "Removals against threshold: perceptual" in section and section.count("<h4>") >= 3
    ranking = pd.read_parquet(demo_run.top_duplicates)
    expected = ranking.sort_values(["risk", "rank"], ascending=[False, True]).head(8)["rank"].tolist()
    gallery = page[page.index("id='gallery'"):page.index("id='plots'")]
    assert [int(r) for r in re.findall(r"class='rank' href='#cluster-(\d+)'", gallery)] == expected
    assert expected != sorted(expected)  # the orders differ on the demo, so the test can fail
    by_copies = build_report_html(demo_run.root, top=8)
    gallery = by_copies[by_copies.index("id='gallery'"):by_copies.index("id='plots'")]
    assert [int(r) for r in re.findall(r"class='rank' href='#cluster-(\d+)'", gallery)] == list(range(1, 9))
