"""The index as engine stages: train (k-means), probe (one task per row block), group (rows by cell).

Outputs are byte-for-byte those of one probe task over all rows, on the local
engine and on Ray; a killed run resumes at the first unfinished probe block;
the inverse probe lists equal a brute-force oracle; `--nprobe` overrides the
threshold's choice, is kept in run.json and rebuilds the probes when changed.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from conftest import precomputed_run

from dedup.errors import DedupError
from dedup.records import RunDir
from dedup.stages import increment
from dedup.stages.increment import build_indexes, generations_path
from dedup.stages.index import GroupStage, ProbeStage, cell_paths, group_rows_by_cell, index_scratch
from dedup.stages.precomputed import PRECOMPUTED, ingest_embeddings

DIM = 32
# 3 MB: probe blocks of 1,024 rows at 32 dims (index_choice.probe_block_rows), so 5,500 rows make 6 probe tasks.
SMALL_MEMORY = 3 << 20


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_parts(root, parts: list[np.ndarray], which=None) -> None:
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    for p, x in enumerate(parts):
        if which is not None and p not in which:
            continue
        np.save(root / "img_emb" / f"img_emb_{p}.npy", x.astype(np.float16))
        pd.DataFrame({"key": [f"{p}_{r}" for r in range(len(x))]}).to_parquet(root / "metadata" / f"metadata_{p}.parquet")


def _run(tmp_path, name: str, parts: list[np.ndarray], memory=SMALL_MEMORY, nprobe: int | None = None):
    source = tmp_path / "emb"
    if not source.exists():
        _write_parts(source, parts)
    run = precomputed_run(source, tmp_path / name, memory=memory)
    run.settings = replace(run.settings, nprobe=nprobe)
    ingest_embeddings(run, str(source))
    return run


def _random_parts(sizes=(3000, 2500), seed=3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_unit(rng.standard_normal((n, DIM))) for n in sizes]


@pytest.fixture
def forced_ivf(monkeypatch):
    """Exact search never affordable: the cell layout at any size (this process only)."""
    import dedup.search.index_choice as choice

    monkeypatch.setattr(choice, "EXACT_FLOP_BUDGET_CPU", 0.0)


def _index_bytes(run: RunDir) -> dict[str, bytes]:
    # The generation record carries a fresh lineage and the parts' mtimes: not part of the layout.
    return {p.name: p.read_bytes() for p in sorted(run.index_dir.iterdir()) if not p.name.endswith("generations.json")}


def _markers(run: RunDir, stage: str) -> list[str]:
    return sorted(p.stem for p in (run.root / "_markers" / stage).glob("*.done"))


# ---------------------------------------------------------------- inverse probe lists


def _oracle(probes: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    members: list[list[int]] = [[] for _ in range(nlist)]
    for r, row in enumerate(probes.tolist()):  # rows in order: each cell's list comes out ascending
        for c in set(row) - {-1}:
            members[c].append(r)
    bounds = np.concatenate([[0], np.cumsum([len(m) for m in members])])
    return np.array([r for m in members for r in m], dtype=np.int64), bounds


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_inverse_probe_lists_equal_a_brute_force_oracle(tmp_path, block_rows):
    rng = np.random.default_rng(5)
    nlist = 23
    probes = rng.integers(0, nlist, size=(400, 6)).astype(np.int32)
    probes[rng.random(probes.shape) < 0.15] = -1  # faiss' padding
    probes[::7, 2] = probes[::7, 1]  # a cell repeated within a row is listed once
    rows, bounds = _oracle(probes, nlist)
    got = group_rows_by_cell(probes, nlist, tmp_path / "rows.npy", block_rows=block_rows)
    np.testing.assert_array_equal(got, bounds)
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), rows)
    assert got.dtype == np.int64 and np.load(tmp_path / "rows.npy").dtype == np.int64


@pytest.mark.parametrize("nlist", [5, 1 << 16, (1 << 16) + 1, 1 << 18])
def test_the_radix_order_is_a_stable_argsort(nlist):
    from dedup.stages.index import _stable_order

    cells = np.random.default_rng(nlist).integers(0, nlist, size=50_000).astype(np.int64)
    cells[:5] = nlist - 1  # the largest cell, whose high bits the second pass sorts
    np.testing.assert_array_equal(_stable_order(cells, nlist), np.argsort(cells, kind="stable"))


def test_the_group_step_writes_both_csr_lists_of_the_stored_probes(tmp_path, forced_ivf):
    run = _run(tmp_path, "out", _random_parts())
    spec = build_indexes(run, gpu=False)[PRECOMPUTED]
    paths = cell_paths(run.index_dir, PRECOMPUTED)
    probes = np.load(paths["probes.npy"])
    assert probes.shape == (5500, spec.nprobe) and spec.storage == "cells"
    rows, bounds = _oracle(probes, spec.nlist)
    np.testing.assert_array_equal(np.load(paths["probe_rows.npy"]), rows)
    np.testing.assert_array_equal(np.load(paths["probe_bounds.npy"]), bounds)
    home_rows, home_bounds = _oracle(probes[:, :1], spec.nlist)
    np.testing.assert_array_equal(np.load(paths["cell_rows.npy"]), home_rows)
    np.testing.assert_array_equal(np.load(paths["cell_bounds.npy"]), home_bounds)
    assert not list(index_scratch(run, PRECOMPUTED).glob("*")), "probe blocks or the pending build left behind"


def _grow(tmp_path, name: str, rows_per_task: int | None, before_growth=lambda run: None) -> RunDir:
    parts = _random_parts((3000, 2500, 2200))
    source = tmp_path / f"emb-{name}"
    _write_parts(source, parts[:2])
    run = precomputed_run(source, tmp_path / name, memory=SMALL_MEMORY)
    ingest_embeddings(run, str(source))
    build_indexes(run, gpu=False, rows_per_task=rows_per_task)
    _write_parts(source, parts, which=[2])  # the old parts untouched: the run grew
    ingest_embeddings(run, str(source))
    before_growth(run)
    build_indexes(run, gpu=False, rows_per_task=rows_per_task)
    return run


def test_a_grown_cell_layout_probes_only_the_new_rows_in_tasks_and_rebuilds_both_lists(tmp_path, forced_ivf):
    split, whole = _grow(tmp_path, "split", 1024), _grow(tmp_path, "whole", 10**9)
    record = json.loads(generations_path(split.index_dir, PRECOMPUTED).read_text())
    assert record["bounds"] == [0, 5500, 7700]  # extended, not rebuilt
    probe_markers = [json.loads(split.marker(f"index-{PRECOMPUTED}-probe", t).read_text())
                     for t in _markers(split, f"index-{PRECOMPUTED}-probe")]
    assert [m["stats"]["vectors"] for m in probe_markers] == [1024, 1024, 152]  # the 2,200 new rows only
    assert _index_bytes(split) == _index_bytes(whole)
    paths = cell_paths(split.index_dir, PRECOMPUTED)
    spec = json.loads((split.index_dir / f"{PRECOMPUTED}.json").read_text())
    assert spec["n_vectors"] == 7700
    probes = np.load(paths["probes.npy"])
    for rows_file, bounds_file, columns in (("probe_rows.npy", "probe_bounds.npy", probes),
                                            ("cell_rows.npy", "cell_bounds.npy", probes[:, :1])):
        rows, bounds = _oracle(columns, spec["nlist"])
        np.testing.assert_array_equal(np.load(paths[rows_file]), rows)
        np.testing.assert_array_equal(np.load(paths[bounds_file]), bounds)


def test_an_extension_killed_in_its_probe_step_resumes_there_and_equals_an_unbroken_one(tmp_path, forced_ivf,
                                                                                        monkeypatch):
    real = ProbeStage.run_task

    def killed_once(run):
        def stopped_at_1(self, task_id, progress):
            if task_id == "1":
                raise KeyboardInterrupt
            return real(self, task_id, progress)

        monkeypatch.setattr(ProbeStage, "run_task", stopped_at_1)
        with pytest.raises(KeyboardInterrupt):
            build_indexes(run, gpu=False, rows_per_task=1024)
        assert json.loads((run.index_dir / f"{PRECOMPUTED}.json").read_text())["n_vectors"] == 5500  # still whole
        first_block["marker"] = run.marker(f"index-{PRECOMPUTED}-probe", "0")
        first_block["stamp"] = first_block["marker"].stat().st_mtime_ns
        monkeypatch.setattr(ProbeStage, "run_task", real)

    first_block: dict = {}
    resumed, whole = _grow(tmp_path, "resumed", 1024, killed_once), _grow(tmp_path, "whole", 1024)
    assert first_block["marker"].stat().st_mtime_ns == first_block["stamp"]  # block 0 was not probed again
    assert json.loads(generations_path(resumed.index_dir, PRECOMPUTED).read_text())["bounds"] == [0, 5500, 7700]
    assert _index_bytes(resumed) == _index_bytes(whole)


# ---------------------------------------------------------------- probe blocks as engine tasks


def test_probe_tasks_write_the_bytes_of_a_single_task_build(tmp_path, forced_ivf):
    parts = _random_parts()
    split, whole = _run(tmp_path, "split", parts), _run(tmp_path, "whole", parts)
    build_indexes(split, gpu=False, rows_per_task=1000)  # rounded up to whole probe blocks of 1,024 rows
    build_indexes(whole, gpu=False, rows_per_task=10**9)
    assert _markers(split, f"index-{PRECOMPUTED}-probe") == [str(i) for i in range(6)]
    assert _markers(whole, f"index-{PRECOMPUTED}-probe") == ["0"]
    assert _markers(split, f"index-{PRECOMPUTED}-group") == ["0"]
    assert _index_bytes(split) == _index_bytes(whole)
    assert {"probes.npy", "probe_rows.npy", "cell_rows.npy"} <= {n.split(".", 1)[1] for n in _index_bytes(split)}


def test_a_killed_run_resumes_at_the_first_unfinished_probe_block(tmp_path, forced_ivf, monkeypatch):
    parts = _random_parts()
    killed, whole = _run(tmp_path, "killed", parts), _run(tmp_path, "whole", parts)
    build_indexes(whole, gpu=False)
    real = ProbeStage.run_task
    ran: list[str] = []

    def stopped_at_3(self, task_id, progress):
        if task_id == "3":
            raise KeyboardInterrupt  # not retried by the engine: the process is gone
        ran.append(task_id)
        return real(self, task_id, progress)

    monkeypatch.setattr(ProbeStage, "run_task", stopped_at_3)
    with pytest.raises(KeyboardInterrupt):
        build_indexes(killed, gpu=False, rows_per_task=1024)
    assert _markers(killed, f"index-{PRECOMPUTED}-probe") == ["0", "1", "2"]
    assert not (killed.index_dir / f"{PRECOMPUTED}.json").exists()  # no spec: not a usable index yet
    quantizer = cell_paths(killed.index_dir, PRECOMPUTED)["quantizer.faiss"]
    trained = quantizer.stat().st_mtime_ns

    def recorded(self, task_id, progress):
        ran.append(task_id)
        return real(self, task_id, progress)

    ran.clear()
    monkeypatch.setattr(ProbeStage, "run_task", recorded)
    build_indexes(killed, gpu=False, rows_per_task=1024)
    assert ran == ["3", "4", "5"] and quantizer.stat().st_mtime_ns == trained  # no k-means again
    assert _index_bytes(killed) == _index_bytes(whole)


def test_a_group_step_stopped_after_assembling_the_probes_finishes_from_them(tmp_path, forced_ivf, monkeypatch):
    parts = _random_parts()
    run, whole = _run(tmp_path, "stopped", parts), _run(tmp_path, "whole", parts)
    build_indexes(whole, gpu=False)
    monkeypatch.setattr("dedup.stages.index.write_cell_lists", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_indexes(run, gpu=False, rows_per_task=1024)
    assert cell_paths(run.index_dir, PRECOMPUTED)["probes.npy"].exists()
    assert not list(index_scratch(run, PRECOMPUTED).glob("probes_*.npy"))  # blocks removed once assembled
    monkeypatch.undo()
    import dedup.search.index_choice as choice

    monkeypatch.setattr(choice, "EXACT_FLOP_BUDGET_CPU", 0.0)
    build_indexes(run, gpu=False, rows_per_task=1024)
    assert _index_bytes(run) == _index_bytes(whole)


def test_a_flat_index_is_built_by_the_train_step_alone(tmp_path):
    run = _run(tmp_path, "out", _random_parts((300, 200)))
    spec = build_indexes(run, gpu=False)[PRECOMPUTED]
    assert spec.kind == "flat"
    assert ProbeStage(run, PRECOMPUTED).task_ids() == [] and GroupStage(run, PRECOMPUTED).task_ids() == []
    assert _markers(run, f"index-{PRECOMPUTED}-train") == ["0"]
    assert not (run.root / "_markers" / f"index-{PRECOMPUTED}-probe").exists()
    assert json.loads(generations_path(run.index_dir, PRECOMPUTED).read_text())["bounds"] == [0, 500]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'dedup[ray]')")
def test_index_stages_on_ray_equal_the_local_build(tmp_path, forced_ivf):
    import ray

    parts = _random_parts()
    local, remote = _run(tmp_path, "local", parts), _run(tmp_path, "ray", parts)
    remote.settings = replace(remote.settings, engine=replace(remote.settings.engine, name="ray"))
    build_indexes(local, gpu=False, rows_per_task=2048)

    def force_ivf_in_ray_workers():  # nested: pickled by value, so workers need not import this test module
        import dedup.search.index_choice as choice

        choice.EXACT_FLOP_BUDGET_CPU = 0.0

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": force_ivf_in_ray_workers})
    try:
        build_indexes(remote, gpu=False, rows_per_task=2048)
    finally:
        ray.shutdown()
    for stage, tasks in (("train", ["0"]), ("probe", ["0", "1", "2"]), ("group", ["0"])):
        assert _markers(remote, f"index-{PRECOMPUTED}-{stage}") == tasks, stage
        marker = json.loads(remote.marker(f"index-{PRECOMPUTED}-{stage}", "0").read_text())
        assert marker["fingerprint"], stage
    assert json.loads((remote.index_dir / f"{PRECOMPUTED}.json").read_text())["storage"] == "cells"
    assert _index_bytes(remote) == _index_bytes(local)


def test_gpu_probe_tasks_build_their_quantizer_copy_in_the_worker(tmp_path, forced_ivf, monkeypatch):
    """gpu=True: each probe stage object makes its own device copy once (never pickled), the same probes."""
    import pickle

    import dedup.search.faiss_index as faiss_index
    from dedup.search.index_choice import spec_for_kind

    parts = _random_parts()
    gpu, cpu = _run(tmp_path, "gpu", parts), _run(tmp_path, "cpu", parts)
    copies: list[int] = []

    class FakeGpuIndex:  # what index_cpu_to_all_gpus returns: the same `search` interface
        def __init__(self, index):
            copies.append(index.ntotal)
            self.index = index

        def search(self, block, k):
            return self.index.search(block, k)

        def __reduce__(self):
            raise AssertionError("a GPU quantizer was pickled")

    monkeypatch.setattr(faiss_index, "_require_gpu", lambda: None)
    monkeypatch.setattr(faiss_index, "_to_gpu", FakeGpuIndex)
    real_kmeans = faiss_index._kmeans
    monkeypatch.setattr("dedup.stages.index.choose_index_streaming", lambda n, dim, budget, gpu=False, **k: spec_for_kind(
        "ivf_flat", n, dim, nlist=20, nprobe=3, gpu=gpu))
    monkeypatch.setattr(faiss_index, "_kmeans", lambda sample, k, seed, gpu=False: real_kmeans(sample, k, seed))
    build_indexes(gpu, gpu=True, rows_per_task=1024)
    build_indexes(cpu, gpu=False, rows_per_task=1024)
    assert len(copies) == 1  # six tasks, one worker (this process), one device copy
    stage = ProbeStage(gpu, PRECOMPUTED)
    stage._quantizer = FakeGpuIndex.__new__(FakeGpuIndex)
    pickle.dumps(stage)  # the live copy is dropped when a stage is shipped to a worker
    probes = cell_paths(gpu.index_dir, PRECOMPUTED)["probes.npy"]
    np.testing.assert_array_equal(np.load(probes), np.load(cell_paths(cpu.index_dir, PRECOMPUTED)["probes.npy"]))


# ---------------------------------------------------------------- --nprobe


def test_nprobe_replaces_the_thresholds_choice_and_a_change_rebuilds_the_probes(tmp_path, forced_ivf):
    run = _run(tmp_path, "out", _random_parts())
    default = build_indexes(run, gpu=False)[PRECOMPUTED]
    assert default.nprobe == 4  # precomputed: search threshold 0.94 -> choose_nprobe 4
    lineage = json.loads(generations_path(run.index_dir, PRECOMPUTED).read_text())["lineage"]
    run.settings = replace(run.settings, nprobe=9)
    changed = build_indexes(run, gpu=False)[PRECOMPUTED]
    assert changed.nprobe == 9
    assert np.load(cell_paths(run.index_dir, PRECOMPUTED)["probes.npy"]).shape == (5500, 9)
    assert json.loads(generations_path(run.index_dir, PRECOMPUTED).read_text())["lineage"] != lineage


def test_a_grown_run_with_another_nprobe_rebuilds_instead_of_extending(tmp_path, forced_ivf):
    parts = _random_parts((3000, 2500, 1200))
    _write_parts(tmp_path / "emb", parts[:2])
    run = _run(tmp_path, "out", parts)
    build_indexes(run, gpu=False)
    _write_parts(tmp_path / "emb", parts, which=[2])  # the old parts untouched: the run grew
    ingest_embeddings(run, str(tmp_path / "emb"))
    settings = {"memory": SMALL_MEMORY, "gpu": False, "threshold": run.settings.search_thresholds[PRECOMPUTED]}
    assert increment.growth_rows(run, PRECOMPUTED, settings) == 5500  # the same settings would extend
    assert increment.growth_rows(run, PRECOMPUTED, {**settings, "nprobe": 4}) is None  # a given nprobe: rebuild
    run.settings = replace(run.settings, nprobe=6)
    spec = build_indexes(run, gpu=False)[PRECOMPUTED]
    record = json.loads(generations_path(run.index_dir, PRECOMPUTED).read_text())
    assert spec.nprobe == 6 and record["bounds"] == [0, 6700] and record["settings"]["nprobe"] == 6


def test_nprobe_above_the_cell_count_is_a_two_line_error(tmp_path, forced_ivf):
    run = _run(tmp_path, "out", _random_parts(), nprobe=10**6)
    with pytest.raises(DedupError) as error:
        build_indexes(run, gpu=False)
    assert "--nprobe 1000000 is outside 1.." in error.value.message and "precomputed" in error.value.message
    assert "--nprobe between 1 and" in error.value.hint


def test_nprobe_round_trips_through_run_json_and_a_resumed_run_keeps_it(tmp_path):
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings

    requested = Settings.build(shard_specs=["x"], descriptors=["precomputed"], nprobe=12,
                               engine=EngineSettings(show_progress=False))
    assert Settings.from_json(json.loads(json.dumps(requested.to_json()))).nprobe == 12
    Run.start(tmp_path / "out", requested)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["nprobe"] == 12
    assert Run.open(tmp_path / "out").settings.nprobe == 12
    resumed = Run.start(tmp_path / "out", replace(requested, nprobe=None), given=frozenset({"descriptors"}))
    assert resumed.settings.nprobe == 12  # not given this time: the run's
    changed = Run.start(tmp_path / "out", replace(requested, nprobe=20), given=frozenset({"nprobe"}))
    assert changed.settings.nprobe == 20
    assert Settings.from_json({"descriptors": ["precomputed"]}).nprobe is None  # a run.json from before the option


@pytest.mark.parametrize("command", ["run", "index"])
def test_nprobe_zero_exits_2_with_a_two_line_message(tmp_path, command):
    from typer.testing import CliRunner

    from dedup.cli import app

    _write_parts(tmp_path / "emb", _random_parts((50,)))
    if command == "index":
        precomputed_run(tmp_path / "emb", tmp_path / "out")
        args = ["index", str(tmp_path / "out"), "--nprobe", "0"]
    else:
        args = ["run", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "out"), "--nprobe", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: --nprobe must be at least 1, not 0") and lines[1].startswith("hint:")
    assert "Traceback" not in result.output


PLANTED = 1000


def _planted(n: int = 20_000, pairs: int = PLANTED, dim: int = 96, cosine: float = 0.945, seed: int = 2) -> np.ndarray:
    """Isotropic background (IVF's hardest case, as benchmarks/bench_incremental.py) plus copies at `cosine`."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((n, dim)))
    noise = rng.standard_normal((pairs, dim))
    noise = _unit(noise - np.sum(noise * x[:pairs], axis=1, keepdims=True) * x[:pairs])  # orthogonal: exact cosine
    sine = np.sqrt(1 - cosine**2)
    x[n - pairs :] = _unit(cosine * x[:pairs] + sine * noise)  # row i and row n - pairs + i
    return x


def test_nprobe_16_finds_more_planted_pairs_than_the_default_4(tmp_path, forced_ivf):
    from dedup.records import load_edges
    from dedup.stages.neighbors import find_neighbors

    x = _planted()
    found = {}
    for nprobe in (None, 16):
        run = _run(tmp_path, f"nprobe-{nprobe}", [x], memory="1GB", nprobe=nprobe)
        spec = build_indexes(run, gpu=False)[PRECOMPUTED]
        find_neighbors(run, gpu=False)
        edges = load_edges(run, PRECOMPUTED, 0.94)
        rows = {(int(a) & 0xFFFFFFFF, int(b) & 0xFFFFFFFF) for a, b in zip(edges["id_a"], edges["id_b"], strict=True)}
        found[spec.nprobe] = sum((i, len(x) - PLANTED + i) in rows for i in range(PLANTED))
    assert set(found) == {4, 16}
    assert found[16] > found[4] + 0.005 * PLANTED and found[16] >= 0.99 * PLANTED, found


def test_nprobe_above_the_cell_count_stops_on_the_driver_before_any_ray_task(tmp_path, forced_ivf):
    from typer.testing import CliRunner

    from dedup.cli import app

    run = _run(tmp_path, "out", _random_parts())
    run.settings = replace(run.settings, engine=replace(run.settings.engine, name="ray"))
    run.save()
    result = CliRunner().invoke(app, ["index", str(run.root), "--nprobe", "100000"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: --nprobe 100000 is outside 1..141") and lines[1].startswith("hint: pass --nprobe")
    assert not (run.root / "_markers" / f"index-{PRECOMPUTED}-train").exists()  # nothing was shipped to Ray
