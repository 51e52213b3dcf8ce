"""Label trees: PIFA label embeddings clustered by balanced hierarchical spherical k-means.

Labels are split recursively into two equal halves (spherical 2-means whose assignment is
cut at the median of the similarity difference, so every split is balanced).
``log2(branching_factor)`` binary levels make one tree layer, and splitting goes on by whole
layers until a cluster holds at most ``max_leaf_size`` labels: a balanced k-ary split, as
PECOS's hierarchical k-means makes (5,000 labels: 16 x 16 clusters of about 20 labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from models.data import normalize_rows
from models.params import ClusterParams


@dataclass
class LabelTree:
    """A label tree as label codes.

    ``leaf_code[label]`` is the index (0 .. 2**depth_bits - 1) of the bottom cluster holding
    the label; the cluster of a label at binary depth d is ``leaf_code >> (depth_bits - d)``.
    ``layer_bits`` lists the binary depth of each cluster layer, top first (empty for the
    one-level tree). Labels themselves form the last layer below the bottom clusters.
    """

    leaf_code: np.ndarray
    depth_bits: int
    layer_bits: list[int]

    @property
    def n_labels(self) -> int:
        return int(self.leaf_code.shape[0])

    def layer_codes(self) -> list[np.ndarray]:
        """Per cluster layer (top first), each label's node index within that layer."""
        return [self.leaf_code >> (self.depth_bits - bits) for bits in self.layer_bits]


def pifa_embeddings(X: sp.csr_matrix, Y: sp.csr_matrix) -> sp.csr_matrix:
    """Positive-instance feature aggregation: row l = normalize(sum of label l's documents)."""
    Z = (Y.T.tocsr().astype(np.float32) @ X).tocsr()
    return normalize_rows(Z)


def build_tree(Z: sp.csr_matrix, params: ClusterParams, seed: int) -> LabelTree:
    """Cluster the rows of ``Z`` (one per label) into a balanced tree."""
    n_labels = Z.shape[0]
    if params.max_leaf_size >= n_labels:
        return LabelTree(np.zeros(n_labels, dtype=np.int64), 0, [])
    step = int(math.log2(params.branching_factor))
    # whole layers of branching_factor children, as a k-ary split repeated until clusters
    # hold at most max_leaf_size labels; never more clusters than labels
    needed = math.ceil(math.log2(n_labels / params.max_leaf_size))
    depth_bits = min(step * math.ceil(needed / step), int(math.log2(n_labels)))
    rng = np.random.default_rng(seed)
    leaf_code = np.zeros(n_labels, dtype=np.int64)
    members = [np.arange(n_labels)]
    Zc = Z.tocsr()
    for _ in range(depth_bits):
        next_members = []
        for idx in members:
            left, right = _balanced_split(Zc[idx], rng, params.kmeans_max_iter)
            leaf_code[idx[left]] <<= 1
            leaf_code[idx[right]] = (leaf_code[idx[right]] << 1) | 1
            next_members.extend((idx[left], idx[right]))
        members = next_members
    layer_bits = sorted(range(depth_bits, 0, -step))
    return LabelTree(leaf_code, depth_bits, layer_bits)


def _balanced_split(
    Z: sp.csr_matrix, rng: np.random.Generator, max_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical 2-means with a median cut; returns (left rows, right rows), sizes differing
    by at most one."""
    n = Z.shape[0]
    n_left = (n + 1) // 2
    if n <= 2:
        return np.arange(n_left), np.arange(n_left, n)
    init = rng.choice(n, size=2, replace=False)
    centroids = Z[init].toarray().T  # (n_features, 2)
    assign = None
    for _ in range(max_iter):
        sims = np.asarray(Z @ centroids)
        diff = sims[:, 0] - sims[:, 1]
        # stable sort so that equal differences split the same way every run
        order = np.argsort(-diff, kind="stable")
        new_assign = np.ones(n, dtype=np.int8)
        new_assign[order[:n_left]] = 0
        if assign is not None and np.array_equal(assign, new_assign):
            break
        assign = new_assign
        onehot = sp.csr_matrix(
            (np.ones(n, dtype=np.float32), (np.arange(n), assign.astype(np.int64))),
            shape=(n, 2),
        )
        centroids = np.asarray((Z.T @ onehot).todense(), dtype=np.float32)
        norms = np.linalg.norm(centroids, axis=0)
        norms[norms == 0] = 1.0
        centroids /= norms
    return np.flatnonzero(assign == 0), np.flatnonzero(assign == 1)
