"""The kNN matcher: an instance-based vote of the training documents nearest a query.

Every training document is indexed by the dense block of its feature row (the encoder's
embedding, l2-normalized; a fused row's block is ``alpha * embedding`` over a norm, the same
direction), in a usearch index over cosine similarity. A query's ``k`` nearest training
documents vote for their labels::

    knn_score(label) = sum of sim_n ** power over the neighbours n having the label
                       / sum of sim_n ** power over all k neighbours

(similarities below 0 count as 0), so a score lies in 0..1: the weighted share of the
neighbours that carry the label. The predictor fuses it with the trees' exact ensemble score,
``(1 - weight) * tree + weight * knn``, over the union of the trees' top labels and every
label a neighbour voted for (the trees' score of the latter computed exactly, see
:meth:`models.search.Searcher.label_scores`): a label outside both has no vote and a tree
score below the trees' k-th, so it could not enter the top k. ``k``, ``power`` and ``weight``
are chosen on a validation split at build (:func:`models.builder.choose_knn`).

In the bundle: ``knn.usearch`` (the index, memory-mapped with ``Index.restore(view=True)``,
never unpickled; its sha256 is checked at load) and the label lists of the indexed documents
as CSR arrays (:data:`KNN_ARRAYS`), read with :func:`models.bundle.load_npy`. Index key i is
training document i. The index is built on one thread, so the same data give the same file.
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
from models.errors import BundleError, InvalidInputError
from models.search import Searcher

#: array name -> the dtypes it may be stored in (as models.tree.ENSEMBLE_ARRAYS): the label
#: lists of the indexed training documents, CSR
KNN_ARRAYS: dict[str, tuple[type, ...]] = {
    "label_ptr": (np.int64,),  # [n_docs + 1] range of each document's labels in label_ids
    "label_ids": (np.int32,),  # [n_pairs] label ids, sorted within a document
}
INDEX_FILE = "knn.usearch"
KIND = "usearch"
#: up to this many indexed documents a query is compared with every one of them (exact),
#: above it the index's HNSW graph is walked: on cooking's 12,404 MiniLM embeddings (384
#: dimensions) 0.30 ms instead of 2.0 ms a query, recall of the exact 10 / 30 / 50 nearest
#: 0.99 / 0.98 / 0.97
EXACT_MAX_DOCS = 4096

#: (label ids, scores): one row of a ranking, best first
Ranking = tuple[np.ndarray, np.ndarray]
#: (indptr, indices, data) of CSR rows with sorted indices
Rows = tuple[np.ndarray, np.ndarray, np.ndarray]
#: what a search returns: label ids (n, top_k; -1 pads), scores (n, top_k), counts (n,)
Found = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class VoteRule:
    """How neighbours vote: the ``k`` nearest, each with weight ``sim ** power``; their votes
    enter the final score with ``weight``."""

    k: int
    power: float
    weight: float


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
    """(n, n_labels) float64 CSR of the votes of neighbours ``keys`` (n, k; -1: none) at
    similarities ``sims``: per label, the share of the neighbours' weight ``sim ** power``
    (sims below 0 count as 0) on the neighbours that carry it."""
    n, k = keys.shape
    ok = keys >= 0
    w = np.where(ok, np.maximum(sims, 0.0).astype(np.float64) ** power, 0.0)
    total = w.sum(axis=1)
    flat = keys[ok]
    starts = np.asarray(label_ptr[flat], dtype=np.int64)
    lens = np.asarray(label_ptr[flat + 1], dtype=np.int64) - starts
    # the concatenated label ranges of every (document, neighbour)
    pos = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
    rows = np.repeat(np.repeat(np.arange(n), k)[ok.ravel()], lens)
    V = sp.csr_matrix((np.repeat(w[ok], lens), (rows, np.asarray(label_ids)[pos])),
                      shape=(n, n_labels))
    V.sum_duplicates()
    scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    V.data *= np.repeat(scale, np.diff(V.indptr))
    V.eliminate_zeros()
    return V


class KnnMatcher:
    """The indexed training documents and their labels; thread-safe (usearch searches one
    at a time: its Python binding shares one search context between calls)."""

    def __init__(self, index: Index, label_ptr: np.ndarray, label_ids: np.ndarray,
                 n_labels: int, rule: VoteRule) -> None:
        self.index = index
        self.label_ptr = label_ptr
        self.label_ids = label_ids
        self.n_labels = n_labels
        self.rule = rule
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
                   rule)

    def with_rule(self, rule: VoteRule) -> KnnMatcher:
        return KnnMatcher(self.index, self.label_ptr, self.label_ids, self.n_labels, rule)

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
        """The trees' ranking ``found`` of ``rows`` with this matcher's votes fused in
        (:func:`fuse_rankings`; the query's embedding is the rows' dense block from
        ``dense_start``); ``allowed()`` gives the labels a filter lets through (None: all)."""
        if self.rule.weight == 0:
            return found
        votes = self.votes(dense_block(*rows, dense_start, self.dim), threads)
        return fuse_rankings(found, votes, partial(searcher.label_scores, *rows),
                             self.rule.weight, top_k, allowed())

    def score_shares(self, indices: np.ndarray, values: np.ndarray, labels: list[int], *,
                     dense_start: int) -> np.ndarray | None:
        """For one document (sorted feature ids and values), what the votes add to each of
        ``labels``' fused score, ``weight * vote``; None when the matcher does not vote."""
        if self.rule.weight == 0:
            return None
        ptr = np.array([0, indices.shape[0]], dtype=np.int64)
        votes = self.votes(dense_block(ptr, indices, values, dense_start, self.dim))
        return self.rule.weight * _lookup(votes, 0, np.asarray(labels, dtype=np.int64))

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the index and label arrays; returns the manifest's ``knn`` entry."""
        self.index.save(str(folder / INDEX_FILE))
        files = [INDEX_FILE]
        for name, arr in (("label_ptr", self.label_ptr), ("label_ids", self.label_ids)):
            np.save(folder / f"knn.{name}.npy", arr, allow_pickle=False)
            files.append(f"knn.{name}.npy")
        return {"kind": KIND, "files": files, "k": self.rule.k, "power": self.rule.power,
                "weight": self.rule.weight, "n_docs": self.n_docs, "dim": self.dim,
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
        arrays = {name: load_npy(folder / f"knn.{name}.npy", mmap=mmap, dtype=dtypes)
                  for name, dtypes in KNN_ARRAYS.items()}
        ptr, ids = arrays["label_ptr"], arrays["label_ids"]
        n_docs = int(entry.get("n_docs", -1))
        if (ptr.shape != (n_docs + 1,) or ptr[0] != 0 or ptr[-1] != ids.shape[0]
                or np.any(np.diff(ptr) < 0)):
            raise BundleError(f"pointers do not cover {n_docs} documents",
                              folder / "knn.label_ptr.npy")
        if ids.size and (ids.min() < 0 or ids.max() >= n_labels):
            raise BundleError("label id out of range", folder / "knn.label_ids.npy")
        index = _open_index(path, entry, n_docs, dim, view=mmap)
        rule = VoteRule(int(entry["k"]), float(entry["power"]), float(entry["weight"]))
        return cls(index, ptr, ids, n_labels, rule)


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


def fuse_rankings(tree: tuple[np.ndarray, np.ndarray, np.ndarray], votes: sp.csr_matrix,
                  tree_scores_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  weight: float, top_k: int, allowed: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``top_k`` of ``(1 - weight) * tree + weight * knn`` per row, over the trees'
    labels (``tree``: ids, scores, counts as the search returns them) and every label with a
    vote that ``allowed`` (bool per label; None: all) lets through. ``tree_scores_of(ptr,
    ids)`` gives the trees' exact scores of the voted labels the trees did not return (CSR
    per row). Returns ids, scores, counts like the search, ties to the smaller label id."""
    ids, scores, counts = tree
    n = ids.shape[0]
    extra_rows: list[np.ndarray] = []
    for d in range(n):
        voted = votes.indices[votes.indptr[d] : votes.indptr[d + 1]]
        if allowed is not None:
            voted = voted[allowed[voted]]
        extra_rows.append(np.setdiff1d(voted, ids[d, : counts[d]]).astype(np.int64))
    extra_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(r) for r in extra_rows], out=extra_ptr[1:])
    extra_ids = np.concatenate(extra_rows) if n else np.empty(0, np.int64)
    extra_scores = tree_scores_of(extra_ptr, extra_ids)
    out_ids = np.full((n, top_k), -1, dtype=np.int64)
    out_scores = np.zeros((n, top_k), dtype=np.float64)
    out_counts = np.zeros(n, dtype=np.int64)
    for d in range(n):
        lab = np.concatenate((ids[d, : counts[d]], extra_rows[d]))
        tree_s = np.concatenate((scores[d, : counts[d]],
                                 extra_scores[extra_ptr[d] : extra_ptr[d + 1]]))
        fused = (1.0 - weight) * tree_s + weight * _lookup(votes, d, lab)
        order = np.lexsort((lab, -fused))[:top_k]
        c = order.shape[0]
        out_ids[d, :c], out_scores[d, :c], out_counts[d] = lab[order], fused[order], c
    return out_ids, out_scores, out_counts


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
                     dense_start: int) -> np.ndarray | None: ...


class NoKnn:
    """No kNN part: the trees' ranking stands as it is."""

    def fuse(self, searcher: Searcher, found: Found, rows: Rows, top_k: int, *,
             dense_start: int, allowed: Callable[[], np.ndarray | None],
             threads: int = 1) -> Found:
        return found

    def score_shares(self, indices: np.ndarray, values: np.ndarray, labels: list[int], *,
                     dense_start: int) -> np.ndarray | None:
        return None


#: the kNN part of every bundle without one (it holds nothing)
NO_KNN = NoKnn()


def knn_search(searcher: Searcher, part: KnnPart, rows: Rows, top_k: int, beam_size: int, *,
               dense_start: int, node_mask: np.ndarray | None = None,
               allowed: Callable[[], np.ndarray | None] = lambda: None, threads: int = 1,
               ) -> Found:
    """The trees' search of CSR ``rows`` (sorted indices) with the kNN ``part``'s votes fused
    in (:meth:`KnnMatcher.fuse`). ``node_mask`` / ``allowed()``: a label filter compiled to
    nodes / labels (:mod:`models.filters`); the labels are only asked for by a matcher that
    votes."""
    found = searcher.search(*rows, top_k, beam_size, node_mask)
    return part.fuse(searcher, found, rows, top_k, dense_start=dense_start, allowed=allowed,
                     threads=threads)
