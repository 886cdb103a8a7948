"""dedup/records.py: one home for every on-disk contract, validated writes, one atomic write (umask, full disk)."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup import records
from dedup.errors import DedupError, StoreError
from dedup.records import (
    CLUSTERS,
    EDGES,
    EMBEDDING_METADATA,
    MANIFEST,
    MANIFEST_INDEX,
    REMOVE_LIST,
    SAMPLES,
    SHARDS,
    TABLES,
    TOP_DUPLICATES,
    atomic_output,
    conform,
    empty_sample_row,
    remove_stale_temp_files,
    write_array,
    write_json,
    write_record,
    write_table,
)


def test_conform_orders_and_types_columns():
    frame = pd.DataFrame({"location": ["/x/u"], "url": ["u"], "shard_index": [3], "extra": [1]})
    table = conform(frame, SHARDS)
    assert table.schema == SHARDS


def test_a_missing_column_is_refused(tmp_path):
    with pytest.raises(StoreError, match="lacks columns"):
        write_record(pd.DataFrame({"url": ["u"]}), tmp_path / "t.parquet", SHARDS)
    assert not (tmp_path / "t.parquet").exists()


def test_a_mistyped_column_is_refused(tmp_path):
    with pytest.raises(StoreError, match="contract"):
        write_record(pd.DataFrame({"shard_index": ["not a number"], "url": ["u"], "location": ["u"]}), tmp_path / "t.parquet", SHARDS)


def test_the_samples_row_is_defined_once():
    assert list(empty_sample_row()) == SAMPLES.names


def test_every_table_a_run_writes_matches_its_contract(demo_session_run):
    run, _, _, _ = demo_session_run
    written = {
        SHARDS: [run.shards_table],
        SAMPLES: sorted((run.root / "samples").glob("*.parquet")),
        EMBEDDING_METADATA: sorted(run.root.glob("embeddings/*/metadata/*.parquet")),
        EDGES: sorted(run.root.glob("neighbors/*/part_*.parquet")),
        CLUSTERS: [run.clusters],
        TOP_DUPLICATES: [run.top_duplicates],
        MANIFEST: sorted(p for p in run.manifests_dir.glob("*.parquet") if p != run.manifest_index),
        MANIFEST_INDEX: [run.manifest_index],
        REMOVE_LIST: [run.remove_keys],
    }
    for schema, paths in written.items():
        assert paths, f"no file for {schema.names}"
        for path in paths:
            assert pq.read_schema(path).names == schema.names, path
    assert set(TABLES.values()) >= set(written)


def test_atomic_output_publishes_only_on_success(tmp_path):
    target = tmp_path / "index.faiss"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"


def test_stale_temporaries_of_every_writer_are_removed(tmp_path):
    from dedup.run import RunDir

    run = RunDir(tmp_path)
    for folder in ("index", "report", "samples"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f".x.{folder}.abc.tmp").write_bytes(b"")
    assert remove_stale_temp_files(run) == 3


def test_pyarrow_schema_types_are_stable():
    assert CLUSTERS.field("cluster_id").type == pa.int64()
    assert TOP_DUPLICATES.field("copies").type == pa.int64()


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
