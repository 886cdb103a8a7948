"""Data manifests: small JSON files describing a dataset's shards (see data_manifests/README.md).

`dedup run data_manifests/laion400m.json` works in place of a shard list.
Fields: `name`, `description`, `shards` (a list of shard specs: brace patterns
or URLs, relative paths resolved against the manifest's folder), and
informational `expected_shards`, `expected_samples`, `samples_per_shard`,
`embeddings` (where precomputed embeddings sit), `source`, `license`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dedup.errors import DedupError
from dedup.stages.read import expand_shard_specs, is_remote

REQUIRED_FIELDS = ("name", "shards")
MAX_MANIFEST_BYTES = 1024 * 1024


def is_data_manifest(spec: str) -> bool:
    return spec.endswith(".json") and not is_remote(spec) and Path(spec).is_file()


def load_data_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise DedupError(f"{path} is larger than a data manifest can be", hint="a manifest lists shard patterns, not samples")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise DedupError(f"{path} is not valid JSON: {exc}", hint="see data_manifests/README.md for the format") from None
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing or not isinstance(manifest.get("shards"), list):
        raise DedupError(
            f"{path} lacks {missing or ['shards as a list']}",
            hint="a data manifest needs 'name' and 'shards' (a list of shard specs); see data_manifests/README.md",
        )
    manifest["shards"] = [_resolve(str(s), path.parent) for s in manifest["shards"]]
    return manifest


def _resolve(spec: str, base: Path) -> str:
    if is_remote(spec) or Path(spec).is_absolute():
        return spec
    return os.path.normpath(str(base / spec))


def expand_inputs(specs: list[str], missing: list[str] | None = None) -> list[str]:
    """Shard specs, with any data manifest replaced by its shards (absent ones go to `missing` when given)."""
    expanded: list[str] = []
    for spec in specs:
        expanded.extend(load_data_manifest(spec)["shards"] if is_data_manifest(spec) else [spec])
    return expand_shard_specs(expanded, missing)
