"""`dedup run SHARDS --embeddings DIR`: DIR's vectors serve the samples its metadata names, never by key alone."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, make_run, sample_members, write_tar
from PIL import Image

from dedup.pipeline import run_all
from dedup.records import RunDir, open_embeddings
from dedup.stages.embed import embed
from dedup.stages.precomputed import PRECOMPUTED
from dedup.stages.precomputed_join import ShardNames, attach_precomputed, decide_shard_keys, decide_urls

DIM = 32
PER_SHARD = 12


def _image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return jpeg_bytes(Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))


def _key(shard_number: int, row: int) -> str:
    return f"{shard_number:05d}{row:04d}"


def _shard(path, shard_number: int, seed: int, site: str) -> dict[str, tuple[str, str]]:
    """img2dataset-style tar: keys of shard_number (they repeat across outputs); returns key -> (url, sha256)."""
    members, facts = [], {}
    for row in range(PER_SHARD):
        key, image = _key(shard_number, row), _image(seed * 1000 + row)
        url = f"https://{site}.example/{key}.jpg"
        members += sample_members(key, image, url=url)
        facts[key] = (url, hashlib.sha256(image).hexdigest())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tar(path, members)
    return facts


@pytest.fixture
def two_outputs(tmp_path):
    """Two img2dataset outputs with the same shard names and keys: a/00000.tar, a/00001.tar, b/00000.tar."""
    facts = {
        "a0": _shard(tmp_path / "a" / "00000.tar", 0, 1, "a"),
        "a1": _shard(tmp_path / "a" / "00001.tar", 1, 2, "a"),
        "b0": _shard(tmp_path / "b" / "00000.tar", 0, 3, "b"),
    }
    paths = {"a0": tmp_path / "a" / "00000.tar", "a1": tmp_path / "a" / "00001.tar", "b0": tmp_path / "b" / "00000.tar"}
    return paths, facts


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _folder(root, rows: list[dict], vectors: np.ndarray, split: int | None = None) -> None:
    """A clip-retrieval folder from metadata rows (columns as given) and their vectors, in one or two parts."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    cut = [0, split, len(rows)] if split else [0, len(rows)]
    for p, (lo, hi) in enumerate(itertools.pairwise(cut)):
        np.save(root / "img_emb" / f"img_emb_{p}.npy", vectors[lo:hi].astype(np.float16))
        pd.DataFrame(rows[lo:hi]).to_parquet(root / "metadata" / f"metadata_{p}.parquet")


def _laion_rows(facts, shard_number: int, with_sha: bool = True) -> list[dict]:
    """Metadata rows as clip-retrieval writes them over img2dataset shards: image_path names the tar by name only."""
    rows = []
    for key, (url, sha) in facts.items():
        row = {"image_path": f"{shard_number:05d}.tar/{key}.jpg", "url": url, "caption": f"cap {key}"}
        if with_sha:
            row["sha256"] = sha
        rows.append(row)
    return rows


def _coverage(out) -> pd.DataFrame:
    parts = sorted((RunDir(out).root / "precomputed_coverage").glob("coverage_*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def test_same_shard_name_and_key_in_another_output_never_takes_the_vector(tmp_path, two_outputs, single_faiss_thread):
    paths, facts = two_outputs
    rows = _laion_rows(facts["a0"], 0, with_sha=False) + _laion_rows(facts["a1"], 1, with_sha=False)
    rng = np.random.default_rng(0)
    vectors = _unit(rng.standard_normal((len(rows), DIM)))
    vectors[PER_SHARD + 5] = vectors[3]  # a/00000 key 3 and a/00001 key 5: one image by their vectors alone
    _folder(tmp_path / "emb", rows, vectors, split=7)
    run = make_run(tmp_path / "out", [paths["a0"], paths["a1"], paths["b0"]], embeddings=str(tmp_path / "emb"))
    run_all(run, with_report=False)
    coverage = _coverage(tmp_path / "out")
    by_shard = coverage.assign(output=coverage["shard"].str.extract(r"/(a|b)/")[0])
    # 00000.tar names two shards of the run; only the url tells them apart: b's keys repeat a's but not its urls.
    assert (by_shard.loc[by_shard["output"] == "a", "precomputed"] == "shard_key").all()
    assert (by_shard.loc[by_shard["output"] == "b", "precomputed"] == "url_differs").all()
    vectors_run = open_embeddings(RunDir(tmp_path / "out"), PRECOMPUTED)
    assert len(vectors_run) == 2 * PER_SHARD
    clusters = pd.read_parquet(tmp_path / "out" / "clusters.parquet")
    pair = clusters[clusters["key"].isin([_key(0, 3), _key(1, 5)])]
    a_pair = pair[pair["shard"].str.contains("/a/")]
    assert a_pair["cluster_id"].nunique() == 1 and len(a_pair) == 2
    b_twin = pair[pair["shard"].str.contains("/b/")]
    assert len(b_twin) == 1 and int(b_twin["cluster_size"].iloc[0]) == 1  # key 3 of b is another image
    removed = pd.read_parquet(tmp_path / "out" / "remove_keys.parquet")
    assert len(removed) == 1 and removed["key"].iloc[0] in {_key(0, 3), _key(1, 5)}


def test_url_match_where_image_path_names_no_shard_and_sha256_refuses_another_image(tmp_path, two_outputs,
                                                                                    single_faiss_thread):
    paths, facts = two_outputs
    rows = [{"image_path": f"{key}.jpg", "url": url, "sha256": sha} for key, (url, sha) in facts["b0"].items()]
    rows[4]["sha256"] = "0" * 64  # the url's image changed since it was embedded
    vectors = _unit(np.random.default_rng(1).standard_normal((len(rows), DIM)))
    _folder(tmp_path / "emb", rows, vectors)
    run = make_run(tmp_path / "out", [paths["a0"], paths["b0"]], embeddings=str(tmp_path / "emb"))
    embed(run)
    stats = attach_precomputed(run)
    coverage = _coverage(tmp_path / "out").set_index(["shard", "key"])
    b = coverage.loc[str(paths["b0"])]
    assert (b["precomputed"] == "url").sum() == PER_SHARD - 1 and b.loc[_key(0, 4), "precomputed"] == "sha256_differs"
    a = coverage[coverage.index.get_level_values(0).str.contains("/a/")]
    assert (a["precomputed"] == "no_vector").all()  # same keys, other urls: a key alone names nothing
    assert stats["url"] == PER_SHARD - 1
    stored = open_embeddings(RunDir(tmp_path / "out"), PRECOMPUTED)
    row_of = b.loc[b["precomputed"] == "url", "precomputed_row"].to_numpy(np.int64)
    np.testing.assert_allclose(np.asarray(stored[:], dtype=np.float32), vectors[np.sort(row_of)], atol=2e-3)


# ---------------------------------------------------------------- the rules against a brute-force oracle


def test_shard_names_match_exact_paths_or_the_longest_tail():
    shards = pd.DataFrame({"shard_index": [0, 1, 2], "url": ["x/a/00000.tar", "x/b/00000.tar", "s3://y/00001.tar"],
                           "location": ["/d/x/a/00000.tar", "/d/x/b/00000.tar", "s3://y/00001.tar"]})
    names = ShardNames(shards)
    assert names.candidates("/d/x/a/00000.tar") == ([0], True)
    assert names.candidates("00000.tar") == ([0, 1], False)
    assert names.candidates("b/00000") == ([1], False)
    assert names.candidates("s3://y/00001.tar") == ([2], True)
    assert names.candidates("00002.tar") == ([], False)


def _oracle(samples: pd.DataFrame, pre: pd.DataFrame) -> dict[int, str]:
    """Each rule written out per sample, row by row (the module docstring's rules, not its code)."""
    order = ["url_differs", "sha256_differs", "unconfirmed", "ambiguous", "no_vector"]
    verdict = {}
    samples, pre = _none_for_missing(samples), _none_for_missing(pre)
    for s in samples.itertuples():
        named = [p for p in pre.itertuples() if p.kind == "s" and p.join == f"{s.sample_id >> 32}\x1f{s.key}"]
        twins = samples[((samples["sample_id"].to_numpy() >> 32) == s.sample_id >> 32) & (samples["key"] == s.key)]
        by_shard = []
        for p in named:
            if s.url and p.url and s.url != p.url:
                by_shard.append("url_differs")
            elif s.sha256 and p.sha256 and s.sha256 != p.sha256:
                by_shard.append("sha256_differs")
            elif len(named) > 1 or len(twins) > 1:
                by_shard.append("ambiguous")
            elif not (p.exact or (s.url and s.url == p.url) or (s.sha256 and s.sha256 == p.sha256)):
                by_shard.append("unconfirmed")
            else:
                by_shard.append("shard_key")
        reasons = [min(by_shard, key=lambda r: -1 if r == "shard_key" else order.index(r))] if by_shard else ["no_vector"]
        if s.url:
            same = [p for p in pre.itertuples() if p.kind == "u" and p.join == s.url]
            differ = [p for p in same if s.sha256 and p.sha256 and s.sha256 != p.sha256]
            images = {t.sha256 for t in samples.itertuples() if t.url == s.url and t.sha256}
            usable = [p for p in same if p not in differ and not (p.sha256 is None and len(images) > 1)]
            hashes = {p.sha256 for p in usable}
            one = len(usable) == 1 or (len(usable) > 1 and len(hashes) == 1 and None not in hashes)
            reasons.append("url" if one else "no_vector" if not same else
                           "sha256_differs" if len(differ) == len(same) else "ambiguous")
        if "shard_key" in reasons or "url" in reasons:
            verdict[s.sample_id] = "shard_key" if "shard_key" in reasons else "url"
        else:
            verdict[s.sample_id] = min(reasons, key=order.index)
    return verdict


def _none_for_missing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).where(frame.notna(), None)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    n = 40
    keys = rng.integers(0, 12, n).astype(str)
    shard = rng.integers(0, 3, n)
    urls = np.where(rng.random(n) < 0.8, [f"u{v}" for v in rng.integers(0, 25, n)], None)
    hashes = np.where(rng.random(n) < 0.5, [f"h{v}" for v in rng.integers(0, 3, n)], None)
    samples = pd.DataFrame({"sample_id": (shard.astype(np.int64) << 32) + np.arange(n), "key": keys,
                            "url": urls, "sha256": hashes})
    m = 50
    pre_rows = pd.DataFrame({
        "join": [f"{s}\x1f{k}" for s, k in zip(rng.integers(0, 3, m), rng.integers(0, 12, m).astype(str), strict=True)],
        "url": np.where(rng.random(m) < 0.8, [f"u{v}" for v in rng.integers(0, 25, m)], None),
        "sha256": np.where(rng.random(m) < 0.5, [f"h{v}" for v in rng.integers(0, 3, m)], None),
        "exact": rng.random(m) < 0.3, "part": 0, "row": np.arange(m)})
    pre = pd.concat([pre_rows.assign(kind="s"),
                     pre_rows[pre_rows["url"].notna()].assign(kind="u", join=lambda f: f["url"], exact=False)])
    sample_rows = pd.concat([
        samples.assign(kind="s", join=[f"{i >> 32}\x1f{k}" for i, k in zip(samples["sample_id"], samples["key"],
                                                                             strict=True)]),
        samples[samples["url"].notna()].assign(kind="u", join=lambda f: f["url"])])
    return samples, pre, sample_rows


@pytest.mark.parametrize("seed", range(6))
def test_join_rules_equal_the_oracle(seed):
    from dedup.stages.precomputed_join import final_outcome

    samples, pre, sample_rows = _random_case(seed)
    outcomes = pd.concat([decide_shard_keys(pre, sample_rows.drop(columns=["key"])),
                          decide_urls(pre, sample_rows.drop(columns=["key"]))], ignore_index=True)
    got = final_outcome(outcomes).set_index("sample_id")["status"].to_dict()
    expected = _oracle(samples, pre)
    assert got == expected
    assert set(got.values()) & {"shard_key", "url"} and len(set(got.values())) >= 3  # the case exercises the rules


# ---------------------------------------------------------------- out of core, growth, engines


def _a_folder(tmp_path, facts, name="emb") -> np.ndarray:
    rows = _laion_rows(facts["a0"], 0) + _laion_rows(facts["a1"], 1)
    rows += [{"image_path": f"{key}.jpg", "url": url, "sha256": sha} for key, (url, sha) in facts["b0"].items()]
    vectors = _unit(np.random.default_rng(2).standard_normal((len(rows), DIM)))
    vectors[PER_SHARD + 5] = vectors[3]
    vectors[2 * PER_SHARD + 7] = vectors[3]  # b/00000 key 7, matched by url only
    _folder(tmp_path / name, rows, vectors, split=10)
    return vectors


def _attached(tmp_path, paths, name: str, shards=("a0", "a1", "b0"), engine: str = "local") -> RunDir:
    run = make_run(tmp_path / name, [paths[s] for s in shards], embeddings=str(tmp_path / "emb"), engine=engine)
    embed(run)
    attach_precomputed(run)
    return RunDir(run.root)


def _attached_state(run: RunDir) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    vectors = open_embeddings(run, PRECOMPUTED)
    return _coverage(run.root), np.asarray(vectors.ids), np.asarray(vectors[:], dtype=np.float32)


def test_many_buckets_and_shard_groups_give_the_one_bucket_answer(tmp_path, two_outputs, monkeypatch):
    import dedup.stages.precomputed_join as join

    paths, facts = two_outputs
    _a_folder(tmp_path, facts)
    whole = _attached_state(_attached(tmp_path, paths, "one"))
    monkeypatch.setattr(join, "JOIN_ROW_BYTES", 40_000_000)  # 108 rows (36 vectors, 2 x 36 samples): 9 buckets
    monkeypatch.setattr(join, "GROUP_SHARDS", 1)
    split = _attached(tmp_path, paths, "many")
    assert len(list((split.root / "_markers" / "precomputed-join").glob("*.done"))) > 3
    assert len(list((split.root / "_markers" / "precomputed-parts").glob("*.done"))) == 3
    parts = _attached_state(split)
    pd.testing.assert_frame_equal(whole[0], parts[0])
    np.testing.assert_array_equal(whole[1], parts[1])
    np.testing.assert_array_equal(whole[2], parts[2])
    assert set(whole[0]["precomputed"]) == {"shard_key", "url"}


def test_a_run_grown_by_a_shard_keeps_its_parts_and_equals_a_run_from_scratch(tmp_path, two_outputs,
                                                                              single_faiss_thread):
    paths, facts = two_outputs
    _a_folder(tmp_path, facts)
    first = make_run(tmp_path / "grown", [paths["a0"], paths["a1"]], embeddings=str(tmp_path / "emb"))
    run_all(first, with_report=False)
    part = RunDir(first.root).embedding_part(PRECOMPUTED, 0)
    before = part.stat().st_mtime_ns
    grown = make_run(tmp_path / "grown", [paths["a0"], paths["a1"], paths["b0"]], embeddings=str(tmp_path / "emb"))
    run_all(grown, with_report=False)
    assert part.stat().st_mtime_ns == before  # unchanged parts are not rewritten: the index extends
    scratch = make_run(tmp_path / "scratch", [paths["a0"], paths["a1"], paths["b0"]], embeddings=str(tmp_path / "emb"))
    run_all(scratch, with_report=False)
    columns = ["sample_id", "cluster_id", "cluster_size", "is_representative"]
    pd.testing.assert_frame_equal(pd.read_parquet(grown.clusters, columns=columns),
                                  pd.read_parquet(scratch.clusters, columns=columns))
    removed = pd.read_parquet(scratch.remove_keys)
    assert len(removed) == 2  # three copies by their precomputed vectors: a0/3, a1/5 and b0/7 (by url)
    pd.testing.assert_frame_equal(pd.read_parquet(grown.remove_keys), removed)


def test_attach_on_ray_equals_the_local_engine(tmp_path, two_outputs):
    import ray

    paths, facts = two_outputs
    _a_folder(tmp_path, facts)
    local = _attached_state(_attached(tmp_path, paths, "local"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = _attached_state(_attached(tmp_path, paths, "ray", engine="ray"))
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(local[0], remote[0])
    np.testing.assert_array_equal(local[2], remote[2])


# ---------------------------------------------------------------- errors a user meets


def test_metadata_with_keys_alone_is_refused_before_any_shard_is_read(tmp_path, two_outputs):
    from typer.testing import CliRunner

    from dedup.cli import app

    paths, facts = two_outputs
    rows = [{"key": key, "caption": "c"} for key in facts["a0"]]
    _folder(tmp_path / "emb", rows, _unit(np.ones((len(rows), DIM))))
    result = CliRunner().invoke(app, ["run", str(paths["a0"]), "--embeddings", str(tmp_path / "emb"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "neither image_path nor url" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "samples").exists()
    bare = [{"image_path": key, "caption": "c"} for key in facts["a0"]]  # clip-retrieval over webdataset
    _folder(tmp_path / "bare", bare, _unit(np.ones((len(bare), DIM))))
    result = CliRunner().invoke(app, ["run", str(paths["a0"]), "--embeddings", str(tmp_path / "bare"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "bare keys as image_path and no url" in result.output


def test_embeddings_that_name_no_sample_stop_with_the_coverage_to_read(tmp_path, two_outputs):
    from dedup.errors import DedupError

    paths, facts = two_outputs
    rows = [{"image_path": f"00000.tar/{key}.jpg", "url": f"https://elsewhere.example/{key}"} for key in facts["a0"]]
    _folder(tmp_path / "emb", rows, _unit(np.ones((len(rows), DIM))))
    run = make_run(tmp_path / "out", [paths["a0"]], embeddings=str(tmp_path / "emb"))
    embed(run)
    with pytest.raises(DedupError, match="no sample of the shards has a vector") as error:
        attach_precomputed(run)
    assert "precomputed_coverage" in error.value.hint
    assert (_coverage(tmp_path / "out")["precomputed"] == "url_differs").all()


def test_cli_rules_of_the_flag_beside_shards(tmp_path, two_outputs, monkeypatch):
    from typer.testing import CliRunner

    from dedup.cli import app

    paths, facts = two_outputs
    _a_folder(tmp_path, facts)
    (tmp_path / "other").mkdir()
    runner = CliRunner()
    alone = runner.invoke(app, ["run", str(paths["a0"]), "--descriptor", "precomputed", "--out", str(tmp_path / "o1")])
    assert alone.exit_code == 2 and "--embeddings DIR" in alone.output
    embed_only = runner.invoke(app, ["embed", str(paths["a0"]), "--descriptor", "precomputed", "--out",
                                     str(tmp_path / "o1")])
    assert embed_only.exit_code == 2 and "--embeddings DIR" in embed_only.output
    plain = runner.invoke(app, ["embed", str(paths["a0"]), "--out", str(tmp_path / "o2"), "--workers", "0"])
    assert plain.exit_code == 0, plain.output
    later = runner.invoke(app, ["run", str(paths["a0"]), "--embeddings", str(tmp_path / "emb"),
                                "--out", str(tmp_path / "o2"), "--no-report"])
    assert later.exit_code == 2 and "started without --embeddings" in later.output
    ok = runner.invoke(app, ["run", str(paths["a0"]), str(paths["a1"]), "--embeddings", str(tmp_path / "emb"),
                             "--out", str(tmp_path / "o3"), "--no-report", "--workers", "0"])
    assert ok.exit_code == 0, ok.output
    run_json = (tmp_path / "o3" / "run.json").read_text()
    assert '"precomputed"' in run_json and str(tmp_path / "emb") in run_json
    import shutil

    shutil.copytree(tmp_path / "emb", tmp_path / "other" / "emb")
    moved = runner.invoke(app, ["run", str(paths["a0"]), str(paths["a1"]), "--embeddings",
                                str(tmp_path / "other" / "emb"), "--out", str(tmp_path / "o3"), "--no-report"])
    assert moved.exit_code == 2 and "takes its precomputed vectors from" in moved.output
    monkeypatch.chdir(tmp_path)  # the same folder named relatively resumes the run
    again = runner.invoke(app, ["run", str(paths["a0"]), str(paths["a1"]), "--embeddings", "emb",
                                "--out", str(tmp_path / "o3"), "--no-report"])
    assert again.exit_code == 0, again.output


def test_a_remote_folder_is_fetched_part_by_part_and_gives_the_local_answer(tmp_path, two_outputs):
    import fsspec

    paths, facts = two_outputs
    _a_folder(tmp_path, facts)
    local = _attached_state(_attached(tmp_path, paths, "local"))
    memory = fsspec.filesystem("memory")
    for path in sorted((tmp_path / "emb").rglob("*.*")):
        memory.pipe(f"/beside-emb/{path.relative_to(tmp_path / 'emb')}", path.read_bytes())
    run = make_run(tmp_path / "remote", [paths[s] for s in ("a0", "a1", "b0")], embeddings="memory://beside-emb")
    embed(run)
    attach_precomputed(run)
    remote = _attached_state(RunDir(run.root))
    pd.testing.assert_frame_equal(local[0], remote[0])
    np.testing.assert_array_equal(local[2], remote[2])
    assert not run.scratch_dir("precomputed").exists()  # the fetched parts went with the scratch


@pytest.mark.parametrize(("vectors", "samples", "shards", "memory", "expected"), [
    (100, 36, 3, 1 << 30, (1, 3)),                     # small: one bucket, one group
    (2_000_000_000, 2_300_000_000, 230_000, 64 << 30, (154, 256)),  # LAION-2B on a 64 GB node: groups capped
    (10_000_000, 10_000_000, 1000, 1 << 30, (45, 44)),  # 10M, 1 GB: buckets and groups both cut by the budget
    (0, 10_000, 1, 1 << 20, (31, 1)),                   # a budget below one shard still makes progress
])
def test_join_plan_fits_each_task_in_half_the_budget(vectors, samples, shards, memory, expected):
    from dedup.stages.precomputed_join import GROUP_ROW_BYTES, JOIN_ROW_BYTES, plan_sizes

    buckets, group = plan_sizes(vectors, samples, shards, memory)
    assert (buckets, min(group, shards)) == expected
    assert (vectors + 2 * samples) * JOIN_ROW_BYTES / buckets <= memory / 2
    assert group == 1 or group * (samples / shards) * GROUP_ROW_BYTES <= memory / 2


def test_metadata_shorter_than_its_vectors_is_a_clear_error(tmp_path, two_outputs, monkeypatch):
    from dedup.errors import DedupError
    from dedup.stages import precomputed_join

    paths, facts = two_outputs
    _a_folder(tmp_path, facts)
    pd.read_parquet(tmp_path / "emb" / "metadata" / "metadata_1.parquet").iloc[:-1].to_parquet(
        tmp_path / "emb" / "metadata" / "metadata_1.parquet")
    run = make_run(tmp_path / "out", [paths["a0"]], embeddings=str(tmp_path / "emb"))
    embed(run)
    monkeypatch.setattr(precomputed_join, "METADATA_BATCH_ROWS", 4)  # the count is checked after the last batch
    with pytest.raises(DedupError, match="part 1: 26 vectors but 25 metadata rows"):
        attach_precomputed(run)


def test_a_url_whose_image_changed_between_downloads_gives_no_vector_without_a_hash(tmp_path, single_faiss_thread):
    """Two samples of one url with other bytes: a row without sha256 cannot say which it was made from."""
    members = []
    for row, url in enumerate(["https://x.example/same.jpg", "https://x.example/same.jpg", "https://x.example/c.jpg"]):
        members += sample_members(_key(0, row), _image(50 + row), url=url)
    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "00000.tar", members)
    rows = [{"image_path": "same.jpg", "url": "https://x.example/same.jpg"},
            {"image_path": "c.jpg", "url": "https://x.example/c.jpg"}]
    _folder(tmp_path / "emb", rows, _unit(np.random.default_rng(3).standard_normal((2, DIM))))
    run = make_run(tmp_path / "out", [tmp_path / "s" / "00000.tar"], embeddings=str(tmp_path / "emb"))
    run_all(run, with_report=False)
    coverage = _coverage(tmp_path / "out").set_index("key")["precomputed"]
    assert coverage.to_dict() == {_key(0, 0): "ambiguous", _key(0, 1): "ambiguous", _key(0, 2): "url"}
    clusters = pd.read_parquet(tmp_path / "out" / "clusters.parquet")
    assert (clusters["cluster_size"] == 1).all()  # one vector for two images would have merged them


def test_compare_on_a_run_beside_its_vectors_uses_the_descriptors_dedup_computes(tmp_path, two_outputs,
                                                                                single_faiss_thread):
    """Vectors made outside dedup cannot describe evaluation images: compare matches by sha256 and `perceptual`
    instead of stopping on the evaluation run's missing `precomputed` embeddings."""
    from dedup.stages.compare import compare

    paths, facts = two_outputs
    rows = _laion_rows(facts["a0"], 0)
    _folder(tmp_path / "emb", rows, _unit(np.random.default_rng(1).standard_normal((len(rows), DIM))))
    run_all(make_run(tmp_path / "out", [paths["a0"]], embeddings=str(tmp_path / "emb")), with_report=False)
    copied = _image(1000 + 2)  # a/00000.tar key 2, byte for byte
    (tmp_path / "eval").mkdir()
    eval_tar = write_tar(tmp_path / "eval" / "00000.tar",
                         sample_members("e0", copied) + sample_members("e1", _image(987_654)))
    compare(tmp_path / "out", tmp_path / "cmp", eval_shards=[str(eval_tar)], with_report=False)
    table = pd.read_parquet(tmp_path / "cmp" / "contamination.parquet").set_index("key")
    assert table.loc["e0", "train_copies"] >= 1 and table.loc["e0", "best_train_key"] == _key(0, 2)
    assert table.loc["e0", "matched_by"] == "sha256"
    assert table.loc["e1", "train_copies"] == 0
