"""Label profiles: each label's training documents' feature rows summed and l2-normalized
(PIFA, the vectors the clustering splits: :func:`models.cluster.pifa_embeddings`), the
entries below a threshold dropped and the row scaled to norm 1 again: how close a query's
whole feature row lies to everything the label was trained on.

The trees' top ``max(top_k, pool_size)`` labels are re-ranked by::

    (tree + weight * max(0, cos(query row, profile))) / (1 + weight)

and cut at ``top_k``: the division keeps the scores in 0..1 (thresholds, calibration,
``min_score``), and with ``pool_size`` at least ``top_k`` the first labels do not depend on
how many a request asks for. A tree scores a label by the classifiers on its path, each
trained to tell one node's documents apart; the profile compares the query with all of the
label's documents at once, and lifts labels whose words the query shares as a whole (on
validation: P@1 up where labels are topical, down where a document carries many tags and
the profiles look alike; benchmarks/RESULTS.md, "Round four"). The weight and the threshold
are chosen on the builder's validation split (:func:`models.builder.choose_reranking`); a
weight of 0 stores no profiles.

In the bundle: ``profiles.{indptr,indices,data}.npy``, the profiles as CSR rows
(:data:`PROFILE_ARRAYS`), read with :func:`models.bundle.load_npy`, and the manifest's
``profiles`` entry (``weight``, ``pool_size``, ``threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numba
import numpy as np
import scipy.sparse as sp

from models.bundle import load_npy
from models.cluster import pifa_embeddings
from models.data import drop_below
from models.errors import BundleError
from models.explain import PROFILE_TERM
from models.search import Found, Rows

#: array name -> the dtypes it may be stored in (as models.tree.ENSEMBLE_ARRAYS): the
#: profiles as CSR rows, one a label, indices sorted
PROFILE_ARRAYS: dict[str, tuple[type, ...]] = {
    "indptr": (np.int64,),  # [n_labels + 1]
    "indices": (np.int32,),  # feature ids
    "data": (np.float32,),  # each row of norm 1 (0 for a label without documents)
}


@dataclass(frozen=True)
class ProfileRule:
    """How much the profiles weigh against the trees, over how many of the trees' labels,
    and below which value a profile's entries are dropped (a profile is a unit vector, so it
    keeps at most ``1 / threshold ** 2`` entries: a label of many documents would otherwise
    carry every word they hold, and cost a request as many lookups)."""

    weight: float
    pool_size: int
    threshold: float

    def width(self, top_k: int, n_labels: int) -> int:
        """How many of ``n_labels`` labels the trees are searched for when ``top_k`` are
        asked."""
        return min(max(top_k, self.pool_size), n_labels)


@numba.njit(nogil=True, cache=True)
def _cosines(x_ptr: np.ndarray, x_idx: np.ndarray, x_val: np.ndarray, labels: np.ndarray,
             counts: np.ndarray, p_ptr: np.ndarray, p_idx: np.ndarray, p_val: np.ndarray,
             out: np.ndarray) -> None:
    """out[d, j] = max(0, cos(row d, profile of labels[d, j])) for j < counts[d]. Each of
    the row's features is looked up in the profile by bisection (both sorted), from where
    the last one was found: a request's few features against a profile's thousands."""
    for d in range(labels.shape[0]):
        a, b = x_ptr[d], x_ptr[d + 1]
        norm = 0.0
        for i in range(a, b):
            norm += float(x_val[i]) * float(x_val[i])
        if norm == 0:
            continue
        norm = np.sqrt(norm)
        for j in range(counts[d]):
            lab = labels[d, j]
            lo, hi = p_ptr[lab], p_ptr[lab + 1]
            dot = 0.0
            for i in range(a, b):
                f = x_idx[i]
                left, right = lo, hi
                while left < right:
                    mid = (left + right) // 2
                    if p_idx[mid] < f:
                        left = mid + 1
                    else:
                        right = mid
                if left < hi and p_idx[left] == f:
                    dot += float(p_val[left]) * float(x_val[i])
                lo = left
            out[d, j] = max(0.0, dot / norm)


@numba.njit(nogil=True, cache=True)
def _rank_fused(ids: np.ndarray, scores: np.ndarray, counts: np.ndarray, cosines: np.ndarray,
                weight: float, top_k: int, out_ids: np.ndarray, out_scores: np.ndarray,
                out_counts: np.ndarray) -> None:
    """Per row, the best ``top_k`` of its first ``counts`` labels by the fused score, ties
    to the smaller label id (a selection: rows are a handful of labels long)."""
    for d in range(ids.shape[0]):
        n = counts[d]
        fused = (scores[d, :n] + weight * cosines[d, :n]) / (1.0 + weight)
        taken = np.zeros(n, dtype=np.bool_)
        kept = min(n, top_k)
        for r in range(kept):
            best = -1
            for j in range(n):
                if taken[j]:
                    continue
                if best < 0 or fused[j] > fused[best] or (
                        fused[j] == fused[best] and ids[d, j] < ids[d, best]):
                    best = j
            taken[best] = True
            out_ids[d, r] = ids[d, best]
            out_scores[d, r] = fused[best]
        out_counts[d] = kept


def rank_fused(found: Found, cosines: np.ndarray, weight: float, top_k: int) -> Found:
    """The best ``top_k`` of the labels ``found`` (ids, scores, counts as a search returns
    them) by ``(score + weight * cosine) / (1 + weight)``, ties to the smaller label id;
    -1 and 0 pad."""
    ids, scores, counts = found
    out_ids = np.full((ids.shape[0], top_k), -1, dtype=np.int64)
    out_scores = np.zeros((ids.shape[0], top_k), dtype=np.float64)
    out_counts = np.zeros(ids.shape[0], dtype=np.int64)
    _rank_fused(np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64),
                np.asarray(counts, dtype=np.int64), cosines, float(weight), top_k, out_ids,
                out_scores, out_counts)
    return out_ids, out_scores, out_counts


class LabelProfiles:
    """The profiles of a bundle's labels with the rule that weighs them."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                 n_features: int, rule: ProfileRule) -> None:
        self.indptr, self.indices, self.data = indptr, indices, data
        self.n_labels = indptr.shape[0] - 1
        self.n_features = n_features
        self.rule = rule

    @classmethod
    def build(cls, X: sp.csr_matrix, Y: sp.csr_matrix, rule: ProfileRule, *,
              pifa: sp.csr_matrix | None = None) -> LabelProfiles:
        """The profiles of the labels of ``Y`` (n_docs, n_labels) over the rows of ``X``:
        their PIFA rows (``pifa``, when already computed) without the entries below
        ``rule.threshold``, scaled to norm 1 again. Only the kept entries are copied: the
        whole PIFA matrix is as large as the clustering's, the profiles a fraction of it."""
        Z = pifa_embeddings(X, Y) if pifa is None else pifa
        Z.sort_indices()  # in place; the kernel bisects each row
        return cls(*drop_below(Z, rule.threshold), int(X.shape[1]), rule)

    def with_rule(self, rule: ProfileRule) -> LabelProfiles:
        return LabelProfiles(self.indptr, self.indices, self.data, self.n_features, rule)

    def width(self, top_k: int) -> int:
        return self.rule.width(top_k, self.n_labels)

    def cosines(self, rows: Rows, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """float64 (n, width): ``max(0, cos)`` of each row with the profile of each of its
        ``labels`` (n, width; only the first ``counts`` of a row are read, the rest 0)."""
        out = np.zeros(labels.shape, dtype=np.float64)
        indptr, indices, data = rows
        _cosines(np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64),
                 np.asarray(data, dtype=np.float32), np.asarray(labels, dtype=np.int64),
                 np.asarray(counts, dtype=np.int64), self.indptr, self.indices, self.data,
                 out)
        return out

    def rerank(self, found: Found, rows: Rows, top_k: int) -> Found:
        """The labels ``found`` for ``rows`` re-scored with the profiles, best ``top_k``
        first (ties to the smaller label id), as a search returns them."""
        return rank_fused(found, self.cosines(rows, found[0], found[2]), self.rule.weight,
                          top_k)

    def score_shares(self, indices: np.ndarray, values: np.ndarray,
                     labels: list[int]) -> dict[str, np.ndarray]:
        """For one document (sorted feature ids and values), what the profiles add to each
        of ``labels``' score: ``weight * cos / (1 + weight)``."""
        ptr = np.array([0, indices.shape[0]], dtype=np.int64)
        ids = np.asarray(labels, dtype=np.int64)[None, :]
        cos = self.cosines((ptr, indices, values), ids, np.array([ids.shape[1]]))[0]
        return {PROFILE_TERM: self.rule.weight * cos / (1.0 + self.rule.weight)}

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the profiles' arrays; returns the manifest's ``profiles`` entry."""
        files = []
        for name in PROFILE_ARRAYS:
            np.save(folder / f"profiles.{name}.npy", getattr(self, name), allow_pickle=False)
            files.append(f"profiles.{name}.npy")
        return {"files": files, "weight": self.rule.weight, "pool_size": self.rule.pool_size,
                "threshold": self.rule.threshold, "nnz": int(self.data.shape[0]),
                "bytes": sum((folder / f).stat().st_size for f in files)}

    @classmethod
    def load(cls, folder: Path, entry: dict[str, Any], *, n_labels: int, n_features: int,
             mmap: bool = True) -> LabelProfiles:
        """The profiles of a manifest ``profiles`` entry (from :meth:`save`); every failure
        a :class:`BundleError` naming the file."""
        try:
            rule = ProfileRule(float(entry["weight"]), int(entry["pool_size"]),
                               float(entry["threshold"]))
        except (KeyError, TypeError, ValueError):
            raise BundleError("the profiles entry needs a weight, a pool_size and a threshold",
                              folder / "manifest.json") from None
        if not rule.weight > 0 or rule.pool_size < 1:
            raise BundleError(f"profiles weight {rule.weight} and pool_size {rule.pool_size}: "
                              "a weight above 0 and a pool of at least 1 are expected",
                              folder / "manifest.json")
        arrays = {name: load_npy(folder / f"profiles.{name}.npy", mmap=mmap,
                                 dtype=PROFILE_ARRAYS[name]) for name in PROFILE_ARRAYS}
        ptr, idx = arrays["indptr"], arrays["indices"]
        if (ptr.shape != (n_labels + 1,) or ptr[0] != 0 or ptr[-1] != idx.shape[0]
                or idx.shape != arrays["data"].shape or np.any(np.diff(ptr) < 0)):
            raise BundleError(f"pointers do not cover {n_labels} labels' rows",
                              folder / "profiles.indptr.npy")
        if idx.size and (idx.min() < 0 or idx.max() >= n_features):
            raise BundleError(f"feature id outside 0..{n_features - 1}",
                              folder / "profiles.indices.npy")
        # the kernel bisects each row: its feature ids must ascend
        row_start = np.zeros(idx.shape[0], dtype=np.bool_)
        row_start[ptr[:-1][ptr[:-1] < idx.shape[0]]] = True
        if np.any((np.diff(idx) <= 0) & ~row_start[1:]):
            raise BundleError("feature ids do not ascend within a label's row",
                              folder / "profiles.indices.npy")
        return cls(ptr, idx, arrays["data"], n_features, rule)


class ProfilePart(Protocol):
    """A bundle's profiles as the search uses them: :class:`LabelProfiles`, or
    :class:`NoProfiles` for a bundle without them."""

    def width(self, top_k: int) -> int: ...

    def rerank(self, found: Found, rows: Rows, top_k: int) -> Found: ...

    def score_shares(self, indices: np.ndarray, values: np.ndarray,
                     labels: list[int]) -> dict[str, np.ndarray]: ...


class NoProfiles:
    """No profiles: the trees' ranking stands as it is."""

    def width(self, top_k: int) -> int:
        return top_k

    def rerank(self, found: Found, rows: Rows, top_k: int) -> Found:
        return found

    def score_shares(self, indices: np.ndarray, values: np.ndarray,
                     labels: list[int]) -> dict[str, np.ndarray]:
        return {}


#: the profile part of every bundle without profiles (it holds nothing)
NO_PROFILES = NoProfiles()
