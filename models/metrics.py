"""Ranking metrics of the XMC literature, on label names.

Definitions (as in pyxclib and the Extreme Classification Repository):

* ``P@k``      hits among the top k / k
* ``nDCG@k``   DCG@k / ideal DCG over min(k, |y|) true labels, DCG = sum rel_i / log2(i + 1)
* ``PSP@k``    propensity-scored precision with the propensities of Jain et al. (2016),
               A=0.55, B=1.5, N = training documents, label frequencies from training;
               normalized by the best achievable PSP@k (ratio of the sums over documents,
               as pyxclib does), so it lies in 0..1
* ``recall@k`` hits among the top k / |y|
* ``coverage`` share of the test set's distinct true labels predicted correctly at least
               once in the top ``coverage_k``

Labels unseen in training stay in the truth set (they can only be missed); documents with no
true labels are left out of every average and counted in ``n_docs_without_labels``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from models.errors import InvalidInputError

PROPENSITY_A = 0.55
PROPENSITY_B = 1.5


def propensity(label_count: float, n_train_docs: int, a: float = PROPENSITY_A,
               b: float = PROPENSITY_B) -> float:
    """Jain et al. (2016): p = 1 / (1 + C * exp(-A * log(N_l + B))), C = (log N - 1)(B + 1)^A."""
    c = (math.log(n_train_docs) - 1.0) * (b + 1.0) ** a
    return 1.0 / (1.0 + c * math.exp(-a * math.log(label_count + b)))


def evaluate(
    predictions: Sequence[Sequence[str]],
    truths: Sequence[Sequence[str]],
    *,
    ks: Sequence[int] = (1, 3, 5),
    label_counts: Mapping[str, int] | None = None,
    n_train_docs: int | None = None,
    recall_k: int = 5,
    coverage_k: int = 5,
) -> dict[str, float]:
    """Score ranked predictions (best first) against true label sets.

    ``label_counts`` (training frequency of each label) and ``n_train_docs`` enable PSP@k;
    without them PSP is omitted.
    """
    if len(predictions) != len(truths):
        raise InvalidInputError(f"{len(predictions)} predictions for {len(truths)} documents")
    ks = sorted(set(ks))
    with_psp = label_counts is not None and n_train_docs is not None and n_train_docs > 1
    counts: Mapping[str, int] = label_counts or {}
    n_docs = n_train_docs or 0
    inv_prop_cache: dict[str, float] = {}

    def inv_prop(label: str) -> float:
        v = inv_prop_cache.get(label)
        if v is None:
            v = 1.0 / propensity(counts.get(label, 0), n_docs)
            inv_prop_cache[label] = v
        return v

    max_k = max([*ks, recall_k, coverage_k])
    discounts = 1.0 / np.log2(np.arange(2, max_k + 2))
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("P", "nDCG")}
    psp_num = dict.fromkeys(ks, 0.0)
    psp_den = dict.fromkeys(ks, 0.0)
    recall_sum = 0.0
    n_scored = 0
    n_empty = 0
    true_labels_seen: set[str] = set()
    covered: set[str] = set()
    for pred, truth in zip(predictions, truths):
        y = set(truth)
        if not y:
            n_empty += 1
            continue
        n_scored += 1
        true_labels_seen |= y
        pred = list(pred)[:max_k]
        rel = np.array([1.0 if p in y else 0.0 for p in pred] + [0.0] * (max_k - len(pred)))
        for k in ks:
            hits = rel[:k].sum()
            sums[f"P@{k}"] += hits / k
            ideal = discounts[: min(k, len(y))].sum()
            sums[f"nDCG@{k}"] += float((rel[:k] * discounts[:k]).sum() / ideal)
            if with_psp:
                psp_num[k] += sum(inv_prop(p) for p in pred[:k] if p in y) / k
                best = sorted((inv_prop(t) for t in y), reverse=True)[:k]
                psp_den[k] += sum(best) / k
        recall_sum += rel[:recall_k].sum() / len(y)
        covered.update(p for p in pred[:coverage_k] if p in y)
    out: dict[str, float] = {}
    for k in ks:
        out[f"P@{k}"] = sums[f"P@{k}"] / n_scored if n_scored else 0.0
    for k in ks:
        out[f"nDCG@{k}"] = sums[f"nDCG@{k}"] / n_scored if n_scored else 0.0
    if with_psp:
        for k in ks:
            out[f"PSP@{k}"] = psp_num[k] / psp_den[k] if psp_den[k] else 0.0
    out[f"recall@{recall_k}"] = recall_sum / n_scored if n_scored else 0.0
    out["coverage"] = len(covered) / len(true_labels_seen) if true_labels_seen else 0.0
    out["n_docs"] = n_scored
    out["n_docs_without_labels"] = n_empty
    return out


def micro_prf(scores: np.ndarray, correct: np.ndarray, n_true: int,
              threshold: float) -> dict[str, float]:
    """Micro precision, recall and F1 of the (label, score) pairs scoring >= ``threshold``:
    ``correct`` says which pairs are true labels, ``n_true`` counts every true label of the
    documents (found or not)."""
    kept = scores >= threshold
    tp = float(np.count_nonzero(correct & kept))
    n_pred = float(np.count_nonzero(kept))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else 0.0
    return {"micro_f1": f1, "precision": precision, "recall": recall}


def best_threshold(scores: np.ndarray, correct: np.ndarray, n_true: int) -> float:
    """The global score threshold maximizing micro-F1 over the pairs (see :func:`micro_prf`):
    midway between the lowest score kept and the next lower one (0 when every pair is kept),
    the higher threshold on a tie; above every score (nothing kept) when no pair is right."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if not scores.size or not correct.any():
        return float(np.nextafter(scores.max(), np.inf)) if scores.size else 1.0
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    # the cut may fall only between distinct scores: the last pair of each run of ties
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    tp = np.cumsum(c)[last]
    f1 = 2 * tp / (last + 1 + n_true)
    best = int(np.argmax(f1))  # the first maximum: the fewest pairs kept, the higher cut
    i = last[best]
    return float((s[i] + s[i + 1]) / 2) if i + 1 < s.size else 0.0


def expected_calibration_error(scores: np.ndarray, correct: np.ndarray,
                               n_bins: int = 15) -> float:
    """ECE of scores read as probabilities that their label is right: pairs binned into
    ``n_bins`` equal-width bins over [0, 1], the mean |accuracy - mean score| of the bins
    weighted by their share of the pairs (Guo et al. 2017)."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if not scores.size:
        return 0.0
    bins = np.minimum((np.clip(scores, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, scores, n_bins))
    return float(gap.sum() / count.sum())
