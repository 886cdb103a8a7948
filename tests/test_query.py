"""Query input safety: only regular files under a size cap, never devices, FIFOs or links leaving the folder."""

from __future__ import annotations

import os

import pytest

from dedup.stages.query import read_image_file


def test_regular_file_is_read(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    assert read_image_file(tmp_path / "a.jpg", tmp_path) == b"abc"


def test_zero_device_and_fifo_are_refused_without_reading(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")  # opening it for reading would wait forever for a writer
    with pytest.raises(OSError, match="not a regular file"):
        read_image_file(tmp_path / "fifo.jpg")
    with pytest.raises(OSError, match="outside"):
        read_image_file(tmp_path / "zero.jpg", tmp_path)
    with pytest.raises(OSError, match="not a regular file"):
        read_image_file(tmp_path / "zero.jpg")


def test_links_leaving_the_folder_are_refused(tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    folder = tmp_path / "queries"
    folder.mkdir()
    os.symlink(outside, folder / "link.jpg")
    (folder / "inner.jpg").write_bytes(b"fine")
    os.symlink(folder / "inner.jpg", folder / "inner_link.jpg")
    with pytest.raises(OSError, match="outside"):
        read_image_file(folder / "link.jpg", folder)
    assert read_image_file(folder / "inner_link.jpg", folder) == b"fine"


def test_files_over_the_cap_are_refused(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    with pytest.raises(OSError, match="above the 100-byte"):
        read_image_file(tmp_path / "big.jpg", limit=100)


def test_printed_results_carry_no_terminal_escapes():
    import io

    import pandas as pd
    from rich.console import Console

    from dedup.console import print_results
    from dedup.stages.query import QueryResult

    matches = pd.DataFrame({"sample_id": [1], "key": ["k\x1b]0;owned\x07"], "url": [None],
                            "caption": ["\x1b[2J\x1b[31mred\u202e"], "similarity": [0.99], "cluster_id": [4]})
    results = [QueryResult("q\x1b[5m.jpg", "perceptual", 1, 4, 1, matches),
               QueryResult("bad\x9b.jpg", "perceptual", 0, None, 0, error="not an image \x1b[7m")]
    buffer = io.StringIO()
    print_results(results, Console(file=buffer, force_terminal=True, color_system="standard", width=200))
    text = buffer.getvalue()
    for raw in ("\x1b]0;owned", "\x1b[2J", "\x1b[31mred", "\x1b[5m", "\x9b", "\u202e", "\x1b[7m"):
        assert raw not in text, repr(raw)
    assert "\\x1b[31mred" in text and "\\x1b]0;owned" in text  # shown, as visible escapes
