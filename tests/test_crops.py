"""Large crops (issue 12): windows rebuilt from the stored perceptual vector, the two-stage crop search,
and the cluster stage joining crops to their photo through `contains`. Real photos (the shipped demo set)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_run, sample_members, write_tar
from PIL import Image

from dedup import pipeline
from dedup.descriptors import crops as windows_of
from dedup.descriptors import descriptor_policy
from dedup.descriptors.perceptual import describe, dihedral_similarity
from dedup.records import RunDir
from dedup.search import crops

DEMO = Path(__file__).resolve().parents[1] / "dedup" / "demo_images"
THRESHOLD = descriptor_policy("perceptual").threshold()


def photo(number: int) -> Image.Image:
    return Image.open(DEMO / f"kodim{number:02d}.jpg").convert("RGB")


def crop(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """A crop by fractions of the side, re-encoded as a web copy would be."""
    width, height = image.size
    cut = image.crop((round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)))
    buffer = io.BytesIO()
    cut.save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


LEFT, RIGHT = (0.0, 0.0, 0.7, 0.85), (0.3, 0.15, 1.0, 1.0)  # 60 % of the area each, overlapping 28 %


def test_the_whole_window_rebuilds_the_stored_whole_view():
    vectors = describe([photo(3), photo(7)])
    rebuilt = windows_of.window_signatures(windows_of.coefficient_blocks(vectors), np.array([[0.0, 0.0, 1.0, 1.0]]))
    cosine = (rebuilt[:, 0] * windows_of.whole_halves(vectors)).sum(axis=1)
    assert cosine.min() > 0.999


def test_large_crops_are_contained_in_their_photo_and_in_no_other():
    parents = [photo(n) for n in (1, 3, 5, 9, 13, 20)]
    boxes = [(0.1, 0.05, 0.9, 0.85), (0.0, 0.3, 0.75, 1.0), (0.1, 0.2, 0.85, 0.95)]  # 64 %, 53 %, 56 % of the area
    children = [crop(image, boxes[i % 3]) for i, image in enumerate(parents)]
    vectors = describe(parents + children)
    n = len(parents)
    assert dihedral_similarity(vectors[:n], vectors[n:]).diagonal().max() < THRESHOLD  # the global view misses them
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    score = crops.containment(vectors, rows.ravel(), n + cols.ravel()).reshape(n, n)
    assert (score.diagonal() >= crops.CROP_CUT).sum() >= n - 2  # 4 of 6 here: the rebuild loses some (BENCHMARKS.md)
    assert score[~np.eye(n, dtype=bool)].max() < crops.CROP_CUT - 0.05


def test_a_forty_percent_crop_is_a_smaller_part_of_its_photo_not_a_large_crop():
    """Issue 12: a large crop keeps 50-75 % of the area; a 40 % crop (the benchmark's distractors) is another
    picture. Its best window presses against the search's area floor: no crop edge (before: 5 of these 36)."""
    parents = [photo(n) for n in (1, 3, 5, 7, 9, 13, 15, 20, 22)]
    boxes = [(0.2, 0.2, 0.83, 0.83), (0.0, 0.0, 0.63, 0.63), (0.3, 0.1, 0.93, 0.73), (0.1, 0.3, 0.75, 0.9)]
    vectors = describe(parents + [crop(image, box) for box in boxes for image in parents])
    n = len(parents)
    score = crops.containment(vectors, np.tile(np.arange(n), len(boxes)), n + np.arange(n * len(boxes)))
    assert (score >= crops.CROP_CUT).sum() <= 1


def test_crop_search_finds_both_crops_of_a_photo_and_joins_nothing_else():
    photos = [photo(n) for n in (2, 8, 14, 19, 23)]
    children = [crop(photos[0], LEFT), crop(photos[0], RIGHT), crop(photos[3], (0.2, 0.0, 1.0, 0.8))]
    vectors = describe(photos + children)

    def same_picture(a, b):
        return np.array([dihedral_similarity(vectors[i][None], vectors[j][None])[0, 0] >= THRESHOLD
                         for i, j in zip(a, b, strict=True)], dtype=bool)

    edges = crops.crop_edges(vectors, same_picture, copy_cut=THRESHOLD)
    found = set(zip(edges.parent.tolist(), edges.child.tolist(), strict=True))
    assert {(0, 5), (0, 6), (3, 7)} <= found
    # Every other edge is between the left and right crop (they overlap): never a different photo.
    assert found - {(0, 5), (0, 6), (3, 7)} <= {(5, 6), (6, 5)}


def test_a_crop_of_a_large_crop_is_no_crop_edge():
    """C keeps 56 % of its photo P and D keeps 56 % of C, so 32 % of P: P -> C is a crop edge, C -> D is not
    (before: all 6 C -> D edges; they chained the benchmark's distractor crops into their photo's cluster)."""
    images = []
    for number in (1, 3, 5, 9, 13, 20):
        large = crop(photo(number), (0.1, 0.1, 0.85, 0.85))
        images += [photo(number), large, crop(large, (0.0, 0.25, 0.75, 1.0))]
    vectors = describe(images)

    def same_picture(a, b):
        return np.array([dihedral_similarity(vectors[i][None], vectors[j][None])[0, 0] >= THRESHOLD
                         for i, j in zip(a, b, strict=True)], dtype=bool)

    edges = crops.crop_edges(vectors, same_picture, copy_cut=THRESHOLD)
    found = set(zip(edges.parent.tolist(), edges.child.tolist(), strict=True))
    assert {(3 * i, 3 * i + 1) for i in range(6)} <= found
    assert not [edge for edge in found if edge[1] % 3 == 2]


def test_a_child_that_fits_two_unrelated_parents_equally_is_not_a_crop():
    vectors = describe([photo(4), photo(11), photo(16)])

    def never_copies(a, b):
        return np.zeros(len(a), dtype=bool)

    def always_copies(a, b):
        return np.ones(len(a), dtype=bool)

    parents, children, score = np.array([0, 1]), np.array([2, 2]), np.array([0.80, 0.75], dtype=np.float32)
    assert crops.specific(vectors, parents, children, score, never_copies).tolist() == [False, False]
    assert crops.specific(vectors, parents, children, score, always_copies).tolist() == [True, True]
    far = np.array([0.80, 0.60], dtype=np.float32)  # the rival is far behind: the best parent stands
    assert crops.specific(vectors, parents, children, far, never_copies).tolist() == [True, False]


def test_copies_the_ordinary_search_joins_are_not_proposed_as_crops():
    parent = photo(21)
    child = crop(parent, (0.0, 0.1, 0.8, 0.9))
    copies = [child.resize((child.width - 8 * k, child.height - 8 * k)) for k in range(1, 8)]
    vectors = describe([parent, child, *copies])
    blind = crops.propose(vectors, proposals=4)
    assert ((blind[0] >= 1) & (blind[1] >= 1)).any()  # copies of the crop fit each other's windows
    parents, children, _ = crops.propose(vectors, proposals=4, copy_cut=THRESHOLD)
    assert not ((parents >= 1) & (children >= 1)).any()
    assert set(children[parents == 0].tolist()) == set(range(1, 9))  # the photo is proposed for every copy


# --- the pipeline: crop stage edges + the guard's `contains` ------------------------------------------


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _run_pipeline(root: Path, images: dict[str, Image.Image], crop_search: bool) -> dict[str, int]:
    members = [m for key, image in images.items() for m in sample_members(key, _jpeg(image))]
    root.mkdir(parents=True, exist_ok=True)
    run = make_run(root / "run", [write_tar(root / "00000.tar", members)], large_crops=crop_search)
    pipeline.run_all(run, with_report=False)
    clusters = pd.read_parquet(RunDir(root / "run").clusters)
    return dict(zip(clusters["key"], clusters["cluster_id"], strict=True))


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    house, boats, door = photo(1), photo(9), photo(5)
    images = {
        "parent": photo(15), "left": crop(photo(15), LEFT), "right": crop(photo(15), RIGHT),
        "house": house, "blend": Image.blend(house, boats, 0.5), "boats": boats,
        "door": door, "other": photo(22),
    }
    return _run_pipeline(root, images, crop_search=True), describe(list(images.values()))


def test_left_and_right_crops_join_their_photo_through_it(crop_run):
    cluster_of, vectors = crop_run
    assert dihedral_similarity(vectors[1:2], vectors[2:3])[0, 0] < THRESHOLD - 0.2  # the crops do not resemble
    assert dihedral_similarity(vectors[:1], vectors[1:3]).max() < THRESHOLD  # nor the photo as a whole
    assert cluster_of["left"] == cluster_of["parent"] == cluster_of["right"]


def test_a_blend_still_does_not_chain_two_unrelated_photos(crop_run):
    cluster_of, _ = crop_run
    assert cluster_of["house"] != cluster_of["boats"]
    assert len({cluster_of[k] for k in ("parent", "door", "other")}) == 3
    assert cluster_of["door"] not in {cluster_of[k] for k in ("house", "boats", "blend")}


def test_the_crop_search_is_off_by_default_and_its_old_edges_are_not_used(tmp_path):
    images = {"parent": photo(15), "left": crop(photo(15), LEFT), "right": crop(photo(15), RIGHT)}
    on = _run_pipeline(tmp_path / "on", images, crop_search=True)
    assert on["left"] == on["parent"] == on["right"]
    # The same run directory again with the search off (--no-large-crops, the default): the crops stand alone.
    off = _run_pipeline(tmp_path / "on", images, crop_search=False)
    assert len(set(off.values())) == 3
    assert not (RunDir(tmp_path / "on").neighbors_dir("perceptual-crops") / "part_0.parquet").exists()


def test_cli_large_crops_flag_is_saved_and_kept_by_a_resumed_run(tmp_path):
    import json

    from typer.testing import CliRunner

    from dedup.cli import app

    images = {"parent": photo(15), "left": crop(photo(15), LEFT), "right": crop(photo(15), RIGHT)}
    members = [m for key, image in images.items() for m in sample_members(key, _jpeg(image))]
    shard, out = str(write_tar(tmp_path / "00000.tar", members)), tmp_path / "run"
    base = ["run", shard, "--out", str(out), "--workers", "0", "--no-report", "--no-progress"]
    runner = CliRunner()
    for extra, expected in (([], False), (["--large-crops"], True), ([], True), (["--no-large-crops"], False)):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "run.json").read_text())["large_crops"] is expected
        clusters = pd.read_parquet(RunDir(out).clusters)
        assert clusters["cluster_id"].nunique() == (1 if expected else 3), extra


def test_large_crops_refuse_a_run_whose_window_index_exceeds_the_memory_budget(tmp_path, monkeypatch):
    from dedup.errors import DedupError

    images = {"parent": photo(15), "left": crop(photo(15), LEFT)}
    members = [m for key, image in images.items() for m in sample_members(key, _jpeg(image))]
    monkeypatch.setattr(crops, "BYTES_PER_IMAGE", 2 * 1024**3)  # two images: 4 GiB, over a 2 GB budget
    run = make_run(tmp_path / "run", [write_tar(tmp_path / "00000.tar", members)], large_crops=True, memory="2GB")
    with pytest.raises(DedupError, match="memory budget") as refused:
        pipeline.run_all(run, with_report=False)
    assert "--no-large-crops" in refused.value.hint


def test_the_indexed_proposal_finds_the_brute_force_parents(monkeypatch):
    """Past FLAT_MAX_WINDOWS the proposal searches an IVF index: the crops' parents are still proposed."""
    parents = [photo(n) for n in (1, 3, 5, 9, 13, 20)]
    children = [crop(image, (0.1, 0.05, 0.9, 0.85)) for image in parents]
    vectors = describe(parents + children)
    exact = crops.propose(vectors, copy_cut=THRESHOLD)
    monkeypatch.setattr(crops, "FLAT_MAX_WINDOWS", 0)  # 216 windows: a 14-list IVF, every list probed
    indexed = crops.propose(vectors, copy_cut=THRESHOLD)
    assert {(i, i + 6) for i in range(6)} <= set(zip(*indexed[:2], strict=True))
    # Same lists probed as the exact search scans: same proposals, same best windows.
    assert sorted(zip(*indexed, strict=True)) == sorted(zip(*exact, strict=True))


def test_cli_neighbors_reruns_the_crop_search_of_a_large_crops_run(tmp_path):
    """`dedup neighbors` then `dedup cluster` on a --large-crops run gives the pipeline's crop clusters."""
    from typer.testing import CliRunner

    from dedup.cli import app

    images = {"parent": photo(15), "left": crop(photo(15), LEFT), "right": crop(photo(15), RIGHT)}
    on = _run_pipeline(tmp_path / "r", images, crop_search=True)
    run = RunDir(tmp_path / "r" / "run")
    crop_part = run.neighbors_dir("perceptual-crops") / "part_0.parquet"
    shutil.rmtree(run.root / "_markers" / "crops")  # as if the crop search had never run
    crop_part.unlink()
    runner = CliRunner()
    assert runner.invoke(app, ["neighbors", str(run.root), "--no-progress"]).exit_code == 0
    assert crop_part.exists()
    assert runner.invoke(app, ["cluster", str(run.root)]).exit_code == 0
    again = pd.read_parquet(run.clusters)
    assert dict(zip(again["key"], again["cluster_id"], strict=True)) == on and len(set(on.values())) == 1



def test_a_representative_crop_is_scored_against_plain_copies_without_crop_edges(tmp_path):
    """A large crop with crops of its own has the most edges and represents its cluster; a plain copy of the
    photo with no crop edge (a crop keeps only 6 proposals; the held-out set's kodim13 has 9 copies) contains
    it and must be scored, or the guard splits it off (it did: 3 kodim13 JPEG copies)."""
    from dedup.records import open_embeddings
    from dedup.stages.crops import contains_scorer

    image = photo(15)
    images = {"photo": image, "large": crop(image, (0.05, 0.05, 0.9, 0.85)), "copy": image.resize((500, 330))}
    _run_pipeline(tmp_path, images, crop_search=True)
    run = RunDir(tmp_path / "run")
    node_ids = np.sort(open_embeddings(run, "perceptual").ids)
    sample_of = dict(pd.read_parquet(run.clusters, columns=["key", "sample_id"]).itertuples(index=False))
    large, copy = (int(np.searchsorted(node_ids, sample_of[key])) for key in ("large", "copy"))
    only_the_crop = (np.array([large]), np.array([large]))  # the crop is an edge end, the copy is not
    contains = contains_scorer(run, node_ids, only_the_crop)
    assert contains(np.array([large]), np.array([copy]))[0] >= 0.0  # the copy contains the crop: it stays


def test_a_representative_crop_is_found_in_a_flipped_copy_of_its_photo(tmp_path):
    """The same with a flipped and a turned copy: they contain the crop the other way round (held-out set:
    kodim12's `vflip+blur` and `rot90` copies were split off a cluster its crop represented)."""
    from dedup.records import open_embeddings
    from dedup.stages.crops import contains_scorer

    image = photo(12)
    images = {"photo": image, "large": crop(image, (0.05, 0.05, 0.9, 0.85)),
              "flipped": image.transpose(Image.Transpose.FLIP_TOP_BOTTOM), "turned": image.transpose(Image.Transpose.ROTATE_90)}
    _run_pipeline(tmp_path, images, crop_search=True)
    run = RunDir(tmp_path / "run")
    node_ids = np.sort(open_embeddings(run, "perceptual").ids)
    sample_of = dict(pd.read_parquet(run.clusters, columns=["key", "sample_id"]).itertuples(index=False))
    large, flipped, turned = (int(np.searchsorted(node_ids, sample_of[key])) for key in ("large", "flipped", "turned"))
    contains = contains_scorer(run, node_ids, (np.array([large]), np.array([large])))
    assert (contains(np.array([large, large]), np.array([flipped, turned])) >= 0.0).all()
