"""Metrics on examples worked out by hand."""

from __future__ import annotations

import math

import pytest

from models.errors import InvalidInputError
from models.metrics import evaluate, propensity

PREDS = [["a", "b", "c"], ["x", "y", "z"], ["b", "a", "q"], ["a"]]
TRUTHS = [["a", "c"], ["y"], [], ["d"]]


def test_precision_ndcg_recall_coverage_by_hand():
    m = evaluate(PREDS, TRUTHS, ks=(1, 3, 5))
    # doc 1 hits at ranks 1 and 3 (2 true labels), doc 2 at rank 2, doc 4 misses;
    # doc 3 has no labels: left out and counted
    assert m["n_docs"] == 3 and m["n_docs_without_labels"] == 1
    assert m["P@1"] == pytest.approx(1 / 3)
    assert m["P@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert m["P@5"] == pytest.approx((2 / 5 + 1 / 5 + 0) / 3)  # fewer predictions than k
    # nDCG@3 doc 1: (1 + 1/log2(4)) / (1 + 1/log2(3)); doc 2: (1/log2(3)) / 1
    assert m["nDCG@3"] == pytest.approx((1.5 / 1.6309297535714575 + 0.6309297535714575) / 3)
    assert m["nDCG@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["coverage"] == pytest.approx(3 / 4)  # a, c, y found; d never
    assert "PSP@1" not in m  # no training frequencies given


def test_ndcg_with_fewer_true_labels_than_k_reaches_one():
    m = evaluate([["a", "x", "y"]], [["a"]], ks=(3,))
    assert m["nDCG@3"] == pytest.approx(1.0)
    assert m["P@3"] == pytest.approx(1 / 3)


def test_propensity_of_a_singleton_label_is_one_over_log_n():
    # with N_l = 1, exp(-A log(1 + B)) = (B + 1)^-A cancels C's factor: 1/p = ln N
    assert 1 / propensity(1, 100) == pytest.approx(math.log(100))


def test_psp_by_hand():
    counts = {"a": 50, "c": 1, "y": 10}  # d unseen in training: N_l = 0
    m = evaluate(PREDS, TRUTHS, ks=(1,), label_counts=counts, n_train_docs=100)
    inv = {lab: 1 / propensity(n, 100) for lab, n in {**counts, "d": 0}.items()}
    assert inv["a"] == pytest.approx(1.682808312673165)
    assert inv["d"] == pytest.approx(5.774661450557821)
    # numerator: only doc 1's top label (a) is a hit; denominator: each doc's best label
    expected = inv["a"] / (max(inv["a"], inv["c"]) + inv["y"] + inv["d"])
    assert m["PSP@1"] == pytest.approx(expected)
    assert m["PSP@1"] == pytest.approx(0.13007452122204666)


def test_perfect_predictions_score_one_everywhere():
    truths = [["a", "b"], ["c"]]
    # b is rarer than a, so ranking it first is also the best achievable PSP
    m = evaluate([["b", "a"], ["c"]], truths, ks=(1,), label_counts={"a": 3, "b": 1, "c": 2},
                 n_train_docs=10)
    assert m["P@1"] == m["nDCG@1"] == m["PSP@1"] == m["recall@5"] == m["coverage"] == 1.0


def test_length_mismatch_is_refused():
    with pytest.raises(InvalidInputError):
        evaluate([["a"]], [["a"], ["b"]])
