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
from dedup.settings import EngineSettings

ProgressFn = Callable[[int], None]


class Stage(Protocol):
    """What the engine runs. Optional: `fingerprint()` (a str naming the inputs and settings the outputs
    depend on: a finished task whose marker carries another fingerprint is stale) and `reset()` (remove
    the stage's outputs before stale tasks run again)."""

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


def _fingerprint(stage: Stage) -> str | None:
    method = getattr(stage, "fingerprint", None)
    return method() if method is not None else None


def _is_done(run: RunDir, stage: str, task_id: str, fingerprint: str | None = None) -> bool:
    path = run.marker(stage, task_id)
    if not path.exists():
        return False
    return fingerprint is None or json.loads(path.read_text()).get("fingerprint") == fingerprint


def _mark_done(run: RunDir, stage: str, task_id: str, stats: dict[str, Any], seconds: float, attempts: int,
               fingerprint: str | None = None) -> None:
    record = {"stats": stats, "seconds": round(seconds, 3), "attempts": attempts, "fingerprint": fingerprint}
    write_json(record, run.marker(stage, task_id))


def unfinished_tasks(run: RunDir, stage: Stage) -> list[str]:
    """Tasks without a current marker (read-only: nothing is reset)."""
    fingerprint = _fingerprint(stage)
    return [t for t in stage.task_ids() if not _is_done(run, stage.name, t, fingerprint)]


def pending_tasks(run: RunDir, stage: Stage, task_ids: list[str]) -> tuple[list[str], str | None]:
    """Tasks still to run. A stage whose inputs or settings changed (another fingerprint) starts over."""
    fingerprint = _fingerprint(stage)
    pending = [t for t in task_ids if not _is_done(run, stage.name, t, fingerprint)]
    stale = [t for t in task_ids if t in pending and run.marker(stage.name, t).exists()]
    if stale and hasattr(stage, "reset"):
        stage.reset()
        for path in (run.root / "_markers" / stage.name).glob("*.done"):
            path.unlink(missing_ok=True)
        pending = list(task_ids)
    return pending, fingerprint


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
        pending, self._fingerprint = pending_tasks(self.run_dir, stage, task_ids)
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
            _mark_done(self.run_dir, stage.name, task_id, stats, time.perf_counter() - began, attempt,
                       self._fingerprint)
            return


class RayEngine:
    """Runs tasks on a Ray cluster: one actor per worker slot, each building its own resources.

    Outputs are written by the actors straight into the run directory, so the
    run directory must be on storage every node sees (NFS, a mounted bucket).
    """

    def __init__(self, run: RunDir, address: str | None = None, num_actors: int = 2,
                 cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, retries: int = 1,
                 show_progress: bool = True) -> None:
        self.ray = require("ray", "ray", "ray", "the Ray engine")
        self.run_dir = run
        self.address = address
        self.num_actors = num_actors
        self.cpus_per_actor = cpus_per_actor
        self.gpus_per_actor = gpus_per_actor
        self.retries = retries
        self.show_progress = show_progress

    def run(self, stage: Stage, unit: str = "samples") -> StageReport:
        ray = self.ray
        started = time.perf_counter()
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        task_ids = stage.task_ids()
        pending, fingerprint = pending_tasks(self.run_dir, stage, task_ids)
        report = StageReport(stage.name, len(task_ids), len(pending), len(task_ids) - len(pending), 0.0)
        actor_cls = ray.remote(num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor)(_StageActor)
        actors = [actor_cls.remote(stage) for _ in range(max(1, min(self.num_actors, len(pending) or 1)))]
        pool = ray.util.ActorPool(actors)
        outcomes = pool.map_unordered(lambda actor, tid: actor.run.remote(tid, self.retries), pending)
        with Progress(stage.name, len(task_ids), unit, enabled=self.show_progress) as bar:
            bar.advance_tasks(len(task_ids) - len(pending))
            for task_id, stats, seconds, attempts, error in outcomes:
                if error is None:
                    _mark_done(self.run_dir, stage.name, task_id, stats, seconds, attempts, fingerprint)
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


def make_engine(run: RunDir, settings: EngineSettings | None = None) -> LocalEngine | RayEngine:
    """The engine the run's settings name (`run.settings.engine` when `run` is a `dedup.run.Run`)."""
    engine = settings or getattr(getattr(run, "settings", None), "engine", None) or EngineSettings()
    if engine.name == "local":
        return LocalEngine(run, retries=engine.retries, show_progress=engine.show_progress)
    if engine.name == "ray":
        return RayEngine(run, address=engine.ray_address, num_actors=engine.ray_actors,
                         cpus_per_actor=engine.ray_cpus_per_actor, gpus_per_actor=engine.ray_gpus_per_actor,
                         retries=engine.retries, show_progress=engine.show_progress)
    raise DedupError(f"unknown engine {engine.name!r}", hint="use --engine local or --engine ray")


def run_stage(run: RunDir, stage: Stage, unit: str = "samples") -> StageReport:
    """Run one stage behind the run's engine (markers, retries, stats, progress)."""
    return make_engine(run).run(stage, unit=unit)
