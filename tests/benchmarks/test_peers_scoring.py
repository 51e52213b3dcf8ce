"""Selftest of the side-by-side benchmark's scoring glue, on made-up top-k arrays.

Every expected figure below was worked out by hand from the definitions (P@k = hits in the
top k / k, nDCG@k = DCG / ideal DCG, PSP as in Jain et al. 2016); nothing here times code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.features import FeatureSet
from benchmarks.peers import (
    ids_to_names,
    load_predictions,
    mean_runs,
    replace_section,
    run_dir_of,
    run_dirs,
    score,
    score_run,
)
from models.data import label_matrix

LABELS = ["a", "b", "c", "d", "e"]
# Two documents, top-5 column ids into LABELS, best first; -1 pads a short list.
TOPK = np.array([[0, 1, 2, -1, -1],    # a b c
                 [3, 4, 0, 1, 2]],     # d e a b c
                dtype=np.int32)
# "z" never occurs in training: it stays in the truth and can only be missed.
TRUTHS = [["a", "c"], ["b", "z"]]

# doc 1: a@1 hit, b@2 miss, c@3 hit            -> P@1 1,   P@3 2/3, P@5 2/5
# doc 2: d e a miss, b@4 hit, c@5 miss          -> P@1 0,   P@3 0,   P@5 1/5
P1 = (1 + 0) / 2
P3 = (2 / 3 + 0) / 2
P5 = (2 / 5 + 1 / 5) / 2
# nDCG@5, discount 1/log2(rank + 1); ideal over min(5, |y|) = 2 true labels in both docs
IDEAL2 = 1 + 1 / math.log2(3)
NDCG5 = ((1 + 1 / math.log2(4)) / IDEAL2 + (1 / math.log2(5)) / IDEAL2) / 2


def test_ids_to_names_drops_padding() -> None:
    assert ids_to_names(TOPK, LABELS) == [["a", "b", "c"], ["d", "e", "a", "b", "c"]]


def test_ids_outside_the_label_space_are_an_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        ids_to_names(np.array([[5]]), LABELS)


def test_precision_and_ndcg_by_hand() -> None:
    preds = ids_to_names(TOPK, LABELS)
    counts = dict.fromkeys(["a", "b", "c", "d", "e"], 10)
    got = score(preds, TRUTHS, counts, n_train_docs=100)
    assert got["P@1"] == pytest.approx(P1)
    assert got["P@3"] == pytest.approx(P3)
    assert got["P@5"] == pytest.approx(P5)
    assert got["nDCG@5"] == pytest.approx(NDCG5)
    assert set(got) == {"P@1", "P@3", "P@5", "nDCG@5", "PSP@5"}


def test_psp_by_hand() -> None:
    # Jain et al.: p(n) = 1 / (1 + C exp(-A log(n + B))), C = (log N - 1)(B + 1)^A,
    # A = 0.55, B = 1.5, N = 100. Seen labels occur 10 times, the unseen "z" 0 times.
    c = (math.log(100) - 1) * 2.5 ** 0.55
    w = 1 + c * math.exp(-0.55 * math.log(11.5))   # 1 / p(10)
    wz = 1 + c * math.exp(-0.55 * math.log(1.5))   # 1 / p(0)
    # numerator: doc 1 hits a, c; doc 2 hits b      -> (2w + w) / 5
    # best possible: doc 1 {a, c}; doc 2 {b, z}     -> (2w + w + wz) / 5
    expected = 3 * w / (3 * w + wz)
    counts = dict.fromkeys(["a", "b", "c", "d", "e"], 10)
    got = score(ids_to_names(TOPK, LABELS), TRUTHS, counts, n_train_docs=100)
    assert got["PSP@5"] == pytest.approx(expected)


def test_both_prediction_file_kinds_round_trip(tmp_path: Path) -> None:
    ids_dir, names_dir = tmp_path / "ids", tmp_path / "names"
    ids_dir.mkdir()
    names_dir.mkdir()
    np.save(ids_dir / "topk.npy", TOPK)
    (names_dir / "topk_labels.json").write_text(json.dumps([["a", "b", "c"], ["d"]]))
    assert load_predictions(ids_dir, LABELS)[1] == ["d", "e", "a", "b", "c"]
    assert load_predictions(names_dir, LABELS) == [["a", "b", "c"], ["d"]]


def test_score_run_merges_timings_with_accuracy(tmp_path: Path) -> None:
    feature_dir = tmp_path / "features"
    feature_dir.mkdir()
    (feature_dir / "test_truth.json").write_text(json.dumps(TRUTHS))
    fs = FeatureSet(name="toy", data_dir=tmp_path, feature_dir=feature_dir, kind="text",
                    train_path=tmp_path / "train.jsonl", test_path=tmp_path / "test.jsonl",
                    label_names=LABELS, label_counts=dict.fromkeys(LABELS, 10),
                    n_train_docs=100, n_test_docs=2, n_features=7, tfidf_fit_s=0.1)
    run = tmp_path / "peer"
    run.mkdir()
    np.save(run / "topk.npy", TOPK)
    (run / "result.json").write_text(json.dumps({"peer": "toy", "train_s": 1.5}))
    got = score_run(run, fs, fs.test_truth())
    assert got["train_s"] == 1.5
    assert got["P@3"] == pytest.approx(P3)
    assert json.loads((run / "scores.json").read_text())["P@5"] == pytest.approx(P5)


def test_label_matrix_keeps_only_training_labels() -> None:
    Y = label_matrix([["b", "a", "z", "a"], []], ["a", "b"])
    assert Y.shape == (2, 2)
    assert Y.toarray().tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_replace_section_touches_only_its_section() -> None:
    text = "# T\n\n## Peers\n\n(pending)\n\n## HTTP\n\n(pending: http)\n"
    out = replace_section(text, "## Peers", "table\n")
    assert out == "# T\n\n## Peers\n\ntable\n\n## HTTP\n\n(pending: http)\n"
    # idempotent: writing again gives the same file
    assert replace_section(out, "## Peers", "table\n") == out


def test_every_peer_keeps_one_folder_per_run(tmp_path: Path) -> None:
    for seed in (2, 0, 1):
        for peer in ("pecos", "omikuji-bonsai"):
            run_dir_of(tmp_path, peer, seed).mkdir(parents=True, exist_ok=True)
    (tmp_path / "pecos" / "model").mkdir()  # not a run
    for peer in ("pecos", "omikuji-bonsai"):
        assert run_dirs(tmp_path, peer) == [tmp_path / peer / f"seed{s}" for s in (0, 1, 2)]
    assert run_dirs(tmp_path, "napkinxc") == []


def test_mean_runs_averages_the_seeds_and_keeps_their_spread() -> None:
    runs = [{"seed": s, "P@1": p1, "P@3": 0.5, "P@5": p5, "nDCG@5": 0.5, "PSP@5": 0.5,
             "train_s": 1.0 + s} for s, p1, p5 in ((0, 0.80, 0.30), (1, 0.82, 0.34))]
    got = mean_runs(runs)
    assert got["seeds"] == [0, 1] and got["n_runs"] == 2
    assert got["P@1"] == pytest.approx(0.81) and got["P@5"] == pytest.approx(0.32)
    assert got["P@1_sd"] == pytest.approx(0.01) and got["P@5_sd"] == pytest.approx(0.02)
    assert got["train_s"] == pytest.approx(1.5)
