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

import numba
import numpy as np

L3_HINGE = 0
SIGMOID = 1


@numba.njit(inline="always")
def _log_post(z, kind):
    """log of the node score: the beam ranks by sums of these, so the common l3-hinge case
    needs no exp at all."""
    if kind == L3_HINGE:
        h = 1.0 - z
        if h <= 0.0:
            return 0.0
        return -h * h * h
    # log sigmoid, stable on both sides
    if z >= 0.0:
        return -np.log1p(np.exp(-z))
    return z - np.log1p(np.exp(z))


@numba.njit(nogil=True, cache=True)
def _score_chunk(node, xi, xv, xdense, chunk_ptr, chunk_feat, row_ptr, entry_child, entry_val,
                 dense_off, dense_map, out, n_children):
    """Margins (without bias) of all children of ``node`` into out[:n_children]."""
    for j in range(n_children):
        out[j] = 0.0
    r0 = chunk_ptr[node]
    r1 = chunk_ptr[node + 1]
    n_rows = r1 - r0
    m = xi.shape[0]
    if n_rows == 0 or m == 0:
        return
    off = dense_off[node]
    if off >= 0:
        # direct map feature -> entries of this chunk: one lookup per document feature
        base = row_ptr[r0]
        for k in range(m):
            f = xi[k]
            v = xv[k]
            for e in range(base + dense_map[off + f], base + dense_map[off + f + 1]):
                out[entry_child[e]] += v * entry_val[e]
        return
    # galloping binary search costs about m * log2(rows); a scan of the rows against the
    # dense document costs rows: take the cheaper
    log_rows = 1
    while (1 << log_rows) < n_rows:
        log_rows += 1
    if m * log_rows < n_rows:
        lo = r0
        for k in range(m):
            f = xi[k]
            hi = r1
            while lo < hi:
                mid = (lo + hi) >> 1
                if chunk_feat[mid] < f:
                    lo = mid + 1
                else:
                    hi = mid
            if lo == r1:
                break
            if chunk_feat[lo] == f:
                v = xv[k]
                for e in range(row_ptr[lo], row_ptr[lo + 1]):
                    out[entry_child[e]] += v * entry_val[e]
                lo += 1
    else:
        for r in range(r0, r1):
            v = xdense[chunk_feat[r]]
            if v != 0.0:
                for e in range(row_ptr[r], row_ptr[r + 1]):
                    out[entry_child[e]] += v * entry_val[e]


@numba.njit(inline="always")
def _better(s_a, id_a, s_b, id_b):
    return s_a > s_b or (s_a == s_b and id_a < id_b)


@numba.njit(nogil=True, cache=True)
def _insert_top(keep_id, keep_score, n_keep, cap, node, score):
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


@numba.njit(nogil=True, cache=True)
def _predict_doc(xi, xv, xdense, tree_root, tree_depth, child_ptr, parent, chunk_ptr,
                 chunk_feat, row_ptr, entry_child, entry_val, bias, node_label, label_node,
                 dense_off, dense_map, beam_size, top_k, post, max_children, out_label,
                 out_score):
    """Ensemble prediction of one document whose values are already scattered into xdense.
    Writes up to top_k (label, score) best first; returns how many."""
    n_trees = tree_root.shape[0]
    max_depth = 0
    for t in range(n_trees):
        max_depth = max(max_depth, tree_depth[t])
    width = min(beam_size, child_ptr[-1])
    cand_cap = max(width * max_children, 1)
    z = np.empty(max_children)
    beam_id = np.empty(width, dtype=np.int64)
    beam_score = np.empty(width)
    # the last layer keeps top_k candidates, the others width
    next_id = np.empty(max(width, top_k), dtype=np.int64)
    next_score = np.empty(width)
    top_id = np.empty((n_trees, top_k), dtype=np.int64)
    top_n = np.zeros(n_trees, dtype=np.int64)
    top_score = np.empty(top_k)
    # per tree and layer: the expanded parents, their path scores, where their children's
    # node scores start in node_score
    exp_parent = np.empty((n_trees, max_depth, width), dtype=np.int64)
    exp_path = np.empty((n_trees, max_depth, width))
    exp_off = np.empty((n_trees, max_depth, width), dtype=np.int64)
    n_exp = np.zeros((n_trees, max_depth), dtype=np.int64)
    node_score = np.empty(n_trees * max_depth * cand_cap)
    pos = 0
    for t in range(n_trees):
        depth = tree_depth[t]
        beam_id[0] = tree_root[t]
        beam_score[0] = 0.0  # log of the root's path score, 1
        n_beam = 1
        for layer in range(depth):
            last = layer == depth - 1
            cap = top_k if last else width
            n_next = 0
            for b in range(n_beam):
                p = beam_id[b]
                c0 = child_ptr[p]
                nc = child_ptr[p + 1] - c0
                exp_parent[t, layer, b] = p
                exp_path[t, layer, b] = beam_score[b]
                exp_off[t, layer, b] = pos
                _score_chunk(p, xi, xv, xdense, chunk_ptr, chunk_feat, row_ptr, entry_child,
                             entry_val, dense_off, dense_map, z, nc)
                for j in range(nc):
                    s = _log_post(z[j] + bias[c0 + j], post)
                    node_score[pos + j] = s
                    if last:
                        n_next = _insert_top(next_id, top_score, n_next, cap, c0 + j,
                                             beam_score[b] + s)
                    else:
                        n_next = _insert_top(next_id, next_score, n_next, cap, c0 + j,
                                             beam_score[b] + s)
                pos += nc
            n_exp[t, layer] = n_beam
            if last:
                for j in range(n_next):
                    top_id[t, j] = next_id[j]
                top_n[t] = n_next
            else:
                for j in range(n_next):
                    beam_id[j] = next_id[j]
                    beam_score[j] = next_score[j]
                n_beam = n_next
    # merge: union of the trees' top labels, each scored exactly in every tree
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
                chunk_ptr, chunk_feat, row_ptr, entry_child, entry_val, bias, dense_off,
                dense_map, post, exp_parent, exp_path, exp_off, n_exp, node_score, z))
        n_out = _insert_top(out_label, out_score, n_out, top_k, lab, total / n_trees)
    return n_out


@numba.njit(nogil=True, cache=True)
def _path_log_score(t, node, xi, xv, xdense, tree_depth, child_ptr, parent, chunk_ptr,
                    chunk_feat, row_ptr, entry_child, entry_val, bias, dense_off, dense_map,
                    post, exp_parent, exp_path, exp_off, n_exp, node_score, z):
    """Exact log path score of a leaf in tree t, reusing what the beam computed."""
    acc = 0.0
    layer = tree_depth[t] - 1
    while layer >= 0:
        p = parent[node]
        for b in range(n_exp[t, layer]):
            if exp_parent[t, layer, b] == p:
                return acc + exp_path[t, layer, b] + node_score[
                    exp_off[t, layer, b] + node - child_ptr[p]]
        # the beam never expanded p: score this node directly and go up
        _score_chunk(p, xi, xv, xdense, chunk_ptr, chunk_feat, row_ptr, entry_child,
                     entry_val, dense_off, dense_map, z, child_ptr[p + 1] - child_ptr[p])
        acc += _log_post(z[node - child_ptr[p]] + bias[node], post)
        node = p
        layer -= 1
    return acc


@numba.njit(nogil=True, cache=True)
def predict_rows(indptr, indices, data, row_start, row_stop, xdense, tree_root, tree_depth,
                 child_ptr, parent, chunk_ptr, chunk_feat, row_ptr, entry_child, entry_val,
                 bias, node_label, label_node, dense_off, dense_map, beam_size, top_k, post,
                 max_children, out_label, out_score, out_n):
    """Predict rows row_start..row_stop of a CSR matrix (sorted indices) into out_* rows.
    ``xdense`` is an all-zero float32 scratch of n_features, left all-zero again."""
    for i in range(row_start, row_stop):
        xi = indices[indptr[i]:indptr[i + 1]]
        xv = data[indptr[i]:indptr[i + 1]]
        for k in range(xi.shape[0]):
            xdense[xi[k]] = xv[k]
        out_n[i] = _predict_doc(xi, xv, xdense, tree_root, tree_depth, child_ptr, parent,
                                chunk_ptr, chunk_feat, row_ptr, entry_child, entry_val, bias,
                                node_label, label_node, dense_off, dense_map, beam_size,
                                top_k, post, max_children, out_label[i], out_score[i])
        for k in range(xi.shape[0]):
            xdense[xi[k]] = 0.0


def build_dense_maps(chunk_ptr: np.ndarray, chunk_feat: np.ndarray, row_ptr: np.ndarray,
                     n_features: int, budget_bytes: int,
                     min_share: float = 1 / 64) -> tuple[np.ndarray, np.ndarray]:
    """Direct feature -> entry maps for the chunks that use at least ``min_share`` of the
    features, in node order (roots and top layers first: every document expands them) until
    ``budget_bytes`` is spent. Returns (dense_off per node, -1 for none; dense_map int32 of
    entry offsets relative to the chunk's first entry, n_features + 1 per mapped chunk)."""
    n_nodes = chunk_ptr.shape[0] - 1
    dense_off = np.full(n_nodes, -1, dtype=np.int64)
    per_map = (n_features + 1) * 4
    n_rows = np.diff(chunk_ptr)
    chosen = []
    for node in np.flatnonzero(n_rows >= max(1, int(min_share * n_features))):
        if (len(chosen) + 1) * per_map > budget_bytes:
            break
        chosen.append(int(node))
    dense_map = np.empty(len(chosen) * (n_features + 1), dtype=np.int32)
    grid = np.arange(n_features + 1)
    for k, node in enumerate(chosen):
        r0, r1 = int(chunk_ptr[node]), int(chunk_ptr[node + 1])
        first_row = np.searchsorted(chunk_feat[r0:r1], grid)  # first row with feature >= f
        span = slice(k * (n_features + 1), (k + 1) * (n_features + 1))
        dense_map[span] = row_ptr[r0 + first_row] - row_ptr[r0]
        dense_off[node] = k * (n_features + 1)
    return dense_off, dense_map
