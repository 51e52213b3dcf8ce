"""Ranker training: one linear one-vs-rest classifier per tree node, teacher-forced.

The children of one parent are trained together on the documents of that parent (a document
belongs to a node when one of its labels lies below it), each by dual coordinate descent on
the L2-regularized squared hinge loss (liblinear's solver 1 with its shrinking and stopping
rule), eight children side by side: one read of a document's row serves all eight, and
their weights of a feature share a cache line. With ``negatives="tfn+man"`` a parent also
gets the documents that the layers above, as trained so far, bring to it in their beam
(matcher-aware hard negatives, as PECOS and XR-Transformer mine them): the rankers then
learn to reject exactly the documents that prediction will show them. Features are
renumbered to the ones those documents use, so a small node costs little whatever the
vocabulary size. Weights below ``weight_threshold`` are pruned, and the result is laid out
directly as the parent's chunk (see :mod:`models.tree`).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numba
import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from models.cluster import LabelTree
from models.params import POST_PROCESSORS, RankerParams
from models.search import search_matrix
from models.tree import Ensemble

# what a parent's jobs share: its documents' rows (indptr, local feature ids, values), the
# features they use, the children's positives (csc) and where the dense block starts
Prepared = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, sp.csc_matrix, int, np.ndarray]

log = logging.getLogger(__name__)


#: children of one parent trained side by side: a document's row is read once for all of
#: them, and their weights of one feature lie in one cache line (8 float64), so the random
#: reads of rows and weights that bound the solver are shared by the block
CHILD_BLOCK = 8


@numba.njit(nogil=True, cache=True)
def _train_chunk(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_local: int,
                 pos_indptr: np.ndarray, pos_child: np.ndarray, n_children: int, C: float,
                 eps: float, max_iter: int, bias: float, threshold: float, seed: int,
                 child_offset: int, keep_from: int, dense_col: np.ndarray,
                 dim: int) -> tuple[np.ndarray, ...]:
    """The children's classifiers, :data:`CHILD_BLOCK` at a time, laid out as the parent's
    chunk. Local features from ``keep_from`` on are the dense block: their weights go
    unpruned into dense_w[child, dense_col[f - keep_from]] instead of the sparse entries."""
    n = indptr.shape[0] - 1
    y = np.full((n, n_children), -1, dtype=np.int8)
    for i in range(n):
        for k in range(pos_indptr[i], pos_indptr[i + 1]):
            y[i, pos_child[k]] = 1
    diag = 0.5 / C
    qd = np.empty(n)
    for i in range(n):
        s = bias * bias + diag
        for k in range(indptr[i], indptr[i + 1]):
            s += data[k] * data[k]
        qd[i] = s
    W = np.empty((n_local, CHILD_BLOCK))
    wb = np.empty(CHILD_BLOCK)
    dense_w = np.zeros((n_children, dim), dtype=np.float32)
    bias_terms = np.zeros(n_children, dtype=np.float32)
    out_child = np.empty(max(16, n_children * 32), dtype=np.int32)
    out_feat = np.empty(out_child.shape[0], dtype=np.int32)
    out_val = np.empty(out_child.shape[0], dtype=np.float32)
    n_out = 0
    for first in range(0, n_children, CHILD_BLOCK):
        n_block = min(CHILD_BLOCK, n_children - first)
        W[:] = 0.0
        wb[:] = 0.0
        # seeded by the block's first child, so the model is the same however jobs are split
        # (jobs split a parent's children at block bounds, see _plan_jobs)
        state = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
                 + np.uint64(child_offset + first + 1))
        _solve_block(indptr, indices, data, y[:, first : first + n_block], qd, diag, eps,
                     max_iter, bias, state, W, wb)
        for c in range(n_block):
            bias_terms[first + c] = wb[c] * bias
            for f in range(keep_from, n_local):
                dense_w[first + c, dense_col[f - keep_from]] = W[f, c]
        out_child, out_feat, out_val, n_out = _keep_entries(
            W, n_block, keep_from, threshold, first, out_child, out_feat, out_val, n_out)
    rows, row_len, entry_child, entry_val = _rows_by_feature(
        out_child[:n_out], out_feat[:n_out], out_val[:n_out], n_local)
    return rows, row_len, entry_child, entry_val, bias_terms, dense_w


@numba.njit(nogil=True, cache=True)
def _solve_block(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, y: np.ndarray,
                 qd: np.ndarray, diag: float, eps: float, max_iter: int, bias: float,
                 state: np.uint64, W: np.ndarray, wb: np.ndarray) -> None:
    """Dual coordinate descent of the L2-regularized squared hinge loss (liblinear's solver
    1, its shrinking and stopping rule) for the children of ``y`` (n, n_block; +1 / -1)
    side by side: each pass visits, in a fresh random order, the documents that some child
    has not shrunk, and updates every child that still needs that document. Weights go to
    ``W[:, :n_block]`` and the bias weights to ``wb``, both zero on entry."""
    n, n_block = y.shape
    alpha = np.zeros((n, CHILD_BLOCK))
    shrunk = np.zeros((n, CHILD_BLOCK), dtype=np.bool_)
    n_shrunk = np.zeros(CHILD_BLOCK, dtype=np.int64)
    done = np.arange(CHILD_BLOCK) >= n_block  # the lanes past the block never train
    pg_max_old = np.full(CHILD_BLOCK, np.inf)
    pg_max = np.empty(CHILD_BLOCK)
    pg_min = np.empty(CHILD_BLOCK)
    g = np.empty(CHILD_BLOCK)
    step = np.zeros(CHILD_BLOCK)  # the lanes past n_block stay 0: every loop runs all lanes
    order = np.empty(n, dtype=np.int64)
    for _ in range(max_iter):
        m, state = _shuffled_live(order, shrunk, done, state)
        pg_max[:] = -np.inf
        pg_min[:] = np.inf
        for s in range(m):
            i = order[s]
            for c in range(CHILD_BLOCK):
                g[c] = wb[c] * bias
            for k in range(indptr[i], indptr[i + 1]):
                f = indices[k]
                v = data[k]
                for c in range(CHILD_BLOCK):
                    g[c] += W[f, c] * v
            moved = False
            for c in range(n_block):
                step[c] = 0.0
                if done[c] or shrunk[i, c]:
                    continue
                yc = float(y[i, c])
                grad = yc * g[c] - 1.0 + diag * alpha[i, c]
                pg = 0.0
                if alpha[i, c] == 0.0:
                    if grad > pg_max_old[c]:
                        shrunk[i, c] = True
                        n_shrunk[c] += 1
                        continue
                    elif grad < 0.0:
                        pg = grad
                else:
                    pg = grad
                pg_max[c] = max(pg_max[c], pg)
                pg_min[c] = min(pg_min[c], pg)
                if abs(pg) > 1e-12:
                    a_old = alpha[i, c]
                    alpha[i, c] = max(a_old - grad / qd[i], 0.0)
                    step[c] = (alpha[i, c] - a_old) * yc
                    moved = True
            if moved:
                for k in range(indptr[i], indptr[i + 1]):
                    f = indices[k]
                    v = data[k]
                    for c in range(CHILD_BLOCK):
                        W[f, c] += step[c] * v
                for c in range(CHILD_BLOCK):
                    wb[c] += step[c] * bias
        if _end_pass(pg_max, pg_min, pg_max_old, eps, shrunk, n_shrunk, done):
            return


@numba.njit(nogil=True, cache=True)
def _shuffled_live(order: np.ndarray, shrunk: np.ndarray, done: np.ndarray,
                   state: np.uint64) -> tuple[int, np.uint64]:
    """Writes to ``order`` the documents some child not done has not shrunk, shuffled
    (Fisher-Yates with xorshift64: the same whatever thread runs it); returns their count
    and the generator's next state."""
    m = 0
    for i in range(order.shape[0]):
        for c in range(done.shape[0]):
            if not done[c] and not shrunk[i, c]:
                order[m] = i
                m += 1
                break
    for j in range(m - 1, 0, -1):
        state ^= state << np.uint64(13)
        state ^= state >> np.uint64(7)
        state ^= state << np.uint64(17)
        pick = np.int64(state % np.uint64(j + 1))
        order[j], order[pick] = order[pick], order[j]
    return m, state


@numba.njit(nogil=True, cache=True)
def _end_pass(pg_max: np.ndarray, pg_min: np.ndarray, pg_max_old: np.ndarray, eps: float,
              shrunk: np.ndarray, n_shrunk: np.ndarray, done: np.ndarray) -> bool:
    """liblinear's stopping rule, per child, after a pass: a child whose projected gradients
    span at most ``eps`` is done if it shrank nothing, else gets all its documents back for
    another pass. True when every child is done."""
    all_done = True
    for c in range(done.shape[0]):
        if done[c]:
            continue
        if pg_max[c] - pg_min[c] <= eps:
            if n_shrunk[c] == 0:
                done[c] = True
                continue
            shrunk[:, c] = False
            n_shrunk[c] = 0
            pg_max_old[c] = np.inf
        else:
            # the upper bound is infinite (squared hinge), so only the max side shrinks
            pg_max_old[c] = pg_max[c] if pg_max[c] > 0 else np.inf
        all_done = False
    return all_done


@numba.njit(nogil=True, cache=True)
def _keep_entries(W: np.ndarray, n_block: int, keep_from: int, threshold: float, first: int,
                  out_child: np.ndarray, out_feat: np.ndarray, out_val: np.ndarray,
                  n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Appends the block's weights of at least ``threshold`` (features below ``keep_from``)
    to the entries, feature by feature, children ascending; grows the arrays as needed.
    Counted first, so that the loop that copies them never reallocates: a loop that may
    reallocate inside kept LLVM from optimizing it, and the pruning took a third of the
    bottom layers' training."""
    n_keep = 0
    for f in range(keep_from):
        for c in range(n_block):
            if abs(W[f, c]) >= threshold:
                n_keep += 1
    if n_out + n_keep > out_child.shape[0]:
        cap = max(2 * out_child.shape[0], n_out + n_keep)
        out_child = np.concatenate((out_child[:n_out], np.empty(cap - n_out, np.int32)))
        out_feat = np.concatenate((out_feat[:n_out], np.empty(cap - n_out, np.int32)))
        out_val = np.concatenate((out_val[:n_out], np.empty(cap - n_out, np.float32)))
    for f in range(keep_from):
        for c in range(n_block):
            v = W[f, c]
            if abs(v) >= threshold:
                out_child[n_out] = first + c
                out_feat[n_out] = f
                out_val[n_out] = v
                n_out += 1
    return out_child, out_feat, out_val, n_out


@numba.njit(nogil=True, cache=True)
def _rows_by_feature(child: np.ndarray, feat: np.ndarray, val: np.ndarray,
                     n_local: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The entries as chunk rows: counting sort by feature (stable, so children stay
    ascending within a row); (row features, row lengths, entry children, entry values)."""
    counts = np.zeros(n_local + 1, dtype=np.int64)
    for e in range(feat.shape[0]):
        counts[feat[e] + 1] += 1
    n_rows = 0
    for f in range(n_local):
        if counts[f + 1] > 0:
            n_rows += 1
    rows = np.empty(n_rows, dtype=np.int32)
    row_len = np.empty(n_rows, dtype=np.int64)
    r = 0
    for f in range(n_local):
        if counts[f + 1] > 0:
            rows[r] = f
            row_len[r] = counts[f + 1]
            r += 1
    for f in range(n_local):
        counts[f + 1] += counts[f]
    entry_child = np.empty(feat.shape[0], dtype=np.int32)
    entry_val = np.empty(feat.shape[0], dtype=np.float32)
    for e in range(feat.shape[0]):
        pos = counts[feat[e]]
        entry_child[pos] = child[e]
        entry_val[pos] = val[e]
        counts[feat[e]] += 1
    return rows, row_len, entry_child, entry_val


def _renumber(indices: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(the features used, in order; each index's position among them as int32). Sorting
    the indices costs nnz log nnz and an int64 copy: for the large parents a mark per
    feature is cheaper in time and memory; for the many small ones the sort is."""
    if indices.size * 8 < n_features:
        used, local = np.unique(indices, return_inverse=True)
        return used, local.astype(np.int32)
    mark = np.zeros(n_features, dtype=np.int32)
    mark[indices] = 1
    used = np.flatnonzero(mark)
    position = np.cumsum(mark, dtype=np.int32)
    position -= 1
    return used, position[indices]


def _layer_structure(tree: LabelTree) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer below the root (top first, labels last): (node of each label, parent of each
    node), both as indices local to their layer."""
    n_labels = tree.n_labels
    layers = []
    prev_codes = np.zeros(n_labels, dtype=np.int64)
    prev_bits = 0
    for bits, codes in zip(tree.layer_bits, tree.layer_codes()):
        n_nodes = 1 << bits
        parent_of_node = np.arange(n_nodes, dtype=np.int64) >> (bits - prev_bits)
        layers.append((codes, parent_of_node))
        prev_codes, prev_bits = codes, bits
    # labels: ordered by bottom cluster, then by label id
    order = np.lexsort((np.arange(n_labels), prev_codes))
    position = np.empty(n_labels, dtype=np.int64)
    position[order] = np.arange(n_labels)
    layers.append((position, prev_codes[order]))
    return layers


def _plan_jobs(parent_docs: sp.csc_matrix, counts: np.ndarray,
               threads: int) -> list[tuple[int, int, int]]:
    """(parent, first child, end child) jobs, biggest first. A parent whose work (documents x
    children) exceeds a fair share is split by children, so that a layer with few parents
    (the root's) still keeps every thread busy; always at the bounds of the blocks of
    :data:`CHILD_BLOCK` children trained together, so that any split trains the same model."""
    n_docs = np.diff(parent_docs.indptr)
    work = n_docs * counts
    share = max(1, int(work.sum() // (4 * threads)))
    jobs: list[tuple[int, int, int]] = []
    for p in np.argsort(-work, kind="stable"):
        n_blocks = -(-int(counts[p]) // CHILD_BLOCK)
        n_groups = min(n_blocks, max(1, -(-int(work[p]) // share)))
        bounds = np.minimum(np.linspace(0, n_blocks, n_groups + 1).astype(int) * CHILD_BLOCK,
                            int(counts[p]))
        jobs.extend((int(p), int(lo), int(hi)) for lo, hi in pairwise(bounds) if hi > lo)
    return jobs


def _merge_pieces(pieces: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Join the chunk parts of one parent trained by several jobs (rows sorted by feature,
    children ascending within a row)."""
    if len(pieces) == 1:
        _, rows, row_len, e_child, e_val = pieces[0]
        return rows, row_len, e_child, e_val
    feat = np.concatenate([np.repeat(rows, row_len) for _, rows, row_len, _, _ in pieces])
    child = np.concatenate([c for *_, c, _ in pieces])
    val = np.concatenate([v for *_, v in pieces])
    order = np.lexsort((child, feat))
    rows, row_len = np.unique(feat[order], return_counts=True)
    return rows.astype(np.int32), row_len.astype(np.int64), child[order], val[order]


def train_tree(
    X: sp.csr_matrix,
    Y: sp.csr_matrix,
    tree: LabelTree,
    params: RankerParams,
    *,
    seed: int,
    threads: int,
    post_processor: str = "l3-hinge",
    dense_start: int | None = None,
    desc: str = "tree",
) -> Ensemble:
    """Train every node classifier of one tree; returns it as a one-tree :class:`Ensemble`.

    ``X`` is (n_docs, n_features) float32 CSR with sorted indices; ``Y`` (n_docs, n_labels)
    binary CSR. ``post_processor`` ranks the beam that mines hard negatives. Features from
    ``dense_start`` on (a dense encoder's block; None: no such block) get dense, unpruned
    weights.
    """
    n_docs = X.shape[0]
    n_labels = Y.shape[1]
    dense_start = X.shape[1] if dense_start is None else int(dense_start)
    dim = X.shape[1] - dense_start
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    Y = sp.csr_matrix(Y, dtype=np.float32)
    layers = _layer_structure(tree)
    n_layer_nodes = [len(parent_of_node) for _, parent_of_node in layers]
    offsets = np.concatenate(([1], 1 + np.cumsum(n_layer_nodes)))
    n_nodes = int(offsets[-1])

    parent = np.full(n_nodes, -1, dtype=np.int64)
    child_ptr = np.zeros(n_nodes + 1, dtype=np.int64)
    bias = np.zeros(n_nodes, dtype=np.float32)
    chunk_rows: list[np.ndarray | None] = [None] * n_nodes
    chunk_row_len: list[np.ndarray | None] = [None] * n_nodes
    chunk_child: list[np.ndarray | None] = [None] * n_nodes
    chunk_val: list[np.ndarray | None] = [None] * n_nodes
    chunk_dense: list[np.ndarray | None] = [None] * n_nodes

    parent_docs = sp.csc_matrix(np.ones((n_docs, 1), dtype=np.float32))  # the root holds all
    for depth, (node_of_label, parent_of_node) in enumerate(layers):
        n_here = len(parent_of_node)
        first = int(offsets[depth])
        parent_first = 0 if depth == 0 else int(offsets[depth - 1])
        parent[first : first + n_here] = parent_first + parent_of_node
        counts = np.bincount(parent_of_node, minlength=parent_docs.shape[1])
        child_ptr[parent_first + 1 : parent_first + 1 + len(counts)] = counts
        M = sp.csr_matrix(
            (np.ones(n_labels, dtype=np.float32), (np.arange(n_labels), node_of_label)),
            shape=(n_labels, n_here),
        )
        node_docs = (Y @ M).tocsr()
        node_docs.data[:] = 1.0
        child_start = np.concatenate(([0], np.cumsum(counts)))
        jobs = _plan_jobs(parent_docs, counts, threads)
        prepared: dict[int, Prepared] = {}

        def prepare(p: int, pd: sp.csc_matrix = parent_docs, node_docs: sp.csr_matrix = node_docs,
                    child_start: np.ndarray = child_start) -> Prepared:
            docs = pd.indices[pd.indptr[p] : pd.indptr[p + 1]]
            # a parent holding every document (the root) trains on X itself, not a copy
            Xp = X if len(docs) == n_docs else X[docs]
            used, local = _renumber(Xp.indices, X.shape[1])
            pos = node_docs[docs][:, child_start[p] : child_start[p + 1]].tocsc()
            keep_from = int(np.searchsorted(used, dense_start))
            dense_col = (used[keep_from:] - dense_start).astype(np.int32)
            return (Xp.indptr.astype(np.int64), local, Xp.data, used, pos, keep_from,
                    dense_col)

        # parents split over several jobs share one preparation, made up front
        for p in {p for p, lo, hi in jobs if hi - lo < counts[p]}:
            prepared[p] = prepare(p)

        def run(job: tuple[int, int, int], prepared: dict[int, Prepared] = prepared,
                prepare: Callable[[int], Prepared] = prepare, child_start: np.ndarray = child_start,
                first: int = first) -> tuple:
            p, lo, hi = job
            indptr, local, data, used, pos, keep_from, dense_col = (
                prepared.get(p) or prepare(p))
            part = pos[:, lo:hi].tocsr()
            part.sort_indices()
            rows, row_len, e_child, e_val, b, dense_w = _train_chunk(
                indptr, local, data, len(used), part.indptr.astype(np.int64),
                part.indices.astype(np.int32), hi - lo, params.C, params.eps,
                params.max_iter, params.bias, params.weight_threshold, seed,
                first + int(child_start[p]) + lo, keep_from, dense_col, dim,
            )
            return p, lo, used[rows].astype(np.int32), row_len, e_child + lo, e_val, b, dense_w

        t0 = time.perf_counter()
        parts: dict[int, list] = {}
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for p, lo, rows, row_len, e_child, e_val, b, dense_w in tqdm(
                pool.map(run, jobs), total=len(jobs),
                desc=f"{desc} layer {depth + 1}/{len(layers)}", leave=False, mininterval=1.0,
            ):
                parts.setdefault(p, []).append((lo, rows, row_len, e_child, e_val, dense_w))
                bias[first + child_start[p] + lo : first + child_start[p] + lo + len(b)] = b
        for p, pieces in parts.items():
            node = parent_first + p
            rows, row_len, e_child, e_val = _merge_pieces([piece[:5] for piece in pieces])
            chunk_rows[node], chunk_row_len[node] = rows, row_len
            chunk_child[node], chunk_val[node] = e_child, e_val
            if dim:
                pieces.sort(key=lambda piece: piece[0])
                chunk_dense[node] = np.concatenate([piece[5] for piece in pieces]).ravel()
        log.info(
            "%s layer %d/%d: %d nodes, %.2fs, peak RSS %.0f MB", desc, depth + 1, len(layers),
            n_here, time.perf_counter() - t0,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )
        next_docs = node_docs
        if params.negatives == "tfn+man" and depth < len(layers) - 1:
            t0 = time.perf_counter()
            partial = _assemble(int(offsets[depth + 1]), depth + 1, child_ptr, parent, bias,
                                np.arange(n_here), chunk_rows, chunk_row_len, chunk_child,
                                chunk_val, chunk_dense, dense_start)
            reached = _matcher_nodes(X, partial, params.negative_beam_size,
                                     POST_PROCESSORS[post_processor], threads)
            next_docs = node_docs + reached
            next_docs.data[:] = 1.0
            log.info("%s layer %d/%d: hard negatives from a beam of %d: %.1f -> %.1f "
                     "parents per document, %.2fs", desc, depth + 1, len(layers),
                     params.negative_beam_size, node_docs.nnz / max(n_docs, 1),
                     next_docs.nnz / max(n_docs, 1), time.perf_counter() - t0)
        parent_docs = next_docs.tocsc()
        parent_docs.sort_indices()

    return _assemble(n_nodes, len(layers), child_ptr, parent, bias, layers[-1][0], chunk_rows,
                     chunk_row_len, chunk_child, chunk_val, chunk_dense, dense_start)


def _assemble(n_nodes: int, n_layers: int, child_count: np.ndarray, parent: np.ndarray,
              bias: np.ndarray, node_of_label: np.ndarray, chunk_rows: list,
              chunk_row_len: list, chunk_child: list, chunk_val: list, chunk_dense: list,
              dense_start: int) -> Ensemble:
    """The first ``n_nodes`` nodes (root and ``n_layers`` layers) as a one-tree ensemble
    whose leaves are the last layer's nodes. ``child_count[i + 1]`` holds the children of
    node i; ``node_of_label`` maps each leaf's label id to its position in the last layer."""
    # breadth-first numbering: the children of node i start after the root and after the
    # children of nodes 0 .. i-1
    counts = child_count[: n_nodes + 1].copy()
    counts[0] = 0
    child_ptr = 1 + np.cumsum(counts)
    n_leaves = len(node_of_label)
    label_first = n_nodes - n_leaves
    node_label = np.full(n_nodes, -1, dtype=np.int32)
    node_label[label_first + node_of_label] = np.arange(n_leaves, dtype=np.int32)
    empty_i32, empty_i64 = np.empty(0, np.int32), np.empty(0, np.int64)
    rows = [r if r is not None else empty_i32 for r in chunk_rows[:n_nodes]]
    row_len = [r if r is not None else empty_i64 for r in chunk_row_len[:n_nodes]]
    chunk_ptr = np.concatenate(([0], np.cumsum([len(r) for r in rows]))).astype(np.int64)
    entry_child = np.concatenate([c for c in chunk_child[:n_nodes] if c is not None]
                                 or [empty_i32])
    entry_val = np.concatenate([v for v in chunk_val[:n_nodes] if v is not None]
                               or [np.empty(0, np.float32)])
    dense = [d if d is not None else np.empty(0, np.float32) for d in chunk_dense[:n_nodes]]
    return Ensemble.from_arrays(dict(
        tree_root=np.zeros(1, np.int64),
        tree_depth=np.array([n_layers], np.int32),
        child_ptr=child_ptr,
        parent=parent[:n_nodes],
        chunk_ptr=chunk_ptr,
        chunk_feat=np.concatenate(rows),
        row_len=np.concatenate(row_len) if rows else empty_i64,
        entry_child=entry_child,
        entry_val=entry_val,
        weight_scale=np.ones(n_nodes, np.float32),
        bias=bias[:n_nodes],
        node_label=node_label,
        label_node=(label_first + node_of_label)[None, :],
        dense_start=np.array([dense_start]),
        dense_ptr=np.concatenate(([0], np.cumsum([d.size for d in dense]))),
        dense_val=np.concatenate(dense) if dense else np.empty(0, np.float32),
    ))


def _matcher_nodes(X: sp.csr_matrix, partial: Ensemble, beam_size: int, post: int,
                   threads: int) -> sp.csr_matrix:
    """(n_docs, leaves of ``partial``) binary: the nodes of the partial tree's last layer
    that beam search of width ``beam_size`` returns for each document."""
    top_k = min(beam_size, partial.n_labels)
    ids, _, counts = search_matrix(partial, X, post, top_k, beam_size, threads)
    keep = np.arange(top_k)[None, :] < counts[:, None]
    rows = np.repeat(np.arange(X.shape[0]), counts)
    return sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, ids[keep])),
                         shape=(X.shape[0], partial.n_labels))
