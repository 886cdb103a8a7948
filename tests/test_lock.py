"""One writer per run directory: a second run stops at once; a dead holder never blocks."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dedup.errors import DedupError
from dedup.lock import RunLocked, run_lock

REPO = Path(__file__).resolve().parents[1]


def test_second_lock_on_one_out_is_refused_and_released_after(tmp_path):
    out = tmp_path / "run"
    with run_lock(out) as lock:
        assert lock == out / ".lock"
        with pytest.raises(RunLocked, match="in use by another dedup process") as info, run_lock(out):
            pass
        assert "another --out" in info.value.hint
    with run_lock(out):  # released on exit
        pass


def test_out_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DedupError, match="is a file"), run_lock(tmp_path / "file"):
        pass


def _holder(out: Path) -> subprocess.Popen:
    code = f"import sys, time; from dedup.lock import run_lock\nwith run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_lock_held_by_another_process_blocks_until_it_dies(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"), run_lock(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)  # dies without any cleanup: the .lock file stays behind
        proc.wait()
    assert (out / ".lock").exists()
    with run_lock(out):  # a stale lock of a dead process does not block
        pass
