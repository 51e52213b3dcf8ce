"""The kNN matcher: an instance-based vote of the training documents nearest a query, and the
label centroids of those documents' embeddings.

Every training document is indexed by the dense block of its feature row (the encoder's
embedding, l2-normalized; a fused row's block is ``alpha * embedding`` over a norm, the same
direction), in a usearch index over cosine similarity (``--knn``); in a bundle without a
dense block, by its whole sparse feature row (TF-IDF or given features) in an inverted index
searched exactly (:class:`PostingsIndex`, each document keeping its unit row's large
entries; chosen at build where it helps and a query's search is cheap enough,
:func:`models.builder.choose_reranking`). A query's ``k`` nearest
training documents vote for their labels::

    knn_score(label) = sum of sim_n ** power over the neighbours n having the label
                       / sum of sim_n ** power over all k neighbours

(similarities below 0 count as 0), so a score lies in 0..1: the weighted share of the
neighbours that carry the label. A label's centroid is the l2-normalized sum of its training
documents' unit embeddings; ``centroid_score(label) = max(0, cos(query, centroid))``. Where
the votes speak for the labels of a few near documents, the centroid speaks for all of a
label's documents, which lifts the labels the trees rank too low for their few examples.

The predictor scores a pool of candidates, the trees' top labels and, of the labels the
neighbours voted for that the trees did not return, the ``max_voted`` of most votes (the
trees' score of those computed exactly in the search's own pass, reusing the node scores of
the clusters the beam opened: :meth:`models.search.Searcher.search_scoring`), each by::

    ((1 - weight) * tree + weight * knn + centroid_weight * centroid) / (1 + centroid_weight)

(the division keeps scores in 0..1, as thresholds and calibration expect, and changes no
order). A label outside the pool has a tree score below the trees' k-th and no vote, or fewer
votes than the ``max_voted`` in it, so with ``centroid_weight`` 0 it could rarely enter the
top k (0 of ``max_voted`` lets every voted label in: then never); the centroids re-rank the
pool and do not widen it (a search of every centroid would cost a product with the whole
label matrix per query). ``k``, ``power``, ``weight`` and ``centroid_weight`` are chosen on
a validation split at build (:func:`models.builder.choose_knn`).

In the bundle: ``knn.usearch`` (the index, memory-mapped with ``Index.restore(view=True)``,
never unpickled; its sha256 is checked at load) or the postings arrays, the label lists of
the indexed documents as CSR arrays and, when ``centroid_weight`` is above 0, the centroids
(:data:`KNN_ARRAYS`), read with :func:`models.bundle.load_npy`. Index key i is training
document i. The usearch index is built on one thread, so the same data give the same file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numba
import numpy as np

# onnxruntime first: imported after usearch, onnxruntime's import crashes the process
# (segfault; usearch 2.26 with onnxruntime 1.32), and a bundle with a dense encoder needs both
import onnxruntime  # noqa: F401
import scipy.sparse as sp
from usearch.index import BatchMatches, Index

from models.bundle import load_npy, sha256_file, verify_files
from models.data import drop_below, row_pointers
from models.dense import unit_rows
from models.errors import BundleError, InvalidInputError
from models.explain import CENTROID_TERM, KNN_TERM
from models.profiles import NO_PROFILES, ProfilePart
from models.search import Found, FusionBound, Rows, Searcher

#: array name -> the dtypes it may be stored in (as models.tree.ENSEMBLE_ARRAYS): the label
#: lists of the indexed training documents, CSR
KNN_ARRAYS: dict[str, tuple[type, ...]] = {
    "label_ptr": (np.int64,),  # [n_docs + 1] range of each document's labels in label_ids
    "label_ids": (np.int32,),  # [n_pairs] label ids, sorted within a document
    # [n_labels, dim] unit centroids (zero: a label without documents); only with a
    # centroid_weight above 0
    "label_centroids": (np.float32,),
    # a postings part's index (PostingsIndex): the indexed documents' unit rows by feature,
    # CSR over features
    "postings_ptr": (np.int64,),  # [n_features + 1]
    "postings_docs": (np.int32,),  # [nnz] document ids, ascending within a feature
    "postings_values": (np.float32,),  # [nnz]
}
#: the arrays every kNN part has; the others only when its rule gives them a weight
KNN_REQUIRED = ("label_ptr", "label_ids")
#: the arrays of a postings index
POSTINGS_ARRAYS = ("postings_ptr", "postings_docs", "postings_values")
INDEX_FILE = "knn.usearch"
KIND = "usearch"
#: up to this many indexed documents a query is compared with every one of them (exact),
#: above it the index's HNSW graph is walked: on cooking's 12,404 MiniLM embeddings (384
#: dimensions) 0.30 ms instead of 2.0 ms a query, recall of the exact 10 / 30 / 50 nearest
#: 0.99 / 0.98 / 0.97
EXACT_MAX_DOCS = 4096

#: ``(ptr, ids) -> scores``: one score for each candidate label, the candidates CSR per query
CandidateScores = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class VoteRule:
    """How neighbours vote: the ``k`` nearest, each with weight ``sim ** power``; their votes
    enter the final score with ``weight``, the labels' centroids with ``centroid_weight``;
    of the labels voted for that the trees did not return, the ``max_voted`` of most votes
    join the pool (0: all)."""

    k: int
    power: float
    weight: float
    centroid_weight: float = 0.0
    max_voted: int = 0

    @property
    def scores(self) -> bool:
        """Whether the part changes the trees' ranking at all."""
        return self.weight > 0 or self.centroid_weight > 0


def dense_block(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dense_start: int,
                dim: int) -> np.ndarray:
    """float32 (n, dim): the columns ``dense_start..`` of CSR rows, densely."""
    n = indptr.shape[0] - 1
    out = np.zeros((n, dim), dtype=np.float32)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    keep = indices >= dense_start
    out[rows[keep], indices[keep] - dense_start] = data[keep]
    return out


@numba.njit(nogil=True, cache=True)
def _vote(keys: np.ndarray, sims: np.ndarray, label_ptr: np.ndarray, label_ids: np.ndarray,
          power: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (indptr, label ids ascending within a row, votes) of :func:`vote`. Each
    label's weights are summed in neighbour order."""
    n, k = keys.shape
    indptr = np.zeros(n + 1, dtype=np.int64)
    size = 0
    for d in range(n):
        for j in range(k):
            if keys[d, j] >= 0:
                size += label_ptr[keys[d, j] + 1] - label_ptr[keys[d, j]]
    out_ids = np.empty(size, dtype=np.int32)
    out_data = np.empty(size, dtype=np.float64)
    filled = 0
    for d in range(n):
        w = np.zeros(k)
        for j in range(k):
            if keys[d, j] >= 0:
                w[j] = max(float(sims[d, j]), 0.0) ** power
        total = w.sum()
        m = 0
        for j in range(k):
            if w[j] > 0:  # a neighbour of weight 0 gives no label a vote
                m += label_ptr[keys[d, j] + 1] - label_ptr[keys[d, j]]
        labels = np.empty(m, dtype=np.int64)
        weights = np.empty(m)
        m = 0
        for j in range(k):
            if w[j] > 0:
                for i in range(label_ptr[keys[d, j]], label_ptr[keys[d, j] + 1]):
                    labels[m], weights[m] = label_ids[i], w[j]
                    m += 1
        order = np.argsort(labels, kind="mergesort")
        for i in range(m):
            lab = labels[order[i]]
            if i == 0 or lab != out_ids[filled - 1]:
                out_ids[filled], out_data[filled] = lab, 0.0
                filled += 1
            out_data[filled - 1] += weights[order[i]]
        for i in range(indptr[d], filled):
            out_data[i] /= total
        indptr[d + 1] = filled
    return indptr, out_ids[:filled], out_data[:filled]


def vote(keys: np.ndarray, sims: np.ndarray, label_ptr: np.ndarray, label_ids: np.ndarray,
         power: float) -> Rows:
    """CSR arrays (indptr, label ids ascending within a row, float64 votes) of the votes of
    neighbours ``keys`` (n, k; -1: none) at similarities ``sims``: per label, the share of
    the neighbours' weight ``sim ** power`` (sims below 0 count as 0) on the neighbours that
    carry it. Bare arrays, not a scipy matrix: its constructor costs a request more than
    the votes."""
    return _vote(np.ascontiguousarray(keys, dtype=np.int64), sims, np.asarray(label_ptr),
                 np.asarray(label_ids), float(power))


#: a query value at least this, times a positive float32 value (1.4e-45 or more), gives a
#: float64 product above 0
_LEAST_QUERY_VALUE = 1e-250


@numba.njit(nogil=True, cache=True)
def _nearest_by_postings(q_ptr: np.ndarray, q_idx: np.ndarray, q_val: np.ndarray,
                         p_ptr: np.ndarray, p_doc: np.ndarray, p_val: np.ndarray,
                         positive: bool, acc: np.ndarray, seen: np.ndarray,
                         touched: np.ndarray, first: int, last: int, keys: np.ndarray,
                         sims: np.ndarray) -> None:
    """keys / sims rows ``first..last - 1``: the ``k`` (their width) indexed documents of
    largest cosine with query row d (any norm), best first, ties to the smaller document;
    a document sharing no feature with the query is none (its key stays -1). The postings
    hold the unit rows of the indexed documents, feature by feature; ``positive``: all
    their values are above 0. ``acc`` (float64), ``seen`` (bool) and ``touched`` (int64),
    one per indexed document, are the caller's scratch: all zero / False on entry, and
    left so."""
    k = keys.shape[1]
    for d in range(first, last):
        a, b = q_ptr[d], q_ptr[d + 1]
        norm = 0.0
        all_positive = positive
        for i in range(a, b):
            norm += float(q_val[i]) * float(q_val[i])
            all_positive &= q_val[i] >= _LEAST_QUERY_VALUE
        if norm == 0:
            continue
        n_touched = 0
        for i in range(a, b):
            f, v = q_idx[i], float(q_val[i])
            if all_positive:
                # every product is above 0 (the postings' float32 values times at least
                # _LEAST_QUERY_VALUE: no float64 underflow), so an accumulator at 0 is a
                # document not touched yet: one random access a posting instead of two
                # (TF-IDF rows are all positive)
                for j in range(p_ptr[f], p_ptr[f + 1]):
                    doc = p_doc[j]
                    before = acc[doc]
                    if before == 0.0:
                        touched[n_touched] = doc
                        n_touched += 1
                    acc[doc] = before + v * float(p_val[j])
                continue
            for j in range(p_ptr[f], p_ptr[f + 1]):
                doc = p_doc[j]
                if not seen[doc]:
                    seen[doc] = True
                    touched[n_touched] = doc
                    n_touched += 1
                acc[doc] += v * float(p_val[j])
        # a buffer of the best k so far; its worst is replaced when a better one comes
        best_doc = np.full(k, -1, dtype=np.int64)
        best_sim = np.zeros(k)
        filled, worst = 0, 0
        for t in range(n_touched):
            doc = touched[t]
            s = acc[doc]
            acc[doc] = 0.0
            if not all_positive:
                seen[doc] = False
            if filled < k:
                best_doc[filled], best_sim[filled] = doc, s
                filled += 1
            elif s > best_sim[worst] or (s == best_sim[worst] and doc < best_doc[worst]):
                best_doc[worst], best_sim[worst] = doc, s
            else:
                continue
            if filled == k:
                worst = 0
                for j in range(1, k):
                    if best_sim[j] < best_sim[worst] or (
                            best_sim[j] == best_sim[worst] and best_doc[j] > best_doc[worst]):
                        worst = j
        order = np.argsort(best_doc[:filled])  # ties: the smaller document first
        order = order[np.argsort(-best_sim[:filled][order], kind="mergesort")]
        scale = 1.0 / np.sqrt(norm)
        for r in range(filled):
            keys[d, r] = best_doc[order[r]]
            sims[d, r] = best_sim[order[r]] * scale


class PostingsIndex:
    """The indexed documents' unit feature rows, feature by feature (an inverted index): a
    query's nearest documents by cosine are found exactly, reading the postings of the
    query's features only. For bundles without a dense block, whose documents are sparse
    rows (TF-IDF or given features); the work per query is the summed length of its
    features' postings (:meth:`reads`), which the builder bounds. Built with a threshold,
    each document keeps only its unit row's entries of at least that much, scaled to norm
    1 again: the words that tell it apart, where the small entries are the vocabulary all
    documents share, whose long postings a query would otherwise read."""

    kind = "postings"

    def __init__(self, ptr: np.ndarray, docs: np.ndarray, values: np.ndarray,
                 n_docs: int) -> None:
        self.ptr, self.docs, self.values = np.asarray(ptr), np.asarray(docs), np.asarray(values)
        self.n_docs = n_docs
        # NaN compares False: such an index takes the general path
        self.positive = bool(self.values.size == 0 or self.values.min() > 0)
        self.n_features = ptr.shape[0] - 1
        self._scratch = threading.local()

    @classmethod
    def build(cls, X: sp.csr_matrix, threshold: float = 0.0) -> PostingsIndex:
        """The index of the rows of ``X`` (n_docs, n_features; any norm), each without the
        entries of its unit row below ``threshold`` (:func:`models.data.drop_below`)."""
        ptr, ids, values = drop_below(sp.csr_matrix(X), threshold, unit=False)
        # the columns of the kept rows are the postings: one copy, documents ascending
        by_feature = sp.csr_matrix((values, ids, ptr), shape=X.shape).tocsc()
        del ptr, ids, values
        return cls(by_feature.indptr.astype(np.int64),
                   by_feature.indices.astype(np.int32, copy=False),
                   by_feature.data.astype(np.float32, copy=False), X.shape[0])

    def reads(self, queries: Rows) -> float:
        """How many postings a query reads on average, over CSR ``queries``: the postings
        of each of its features."""
        ptr, idx, _ = queries
        df = np.bincount(np.asarray(idx), minlength=self.n_features)
        return float(df.astype(np.float64) @ np.diff(self.ptr) / max(ptr.shape[0] - 1, 1))

    def queries(self, rows: Rows, dense_start: int) -> Rows:
        """A query is its row's features the index holds: a whole sparse row, or a fused
        row's sparse block (an index built over the features before ``dense_start``)."""
        ptr, idx, val = rows
        idx = np.asarray(idx)
        if not idx.size or int(idx.max()) < self.n_features:
            return rows
        kept = idx < self.n_features
        counts = np.concatenate(([0], np.cumsum(kept, dtype=np.int64)))
        return counts[np.asarray(ptr)], idx[kept], np.asarray(val)[kept]

    def neighbours(self, queries: Rows, k: int, threads: int = 1,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`UsearchIndex.neighbours`, for CSR ``queries`` (sorted indices)."""
        ptr, idx, val = queries
        n = ptr.shape[0] - 1
        keys = np.full((n, k), -1, dtype=np.int64)
        sims = np.zeros((n, k), dtype=np.float32)
        if n and (idx.size and int(idx.max()) >= self.n_features):
            raise InvalidInputError(f"feature id {int(idx.max())} outside the kNN index's "
                                    f"{self.n_features} features")

        def run(first: int, last: int) -> None:  # rows first..last - 1, on this thread
            _nearest_by_postings(ptr, idx, val, self.ptr, self.docs, self.values,
                                 self.positive, *self._accumulators(), first, last, keys,
                                 sims)

        bounds = np.linspace(0, n, min(max(threads, 1), max(n, 1)) + 1).astype(np.int64)
        if bounds.shape[0] <= 2:
            run(0, n)
        else:
            with ThreadPoolExecutor(bounds.shape[0] - 1) as pool:
                list(pool.map(run, bounds[:-1].tolist(), bounds[1:].tolist()))
        return keys, sims

    def _accumulators(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This thread's scratch of :func:`_nearest_by_postings`, made once: a request would
        otherwise allocate (and fault in) three arrays as long as the index's documents."""
        scratch = getattr(self._scratch, "accumulators", None)
        if scratch is None:
            scratch = (np.zeros(self.n_docs), np.zeros(self.n_docs, dtype=np.bool_),
                       np.zeros(self.n_docs, dtype=np.int64))
            self._scratch.accumulators = scratch
        return scratch

    def save(self, folder: Path) -> dict[str, Any]:
        files = []
        for name, arr in (("postings_ptr", self.ptr), ("postings_docs", self.docs),
                          ("postings_values", self.values)):
            np.save(folder / f"knn.{name}.npy", arr, allow_pickle=False)
            files.append(f"knn.{name}.npy")
        return {"kind": self.kind, "files": files, "n_features": self.n_features,
                "nnz": int(self.docs.shape[0])}

    @classmethod
    def load(cls, folder: Path, *, n_docs: int, n_features: int, mmap: bool,
             ) -> PostingsIndex:
        arrays = {name: load_npy(folder / f"knn.{name}.npy", mmap=mmap, dtype=KNN_ARRAYS[name])
                  for name in POSTINGS_ARRAYS}
        ptr, docs = arrays["postings_ptr"], arrays["postings_docs"]
        values = arrays["postings_values"]
        if (ptr.shape != (n_features + 1,) or ptr[0] != 0 or ptr[-1] != docs.shape[0]
                or np.any(np.diff(ptr) < 0)):
            raise BundleError(f"pointers do not cover {n_features} features",
                              folder / "knn.postings_ptr.npy")
        if docs.size and (docs.min() < 0 or docs.max() >= n_docs):
            raise BundleError(f"document id outside 0..{n_docs - 1}",
                              folder / "knn.postings_docs.npy")
        if values.shape != docs.shape:
            raise BundleError(f"{values.shape[0]} values for {docs.shape[0]} postings",
                              folder / "knn.postings_values.npy")
        return cls(ptr, docs, values, n_docs)


def label_centroids(emb: np.ndarray, Y: sp.csr_matrix) -> np.ndarray:
    """float32 (n_labels, dim): per label of ``Y`` (n_docs, n_labels), the unit direction of
    the sum of its documents' unit rows of ``emb``; zero for a label without documents."""
    C = sp.csr_matrix(Y).T.tocsr() @ unit_rows(np.asarray(emb, dtype=np.float64))
    return unit_rows(np.asarray(C)).astype(np.float32)


def centroid_scores(centroids: np.ndarray, queries: np.ndarray, ptr: np.ndarray,
                    ids: np.ndarray) -> np.ndarray:
    """float64 ``max(0, cos(query d, centroid of ids[ptr[d]:ptr[d+1]]))`` for every query
    row d of ``queries`` (any norm; a zero row scores 0)."""
    q = unit_rows(np.asarray(queries, dtype=np.float64))
    out = np.zeros(ids.shape[0])
    for d in range(q.shape[0]):
        a, b = int(ptr[d]), int(ptr[d + 1])
        if b > a:
            out[a:b] = np.maximum(centroids[ids[a:b]] @ q[d], 0.0)
    return out


@dataclass(frozen=True)
class Pool:
    """Each query's candidate labels (CSR over queries, label ids ascending in a row) with
    the trees' exact score, the kNN vote and the centroid score of each."""

    ptr: np.ndarray  # int64 [n + 1]
    ids: np.ndarray  # int64 [n_candidates]
    tree: np.ndarray  # float64, like votes and centroid
    votes: np.ndarray
    centroid: np.ndarray

    def rank(self, weight: float, centroid_weight: float, top_k: int) -> Found:
        """The top ``top_k`` of ``((1 - weight) * tree + weight * votes + centroid_weight *
        centroid) / (1 + centroid_weight)`` per query, as a search returns them (ids, scores,
        counts; -1 pads), ties to the smaller label id."""
        n = self.ptr.shape[0] - 1
        out_ids = np.full((n, top_k), -1, dtype=np.int64)
        out_scores = np.zeros((n, top_k), dtype=np.float64)
        counts = np.minimum(np.diff(self.ptr), top_k)
        _rank_pool(self.ptr, self.ids, self.tree, self.votes, self.centroid, weight,
                   centroid_weight, out_ids, out_scores)
        return out_ids, out_scores, counts


@numba.njit(nogil=True, cache=True)
def _rank_pool(ptr: np.ndarray, ids: np.ndarray, tree: np.ndarray, votes: np.ndarray,
               centroid: np.ndarray, weight: float, centroid_weight: float,
               out_ids: np.ndarray, out_scores: np.ndarray) -> None:
    """:meth:`Pool.rank` into ``out_ids`` / ``out_scores`` (their width is top_k): a
    selection per row, whose candidates ascend by id, so that the first of equal scores
    is the smaller id."""
    top_k = out_ids.shape[1]
    for d in range(ptr.shape[0] - 1):
        a, b = ptr[d], ptr[d + 1]
        fused = (1.0 - weight) * tree[a:b] + weight * votes[a:b]
        if centroid_weight:
            fused = (fused + centroid_weight * centroid[a:b]) / (1.0 + centroid_weight)
        taken = np.zeros(b - a, dtype=np.bool_)
        for r in range(min(b - a, top_k)):
            best = -1
            for j in range(b - a):
                if not taken[j] and (best < 0 or fused[j] > fused[best]):
                    best = j
            taken[best] = True
            out_ids[d, r] = ids[a + best]
            out_scores[d, r] = fused[best]


@numba.njit(nogil=True, cache=True)
def _merge_pool(ids: np.ndarray, scores: np.ndarray, counts: np.ndarray, v_ptr: np.ndarray,
                v_ids: np.ndarray, v_data: np.ndarray, allowed: np.ndarray, max_voted: int,
                s_ptr: np.ndarray, s_ids: np.ndarray, s_scores: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the union of its first ``counts`` tree labels and its voted labels that
    ``allowed`` lets through (an empty ``allowed``: all), of those the trees did not return
    the ``max_voted`` of most votes (ties: the smaller id; 0: all), ascending: pointers,
    ids, the trees' score, the vote (0: none) and whether that score is known: the trees
    returned the label, or it is among the row's scored labels (``s_*``: CSR, ids
    ascending; empty pointers: none); else its score is 0 here."""
    n = ids.shape[0]
    ptr = np.zeros(n + 1, dtype=np.int64)
    size = 0
    for d in range(n):
        size += counts[d] + v_ptr[d + 1] - v_ptr[d]
    out_ids = np.empty(size, dtype=np.int64)
    out_tree = np.zeros(size)
    out_votes = np.zeros(size)
    out_found = np.zeros(size, dtype=np.bool_)
    filled = 0
    for d in range(n):
        c = counts[d]
        order = np.argsort(ids[d, :c])
        a, b = v_ptr[d], v_ptr[d + 1]
        joins = np.ones(b - a, dtype=np.bool_)  # a voted label the trees missed may join
        if max_voted:
            left = max_voted
            # stable: equal votes keep the row's ascending ids
            for j in np.argsort(-v_data[a:b], kind="mergesort"):
                lab = v_ids[a + j]
                returned = False
                for r in range(c):
                    returned |= ids[d, r] == lab
                if returned or (allowed.shape[0] and not allowed[lab]):
                    continue
                joins[j] = left > 0
                left -= 1
        i, j = 0, a
        while i < c or j < b:
            if j < b and allowed.shape[0] and not allowed[v_ids[j]]:
                j += 1
                continue
            if j >= b or (i < c and ids[d, order[i]] < v_ids[j]):
                lab, tree, got, vote_of = ids[d, order[i]], scores[d, order[i]], True, 0.0
                i += 1
            elif i >= c or v_ids[j] < ids[d, order[i]]:
                if not joins[j - a]:
                    j += 1
                    continue
                lab, tree, got, vote_of = v_ids[j], 0.0, False, v_data[j]
                if s_ptr.shape[0]:
                    s_a, s_b = s_ptr[d], s_ptr[d + 1]
                    at = s_a + np.searchsorted(s_ids[s_a:s_b], lab)
                    if at < s_b and s_ids[at] == lab:
                        tree, got = s_scores[at], True
                j += 1
            else:  # both
                lab, tree, got, vote_of = v_ids[j], scores[d, order[i]], True, v_data[j]
                i += 1
                j += 1
            out_ids[filled], out_tree[filled] = lab, tree
            out_found[filled], out_votes[filled] = got, vote_of
            filled += 1
        ptr[d + 1] = filled
    return (ptr, out_ids[:filled], out_tree[:filled], out_votes[:filled],
            out_found[:filled])


#: no labels scored before the pool is made (:func:`candidate_pool`): empty pointers
_NONE_SCORED = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))


def candidate_pool(tree: Found, votes: Rows, tree_scores_of: CandidateScores,
                   centroid_scores_of: CandidateScores | None = None,
                   allowed: np.ndarray | None = None, max_voted: int = 0,
                   scored: Rows | None = None) -> Pool:
    """The pool of each row: the trees' labels (``tree``: ids, scores, counts as the search
    returns them) and the labels with a vote that ``allowed`` (bool per label; None: all)
    lets through, of those the trees did not return the ``max_voted`` of most votes (0:
    all): each costs the trees' exact score of it, most of a request's kNN time.
    ``scored`` (CSR per row: pointers, ids ascending, scores) holds such scores computed
    already; ``tree_scores_of(ptr, ids)`` gives those of the other voted labels the trees
    did not return, ``centroid_scores_of(ptr, ids)`` the centroid scores of the whole
    pool (None: zeros), both CSR per row."""
    ids, scores, counts = tree
    n = ids.shape[0]
    ptr, pool_ids, tree_score, pool_votes, found = _merge_pool(
        np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64),
        np.asarray(counts, dtype=np.int64), *votes,
        np.zeros(0, dtype=np.bool_) if allowed is None else allowed, max_voted,
        *(_NONE_SCORED if scored is None else scored))
    extra = ~found
    if extra.any():
        row = np.repeat(np.arange(n), np.diff(ptr))[extra]
        tree_score[extra] = tree_scores_of(row_pointers(row, n), pool_ids[extra])
    centroid = (centroid_scores_of(ptr, pool_ids) if centroid_scores_of is not None
                else np.zeros(pool_ids.shape[0]))
    return Pool(ptr, pool_ids, tree_score, pool_votes, centroid)


@numba.njit(nogil=True, cache=True)
def most_voted(v_ptr: np.ndarray, v_ids: np.ndarray, v_data: np.ndarray, allowed: np.ndarray,
                n_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (pointers, ids ascending) of each row's ``n_keep`` voted labels of most votes
    that ``allowed`` lets through (empty: all; ties: the smaller id, as :func:`_merge_pool`
    orders them; ``n_keep`` 0: all of them)."""
    n = v_ptr.shape[0] - 1
    ptr = np.zeros(n + 1, dtype=np.int64)
    out = np.empty(v_ids.shape[0], dtype=np.int64)
    for d in range(n):
        a, b = v_ptr[d], v_ptr[d + 1]
        start = ptr[d]
        filled = start
        for j in np.argsort(-v_data[a:b], kind="mergesort"):
            if n_keep and filled - start >= n_keep:
                break
            if allowed.shape[0] == 0 or allowed[v_ids[a + j]]:
                out[filled] = v_ids[a + j]
                filled += 1
        out[start:filled] = np.sort(out[start:filled])
        ptr[d + 1] = filled
    return ptr, out[:ptr[n]]


#: the labels a search without a filter allows: all (an empty mask)
_ALL_LABELS = np.zeros(0, dtype=np.bool_)


class UsearchIndex:
    """The indexed documents' dense blocks (embeddings) in a usearch index over cosine
    similarity, memory-mapped from the bundle; thread-safe (usearch searches one at a time:
    its Python binding shares one search context between calls)."""

    kind = KIND

    def __init__(self, index: Index) -> None:
        self.index = index
        self.n_docs = int(index.size)
        self.dim = int(index.ndim)
        self.exact = self.n_docs <= EXACT_MAX_DOCS
        self._lock = threading.Lock()

    @classmethod
    def build(cls, emb: np.ndarray) -> UsearchIndex:
        """The index of the rows of ``emb`` (n_docs, dim; any norm); key i is row i."""
        index = Index(ndim=int(emb.shape[1]), metric="cos", dtype="f32")
        # one thread: a multi-threaded insert gives another graph at every build
        index.add(np.arange(emb.shape[0], dtype=np.uint64),
                  np.ascontiguousarray(emb, dtype=np.float32), threads=1)
        return cls(index)

    def queries(self, rows: Rows, dense_start: int) -> np.ndarray:
        """A query is the dense block of its feature row, from ``dense_start``."""
        return dense_block(*rows, dense_start, self.dim)

    def neighbours(self, emb: np.ndarray, k: int, threads: int = 1,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed documents of each row of ``emb``: keys int64 (n, k), -1
        past the last, and cosine similarities float32 (n, k); a zero row has none."""
        n = emb.shape[0]
        keys = np.full((n, k), -1, dtype=np.int64)
        sims = np.zeros((n, k), dtype=np.float32)
        live = np.flatnonzero(np.any(emb != 0, axis=1))
        if not live.size or not self.n_docs:
            return keys, sims
        query = np.ascontiguousarray(emb[live], dtype=np.float32)
        with self._lock:
            found = self.index.search(query, k, exact=self.exact, threads=threads)
        # one query row gives Matches (1-d), several BatchMatches (2-d)
        got = np.asarray(found.keys).astype(np.int64).reshape(len(live), -1)[:, :k]
        dist = np.asarray(found.distances, dtype=np.float32).reshape(len(live), -1)[:, :k]
        counts = (np.asarray(found.counts).reshape(-1) if isinstance(found, BatchMatches)
                  else np.array([len(found)]))
        filled = np.arange(got.shape[1])[None, :] < counts[:, None]
        if np.any(filled & ((got < 0) | (got >= self.n_docs))):
            raise BundleError(f"kNN index returned a key outside 0..{self.n_docs - 1}")
        keys[live, : got.shape[1]] = np.where(filled, got, -1)
        sims[live, : got.shape[1]] = 1.0 - np.where(filled, dist, 1.0)  # past counts: junk
        return keys, sims

    def save(self, folder: Path) -> dict[str, Any]:
        self.index.save(str(folder / INDEX_FILE))
        return {"kind": self.kind, "files": [INDEX_FILE], "dim": self.dim, "metric": "cos",
                "dtype": "f32", "search": "exact" if self.exact else "hnsw",
                "sha256": {INDEX_FILE: sha256_file(folder / INDEX_FILE)}}

    @classmethod
    def load(cls, folder: Path, entry: dict[str, Any], *, n_docs: int, dim: int,
             mmap: bool) -> UsearchIndex:
        path = folder / INDEX_FILE
        verify_files(folder, [INDEX_FILE], entry, "kNN index")
        try:
            meta = Index.metadata(str(path))
            index = Index.restore(str(path), view=mmap)
        except Exception as exc:  # usearch raises RuntimeError / ValueError of its own
            raise BundleError(f"unreadable kNN index ({exc})", path) from None
        if index is None or meta is None:
            raise BundleError("not a usearch index", path)
        if int(index.ndim) != dim or int(index.size) != n_docs or str(
                index.metric_kind).split(".")[-1].lower() != "cos":
            raise BundleError(f"index of {index.size} x {index.ndim} ({index.metric_kind}) "
                              f"where {n_docs} x {dim} (cos) is expected", path)
        return cls(index)


class NeighbourIndex(Protocol):
    """Where a kNN part finds a query's nearest training documents: :class:`UsearchIndex`
    (dense blocks) or :class:`PostingsIndex` (sparse feature rows)."""

    kind: str
    n_docs: int

    def queries(self, rows: Rows, dense_start: int) -> Any: ...

    def neighbours(self, queries: Any, k: int, threads: int = 1,
                   ) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, folder: Path) -> dict[str, Any]: ...


class KnnMatcher:
    """The indexed training documents (a :class:`NeighbourIndex`), their labels and the
    labels' centroids (None: a matcher whose rule gives them no weight, or whose index has
    no embeddings to average)."""

    def __init__(self, index: NeighbourIndex, label_ptr: np.ndarray, label_ids: np.ndarray,
                 n_labels: int, rule: VoteRule, centroids: np.ndarray | None = None) -> None:
        if rule.centroid_weight > 0 and centroids is None:
            raise InvalidInputError("a centroid weight needs the labels' centroids")
        self.index = index
        # plain views of the memory maps: numpy's subclass hooks cost a request more than
        # the arithmetic on these few entries
        self.label_ptr = np.asarray(label_ptr)
        self.label_ids = np.asarray(label_ids)
        self.n_labels = n_labels
        self.rule = rule
        self.centroids = centroids
        self.n_docs = label_ptr.shape[0] - 1

    @classmethod
    def build(cls, emb: np.ndarray, Y: sp.csr_matrix, rule: VoteRule) -> KnnMatcher:
        """Index the rows of ``emb`` (n_docs, dim; any norm) in a :class:`UsearchIndex` with
        the labels of ``Y`` (n_docs, n_labels)."""
        if emb.ndim != 2 or emb.shape[0] != Y.shape[0] or emb.shape[0] == 0:
            raise InvalidInputError(
                f"kNN: {emb.shape[0]} embeddings for {Y.shape[0]} labelled documents")
        Y = _sorted_csr(Y)
        return cls(UsearchIndex.build(emb), Y.indptr.astype(np.int64),
                   Y.indices.astype(np.int32), Y.shape[1], rule, label_centroids(emb, Y))

    @classmethod
    def build_postings(cls, X: sp.csr_matrix, Y: sp.csr_matrix, rule: VoteRule,
                       threshold: float = 0.0) -> KnnMatcher:
        """Index the sparse rows of ``X`` (n_docs, n_features) in a :class:`PostingsIndex`
        (at ``threshold``) with the labels of ``Y``; no centroids (``rule`` must give them
        no weight)."""
        return cls.over_postings(PostingsIndex.build(X, threshold), Y, rule)

    @classmethod
    def over_postings(cls, index: PostingsIndex, Y: sp.csr_matrix, rule: VoteRule,
                      ) -> KnnMatcher:
        """The matcher of a built ``index`` whose documents carry the labels of ``Y``."""
        if index.n_docs != Y.shape[0] or index.n_docs == 0:
            raise InvalidInputError(
                f"kNN: {index.n_docs} feature rows for {Y.shape[0]} labelled documents")
        Y = _sorted_csr(Y)
        return cls(index, Y.indptr.astype(np.int64), Y.indices.astype(np.int32), Y.shape[1],
                   rule)

    def with_rule(self, rule: VoteRule) -> KnnMatcher:
        return KnnMatcher(self.index, self.label_ptr, self.label_ids, self.n_labels, rule,
                          self.centroids)

    def neighbours(self, queries: Any, k: int, threads: int = 1,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The index's ``k`` nearest documents of ``queries`` (as :meth:`queries` makes
        them): keys int64 (n, k), -1 past the last, cosine similarities float32 (n, k)."""
        return self.index.neighbours(queries, k, threads)

    def queries(self, rows: Rows, dense_start: int) -> Any:
        """CSR ``rows`` as the index searches them (the dense block from ``dense_start``,
        or the whole sparse rows)."""
        return self.index.queries(rows, dense_start)

    def votes(self, queries: Any, threads: int = 1) -> Rows:
        """The kNN scores of ``queries`` under this matcher's rule (:func:`vote`)."""
        keys, sims = self.neighbours(queries, self.rule.k, threads)
        return vote(keys, sims, self.label_ptr, self.label_ids, self.rule.power)

    def search(self, searcher: Searcher, rows: Rows, top_k: int, beam_size: int, *,
               dense_start: int, node_mask: np.ndarray | None,
               allowed: Callable[[], np.ndarray | None], threads: int = 1) -> Found:
        """The trees' search of ``rows`` for ``top_k`` labels re-ranked over the pool of
        candidates with this matcher's votes and centroids (:class:`Pool`). The votes come
        first, so that the search scores the voted labels that may join the pool in its own
        pass (the ``max_voted`` + ``top_k`` of most votes: at most ``top_k`` of them are the
        trees' own). ``node_mask`` / ``allowed()``: a label filter compiled to nodes /
        labels (None: all)."""
        if not self.rule.scores:
            return searcher.search(*rows, top_k, beam_size, node_mask)
        queries = self.queries(rows, dense_start)
        votes = self.votes(queries, threads)
        labels_ok = allowed()
        n_keep = self.rule.max_voted + top_k if self.rule.max_voted else 0
        voted_ptr, voted_ids = most_voted(
            *votes, _ALL_LABELS if labels_ok is None else labels_ok, n_keep)
        # the pool ranks by ((1 - w) tree + w vote + c centroid) / (1 + c), a centroid
        # score at most 1 (a float32 unit row's cosine, give or take its rounding): a voted
        # label that cannot reach the top_k is not scored exactly
        bound = FusionBound(1.0 - self.rule.weight, self.rule.weight,
                            self.rule.centroid_weight * (1.0 + 1e-6), votes)
        found, voted_scores = searcher.search_scoring(*rows, top_k, beam_size, node_mask,
                                                      voted_ptr, voted_ids, bound)
        return self._ranked(found, votes, partial(searcher.label_scores, *rows), queries,
                            labels_ok, top_k, (voted_ptr, voted_ids, voted_scores))

    def fuse(self, searcher: Searcher, found: Found, rows: Rows, top_k: int, *,
             dense_start: int, threads: int = 1) -> Found:
        """The trees' ranking ``found`` of ``rows`` re-ranked as :meth:`search` re-ranks
        its own (the voted labels scored by the trees afterwards): for a ranking at hand."""
        if not self.rule.scores:
            return found
        queries = self.queries(rows, dense_start)
        return self._ranked(found, self.votes(queries, threads),
                            partial(searcher.label_scores, *rows), queries, None, top_k)

    def _ranked(self, found: Found, votes: Rows, tree_scores_of: CandidateScores,
                queries: Any, allowed: np.ndarray | None, top_k: int,
                scored: Rows | None = None) -> Found:
        pool = candidate_pool(found, votes, tree_scores_of, self.centroid_scores_of(queries),
                              allowed, self.rule.max_voted, scored)
        return pool.rank(self.rule.weight, self.rule.centroid_weight, top_k)

    def centroid_scores_of(self, queries: np.ndarray) -> CandidateScores | None:
        """``(ptr, ids) -> centroid scores`` of the rows of ``queries``, or None when the
        rule gives the centroids no weight."""
        if self.rule.centroid_weight == 0:
            return None
        assert self.centroids is not None  # __init__ refuses a weight without them
        return partial(centroid_scores, self.centroids, queries)

    def score_shares(self, indices: np.ndarray, values: np.ndarray, labels: list[int], *,
                     dense_start: int) -> dict[str, np.ndarray]:
        """For one document (sorted feature ids and values), what the votes and the
        centroids add to each of ``labels``' fused score (``weight * vote`` and
        ``centroid_weight * centroid``, over ``1 + centroid_weight``: see :class:`Pool`), by
        explanation term; only the parts with a weight."""
        ptr = np.array([0, indices.shape[0]], dtype=np.int64)
        queries = self.queries((ptr, indices, values), dense_start)
        ids = np.asarray(labels, dtype=np.int64)
        scale = 1.0 / (1.0 + self.rule.centroid_weight)
        shares = {}
        if self.rule.weight > 0:
            shares[KNN_TERM] = scale * self.rule.weight * _lookup(self.votes(queries), 0, ids)
        cents = self.centroid_scores_of(queries)
        if cents is not None:
            shares[CENTROID_TERM] = scale * self.rule.centroid_weight * cents(
                np.array([0, ids.shape[0]], dtype=np.int64), ids)
        return shares

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the index and label arrays; returns the manifest's ``knn`` entry."""
        entry = self.index.save(folder)
        files = list(entry.pop("files"))
        arrays = {"label_ptr": self.label_ptr, "label_ids": self.label_ids}
        if self.rule.centroid_weight > 0:
            assert self.centroids is not None  # __init__ refuses a weight without them
            arrays["label_centroids"] = self.centroids
        for name, arr in arrays.items():
            np.save(folder / f"knn.{name}.npy", arr, allow_pickle=False)
            files.append(f"knn.{name}.npy")
        return {"kind": entry.pop("kind"), "files": files, "k": self.rule.k,
                "power": self.rule.power, "weight": self.rule.weight,
                "centroid_weight": self.rule.centroid_weight,
                "max_voted_labels": self.rule.max_voted, "n_docs": self.n_docs,
                **entry, "bytes": sum((folder / f).stat().st_size for f in files)}

    @classmethod
    def load(cls, folder: Path, entry: dict[str, Any], *, n_labels: int, n_features: int,
             dense_start: int, mmap: bool = True) -> KnnMatcher:
        """The matcher of a manifest ``knn`` entry (from :meth:`save`); every failure a
        :class:`BundleError` naming the file. A ``usearch`` part searches the dense block
        from ``dense_start``, a ``postings`` part the sparse features before it (a bundle
        without a dense block: ``dense_start`` is ``n_features``)."""
        kind = entry.get("kind")
        if kind not in (KIND, PostingsIndex.kind):
            raise BundleError(f"kNN kind is {kind!r}, expected {KIND!r} or "
                              f"{PostingsIndex.kind!r}", folder / "manifest.json")
        dim = n_features - dense_start
        if kind == KIND and dim < 1:
            raise BundleError("a usearch kNN part needs a dense block", folder / "manifest.json")
        try:  # a bundle of format 7 or older voted every label into the pool: 0
            rule = VoteRule(int(entry["k"]), float(entry["power"]), float(entry["weight"]),
                            float(entry.get("centroid_weight", 0.0)),
                            int(entry.get("max_voted_labels", 0)))
        except (KeyError, TypeError, ValueError):
            raise BundleError("the knn entry needs a k, a power and a weight (numbers)",
                              folder / "manifest.json") from None
        if rule.k < 1 or rule.max_voted < 0:
            raise BundleError(f"knn k {rule.k} and max_voted_labels {rule.max_voted}: k of "
                              "at least 1 and max_voted_labels of at least 0 are expected",
                              folder / "manifest.json")
        names = [*KNN_REQUIRED, *(["label_centroids"] if rule.centroid_weight > 0 else [])]
        arrays = {name: load_npy(folder / f"knn.{name}.npy", mmap=mmap, dtype=KNN_ARRAYS[name])
                  for name in names}
        ptr, ids = arrays["label_ptr"], arrays["label_ids"]
        n_docs = int(entry.get("n_docs", -1))
        if (ptr.shape != (n_docs + 1,) or ptr[0] != 0 or ptr[-1] != ids.shape[0]
                or np.any(np.diff(ptr) < 0)):
            raise BundleError(f"pointers do not cover {n_docs} documents",
                              folder / "knn.label_ptr.npy")
        if ids.size and (ids.min() < 0 or ids.max() >= n_labels):
            raise BundleError("label id out of range", folder / "knn.label_ids.npy")
        centroids = arrays.get("label_centroids")
        if centroids is not None and centroids.shape != (n_labels, dim):
            raise BundleError(f"centroids of shape {centroids.shape} where ({n_labels}, "
                              f"{dim}) is expected", folder / "knn.label_centroids.npy")
        index: NeighbourIndex = (
            UsearchIndex.load(folder, entry, n_docs=n_docs, dim=dim, mmap=mmap)
            if kind == KIND else
            PostingsIndex.load(folder, n_docs=n_docs, n_features=dense_start, mmap=mmap))
        return cls(index, ptr, ids, n_labels, rule, centroids)


def _sorted_csr(Y: sp.csr_matrix) -> sp.csr_matrix:
    out = sp.csr_matrix(Y)
    out.sort_indices()
    return out


def _lookup(votes: Rows, row: int, labels: np.ndarray) -> np.ndarray:
    """votes[row, labels] of CSR ``votes`` (sorted indices), 0 where the row has no vote."""
    indptr, indices, data = votes
    a, b = int(indptr[row]), int(indptr[row + 1])
    out = np.zeros(labels.shape[0])
    if b > a:
        cols = indices[a:b]
        pos = np.minimum(np.searchsorted(cols, labels), b - a - 1)
        hit = cols[pos] == labels
        out[hit] = data[a:b][pos[hit]]
    return out


class KnnPart(Protocol):
    """A bundle's kNN part as the search uses it: a :class:`KnnMatcher`, or :class:`NoKnn`
    for a bundle without one."""

    def search(self, searcher: Searcher, rows: Rows, top_k: int, beam_size: int, *,
               dense_start: int, node_mask: np.ndarray | None,
               allowed: Callable[[], np.ndarray | None], threads: int = 1) -> Found: ...

    def score_shares(self, indices: np.ndarray, values: np.ndarray, labels: list[int], *,
                     dense_start: int) -> dict[str, np.ndarray]: ...


class NoKnn:
    """No kNN part: the trees' ranking stands as it is."""

    def search(self, searcher: Searcher, rows: Rows, top_k: int, beam_size: int, *,
               dense_start: int, node_mask: np.ndarray | None,
               allowed: Callable[[], np.ndarray | None], threads: int = 1) -> Found:
        return searcher.search(*rows, top_k, beam_size, node_mask)

    def score_shares(self, indices: np.ndarray, values: np.ndarray, labels: list[int], *,
                     dense_start: int) -> dict[str, np.ndarray]:
        return {}


#: the kNN part of every bundle without one (it holds nothing)
NO_KNN = NoKnn()


def knn_search(searcher: Searcher, part: KnnPart, rows: Rows, top_k: int, beam_size: int, *,
               dense_start: int, node_mask: np.ndarray | None = None,
               allowed: Callable[[], np.ndarray | None] = lambda: None, threads: int = 1,
               profiles: ProfilePart = NO_PROFILES) -> Found:
    """The trees' search of CSR ``rows`` (sorted indices) with the kNN ``part``'s votes fused
    in (:meth:`KnnMatcher.search`), then re-ranked by the label ``profiles``
    (:mod:`models.profiles`: the trees are searched for as many labels as they re-rank).
    ``node_mask`` / ``allowed()``: a label filter compiled to nodes / labels
    (:mod:`models.filters`); the labels are only asked for by a matcher that votes."""
    found = part.search(searcher, rows, profiles.width(top_k), beam_size,
                        dense_start=dense_start, node_mask=node_mask, allowed=allowed,
                        threads=threads)
    return profiles.rerank(found, rows, top_k)
