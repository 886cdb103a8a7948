"""Engine seam: runs a stage's tasks and owns completion markers, retries and stats.

Stages stay thin: they list task ids and run one task, returning a dict of
counts. The engine skips tasks whose marker exists (that is how every stage
resumes), retries failures, writes the marker with the task's stats, and sums
stats over all tasks. `LocalEngine` runs tasks in this process (a stage may use
its own worker pool); `RayEngine` ships the picklable stage to Ray actors.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dedup.errors import DedupError, require
from dedup.progress import Progress
from dedup.records import RunDir, write_json

ProgressFn = Callable[[int], None]


class Stage(Protocol):
    name: str

    def task_ids(self) -> list[str]: ...

    def run_task(self, task_id: str, progress: ProgressFn) -> dict[str, Any]: ...

    def close(self) -> None: ...


class StageFailed(DedupError):
    pass


@dataclass
class StageReport:
    stage: str
    tasks_total: int
    tasks_run: int
    tasks_skipped: int
    seconds: float
    stats: Counter = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)


def _is_done(run: RunDir, stage: str, task_id: str) -> bool:
    return run.marker(stage, task_id).exists()


def _mark_done(run: RunDir, stage: str, task_id: str, stats: dict[str, Any], seconds: float, attempts: int) -> None:
    write_json({"stats": stats, "seconds": round(seconds, 3), "attempts": attempts}, run.marker(stage, task_id))


def collect_stats(run: RunDir, stage: str, task_ids: list[str]) -> Counter:
    """Sum the numeric stats of every finished task (this run's and earlier ones)."""
    total: Counter = Counter()
    for task_id in task_ids:
        path = run.marker(stage, task_id)
        if path.exists():
            for name, value in json.loads(path.read_text()).get("stats", {}).items():
                if isinstance(value, (int, float)):
                    total[name] += value
    return total


def _finish(run: RunDir, stage: Stage, task_ids: list[str], report: StageReport, started: float) -> StageReport:
    report.seconds = time.perf_counter() - started
    report.stats = collect_stats(run, stage.name, task_ids)
    if report.failures:
        first = next(iter(report.failures.items()))
        raise StageFailed(
            f"stage '{stage.name}': {len(report.failures)} of {len(task_ids)} tasks failed "
            f"(first: task {first[0]}: {first[1].strip().splitlines()[-1]})",
            hint="fix the cause and rerun the same command: finished tasks are kept and skipped",
        )
    return report


class LocalEngine:
    """Runs tasks one after another in this process."""

    def __init__(self, run: RunDir, retries: int = 1, show_progress: bool = True) -> None:
        self.run_dir = run
        self.retries = retries
        self.show_progress = show_progress

    def run(self, stage: Stage, unit: str = "samples") -> StageReport:
        started = time.perf_counter()
        task_ids = stage.task_ids()
        pending = [t for t in task_ids if not _is_done(self.run_dir, stage.name, t)]
        report = StageReport(stage.name, len(task_ids), len(pending), len(task_ids) - len(pending), 0.0)
        try:
            with Progress(stage.name, len(task_ids), unit, enabled=self.show_progress) as bar:
                bar.advance_tasks(len(task_ids) - len(pending))
                for task_id in pending:
                    self._run_with_retries(stage, task_id, bar, report)
                    bar.advance_tasks(1)
        finally:
            stage.close()
        return _finish(self.run_dir, stage, task_ids, report, started)

    def _run_with_retries(self, stage: Stage, task_id: str, bar: Progress, report: StageReport) -> None:
        for attempt in range(1, self.retries + 2):
            began = time.perf_counter()
            try:
                stats = stage.run_task(task_id, bar.advance_items)
            except DedupError:
                raise  # a user-facing error will not go away by retrying
            except Exception:  # noqa: BLE001 - recorded, retried, reported at the end
                report.failures[task_id] = traceback.format_exc()
                continue
            report.failures.pop(task_id, None)
            _mark_done(self.run_dir, stage.name, task_id, stats, time.perf_counter() - began, attempt)
            return


class RayEngine:
    """Runs tasks on a Ray cluster: one actor per worker slot, each building its own resources.

    Outputs are written by the actors straight into the run directory, so the
    run directory must be on storage every node sees (NFS, a mounted bucket).
    """

    def __init__(self, run: RunDir, address: str | None = None, num_actors: int = 2,
                 cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, retries: int = 1) -> None:
        self.ray = require("ray", "ray", "ray", "the Ray engine")
        self.run_dir = run
        self.address = address
        self.num_actors = num_actors
        self.cpus_per_actor = cpus_per_actor
        self.gpus_per_actor = gpus_per_actor
        self.retries = retries

    def run(self, stage: Stage, unit: str = "samples") -> StageReport:
        ray = self.ray
        started = time.perf_counter()
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        task_ids = stage.task_ids()
        pending = [t for t in task_ids if not _is_done(self.run_dir, stage.name, t)]
        report = StageReport(stage.name, len(task_ids), len(pending), len(task_ids) - len(pending), 0.0)
        actor_cls = ray.remote(num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor)(_StageActor)
        actors = [actor_cls.remote(stage) for _ in range(max(1, min(self.num_actors, len(pending) or 1)))]
        pool = ray.util.ActorPool(actors)
        outcomes = pool.map_unordered(lambda actor, tid: actor.run.remote(tid, self.retries), pending)
        with Progress(stage.name, len(task_ids), unit, enabled=True) as bar:
            bar.advance_tasks(len(task_ids) - len(pending))
            for task_id, stats, seconds, attempts, error in outcomes:
                if error is None:
                    _mark_done(self.run_dir, stage.name, task_id, stats, seconds, attempts)
                    bar.advance_items(int(stats.get("samples", 0)))
                else:
                    report.failures[task_id] = error
                bar.advance_tasks(1)
        for actor in actors:
            ray.get(actor.close.remote())
        return _finish(self.run_dir, stage, task_ids, report, started)


class _StageActor:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def run(self, task_id: str, retries: int):
        error = None
        for attempt in range(1, retries + 2):
            began = time.perf_counter()
            try:
                stats = self.stage.run_task(task_id, lambda n: None)
                return task_id, stats, time.perf_counter() - began, attempt, None
            except Exception:  # noqa: BLE001 - sent back to the driver, which reports it
                error = traceback.format_exc()
        return task_id, {}, 0.0, retries + 1, error

    def close(self) -> None:
        self.stage.close()


def make_engine(name: str, run: RunDir, **options) -> LocalEngine | RayEngine:
    if name == "local":
        return LocalEngine(run, show_progress=options.get("show_progress", True))
    if name == "ray":
        return RayEngine(run, address=options.get("ray_address"), num_actors=options.get("ray_actors", 2))
    raise DedupError(f"unknown engine {name!r}", hint="use --engine local or --engine ray")
