"""Error hierarchy. Every error says what went wrong *and* what to do next."""

from __future__ import annotations


class DedupError(Exception):
    """Base class; `hint` names the next step for the user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ShardSpecError(DedupError):
    """A shard spec expands to nothing or cannot be opened."""


class MissingExtraError(DedupError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed.",
            hint=f"pip install 'dedup[{extra}]'",
        )


class ModelLoadError(DedupError):
    """CLIP weights could not be loaded."""


class StoreError(DedupError):
    """The output directory is missing a stage's files or is inconsistent."""


class IndexInfeasible(DedupError):
    """No index fits the memory budget."""


class QueryError(DedupError):
    """A query names something the run does not hold."""


def require(module: str, package: str, extra: str, purpose: str):
    """Import an optional module or raise an error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(package, extra, purpose) from exc
