"""The compiled balanced 2-means against a plain dense reference, and the tree it builds."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from models.cluster import _balanced_split, build_tree
from models.data import normalize_rows
from models.params import ClusterParams


def reference_split(Z: np.ndarray, first: int, second: int, max_iter: int) -> np.ndarray:
    """Spherical 2-means with a median cut on dense rows, from the given two seed rows;
    returns the rows of the left half then the right half, each in ascending order."""
    n = Z.shape[0]
    n_left = (n + 1) // 2
    c = np.stack([Z[first], Z[second]])
    assign = None
    for _ in range(max_iter):
        diff = Z @ c[0] - Z @ c[1]
        order = np.argsort(-diff, kind="stable")
        new = np.ones(n, dtype=int)
        new[order[:n_left]] = 0
        if assign is not None and np.array_equal(assign, new):
            break
        assign = new
        for side in range(2):
            s = Z[assign == side].sum(axis=0)
            norm = np.linalg.norm(s)
            c[side] = s / norm if norm > 0 else s
    return np.concatenate((np.flatnonzero(assign == 0), np.flatnonzero(assign == 1)))


def random_rows(n: int, n_features: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    Z = sp.random(n, n_features, density=0.08, random_state=rng, format="csr",
                  dtype=np.float32)
    Z.data[:] = rng.random(Z.nnz).astype(np.float32) + 0.1
    return normalize_rows(Z)


@pytest.mark.parametrize("seed", range(5))
def test_split_matches_the_dense_reference(seed):
    Z = random_rows(41, 60, seed)
    rows = np.arange(41, dtype=np.int64)
    scratch = np.zeros((3, 60))
    _balanced_split(Z.indptr.astype(np.int64), Z.indices.astype(np.int64), Z.data, rows,
                    scratch, 20, seed)
    assert not scratch.any()  # the scratch is left all-zero
    dense = Z.toarray().astype(np.float64)
    got = rows.copy()
    # every pair of seed rows is tried by the reference; the kernel's result must be one
    # of them, reached from a valid seed pair
    candidates = {tuple(reference_split(dense, a, b, 20)) for a in range(41)
                  for b in range(41) if a != b}
    assert tuple(got) in candidates
    assert sorted(got[:21]) == list(got[:21]) and sorted(got[21:]) == list(got[21:])


def test_tree_is_balanced_and_independent_of_threads():
    Z = random_rows(1000, 300, 0)
    params = ClusterParams(branching_factor=4, max_leaf_size=10, round_depth=True)
    one = build_tree(Z, params, seed=3, threads=1)
    two = build_tree(Z, params, seed=3, threads=2)
    assert np.array_equal(one.leaf_code, two.leaf_code)
    assert one.depth_bits == 8 and one.layer_bits == [2, 4, 6, 8]
    sizes = np.bincount(one.leaf_code, minlength=256)
    assert sizes.min() >= 3 and sizes.max() <= 4
    assert not np.array_equal(one.leaf_code, build_tree(Z, params, seed=4).leaf_code)


def test_separable_labels_split_at_the_top():
    # two groups of labels on disjoint features: the first split must part them
    rng = np.random.default_rng(1)
    a = sp.csr_matrix(np.hstack([rng.random((30, 20)) + 0.1, np.zeros((30, 20))]))
    b = sp.csr_matrix(np.hstack([np.zeros((30, 20)), rng.random((30, 20)) + 0.1]))
    Z = normalize_rows(sp.vstack([a, b]).tocsr().astype(np.float32))
    tree = build_tree(Z, ClusterParams(branching_factor=2, max_leaf_size=30), seed=0)
    top = tree.leaf_code >> (tree.depth_bits - 1)
    assert len(set(top[:30])) == 1 and len(set(top[30:])) == 1 and top[0] != top[30]


@pytest.mark.parametrize(("n_labels", "layer_bits", "largest"), [
    (1000, [4, 8], 4),  # 1000 / 10 needs 7 splits: one rounded up to 8, 16 x 16 leaves of 3-4
    (1000, [7], 8),  # not rounded: the 7 splits in one wide layer, leaves of 7-8
])
def test_depth_is_rounded_to_whole_layers_or_not(n_labels, layer_bits, largest):
    Z = random_rows(n_labels, 300, 0)
    round_depth = layer_bits == [4, 8]
    tree = build_tree(Z, ClusterParams(branching_factor=16, max_leaf_size=10,
                                       round_depth=round_depth), seed=0)
    assert tree.layer_bits == layer_bits
    sizes = np.bincount(tree.leaf_code)
    assert sizes.max() == largest and sizes.max() <= 10 and sizes.min() >= largest - 1


def test_unrounded_depth_gives_the_leftover_splits_to_the_top_layer():
    Z = random_rows(3000, 300, 0)
    # 3000 / 10 needs 9 splits: 16-way layers would be 1 + 4 + 4; the top one takes the 1
    tree = build_tree(Z, ClusterParams(branching_factor=16, max_leaf_size=10,
                                       round_depth=False), seed=0)
    assert tree.layer_bits == [5, 9]
    assert np.bincount(tree.leaf_code >> 4).size == 32


@pytest.mark.parametrize(("max_root_children", "layer_bits"), [(0, [5, 9]), (32, [5, 9]),
                                                                (16, [1, 5, 9])])
def test_a_root_cap_keeps_the_leftover_splits_in_a_layer_of_their_own(max_root_children,
                                                                      layer_bits):
    Z = random_rows(3000, 300, 0)
    tree = build_tree(Z, ClusterParams(branching_factor=16, max_leaf_size=10,
                                       max_root_children=max_root_children), seed=0)
    assert tree.layer_bits == layer_bits
    # the same bottom clusters whatever the layers above them
    widened = build_tree(Z, ClusterParams(branching_factor=16, max_leaf_size=10), seed=0)
    assert np.array_equal(tree.leaf_code, widened.leaf_code)
