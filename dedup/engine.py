"""Engine seam: runs a stage's tasks and owns completion markers, retries and stats.

Stages stay thin: they list task ids and run one task, returning a dict of
counts. The engine skips tasks whose marker exists (that is how every stage
resumes), retries failures with exponential backoff, writes the marker with
the task's stats, and sums stats over all tasks. A task that still fails is
never marked done (the next run retries it) and is listed in the stage's
failures table. A task raising `TaskIncomplete` (a shard cut short or
unreachable) is tolerated: the stage goes on and the failure is reported; any
other exception fails the stage at its end. `LocalEngine` runs tasks in this process (a stage may use
its own worker pool); `RayEngine` ships the picklable stage to Ray actors.
"""

from __future__ import annotations

import json
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from dedup.errors import DedupError, require
from dedup.progress import Progress
from dedup.records import RunDir, write_json
from dedup.settings import EngineSettings

ProgressFn = Callable[[int], None]
# A failing task is tried 1 + DEFAULT_RETRIES times, waiting 1 s, then 2 s, between tries.
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 1.0
# How long to wait for a Ray head node to accept a connection before saying it is unreachable.
RAY_CONNECT_TIMEOUT_S = 5.0


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


class TaskIncomplete(Exception):
    """A task ran but could not read all of its input (a shard cut short, an HTTP error, a stall).

    What it could read is written and usable, but the task is not marked done:
    the engine retries it with backoff, records it in the stage's failures
    table if it still fails, and the next run retries it again.
    """

    def __init__(self, status: str, message: str, stats: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.stats = status, message, dict(stats or {})


# Columns of a stage's failures table (OUT/failed_shards.parquet for the embed stage):
# task_id, status, error (message or traceback), attempts, failed_at (UTC, ISO 8601),
# plus what the stage tells about the task (embed: shard_index, url, samples_read).
FAILURE_ERROR = "error"  # status of a task that raised (a bug or an unexpected fault), not TaskIncomplete


@dataclass
class TaskFailure:
    task_id: str
    status: str
    error: str
    attempts: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return self.error.strip().splitlines()[-1] if self.error.strip() else self.status


@dataclass
class StageReport:
    stage: str
    tasks_total: int
    tasks_run: int
    tasks_skipped: int
    seconds: float
    stats: Counter = field(default_factory=Counter)
    failures: dict[str, TaskFailure] = field(default_factory=dict)


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


def unfinished_tasks(run: RunDir, stage: Stage, task_ids: list[str] | None = None) -> list[str]:
    """Tasks without a current marker (read-only: nothing is reset)."""
    fingerprint = _fingerprint(stage)
    return [t for t in (stage.task_ids() if task_ids is None else task_ids)
            if not _is_done(run, stage.name, t, fingerprint)]


def pending_tasks(run: RunDir, stage: Stage, task_ids: list[str]) -> tuple[list[str], str | None]:
    """Tasks still to run. A stage whose inputs or settings changed (another fingerprint) starts over."""
    pending = unfinished_tasks(run, stage, task_ids)
    stale = any(run.marker(stage.name, t).exists() for t in pending)  # a marker of other inputs or settings
    if stale and hasattr(stage, "reset"):
        stage.reset()
        for path in (run.root / "_markers" / stage.name).glob("*.done"):
            path.unlink(missing_ok=True)
        pending = list(task_ids)
    return pending, _fingerprint(stage)


def done_task_ids(run: RunDir, stage: str) -> list[str]:
    """Tasks of `stage` with a completion marker, current or stale."""
    return [path.stem for path in (run.root / "_markers" / stage).glob("*.done")]


def forget_tasks(run: RunDir, tasks: list[tuple[str, str]]) -> list[str]:
    """Remove the markers of (stage, task) pairs, so the engine runs them again; returns "stage/task" of those that existed."""
    forgotten = [f"{stage}/{task}" for stage, task in tasks if run.marker(stage, task).exists()]
    for stage, task in tasks:
        run.marker(stage, task).unlink(missing_ok=True)
    return forgotten


def collect_stats(run: RunDir, stage: str, task_ids: list[str]) -> Counter:
    """Sum the numeric stats of every finished task (this run's and earlier ones)."""
    total: Counter = Counter()
    for task_id in task_ids:
        path = run.marker(stage, task_id)
        if path.exists():
            _add_stats(total, json.loads(path.read_text()).get("stats", {}))
    return total


def _add_stats(total: Counter, stats: dict[str, Any]) -> None:
    for name, value in stats.items():
        if isinstance(value, (int, float)):
            total[name] += value


def attempt_task(stage: Stage, task_id: str, progress: ProgressFn, retries: int,
                 backoff_s: float) -> tuple[dict[str, Any] | None, TaskFailure | None, float, int]:
    """Run a task up to `retries + 1` times, waiting backoff_s, 2 x backoff_s, ... between tries.

    Returns (stats, None, seconds, attempts) on success, (None, failure, 0, attempts) otherwise.
    A DedupError is raised at once: a user-facing error will not go away by retrying.
    """
    failure = None
    for attempt in range(1, retries + 2):
        if attempt > 1:
            time.sleep(backoff_s * 2 ** (attempt - 2))  # transient faults (a busy server) get time to clear
        began = time.perf_counter()
        try:
            stats = stage.run_task(task_id, progress)
        except DedupError:
            raise
        except TaskIncomplete as exc:
            failure = TaskFailure(task_id, exc.status, exc.message, attempt, exc.stats)
            continue
        except Exception:  # noqa: BLE001 - recorded, retried, reported at the end
            failure = TaskFailure(task_id, FAILURE_ERROR, traceback.format_exc(), attempt)
            continue
        return stats, None, time.perf_counter() - began, attempt
    return None, failure, 0.0, retries + 1


def write_failures(run: RunDir, stage: Stage, failures: dict[str, TaskFailure]) -> None:
    """This run's failed tasks -> the stage's failures table; no failures -> no table (an old one is removed)."""
    path = run.failed_tasks(stage.name)
    if not failures:
        path.unlink(missing_ok=True)
        return
    import pandas as pd

    from dedup.records import write_table

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    describe = getattr(stage, "describe_task", lambda task_id: {})
    rows = [{"task_id": f.task_id, "status": f.status, "error": f.error, "attempts": f.attempts,
             "failed_at": now, **describe(f.task_id), "samples_read": int(f.stats.get("samples", 0))}
            for f in failures.values()]
    write_table(pd.DataFrame(rows), path)


def _finish(run: RunDir, stage: Stage, task_ids: list[str], report: StageReport, started: float) -> StageReport:
    report.seconds = time.perf_counter() - started
    report.stats = collect_stats(run, stage.name, task_ids)
    for failure in report.failures.values():
        _add_stats(report.stats, failure.stats)  # what incomplete tasks could read is used, so it is counted
    write_failures(run, stage, report.failures)
    errors = {t: f for t, f in report.failures.items() if f.status == FAILURE_ERROR}
    if errors:
        task_id, first = next(iter(errors.items()))
        raise StageFailed(
            f"stage '{stage.name}': {len(errors)} of {len(task_ids)} tasks failed "
            f"(first: task {task_id}: {first.summary})",
            hint=f"see {run.failed_tasks(stage.name)}; fix the cause and rerun the same command: finished tasks are kept and skipped",
        )
    return report


def _close(stage: Stage, interrupted: bool) -> None:
    """Normal end: let the stage close cleanly. Ctrl-C: stop its workers now (`abort`), not after their queue."""
    if interrupted and hasattr(stage, "abort"):
        stage.abort()
    else:
        stage.close()


class LocalEngine:
    """Runs tasks one after another in this process, retrying failures with exponential backoff."""

    def __init__(self, run: RunDir, retries: int = DEFAULT_RETRIES, show_progress: bool = True,
                 backoff_s: float = DEFAULT_BACKOFF_S) -> None:
        self.run_dir = run
        self.retries = retries
        self.backoff_s = backoff_s
        self.show_progress = show_progress

    def run(self, stage: Stage, unit: str = "samples") -> StageReport:
        started = time.perf_counter()
        task_ids = stage.task_ids()
        pending, self._fingerprint = pending_tasks(self.run_dir, stage, task_ids)
        report = StageReport(stage.name, len(task_ids), len(pending), len(task_ids) - len(pending), 0.0)
        interrupted = True
        try:
            with Progress(stage.name, len(task_ids), unit, enabled=self.show_progress) as bar:
                bar.advance_tasks(len(task_ids) - len(pending))
                for task_id in pending:
                    self._run_with_retries(stage, task_id, bar, report)
                    bar.advance_tasks(1)
            interrupted = False
        finally:
            _close(stage, interrupted)
        return _finish(self.run_dir, stage, task_ids, report, started)

    def _run_with_retries(self, stage: Stage, task_id: str, bar: Progress, report: StageReport) -> None:
        stats, failure, seconds, attempts = attempt_task(stage, task_id, bar.advance_items, self.retries, self.backoff_s)
        if failure is not None:
            report.failures[task_id] = failure
            return
        _mark_done(self.run_dir, stage.name, task_id, stats, seconds, attempts, self._fingerprint)


class RayEngine:
    """Runs tasks on a Ray cluster: one actor per worker slot, each building its own resources.

    Outputs are written by the actors straight into the run directory, so the
    run directory must be on storage every node sees (NFS, a mounted bucket).
    """

    def __init__(self, run: RunDir, address: str | None = None, num_actors: int = 2,
                 cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, retries: int = DEFAULT_RETRIES,
                 backoff_s: float = DEFAULT_BACKOFF_S, show_progress: bool = True) -> None:
        check_ray_address(address)  # before importing ray: a wrong address must not hang in ray.init
        self.ray = require("ray", "ray", "ray", "the Ray engine")
        self.run_dir = run
        self.address = address
        self.num_actors = num_actors
        self.cpus_per_actor = cpus_per_actor
        self.gpus_per_actor = gpus_per_actor
        self.retries = retries
        self.show_progress = show_progress
        self.backoff_s = backoff_s

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
        outcomes = pool.map_unordered(lambda actor, tid: actor.run.remote(tid, self.retries, self.backoff_s), pending)
        with Progress(stage.name, len(task_ids), unit, enabled=self.show_progress) as bar:
            bar.advance_tasks(len(task_ids) - len(pending))
            for task_id, stats, failure, seconds, attempts in outcomes:
                if failure is None:
                    _mark_done(self.run_dir, stage.name, task_id, stats, seconds, attempts, fingerprint)
                    bar.advance_items(int(stats.get("samples", 0)))
                else:
                    report.failures[task_id] = failure
                bar.advance_tasks(1)
        for actor in actors:
            ray.get(actor.close.remote())
        return _finish(self.run_dir, stage, task_ids, report, started)


class _StageActor:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def run(self, task_id: str, retries: int, backoff_s: float):
        try:
            stats, failure, seconds, attempts = attempt_task(self.stage, task_id, lambda n: None, retries, backoff_s)
        except DedupError as error:  # sent back to the driver, which reports it
            stats, failure, seconds, attempts = None, TaskFailure(task_id, FAILURE_ERROR, str(error), 1), 0.0, 1
        return task_id, stats, failure, seconds, attempts

    def close(self) -> None:
        self.stage.close()


def check_ray_address(address: str | None) -> None:
    """A host:port (or ray://host:port) that accepts no TCP connection is an error now, not a hang in ray.init."""
    if not address or address in ("auto", "local"):
        return
    host, port = _ray_host_port(address)
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise DedupError(
            f"cannot reach the Ray cluster at {address!r} ({host}:{port}): {getattr(exc, 'strerror', None) or exc}",
            hint="pass the head node's address (host:6379, or ray://host:10001 for Ray Client), "
                 "or leave out --ray-address to start a local Ray",
        ) from None


def _ray_host_port(address: str) -> tuple[str, int]:
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://").split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, ""
    try:
        return host.strip("[]") or "127.0.0.1", int(port) if port else (10001 if client else 6379)
    except ValueError:
        raise DedupError(f"cannot read --ray-address {address!r}", hint="write it as HOST:PORT or ray://HOST:PORT") from None


def make_engine(run: RunDir, settings: EngineSettings | None = None) -> LocalEngine | RayEngine:
    """The engine the run's settings name (`run.settings.engine` when `run` is a `dedup.run.Run`)."""
    engine = settings or getattr(getattr(run, "settings", None), "engine", None) or EngineSettings()
    if engine.name == "local":
        return LocalEngine(run, retries=engine.retries, show_progress=engine.show_progress, backoff_s=engine.retry_backoff_s)
    if engine.name == "ray":
        return RayEngine(run, address=engine.ray_address, num_actors=engine.ray_actors,
                         cpus_per_actor=engine.ray_cpus_per_actor, gpus_per_actor=engine.ray_gpus_per_actor,
                         retries=engine.retries, backoff_s=engine.retry_backoff_s, show_progress=engine.show_progress)
    raise DedupError(f"unknown engine {engine.name!r}", hint="use --engine local or --engine ray")


def run_stage(run: RunDir, stage: Stage, unit: str = "samples") -> StageReport:
    """Run one stage behind the run's engine (markers, retries, stats, progress)."""
    return make_engine(run).run(stage, unit=unit)
