"""Label trees: PIFA label embeddings clustered by balanced hierarchical spherical k-means.

Labels are split recursively into two equal halves (spherical 2-means whose assignment is
cut at the median of the similarity difference, so every split is balanced).
``log2(branching_factor)`` binary levels make one tree layer, and splitting goes on by whole
layers until a cluster holds at most ``max_leaf_size`` labels: a balanced k-ary split, as
PECOS's hierarchical k-means makes (5,000 labels: 16 x 16 clusters of about 20 labels). With
``round_depth`` off, splitting stops as soon as clusters are small enough and the splits that
do not fill a layer widen the top one (5,000 labels, leaves of 100: 64 clusters of about 70).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numba
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


def build_tree(Z: sp.csr_matrix, params: ClusterParams, seed: int,
               threads: int = 1) -> LabelTree:
    """Cluster the rows of ``Z`` (one per label) into a balanced tree. The splits of one
    binary level are independent: they run on ``threads`` threads, and each is seeded by
    its own position, so the tree does not depend on the thread count."""
    n_labels = Z.shape[0]
    if params.max_leaf_size >= n_labels:
        return LabelTree(np.zeros(n_labels, dtype=np.int64), 0, [])
    step = int(math.log2(params.branching_factor))
    needed = math.ceil(math.log2(n_labels / params.max_leaf_size))
    if params.round_depth:
        # whole layers of branching_factor children, as a k-ary split repeated until
        # clusters hold at most max_leaf_size labels; never more clusters than labels
        depth_bits = min(step * math.ceil(needed / step), int(math.log2(n_labels)))
    else:
        depth_bits = needed
    Zc = sp.csr_matrix(Z, dtype=np.float32)
    indptr, indices = Zc.indptr.astype(np.int64), Zc.indices.astype(np.int64)
    # perm lists the labels cluster by cluster; cluster c of a level is perm[bounds[c]:...]
    perm = np.arange(n_labels, dtype=np.int64)
    bounds = np.array([0, n_labels], dtype=np.int64)
    scratch = [np.zeros((3, Zc.shape[1]), dtype=np.float64) for _ in range(max(1, threads))]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for level in range(depth_bits):
            n_clusters = len(bounds) - 1
            groups = np.array_split(np.arange(n_clusters), len(scratch))
            split = partial(_split_clusters, indptr, indices, Zc.data, perm, bounds,
                            max_iter=params.kmeans_max_iter, seed=seed, level=level)
            list(pool.map(split, [g for g in groups if g.size], scratch))
            sizes = np.diff(bounds)
            left = (sizes + 1) // 2
            bounds = np.sort(np.concatenate((bounds, bounds[:-1] + left)))
    # leaf_code: each label's bottom cluster, in the order the splits left them
    leaf_code = np.empty(n_labels, dtype=np.int64)
    leaf_code[perm] = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    layer_bits = sorted(range(depth_bits, 0, -step))
    if (not params.round_depth and len(layer_bits) > 1 and layer_bits[0] < step
            and (not params.max_root_children or 1 << layer_bits[1] <= params.max_root_children)):
        # the top layer takes the splits left over: a wider root, one layer fewer
        layer_bits = layer_bits[1:]
    return LabelTree(leaf_code, depth_bits, layer_bits)


def _split_clusters(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                    perm: np.ndarray, bounds: np.ndarray, clusters: np.ndarray,
                    centroids: np.ndarray, *, max_iter: int, seed: int, level: int) -> None:
    for c in clusters:
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        split_seed = (seed * 1_000_003 + level) * 1_000_003 + int(c)
        _balanced_split(indptr, indices, data, perm[lo:hi], centroids, max_iter, split_seed)


@numba.njit(nogil=True, cache=True)
def _balanced_split(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray,
                    centroids: np.ndarray, max_iter: int, seed: int) -> None:
    """Spherical 2-means of ``rows`` with a median cut, in place: afterwards the first
    ceil(n/2) entries of ``rows`` are the left cluster, the rest the right one (each in its
    former order). ``centroids`` is an all-zero (3, n_features) scratch, left all-zero. Costs
    O(non-zeros of the rows) per iteration, never O(n_features)."""
    n = rows.shape[0]
    n_left = (n + 1) // 2
    if n <= 2:
        return
    # the features the rows use: the only centroid entries ever non-zero
    feats = _row_features(indptr, indices, rows, centroids)
    state = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)
    first = np.int64(_xorshift(state) % np.uint64(n))
    second = np.int64(_xorshift(state + np.uint64(7)) % np.uint64(n - 1))
    if second >= first:
        second += 1
    # row 2 of the scratch holds centroid 0 minus centroid 1: one lookup per non-zero
    r = rows[first]
    for k in range(indptr[r], indptr[r + 1]):
        centroids[2, indices[k]] = data[k]
    r = rows[second]
    for k in range(indptr[r], indptr[r + 1]):
        centroids[2, indices[k]] -= data[k]
    assign = np.full(n, -1, dtype=np.int8)
    new_assign = np.empty(n, dtype=np.int8)
    diff = np.empty(n)
    for _ in range(max_iter):
        for i in range(n):
            r = rows[i]
            d = 0.0
            for k in range(indptr[r], indptr[r + 1]):
                d += data[k] * centroids[2, indices[k]]
            diff[i] = -d
        # stable: equal differences split the same way every run
        order = np.argsort(diff, kind="mergesort")
        new_assign[order[:n_left]] = 0
        new_assign[order[n_left:]] = 1
        if np.array_equal(assign, new_assign):
            break
        assign[:] = new_assign
        for f in feats:
            centroids[0, f] = 0.0
            centroids[1, f] = 0.0
        for i in range(n):
            r = rows[i]
            for k in range(indptr[r], indptr[r + 1]):
                centroids[assign[i], indices[k]] += data[k]
        inv = np.zeros(2)
        for side in range(2):
            norm = 0.0
            for f in feats:
                norm += centroids[side, f] * centroids[side, f]
            if norm > 0.0:
                inv[side] = 1.0 / np.sqrt(norm)
        for f in feats:
            centroids[2, f] = centroids[0, f] * inv[0] - centroids[1, f] * inv[1]
    for f in feats:
        centroids[0, f] = 0.0
        centroids[1, f] = 0.0
        centroids[2, f] = 0.0
    ordered = np.concatenate((rows[assign == 0], rows[assign == 1]))
    rows[:] = ordered


@numba.njit(nogil=True, cache=True)
def _row_features(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray,
                  centroids: np.ndarray) -> np.ndarray:
    """The distinct features of ``rows`` (unsorted), found by marking them in the all-zero
    ``centroids`` scratch (and clearing the marks again): no sort of every non-zero."""
    total = 0
    for r in rows:
        total += indptr[r + 1] - indptr[r]
    out = np.empty(total, dtype=np.int64)
    j = 0
    for r in rows:
        for k in range(indptr[r], indptr[r + 1]):
            f = indices[k]
            if centroids[0, f] == 0.0:
                centroids[0, f] = 1.0
                out[j] = f
                j += 1
    for q in range(j):
        centroids[0, out[q]] = 0.0
    return out[:j]


@numba.njit(inline="always")
def _xorshift(state: np.uint64) -> np.uint64:
    state ^= state << np.uint64(13)
    state ^= state >> np.uint64(7)
    state ^= state << np.uint64(17)
    return state
