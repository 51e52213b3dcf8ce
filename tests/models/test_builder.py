"""Builder, parameters, input readers and the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import models
from models.builder import build
from models.data import read_corpus
from models.errors import DataError, InvalidInputError, NoTextEncoderError
from models.evaluate import evaluate_predictor
from models.params import BuildParams, ClusterParams
from tests.conftest import corpus_from_docs, tiny_params
from xmc.cli import main

TOPICS = {
    "astronomy": "telescope galaxy nebula orbit planet comet",
    "baking": "flour oven dough yeast crust bread",
    "chess": "bishop rook gambit checkmate opening pawn",
    "diving": "reef scuba oxygen wetsuit coral depth",
    "elections": "ballot voters candidate campaign poll senate",
    "football": "goal striker referee penalty league midfield",
}


def learnable_docs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        label = rng.choice(sorted(TOPICS))
        words = rng.choices(TOPICS[label].split(), k=6) + rng.choices(
            ["the", "and", "with", "about", "today", "really"], k=3)
        rng.shuffle(words)
        docs.append({"id": i, "text": " ".join(words), "labels": [label]})
    return docs


def test_tiny_learnable_corpus_reaches_p_at_1_of_one(tmp_path):
    train = corpus_from_docs(learnable_docs(300, seed=1))
    test = corpus_from_docs(learnable_docs(60, seed=2))
    params = BuildParams(n_trees=2, cluster=ClusterParams(branching_factor=2, max_leaf_size=2))
    out = build(train, tmp_path / "learn", params, test=test)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["P@1"] == 1.0  # evaluated at build time, stored
    predictor = models.load_bundle(out)
    assert evaluate_predictor(predictor, test, measure_speed=False)["P@1"] == 1.0
    assert predictor.predict(["rook and pawn gambit"], top_k=1)[0][0][0] == "chess"


def test_synthetic_corpus_is_learned_well(tiny_predictor, tiny_corpus):
    _, test = tiny_corpus
    m = evaluate_predictor(tiny_predictor, test, measure_speed=True)
    assert m["P@1"] > 0.5
    assert 0 <= m["PSP@5"] <= 1 and 0 <= m["coverage"] <= 1
    assert m["latency_ms_p50"] > 0 and m["batch_docs_per_s"] > 0


def test_bad_arguments_are_clear_errors(tiny_predictor):
    with pytest.raises(InvalidInputError, match="top_k"):
        tiny_predictor.predict(["x"], top_k=0)
    with pytest.raises(InvalidInputError, match="beam_size"):
        tiny_predictor.predict(["x"], beam_size=-1)
    with pytest.raises(InvalidInputError, match="sequence"):
        tiny_predictor.predict("one string")
    assert tiny_predictor.predict([]) == []
    assert tiny_predictor.predict(["x"], top_k=10**6)[0] is not None  # capped at n_labels


def test_params_print_and_read_back(tmp_path):
    params = BuildParams(n_trees=2)
    params.ranker.C = 2.5
    path = tmp_path / "p.json"
    path.write_text(params.to_json())
    again = BuildParams.from_file(path)
    assert again == params
    path.write_text(json.dumps({"ranker": {"C_typo": 1}}))
    with pytest.raises(InvalidInputError, match="C_typo"):
        BuildParams.from_file(path)
    with pytest.raises(InvalidInputError, match="branching_factor"):
        BuildParams(cluster=ClusterParams(branching_factor=12)).validate()
    with pytest.raises(InvalidInputError, match="bitmap_mb"):
        BuildParams(bitmap_mb=-1).validate()
    with pytest.raises(InvalidInputError, match="max_root_children"):
        BuildParams(cluster=ClusterParams(max_root_children=-1)).validate()


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        '{"text": "ok", "labels": ["a"]}', "{broken", '{"text": 3, "labels": []}'])
    with pytest.raises(DataError) as err:
        read_corpus(path)
    assert err.value.line_no == 2 and "d.jsonl:2" in str(err.value)
    corpus = read_corpus(path, skip_bad_lines=True)
    assert corpus.n_docs == 1 and corpus.n_skipped == 2


def test_xc_format_reader_and_feature_bundle(tmp_path):
    lines = ["6 5 3", "0,1 0:1 1:2", "1 2:1 3:1", "2 4:3", " 0:1",
             "0 0:2 1:1", "2 3:1 4:1"]
    path = write_lines(tmp_path / "train.txt", lines)
    corpus = read_corpus(path)
    assert corpus.n_docs == 6 and corpus.features.shape == (6, 5)
    assert corpus.labels[3] == []  # a line starting with a space has no labels
    assert np.allclose(np.sqrt(corpus.features.multiply(corpus.features).sum(axis=1))[:3], 1)
    predictor = models.load_bundle(build(corpus, tmp_path / "xc", tiny_params(n_trees=1)))
    assert predictor.manifest["encoders"] == [] and not predictor.has_text_encoder
    with pytest.raises(NoTextEncoderError):
        predictor.predict(["text"])
    ranked = predictor.predict_features(corpus.features[:1], top_k=2)
    assert len(ranked[0]) == 2
    bad = write_lines(tmp_path / "bad.txt", ["1 5 3", "0 9:1"])
    with pytest.raises(DataError, match=r"bad\.txt:2"):
        read_corpus(bad)


def test_cli_synth_build_eval_predict(tmp_path, capsys):
    data, bundle = tmp_path / "data", tmp_path / "bundle"
    assert main(["synth", "--labels", "60", "--train", "600", "--test", "100", "--seed", "3",
                 "--out", str(data)]) == 0
    capsys.readouterr()
    (tmp_path / "p.json").write_text(json.dumps({"n_trees": 1, "cluster": {
        "branching_factor": 2, "max_leaf_size": 8}}))
    assert main(["build", str(data / "train.jsonl"), "--out", str(bundle), "--params",
                 str(tmp_path / "p.json"), "--seed", "5", "--test", str(data / "test.jsonl"),
                 "--name", "cli-test"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["name"] == "cli-test" and "P@1" in summary["metrics"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 5 and manifest["params"]["n_trees"] == 1
    assert main(["build", str(data / "train.jsonl"), "--out", str(bundle)]) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert main(["eval", str(bundle), str(data / "test.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5",
                "recall@5", "coverage", "n_docs", "batch_docs_per_s", "latency_ms_p50",
                "latency_ms_p99"):
        assert key in result
    assert main(["predict", str(bundle), "first text", "second text", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    answer = json.loads(lines[0])
    assert len(answer["labels"]) == 2 and answer["model"]["version"] == manifest["version"]
    assert set(answer["labels"][0]) == {"label", "score"}


def test_cli_print_default_params_reads_back(capsys, tmp_path):
    assert main(["build", "--print-default-params"]) == 0
    text = capsys.readouterr().out
    assert BuildParams.from_dict(json.loads(text)) == BuildParams()


def test_cli_reports_missing_bundle(capsys, tmp_path):
    assert main(["predict", str(tmp_path / "none"), "x"]) == 2
    assert "no such bundle" in capsys.readouterr().err


def test_a_rule_is_kept_only_where_each_half_picks_one_that_gains_on_the_other():
    """Candidates that put the right label first on some documents, and 5th elsewhere
    ((P@1 + P@5) / 2 differs by 0.5): one that does so everywhere is kept with its gain;
    one that does so on one half only is picked by that half, gains nothing on the other,
    and the trees alone stay; one that does so on a fifth of every half is kept, its gain
    measured with a standard error."""
    from models.builder import Halves, HeldOutTruth

    n = 400
    truth = HeldOutTruth(["a", "b", "c", "d", "e"], [["a"]] * n)
    halves = Halves(truth, seed=3)
    first = halves.first
    assert 0 < first.sum() < n
    trees = (np.tile([1, 2, 3, 4, 0], (n, 1)), np.zeros((n, 5)), np.full(n, 5))
    right_first = np.tile([0, 1, 2, 3, 4], (n, 1))

    def ranking(where: np.ndarray):
        return (np.where(where[:, None], right_first, trees[0]), trees[1], trees[2])

    rankings = {0: trees, 1: ranking(np.ones(n, bool)), 2: ranking(first),
                3: ranking(np.arange(n) % 5 == 0)}
    cands = {k: {"k": k, "power": 1.0, "weight": 0.5, **halves.score(r)}
             for k, r in rankings.items()}
    alone = {**cands[0], "k": 0, "weight": 0.0}

    def choose(*ks):
        return halves.choose([alone, *(cands[k] for k in ks)], alone,
                             lambda c: rankings[c["k"]], trees)

    best, gain, standard_error = choose(1)
    assert best is cands[1] and gain == pytest.approx(0.5) and standard_error == 0.0
    best, gain, _ = choose(2)
    assert best is alone and gain == 0.0
    best, gain, standard_error = choose(3)
    assert best is cands[3] and gain == pytest.approx(0.1) and 0 < standard_error < gain
    # the whole split ranks 2 first (it gains on half the documents, 3 on a fifth); the
    # second half picks 3, which gains on the first half: confirmed, and 2 is kept
    assert first.mean() > 0.2 and choose(2, 3)[0] is cands[2]
    # without the trees alone among the candidates, the first is kept whatever its gain
    assert halves.choose([cands[2]], None, lambda c: rankings[c["k"]], trees)[0] is cands[2]


@pytest.mark.parametrize("width", [3, 5, 8])
def test_held_out_truth_scores_as_evaluate_does(width):
    """The choices' fast P@1 / P@5 on label ids: models.metrics.evaluate's on the names
    (documents without labels left out; truth labels the fit part never saw count as
    misses), and per document (P@1 + P@5) / 2 counted by hand."""
    from models.builder import HeldOutTruth
    from models.metrics import evaluate
    from models.search import ranked_names

    rng = np.random.default_rng(width)
    names = [f"l{i}" for i in range(40)]
    labels = [[f"l{j}" for j in rng.choice(45, rng.integers(0, 4), replace=False)]
              for _ in range(300)]
    ids = np.array([rng.permutation(40)[:width] for _ in range(300)])
    counts = rng.integers(0, width + 1, 300)
    ids[np.arange(width)[None, :] >= counts[:, None]] = -1
    truth = HeldOutTruth(names, labels)
    want = evaluate(ranked_names(ids, counts, names), labels, ks=(1, 5))
    got = truth.p1_p5(ids, counts)
    assert got["P@1"] == pytest.approx(want["P@1"], abs=1e-6)
    assert got["P@5"] == pytest.approx(want["P@5"], abs=1e-6)
    per_doc = truth.per_doc(ids, counts)
    for d in range(300):
        hits = [names[j] in set(labels[d]) for j in ids[d, : min(counts[d], 5)]]
        assert per_doc[d] == pytest.approx((float(bool(hits) and hits[0]) + sum(hits) / 5) / 2)
