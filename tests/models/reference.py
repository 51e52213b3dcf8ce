"""A slow exhaustive scorer that shares no code with the beam-search kernel: margins from a
scipy product with weights rebuilt from the ensemble arrays, then a plain loop over every
root-to-leaf path; and the assertions that hold a predictor to such scores."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from models.tree import Ensemble


def node_margins(ens: Ensemble, X: sp.csr_matrix) -> np.ndarray:
    """(n_docs, n_nodes) margin of every node's classifier (the roots' stay 0)."""
    owner = np.repeat(np.arange(ens.n_nodes), np.diff(ens.chunk_ptr))
    row_len = np.asarray(ens.row_len, dtype=np.int64)
    row_owner = np.repeat(owner, row_len)
    row_feat = np.repeat(np.asarray(ens.chunk_feat), row_len)
    child = np.asarray(ens.child_ptr)[row_owner] + np.asarray(ens.entry_child, dtype=np.int64)
    # a node's stored weights times its scale (1 for float32 weights)
    vals = np.asarray(ens.entry_val, dtype=np.float64) * np.asarray(
        ens.weight_scale, dtype=np.float64)[child]
    W = sp.csc_matrix((vals, (row_feat, child)), shape=(X.shape[1], ens.n_nodes))
    margins = (X.astype(np.float64) @ W).toarray() + np.asarray(ens.bias, dtype=np.float64)
    # the dense block: per node with one, a (children x dim) matrix against the last columns
    start = int(ens.dense_start[0])
    dim = X.shape[1] - start
    X_dense = X[:, start:].toarray().astype(np.float64)
    for node in range(ens.n_nodes):
        lo, hi = int(ens.dense_ptr[node]), int(ens.dense_ptr[node + 1])
        if hi > lo:
            block = np.asarray(ens.dense_val[lo:hi], dtype=np.float64).reshape(-1, dim)
            c0 = int(ens.child_ptr[node])
            margins[:, c0 : c0 + block.shape[0]] += X_dense @ block.T
    return margins


def node_log_scores(margins: np.ndarray, post: str) -> np.ndarray:
    """log of every node's score from its margin z, by the definitions of the
    post-processors."""
    if post == "sigmoid":
        return -np.logaddexp(0.0, -margins)
    h = np.maximum(0.0, 1.0 - margins)
    if post == "l3-hinge":
        return -(h**3)
    assert post == "l3-hinge-ordered", post
    # l3-hinge less 1e-3 below the hinge; past it -1e-3 * exp(1 - z), rising towards 0
    return np.where(margins < 1.0, -(h**3) - 1e-3,
                    -1e-3 * np.exp(np.minimum(0.0, 1.0 - margins)))


def leaf_scores(ens: Ensemble, X: sp.csr_matrix, post: str) -> np.ndarray:
    """(n_docs, n_labels) exact ensemble score: the mean over trees of the product of the
    post-processed margins along each leaf's path."""
    node = np.exp(node_log_scores(node_margins(ens, X), post))
    out = np.zeros((X.shape[0], ens.n_labels))
    for d in range(X.shape[0]):
        for t in range(ens.n_trees):
            for lab in range(ens.n_labels):
                prod = 1.0
                n = int(ens.label_node[t, lab])
                while ens.parent[n] >= 0:
                    prod *= float(node[d, n])
                    n = int(ens.parent[n])
                out[d, lab] += prod / ens.n_trees
    return out


def beam_leaves(ens: Ensemble, X: sp.csr_matrix, beam_size: int,
                post: str) -> list[set[int]]:
    """Per document, the leaves (label ids) a plain layer-by-layer beam of ``beam_size``
    reaches in a one-tree ensemble (ties to the smaller node id)."""
    log_node = node_log_scores(node_margins(ens, X), post)
    out = []
    for d in range(X.shape[0]):
        beam = [(0.0, int(ens.tree_root[0]))]
        for _ in range(int(ens.tree_depth[0])):
            cands = []
            for log_path, p in beam:
                for c in range(int(ens.child_ptr[p]), int(ens.child_ptr[p + 1])):
                    cands.append((log_path + float(log_node[d, c]), c))
            cands.sort(key=lambda sc: (-sc[0], sc[1]))
            beam = cands[:beam_size]
        out.append({int(ens.node_label[c]) for _, c in beam})
    return out


def tree_leaf_scores(ens: Ensemble, X: sp.csr_matrix, post: str) -> np.ndarray:
    """(n_docs, n_trees, n_labels) path score of every label in every tree (the product of
    the post-processed margins along its path; their mean over trees is :func:`leaf_scores`)."""
    node = np.exp(node_log_scores(node_margins(ens, X), post))
    out = np.ones((X.shape[0], ens.n_trees, ens.n_labels))
    for t in range(ens.n_trees):
        for lab in range(ens.n_labels):
            n = int(ens.label_node[t, lab])
            while ens.parent[n] >= 0:
                out[:, t, lab] *= node[:, n]
                n = int(ens.parent[n])
    return out


def assert_ranks_all_labels_as(predictor, X: sp.csr_matrix, want: np.ndarray) -> None:
    """At a beam and top_k as wide as the label set, every row of X gets every label, scored
    and ordered as the oracle's scores ``want`` (n_docs, n_labels) say."""
    n = predictor.n_labels
    ids, scores, counts = predictor.predict_ids(X, top_k=n, beam_size=n)
    for d in range(X.shape[0]):
        assert counts[d] == n
        np.testing.assert_allclose(scores[d], want[d, ids[d]], atol=1e-5)
        np.testing.assert_allclose(scores[d], np.sort(want[d])[::-1], atol=1e-5)


def assert_text_paths_agree(predictor, texts: list[str], top_k: int) -> None:
    """One batch, one text at a time and the encoded feature rows give the same labels and
    scores."""
    batch = predictor.predict(texts, top_k=top_k)
    singles = [predictor.predict([t], top_k=top_k)[0] for t in texts]
    feats = predictor.predict_features(predictor.encode(texts), top_k=top_k)
    for a, b, c in zip(batch, singles, feats):
        assert [lab for lab, _ in a] == [lab for lab, _ in b] == [lab for lab, _ in c]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-5)


def assert_last_explanation_entry(predictor, X: sp.csr_matrix, term: str,
                                  shares: np.ndarray, top_k: int = 3) -> None:
    """Each returned label's explanation ends with ``term``, whose contribution is the
    oracle's ``shares[d, label]`` (n_docs, n_labels) for row d of X."""
    index = {name: j for j, name in enumerate(predictor.label_names)}
    for d, row in enumerate(predictor.predict_features(X, top_k=top_k, explain=True)):
        for name, _, why in row:
            assert why[-1]["term"] == term
            np.testing.assert_allclose(why[-1]["contribution"], shares[d, index[name]],
                                       atol=1e-6)


def oracle_pool(top: list[int], votes: np.ndarray, max_voted: int) -> set[int]:
    """One document's candidate pool: the trees' ``top`` labels and, of the labels with a
    vote (``votes``: one per label) outside them, the ``max_voted`` of most votes, ties to
    the smaller id (0: all)."""
    returned = {int(j) for j in top}
    voted = sorted((int(j) for j in np.flatnonzero(votes) if int(j) not in returned),
                   key=lambda j: (-votes[j], j))
    return returned | set(voted[:max_voted] if max_voted else voted)
