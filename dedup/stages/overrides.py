"""Review overrides: a reviewer's decisions, kept in OUT/overrides.parquet and applied on every rerun.

Columns (one row per decision, appended by `dedup review`):

| column | type | meaning |
|---|---|---|
| `kind` | str | `not_duplicate_cluster`, `not_duplicate_pair` or `keep` |
| `cluster_id` | int64, null | the reviewed cluster (`not_duplicate_cluster`) or the pinned sample's cluster (`keep`) |
| `sample_id_a`, `sample_id_b` | int64, null | the two samples of a `not_duplicate_pair` |
| `keep_sample_id` | int64, null | the sample `keep` pins |
| `members` | list<int64> | `not_duplicate_cluster`: the cluster's members when it was reviewed |
| `note` | str, null | the reviewer's words |
| `created_at` | str | UTC time of the decision (ISO 8601) |

Effects:
- `cluster` drops every edge between two `members` of a `not_duplicate_cluster` (so the cluster
  as reviewed falls apart; the members stay free to join other clusters), and every edge between
  the two samples of a `not_duplicate_pair` (if other copies still link them, mark the cluster);
- `manifests` keeps a `keep` sample whatever the keep policy (reason `kept_by_review`); with one
  copy allowed per cluster, the copy the policy would have kept is dropped instead.

Rows are never rewritten: a later decision is a new row, so the file is the audit trail.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from dedup.errors import DedupError, StoreError
from dedup.records import OVERRIDES, RunDir, write_record

KINDS = ("not_duplicate_cluster", "not_duplicate_pair", "keep")
OVERRIDES_SCHEMA = OVERRIDES  # the contract lives in dedup/records.py
ID_PREFIX = "id:"


def overrides_path(run: RunDir) -> Path:
    return run.overrides


def load_overrides(run: RunDir) -> pd.DataFrame:
    path = overrides_path(run)
    if not path.exists():
        return OVERRIDES_SCHEMA.empty_table().to_pandas()
    return pd.read_parquet(path)


# ---------------------------------------------------------------- applying them


def _group_table(overrides: pd.DataFrame) -> pd.DataFrame:
    """(sample_id, group): the members of each not-duplicate cluster, and each not-duplicate pair, as one group."""
    frames = [pd.DataFrame({"sample_id": pd.Series(dtype="int64"), "group": pd.Series(dtype="int64")})]
    for group, row in enumerate(overrides.itertuples()):
        if row.kind == "not_duplicate_cluster":
            ids = np.asarray(row.members, dtype=np.int64)
        elif row.kind == "not_duplicate_pair":
            ids = np.asarray([row.sample_id_a, row.sample_id_b], dtype=np.int64)
        else:
            continue
        frames.append(pd.DataFrame({"sample_id": ids, "group": group}))
    return pd.concat(frames, ignore_index=True).drop_duplicates()


def separated_edges(overrides: pd.DataFrame, id_a: np.ndarray, id_b: np.ndarray) -> np.ndarray:
    """Boolean mask over the edges: True where a review says the two ends are not duplicates."""
    groups = _group_table(overrides)
    mask = np.zeros(len(id_a), dtype=bool)
    if groups.empty or not len(id_a):
        return mask
    edges = pd.DataFrame({"sample_id": np.asarray(id_a, np.int64), "edge": np.arange(len(id_a))})
    left = edges.merge(groups, on="sample_id")
    right = pd.DataFrame({"sample_id": np.asarray(id_b, np.int64), "edge": np.arange(len(id_b))}).merge(groups, on="sample_id")
    both = left.merge(right, on=["edge", "group"])["edge"].to_numpy()
    mask[both] = True
    return mask


def pinned_samples(run: RunDir) -> set[int]:
    """Sample ids a reviewer pinned as the copy to keep."""
    overrides = load_overrides(run)
    pins = overrides.loc[overrides["kind"] == "keep", "keep_sample_id"].dropna()
    return {int(i) for i in pins}


# ---------------------------------------------------------------- adding them (dedup review)


def resolve_sample(clusters: pd.DataFrame, ref: str) -> pd.Series:
    """A sample by key, or by sample id written `id:123`; the clusters.parquet row."""
    if ref.startswith(ID_PREFIX):
        try:
            rows = clusters[clusters["sample_id"] == int(ref[len(ID_PREFIX):])]
        except ValueError:
            rows = clusters.iloc[0:0]
    else:
        rows = clusters[clusters["key"] == ref]
    if len(rows) != 1:
        problem = "no sample" if rows.empty else f"{len(rows)} samples (keys repeat across shards)"
        raise DedupError(f"{problem} matches {ref!r}", hint="pass the key shown in the report, or id:SAMPLE_ID")
    return rows.iloc[0]


def _row(kind: str, note: str | None, **values) -> dict:
    row = {name: None for name in OVERRIDES_SCHEMA.names}
    row.update(kind=kind, note=note, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), **values)
    return row


def review_row(run: RunDir, kind: str, refs: list[str], note: str | None = None) -> dict:
    """Build one decision from the command line's references (cluster id, keys or id:SAMPLE_ID)."""
    if not run.clusters.exists():
        raise StoreError(f"{run.root} has no clusters.parquet", hint=f"run 'dedup cluster {run.root}' first")
    expected = {"not_duplicate_cluster": 1, "not_duplicate_pair": 2, "keep": 1}
    if kind not in KINDS or len(refs) != expected[kind]:
        raise DedupError(f"cannot read the review {kind} {refs}", hint="dedup review OUT not-duplicate-cluster CLUSTER_ID | "
                         "not-duplicate-pair KEY_A KEY_B | keep KEY (KEY may be id:SAMPLE_ID)")
    clusters = _rows_named(run, kind, refs)
    if kind == "not_duplicate_cluster":
        cluster_id = _cluster_id(refs[0])
        members = clusters.loc[clusters["cluster_id"] == cluster_id, "sample_id"].astype("int64").tolist()
        if len(members) < 2:
            raise DedupError(f"cluster {cluster_id} has no copies in {run.root}", hint="cluster ids are shown in the report and top_duplicates.parquet")
        return _row(kind, note, cluster_id=cluster_id, members=sorted(members))
    if kind == "not_duplicate_pair":
        first, second = (resolve_sample(clusters, ref) for ref in refs)
        low, high = sorted((int(first["sample_id"]), int(second["sample_id"])))
        return _row(kind, note, sample_id_a=low, sample_id_b=high, members=[])
    sample = resolve_sample(clusters, refs[0])
    return _row(kind, note, keep_sample_id=int(sample["sample_id"]), cluster_id=int(sample["cluster_id"]), members=[])


def _rows_named(run: RunDir, kind: str, refs: list[str]) -> pd.DataFrame:
    """The clusters.parquet rows (sample_id, key, cluster_id) the references can name, by a filtered scan."""
    from dedup.records import FilteredRows, column

    columns = ["sample_id", "key", "cluster_id"]
    if kind == "not_duplicate_cluster" and len(refs) == 1:
        wanted = column("cluster_id") == _cluster_id(refs[0])
    else:
        ids = [int(r[len(ID_PREFIX):]) for r in refs if r.startswith(ID_PREFIX) and r[len(ID_PREFIX):].lstrip("-").isdigit()]
        keys = pa.array([r for r in refs if not r.startswith(ID_PREFIX)], pa.string())
        wanted = column("key").isin(keys) | column("sample_id").isin(pa.array(ids, pa.int64()))
    return FilteredRows(run.clusters).where(wanted, columns)


def _cluster_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DedupError(f"cluster id {text!r} is not a number", hint="cluster ids are shown in the report and top_duplicates.parquet") from None


def add_override(run: RunDir, row: dict) -> pd.DataFrame:
    """Append one decision to OUT/overrides.parquet (atomic rewrite) and return the whole table."""
    existing = pa.Table.from_pandas(load_overrides(run), schema=OVERRIDES_SCHEMA, preserve_index=False)
    table = pa.concat_tables([existing, pa.Table.from_pylist([row], schema=OVERRIDES_SCHEMA)])
    write_record(table, overrides_path(run), OVERRIDES)
    return table.to_pandas()


# ---------------------------------------------------------------- shown in the report


def overrides_section(run: RunDir) -> str:
    """The report's 'Review overrides' section (empty string when there are none)."""
    from dedup.stages.report import _text

    overrides = load_overrides(run)
    if overrides.empty:
        return ""
    keys = _keys(run, overrides)
    body = "".join(
        f"<tr><td>{_text(row.kind)}</td><td class='num'>{_text(_int(row.cluster_id))}</td>"
        f"<td>{_text(_who(row, keys))}</td><td>{_text(row.note)}</td><td class='small'>{_text(row.created_at)}</td></tr>"
        for row in overrides.itertuples()
    )
    return ("<section id='overrides'><h2>Review overrides <span class='muted small'>OUT/overrides.parquet, "
            "applied by cluster and manifests</span></h2><table class='grid'><tr><th>decision</th><th>cluster</th>"
            f"<th>samples</th><th>note</th><th>when</th></tr>{body}</table></section>")


def _int(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _keys(run: RunDir, overrides: pd.DataFrame) -> dict[int, tuple[str, int]]:
    """(key, current cluster_id) of every sample the overrides name."""
    ids = pd.concat([overrides[c] for c in ("sample_id_a", "sample_id_b", "keep_sample_id")]).dropna().astype("int64")
    columns = ["sample_id", "key", "cluster_id"]
    if not run.clusters.exists():
        return {}
    from dedup.records import FilteredRows, column

    found = FilteredRows(run.clusters).where(column("sample_id").isin(pa.array(sorted(set(ids)), pa.int64())), columns)
    return {int(i): (str(k), int(c)) for i, k, c in zip(found["sample_id"], found["key"], found["cluster_id"], strict=False)}


def _who(row, keys: dict[int, tuple[str, int]]) -> str:
    def key(sample_id) -> str:
        return keys[_int(sample_id)][0] if _int(sample_id) in keys else str(sample_id)

    if row.kind == "not_duplicate_cluster":
        return f"{len(row.members)} members as reviewed"
    if row.kind == "not_duplicate_pair":
        a, b = keys.get(_int(row.sample_id_a)), keys.get(_int(row.sample_id_b))
        # Removing their edge does not separate two samples that other copies still link.
        joined = " (still in one cluster through other copies: mark the cluster)" if a and b and a[1] == b[1] else ""
        return f"{key(row.sample_id_a)} / {key(row.sample_id_b)}{joined}"
    return f"keep {key(row.keep_sample_id)}"
