"""dedup: find, rank and remove duplicated images in LAION-style training sets.

Public API (imported lazily so `import dedup` stays cheap in dataloader workers):
`DropDuplicates` (the loader filter), `run_all` (the whole pipeline), `query`.
"""

from __future__ import annotations

from importlib import import_module

_SOURCE_VERSION = "0.2.0"  # a source checkout that was not pip-installed
_PUBLIC = {
    "DropDuplicates": "dedup.loader",
    "run_all": "dedup.pipeline",
    "query": "dedup.stages.query",
}

__all__ = ["DropDuplicates", "__version__", "query", "run_all"]


def __getattr__(name: str):
    # Looked up when asked: importlib.metadata costs ~0.1 s of every process start (each decode worker's too).
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("dedup")
        except PackageNotFoundError:
            return _SOURCE_VERSION
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dedup' has no attribute {name!r}")
