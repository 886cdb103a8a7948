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
    """An optional dependency is not installed (or is installed but cannot be imported)."""

    def __init__(self, package: str, extra: str, purpose: str, broken: ImportError | None = None) -> None:
        if broken is None:
            super().__init__(f"{purpose} needs the '{package}' package, which is not installed.",
                             hint=f"pip install 'dedup[{extra}]'")
        else:
            super().__init__(f"{purpose} needs the '{package}' package, which is installed but fails to import: {broken}",
                             hint=f"pip install --upgrade 'dedup[{extra}]'")


class ModelLoadError(DedupError):
    """CLIP weights could not be loaded."""


class StoreError(DedupError):
    """The output directory is missing a stage's files or is inconsistent."""


class IndexInfeasible(DedupError):
    """No index fits the memory budget."""


class QueryError(DedupError):
    """A query names something the run does not hold."""


# Import names whose pip distribution is called differently.
_PIP_NAMES = {"open_clip": "open_clip_torch"}


def missing_extra(exc: ImportError, extra: str, purpose: str) -> MissingExtraError:
    """The error for a failed optional import, naming the package and the extra that brings it.

    A module that is absent is "not installed"; one that is present but fails to
    load (a torch build without its libraries, an old open_clip without a name
    dedup uses) says so, since the fix is then an upgrade, not an install.
    """
    module = (exc.name or "").split(".")[0]
    package = _PIP_NAMES.get(module, module) or f"dedup[{extra}]"
    return MissingExtraError(package, extra, purpose, broken=None if isinstance(exc, ModuleNotFoundError) else exc)


def require(module: str, package: str, extra: str, purpose: str):
    """Import an optional module or raise an error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MissingExtraError(package, extra, purpose) from exc
    except ImportError as exc:
        raise MissingExtraError(package, extra, purpose, broken=exc) from exc
