"""dedup/records.py: one home for every on-disk contract, validated writes, one atomic write."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup.errors import StoreError
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
    atomic_file,
    conform,
    empty_sample_row,
    remove_stale_temp_files,
    write_record,
)


def test_conform_orders_and_types_columns():
    frame = pd.DataFrame({"url": ["u"], "shard_index": [3], "extra": [1]})
    table = conform(frame, SHARDS)
    assert table.schema == SHARDS


def test_a_missing_column_is_refused(tmp_path):
    with pytest.raises(StoreError, match="lacks columns"):
        write_record(pd.DataFrame({"url": ["u"]}), tmp_path / "t.parquet", SHARDS)
    assert not (tmp_path / "t.parquet").exists()


def test_a_mistyped_column_is_refused(tmp_path):
    with pytest.raises(StoreError, match="contract"):
        write_record(pd.DataFrame({"shard_index": ["not a number"], "url": ["u"]}), tmp_path / "t.parquet", SHARDS)


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


def test_atomic_file_publishes_only_on_success(tmp_path):
    target = tmp_path / "index.faiss"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_file(target) as tmp:
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
