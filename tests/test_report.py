"""The HTML report: self-contained, escaped, bounded, and robust to unreadable images.

The run directory is written here by hand from synth shards (clusters from the
truth table's group_id), so these tests do not depend on the index, neighbour
and cluster stages.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import io
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, write_tar
from PIL import Image

from dedup.decode import OK, DecodeFailure, decode_image
from dedup.records import RunDir, make_sample_id, write_json, write_table
from dedup.stages import report
from dedup.stages.manifests import KeepPolicy, write_manifests
from dedup.stages.rank import rank_clusters
from dedup.stages.read import read_shard
from dedup.synth import demo_photos, make_laion_like, write_shards

XSS_CAPTION = "<script>alert(1)</script> a tagged caption"
XSS_URL = 'https://evil.example/a.jpg"onmouseover=alert(1) x="'
DESCRIPTOR = "perceptual"
SAMPLES_PER_SHARD = 30


@dataclass(frozen=True)
class FixtureRun:
    root: Path
    shard_paths: list[Path]
    top_cluster_id: int
    top_copies: int
    corrupt_id: int  # claims status ok, but its bytes are a truncated JPEG
    missing_id: int  # its recorded image member is not in the shard
    pair_count: int  # distinct neighbour pairs written (some written twice on purpose)


# ---------------------------------------------------------------- building the run directory


def _synth_samples(seed: int = 7, n_samples: int = 90):
    photos = [p for p in demo_photos() if not p.negative_of]
    samples, truth = make_laion_like(
        [(p.name, p.image) for p in photos], n_samples, seed,
        captions={p.name: p.caption for p in photos}, samples_per_shard=SAMPLES_PER_SHARD, largest_group=12,
    )
    top_group = truth[truth["family"] != "bad"]["group_id"].value_counts().index[0]
    first_of_top = truth.index[truth["group_id"] == top_group][0]
    # The top cluster's representative carries hostile web text.
    samples[first_of_top] = dataclasses.replace(samples[first_of_top], caption=XSS_CAPTION, url=XSS_URL)
    return samples, truth, top_group


def _samples_table(shard_paths: list[Path]) -> pd.DataFrame:
    """What the embed stage records, computed with the same reader and decoder."""
    rows = []
    for shard_index, path in enumerate(shard_paths):
        for raw in read_shard(str(path), shard_index):
            status, error, width, height = OK, None, None, None
            if raw.failure:
                status, error = raw.failure
            else:
                try:
                    decoded = decode_image(raw.image_bytes)
                    width, height = decoded.width, decoded.height
                except DecodeFailure as failure:
                    status, error = failure.status, failure.message
            rows.append({
                "sample_id": make_sample_id(shard_index, raw.position), "shard_index": shard_index,
                "shard": str(path), "key": raw.key, "url": raw.meta.get("url"), "caption": raw.caption,
                "width": width, "height": height, "original_width": raw.meta.get("original_width"),
                "original_height": raw.meta.get("original_height"), "sha256": raw.meta.get("sha256"),
                "image_member": raw.image_member, "status": status, "error": error,
            })
    frame = pd.DataFrame(rows)
    for column in ("width", "height", "original_width", "original_height"):
        frame[column] = frame[column].astype("Int32")
    return frame


def _clusters(samples: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    frame = samples.merge(truth[["key", "group_id", "family"]], on="key")
    clean = frame["family"].isin(["original", "benign", "hard"]) & (frame["status"] == OK)
    frame["group"] = np.where(clean, frame["group_id"], "single:" + frame["key"])
    frame = frame.sort_values("sample_id")
    frame["cluster_id"] = frame.groupby("group")["sample_id"].transform("min")
    frame["cluster_size"] = frame.groupby("group")["sample_id"].transform("size")
    frame["is_representative"] = frame["sample_id"] == frame["cluster_id"]
    rep_sha = frame.set_index("sample_id")["sha256"]
    same_bytes = frame["sha256"].to_numpy() == rep_sha.loc[frame["cluster_id"]].to_numpy()
    order = frame.groupby("group").cumcount()
    edited = np.maximum(0.97 - 0.01 * order, 0.87)  # above the run's 0.86 search threshold, as real edges are
    frame["similarity_to_representative"] = np.where(same_bytes, 1.0, edited).astype(np.float32)
    frame["matched_by"] = np.where(frame["is_representative"], "self", np.where(same_bytes, "sha256", DESCRIPTOR))
    columns = ["sample_id", "shard_index", "shard", "key", "url", "caption", "status", "cluster_id", "cluster_size",
               "is_representative", "similarity_to_representative", "matched_by"]
    return frame[columns].reset_index(drop=True)


def _plant_unreadable(samples: pd.DataFrame, clusters: pd.DataFrame, truth: pd.DataFrame,
                      top_cluster_id: int) -> tuple[int, int]:
    """Move a truncated JPEG (recorded as ok) and a sample with a vanished member into the top cluster."""
    truncated_key = truth.loc[truth["bad_kind"] == "truncated_jpeg", "key"].iloc[0]
    corrupt_id = int(samples.loc[samples["key"] == truncated_key, "sample_id"].iloc[0])
    members = clusters[(clusters["cluster_id"] == top_cluster_id) & ~clusters["is_representative"]]
    missing_id = int(members["sample_id"].iloc[0])
    samples.loc[samples["sample_id"] == corrupt_id, ["status", "error"]] = [OK, None]
    samples.loc[samples["sample_id"] == missing_id, "image_member"] = "no-such-member.jpg"
    planted = clusters["sample_id"] == corrupt_id
    clusters.loc[planted, ["status", "cluster_id", "is_representative", "matched_by"]] = [OK, top_cluster_id, False, DESCRIPTOR]
    clusters.loc[planted, "similarity_to_representative"] = np.float32(0.9)
    in_top = clusters["cluster_id"] == top_cluster_id
    clusters.loc[in_top, "cluster_size"] = int(in_top.sum())
    return corrupt_id, missing_id


def _write_neighbors(run: RunDir, clusters: pd.DataFrame) -> int:
    members = clusters[(clusters["cluster_size"] >= 2) & ~clusters["is_representative"]]
    by_id = clusters.set_index("sample_id")["key"]
    pairs = pd.DataFrame({
        "id_a": members["cluster_id"].to_numpy(np.int64), "id_b": members["sample_id"].to_numpy(np.int64),
        "similarity": members["similarity_to_representative"].to_numpy(np.float32),
    })
    pairs["key_a"], pairs["key_b"] = by_id.loc[pairs["id_a"]].to_numpy(), by_id.loc[pairs["id_b"]].to_numpy()
    pairs["descriptor"] = DESCRIPTOR
    folder = run.neighbors_dir(DESCRIPTOR)
    write_table(pairs, folder / "part_0.parquet")
    write_table(pairs.head(5), folder / "part_1.parquet")  # found again from the other end
    return len(pairs)


def build_fixture_run(base: Path) -> FixtureRun:
    """A complete run directory (no embeddings) over three synth shards with planted duplicates."""
    synth, truth, top_group = _synth_samples()
    shard_paths = write_shards(synth, base / "shards", SAMPLES_PER_SHARD)
    run = RunDir(base / "run")
    samples = _samples_table(shard_paths)
    clusters = _clusters(samples, truth)
    top_keys = truth.loc[truth["group_id"] == top_group, "key"]
    top_cluster_id = int(clusters.loc[clusters["key"].isin(top_keys), "cluster_id"].iloc[0])
    corrupt_id, missing_id = _plant_unreadable(samples, clusters, truth, top_cluster_id)

    write_table(pd.DataFrame({"shard_index": np.arange(len(shard_paths), dtype=np.int32),
                              "url": [str(p) for p in shard_paths]}), run.shards_table)
    for shard_index, part in samples.groupby("shard_index"):
        write_table(part.reset_index(drop=True), run.samples_part(int(shard_index)))
    write_table(clusters, run.clusters)
    write_table(rank_clusters(clusters), run.top_duplicates)
    write_manifests(run, clusters.merge(samples[["sample_id", "width", "height"]], on="sample_id"), KeepPolicy("first"))
    pair_count = _write_neighbors(run, clusters)
    write_json({
        "shard_specs": [str(p) for p in shard_paths], "descriptors": [DESCRIPTOR],
        "thresholds": {DESCRIPTOR: 0.9}, "guards": {DESCRIPTOR: 0.82}, "search_thresholds": {DESCRIPTOR: 0.86},
        "keep": "first", "descriptor_options": {}, "memory_budget_bytes": 2**31, "version": 1,
    }, run.run_config)
    top_copies = int((clusters["cluster_id"] == top_cluster_id).sum())
    return FixtureRun(run.root, shard_paths, top_cluster_id, top_copies, corrupt_id, missing_id, pair_count)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory) -> FixtureRun:
    return build_fixture_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report_html(fixture_run) -> str:
    # copies_shown covers the whole top cluster, so both planted unreadable members are shown.
    path = report.write_report(fixture_run.root, top=8, copies_shown=fixture_run.top_copies)
    return path.read_text(encoding="utf-8")


class _Elements(HTMLParser):
    """Every start tag with its attributes, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _elements(document: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(document)
    return parser.tags


def _image_sources(document: str) -> list[str]:
    return [attrs["src"] for tag, attrs in _elements(document) if tag == "img"]


# ---------------------------------------------------------------- tests


def test_report_is_one_self_contained_file(fixture_run, report_html):
    assert (fixture_run.root / "report" / "index.html").is_file()
    assert [p.name for p in (fixture_run.root / "report").iterdir()] == ["index.html"]
    for tag, attrs in _elements(report_html):
        for name in ("src", "href", "action", "poster", "srcset"):
            value = attrs.get(name) or ""
            assert "http://" not in value and "https://" not in value, (tag, name, value)
        if "href" in attrs:
            assert attrs["href"].startswith("#"), attrs
    sources = _image_sources(report_html)
    assert sources, "the report shows no thumbnail"
    assert all(src.startswith("data:image/jpeg;base64,") for src in sources)


def test_thumbnails_are_small_jpegs(report_html):
    for src in _image_sources(report_html):
        data = base64.b64decode(src.split(",", 1)[1])
        assert len(data) < 16_000
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG"
            assert max(image.size) <= report.THUMB_SIDE


def test_top_cluster_copy_count_and_link(fixture_run, report_html):
    assert f"<b>{fixture_run.top_copies}</b> copies" in report_html
    assert "href='#cluster-1'" in report_html and "id='cluster-1'" in report_html
    section = report_html.split("id='cluster-1'", 1)[1].split("<section", 1)[0]
    assert f"cluster {fixture_run.top_cluster_id}" in section
    assert section.count("<figure") == fixture_run.top_copies


def test_web_content_is_escaped(report_html):
    assert "<script>alert" not in report_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report_html
    assert '"onmouseover=' not in report_html
    assert "&quot;onmouseover=alert(1)" in report_html
    elements = _elements(report_html)
    assert not any(name.startswith("on") for _, attrs in elements for name in attrs)
    assert sum(tag == "script" for tag, _ in elements) == 1  # the report's own image counter


def test_unreadable_images_become_placeholders(fixture_run, report_html):
    placeholders = re.findall(r"class='thumb placeholder'[^>]*><span>([^<]*)</span>", report_html)
    assert any("image member not found in its shard" in text for text in placeholders), placeholders
    assert any(text.startswith("truncated") for text in placeholders), placeholders


def test_read_thumbnails_reports_each_problem(fixture_run):
    run = RunDir(fixture_run.root)
    failed = pd.read_parquet(run.samples_part(0)).query("status != 'ok'")["sample_id"].tolist()
    wanted = [fixture_run.top_cluster_id, fixture_run.corrupt_id, fixture_run.missing_id, 999_999, *failed]
    thumbs = report.read_thumbnails(run.root, wanted)
    assert set(thumbs) == set(wanted)
    assert thumbs[fixture_run.top_cluster_id].image is not None
    assert max(thumbs[fixture_run.top_cluster_id].image.size) == report.THUMB_SIDE
    assert thumbs[fixture_run.corrupt_id].problem.startswith("truncated")
    assert thumbs[fixture_run.missing_id].problem == "image member not found in its shard"
    assert thumbs[999_999].problem == "sample not in the samples table"
    assert all(thumbs[i].problem.startswith("status ") for i in failed)


def test_remote_shards_are_streamed(fixture_run, tmp_path):
    """A shard URL (here `pipe:cat ...`) is streamed with read_shard; the same images come back."""
    remote = tmp_path / "remote-run"
    shutil.copytree(fixture_run.root, remote, ignore=shutil.ignore_patterns("report"))
    run = RunDir(remote)
    shards = pd.read_parquet(run.shards_table)
    shards["url"] = "pipe:cat " + shards["url"]
    write_table(shards, run.shards_table)
    wanted = [fixture_run.top_cluster_id, fixture_run.missing_id, fixture_run.corrupt_id]
    local = report.read_thumbnails(fixture_run.root, wanted)
    streamed = report.read_thumbnails(remote, wanted)
    assert np.array_equal(np.asarray(local[wanted[0]].image), np.asarray(streamed[wanted[0]].image))
    assert streamed[fixture_run.missing_id].image is None and streamed[fixture_run.corrupt_id].image is None


def test_moved_shard_gives_placeholders_not_a_crash(fixture_run, tmp_path):
    moved = tmp_path / "moved-run"
    shutil.copytree(fixture_run.root, moved, ignore=shutil.ignore_patterns("report"))
    run = RunDir(moved)
    write_table(pd.DataFrame({"shard_index": np.arange(3, dtype=np.int32),
                              "url": [str(tmp_path / f"gone_{i}.tar") for i in range(3)]}), run.shards_table)
    document = report.write_report(moved, top=3).read_text(encoding="utf-8")
    assert not _image_sources(document)
    assert "shard file not found" in document


def test_moved_shards_are_counted_in_a_warning(fixture_run, tmp_path):
    from rich.console import Console

    moved = tmp_path / "moved-run"
    shutil.copytree(fixture_run.root, moved, ignore=shutil.ignore_patterns("report"))
    write_table(pd.DataFrame({"shard_index": np.arange(3, dtype=np.int32),
                              "url": [str(tmp_path / f"gone_{i}.tar") for i in range(3)]}), RunDir(moved).shards_table)
    buffer = io.StringIO()
    report.write_report(moved, top=3, log=Console(file=buffer, width=300))
    warning = buffer.getvalue()
    shown = int(re.search(r"(\d+) of (\d+) thumbnails could not be read", warning).group(2))
    assert re.search(rf"{shown} of {shown} thumbnails could not be read", warning) and "shard file not found" in warning


def test_thumbnails_are_found_from_any_working_directory(fixture_run, tmp_path, monkeypatch):
    from dedup.records import record_shards

    relative = tmp_path / "relative-run"
    shutil.copytree(fixture_run.root, relative, ignore=shutil.ignore_patterns("report"))
    run = RunDir(relative)
    run.shards_table.unlink()
    monkeypatch.chdir(fixture_run.shard_paths[0].parent.parent)  # the run was started here, on relative paths
    record_shards(run, [str(p.relative_to(Path.cwd())) for p in fixture_run.shard_paths])
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # `dedup report RUN` from another directory
    thumbs = report.read_thumbnails(relative, [fixture_run.top_cluster_id])
    assert thumbs[fixture_run.top_cluster_id].image is not None, thumbs[fixture_run.top_cluster_id].problem


def test_cluster_mixing_samples_with_and_without_urls_renders(fixture_run, tmp_path):
    mixed = tmp_path / "mixed-run"
    shutil.copytree(fixture_run.root, mixed, ignore=shutil.ignore_patterns("report"))
    run = RunDir(mixed)
    clusters = pd.read_parquet(run.clusters)
    top = clusters.index[clusters["cluster_id"] == fixture_run.top_cluster_id]
    clusters.loc[top[1], "url"] = None  # a sample without .json
    clusters.loc[top[2], "url"] = "javascript:alert(1)"
    clusters.loc[top[3], "url"] = "data:text/html,<script>alert(2)</script>"
    write_table(clusters, run.clusters)
    write_table(rank_clusters(clusters), run.top_duplicates)
    document = report.build_report_html(mixed, top=3, copies_shown=fixture_run.top_copies)
    assert "javascript:alert(1)" in document  # shown as text...
    for tag, attributes in _elements(document):  # ...never as a link or a source
        for name, value in attributes.items():
            assert not (value or "").lower().startswith(("javascript:", "data:text")), (tag, name, value)
    assert "<script>alert(2)" not in document


def test_summary_numbers(fixture_run, report_html):
    run = RunDir(fixture_run.root)
    clusters = pd.read_parquet(run.clusters)
    removed = pd.read_parquet(run.remove_keys)
    duplicate_clusters = clusters.loc[clusters["cluster_size"] >= 2, "cluster_id"].nunique()
    for value, label in [
        (90, "samples"),
        (duplicate_clusters, "duplicate clusters (2+ copies)"),
        (int((clusters["cluster_size"] >= 2).sum()), "samples in duplicate clusters"),
        (int((removed["reason"] == "duplicate").sum()), "duplicates to remove"),
    ]:
        assert f"<div class='value'>{value:,}</div><div class='label'>{label}</div>" in report_html
    statuses = pd.concat(pd.read_parquet(run.samples_part(i)) for i in range(3))["status"].value_counts()
    assert len(statuses) >= 5  # ok and the failure kinds planted by synth
    for status, count in statuses.items():
        assert f"<tr><td>{status}</td><td class='num'>{count:,}</td></tr>" in report_html
    assert "<td>perceptual</td><td class='num'>0.9</td>" in report_html


def test_gallery_and_sections_follow_top(fixture_run):
    document = report.build_report_html(fixture_run.root, top=2, copies_shown=3)
    assert document.count("<article class='card'>") == 2
    assert "id='cluster-2'" in document and "id='cluster-3'" not in document
    first = document.split("id='cluster-1'", 1)[1].split("</section>", 1)[0]
    assert first.count("<figure") == 3
    assert "closest to most different" in first


def test_shown_members_span_the_similarity_range():
    members = pd.DataFrame({
        "sample_id": range(10), "is_representative": [True] + [False] * 9,
        "similarity_to_representative": [1.0] + [0.99 - 0.01 * i for i in range(9)],
    })
    shown = report._shown_members(members, 4)
    assert shown["sample_id"].tolist() == [0, 1, 5, 9]  # representative, closest, middle, most different


def test_plots_are_inline_svg_with_counts(fixture_run, report_html):
    plots = report_html[report_html.index("id='plots'"):report_html.index("</section>", report_html.index("id='plots'"))]
    assert plots.count("<svg class='plot'") == 3  # the threshold-guidance curve lives in its own section
    assert "Copies per image (log-log)" in report_html and "Neighbour similarity: perceptual" in report_html
    edges, counts = report.similarity_histogram(RunDir(fixture_run.root), DESCRIPTOR, 0.86)
    assert counts.sum() == fixture_run.pair_count  # the pairs written twice count once
    assert edges[0] == pytest.approx(0.86) and edges[-1] == pytest.approx(1.0)
    clusters = pd.read_parquet(RunDir(fixture_run.root).clusters)
    distribution = report.copies_distribution(clusters)
    assert distribution.loc[fixture_run.top_copies] == 1
    assert (distribution.index * distribution).sum() == len(clusters)
    per_shard = report.duplicates_per_shard(clusters, 3)
    assert per_shard.sum() == int(((clusters["cluster_size"] >= 2) & ~clusters["is_representative"]).sum())


def test_many_shards_are_grouped_in_the_shard_plot():
    clusters = pd.DataFrame({"shard_index": [0, 1, 299], "cluster_size": [2, 2, 2],
                             "is_representative": [True, False, False]})
    svg = report._shard_plot(report.duplicates_per_shard(clusters, 300))
    assert "mean per shard over runs of 3" in svg
    assert svg.count("<rect") == 100


def test_missing_stage_output_names_the_command_to_run(fixture_run, tmp_path):
    partial = tmp_path / "partial-run"
    shutil.copytree(fixture_run.root, partial, ignore=shutil.ignore_patterns("report", "top_duplicates.parquet"))
    with pytest.raises(report.StoreError, match=r"top_duplicates\.parquet") as raised:
        report.write_report(partial)
    assert raised.value.hint == f"run 'dedup rank {partial}' first"
    RunDir(partial).clusters.unlink()
    with pytest.raises(report.StoreError, match=r"clusters\.parquet"):
        report.write_report(partial)
    assert not (partial / "report").exists()


# ---------------------------------------------------------------- browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=3000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.browser
def test_report_renders_in_headless_chromium(fixture_run, report_html, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium not installed; .ci/run installs it")
    page = (fixture_run.root / "report" / "index.html").as_uri()
    dumped = _headless(binary, tmp_path / "profile", "--dump-dom", page)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dumped.stdout)
    assert body, dumped.stdout[:500]
    loaded = re.search(r'data-loaded-images="(\d+)"', body.group(1))
    total = re.search(r'data-total-images="(\d+)"', body.group(1))
    assert loaded and total, f"the report's load script did not run: {body.group(0)}"
    image_count = len(_image_sources(report_html))
    assert int(total.group(1)) == image_count
    assert int(loaded.group(1)) == image_count
    shot = tmp_path / "report.png"
    _headless(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", page)
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)


# ---------------------------------------------------------------- the stage as engine tasks


@pytest.mark.parametrize("order", ["copies", "risk"])
def test_report_tasks_write_the_page_write_report_writes(fixture_run, tmp_path, order):
    copy = RunDir(shutil.copytree(fixture_run.root, tmp_path / "run", ignore=shutil.ignore_patterns("report")))
    path = report.report_stage(copy, top=8, order=order)
    staged = path.read_text()
    assert staged == report.build_report_html(copy.root, top=8, order=order)
    shown = pd.read_parquet(copy.scratch_dir("report") / "shown.parquet")
    tasks = sorted(p.stem for p in (copy.root / "_markers" / "report-thumbnails").glob("*.done"))
    assert tasks == sorted(str(i) for i in set(shown["shard_index"])) and len(tasks) > 1  # one task per shard
    assert "placeholder" in staged and "data:image/jpeg;base64," in staged  # unreadable and readable both shown
    assert XSS_CAPTION not in staged


def test_report_rerun_skips_every_step_and_a_new_top_redoes_them(fixture_run, tmp_path):
    copy = RunDir(shutil.copytree(fixture_run.root, tmp_path / "run", ignore=shutil.ignore_patterns("report")))
    report.report_stage(copy, top=2)
    page = (copy.report_dir / "index.html").stat().st_mtime_ns
    report.report_stage(copy, top=2)
    assert (copy.report_dir / "index.html").stat().st_mtime_ns == page
    report.report_stage(copy, top=8)
    assert (copy.report_dir / "index.html").read_text() == report.build_report_html(copy.root, top=8)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'dedup[ray]')")
def test_manifests_and_report_on_ray_equal_the_local_engine(demo_session_run, tmp_path):
    """One local Ray cluster for the module: both stages' tasks run on it and write the local answer."""
    from dataclasses import replace

    import ray

    from dedup.run import Run
    from dedup.stages.manifests import manifests_stage

    source = demo_session_run[0].root
    runs = {}
    for engine in ("local", "ray"):
        root = shutil.copytree(source, tmp_path / engine, symlinks=True,
                               ignore=shutil.ignore_patterns("report", "manifests", "remove_keys.parquet", "_markers"))
        run = Run.open(root)
        run.settings = replace(run.settings, engine=replace(run.settings.engine, name=engine, ray_actors=2))
        runs[engine] = run
    manifests_stage(runs["local"])
    report.report_stage(runs["local"], top=10)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = manifests_stage(runs["ray"])
        report.report_stage(runs["ray"], top=10)
    finally:
        ray.shutdown()
    local, remote = runs["local"], runs["ray"]
    assert counts["manifests"] > 1
    for table in ("remove_keys.parquet", "manifests/_index.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(local.root / table), pd.read_parquet(remote.root / table))
    for name in pd.read_parquet(local.manifest_index)["manifest"]:
        pd.testing.assert_frame_equal(pd.read_parquet(local.manifests_dir / name), pd.read_parquet(remote.manifests_dir / name))
    assert (local.report_dir / "index.html").read_text() == (remote.report_dir / "index.html").read_text()
    shards = len(pd.read_parquet(remote.shards_table))
    for stage in ("manifests-prepare", "manifests-shards"):
        assert len(list((remote.root / "_markers" / stage).glob("*.done"))) == shards


@pytest.mark.parametrize("top", [0, 1, 5, 40, 500])
def test_riskiest_clusters_are_chosen_streaming_as_from_the_whole_table(tmp_path, monkeypatch, top):
    import oracles

    rng = np.random.default_rng(2)
    n = 300
    ranking = pd.DataFrame({"rank": np.arange(1, n + 1), "cluster_id": rng.permutation(n) * 7,
                            "risk": rng.choice([0.5, 1.0, 1.5, 2.0], n)})  # many ties, broken by rank
    path = tmp_path / "top_duplicates.parquet"
    write_table(ranking, path)
    expected = oracles.riskiest(path, top)
    monkeypatch.setattr(report, "SCAN_BATCH_ROWS", 16)
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: pytest.fail("the ranking was read whole"))
    assert report._riskiest(path, top) == expected


def test_lost_report_scratch_is_redone_not_a_page_without_thumbnails(fixture_run, tmp_path):
    copy = RunDir(shutil.copytree(fixture_run.root, tmp_path / "run", ignore=shutil.ignore_patterns("report")))
    expected = report.report_stage(copy, top=8).read_text()
    assert expected == report.build_report_html(copy.root, top=8)
    page, markers = copy.report_dir / "index.html", copy.root / "_markers" / "report-thumbnails"
    # 1. the scratch cleaned up and the page deleted: the plan and every thumbnail task are redone.
    shutil.rmtree(copy.scratch_dir("report"))
    page.unlink()
    assert report.report_stage(copy, top=8).read_text() == expected
    # 2. one shard's thumbnails lost (a crash before the page): only that task is redone.
    stamps = {p.stem: p.stat().st_mtime_ns for p in markers.glob("*.done")}
    lost = sorted(stamps)[0]
    copy.scratch_dir("report").joinpath(f"thumbs_{lost}.parquet").unlink()
    page.unlink()
    assert report.report_stage(copy, top=8).read_text() == expected
    assert [t for t in sorted(stamps) if (markers / f"{t}.done").stat().st_mtime_ns != stamps[t]] == [lost]
    # 3. done: the scratch is not needed, nothing reruns.
    shutil.rmtree(copy.scratch_dir("report"))
    done = page.stat().st_mtime_ns
    assert report.forget_lost_outputs(copy, top=8, order="copies") == []
    report.report_stage(copy, top=8)
    assert page.stat().st_mtime_ns == done


# ---------------------------------------------------------------- images read back by offset, checked by sha256


def _run_over(base: Path, shard_path: Path, with_offsets: bool = True) -> RunDir:
    """The shard list and the samples table the embed stage writes (what read_thumbnails reads), by hand."""
    import hashlib

    from dedup.stages.read import ShardStream

    run = RunDir(base / "run")
    write_table(pd.DataFrame({"shard_index": np.array([0], dtype=np.int32), "url": [str(shard_path)]}), run.shards_table)
    rows = [{"sample_id": make_sample_id(0, raw.position), "shard_index": 0, "image_member": raw.image_member,
             "status": OK, "error": None, "sha256": hashlib.sha256(raw.image_bytes).hexdigest(),
             "image_offset": raw.image_offset, "image_bytes": len(raw.image_bytes)}
            for raw in ShardStream(str(shard_path), 0)]
    frame = pd.DataFrame(rows)
    write_table(frame if with_offsets else frame.drop(columns=["image_offset"]), run.samples_part(0))
    return run


def _photo_jpeg(index: int) -> bytes:
    return jpeg_bytes(demo_photos()[index].image, quality=85)


def _same_picture(thumb: report.Thumbnail, jpeg: bytes) -> bool:
    expected = report.make_thumbnail(jpeg).image
    return thumb.image is not None and np.array_equal(np.asarray(thumb.image), np.asarray(expected))


@pytest.mark.parametrize("with_offsets", [True, False])
def test_a_key_repeated_in_a_shard_shows_each_sample_its_own_image(tmp_path, with_offsets):
    """Keys are web data and repeat: the first sample named k0 was shown 'not found', the second with the first's image."""
    first, other, second = _photo_jpeg(1), _photo_jpeg(2), _photo_jpeg(3)
    shard_path = write_tar(tmp_path / "00000.tar", [("k0.jpg", first), ("k1.jpg", other), ("k0.jpg", second)])
    run = _run_over(tmp_path, shard_path, with_offsets)
    ids = [make_sample_id(0, 0), make_sample_id(0, 2)]
    thumbs = report.read_thumbnails(run.root, ids)
    assert _same_picture(thumbs[ids[0]], first) and _same_picture(thumbs[ids[1]], second)


def test_thumbnails_are_read_at_their_offsets_without_scanning_the_shard(tmp_path, monkeypatch):
    images = [_photo_jpeg(i) for i in range(4)]
    shard_path = write_tar(tmp_path / "00000.tar", [(f"k{i}.jpg", data) for i, data in enumerate(images)])
    run = _run_over(tmp_path, shard_path)
    monkeypatch.setattr(report.tarfile, "open", lambda *a, **k: pytest.fail("the shard was scanned"))
    thumbs = report.read_thumbnails(run.root, [make_sample_id(0, 3), make_sample_id(0, 1)])
    assert _same_picture(thumbs[make_sample_id(0, 3)], images[3]) and _same_picture(thumbs[make_sample_id(0, 1)], images[1])


def test_a_shard_rewritten_since_the_run_shows_no_other_image(tmp_path):
    """Same member names, other pictures (a shard re-downloaded): the page must not show them as the run's."""
    shard_path = write_tar(tmp_path / "00000.tar", [("k0.jpg", _photo_jpeg(1)), ("k1.jpg", _photo_jpeg(2))])
    run = _run_over(tmp_path, shard_path)
    write_tar(shard_path, [("k0.jpg", _photo_jpeg(4)), ("k1.jpg", _photo_jpeg(2))])
    thumbs = report.read_thumbnails(run.root, [make_sample_id(0, 0), make_sample_id(0, 1)])
    assert thumbs[make_sample_id(0, 0)].image is None and thumbs[make_sample_id(0, 0)].problem == report.CHANGED
    assert _same_picture(thumbs[make_sample_id(0, 1)], _photo_jpeg(2))  # unchanged bytes, found by the scan
