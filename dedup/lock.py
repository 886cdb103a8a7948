"""One writer per run directory: `with run_lock(out): ...` around every command that writes OUT.

The lock is `fcntl.flock` on OUT/.lock. The kernel releases it when the holding
process exits, however it exits (even kill -9), so a stale .lock file left by a
dead process never blocks a later run; the file only records the holder's pid
for the message. Two runs on one --out would otherwise both do all the work and
overwrite each other's parts.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dedup.errors import DedupError
from dedup.run import RunDir


class RunLocked(DedupError):
    """Another process holds the run directory's lock."""


@contextmanager
def run_lock(out: str | Path) -> Iterator[Path]:
    """Hold OUT/.lock for the duration of the block; raise RunLocked at once if another process holds it."""
    run = RunDir(out)
    _make_run_dir(run.root)
    fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"{run.root} is in use by another dedup process{_holder(fd)}",
                hint="wait for it to finish (a rerun then resumes), or pass another --out",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield run.lock_file
    finally:
        os.close(fd)  # releases the lock


def _make_run_dir(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DedupError(f"--out {root} is a file, not a directory", hint="pass a directory, or a path that does not exist yet")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DedupError(f"cannot create the run directory {root}: {exc.strerror or exc}",
                         hint="pass an --out path you can write to") from None


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
