"""Why a label was suggested: the input terms that raised its classifiers' margins most.

A label's score is built from the margins ``z = w . x + b`` of the classifiers on its
root-to-label path in each tree (see :mod:`models.search`). Linear margins split exactly
over the document's features, so for label L and feature f::

    contribution(f) = (1 / n_trees) * sum over trees t, over nodes n on L's path in t of
                      x_f * w_{n,f}

where x_f is the document's feature value (its TF-IDF weight, l2-normalized with the rest of
the row) and w_{n,f} the stored (quantized, rescaled) weight of node n's classifier. Summed
over every feature, plus the bias term (the same average of the path's biases) and, for a
fused bundle, the dense block's part (the same average of its dot products), it gives the
mean over trees of the sum of L's path margins, exactly. A positive contribution pushed L up:
a larger margin raises every node score on the path (the post-processor is increasing), so
the term raised the score. The numbers are margin units, not score units: the score is a
product of non-linear node scores, and does not split over terms. A bundle with a kNN part
adds one entry, :data:`KNN_TERM`, whose figure is in score units: ``w * vote``, the part of
the returned score that the training documents nearest the query gave the label (the terms
explain the trees' part, ``(1 - w) * tree``); and, when its label centroids have a weight
``c``, :data:`CENTROID_TERM`: ``c * centroid``, what the label's centroid gave (then all
three parts are over ``1 + c``, see :class:`models.knn.Pool`). A bundle with label profiles
adds :data:`PROFILE_TERM`, in score units too: ``weight * cosine / (1 + weight)``, what the
cosine to the label's profile gave (see :mod:`models.profiles`).

Computed only when asked for, in plain numpy over the few paths of the returned labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from models.tree import ROW_BLOCK, Ensemble

#: the name of the dense encoder's block in an explanation
DENSE_TERM = "[dense encoder]"
#: the name of the kNN matcher's part in an explanation (see :mod:`models.knn`); unlike the
#: terms', its contribution is in score units: what the neighbours' votes add to the score
KNN_TERM = "[kNN neighbours]"
#: the name of the label centroids' part (see :mod:`models.knn`), in score units as well
CENTROID_TERM = "[label centroid]"
#: the name of the label profiles' part (see :mod:`models.profiles`), in score units as well
PROFILE_TERM = "[label profile]"


class TermContribution(TypedDict):
    """One input term's push on a label: what an explanation lists, largest first."""

    term: str
    contribution: float


@dataclass(frozen=True)
class Explanation:
    """One label's decomposition for one document (see the module for what it means)."""

    features: np.ndarray
    """feature ids of the document's sparse (TF-IDF) features, in the order of contributions"""
    contributions: np.ndarray
    """contribution of each of ``features``, largest first"""
    bias: float
    """the average over trees of the biases on the label's path"""
    dense: float | None
    """the dense block's contribution, None without a dense block"""

    def total(self) -> float:
        """The average over trees of the sum of the path margins."""
        return float(self.contributions.sum()) + self.bias + (self.dense or 0.0)

    def top(self, term_names: list[str] | None, n: int = 5) -> list[TermContribution]:
        """The ``n`` terms that pushed the label up most (positive contributions only), and
        the dense block's entry when there is one."""
        keep = self.contributions[:n] > 0
        out: list[TermContribution] = [
            {"term": term_names[f] if term_names is not None else f"feature {f}",
             "contribution": float(c)}
            for f, c in zip(self.features[:n][keep].tolist(),
                            self.contributions[:n][keep].tolist())]
        if self.dense is not None:
            out.append({"term": DENSE_TERM, "contribution": self.dense})
        return out


def explain_label(ens: Ensemble, indices: np.ndarray, values: np.ndarray,
                  label: int) -> Explanation:
    """Explanation of ``label`` for one document given as its sorted feature ids and values."""
    return explain_labels(ens, indices, values, [label])[0]


def explain_labels(ens: Ensemble, indices: np.ndarray, values: np.ndarray,
                   labels: list[int]) -> list[Explanation]:
    """Explanations of several labels for one document; their paths share the work on
    common ancestors (every label's path starts at the same roots)."""
    start = int(ens.dense_start[0])
    sparse = indices < start
    feats = np.asarray(indices[sparse], dtype=np.int64)
    vals = np.asarray(values[sparse], dtype=np.float64)
    dim = _dense_dim(ens)
    x_dense = None
    if dim:
        x_dense = np.zeros(dim)
        x_dense[np.asarray(indices[~sparse], dtype=np.int64) - start] = values[~sparse]
    chunks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    out = []
    for label in labels:
        contrib = np.zeros(feats.shape[0])
        bias = 0.0
        dense = 0.0
        for t in range(ens.n_trees):
            node = int(ens.label_node[t, label])
            while int(ens.parent[node]) >= 0:
                p = int(ens.parent[node])
                j = node - int(ens.child_ptr[p])
                if p not in chunks:
                    chunks[p] = _chunk_entries(ens, p, feats)
                pos, child, weight = chunks[p]
                mine = child == j
                # at most one entry per (row, child): a plain scatter adds each weight once
                contrib[pos[mine]] += vals[pos[mine]] * weight[mine] * float(
                    ens.weight_scale[node])
                bias += float(ens.bias[node])
                d0, d1 = int(ens.dense_ptr[p]), int(ens.dense_ptr[p + 1])
                if d1 > d0 and x_dense is not None:
                    w = np.asarray(ens.dense_val[d0 + j * dim : d0 + (j + 1) * dim],
                                   np.float64)
                    dense += float(w @ x_dense)
                node = p
        order = np.argsort(-contrib, kind="stable")
        n = ens.n_trees
        out.append(Explanation(feats[order], contrib[order] / n, bias / n,
                               None if x_dense is None else dense / n))
    return out


def _dense_dim(ens: Ensemble) -> int:
    """Width of the dense block, from the first chunk that has one (0 when none does)."""
    if not ens.dense_val.shape[0]:
        return 0
    lens = np.diff(np.asarray(ens.dense_ptr))
    widths = np.diff(np.asarray(ens.child_ptr))
    k = np.flatnonzero(lens)
    return int(lens[k[0]] // widths[k[0]]) if k.size else 0


def _chunk_entries(ens: Ensemble, p: int, feats: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries of ``p``'s chunk in the rows of the document's features: for each, the
    position of its feature in ``feats``, its child (within p) and its stored weight."""
    r0, r1 = int(ens.chunk_ptr[p]), int(ens.chunk_ptr[p + 1])
    if r1 == r0 or not feats.size:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    chunk = np.asarray(ens.chunk_feat[r0:r1])
    # the needles in the chunk's dtype: otherwise numpy casts the whole chunk, a copy of
    # up to every feature for the roots' chunks
    pos = np.minimum(np.searchsorted(chunk, feats.astype(chunk.dtype)), r1 - r0 - 1)
    which = np.flatnonzero(chunk[pos] == feats)
    rows = r0 + pos[which]
    row_len = np.asarray(ens.row_len)
    lens = row_len[rows].astype(np.int64)
    first = _row_starts_at(row_len, np.asarray(ens.row_mark), rows)
    owner = np.repeat(np.arange(rows.shape[0]), lens)
    entry = np.repeat(first - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
    return (which[owner], np.asarray(ens.entry_child)[entry].astype(np.int64),
            np.asarray(ens.entry_val)[entry].astype(np.float64))


def _row_starts_at(row_len: np.ndarray, row_mark: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """First entry of each of ``rows``: its block's mark plus the counts of the rows before
    it in the block (at most ROW_BLOCK - 1 of them)."""
    block = rows // ROW_BLOCK
    span = block[:, None] * ROW_BLOCK + np.arange(ROW_BLOCK)
    before = span < rows[:, None]
    counts = row_len[np.minimum(span, row_len.shape[0] - 1)].astype(np.int64)
    return row_mark[block] + (counts * before).sum(axis=1)
