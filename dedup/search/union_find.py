"""Duplicate clusters from neighbour pairs, on integer node indices 0..n-1.

The caller maps sample ids to node indices (and back); nothing here knows
about files. Two steps:

* `connected_components`: exact union-find as vectorised numpy -- hook every
  root onto its smallest neighbouring root, then pointer-jump until every node
  points at its root. No recursion, no Python loop over nodes.
* `cluster_with_guard`: connected components are prone to *chaining*
  (A~B, B~C, C~D puts A and D together although they are unrelated). Each
  component gets a representative (its highest-degree member; ties -> smallest
  index) and members less similar to it than `guard_threshold` are detached;
  detached members are re-clustered among themselves through their remaining
  edges, for at most `max_passes` passes.

  A representative alone cannot stop a *hub*: B, a blend or collage of two
  unrelated pictures A and C, is similar to both, so both pass B's guard. The
  support check closes that hole: each cluster's *anchor* is the member most
  similar to its representative, and every other member must also reach
  `support_threshold` against the anchor (A and C at cosine 0.03 cannot both
  stay). Real copies of one picture all resemble each other, so they pass.
  A crop does not resemble its sibling crops (the left and the right part of a
  photo), so a member that its representative *contains* (`contains`, e.g. a
  crop window of the representative matching the member) joins through that
  parent without the support check. Every check compares one pair per member:
  O(edges) work per pass, reading only the rows compared.
* `cluster_with_guard_streamed`: the same guard over edges read part by part
  (O(nodes) memory, the union-find parent optionally a memory map);
  `reduce_part` / `merge_summaries` split its first pass into per-part tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

# sim(rows_a, rows_b) -> similarity of each pair (rows_a[i], rows_b[i]).
PairSimilarity = Callable[[np.ndarray, np.ndarray], np.ndarray]
DEFAULT_MAX_PASSES = 8
# alloc(name, n, dtype) -> a writable array of n (contents undefined): np.empty, or a memory map the caller
# keeps on disk, so that the streamed guard's O(nodes) state need not be anonymous memory.
Allocator = Callable[[str, int, "np.typing.DTypeLike"], np.ndarray]
# Nodes handled at once by the streamed guard's per-node steps: its temporaries are O(block), not O(nodes).
BLOCK_NODES = 1 << 22


def in_memory(name: str, n: int, dtype) -> np.ndarray:
    """The default `Allocator`: anonymous memory."""
    return np.empty(n, dtype=dtype)


def filled(alloc: Allocator, name: str, n: int, dtype, value, block_nodes: int = BLOCK_NODES) -> np.ndarray:
    """alloc(...) set to `value`, block by block (no n-sized temporary)."""
    array = alloc(name, n, dtype)
    for start in range(0, n, block_nodes):
        array[start : start + block_nodes] = value
    return array


def node_range(alloc: Allocator, name: str, n: int, block_nodes: int = BLOCK_NODES) -> np.ndarray:
    """alloc(...) set to 0..n-1, block by block."""
    array = alloc(name, n, np.int64)
    for start in range(0, n, block_nodes):
        array[start : start + block_nodes] = np.arange(start, min(start + block_nodes, n), dtype=np.int64)
    return array


def blocks(n: int, block_nodes: int = BLOCK_NODES) -> Iterable[slice]:
    return (slice(start, min(start + block_nodes, n)) for start in range(0, n, block_nodes))


def connected_components(n_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of every node = the smallest node index of its connected component."""
    a, b = _check_edges(n_nodes, a, b)
    parent = np.arange(n_nodes, dtype=np.int64)
    while len(a):
        root_a, root_b = parent[a], parent[b]
        live = root_a != root_b  # edges inside one tree are done for good
        a, b, root_a, root_b = a[live], b[live], root_a[live], root_b[live]
        if not len(a):
            break
        # parent[x] <= x always holds, so hooking the larger root under the
        # smaller one can never create a cycle.
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        parent = _compress(parent)
    return parent


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping: parent <- parent[parent] until every node points at a root."""
    while True:
        grandparent = parent[parent]
        if np.array_equal(grandparent, parent):
            return parent
        parent = grandparent


def _check_edges(n_nodes: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"edge endpoint arrays must be 1-d and equally long, got {a.shape} and {b.shape}")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n_nodes):
        raise ValueError(f"edge endpoints must be node indices in [0, {n_nodes})")
    return a, b


@dataclass(frozen=True)
class Clusters:
    """Per-node result; singletons are their own representative."""

    labels: np.ndarray  # int64: node index of the cluster's representative
    is_representative: np.ndarray  # bool
    similarity_to_representative: np.ndarray  # float32, 1.0 for representatives
    passes: int  # guard passes that ran

    def sizes(self) -> np.ndarray:
        """Size of each node's cluster."""
        return np.bincount(self.labels, minlength=len(self.labels))[self.labels]


def choose_representatives(labels: np.ndarray, degree: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Representative of each of `nodes`: highest degree in its component, ties -> smallest index.

    `labels` are node indices (as `connected_components` returns them).
    """
    order = np.lexsort((nodes, -degree[nodes], labels[nodes]))
    sorted_labels = labels[nodes][order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    rep_of_label = np.empty(len(labels), dtype=np.int64)
    rep_of_label[sorted_labels[first]] = nodes[order][first]
    return rep_of_label[labels[nodes]]


def cluster_with_guard(
    n_nodes: int,
    a: np.ndarray,
    b: np.ndarray,
    similarity: PairSimilarity,
    guard_threshold: float | None = None,
    *,
    max_passes: int = DEFAULT_MAX_PASSES,
    support_threshold: float | None = None,
    contains: PairSimilarity | None = None,
) -> Clusters:
    """Connected components with a chaining guard (see module doc).

    `similarity(reps, members)` gives the exact similarity of node pairs
    (e.g. `dedup.search.pairs.pair_similarity(vectors)`); it is called once per
    pass with every (representative, member) pair, and once more with every
    (anchor, member) pair when `support_threshold` is set. `contains(parents,
    children)` scores how well a child is a part of its parent (compared with
    `guard_threshold`); such members skip the support check.
    `guard_threshold=None` keeps whole components. Nodes still unresolved
    after `max_passes` passes stay singletons: the guard never merges what it
    could not check.
    """
    a, b = _check_edges(n_nodes, a, b)
    labels = np.arange(n_nodes, dtype=np.int64)
    is_rep = np.ones(n_nodes, dtype=bool)
    sim_to_rep = np.ones(n_nodes, dtype=np.float32)
    passes = 0
    while len(a) and passes < max_passes:
        passes += 1
        checks = _Checks(similarity, guard_threshold, support_threshold, contains)
        detached = _guard_pass(n_nodes, a, b, checks, labels, is_rep, sim_to_rep)
        # Only edges between two detached nodes can still form clusters.
        keep = detached[a] & detached[b]
        a, b = a[keep], b[keep]
    return Clusters(labels, is_rep, sim_to_rep, passes)


@dataclass(frozen=True)
class _Checks:
    similarity: PairSimilarity
    guard: float | None
    support: float | None
    contains: PairSimilarity | None

    def accept(self, member_reps: np.ndarray, members: np.ndarray, sims: np.ndarray | None = None,
               anchor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(accepted mask, similarity to the representative) of each (rep, member) pair.

        `sims` and `anchor` (each member's cluster anchor) when the caller computed them already
        (the blocked guard, whose anchors span every block).
        """
        if sims is None:
            sims = np.asarray(self.similarity(member_reps, members), dtype=np.float32)
        if self.guard is None:
            return np.ones(len(members), dtype=bool), sims
        accepted = sims >= self.guard
        if self.support is not None:
            accepted &= self._supported(member_reps, members, sims, accepted, anchor)
        if self.contains is not None:
            contained, part_score = self._contained(member_reps, members, accepted)
            accepted |= contained
            sims = np.where(contained, part_score, sims)  # a crop is reported by how well it fits its parent
        return accepted, sims

    def _supported(self, member_reps, members, sims, accepted, anchor=None) -> np.ndarray:
        """Members at least `support` similar to their cluster's anchor (the anchor itself passes)."""
        if anchor is None:
            anchor = _anchors(member_reps, members, np.where(accepted, sims, -np.inf))
        check = np.flatnonzero(accepted & (anchor != members))
        supported = np.ones(len(members), dtype=bool)
        if len(check):
            support = np.asarray(self.similarity(anchor[check], members[check]), dtype=np.float32)
            supported[check] = support >= self.support
        return supported

    def _contained(self, member_reps, members, accepted) -> tuple[np.ndarray, np.ndarray]:
        """Members their representative contains (a crop joining through its parent), and the containment score."""
        score = np.full(len(members), -np.inf, dtype=np.float32)
        check = np.flatnonzero(~accepted)
        if len(check):
            score[check] = np.asarray(self.contains(member_reps[check], members[check]), dtype=np.float32)
        return score >= self.guard, score


def _anchors(member_reps: np.ndarray, members: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Per member: the member of the same representative with the highest score (ties -> smallest index)."""
    order = np.lexsort((members, -score, member_reps))
    sorted_reps = member_reps[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_reps[1:] != sorted_reps[:-1]
    group = np.cumsum(first) - 1
    anchor = np.empty(len(members), dtype=np.int64)
    anchor[order] = members[order][first][group]
    return anchor


def _guard_pass(n_nodes, a, b, checks: _Checks, labels, is_rep, sim_to_rep) -> np.ndarray:
    """Cluster the graph (a, b) once, writing accepted nodes in place; return the detached mask."""
    components = connected_components(n_nodes, a, b)
    degree = np.bincount(a, minlength=n_nodes) + np.bincount(b, minlength=n_nodes)
    return _settle(components, degree, checks, labels, is_rep, sim_to_rep)


def _settle(components, degree: np.ndarray, checks: _Checks, labels, is_rep, sim_to_rep) -> np.ndarray:
    """One pass's verdicts from its components and degrees (O(nodes)); the in-memory and streamed guards share it."""
    n_nodes = len(degree)
    nodes = np.flatnonzero(degree)
    reps = choose_representatives(components, degree, nodes)
    is_member = reps != nodes
    members, member_reps = nodes[is_member], reps[is_member]
    accepted, sims = checks.accept(member_reps, members)
    rep_nodes = np.unique(member_reps[accepted])
    labels[rep_nodes], is_rep[rep_nodes], sim_to_rep[rep_nodes] = rep_nodes, True, 1.0
    taken = members[accepted]
    labels[taken], is_rep[taken], sim_to_rep[taken] = member_reps[accepted], False, sims[accepted]
    detached = np.zeros(n_nodes, dtype=bool)
    detached[members[~accepted]] = True
    return detached


# ---------------------------------------------------------------- streamed edges, O(nodes) labels


def components_from_edge_parts(
    n_nodes: int, parts, labels: np.ndarray | None = None, block_nodes: int = BLOCK_NODES,
    alloc: Allocator = in_memory,
) -> np.ndarray:
    """`connected_components` over edges that arrive part by part (e.g. one Parquet file at a time).

    Only one part's edges are in memory; the parent array is `labels` (pass a
    writable int64 memory map of n_nodes to keep the O(nodes) state on disk), else
    one `alloc` gives. Roots hook under the smaller root as in `connected_components`,
    so the result is identical: every node labelled with the smallest node of its component.
    """
    parent = alloc("components", n_nodes, np.int64) if labels is None else labels
    for block in blocks(n_nodes, block_nodes):
        parent[block] = np.arange(block.start, block.stop, dtype=np.int64)
    for a, b in parts:
        _union_part(parent, *_check_edges(n_nodes, a, b))
    _flatten(parent, block_nodes)
    return parent


def _find(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    roots = np.asarray(parent[nodes])
    while True:
        up = np.asarray(parent[roots])
        if np.array_equal(up, roots):
            return roots
        roots = up


def _union_part(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    while len(a):
        root_a, root_b = _find(parent, a), _find(parent, b)
        live = root_a != root_b
        a, b, root_a, root_b = a[live], b[live], root_a[live], root_b[live]
        if not len(a):
            return
        high, low = np.maximum(root_a, root_b), np.minimum(root_a, root_b)
        # Unique hooks written with a plain gather/scatter: minimum.at on a memory map is slow.
        order = np.lexsort((low, high))
        high, low = high[order], low[order]
        first = np.r_[True, high[1:] != high[:-1]]
        parent[high[first]] = np.minimum(np.asarray(parent[high[first]]), low[first])
        # Path compression on the endpoints keeps later finds short.
        parent[a] = _find(parent, a)
        parent[b] = _find(parent, b)


def _flatten(parent: np.ndarray, block_nodes: int) -> None:
    """Point every node at its root; parent[x] <= x, so earlier blocks are final when a block is read."""
    for block in blocks(len(parent), block_nodes):
        parent[block] = _find(parent, np.arange(block.start, block.stop, dtype=np.int64))


# ---------------------------------------------------------------- the guard over streamed edges

# edge_parts() -> a fresh iterable of (a, b) node-index arrays: the whole graph, one part at a time.
EdgeParts = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
# Above this many nodes a degree update never builds an n-sized bincount, whatever the part's size.
BINCOUNT_NODES = 1 << 24


def streamed_graph(n_nodes: int, parts: Iterable[tuple[np.ndarray, np.ndarray]],
                   parent: np.ndarray | None = None, degree: np.ndarray | None = None,
                   block_nodes: int = BLOCK_NODES, alloc: Allocator = in_memory) -> tuple[np.ndarray, np.ndarray]:
    """(components, degree) of edges read part by part: `connected_components` plus the degree bincount.

    Only one part is held; `parent` (e.g. an int64 memory map) receives the labels and `degree`
    (reset here) the degrees; either missing comes from `alloc`.
    """
    degree = alloc("degree", n_nodes, np.int64) if degree is None else degree
    for block in blocks(n_nodes, block_nodes):
        degree[block] = 0

    def counted():
        for a, b in parts:
            a, b = _check_edges(n_nodes, a, b)
            add_degree(degree, a, b)
            yield a, b

    return components_from_edge_parts(n_nodes, counted(), parent, block_nodes, alloc), degree


def add_degree(degree: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """degree += the edges' endpoint counts, with O(part) temporaries when the part is small beside the nodes."""
    if len(degree) <= BINCOUNT_NODES and 16 * (len(a) + len(b)) >= len(degree):
        degree += np.bincount(a, minlength=len(degree)) + np.bincount(b, minlength=len(degree))
        return
    nodes, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    degree[nodes] += counts


class _PassState:
    """The streamed guard's O(nodes) arrays, allocated once and reused by every pass."""

    def __init__(self, n_nodes: int, alloc: Allocator, block_nodes: int) -> None:
        self.n, self.block_nodes = n_nodes, block_nodes
        self.rep_node = alloc("rep_node", n_nodes, np.int64)  # per component label: its representative
        self.rep_degree = alloc("rep_degree", n_nodes, np.int64)
        self.score = alloc("score", n_nodes, np.float32)  # per member: similarity to its representative
        self.anchor = alloc("anchor", n_nodes, np.int64)  # per representative: its anchor member
        self.anchor_score = alloc("anchor_score", n_nodes, np.float32)
        self.detached = alloc("detached", n_nodes, bool)

    def reset(self) -> None:
        for block in blocks(self.n, self.block_nodes):
            self.rep_node[block], self.anchor[block], self.detached[block] = -1, -1, False


def _settle_blocked(components, degree, checks: _Checks, labels, is_rep, sim_to_rep, state: _PassState) -> np.ndarray:
    """`_settle`, node block by node block: the same verdicts with O(block) temporaries.

    Three sweeps in node order: each component's representative (highest degree, ties -> smallest
    node), then each member's similarity and each representative's anchor (best accepted member,
    ties -> smallest), then the support and containment checks and the writes. A later block
    replaces a kept best only when strictly better, which is the in-memory tie rule.
    """
    state.reset()
    for block in blocks(state.n, state.block_nodes):
        _best_per_label(state.rep_node, state.rep_degree, *_block_reps(components, degree, block))
    for block in blocks(state.n, state.block_nodes):
        _score_block(checks, state, *_block_members(components, degree, state, block))
    for block in blocks(state.n, state.block_nodes):
        members, member_reps = _block_members(components, degree, state, block)
        _accept_block(checks, state, members, member_reps, labels, is_rep, sim_to_rep)
    return state.detached


def _block_reps(components, degree, block: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, node, degree) of each component's best node within one block of nodes."""
    nodes = block.start + np.flatnonzero(np.asarray(degree[block]))
    labels, deg = np.asarray(components[nodes]), np.asarray(degree[nodes])
    order = np.lexsort((nodes, -deg, labels))
    first = _run_starts(labels[order])
    return labels[order][first], nodes[order][first], deg[order][first]


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    first = np.ones(len(sorted_keys), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return first


def _best_per_label(best: np.ndarray, best_value: np.ndarray, keys, nodes, values) -> None:
    """best[key] <- node where none is kept yet or `values` beats the kept one strictly."""
    take = (np.asarray(best[keys]) < 0) | (values > np.asarray(best_value[keys]))
    best[keys[take]], best_value[keys[take]] = nodes[take], values[take]


def _block_members(components, degree, state: _PassState, block: slice) -> tuple[np.ndarray, np.ndarray]:
    """(members, their representatives) of one block of nodes: its touched nodes that are not representatives."""
    nodes = block.start + np.flatnonzero(np.asarray(degree[block]))
    reps = np.asarray(state.rep_node[np.asarray(components[nodes])])
    is_member = reps != nodes
    return nodes[is_member], reps[is_member]


def _score_block(checks: _Checks, state: _PassState, members: np.ndarray, member_reps: np.ndarray) -> None:
    """Each member's similarity to its representative, and the representatives' anchors so far."""
    if not len(members):
        return
    sims = np.asarray(checks.similarity(member_reps, members), dtype=np.float32)
    state.score[members] = sims
    if checks.guard is None or checks.support is None:
        return
    score = np.where(sims >= checks.guard, sims, -np.inf).astype(np.float32)
    order = np.lexsort((members, -score, member_reps))
    first = _run_starts(member_reps[order])
    _best_per_label(state.anchor, state.anchor_score, member_reps[order][first], members[order][first],
                    score[order][first])


def _accept_block(checks: _Checks, state: _PassState, members, member_reps, labels, is_rep, sim_to_rep) -> None:
    """The block's verdicts (as `_Checks.accept`, with the anchors of the whole pass) written in place."""
    if not len(members):
        return
    accepted, sims = checks.accept(member_reps, members, np.asarray(state.score[members]),
                                   np.asarray(state.anchor[member_reps]))
    rep_nodes = np.unique(member_reps[accepted])
    labels[rep_nodes], is_rep[rep_nodes], sim_to_rep[rep_nodes] = rep_nodes, True, 1.0
    taken = members[accepted]
    labels[taken], is_rep[taken], sim_to_rep[taken] = member_reps[accepted], False, sims[accepted]
    state.detached[members[~accepted]] = True


def cluster_with_guard_streamed(
    n_nodes: int,
    edge_parts: EdgeParts,
    similarity: PairSimilarity,
    guard_threshold: float | None = None,
    *,
    max_passes: int = DEFAULT_MAX_PASSES,
    support_threshold: float | None = None,
    contains: PairSimilarity | None = None,
    parent: np.ndarray | None = None,
    first_graph: tuple[np.ndarray, np.ndarray] | None = None,
    restrict: Callable[[np.ndarray], None] | None = None,
    alloc: Allocator = in_memory,
    block_nodes: int = BLOCK_NODES,
) -> Clusters:
    """`cluster_with_guard` with the edges read part by part: the same result, O(block) temporaries.

    Each pass reads `edge_parts()` once (keeping only edges between two nodes the
    previous pass detached, as the in-memory guard does), so no pass holds more
    than one part. The O(nodes) state (labels, degrees, the union-find parent, each
    pass's representatives and anchors) comes from `alloc` (memory maps keep it on
    disk) and is touched `block_nodes` at a time. `parent`: a writable int64 array of
    n_nodes for the union-find. `first_graph`: (components, degree) of the whole graph
    when the caller reduced the edges already (engine tasks), which saves the first read.
    `restrict(detached)` is told each pass's detached mask: a source may then drop the
    edges that can never count again (rewrite its parts smaller); the guard filters either way.
    """
    labels = node_range(alloc, "labels", n_nodes, block_nodes)
    is_rep = filled(alloc, "is_rep", n_nodes, bool, True, block_nodes)
    sim_to_rep = filled(alloc, "sim_to_rep", n_nodes, np.float32, 1.0, block_nodes)
    checks = _Checks(similarity, guard_threshold, support_threshold, contains)
    state, degree_buffer = _PassState(n_nodes, alloc, block_nodes), None
    passes, detached = 0, None
    while passes < max_passes and (detached is None or detached.any()):
        if passes == 0 and first_graph is not None:
            components, degree = first_graph
        else:
            if degree_buffer is None:
                degree_buffer = alloc("degree", n_nodes, np.int64)
            parent = alloc("components", n_nodes, np.int64) if parent is None else parent
            components, degree = streamed_graph(n_nodes, _surviving(edge_parts(), detached), parent,
                                                degree_buffer, block_nodes, alloc)
        if not degree.any():
            break
        passes += 1
        detached = _settle_blocked(components, degree, checks, labels, is_rep, sim_to_rep, state)
        if restrict is not None and passes < max_passes:
            restrict(detached)
    return Clusters(labels, is_rep, sim_to_rep, passes)


def cluster_sizes(labels: np.ndarray, alloc: Allocator = in_memory, block_nodes: int = BLOCK_NODES) -> np.ndarray:
    """Members per label (indexed by label node), counted block by block (no n-sized bincount)."""
    sizes = filled(alloc, "sizes", len(labels), np.int64, 0, block_nodes)
    for block in blocks(len(labels), block_nodes):
        keys, counts = np.unique(np.asarray(labels[block]), return_counts=True)
        sizes[keys] += counts
    return sizes


def _surviving(parts, detached: np.ndarray | None):
    """Only edges between two detached nodes can still form clusters (see `cluster_with_guard`)."""
    for a, b in parts:
        if detached is not None:
            keep = np.asarray(detached[a]) & np.asarray(detached[b])
            a, b = a[keep], b[keep]
        yield a, b


# ---------------------------------------------------------------- edge reduction (engine tasks)


def reduce_part(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One edge part -> (nodes it touches, their local root, their degree in the part): O(part) summary.

    Unioning every (node, root) pair of all summaries gives the components of all
    the edges (roots are the smallest touched node, so labels come out identical),
    and summing the degrees gives their degree: the first guard pass without the edges.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    nodes, local = np.unique(np.concatenate([a, b]), return_inverse=True)
    local_a, local_b = local[: len(a)], local[len(a) :]
    roots = nodes[connected_components(len(nodes), local_a, local_b)]  # nodes is sorted: smallest stays smallest
    return nodes, roots, np.bincount(local, minlength=len(nodes)).astype(np.int64)


def merge_summaries(n_nodes: int, summaries, parent: np.ndarray | None = None,
                    alloc: Allocator = in_memory) -> tuple[np.ndarray, np.ndarray]:
    """(components, degree) of the whole graph from `reduce_part` summaries, read one at a time."""
    degree = filled(alloc, "first_degree", n_nodes, np.int64, 0)

    def pairs():
        for nodes, roots, counts in summaries:
            degree[nodes] += counts  # nodes are unique within a summary
            yield nodes, roots

    return components_from_edge_parts(n_nodes, pairs(), labels=parent, alloc=alloc), degree
