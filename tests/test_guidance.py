"""Threshold guidance in the report (removals against the cut, pairs per band) and the gallery ordered by risk."""

from __future__ import annotations

import re

import numpy as np
import oracles
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dedup.records import RunDir, write_table
from dedup.stages import guidance
from dedup.stages.guidance import EDGE, _pair_html, band_pairs, descriptor_guidance, distinct_edges, removal_curve
from dedup.stages.report import build_report_html, similarity_histogram


def _edges(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["id_a", "id_b", "similarity"]).astype({"similarity": "float32"})


def _passes(edges: pd.DataFrame, batch: int = 7):
    """The frame as an EdgePasses: EDGE records `batch` rows at a time."""
    records = np.empty(len(edges), dtype=EDGE)
    records["a"], records["b"], records["s"] = edges["id_a"], edges["id_b"], edges["similarity"]
    return lambda: (records[i : i + batch] for i in range(0, len(records), batch))


def _curve(edges: pd.DataFrame, exact, cuts, tmp_path) -> np.ndarray:
    ids = np.unique(np.concatenate([edges["id_a"], edges["id_b"], *exact]).astype(np.int64))
    joins = [(np.searchsorted(ids, exact[0]), np.searchsorted(ids, exact[1]))]  # node indices
    return removal_curve(ids, joins, _passes(edges), np.asarray(cuts), tmp_path, chunk_rows=5)


def test_removal_curve_counts_one_kept_per_connected_group(tmp_path):
    edges = _edges([(1, 2, 0.9), (2, 3, 0.8), (10, 11, 0.95)])
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert _curve(edges, none, [0.7, 0.85, 0.99], tmp_path).tolist() == [3, 2, 0]
    exact = (np.array([20]), np.array([21]))  # identical bytes count at every cut
    assert _curve(edges, exact, [0.7, 0.99], tmp_path).tolist() == [4, 1]


def test_streamed_curve_equals_the_whole_table_one(tmp_path):
    rng = np.random.default_rng(3)
    edges = _edges([(int(a), int(b), float(s)) for a, b, s in zip(rng.integers(0, 300, 600), rng.integers(300, 600, 600),
                                                                  rng.uniform(0.5, 1.0, 600), strict=False)])
    edges = edges.drop_duplicates(["id_a", "id_b"], ignore_index=True)
    exact = (rng.integers(0, 600, 20), rng.integers(600, 650, 20))
    cuts = np.r_[np.linspace(0.5, 1.0, 11), 0.75]  # a repeated cut, out of order
    assert _curve(edges, exact, cuts, tmp_path).tolist() == oracles.removal_curve(edges, exact, cuts).tolist()
    assert not list(tmp_path.iterdir())  # the band spill is removed


def test_band_pairs_stay_in_their_band_and_are_bounded():
    rng = np.random.default_rng(0)
    edges = _edges([(i, i + 1000, s) for i, s in enumerate(rng.uniform(0.8, 1.0, 200))])
    bands = band_pairs(_passes(edges), 0.8, bands=4, per_band=3)
    assert len(bands) == 4
    for low, high, pairs in bands:
        assert 1 <= len(pairs) <= 3
        assert ((pairs["similarity"] >= np.float32(low) - 1e-6) & (pairs["similarity"] <= high + 1e-6)).all()


def test_band_pairs_equal_the_whole_table_ones_and_keep_the_ends_beyond_the_sample():
    rng = np.random.default_rng(5)
    similarity = np.r_[rng.uniform(0.8, 1.0, 500), np.full(40, 1.0), np.full(9, 0.9)].astype(np.float32)  # ties
    edges = _edges(list(zip(rng.permutation(len(similarity)), 10_000 + rng.integers(0, 50, len(similarity)),
                            similarity, strict=True))).drop_duplicates(["id_a", "id_b"], ignore_index=True)
    for per_band in (1, 3, 5):
        expected = oracles.band_pairs(edges, 0.8, bands=5, per_band=per_band)
        got = band_pairs(_passes(edges, batch=13), 0.8, bands=5, per_band=per_band)
        assert [(lo, hi) for lo, hi, _ in got] == [(lo, hi) for lo, hi, _ in expected]
        for (_, _, mine), (_, _, theirs) in zip(got, expected, strict=True):
            pd.testing.assert_frame_equal(mine.reset_index(drop=True), theirs.reset_index(drop=True))
    # A sample smaller than the bands: the lowest and highest pair of each band stay exact.
    sampled = band_pairs(_passes(edges, batch=13), 0.8, bands=5, per_band=3, sample_rows=4)
    for (_, _, mine), (_, _, theirs) in zip(sampled, oracles.band_pairs(edges, 0.8, bands=5), strict=True):
        assert len(mine) == len(theirs)
        assert mine.iloc[[0, -1]].to_numpy().tolist() == theirs.iloc[[0, -1]].to_numpy().tolist()


# ---------------------------------------------------------------- a random run: streamed against whole-table


def _random_run(root, seed: int = 11) -> RunDir:
    """Samples (some identical bytes, some failed, some without sha256) and edge parts with repeated pairs."""
    rng = np.random.default_rng(seed)
    run = RunDir(root)
    ids = []
    for shard in range(3):
        n = 60
        sample_id = (np.int64(shard) << 32) + np.arange(n, dtype=np.int64)
        sha = np.array([f"{v:064x}" for v in rng.integers(0, 120, n)], dtype=object)
        sha[rng.random(n) < 0.1] = None
        status = np.where(rng.random(n) < 0.1, "decode_error", "ok")
        write_table(pd.DataFrame({"sample_id": sample_id, "status": status, "sha256": sha}), run.samples_part(shard))
        ids.append(sample_id)
    ids = np.concatenate(ids)
    a, b = rng.choice(ids, 900), rng.choice(ids, 900)
    a, b = np.minimum(a, b)[a != b], np.maximum(a, b)[a != b]
    edges = pd.DataFrame({"id_a": a, "id_b": b, "similarity": rng.uniform(0.82, 1.0, len(a)).astype(np.float32)})
    edges.loc[edges.index[:30], "similarity"] = np.float32(1.0)
    edges = edges.drop_duplicates(["id_a", "id_b"], ignore_index=True)
    folder = run.neighbors_dir("perceptual")
    for j, rows in enumerate(np.array_split(np.arange(len(edges)), 4)):
        write_table(edges.iloc[rows].reset_index(drop=True), folder / f"part_{j}.parquet")
    write_table(edges.head(25), folder / "part_g1-0.parquet")  # the same pairs stored again
    return run


class _BoundedReads:
    """Fails a test that reads an edge part (neighbors/) whole or in batches over `limit` rows."""

    def __init__(self, monkeypatch, limit: int) -> None:
        self.limit, self.largest = limit, 0
        init, iter_batches, read, read_table = pq.ParquetFile.__init__, pq.ParquetFile.iter_batches, pq.ParquetFile.read, pq.read_table

        def is_edges(source) -> bool:
            return "neighbors" in str(source)

        def spy_init(handle, source, *args, **kwargs):
            handle.spied_source = source
            init(handle, source, *args, **kwargs)

        def spy_batches(handle, batch_size=65536, **options):
            for batch in iter_batches(handle, batch_size=batch_size, **options):
                if is_edges(handle.spied_source):
                    assert batch_size <= limit and batch.num_rows <= limit
                    self.largest = max(self.largest, batch.num_rows)
                yield batch

        def spy_read(handle, *args, **kwargs):
            assert not is_edges(handle.spied_source), "an edge part was read whole"
            return read(handle, *args, **kwargs)

        def spy_read_table(source, *args, **kwargs):
            assert not is_edges(source), "an edge part was read whole"
            return read_table(source, *args, **kwargs)

        monkeypatch.setattr(pq.ParquetFile, "__init__", spy_init)
        monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_batches)
        monkeypatch.setattr(pq.ParquetFile, "read", spy_read)
        monkeypatch.setattr(pq, "read_table", spy_read_table)


@pytest.mark.parametrize("batch_rows", [None, 16])
def test_histogram_streams_edges_and_equals_the_whole_table_one(tmp_path, monkeypatch, batch_rows):
    run = _random_run(tmp_path / "run")
    expected = [oracles.similarity_histogram(run, "perceptual", low) for low in (0.8, None, 0.9)]
    if batch_rows:
        monkeypatch.setattr(guidance, "EDGE_BATCH_ROWS", batch_rows)
        reads = _BoundedReads(monkeypatch, batch_rows)
    for low, (edges, counts) in zip((0.8, None, 0.9), expected, strict=True):
        got_edges, got_counts = similarity_histogram(run, "perceptual", low)
        np.testing.assert_array_equal(got_edges, edges)
        np.testing.assert_array_equal(got_counts, counts)
    if batch_rows:
        assert 0 < reads.largest <= batch_rows
        assert not list(run.scratch_dir("report").iterdir())  # the spill partitions are removed


def test_distinct_edges_spilled_hold_each_pair_once_with_its_highest_similarity(tmp_path):
    run = _random_run(tmp_path / "run")
    folder = run.neighbors_dir("perceptual")
    again = pd.read_parquet(folder / "part_0.parquet").head(10)
    again["similarity"] = np.float32(0.5)  # a lower repeat loses
    write_table(again, folder / "part_9.parquet")
    expected = oracles.stored_edges(run, "perceptual").sort_values(["id_a", "id_b"], ignore_index=True)
    with distinct_edges(run, "perceptual", batch_rows=32) as passes:
        batches = list(passes())
    assert len(batches) > 1
    got = np.concatenate(batches)
    got = pd.DataFrame({"id_a": got["a"], "id_b": got["b"], "similarity": got["s"]})
    pd.testing.assert_frame_equal(got.sort_values(["id_a", "id_b"], ignore_index=True), expected)


@pytest.mark.parametrize("batch_rows", [None, 16])
def test_guidance_streams_edges_and_equals_the_whole_table_one(tmp_path, monkeypatch, batch_rows):
    run = _random_run(tmp_path / "run")
    config = {"search_thresholds": {"perceptual": 0.84}}
    edges = oracles.stored_edges(run, "perceptual")
    cuts = np.linspace(0.84, 1.0, guidance.CURVE_POINTS)
    exact = oracles.exact_pairs(run)
    assert len(exact[0]) > 0
    expected_curve = oracles.removal_curve(edges, exact, cuts)
    expected_bands = oracles.band_pairs(edges, 0.84)
    if batch_rows:
        monkeypatch.setattr(guidance, "EDGE_BATCH_ROWS", batch_rows)
        _BoundedReads(monkeypatch, batch_rows)
    got = descriptor_guidance(run, "perceptual", config)
    np.testing.assert_array_equal(got.cuts, cuts)
    assert got.removed.tolist() == expected_curve.tolist()
    for (lo, hi, mine), (lo2, hi2, theirs) in zip(got.bands, expected_bands, strict=True):
        assert (lo, hi) == (lo2, hi2)
        pd.testing.assert_frame_equal(mine.reset_index(drop=True), theirs.reset_index(drop=True))
    assert descriptor_guidance(run, "perceptual", {}).low == pytest.approx(float(edges["similarity"].min()))


def test_pair_html_escapes_keys():
    pair = next(_edges([(1, 2, 0.9)]).itertuples())
    markup = _pair_html(pair, lambda i, alt: "", {1: "<script>", 2: "a'b"})
    assert "<script>" not in markup and "&lt;script&gt;" in markup


@pytest.fixture(scope="module")
def demo_run(demo_session_run):
    return RunDir(demo_session_run[0].root)  # the shared demo run, only read here


def test_demo_curve_bounds_the_real_removals_and_falls_with_the_cut(demo_run, tmp_path):
    import json

    config = json.loads(demo_run.run_config.read_text())
    cuts = np.array([config["search_thresholds"]["perceptual"], config["thresholds"]["perceptual"], 0.8, 0.95, 1.0])
    with guidance.run_nodes(demo_run) as (ids, head), distinct_edges(demo_run, "perceptual") as passes:
        curve = removal_curve(ids, guidance.exact_joins(head), passes, cuts, tmp_path)
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


def test_the_read_spy_catches_a_whole_table_reader(tmp_path, monkeypatch):
    run = _random_run(tmp_path / "run")
    _BoundedReads(monkeypatch, 16)
    with pytest.raises(AssertionError, match="read whole"):
        oracles.similarity_histogram(run, "perceptual", 0.8)  # the replaced code: every part read whole
    with pytest.raises(AssertionError, match="read whole"):
        oracles.stored_edges(run, "perceptual")
