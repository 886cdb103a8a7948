"""Engine seam: markers, skips, retries, stats, the missing-extra error, and Ray running the same stage."""

from __future__ import annotations

import importlib.util
import json
import sys

import pandas as pd
import pytest
from conftest import make_run

import dedup.engine as engine_module
from dedup.engine import LocalEngine, StageFailed, TaskIncomplete, check_ray_address
from dedup.errors import DedupError, MissingExtraError, require
from dedup.records import RunDir


class CountingStage:
    """A real stage: writes one file per task; fails the first attempt of task 'flaky'."""

    name = "count"

    def __init__(self, run: RunDir, tasks: list[str], fail_always: str | None = None) -> None:
        self.run_dir, self.tasks, self.fail_always = run, tasks, fail_always
        self.attempts: dict[str, int] = {}

    def task_ids(self):
        return self.tasks

    def run_task(self, task_id, progress):
        self.attempts[task_id] = self.attempts.get(task_id, 0) + 1
        if task_id == self.fail_always or (task_id == "flaky" and self.attempts[task_id] == 1):
            raise RuntimeError(f"boom in {task_id}")
        (self.run_dir.root / f"{task_id}.out").write_text(task_id)
        progress(3)
        return {"samples": 3, "status.ok": 2}

    def close(self):
        pass


def test_markers_skip_finished_tasks_and_stats_add_up(tmp_path):
    run = RunDir(tmp_path)
    stage = CountingStage(run, ["a", "b", "flaky"])
    report = LocalEngine(run, show_progress=False, backoff_s=0).run(stage)
    assert report.tasks_run == 3 and stage.attempts == {"a": 1, "b": 1, "flaky": 2}
    assert report.stats["samples"] == 9 and report.stats["status.ok"] == 6
    again = CountingStage(run, ["a", "b", "flaky", "c"])
    report = LocalEngine(run, show_progress=False, backoff_s=0).run(again)
    assert again.attempts == {"c": 1} and report.tasks_skipped == 3
    assert report.stats["samples"] == 12  # earlier tasks' stats come from their markers


def test_failing_task_is_reported_and_others_are_kept(tmp_path):
    run = RunDir(tmp_path)
    stage = CountingStage(run, ["a", "bad", "c"], fail_always="bad")
    with pytest.raises(StageFailed, match="1 of 3 tasks failed") as info:
        LocalEngine(run, retries=2, show_progress=False, backoff_s=0).run(stage)
    assert "rerun the same command" in str(info.value)
    assert stage.attempts["bad"] == 3
    assert run.marker("count", "a").exists() and run.marker("count", "c").exists()
    assert not run.marker("count", "bad").exists()


def test_failed_task_is_listed_with_its_traceback(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(StageFailed, match=r"failed_count\.parquet"):
        LocalEngine(run, retries=0, show_progress=False, backoff_s=0).run(CountingStage(run, ["a", "bad"], fail_always="bad"))
    (row,) = pd.read_parquet(run.failed_tasks("count")).to_dict("records")
    assert row["task_id"] == "bad" and row["status"] == "error" and "boom in bad" in row["error"]


class IncompleteStage:
    """A stage whose task 'cut' reads only part of its input for its first `cut_runs` attempts."""

    name = "embed"

    def __init__(self, run: RunDir, cut_attempts: int) -> None:
        self.run_dir, self.cut_attempts, self.attempts = run, cut_attempts, 0

    def task_ids(self):
        return ["ok", "cut"]

    def run_task(self, task_id, progress):
        if task_id == "cut":
            self.attempts += 1
            if self.attempts <= self.cut_attempts:
                raise TaskIncomplete("truncated", "cut.tar: the tar ends early", {"samples": 2, "status.ok": 2})
        return {"samples": 5, "status.ok": 5}

    def describe_task(self, task_id):
        return {"shard_index": 0 if task_id == "ok" else 1, "url": f"{task_id}.tar"}

    def close(self):
        pass


def test_incomplete_task_is_retried_with_backoff_recorded_and_retried_next_run(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(engine_module.time, "sleep", waits.append)
    run = RunDir(tmp_path)
    stage = IncompleteStage(run, cut_attempts=10)
    report = LocalEngine(run, retries=2, show_progress=False, backoff_s=0.5).run(stage)  # tolerated: no raise
    assert stage.attempts == 3 and waits == [0.5, 1.0]
    assert not run.marker("embed", "cut").exists() and run.marker("embed", "ok").exists()
    assert report.stats["samples"] == 7  # the cut shard's readable samples count
    (row,) = pd.read_parquet(run.failed_shards).to_dict("records")
    assert {k: row[k] for k in ("task_id", "status", "attempts", "shard_index", "url", "samples_read")} == {
        "task_id": "cut", "status": "truncated", "attempts": 3, "shard_index": 1, "url": "cut.tar", "samples_read": 2}
    assert "the tar ends early" in row["error"] and row["failed_at"]
    again = IncompleteStage(run, cut_attempts=0)  # the next run: the shard now reads in full
    report = LocalEngine(run, show_progress=False, backoff_s=0).run(again)
    assert again.attempts == 1 and report.tasks_skipped == 1 and run.marker("embed", "cut").exists()
    assert not run.failed_shards.exists()


def test_transient_failure_succeeds_within_the_run(tmp_path):
    run = RunDir(tmp_path)
    stage = IncompleteStage(run, cut_attempts=1)
    report = LocalEngine(run, retries=2, show_progress=False, backoff_s=0).run(stage)
    assert stage.attempts == 2 and not report.failures and not run.failed_shards.exists()
    assert json.loads(run.marker("embed", "cut").read_text())["attempts"] == 2


def test_unreachable_ray_address_fails_fast_with_a_hint():
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(DedupError, match="cannot reach the Ray cluster") as info:
        check_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5 and "--ray-address" in info.value.hint
    with pytest.raises(DedupError, match="cannot read --ray-address"):
        check_ray_address("head:notaport")
    check_ray_address(None)
    check_ray_address("auto")


def test_missing_extra_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray_not_here", None)
    with pytest.raises(MissingExtraError) as info:
        require("ray_not_here", "ray", "ray", "the Ray engine")
    assert "pip install 'dedup[ray]'" in str(info.value)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'dedup[ray]')")
def test_ray_engine_runs_the_embed_stage_like_the_local_one(tmp_path):
    import numpy as np
    import pandas as pd
    import ray

    from dedup import pipeline
    from dedup.synth import build_demo

    shards, _ = build_demo(tmp_path / "shards")
    specs = [str(p) for p in shards]
    runs = {engine: make_run(tmp_path / engine, specs, engine=engine) for engine in ("local", "ray")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pipeline.embed(runs["local"])
        report = pipeline.embed(runs["ray"])
        for run in runs.values():
            pipeline.build_indexes(run)
            pipeline.find_neighbors(run)
    finally:
        ray.shutdown()
    edges = [pd.read_parquet(RunDir(tmp_path / name).neighbors_dir("perceptual")).sort_values(["id_a", "id_b"], ignore_index=True)
             for name in ("local", "ray")]
    assert len(edges[0]) > 0
    pd.testing.assert_frame_equal(edges[0][["id_a", "id_b"]], edges[1][["id_a", "id_b"]])
    assert report.tasks_run == len(shards)
    for i in range(len(shards)):
        a = RunDir(tmp_path / "local")
        b = RunDir(tmp_path / "ray")
        np.testing.assert_array_equal(np.load(a.embedding_part("perceptual", i)), np.load(b.embedding_part("perceptual", i)))
        pd.testing.assert_frame_equal(pd.read_parquet(a.samples_part(i)), pd.read_parquet(b.samples_part(i)))
        assert b.marker("embed", str(i)).exists()


def test_every_stage_runs_behind_the_engine_and_reruns_only_when_its_inputs_change(tmp_path):
    import pandas as pd

    from dedup import pipeline
    from dedup.run import Run
    from dedup.synth import build_demo

    shards, _ = build_demo(tmp_path / "shards")
    run = make_run(tmp_path / "run", shards)
    pipeline.run_all(run)
    markers = run.root / "_markers"
    for stage in ("embed", "index-perceptual-train", "neighbors-perceptual", "cluster", "rank", "manifests", "report"):
        assert list((markers / stage).glob("*.done")), f"{stage} left no completion marker"
    stamp = (markers / "cluster" / "0.done").stat().st_mtime_ns
    pipeline.cluster(Run.open(run.root))  # same inputs and cuts: skipped
    assert (markers / "cluster" / "0.done").stat().st_mtime_ns == stamp
    stricter = Run.open(run.root, thresholds={"perceptual": 0.9}, search=False)
    pipeline.cluster(stricter)
    assert (markers / "cluster" / "0.done").stat().st_mtime_ns != stamp
    ranking = pipeline.rank(stricter)
    assert ranking.equals(pd.read_parquet(run.top_duplicates))


def test_ray_settings_reach_the_engine(tmp_path):
    pytest.importorskip("ray")
    from dataclasses import replace

    from dedup.engine import RayEngine, make_engine

    run = make_run(tmp_path / "run", [])
    run.settings = replace(run.settings, engine=replace(run.settings.engine, name="ray", ray_actors=5,
                                                        ray_cpus_per_actor=2.0, ray_gpus_per_actor=1.0))
    engine = make_engine(run)
    assert isinstance(engine, RayEngine)
    assert (engine.num_actors, engine.cpus_per_actor, engine.gpus_per_actor, engine.show_progress) == (5, 2.0, 1.0, False)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'dedup[ray]')")
def test_every_stage_on_ray_gives_the_local_answer(tmp_path):
    import pandas as pd
    import ray

    from dedup import pipeline
    from dedup.synth import build_demo

    shards, _ = build_demo(tmp_path / "shards")
    runs = {engine: make_run(tmp_path / engine, shards, engine=engine) for engine in ("local", "ray")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for run in runs.values():
            pipeline.run_all(run)
    finally:
        ray.shutdown()
    local, remote = runs["local"], runs["ray"]
    for stage in ("cluster", "rank", "manifests", "report"):
        marker = json.loads((remote.root / "_markers" / stage / "0.done").read_text())
        assert marker["fingerprint"], stage
    for table in ("clusters.parquet", "top_duplicates.parquet", "remove_keys.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(local.root / table), pd.read_parquet(remote.root / table))
