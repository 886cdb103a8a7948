"""Pairs between new query rows and the rows of an earlier index generation (incremental runs).

`dedup.search.pairs` reports a pair of rows (q, r), q < r, only while querying
the smaller row q (the forward rule). When a run grows, the rows an earlier
search already queried never saw the rows added since, so the pairs between
an old row and a new one must come from the new row, looking *backwards*:
`pairs_with_earlier` yields every pair (q, r) with q in `rows` (new rows) and
r < `earlier` (every row of the earlier generations). Together with the
forward rule inside the new rows (what `find_pairs` / `find_pairs_cells`
yield for a slice of new rows), each unordered pair is reported exactly once:
old-old by the earlier generation's tasks, old-new and new-new by the new ones.

Two engines, matching the index kinds an incremental run extends:

* exact (flat indexes): dense products of the query block against the
  earlier rows in tiles, max over the query variants.
* cells (the cell layout every IVF choice builds, `CellLists`): a new row meets the earlier rows whose
  home cell its variants probe, the same probes a from-scratch search uses
  from the query side. (A from-scratch run finds an old-new pair from the old
  row's probes; both are the IVF's recall, and with every cell probed both are exact.)

Pure: no file I/O. Scores are exact float32 products of the stored rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

# One definition of a query block's float32 rows, variants and probes, and of runs of equal cells.
from dedup.search.pairs import _block_probes, _rows, _runs, _variants

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]

# One (queries x targets) float32 product: 8M entries = 32 MB (as pairs.CELL_PRODUCT_ENTRIES).
PRODUCT_ENTRIES = 1 << 23
# New rows per block (the neighbour stage passes its rows per task): their variants and probes are in
# memory together, and each probed cell's members are read once per block, not once per query.
QUERY_ROWS = 16384
TARGET_ROWS = 8192  # earlier rows per exact tile


def pairs_with_earlier(
    vectors,
    ids: np.ndarray,
    threshold: float,
    rows: slice,
    earlier: int,
    *,
    lists=None,
    quantizer=None,
    query_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    block_size: int = QUERY_ROWS,
    max_pairs: int = 1 << 22,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Pairs]:
    """Yield (id_a, id_b, similarity), id_a < id_b, for every q in `rows`, r < `earlier` at >= threshold.

    `rows` must lie at or after `earlier` (the new rows). With `lists` (a
    `dedup.search.pairs.CellLists` over all rows) only the earlier rows in the
    cells the query variants probe are compared (variants other than the
    identity are probed with `quantizer`); without, every earlier row is.
    """
    ids = np.asarray(ids)
    _check(vectors, ids, rows, earlier, lists, quantizer, query_transform)
    found, pending = [], 0
    for start in range(rows.start, rows.stop, block_size):
        block = slice(start, min(start + block_size, rows.stop))
        queries = _variants(vectors[block], query_transform)
        chunks = (_exact_block(vectors, queries, block.start, earlier, threshold) if lists is None
                  else _cells_block(vectors, lists, quantizer, queries, block, earlier, threshold))
        for chunk in chunks:
            found.append(chunk)
            pending += len(chunk[0])
            if pending >= max_pairs:
                yield _to_ids(found, ids)
                found, pending = [], 0
        if progress is not None:
            progress(block.stop - block.start)
    if found:
        yield _to_ids(found, ids)


def _check(vectors, ids, rows: slice, earlier: int, lists, quantizer, query_transform) -> None:
    if ids.dtype != np.int64 or len(ids) != len(vectors):
        raise ValueError("ids must be int64 and row-aligned with vectors")
    if not 0 <= earlier <= rows.start <= rows.stop <= len(vectors):
        raise ValueError(f"need 0 <= earlier ({earlier}) <= rows ({rows.start}:{rows.stop}) <= {len(vectors)}")
    if lists is not None and query_transform is not None and quantizer is None:
        raise ValueError("query variants need the quantizer to choose their cells")


def _exact_block(vectors, queries: np.ndarray, row0: int, earlier: int, threshold: float):
    """Every (query row, earlier row) of a block, max over variants, in tiles of PRODUCT_ENTRIES."""
    cut = np.float32(threshold)
    tile = max(1, min(TARGET_ROWS, PRODUCT_ENTRIES // max(1, queries.shape[1])))
    for start in range(0, earlier, tile):
        targets = _rows(vectors[start : min(start + tile, earlier)])
        sims = queries[0] @ targets.T
        for variant in queries[1:]:
            np.maximum(sims, variant @ targets.T, out=sims)
        q_local, r_local = np.nonzero(sims >= cut)
        yield q_local + row0, r_local + start, sims[q_local, r_local]


def _cells_block(vectors, lists, quantizer, queries: np.ndarray, block: slice, earlier: int, threshold: float):
    """Per probed cell: the block's query variants probing it against the cell's earlier members."""
    probes = _block_probes(lists, quantizer, queries, block)
    _, b, nprobe = probes.shape
    cells = probes.reshape(-1)
    order = np.argsort(cells, kind="stable")
    sorted_cells = cells[order]
    for start, stop in _runs(sorted_cells):
        cell = int(sorted_cells[start])
        if cell < 0:  # faiss pads with -1 when nprobe > nlist
            continue
        members = np.asarray(lists.rows[lists.bounds[cell] : lists.bounds[cell + 1]])
        members = members[: np.searchsorted(members, earlier)]  # rows ascend within a cell
        if len(members):
            entries = order[start:stop]
            yield from _join_cell(vectors, queries, entries // (b * nprobe), (entries // nprobe) % b,
                                  members, block.start, threshold)


def _join_cell(vectors, queries: np.ndarray, variant: np.ndarray, local: np.ndarray, members: np.ndarray,
               row0: int, threshold: float):
    """Queries in chunks of whole rows (all their variants together), so each chunk is de-duplicated alone."""
    targets = _rows(vectors[members])
    by_row = np.argsort(local, kind="stable")
    local, variant = local[by_row], variant[by_row]
    rows_per_chunk = max(1, PRODUCT_ENTRIES // len(members) // len(queries))
    cuts = np.flatnonzero(np.r_[True, local[1:] != local[:-1]])[::rows_per_chunk]
    for start, stop in zip(cuts, np.r_[cuts[1:], len(local)], strict=True):
        sims = queries[variant[start:stop], local[start:stop]] @ targets.T
        q_idx, m_idx = np.nonzero(sims >= np.float32(threshold))
        found = (local[start:stop][q_idx] + row0, members[m_idx], sims[q_idx, m_idx])
        # Two variants of one row probing the same cell meet the same member twice.
        yield _best_per_pair(*found) if len(queries) > 1 else found


def _best_per_pair(q: np.ndarray, r: np.ndarray, sims: np.ndarray) -> Pairs:
    order = np.lexsort((-sims, r, q))
    q, r, sims = q[order], r[order], sims[order]
    first = np.ones(len(q), dtype=bool)
    first[1:] = (q[1:] != q[:-1]) | (r[1:] != r[:-1])
    return q[first], r[first], sims[first]


def _to_ids(found: list[Pairs], ids: np.ndarray) -> Pairs:
    q = np.concatenate([f[0] for f in found]).astype(np.int64, copy=False)
    r = np.concatenate([f[1] for f in found]).astype(np.int64, copy=False)
    sims = np.concatenate([f[2] for f in found]).astype(np.float32, copy=False)
    id_q, id_r = ids[q], ids[r]
    return np.minimum(id_q, id_r), np.maximum(id_q, id_r), sims
