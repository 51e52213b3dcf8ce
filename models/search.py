"""Compiled beam search over a tree ensemble (numba, no Python in the per-document loop).

For each tree the beam walks layer by layer: every node in the beam has its children scored
(one chunk intersection, see :mod:`models.tree`), a child's path score is its parent's times
``post(margin)`` (kept as a sum of logs, which ranks the same), and the best ``beam_size`` go
on. The trees' top ``top_k`` labels are
merged, and every merged label gets its exact score in every tree: read from the scores the
beam already computed when its parent was expanded, otherwise computed along its path. So a
returned score is always the label's exact ensemble mean, whatever the beam.

Ties are broken by the smaller node (label) id, so results are reproducible.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numba
import numpy as np
import scipy.sparse as sp

from models.errors import InvalidInputError
from models.feature_lookup import BITMAP_MB, FeatureLookup, popcount
from models.tree import ROW_BLOCK, Ensemble

L3_HINGE = 0
SIGMOID = 1
L3_HINGE_ORDERED = 2
#: l3-hinge-ordered: the log score taken off every node below the hinge and given back, as the
#: margin grows, past it, so that margins past the hinge still rank (l3-hinge scores them all
#: 1, and the label id breaks the tie). Small: a path score moves by at most this much per
#: layer, in log.
TIE_SPAN = 1e-3
#: (indptr, indices, data) of CSR rows with sorted indices: what the search reads
Rows = tuple[np.ndarray, np.ndarray, np.ndarray]
#: what a search returns: label ids (n, top_k; -1 pads), scores (n, top_k), counts (n,)
Found = tuple[np.ndarray, np.ndarray, np.ndarray]


@numba.njit(inline="always")
def _log_post(z: float, kind: int) -> float:
    """log of the node score: the beam ranks by sums of these, so the l3-hinge cases need no
    exp below the hinge (l3-hinge-ordered: ``-h^3 - TIE_SPAN`` there, rising from
    ``-TIE_SPAN`` towards 0 past it)."""
    if kind == L3_HINGE:
        h = 1.0 - z
        if h <= 0.0:
            return 0.0
        return -h * h * h
    if kind == L3_HINGE_ORDERED:
        h = 1.0 - z
        if h <= 0.0:
            return -TIE_SPAN * np.exp(h)
        return -h * h * h - TIE_SPAN
    # log sigmoid, stable on both sides
    if z >= 0.0:
        return -np.log1p(np.exp(-z))
    return z - np.log1p(np.exp(z))


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dense_dot(w: np.ndarray, w_start: int, x: np.ndarray, x_start: int, n: int) -> float:
    """sum(w[w_start:w_start + n] * x[x_start:x_start + n]), float32 products summed in
    float64. Slices (not offsets) and fastmath let LLVM split the sum into SIMD lanes: 36 ns
    instead of 202 for n = 384 (the only change is the order of float rounding)."""
    a = w[w_start : w_start + n]
    b = x[x_start : x_start + n]
    s = 0.0
    for k in range(n):
        s += a[k] * b[k]
    return s


@numba.njit(inline="always")
def _row_start(row_len: np.ndarray, row_mark: np.ndarray, r: int) -> int:
    """First entry of row r: the mark of its block plus the counts of the rows before it."""
    b = r // ROW_BLOCK
    e = row_mark[b]
    for q in range(b * ROW_BLOCK, r):
        e += row_len[q]
    return e


@numba.njit(inline="always")
def _entry_of_row(row_len: np.ndarray, row_mark: np.ndarray, cur_r: int, cur_e: int,
                  r: int) -> int:
    """First entry of row r >= cur_r, given cur_e, the first entry of row cur_r: walked on
    from there, or jumped to by the marks when that is shorter."""
    if r - cur_r >= ROW_BLOCK:
        return _row_start(row_len, row_mark, r)
    for q in range(cur_r, r):
        cur_e += row_len[q]
    return cur_e


@numba.njit(nogil=True, cache=True)
def _score_chunk(node: int, c0: int, xi: np.ndarray, xv: np.ndarray, xdense: np.ndarray,
                 chunk_ptr: np.ndarray, chunk_feat: np.ndarray, row_len: np.ndarray,
                 row_mark: np.ndarray, entry_child: np.ndarray, entry_val: np.ndarray,
                 weight_scale: np.ndarray, bitmap_off: np.ndarray, bitmap: np.ndarray,
                 dir_off: np.ndarray, dir_rows: np.ndarray,
                 dense_start: int, dense_ptr: np.ndarray, dense_val: np.ndarray,
                 out: np.ndarray, n_children: int, hit: np.ndarray) -> None:
    """Margins (without bias) of the children c0.. of ``node`` into out[:n_children].
    ``xdense`` holds the document densely (its dense block is read from there); ``hit`` is
    int64 scratch of at least (3, the document's features)."""
    for j in range(n_children):
        out[j] = 0.0
    r0 = chunk_ptr[node]
    r1 = chunk_ptr[node + 1]
    n_rows = r1 - r0
    # the sparse rows hold features below dense_start only
    m = int(np.searchsorted(xi, dense_start))
    if n_rows > 0 and m > 0:
        _sparse_margins(node, xi, xv, xdense, m, r0, r1, chunk_feat, row_len, row_mark,
                        entry_child, entry_val, bitmap_off, bitmap, dir_off, dir_rows, out, hit)
        for j in range(n_children):
            out[j] *= weight_scale[c0 + j]
    d0 = dense_ptr[node]
    if dense_ptr[node + 1] > d0:
        dim = xdense.shape[0] - dense_start
        for j in range(n_children):
            out[j] += _dense_dot(dense_val, d0 + j * dim, xdense, dense_start, dim)


@numba.njit(nogil=True, cache=True)
def _sparse_margins(node: int, xi: np.ndarray, xv: np.ndarray, xdense: np.ndarray, m: int, r0: int,
                    r1: int, chunk_feat: np.ndarray, row_len: np.ndarray, row_mark: np.ndarray,
                    entry_child: np.ndarray, entry_val: np.ndarray, bitmap_off: np.ndarray,
                    bitmap: np.ndarray, dir_off: np.ndarray, dir_rows: np.ndarray,
                    out: np.ndarray, hit: np.ndarray) -> None:
    """Adds the document's first ``m`` features times the chunk's stored weights into out
    (unscaled: the caller applies each child's weight_scale). ``hit`` is int64 scratch of
    at least (3, m)."""
    off = bitmap_off[node]
    n_hit = 0
    if off >= 0:
        # feature bitmap of this chunk, 64 features a word, each word followed by the rows
        # of the words before it: one cache line tells whether and where a feature is
        for k in range(m):
            f = xi[k]
            w = off + 2 * (f >> 6)
            bit = np.uint64(1) << np.uint64(f & 63)
            word = bitmap[w]
            if word & bit:
                hit[0, n_hit] = k
                hit[1, n_hit] = r0 + int(bitmap[w + 1]) + popcount(word & (bit - np.uint64(1)))
                n_hit += 1
        _add_hit_rows(xv, row_len, row_mark, entry_child, entry_val, r0, hit, n_hit, out)
        return
    n_rows = r1 - r0
    # binary searches from the last row found cost about m * log2(rows); a scan of the rows
    # against the dense document costs rows: take the cheaper
    log_rows = 1
    while (1 << log_rows) < n_rows:
        log_rows += 1
    if m * log_rows >= n_rows:
        e = _row_start(row_len, row_mark, r0)
        for r in range(r0, r1):
            n = row_len[r]
            v = xdense[chunk_feat[r]]
            if v != 0.0:
                for q in range(e, e + n):
                    out[entry_child[q]] += v * entry_val[q]
            e += n
        return
    d0 = dir_off[node]
    if d0 >= 0:
        n_hit = _directory_hits(xi, m, r0, chunk_feat, dir_rows, d0, hit)
    else:
        n_hit = _searched_hits(xi, m, r0, r1, chunk_feat, hit)
    _add_hit_rows(xv, row_len, row_mark, entry_child, entry_val, r0, hit, n_hit, out)


@numba.njit(inline="always")
def _first_row_at_least(chunk_feat: np.ndarray, lo: int, hi: int, f: int) -> int:
    """The first row of lo..hi whose feature is f or above (hi if none): a binary search."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if chunk_feat[mid] < f:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(inline="always")
def _searched_hits(xi: np.ndarray, m: int, r0: int, r1: int, chunk_feat: np.ndarray,
                   hit: np.ndarray) -> int:
    """Notes in ``hit`` the chunk rows of the document's first ``m`` features, found by
    binary searches each starting from the last row found; returns how many."""
    n_hit = 0
    lo = r0
    for k in range(m):
        f = xi[k]
        lo = _first_row_at_least(chunk_feat, lo, r1, f)
        if lo == r1:
            break
        if chunk_feat[lo] == f:
            hit[0, n_hit] = k
            hit[1, n_hit] = lo
            n_hit += 1
            lo += 1
    return n_hit


@numba.njit(inline="always")
def _directory_hits(xi: np.ndarray, m: int, r0: int, chunk_feat: np.ndarray,
                    dir_rows: np.ndarray, d0: int, hit: np.ndarray) -> int:
    """As :func:`_searched_hits`, through the chunk's row directory (see
    :func:`models.feature_lookup.build_row_directories`): a feature's range of ids narrows
    the search to a few rows, and no search waits on the one before, so their cache misses
    overlap."""
    shift = int(dir_rows[d0])
    n_hit = 0
    for k in range(m):
        f = xi[k]
        g = d0 + 1 + (f >> shift)
        end = r0 + int(dir_rows[g + 1])
        lo = _first_row_at_least(chunk_feat, r0 + int(dir_rows[g]), end, f)
        if lo < end and chunk_feat[lo] == f:
            hit[0, n_hit] = k
            hit[1, n_hit] = lo
            n_hit += 1
    return n_hit


@numba.njit(inline="always")
def _add_hit_rows(xv: np.ndarray, row_len: np.ndarray, row_mark: np.ndarray,
                  entry_child: np.ndarray, entry_val: np.ndarray, r0: int, hit: np.ndarray,
                  n_hit: int, out: np.ndarray) -> None:
    """Adds the entries of the rows the document hit (hit[0, h]: its feature's position in
    xv, hit[1, h]: the row, ascending; hit[2, h] is filled with the row's first entry) into
    out. Two passes, where the rows' entries start, then the entries: the loads within a
    pass do not wait on one another, so a large ensemble's cache misses overlap instead of
    coming one after the other."""
    cur_r = r0
    cur_e = _row_start(row_len, row_mark, r0)
    for h in range(n_hit):
        cur_e = _entry_of_row(row_len, row_mark, cur_r, cur_e, hit[1, h])
        cur_r = hit[1, h]
        hit[2, h] = cur_e
    for h in range(n_hit):
        v = xv[hit[0, h]]
        e0 = hit[2, h]
        for e in range(e0, e0 + row_len[hit[1, h]]):
            out[entry_child[e]] += v * entry_val[e]


@numba.njit(nogil=True, cache=True)
def _hit_scratch(indptr: np.ndarray, row_start: int, row_stop: int) -> np.ndarray:
    """int64 (3, the most features of rows row_start..row_stop): what
    :func:`_sparse_margins` notes per feature hit, allocated once per call of a kernel."""
    most = 0
    for row in range(row_start, row_stop):
        most = max(most, indptr[row + 1] - indptr[row])
    return np.empty((3, most), dtype=np.int64)


@numba.njit(inline="always")
def _better(s_a: float, id_a: int, s_b: float, id_b: int) -> bool:
    return s_a > s_b or (s_a == s_b and id_a < id_b)


@numba.njit(nogil=True, cache=True)
def _insert_top(keep_id: np.ndarray, keep_score: np.ndarray, n_keep: int, cap: int, node: int,
                score: float) -> int:
    """Insert into a list sorted best first, holding at most ``cap``; returns the new size."""
    if n_keep == cap and not _better(score, node, keep_score[n_keep - 1], keep_id[n_keep - 1]):
        return n_keep
    pos = n_keep if n_keep < cap else cap - 1
    while pos > 0 and _better(score, node, keep_score[pos - 1], keep_id[pos - 1]):
        keep_id[pos] = keep_id[pos - 1]
        keep_score[pos] = keep_score[pos - 1]
        pos -= 1
    keep_id[pos] = node
    keep_score[pos] = score
    return n_keep + 1 if n_keep < cap else cap


#: the chunks one document scored off the beam: (parent node per entry, where its
#: children's log scores start in the third array, those scores, [entries, scores used])
OffBeamMemo = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@numba.njit(nogil=True, cache=True)
def _memo_find(memo: OffBeamMemo, p: int) -> int:
    """Where the children's log scores of parent ``p`` start in the memo, -1 if not there."""
    nodes, offs, _, used = memo
    for i in range(used[0]):
        if nodes[i] == p:
            return offs[i]
    return -1


@numba.njit(nogil=True, cache=True)
def _memo_keep(memo: OffBeamMemo, p: int, z: np.ndarray, nc: int, bias: np.ndarray, c0: int,
               post: int) -> int:
    """Keep the log scores of the ``nc`` children of ``p`` (margins ``z``) in the memo;
    where they start, or -1 when it is full."""
    nodes, offs, scores, used = memo
    n, start = used[0], used[1]
    if n == nodes.shape[0] or start + nc > scores.shape[0]:
        return -1
    for j in range(nc):
        scores[start + j] = _log_post(z[j] + bias[c0 + j], post)
    nodes[n], offs[n] = p, start
    used[0], used[1] = n + 1, start + nc
    return start


#: the most log scores one document's memo holds (a bound for very wide trees)
_MEMO_SCORES = 1 << 13


@numba.njit(nogil=True, cache=True)
def _off_beam_memo(extra_ptr: np.ndarray, b0: int, nb: int, n_trees: int, max_depth: int,
                   top_k: int, max_children: int) -> OffBeamMemo:
    """An empty memo for documents b0..b0 + nb - 1: room for every parent on the paths of
    their trees' top labels and of their most extra labels, in every tree."""
    most_extra = 0
    for row in range(b0, b0 + nb if extra_ptr.shape[0] else b0):
        most_extra = max(most_extra, extra_ptr[row + 1] - extra_ptr[row])
    n_paths = n_trees * (n_trees * top_k + most_extra)
    n_parents = n_paths * max_depth
    return (np.empty(n_parents, dtype=np.int64), np.empty(n_parents, dtype=np.int64),
            np.empty(min(n_parents * max(max_children, 1), _MEMO_SCORES)),
            np.zeros(2, dtype=np.int64))


@numba.njit(nogil=True, cache=True)
def _path_log_bound(t: int, node: int, tree_depth: np.ndarray, child_ptr: np.ndarray,
                    parent: np.ndarray, exp_parent: np.ndarray, exp_path: np.ndarray,
                    exp_off: np.ndarray, n_exp: np.ndarray, node_score: np.ndarray,
                    ) -> tuple[float, bool]:
    """(the log path score of leaf ``node`` of tree t, True) when the beam scored it (it
    expanded its parent); else (that of the leaf's deepest ancestor the beam scored,
    False): an upper bound, as every node score is at most 1."""
    layer = tree_depth[t] - 1
    leaf = True
    while layer >= 0:
        p = parent[node]
        for b in range(n_exp[t, layer]):
            if exp_parent[t, layer, b] == p:  # summed as _path_log_score sums it
                return 0.0 + exp_path[t, layer, b] + node_score[
                    exp_off[t, layer, b] + node - child_ptr[p]], leaf
        node = p
        layer -= 1
        leaf = False
    return 0.0, False  # not reached: the beam expands every root


@numba.njit(nogil=True, cache=True)
def _vote_of(v_ptr: np.ndarray, v_ids: np.ndarray, v_data: np.ndarray, row: int,
             label: int) -> float:
    """The vote of ``label`` in ``row`` of the votes (CSR, ids ascending); 0 if none."""
    a, b = v_ptr[row], v_ptr[row + 1]
    i = a + np.searchsorted(v_ids[a:b], label)
    return v_data[i] if i < b and v_ids[i] == label else 0.0


#: what the fused scores may differ by from the kernel's sums (float rounding), by far
_FUSION_SLACK = 1e-9


@numba.njit(nogil=True, cache=True)
def _fusion_floor(fusion: np.ndarray, v_ptr: np.ndarray, v_ids: np.ndarray, v_data: np.ndarray,
                  row: int, labels: np.ndarray, scores: np.ndarray, n: int, top_k: int,
                  ) -> float:
    """The least fused score (its parts that are known here) of the trees' top_k labels of
    ``row``, less a slack: any label whose fused score lies below it is not among the
    top_k of a pool that holds those. -inf when the trees returned fewer or ``fusion`` is
    empty."""
    if fusion.shape[0] == 0 or n < top_k:
        return -np.inf
    least = np.inf
    for j in range(n):
        fused = fusion[0] * scores[j] + fusion[1] * _vote_of(v_ptr, v_ids, v_data, row,
                                                             labels[j])
        least = min(least, fused)
    return least - _FUSION_SLACK


@numba.njit(nogil=True, cache=True)
def predict_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, row_start: int,
                 row_stop: int, xdense: np.ndarray, tree_root: np.ndarray, tree_depth: np.ndarray,
                 child_ptr: np.ndarray, parent: np.ndarray, chunk_ptr: np.ndarray,
                 chunk_feat: np.ndarray, row_len: np.ndarray, row_mark: np.ndarray,
                 entry_child: np.ndarray, entry_val: np.ndarray, weight_scale: np.ndarray,
                 bias: np.ndarray, node_label: np.ndarray, label_node: np.ndarray,
                 dense_start: int, dense_ptr: np.ndarray, dense_val: np.ndarray,
                 bitmap_off: np.ndarray, bitmap: np.ndarray, dir_off: np.ndarray,
                 dir_rows: np.ndarray, node_ok: np.ndarray, beam_size: int,
                 top_k: int, post: int, max_children: int, block: int, out_label: np.ndarray,
                 out_score: np.ndarray, out_n: np.ndarray, extra_ptr: np.ndarray,
                 extra_label: np.ndarray, extra_score: np.ndarray, fusion: np.ndarray,
                 v_ptr: np.ndarray, v_ids: np.ndarray, v_data: np.ndarray) -> None:
    """Predict rows row_start..row_stop of a CSR matrix (sorted indices) into out_* rows.
    With ``extra_ptr`` non-empty (CSR pointers over all rows), also the exact ensemble score
    of each label ``extra_label[c]`` of row d, c in ``extra_ptr[d]..extra_ptr[d + 1]``, into
    ``extra_score[c]``, reusing the node scores the beam computed (as the merge does). With
    ``fusion`` non-empty, 0 instead for a label that cannot enter the row's top_k under the
    fusion it describes (:class:`FusionBound`, its votes ``v_*`` CSR over all rows).

    ``node_ok`` is a label filter compiled to nodes (see :mod:`models.filters`): empty for
    none, else a child with ``node_ok`` False never enters the beam (its score is still kept
    for the exact merge), so every beam slot leads to an allowed label and only allowed
    labels are returned.

    Documents go in blocks of ``block``. Within a block the beam advances layer by layer for
    all documents at once, and the (document, node) pairs of a layer are processed grouped by
    node, so each chunk of weights is read once for all the documents that need it (as PECOS
    does) instead of once per document. ``xdense`` is an all-zero float32 scratch of
    n_features, left all-zero again."""
    n_trees = tree_root.shape[0]
    max_depth = 0
    for t in range(n_trees):
        max_depth = max(max_depth, tree_depth[t])
    width = min(beam_size, child_ptr[-1])
    cand_cap = max(width * max_children, 1)
    keep = max(width, top_k)  # the last layer keeps top_k candidates, the others width
    filtered = node_ok.shape[0] > 0
    z = np.empty(max(max_children, 1))
    hit = _hit_scratch(indptr, row_start, row_stop)
    for b0 in range(row_start, row_stop, block):
        nb = min(block, row_stop - b0)
        beam_id = np.empty((nb, width), dtype=np.int64)
        beam_score = np.empty((nb, width))
        n_beam = np.empty(nb, dtype=np.int64)
        next_id = np.empty((nb, keep), dtype=np.int64)
        next_score = np.empty((nb, keep))
        n_next = np.empty(nb, dtype=np.int64)
        top_id = np.empty((nb, n_trees, top_k), dtype=np.int64)
        top_n = np.zeros((nb, n_trees), dtype=np.int64)
        # per document, tree and layer: the expanded parents, their log path scores, and
        # where their children's log node scores start in node_score
        exp_parent = np.empty((nb, n_trees, max_depth, width), dtype=np.int64)
        exp_path = np.empty((nb, n_trees, max_depth, width))
        exp_off = np.empty((nb, n_trees, max_depth, width), dtype=np.int64)
        n_exp = np.zeros((nb, n_trees, max_depth), dtype=np.int64)
        node_score = np.empty((nb, n_trees * max_depth * cand_cap))
        pos = np.zeros(nb, dtype=np.int64)
        pair_node = np.empty(nb * width, dtype=np.int64)
        pair_doc = np.empty(nb * width, dtype=np.int64)
        pair_slot = np.empty(nb * width, dtype=np.int64)
        for t in range(n_trees):
            depth = tree_depth[t]
            for d in range(nb):
                beam_id[d, 0] = tree_root[t]
                beam_score[d, 0] = 0.0  # log of the root's path score, 1
                n_beam[d] = 1
            for layer in range(depth):
                last = layer == depth - 1
                cap = top_k if last else width
                n_pairs = 0
                for d in range(nb):
                    n_next[d] = 0
                    for b in range(n_beam[d]):
                        pair_node[n_pairs] = beam_id[d, b]
                        pair_doc[n_pairs] = d
                        pair_slot[n_pairs] = b
                        n_pairs += 1
                order = np.argsort(pair_node[:n_pairs], kind="mergesort")
                for q in range(n_pairs):
                    k = order[q]
                    p = pair_node[k]
                    d = pair_doc[k]
                    b = pair_slot[k]
                    row = b0 + d
                    xi = indices[indptr[row]:indptr[row + 1]]
                    xv = data[indptr[row]:indptr[row + 1]]
                    c0 = child_ptr[p]
                    nc = child_ptr[p + 1] - c0
                    off = pos[d]
                    exp_parent[d, t, layer, b] = p
                    exp_path[d, t, layer, b] = beam_score[d, b]
                    exp_off[d, t, layer, b] = off
                    for i in range(xi.shape[0]):
                        xdense[xi[i]] = xv[i]
                    _score_chunk(p, c0, xi, xv, xdense, chunk_ptr, chunk_feat, row_len,
                                 row_mark, entry_child, entry_val, weight_scale, bitmap_off,
                                 bitmap, dir_off, dir_rows, dense_start, dense_ptr, dense_val,
                                 z, nc, hit)
                    for i in range(xi.shape[0]):
                        xdense[xi[i]] = 0.0
                    base = beam_score[d, b]
                    for j in range(nc):
                        s = _log_post(z[j] + bias[c0 + j], post)
                        node_score[d, off + j] = s
                        if filtered and not node_ok[c0 + j]:
                            continue
                        n_next[d] = _insert_top(next_id[d], next_score[d], n_next[d], cap,
                                                c0 + j, base + s)
                    pos[d] = off + nc
                for d in range(nb):
                    n_exp[d, t, layer] = n_beam[d]
                    for j in range(n_next[d]):
                        if last:
                            top_id[d, t, j] = next_id[d, j]
                        else:
                            beam_id[d, j] = next_id[d, j]
                            beam_score[d, j] = next_score[d, j]
                    if last:
                        top_n[d, t] = n_next[d]
                    else:
                        n_beam[d] = n_next[d]
        memo = _off_beam_memo(extra_ptr, b0, nb, n_trees, max_depth, top_k, max_children)
        tree_score = np.empty(n_trees)
        tree_exact = np.empty(n_trees, dtype=np.bool_)
        for d in range(nb):
            row = b0 + d
            xi = indices[indptr[row]:indptr[row + 1]]
            xv = data[indptr[row]:indptr[row + 1]]
            for i in range(xi.shape[0]):
                xdense[xi[i]] = xv[i]
            memo[3][:] = 0
            out_n[row] = _merge_trees(xi, xv, xdense, tree_depth, child_ptr, parent, chunk_ptr,
                                      chunk_feat, row_len, row_mark, entry_child,
                                      entry_val, weight_scale, bias,
                                      node_label, label_node, bitmap_off, bitmap, dir_off, dir_rows,
                                      dense_start, dense_ptr, dense_val, post, top_k,
                                      top_id[d], top_n[d], exp_parent[d], exp_path[d],
                                      exp_off[d], n_exp[d], node_score[d], z, hit, memo,
                                      out_label[row], out_score[row])
            floor = _fusion_floor(fusion, v_ptr, v_ids, v_data, row, out_label[row],
                                  out_score[row], out_n[row], top_k)
            for c in range(extra_ptr[row] if extra_ptr.shape[0] else 0,
                           extra_ptr[row + 1] if extra_ptr.shape[0] else 0):
                lab = extra_label[c]
                # each tree's path score, exact where the beam scored the leaf, else the
                # score of its deepest ancestor the beam scored: the exact ones are then
                # computed while the bound still lets the label enter the top_k
                rest = 0.0
                if floor > -np.inf:
                    rest = fusion[1] * _vote_of(v_ptr, v_ids, v_data, row, lab) + fusion[2]
                bound = 0.0
                for t in range(n_trees):
                    log_score, tree_exact[t] = _path_log_bound(
                        t, label_node[t, lab], tree_depth, child_ptr, parent, exp_parent[d],
                        exp_path[d], exp_off[d], n_exp[d], node_score[d])
                    tree_score[t] = np.exp(log_score)
                    bound += tree_score[t]
                skipped = False
                for t in range(n_trees):
                    if tree_exact[t]:
                        continue
                    if floor > -np.inf and fusion[0] * bound / n_trees + rest < floor:
                        skipped = True
                        break
                    exact = np.exp(_path_log_score(
                        t, label_node[t, lab], xi, xv, xdense, tree_depth, child_ptr, parent,
                        chunk_ptr, chunk_feat, row_len, row_mark, entry_child, entry_val,
                        weight_scale, bias, bitmap_off, bitmap, dir_off, dir_rows,
                        dense_start, dense_ptr, dense_val, post, exp_parent[d], exp_path[d],
                        exp_off[d], n_exp[d], node_score[d], z, hit, memo))
                    bound += exact - tree_score[t]
                    tree_score[t], tree_exact[t] = exact, True
                if skipped:  # 0, below its exact score: it stays out of the top_k
                    extra_score[c] = 0.0
                    continue
                total = 0.0
                for t in range(n_trees):
                    total += tree_score[t]
                extra_score[c] = total / n_trees
            for i in range(xi.shape[0]):
                xdense[xi[i]] = 0.0


@numba.njit(nogil=True, cache=True)
def _merge_trees(xi: np.ndarray, xv: np.ndarray, xdense: np.ndarray, tree_depth: np.ndarray,
                 child_ptr: np.ndarray, parent: np.ndarray, chunk_ptr: np.ndarray,
                 chunk_feat: np.ndarray, row_len: np.ndarray, row_mark: np.ndarray,
                 entry_child: np.ndarray, entry_val: np.ndarray, weight_scale: np.ndarray,
                 bias: np.ndarray, node_label: np.ndarray, label_node: np.ndarray,
                 bitmap_off: np.ndarray, bitmap: np.ndarray, dir_off: np.ndarray,
                 dir_rows: np.ndarray, dense_start: int,
                 dense_ptr: np.ndarray, dense_val: np.ndarray, post: int, top_k: int,
                 top_id: np.ndarray, top_n: np.ndarray, exp_parent: np.ndarray,
                 exp_path: np.ndarray, exp_off: np.ndarray, n_exp: np.ndarray,
                 node_score: np.ndarray, z: np.ndarray, hit: np.ndarray, memo: OffBeamMemo,
                 out_label: np.ndarray, out_score: np.ndarray) -> int:
    """Union of the trees' top labels, each scored exactly in every tree (mean of path
    scores); writes the best top_k into out_*, returns how many."""
    n_trees = top_id.shape[0]
    n_union = 0
    union = np.empty(n_trees * top_k, dtype=np.int64)
    for t in range(n_trees):
        for j in range(top_n[t]):
            lab = node_label[top_id[t, j]]
            seen = False
            for u in range(n_union):
                if union[u] == lab:
                    seen = True
                    break
            if not seen:
                union[n_union] = lab
                n_union += 1
    n_out = 0
    for u in range(n_union):
        lab = union[u]
        total = 0.0
        for t in range(n_trees):
            total += np.exp(_path_log_score(
                t, label_node[t, lab], xi, xv, xdense, tree_depth, child_ptr, parent,
                chunk_ptr, chunk_feat, row_len, row_mark, entry_child, entry_val,
                weight_scale, bias, bitmap_off, bitmap, dir_off, dir_rows, dense_start,
                dense_ptr, dense_val,
                post, exp_parent, exp_path, exp_off, n_exp, node_score, z, hit, memo))
        n_out = _insert_top(out_label, out_score, n_out, top_k, lab, total / n_trees)
    return n_out


@numba.njit(nogil=True, cache=True)
def _path_log_score(t: int, node: int, xi: np.ndarray, xv: np.ndarray, xdense: np.ndarray,
                    tree_depth: np.ndarray, child_ptr: np.ndarray, parent: np.ndarray,
                    chunk_ptr: np.ndarray, chunk_feat: np.ndarray, row_len: np.ndarray,
                    row_mark: np.ndarray, entry_child: np.ndarray, entry_val: np.ndarray,
                    weight_scale: np.ndarray, bias: np.ndarray, bitmap_off: np.ndarray,
                    bitmap: np.ndarray, dir_off: np.ndarray, dir_rows: np.ndarray,
                    dense_start: int, dense_ptr: np.ndarray,
                    dense_val: np.ndarray, post: int, exp_parent: np.ndarray, exp_path: np.ndarray,
                    exp_off: np.ndarray, n_exp: np.ndarray, node_score: np.ndarray,
                    z: np.ndarray, hit: np.ndarray, memo: OffBeamMemo) -> float:
    """Exact log path score of a leaf in tree t, reusing what the beam computed and the
    chunks this document scored off the beam before (``memo``)."""
    acc = 0.0
    layer = tree_depth[t] - 1
    while layer >= 0:
        p = parent[node]
        for b in range(n_exp[t, layer]):
            if exp_parent[t, layer, b] == p:
                return acc + exp_path[t, layer, b] + node_score[
                    exp_off[t, layer, b] + node - child_ptr[p]]
        # the beam never expanded p: its children's scores from the memo, or scored now
        c0 = child_ptr[p]
        at = _memo_find(memo, p)
        if at < 0:
            nc = child_ptr[p + 1] - c0
            _score_chunk(p, c0, xi, xv, xdense, chunk_ptr, chunk_feat, row_len, row_mark,
                         entry_child, entry_val, weight_scale, bitmap_off, bitmap, dir_off,
                         dir_rows, dense_start, dense_ptr, dense_val, z, nc, hit)
            at = _memo_keep(memo, p, z, nc, bias, c0, post)
        if at < 0:  # the memo is full
            acc += _log_post(z[node - c0] + bias[node], post)
        else:
            acc += memo[2][at + node - c0]
        node = p
        layer -= 1
    return acc


@numba.njit(nogil=True, cache=True)
def score_labels(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, xdense: np.ndarray,
                 cand_ptr: np.ndarray, cand_label: np.ndarray, child_ptr: np.ndarray,
                 parent: np.ndarray, chunk_ptr: np.ndarray, chunk_feat: np.ndarray,
                 row_len: np.ndarray, row_mark: np.ndarray, entry_child: np.ndarray,
                 entry_val: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray,
                 label_node: np.ndarray, dense_start: int, dense_ptr: np.ndarray,
                 dense_val: np.ndarray, bitmap_off: np.ndarray, bitmap: np.ndarray,
                 dir_off: np.ndarray, dir_rows: np.ndarray, post: int,
                 max_children: int, node_log: np.ndarray, scored: np.ndarray,
                 touched: np.ndarray, out: np.ndarray) -> None:
    """out[c] = the exact ensemble score (mean over trees of the path score) of label
    cand_label[c] for CSR row d, c in cand_ptr[d]..cand_ptr[d + 1]. A parent's chunk is
    scored once per row (``scored`` / ``node_log``: per node, left all-False again; ``touched``
    holds the parents scored); ``xdense`` as in :func:`predict_rows`."""
    n_trees = label_node.shape[0]
    z = np.empty(max(max_children, 1))
    hit = _hit_scratch(indptr, 0, indptr.shape[0] - 1)
    for d in range(indptr.shape[0] - 1):
        xi = indices[indptr[d]:indptr[d + 1]]
        xv = data[indptr[d]:indptr[d + 1]]
        for i in range(xi.shape[0]):
            xdense[xi[i]] = xv[i]
        n_touched = 0
        for c in range(cand_ptr[d], cand_ptr[d + 1]):
            total = 0.0
            for t in range(n_trees):
                node = label_node[t, cand_label[c]]
                acc = 0.0
                while parent[node] >= 0:
                    p = parent[node]
                    if not scored[p]:
                        c0 = child_ptr[p]
                        nc = child_ptr[p + 1] - c0
                        _score_chunk(p, c0, xi, xv, xdense, chunk_ptr, chunk_feat, row_len,
                                     row_mark, entry_child, entry_val, weight_scale, bitmap_off,
                                     bitmap, dir_off, dir_rows, dense_start, dense_ptr,
                                     dense_val, z, nc, hit)
                        for j in range(nc):
                            node_log[c0 + j] = _log_post(z[j] + bias[c0 + j], post)
                        scored[p] = True
                        touched[n_touched] = p
                        n_touched += 1
                    acc += node_log[node]
                    node = p
                total += np.exp(acc)
            out[c] = total / n_trees
        for i in range(n_touched):
            scored[touched[i]] = False
        for i in range(xi.shape[0]):
            xdense[xi[i]] = 0.0


#: below this many documents a batch runs on the calling thread
PARALLEL_MIN_DOCS = 64
#: documents per block of the batch kernel, and the scratch memory a block may use
_MAX_BLOCK = 256
_BLOCK_BYTES = 32 << 20
#: the node mask of an unfiltered search: empty, so the kernel takes its unfiltered branch;
#: read-only like the compiled filters' masks, so both are one compiled signature
_NO_MASK = np.zeros(0, dtype=np.bool_)
_NO_MASK.flags.writeable = False
#: no labels scored beside the search (:meth:`Searcher.search_scoring`): empty pointers,
#: and no fusion bound (empty, as its votes)
_NO_EXTRA = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0),
             np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))


@dataclass(frozen=True)
class FusionBound:
    """How a caller of :meth:`Searcher.search_scoring` fuses the scores: a label's final
    score is at most ``tree_weight * ensemble score + vote_weight * vote + rest`` (``rest``
    bounds every other part, each at least 0), divided by a constant, and only the best
    ``top_k`` count. ``votes``: CSR (pointers, label ids ascending, votes) over the rows."""

    tree_weight: float
    vote_weight: float
    rest: float
    votes: tuple[np.ndarray, np.ndarray, np.ndarray]

    def kernel_args(self) -> tuple[np.ndarray, ...]:
        v_ptr, v_ids, v_data = self.votes
        return (np.array([self.tree_weight, self.vote_weight, self.rest], dtype=np.float64),
                np.asarray(v_ptr, dtype=np.int64), np.asarray(v_ids, dtype=np.int64),
                np.asarray(v_data, dtype=np.float64))


class Searcher:
    """Beam search over one :class:`Ensemble` with its feature lookup, scratch and thread pool;
    thread-safe. The predictor serves with one; the builder mines hard negatives with one
    over a partly trained tree."""

    def __init__(self, ensemble: Ensemble, n_features: int, post: int, *, threads: int,
                 lookup: FeatureLookup) -> None:
        self.n_features = n_features
        self.post = post
        self.threads = max(1, threads)
        self.max_children = ensemble.max_children()
        self._n_nodes = ensemble.n_nodes
        self._tree_layers = int(np.asarray(ensemble.tree_depth).sum())
        self._scratch = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # plain ndarray views of the (memory-mapped) arrays: numba types an exact ndarray on
        # its fast path, a np.memmap subclass on a slow one, at every call
        self._arrays: tuple[Any, ...] = (*(np.asarray(a) for a in (
            ensemble.tree_root, ensemble.tree_depth, ensemble.child_ptr, ensemble.parent,
            ensemble.chunk_ptr, ensemble.chunk_feat, ensemble.row_len, ensemble.row_mark,
            ensemble.entry_child, ensemble.entry_val, ensemble.weight_scale, ensemble.bias,
            ensemble.node_label, ensemble.label_node,
        )), int(ensemble.dense_start[0]), np.asarray(ensemble.dense_ptr),
            np.asarray(ensemble.dense_val), *(np.asarray(a) for a in (
                lookup.bitmap_off, lookup.bitmap_words, lookup.dir_off, lookup.dir_rows)))

    def search(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, top_k: int,
               beam_size: int, node_mask: np.ndarray | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top ``top_k`` labels of CSR rows (sorted indices): ids (n, top_k; -1 pads),
        scores (n, top_k), counts (n,). Large batches are split across the threads.
        ``node_mask`` (bool, n_nodes; see :mod:`models.filters`) keeps the search to the
        labels it allows."""
        return self._search(indptr, indices, data, top_k, beam_size, node_mask, _NO_EXTRA)

    def _search(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, top_k: int,
                beam_size: int, node_mask: np.ndarray | None,
                extra: tuple[np.ndarray, ...]) -> Found:
        if node_mask is None:
            node_mask = _NO_MASK
        elif node_mask.shape != (self._n_nodes,) or node_mask.dtype != np.bool_:
            raise InvalidInputError(f"node_mask must be bool ({self._n_nodes},)")
        n = indptr.shape[0] - 1
        indptr = np.asarray(indptr, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int32)
        data = np.asarray(data, dtype=np.float32)
        labels = np.full((n, top_k), -1, dtype=np.int64)
        scores = np.zeros((n, top_k), dtype=np.float64)
        counts = np.zeros(n, dtype=np.int64)
        self._across_threads(n, lambda start, stop: self._run(
            indptr, indices, data, start, stop, top_k, beam_size, node_mask, labels, scores,
            counts, extra))
        return labels, scores, counts

    def search_scoring(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                       top_k: int, beam_size: int, node_mask: np.ndarray | None,
                       extra_ptr: np.ndarray, extra_label: np.ndarray,
                       bound: FusionBound | None = None) -> tuple[Found, np.ndarray]:
        """:meth:`search`, and in the same pass the exact ensemble score (as
        :meth:`label_scores` gives it) of each label ``extra_label[c]`` of row d, c in
        ``extra_ptr[d]..extra_ptr[d + 1]``: a label in a cluster the beam opened costs
        next to nothing, where :meth:`label_scores` would score its path anew. With
        ``bound``, a label that cannot enter its row's top ``top_k`` under that fusion, the
        ensemble's labels found here among them, scores 0 (and costs less: an upper bound
        of its score told so)."""
        extra_label = self._label_ids(extra_label)
        extra_ptr = np.asarray(extra_ptr, dtype=np.int64)
        if extra_ptr.shape != (indptr.shape[0],) or extra_ptr[-1] != extra_label.shape[0]:
            raise InvalidInputError("extra_ptr must hold one pointer per row and one more")
        extra_score = np.zeros(extra_label.shape[0], dtype=np.float64)
        fusion = _NO_EXTRA[3:] if bound is None else bound.kernel_args()
        if bound is not None and fusion[1].shape != extra_ptr.shape:
            raise InvalidInputError("the bound's votes must hold one pointer per row and one more")
        found = self._search(indptr, indices, data, top_k, beam_size, node_mask,
                             (extra_ptr, extra_label, extra_score, *fusion))
        return found, extra_score

    def label_scores(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                     cand_ptr: np.ndarray, cand_label: np.ndarray) -> np.ndarray:
        """float64 per candidate: the exact ensemble score of label ``cand_label[c]`` for
        CSR row d (sorted indices), c in ``cand_ptr[d]..cand_ptr[d + 1]``; whatever a beam
        would have found, as the search's merge scores its labels."""
        cand_label = self._label_ids(cand_label)
        out = np.zeros(cand_label.shape[0], dtype=np.float64)
        indptr, cand_ptr = np.asarray(indptr, dtype=np.int64), np.asarray(cand_ptr, np.int64)
        indices = np.asarray(indices, dtype=np.int32)
        data = np.asarray(data, dtype=np.float32)

        def run(start: int, stop: int) -> None:  # rows start..stop - 1, on this thread
            scratch = getattr(self._scratch, "label_nodes", None)
            if scratch is None:
                scratch = (np.zeros(self._n_nodes), np.zeros(self._n_nodes, dtype=np.bool_),
                           np.zeros(self._n_nodes, dtype=np.int64))
                self._scratch.label_nodes = scratch
            # the ensemble's arrays but tree_root, tree_depth and node_label, in kernel order
            a = self._arrays
            args = (indptr[start:stop + 1], indices, data, self._xdense(),
                    cand_ptr[start:stop + 1], cand_label, *a[2:12], a[13], *a[14:], self.post,
                    self.max_children, *scratch, out)
            score_labels(*args)

        self._across_threads(indptr.shape[0] - 1, run)
        return out

    def _label_ids(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` as int64, refused unless each is a label of the ensemble."""
        labels = np.asarray(labels, dtype=np.int64)
        n_labels = self._arrays[13].shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
            raise InvalidInputError(f"label ids must lie in 0..{n_labels - 1}")
        return labels

    def _across_threads(self, n: int, run: Callable[[int, int], None]) -> None:
        """``run(start, stop)`` over rows 0..n - 1: on this thread for a small batch, else
        one contiguous range per thread of the pool."""
        if n < PARALLEL_MIN_DOCS or self.threads == 1:
            run(0, n)
            return
        pool = self._get_pool()
        bounds = np.linspace(0, n, self.threads + 1).astype(int)
        for f in [pool.submit(run, int(a), int(b)) for a, b in pairwise(bounds) if b > a]:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _xdense(self) -> np.ndarray:
        buf = getattr(self._scratch, "xdense", None)
        if buf is None:
            buf = np.zeros(self.n_features, dtype=np.float32)
            self._scratch.xdense = buf
        return buf

    def _block(self, beam_size: int) -> int:
        """Documents per block of the batch kernel: its per-document scratch (the node scores
        of every expanded chunk) times the block stays within _BLOCK_BYTES."""
        per_doc = 8 * self._tree_layers * min(beam_size, self._n_nodes) * max(
            self.max_children, 1)
        return int(max(1, min(_MAX_BLOCK, _BLOCK_BYTES // per_doc)))

    def _run(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, start: int,
             stop: int, top_k: int, beam_size: int, node_mask: np.ndarray, labels: np.ndarray,
             scores: np.ndarray, counts: np.ndarray, extra: tuple[np.ndarray, ...]) -> None:
        args = (indptr, indices, data, start, stop, self._xdense(), *self._arrays, node_mask,
                beam_size, top_k, self.post, self.max_children, self._block(beam_size), labels,
                scores, counts, *extra)
        predict_rows(*args)

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="xmc-search")
            return self._pool


def search_matrix(ensemble: Ensemble, X: sp.csr_matrix, post: int, top_k: int, beam_size: int,
                  threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One search over CSR rows (sorted indices) with a searcher made for it: what the
    builder's validation steps and the negative miner need."""
    lookup = FeatureLookup.build(ensemble, X.shape[1], BITMAP_MB)
    with Searcher(ensemble, X.shape[1], post, threads=threads, lookup=lookup) as searcher:
        return searcher.search(X.indptr, X.indices, X.data, top_k, beam_size)


def ranked_names(ids: np.ndarray, counts: np.ndarray, names: Sequence[str]) -> list[list[str]]:
    """Label names of a search's ids, best first, each row cut at its count."""
    return [[names[j] for j in row[:c]] for row, c in zip(ids.tolist(), counts.tolist())]
