"""``xmc eval``: accuracy of a bundle on a test set, and its prediction speed.

* ``batch_docs_per_s``: the whole test set from raw text (encoding included) in batches of 256.
* ``latency_ms_p50`` / ``latency_ms_p99``: one document at a time from raw text after warm-up.
* ``ece_raw`` (and ``ece_calibrated`` for a calibrated bundle): expected calibration error of
  the top-5 (label, score) pairs of every document, 15 equal-width bins.
* ``micro_f1``, ``micro_precision``, ``micro_recall`` at the bundle's tuned ``threshold``
  (when it has one): over the top ``top_k`` pairs scoring at least the threshold, against
  every true label of the documents.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.data import Corpus
from models.errors import InvalidInputError
from models.metrics import evaluate, expected_calibration_error, micro_prf
from models.predictor import Predictor
from models.search import ranked_names
from models.vocab import Vocabulary

BATCH_SIZE = 256


def predict_corpus(predictor: Predictor, corpus: Corpus, *, top_k: int, beam_size: int,
                   batch_size: int = BATCH_SIZE,
                   ) -> tuple[list[list[str]], list[list[float]], float]:
    """Ranked label names for every document, their raw ensemble scores, and the seconds it
    took (encoding included)."""
    out: list[list[str]] = []
    raw: list[list[float]] = []
    t0 = time.perf_counter()
    for start in range(0, corpus.n_docs, batch_size):
        stop = min(start + batch_size, corpus.n_docs)
        if corpus.is_text:
            X = predictor.encode(corpus.text_list[start:stop])
        else:
            X = corpus.feature_matrix[start:stop]
        labels, scores, counts = predictor.predict_ids(X, top_k=top_k, beam_size=beam_size)
        out.extend(ranked_names(labels, counts, predictor.label_names))
        raw.extend(row[:c] for row, c in zip(scores.tolist(), counts))
    return out, raw, time.perf_counter() - t0


def single_latencies(predictor: Predictor, corpus: Corpus, *, top_k: int, beam_size: int,
                     n_docs: int = 1000, n_warm: int = 50) -> np.ndarray:
    """Seconds per single-document call (encoding included), after ``n_warm`` warm-up calls."""
    n = min(n_docs, corpus.n_docs)
    times = np.empty(n)
    if corpus.is_text:
        docs = corpus.text_list
        for i in range(min(n_warm, n)):
            predictor.predict([docs[i]], top_k=top_k, beam_size=beam_size)
        for i in range(n):
            t0 = time.perf_counter()
            predictor.predict([docs[i]], top_k=top_k, beam_size=beam_size)
            times[i] = time.perf_counter() - t0
    else:
        X = corpus.feature_matrix
        for i in range(min(n_warm, n)):
            predictor.predict_ids(X[i], top_k=top_k, beam_size=beam_size)
        for i in range(n):
            row = X[i]
            t0 = time.perf_counter()
            predictor.predict_ids(row, top_k=top_k, beam_size=beam_size)
            times[i] = time.perf_counter() - t0
    return times


def evaluate_predictor(predictor: Predictor, corpus: Corpus, *, top_k: int | None = None,
                       beam_size: int | None = None, measure_speed: bool = True,
                       ) -> dict[str, Any]:
    """Metrics of :mod:`models.metrics` (fractions in 0..1) plus, optionally, speed.
    ``top_k`` and ``beam_size`` default to the bundle's. A test set with no document, or
    none with a label, is refused: its metrics would be zeros that mean nothing."""
    source = corpus.source or "the test set"
    if corpus.n_docs == 0:
        raise InvalidInputError(f"{source}: no document to evaluate on")
    if not any(len(doc) for doc in corpus.labels):
        raise InvalidInputError(f"{source}: no document has a label to score against")
    top_k = predictor.default_top_k if top_k is None else top_k
    beam_size = predictor.default_beam_size if beam_size is None else beam_size
    predictor.warm_up()
    preds, raw, secs = predict_corpus(predictor, corpus, top_k=max(top_k, 5),
                                      beam_size=beam_size)
    counts = dict(zip(predictor.label_names, predictor.label_counts.tolist()))
    gold = corpus.labels
    if predictor.label_info:  # built with a vocabulary: name the test labels as it did
        known = {n: i for n, i in predictor.label_info.items() if i.uri is not None}
        gold, _ = Vocabulary(known).canonicalize(gold)
    result: dict[str, Any] = evaluate(
        preds, gold, ks=(1, 3, 5), label_counts=counts,
        n_train_docs=int(predictor.manifest.get("n_train_docs", 0)) or None,
    )
    result = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}
    result.update(score_metrics(predictor, preds, raw, gold, top_k=top_k))
    result["top_k"] = top_k
    result["beam_size"] = beam_size
    if measure_speed:
        result["batch_docs_per_s"] = round(corpus.n_docs / secs, 1) if secs > 0 else None
        lat = single_latencies(predictor, corpus, top_k=top_k, beam_size=beam_size)
        result["latency_ms_p50"] = round(float(np.percentile(lat, 50)) * 1e3, 4)
        result["latency_ms_p99"] = round(float(np.percentile(lat, 99)) * 1e3, 4)
    return result


def score_metrics(predictor: Predictor, preds: list[list[str]], raw: list[list[float]],
                  truths: Sequence[list[str]], *, top_k: int) -> dict[str, float]:
    """ECE of the top-5 pairs (raw, and calibrated on a calibrated bundle) and micro-F1 /
    precision / recall of the top ``top_k`` pairs at the tuned threshold, if any; documents
    without true labels are left out, as in :func:`models.metrics.evaluate`."""
    scored = [(p, s, set(t)) for p, s, t in zip(preds, raw, truths) if t]
    out: dict[str, float] = {}

    def pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.asarray([x for _, s, _ in scored for x in s[:k]], dtype=np.float64)
        correct = np.asarray([lab in y for p, _, y in scored for lab in p[:k]], dtype=bool)
        return scores, correct

    scores, correct = pairs(5)
    out["ece_raw"] = round(expected_calibration_error(scores, correct), 6)
    if predictor.calibration is not None:
        out["ece_calibrated"] = round(expected_calibration_error(
            predictor.calibrated(scores), correct), 6)
    tuned = predictor.tuned_threshold
    if tuned is not None:
        scores, correct = pairs(top_k)
        prf = micro_prf(predictor.calibrated(scores), correct,
                        sum(len(y) for _, _, y in scored), float(tuned["value"]))
        out["threshold"] = float(tuned["value"])
        out["micro_f1"] = round(prf["micro_f1"], 6)
        out["micro_precision"] = round(prf["precision"], 6)
        out["micro_recall"] = round(prf["recall"], 6)
    return out
