"""Thresholds tuned at build, calibrated scores, and the metrics behind them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import models
from models.builder import build
from models.calibration import Calibration
from models.data import validation_rows
from models.errors import BundleError, InvalidInputError
from models.evaluate import evaluate_predictor
from models.metrics import best_threshold, expected_calibration_error, micro_prf
from tests.conftest import tiny_params
from xmc.cli import main


def brute_best_f1(scores: np.ndarray, correct: np.ndarray, n_true: int) -> float:
    """Max micro-F1 over every cut: keep the pairs scoring >= s, for each s (or none)."""
    best = 0.0
    for s in np.unique(scores):
        kept = scores >= s
        tp = np.count_nonzero(kept & correct)
        best = max(best, 2 * tp / (kept.sum() + n_true))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_reaches_the_best_f1(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = np.round(rng.random(n), 2)  # rounded: many ties
    correct = rng.random(n) < scores  # higher scores are right more often
    n_true = int(correct.sum()) + int(rng.integers(0, 50))  # some true labels never found
    value = best_threshold(scores, correct, n_true)
    got = micro_prf(scores, correct, n_true, value)
    assert got["micro_f1"] == pytest.approx(brute_best_f1(scores, correct, n_true))
    kept = scores >= value
    assert got["precision"] == pytest.approx(correct[kept].mean())
    assert got["recall"] == pytest.approx(correct[kept].sum() / n_true)
    # the cut lies strictly between a kept score and the next lower one
    assert not np.any(scores == value)


def test_best_threshold_edges():
    assert best_threshold(np.array([0.9, 0.2]), np.array([True, True]), 2) == 0.0
    none_right = best_threshold(np.array([0.9, 0.2]), np.array([False, False]), 3)
    assert none_right > 0.9
    assert micro_prf(np.array([0.9, 0.2]), np.array([False, False]), 3,
                     none_right)["micro_f1"] == 0.0


def test_ece_by_hand():
    scores = np.array([0.05, 0.06, 0.5, 0.52, 0.99, 1.0])
    correct = np.array([0, 1, 1, 1, 1, 1], dtype=bool)
    bins: dict[int, list[int]] = {}
    for i, s in enumerate(scores):
        bins.setdefault(min(int(s * 15), 14), []).append(i)
    want = sum(len(ix) / len(scores) * abs(correct[ix].mean() - scores[ix].mean())
               for ix in map(np.array, bins.values()))
    assert expected_calibration_error(scores, correct) == pytest.approx(want)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([True, False])) == 0.0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_corpus):
    train, _ = tiny_corpus
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    return models.load_bundle(str(build(train, out, tiny_params(tune_threshold=True,
                                                                  calibrate=True))))


@pytest.fixture(scope="module")
def tuned_raw(tmp_path_factory, tiny_corpus):
    """Threshold tuned on raw scores (no calibration)."""
    train, _ = tiny_corpus
    out = tmp_path_factory.mktemp("tuned") / "raw"
    return models.load_bundle(str(build(train, out, tiny_params(tune_threshold=True))))


def held_out_pairs(tmp_path, train, calibration=None):
    """The held-out predictions rebuilt by hand: a plain bundle built on the fit rows,
    asked for the validation rows; (scores, correct, n_true)."""
    params = tiny_params()
    fit_rows, valid_rows = validation_rows(train.n_docs, params.validation_share, params.seed)
    fit_bundle = models.load_bundle(str(build(train.subset(fit_rows), tmp_path / "fit",
                                              params)))
    valid = train.subset(valid_rows)
    rows = fit_bundle.predict(valid.texts, top_k=params.top_k, beam_size=params.beam_size)
    scores = np.array([s for row in rows for _, s in row])
    correct = np.array([lab in set(t) for row, t in zip(rows, valid.labels)
                        for lab, _ in row])
    return scores, correct, sum(len(set(t)) for t in valid.labels), len(valid_rows)


def test_tuned_threshold_is_the_best_on_held_out_predictions(tuned, tuned_raw, tmp_path,
                                                             tiny_corpus):
    train, _ = tiny_corpus
    scores, correct, n_true, n_valid = held_out_pairs(tmp_path, train)
    th = tuned_raw.tuned_threshold
    assert th["scale"] == "raw" and th["n_validation_docs"] == n_valid
    assert th["micro_f1"] == pytest.approx(brute_best_f1(scores, correct, n_true), abs=1e-6)
    at = micro_prf(scores, correct, n_true, th["value"])
    assert th["precision"] == pytest.approx(at["precision"], abs=1e-6)
    assert th["recall"] == pytest.approx(at["recall"], abs=1e-6)
    # calibrated bundle: the threshold is tuned on the calibrated scale
    cal = tuned.calibration
    th = tuned.tuned_threshold
    assert th["scale"] == "calibrated"
    assert th["micro_f1"] == pytest.approx(brute_best_f1(cal.apply(scores), correct, n_true),
                                           abs=1e-6)
    record = tuned.manifest["calibration"]
    assert record["n_pairs"] == scores.size and record["n_validation_docs"] == n_valid
    # the knots are the isotonic fit of those pairs: on them, no monotone map does better
    # in squared error than the calibration (checked against the identity and a shift)
    sq = lambda f: float(np.mean((f - correct) ** 2))  # noqa: E731
    fitted = sq(cal.apply(scores))
    assert fitted <= sq(scores) and fitted <= sq(np.clip(scores + 0.1, 0, 1))


def test_final_model_is_trained_on_all_of_train(tuned, tiny_predictor):
    for name, arr in tiny_predictor.ensemble.arrays().items():
        assert np.array_equal(arr, tuned.ensemble.arrays()[name]), name
    assert tuned.version != tiny_predictor.version  # the calibration is part of the model


def test_threshold_and_min_score(tuned_raw, tiny_corpus):
    _, test = tiny_corpus
    texts = test.texts[:40]
    value = tuned_raw.tuned_threshold["value"]
    plain = tuned_raw.predict(texts, top_k=5)
    auto = tuned_raw.predict(texts, top_k=5, threshold="auto")
    assert auto == [[(lab, s) for lab, s in row if s >= value] for row in plain]
    assert 0 < sum(map(len, auto)) < sum(map(len, plain))  # it really cuts, not always
    # with both, the larger applies; top_k always caps
    for threshold, min_score in ((0.2, 0.5), (0.5, 0.2), ("auto", 0.0), ("auto", 0.99)):
        cut = max(value if threshold == "auto" else threshold, min_score)
        got = tuned_raw.predict(texts, top_k=5, threshold=threshold, min_score=min_score)
        assert got == [[(lab, s) for lab, s in row if s >= cut] for row in plain]
    # a threshold of 0 cuts nothing and top_k still caps (a search for the top 2 need not
    # find the top 5's first two: each tree keeps only top_k labels at its last layer)
    low = tuned_raw.predict(texts, top_k=2, threshold=0.0)
    assert low == tuned_raw.predict(texts, top_k=2) and all(len(row) <= 2 for row in low)
    assert any(len(row) == 2 for row in low)


def test_auto_without_a_tuned_threshold_is_a_clear_error(tiny_predictor):
    assert tiny_predictor.tuned_threshold is None
    with pytest.raises(InvalidInputError, match="without a tuned threshold"):
        tiny_predictor.predict(["text"], threshold="auto")


@pytest.mark.parametrize("kwargs", [{"threshold": -0.1}, {"threshold": 1.5},
                                    {"threshold": "high"}, {"threshold": True},
                                    {"min_score": 2.0}, {"min_score": "0.5"}])
def test_bad_thresholds_are_refused(tiny_predictor, kwargs):
    with pytest.raises(InvalidInputError):
        tiny_predictor.predict(["text"], **kwargs)


def test_calibrated_scores_are_served(tuned, tiny_corpus):
    _, test = tiny_corpus
    X = tuned.encode(test.texts[:30])
    ids, raw, counts = tuned.predict_ids(X, top_k=5)
    served = tuned.predict_features(X, top_k=5)
    for row, ids_row, raw_row, c in zip(served, ids, raw, counts):
        assert [lab for lab, _ in row] == [tuned.label_names[j] for j in ids_row[:c]]
        assert np.allclose([s for _, s in row], tuned.calibration.apply(raw_row[:c]))
        assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)
    assert np.all(np.diff(tuned.calibration.x) >= 0)
    assert np.all(np.diff(tuned.calibration.y) >= 0)


def test_eval_reports_f1_at_threshold_and_ece(tuned, tuned_raw, tiny_predictor, tiny_corpus):
    _, test = tiny_corpus
    m = evaluate_predictor(tuned, test, measure_speed=False)
    assert {"micro_f1", "micro_precision", "micro_recall", "threshold", "ece_raw",
            "ece_calibrated", "P@1"} <= set(m)
    assert 0 < m["micro_f1"] <= 1 and 0 <= m["ece_calibrated"] <= 1
    assert m["ece_calibrated"] < m["ece_raw"]
    plain = evaluate_predictor(tiny_predictor, test, measure_speed=False)
    assert "micro_f1" not in plain and "ece_calibrated" not in plain and "ece_raw" in plain
    assert plain["P@1"] == m["P@1"]  # calibration never reorders


def test_cli_eval_json_and_predict_flags(tuned_raw, tiny_docs, tmp_path, capsys):
    _, test_docs = tiny_docs
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in test_docs[:50]))
    assert main(["eval", str(tuned_raw.path), str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "micro_f1" in out and "P@5" in out
    text = test_docs[0]["text"]
    assert main(["predict", str(tuned_raw.path), text, "--threshold", "auto", "--include",
                 "t4/*", "--exclude", "t4/s00/*", "--top-k", "3"]) == 0
    labels = json.loads(capsys.readouterr().out)["labels"]
    value = tuned_raw.tuned_threshold["value"]
    assert all(x["label"].startswith("t4/") and not x["label"].startswith("t4/s00/")
               and x["score"] >= round(value, 6) - 1e-6 for x in labels)
    assert main(["predict", str(tuned_raw.path), text, "--top-k", "2", "--explain"]) == 0
    labels = json.loads(capsys.readouterr().out)["labels"]
    assert len(labels) == 2 and all(x["explanation"] for x in labels)
    assert set(labels[0]["explanation"][0]) == {"term", "contribution"}
    assert main(["predict", str(tuned_raw.path), text, "--include", "t9/s00/l999"]) == 2
    assert "t9/s00/l999" in capsys.readouterr().err


def test_damaged_calibration_is_refused(tuned, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tuned.path, copy)
    np.save(copy / "calibration_y.npy", np.array([0.5, 0.2]))
    np.save(copy / "calibration_x.npy", np.array([0.1, 0.9]))
    with pytest.raises(BundleError, match="monotone"):
        models.load_bundle(str(copy))
    (copy / "calibration_y.npy").unlink()
    with pytest.raises(BundleError, match="calibration_y"):
        models.load_bundle(str(copy))
    assert Calibration.load(tuned.path).x.dtype == np.float64
