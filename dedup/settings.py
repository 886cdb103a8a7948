"""Run configuration: what a run was asked to do, saved as OUT/run.json.

Later stages (index, neighbours, cluster, query) read thresholds and model
settings from here, so a query uses exactly the settings of the run it asks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dedup.errors import DedupError
from dedup.records import RunDir, write_json

# Cosine-similarity cut per vector descriptor. `perceptual` is calibrated on
# real copies (see BENCHMARKS.md and dedup/descriptors/perceptual.py). `clip`
# follows common LAION near-duplicate practice (>= 0.95 for ViT-B-32); it could
# not be calibrated here because no CLIP weights can be downloaded offline.
CLIP_THRESHOLD = 0.95
# Search this much below the cut so a stricter or slightly looser cut can be
# applied later from the stored edges without searching again.
SEARCH_MARGIN = 0.04
# Chaining guard: a member must be within this of the edge threshold when
# compared with its cluster's representative directly (tuned on the generated
# benchmark sets, see BENCHMARKS.md).
GUARD_OFFSET = 0.08


def default_threshold(descriptor: str) -> float:
    if descriptor == "perceptual":
        from dedup.descriptors.perceptual import DEFAULT_THRESHOLD

        return float(DEFAULT_THRESHOLD)
    if descriptor == "clip":
        return CLIP_THRESHOLD
    if descriptor == "torchscript":
        from dedup.descriptors.torchscript import DEFAULT_THRESHOLD as TORCHSCRIPT_THRESHOLD

        return float(TORCHSCRIPT_THRESHOLD)
    raise DedupError(f"no default threshold for descriptor {descriptor!r}", hint="pass --threshold NAME=VALUE")


def default_guard(descriptor: str) -> float:
    """Chaining guard: every member must be this similar to its cluster's representative."""
    return default_threshold(descriptor) - GUARD_OFFSET


@dataclass
class RunConfig:
    shard_specs: list[str] = field(default_factory=list)
    descriptors: list[str] = field(default_factory=list)
    descriptor_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    guards: dict[str, float] = field(default_factory=dict)
    search_thresholds: dict[str, float] = field(default_factory=dict)
    keep: str = "best"
    memory_budget_bytes: int = 8 * 1024**3
    version: int = 1

    def fill_defaults(self) -> RunConfig:
        for name in self.descriptors:
            self.thresholds.setdefault(name, default_threshold(name))
            self.guards.setdefault(name, default_guard(name))
            self.search_thresholds.setdefault(name, round(self.thresholds[name] - SEARCH_MARGIN, 6))
        return self

    def save(self, run: RunDir) -> None:
        write_json(asdict(self), run.run_config)

    @classmethod
    def load(cls, run: RunDir) -> RunConfig:
        if not run.run_config.exists():
            raise DedupError(f"{run.root} is not a dedup run (no run.json)", hint="run 'dedup embed' or 'dedup run' first")
        return cls(**json.loads(run.run_config.read_text()))


def parse_assignments(items: list[str] | None, what: str) -> dict[str, float]:
    """['perceptual=0.9', 'clip=0.95'] -> {'perceptual': 0.9, 'clip': 0.95}."""
    result: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            result[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise DedupError(f"cannot read {what} {item!r}", hint=f"write it as NAME=VALUE, e.g. --{what} perceptual=0.9")
    return result


def parse_size(text: str) -> int:
    """'8GB' / '512MB' / '1.5G' / '1000000' -> bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if cleaned and cleaned[-1] in units:
            return int(float(cleaned[:-1]) * units[cleaned[-1]])
        return int(float(cleaned))
    except ValueError:
        raise DedupError(f"cannot read size {text!r}", hint="write e.g. --memory 8GB or --memory 512MB") from None
