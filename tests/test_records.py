"""Atomic writes: outputs honour the umask, and a full disk or a file in the way is a user-facing error."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pandas as pd
import pytest

from dedup import records
from dedup.errors import DedupError
from dedup.records import write_array, write_json, write_table


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_respect_the_umask(tmp_path, umask, mask):
    umask(mask)
    write_table(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.parquet")
    write_array(np.zeros(3), tmp_path / "a.npy")
    write_json({"x": 1}, tmp_path / "sub" / "j.json")
    for path in (tmp_path / "t.parquet", tmp_path / "a.npy", tmp_path / "sub" / "j.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_full_disk_names_the_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full_disk(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half written")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.pq, "write_table", full_disk)
    target = tmp_path / "samples" / "samples_0.parquet"
    with pytest.raises(DedupError) as info:
        write_table(pd.DataFrame({"a": [1]}), target)
    assert "no space left" in info.value.message and str(target) in info.value.message
    assert info.value.hint
    assert list(target.parent.iterdir()) == []  # the temporary is gone, no partial output


def test_pyarrow_style_full_disk_message_is_recognised(tmp_path, monkeypatch):
    def full_disk(table, where, **kwargs):
        raise OSError("IOError: No space left on device. Detail: [errno 28]")

    monkeypatch.setattr(records.pq, "write_table", full_disk)
    with pytest.raises(DedupError, match="no space left"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "x.parquet")


def test_output_under_a_file_says_the_file_is_in_the_way(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a directory")
    with pytest.raises(DedupError, match="is a file") as info:
        write_json({}, blocker / "run.json")
    assert str(blocker) in info.value.message and "--out" in info.value.hint
