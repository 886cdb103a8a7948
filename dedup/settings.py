"""Settings: every option that shapes a result, typed and validated before any work, saved as OUT/run.json.

The CLI parses its options once into a `Settings` (`Settings.build`); nothing
below the CLI parses `NAME=VALUE` strings or sizes. A stage reads its values
from the run context (`dedup.run.Run.settings`), and `query`, `report` and every
later stage read the same run.json, so a run is exactly what run.json says.

Rules that keep results and the record in step:
* a descriptor's chaining guard follows the threshold actually applied
  (threshold - its guard offset) unless a guard is given with it;
* neighbours are searched the descriptor's search margin (0.04; registry) below the cut, so a later, slightly
  looser cut reuses the stored edges; a cut below the searched one lowers the
  search threshold, and the neighbour stage then searches again.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dedup.errors import DedupError

SETTINGS_VERSION = 2
ENGINES = ("local", "ray")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
DEFAULT_MEMORY = 8 * 1024**3


class SettingsError(DedupError):
    """An option is out of range or contradicts the run it resumes."""


@dataclass(frozen=True)
class EngineSettings:
    """Where stages run. Not result-shaping: a rerun may change these freely."""

    name: str = "local"
    ray_address: str | None = None
    ray_actors: int = 2
    ray_cpus_per_actor: float = 1.0
    ray_gpus_per_actor: float = 0.0
    retries: int = 2  # a failing task is tried 1 + retries times, with exponential backoff between tries
    retry_backoff_s: float = 1.0
    show_progress: bool = True

    def validated(self) -> EngineSettings:
        _check(self.name in ENGINES, f"unknown engine {self.name!r}", "use --engine local or --engine ray")
        _check(self.ray_actors >= 1, f"--ray-actors must be at least 1, not {self.ray_actors}", "e.g. --ray-actors 8")
        _check(self.ray_cpus_per_actor > 0, f"--ray-cpus-per-actor must be > 0, not {self.ray_cpus_per_actor}",
               "e.g. --ray-cpus-per-actor 1")
        _check(self.ray_gpus_per_actor >= 0, f"--ray-gpus-per-actor must be >= 0, not {self.ray_gpus_per_actor}",
               "e.g. --ray-gpus-per-actor 1 for CLIP on GPU nodes")
        _check(self.retries >= 0, f"--retries must be >= 0, not {self.retries}", "e.g. --retries 2")
        _check(self.retry_backoff_s >= 0, f"retry backoff must be >= 0 s, not {self.retry_backoff_s}", "e.g. 1.0")
        return self


@dataclass
class Settings:
    """What a run was asked to do. Field names are the keys of run.json (stable)."""

    shard_specs: list[str] = field(default_factory=list)
    descriptors: list[str] = field(default_factory=list)
    descriptor_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    guards: dict[str, float] = field(default_factory=dict)
    search_thresholds: dict[str, float] = field(default_factory=dict)
    keep: str = "best"
    rank_by: str = "copies"  # top_duplicates order: copies, or risk (memorisation risk)
    memory_budget_bytes: int = DEFAULT_MEMORY
    batch_size: int = 64
    workers: int | None = None  # decode processes; None: chosen from the descriptors and cores
    device: str = "auto"
    # Remote shards (http, https): seconds to connect, and to wait for the next bytes.
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
    # Local shards absent from a brace range are recorded in OUT/missing_shards.parquet instead of stopping the run.
    allow_missing: bool = False
    # The large-crop tier of the perceptual descriptor (dedup/stages/crops.py): opt-in, see BENCHMARKS.md issue 12.
    large_crops: bool = False
    # Cells probed per row by an IVF (cell) index; None: from the search threshold (index_choice.choose_nprobe).
    nprobe: int | None = None
    # `dedup run SHARDS --embeddings DIR`: DIR's vectors are the descriptor `precomputed` for the samples
    # they name (dedup/stages/precomputed_join.py). None for shard runs and for runs from DIR alone.
    embeddings: str | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)
    version: int = SETTINGS_VERSION

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, *, shard_specs: list[str] | None = None, descriptors: list[str] | None = None,
              thresholds: dict[str, float] | None = None, guards: dict[str, float] | None = None,
              keep: str = "best", memory: str | int = DEFAULT_MEMORY, batch_size: int = 64,
              workers: int | None = None, device: str = "auto", model_options: dict[str, Any] | None = None,
              engine: EngineSettings | None = None, cuda_available: bool | None = None,
              connect_timeout_s: float = 30.0, read_timeout_s: float = 60.0, allow_missing: bool = False,
              large_crops: bool = False, nprobe: int | None = None, embeddings: str | None = None) -> Settings:
        """Validated settings for a new run; descriptors default from the registry (GPU or not).

        `model_options` are the CLI's model values (model, pretrained, ...): each descriptor keeps
        the ones its registry entry takes.
        """
        from dedup.descriptors import builder_options, resolve_descriptor_names

        names = resolve_descriptor_names(descriptors or [], device, cuda_available)
        if embeddings is not None:  # beside shards: the run's own descriptors, then DIR's vectors
            names = [n for n in names if n != "precomputed"] + ["precomputed"]
        settings = cls(
            shard_specs=list(shard_specs or []), descriptors=names, keep=keep,
            memory_budget_bytes=parse_size(memory) if isinstance(memory, str) else int(memory),
            batch_size=batch_size, workers=workers, device=device, engine=(engine or EngineSettings()),
            connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s, allow_missing=allow_missing,
            large_crops=large_crops, nprobe=nprobe, embeddings=embeddings,
        )
        # The device is a run setting of its own (settings.device); everything else a descriptor takes is kept.
        settings.descriptor_options = {n: {k: v for k, v in builder_options(n, model_options or {}).items() if k != "device"}
                                       for n in names}
        return settings.with_cuts(thresholds or {}, guards or {}).validated()

    def with_cuts(self, thresholds: dict[str, float], guards: dict[str, float], search: bool = True) -> Settings:
        """Apply cuts (and guards); a guard not given follows its threshold.

        `search`: also lower the search thresholds far enough (commands that then search: run,
        neighbors). The cluster command passes False: it can only use the edges already found.
        """
        from dedup.descriptors import descriptor_policy

        _check_names(thresholds, self.descriptors, "--threshold")
        _check_names(guards, self.descriptors, "--guard")
        new = replace(self, thresholds=dict(self.thresholds), guards=dict(self.guards),
                      search_thresholds=dict(self.search_thresholds))
        for name in self.descriptors:
            policy = descriptor_policy(name)
            given = name in thresholds
            cut = float(thresholds[name]) if given else new.thresholds.get(name, policy.threshold())
            new.thresholds[name] = cut
            if name in guards:
                new.guards[name] = float(guards[name])
            elif given or name not in new.guards:
                new.guards[name] = round(cut - policy.guard_offset, 6)
            searched = new.search_thresholds.get(name, math.inf)
            if search or name not in new.search_thresholds:
                new.search_thresholds[name] = min(searched, round(cut - policy.search_margin, 6))
        return new

    def validated(self) -> Settings:
        """Every range check, before any shard is read."""
        from dedup.stages.manifests import KeepPolicy
        from dedup.stages.rank import check_order

        for name, value in self.thresholds.items():
            _check(0.0 < value <= 1.0, f"threshold {name}={value} is outside (0, 1]",
                   f"thresholds are cosine similarities, e.g. --threshold {name}=0.9")
        for name, value in self.guards.items():
            _check(-1.0 <= value <= 1.0, f"guard {name}={value} is outside [-1, 1]", f"e.g. --guard {name}=0.5")
        KeepPolicy.parse(self.keep)
        check_order(self.rank_by)
        _check(self.memory_budget_bytes > 0, f"memory budget must be positive, not {self.memory_budget_bytes}",
               "write e.g. --memory 8GB")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}", "e.g. --batch-size 64")
        _check(self.workers is None or self.workers >= 0, f"--workers must be 0 or more, not {self.workers}",
               "--workers 0 decodes in the main process")
        _check(self.connect_timeout_s > 0 and self.read_timeout_s > 0, "timeouts must be positive",
               "e.g. --connect-timeout 30 --read-timeout 60")
        _check(bool(DEVICE_PATTERN.match(self.device)), f"unknown device {self.device!r}",
               "use --device auto, cpu, cuda or cuda:N")
        _check(self.nprobe is None or self.nprobe >= 1, f"--nprobe must be at least 1, not {self.nprobe}",
               "--nprobe N probes N cells per row (at most the index's cell count); leave it out for the default")
        self.engine = self.engine.validated()
        return self

    # ------------------------------------------------------------ resuming

    def resumed_with(self, requested: Settings, given: set[str]) -> Settings:
        """These (saved) settings, changed by what a new invocation asked for; contradictions are errors.

        `given` names the options the user set this time ("descriptors", "keep", "memory_budget_bytes", "nprobe"):
        only those replace saved values. Batch size, workers, device and engine are how this
        invocation runs, not what it computes, and always come from it.
        """
        if "descriptors" in given and requested.descriptors != self.descriptors:
            raise SettingsError(
                f"this run was embedded with {self.descriptors}, not {requested.descriptors}",
                hint="resume with the same --descriptor list, or use a new --out directory")
        for name in self.descriptors if "descriptors" in given else []:
            saved, asked = self.descriptor_options.get(name, {}), requested.descriptor_options.get(name, {})
            if _shaping(saved) != _shaping(asked):
                raise SettingsError(
                    f"this run's {name} vectors were made with {_shaping(saved)}, not {_shaping(asked)}",
                    hint="resume with the same --model/--pretrained, or use a new --out directory")
        _check_embeddings(self.embeddings, requested.embeddings)
        changes = {k: getattr(requested, k) for k in ("keep", "memory_budget_bytes", "large_crops", "nprobe")
                   if k in given}
        # How this invocation computes (device, GPU decoding) is its own choice; what it computes is the run's.
        changes["descriptor_options"] = {
            name: {**_shaping(self.descriptor_options.get(name, {})), **_runtime(requested.descriptor_options.get(name, {}))}
            for name in self.descriptors}
        if requested.shard_specs:  # the embed stage checks them against the shards already recorded
            changes["shard_specs"] = requested.shard_specs
        return replace(self, **changes, batch_size=requested.batch_size, workers=requested.workers,
                       device=requested.device, engine=requested.engine, connect_timeout_s=requested.connect_timeout_s,
                       read_timeout_s=requested.read_timeout_s, allow_missing=requested.allow_missing).validated()

    # ------------------------------------------------------------ run.json

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        engine = values.pop("engine", None)
        settings = cls(**values)
        settings.engine = EngineSettings(**engine) if isinstance(engine, dict) else EngineSettings()
        settings.version = SETTINGS_VERSION
        return settings

    @classmethod
    def load(cls, path: Path) -> Settings:
        if not path.exists():
            raise SettingsError(f"{path.parent} is not a dedup run (no run.json)",
                                hint="run 'dedup embed' or 'dedup run' first")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"{path} cannot be read: {exc}",
                                hint="restore it, or start again with a new --out directory") from None




# Descriptor options that say how the vectors are computed, not which: a resumed run may change them.
RUNTIME_OPTIONS = frozenset({"device", "gpu_decode", "channels_last", "cuda_graphs"})


def _shaping(options: dict[str, Any]) -> dict[str, Any]:
    """The descriptor options that change the vectors (the device or the decoder does not)."""
    return {k: v for k, v in sorted(options.items()) if k not in RUNTIME_OPTIONS}


def _runtime(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in RUNTIME_OPTIONS and k != "device"}


def _check_embeddings(saved: str | None, requested: str | None) -> None:
    """A run beside --embeddings resumes with the same folder (or none given); a shard run cannot take one later."""
    if requested is None or requested == saved:
        return
    if saved is None:
        raise SettingsError("this run was started without --embeddings",
                            hint="resume it without --embeddings, or start the shards with --embeddings in a new --out")
    raise SettingsError(f"this run takes its precomputed vectors from {saved}, not {requested}",
                        hint="resume with the same --embeddings folder, or use a new --out directory")


def _check(ok: bool, message: str, hint: str) -> None:
    if not ok:
        raise SettingsError(message, hint=hint)


def _check_names(values: dict[str, float], descriptors: list[str], option: str) -> None:
    for name in values:
        _check(name in descriptors, f"{option} names {name!r}, which this run does not compute",
               f"this run's descriptors are {', '.join(descriptors)}")


def parse_assignments(items: list[str] | None, what: str) -> dict[str, float]:
    """['perceptual=0.9', 'clip=0.95'] -> {'perceptual': 0.9, 'clip': 0.95}."""
    result: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or not math.isfinite(number):
            raise SettingsError(f"cannot read {what} {item!r}",
                                hint=f"write it as NAME=VALUE, e.g. --{what} perceptual=0.9")
        result[name.strip()] = number
    return result


def parse_size(text: str) -> int:
    """'8GB' / '512MB' / '1.5G' / '1000000' -> bytes (positive)."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    cleaned = str(text).strip().lower().removesuffix("b").removesuffix("i")
    try:
        value = float(cleaned[:-1]) * units[cleaned[-1]] if cleaned and cleaned[-1] in units else float(cleaned)
    except (ValueError, IndexError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"cannot read size {text!r}", hint="write e.g. --memory 8GB or --memory 512MB")
    return int(value)
