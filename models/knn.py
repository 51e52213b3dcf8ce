"""The kNN matcher: an instance-based vote of the training documents nearest a query, and the
label centroids of those documents' embeddings.

Every training document is indexed by the dense block of its feature row (the encoder's
embedding, l2-normalized; a fused row's block is ``alpha * embedding`` over a norm, the same
direction), in a usearch index over cosine similarity. A query's ``k`` nearest training
documents vote for their labels::

    knn_score(label) = sum of sim_n ** power over the neighbours n having the label
                       / sum of sim_n ** power over all k neighbours

(similarities below 0 count as 0), so a score lies in 0..1: the weighted share of the
neighbours that carry the label. A label's centroid is the l2-normalized sum of its training
documents' unit embeddings; ``centroid_score(label) = max(0, cos(query, centroid))``. Where
the votes speak for the labels of a few near documents, the centroid speaks for all of a
label's documents, which lifts the labels the trees rank too low for their few examples.

The predictor scores a pool of candidates, the trees' top labels and every label a neighbour
voted for (the trees' score of the latter computed exactly, see
:meth:`models.search.Searcher.label_scores`), each by::

    ((1 - weight) * tree + weight * knn + centroid_weight * centroid) / (1 + centroid_weight)

(the division keeps scores in 0..1, as thresholds and calibration expect, and changes no
order). A label outside the pool has no vote and a tree score below the trees' k-th, so with
``centroid_weight`` 0 it could not enter the top k; the centroids re-rank the pool and do not
widen it (a search of every centroid would cost a product with the whole label matrix per
query). ``k``, ``power``, ``weight`` and ``centroid_weight`` are chosen on a validation split
at build (:func:`models.builder.choose_knn`).

In the bundle: ``knn.usearch`` (the index, memory-mapped with ``Index.restore(view=True)``,
never unpickled; its sha256 is checked at load), the label lists of the indexed documents as
CSR arrays and, when ``centroid_weight`` is above 0, the centroids (:data:`KNN_ARRAYS`), read
with :func:`models.bundle.load_npy`. Index key i is training document i. The index is built
on one thread, so the same data give the same file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# onnxruntime first: imported after usearch, onnxruntime's import crashes the process
# (segfault; usearch 2.26 with onnxruntime 1.32), and a bundle with a dense encoder needs both
import onnxruntime  # noqa: F401
import scipy.sparse as sp
from usearch.index import BatchMatches, Index

from models.bundle import load_npy, sha256_file, verify_files
from models.data import row_pointers
from models.dense import unit_rows
from models.errors import BundleError, InvalidInputError
from models.explain import CENTROID_TERM, KNN_TERM
from models.profiles import NO_PROFILES, ProfilePart
from models.search import Found, Rows, Searcher

#: array name -> the dtypes it may be stored in (as models.tree.ENSEMBLE_ARRAYS): the label
#: lists of the indexed training documents, CSR
KNN_ARRAYS: dict[str, tuple[type, ...]] = {
    "label_ptr": (np.int64,),  # [n_docs + 1] range of each document's labels in label_ids
    "label_ids": (np.int32,),  # [n_pairs] label ids, sorted within a document
    # [n_labels, dim] unit centroids (zero: a label without documents); only with a
    # centroid_weight above 0
    "label_centroids": (np.float32,),
}
#: the arrays every kNN part has; the others only when its rule gives them a weight
KNN_REQUIRED = ("label_ptr", "label_ids")
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
    enter the final score with ``weight``, the labels' centroids with ``centroid_weight``."""

    k: int
    power: float
    weight: float
    centroid_weight: float = 0.0

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


def vote(keys: np.ndarray, sims: np.ndarray, label_ptr: np.ndarray, label_ids: np.ndarray,
         n_labels: int, power: float) -> sp.csr_matrix:
    """(n, n_labels) float64 CSR (sorted indices) of the votes of neighbours ``keys`` (n, k;
    -1: none) at similarities ``sims``: per label, the share of the neighbours' weight
    ``sim ** power`` (sims below 0 count as 0) on the neighbours that carry it."""
    n, k = keys.shape
    w = np.where(keys >= 0, np.maximum(sims, 0.0).astype(np.float64) ** power, 0.0)
    total = w.sum(axis=1)
    ok = w > 0  # a neighbour of weight 0 gives no label a vote
    flat = keys[ok]
    starts = np.asarray(label_ptr[flat], dtype=np.int64)
    lens = np.asarray(label_ptr[flat + 1], dtype=np.int64) - starts
    # the concatenated label ranges of every (document, neighbour)
    pos = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
    rows = np.repeat(np.repeat(np.arange(n), k)[ok.ravel()], lens)
    # one (row, label) key a vote, summed per key in key order: CSR with sorted indices,
    # built without scipy's generic conversion (a third of a request's kNN time)
    cell = rows * n_labels + np.asarray(label_ids, dtype=np.int64)[pos]
    order = np.argsort(cell, kind="stable")
    cell = cell[order]
    first = np.flatnonzero(np.diff(cell, prepend=-1))
    weights = np.repeat(w[ok], lens)[order]
    data = np.add.reduceat(weights, first) if first.size else weights
    row_of = cell[first] // n_labels
    data /= total[row_of]
    return sp.csr_matrix((data, (cell[first] % n_labels).astype(np.int32),
                          row_pointers(row_of, n)), shape=(n, n_labels))


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
        fused = (1.0 - weight) * self.tree + weight * self.votes
        if centroid_weight:
            fused = (fused + centroid_weight * self.centroid) / (1.0 + centroid_weight)
        row = np.repeat(np.arange(n), np.diff(self.ptr))
        # sorted by row first, each row's candidates stay where the pointers say
        order = np.lexsort((self.ids, -fused, row))
        rank = np.arange(order.shape[0]) - self.ptr[row]
        kept = rank < top_k
        out_ids = np.full((n, top_k), -1, dtype=np.int64)
        out_scores = np.zeros((n, top_k), dtype=np.float64)
        out_ids[row[kept], rank[kept]] = self.ids[order[kept]]
        out_scores[row[kept], rank[kept]] = fused[order[kept]]
        return out_ids, out_scores, np.minimum(np.diff(self.ptr), top_k)


def candidate_pool(tree: Found, votes: sp.csr_matrix, tree_scores_of: CandidateScores,
                   centroid_scores_of: CandidateScores | None = None,
                   allowed: np.ndarray | None = None) -> Pool:
    """The pool of each row: the trees' labels (``tree``: ids, scores, counts as the search
    returns them) and every label with a vote that ``allowed`` (bool per label; None: all)
    lets through. ``tree_scores_of(ptr, ids)`` gives the trees' exact scores of the voted
    labels the trees did not return, ``centroid_scores_of(ptr, ids)`` the centroid scores
    of the whole pool (None: zeros), both CSR per row."""
    ids, scores, counts = tree
    n, n_labels = ids.shape[0], votes.shape[1]
    found = np.arange(ids.shape[1])[None, :] < counts[:, None]
    found_cell = np.repeat(np.arange(n), counts) * n_labels + ids[found]
    # CSR with sorted indices: the cells of the votes ascend
    voted_cell = np.repeat(np.arange(n), np.diff(votes.indptr)) * n_labels + votes.indices
    vote_of = votes.data
    if allowed is not None:
        keep = allowed[votes.indices]
        voted_cell, vote_of = voted_cell[keep], vote_of[keep]
    extra = voted_cell[~np.isin(voted_cell, found_cell)]  # ascending, as the kernel reads
    cell = np.concatenate((found_cell, extra))
    tree_score = np.concatenate((scores[found], tree_scores_of(
        row_pointers(extra // n_labels, n), extra % n_labels)))
    order = np.argsort(cell)
    cell, tree_score = cell[order], tree_score[order]
    ptr = row_pointers(cell // n_labels, n)
    at = np.minimum(np.searchsorted(voted_cell, cell), max(voted_cell.shape[0] - 1, 0))
    pool_votes = (np.where(voted_cell[at] == cell, vote_of[at], 0.0) if voted_cell.size
                  else np.zeros(cell.shape[0]))
    pool_ids = cell % n_labels
    centroid = (centroid_scores_of(ptr, pool_ids) if centroid_scores_of is not None
                else np.zeros(pool_ids.shape[0]))
    return Pool(ptr, pool_ids, tree_score.astype(np.float64), pool_votes, centroid)


class KnnMatcher:
    """The indexed training documents, their labels and the labels' centroids (None: a
    bundle's matcher whose rule gives them no weight); thread-safe (usearch searches one at
    a time: its Python binding shares one search context between calls)."""

    def __init__(self, index: Index, label_ptr: np.ndarray, label_ids: np.ndarray,
                 n_labels: int, rule: VoteRule, centroids: np.ndarray | None = None) -> None:
        if rule.centroid_weight > 0 and centroids is None:
            raise InvalidInputError("a centroid weight needs the labels' centroids")
        self.index = index
        self.label_ptr = label_ptr
        self.label_ids = label_ids
        self.n_labels = n_labels
        self.rule = rule
        self.centroids = centroids
        self.n_docs = label_ptr.shape[0] - 1
        self.dim = int(index.ndim)
        self.exact = self.n_docs <= EXACT_MAX_DOCS
        self._lock = threading.Lock()

    @classmethod
    def build(cls, emb: np.ndarray, Y: sp.csr_matrix, rule: VoteRule) -> KnnMatcher:
        """Index the rows of ``emb`` (n_docs, dim; any norm) with the labels of ``Y``
        (n_docs, n_labels)."""
        if emb.ndim != 2 or emb.shape[0] != Y.shape[0] or emb.shape[0] == 0:
            raise InvalidInputError(
                f"kNN: {emb.shape[0]} embeddings for {Y.shape[0]} labelled documents")
        index = Index(ndim=int(emb.shape[1]), metric="cos", dtype="f32")
        # one thread: a multi-threaded insert gives another graph at every build
        index.add(np.arange(emb.shape[0], dtype=np.uint64),
                  np.ascontiguousarray(emb, dtype=np.float32), threads=1)
        Y = sp.csr_matrix(Y)
        Y.sort_indices()
        return cls(index, Y.indptr.astype(np.int64), Y.indices.astype(np.int32), Y.shape[1],
                   rule, label_centroids(emb, Y))

    def with_rule(self, rule: VoteRule) -> KnnMatcher:
        return KnnMatcher(self.index, self.label_ptr, self.label_ids, self.n_labels, rule,
                          self.centroids)

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

    def votes(self, emb: np.ndarray, threads: int = 1) -> sp.csr_matrix:
        """(n, n_labels) kNN scores of the rows of ``emb`` under this matcher's rule."""
        keys, sims = self.neighbours(emb, self.rule.k, threads)
        return vote(keys, sims, self.label_ptr, self.label_ids, self.n_labels,
                    self.rule.power)

    def fuse(self, searcher: Searcher, found: Found, rows: Rows, top_k: int, *,
             dense_start: int, allowed: Callable[[], np.ndarray | None],
             threads: int = 1) -> Found:
        """The trees' ranking ``found`` of ``rows`` re-ranked over the pool of candidates with
        this matcher's votes and centroids (:class:`Pool`; the query's embedding is the rows'
        dense block from ``dense_start``); ``allowed()`` gives the labels a filter lets
        through (None: all)."""
        if not self.rule.scores:
            return found
        block = dense_block(*rows, dense_start, self.dim)
        pool = candidate_pool(found, self.votes(block, threads),
                              partial(searcher.label_scores, *rows),
                              self.centroid_scores_of(block), allowed())
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
        block = dense_block(ptr, indices, values, dense_start, self.dim)
        ids = np.asarray(labels, dtype=np.int64)
        scale = 1.0 / (1.0 + self.rule.centroid_weight)
        shares = {}
        if self.rule.weight > 0:
            shares[KNN_TERM] = scale * self.rule.weight * _lookup(self.votes(block), 0, ids)
        cents = self.centroid_scores_of(block)
        if cents is not None:
            shares[CENTROID_TERM] = scale * self.rule.centroid_weight * cents(
                np.array([0, ids.shape[0]], dtype=np.int64), ids)
        return shares

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the index and label arrays; returns the manifest's ``knn`` entry."""
        self.index.save(str(folder / INDEX_FILE))
        files = [INDEX_FILE]
        arrays = {"label_ptr": self.label_ptr, "label_ids": self.label_ids}
        if self.rule.centroid_weight > 0:
            assert self.centroids is not None  # __init__ refuses a weight without them
            arrays["label_centroids"] = self.centroids
        for name, arr in arrays.items():
            np.save(folder / f"knn.{name}.npy", arr, allow_pickle=False)
            files.append(f"knn.{name}.npy")
        return {"kind": KIND, "files": files, "k": self.rule.k, "power": self.rule.power,
                "weight": self.rule.weight, "centroid_weight": self.rule.centroid_weight,
                "n_docs": self.n_docs, "dim": self.dim,
                "metric": "cos", "dtype": "f32", "search": "exact" if self.exact else "hnsw",
                "sha256": {INDEX_FILE: sha256_file(folder / INDEX_FILE)},
                "bytes": sum((folder / f).stat().st_size for f in files)}

    @classmethod
    def load(cls, folder: Path, entry: dict[str, Any], *, n_labels: int, dim: int,
             mmap: bool = True) -> KnnMatcher:
        """The matcher of a manifest ``knn`` entry (from :meth:`save`); every failure a
        :class:`BundleError` naming the file."""
        path = folder / INDEX_FILE
        if entry.get("kind") != KIND:
            raise BundleError(f"kNN kind is {entry.get('kind')!r}, expected {KIND!r}",
                              folder / "manifest.json")
        rule = VoteRule(int(entry["k"]), float(entry["power"]), float(entry["weight"]),
                        float(entry.get("centroid_weight", 0.0)))
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
        index = _open_index(path, entry, n_docs, dim, view=mmap)
        return cls(index, ptr, ids, n_labels, rule, centroids)


def _open_index(path: Path, entry: dict[str, Any], n_docs: int, dim: int, *,
                view: bool) -> Index:
    verify_files(path.parent, [path.name], entry, "kNN index")
    try:
        meta = Index.metadata(str(path))
        index = Index.restore(str(path), view=view)
    except Exception as exc:  # usearch raises RuntimeError / ValueError of its own
        raise BundleError(f"unreadable kNN index ({exc})", path) from None
    if index is None or meta is None:
        raise BundleError("not a usearch index", path)
    if int(index.ndim) != dim or int(index.size) != n_docs or str(
            index.metric_kind).split(".")[-1].lower() != "cos":
        raise BundleError(f"index of {index.size} x {index.ndim} ({index.metric_kind}) where "
                          f"{n_docs} x {dim} (cos) is expected", path)
    return index


def _lookup(votes: sp.csr_matrix, row: int, labels: np.ndarray) -> np.ndarray:
    """votes[row, labels], 0 where the row has no vote (its indices are sorted)."""
    a, b = int(votes.indptr[row]), int(votes.indptr[row + 1])
    out = np.zeros(labels.shape[0])
    if b > a:
        cols = votes.indices[a:b]
        pos = np.minimum(np.searchsorted(cols, labels), b - a - 1)
        hit = cols[pos] == labels
        out[hit] = votes.data[a:b][pos[hit]]
    return out


class KnnPart(Protocol):
    """A bundle's kNN part as the search uses it: a :class:`KnnMatcher`, or :class:`NoKnn`
    for a bundle without one."""

    def fuse(self, searcher: Searcher, found: Found, rows: Rows, top_k: int, *,
             dense_start: int, allowed: Callable[[], np.ndarray | None],
             threads: int = 1) -> Found: ...

    def score_shares(self, indices: np.ndarray, values: np.ndarray, labels: list[int], *,
                     dense_start: int) -> dict[str, np.ndarray]: ...


class NoKnn:
    """No kNN part: the trees' ranking stands as it is."""

    def fuse(self, searcher: Searcher, found: Found, rows: Rows, top_k: int, *,
             dense_start: int, allowed: Callable[[], np.ndarray | None],
             threads: int = 1) -> Found:
        return found

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
    in (:meth:`KnnMatcher.fuse`), then re-ranked by the label ``profiles``
    (:mod:`models.profiles`: the trees are searched for as many labels as they re-rank).
    ``node_mask`` / ``allowed()``: a label filter compiled to nodes / labels
    (:mod:`models.filters`); the labels are only asked for by a matcher that votes."""
    width = profiles.width(top_k)
    found = searcher.search(*rows, width, beam_size, node_mask)
    found = part.fuse(searcher, found, rows, width, dense_start=dense_start, allowed=allowed,
                      threads=threads)
    return profiles.rerank(found, rows, top_k)
