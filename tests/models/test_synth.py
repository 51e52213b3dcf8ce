from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models.data import read_jsonl, read_xc
from models.errors import InvalidInputError
from models.synth import SynthParams, generate, write_corpus, write_xc
from xmc.cli import main

SMALL = SynthParams(n_labels=300, n_train=600, n_test=150, seed=3)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    write_corpus(tmp_path / "a", SMALL)
    write_corpus(tmp_path / "b", SMALL)
    write_corpus(tmp_path / "c", SynthParams(**{**SMALL.to_json(), "seed": 4}))
    for split in ("train.jsonl", "test.jsonl"):
        a = (tmp_path / "a" / split).read_bytes()
        assert a == (tmp_path / "b" / split).read_bytes()
        assert a != (tmp_path / "c" / split).read_bytes()


def test_generate_matches_written_files(tmp_path: Path) -> None:
    train, test = generate(SMALL)
    write_corpus(tmp_path, SMALL)
    assert train == _read(tmp_path / "train.jsonl")
    assert test == _read(tmp_path / "test.jsonl")


def test_documents_are_well_formed() -> None:
    train, test = generate(SMALL)
    assert len(train) == SMALL.n_train and len(test) == SMALL.n_test
    ids = [d["id"] for d in train + test]
    assert ids == list(range(SMALL.n_train + SMALL.n_test))
    name = re.compile(r"^t\d+/s\d+/l\d+$")
    for doc in train + test:
        assert set(doc) == {"id", "text", "labels"}
        assert isinstance(doc["text"], str) and doc["text"]
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", doc["text"])
        labels = doc["labels"]
        assert 1 <= len(labels) <= 10
        assert len(set(labels)) == len(labels)
        assert all(isinstance(lab, str) and name.match(lab) for lab in labels)


def test_project_reader_accepts_the_files(tmp_path: Path) -> None:
    stats = write_corpus(tmp_path, SMALL)
    corpus = read_jsonl(tmp_path / "train.jsonl")
    assert corpus.n_docs == stats["n_train"] == SMALL.n_train
    assert corpus.n_skipped == 0


def test_labels_of_a_document_are_correlated() -> None:
    # Most documents' labels share a topic with the first label (one or two subtrees).
    train, _ = generate(SynthParams(n_labels=2000, n_train=1000, n_test=0))
    multi = [d["labels"] for d in train if len(d["labels"]) > 1]
    same_topic = [
        sum(lab.split("/")[0] == labs[0].split("/")[0] for lab in labs[1:]) / (len(labs) - 1)
        for labs in multi
    ]
    assert sum(same_topic) / len(same_topic) > 0.5


def test_zipf_long_tail_at_5k_labels(tmp_path: Path) -> None:
    # The setting: 5k labels, ~4 training documents per label.
    params = SynthParams(n_labels=5000, n_train=20000, n_test=500)
    stats = write_corpus(tmp_path, params)
    counts = Counter(
        lab for doc in _read(tmp_path / "train.jsonl") for lab in doc["labels"]
    )
    share_lt5 = sum(c < 5 for c in counts.values()) / len(counts)
    assert share_lt5 >= 0.5
    assert stats["share_labels_lt5_train"] == pytest.approx(share_lt5)
    assert stats["n_labels_used"] == len(counts)
    # a head exists: the most frequent label is far above the median
    assert max(counts.values()) > 50 * stats["median_label_freq_train"]
    assert 2.5 <= stats["mean_labels_per_doc_train"] <= 5.0


@pytest.mark.parametrize("mean_words", [40, 150])
def test_document_length_follows_the_knob(mean_words: int) -> None:
    train, _ = generate(SynthParams(n_labels=200, n_train=500, n_test=0,
                                    mean_doc_words=mean_words))
    lengths = [len(d["text"].split()) for d in train]
    assert sum(lengths) / len(lengths) == pytest.approx(mean_words, rel=0.1)
    assert min(lengths) >= SynthParams().min_doc_words


def test_tiny_and_empty_settings() -> None:
    train, test = generate(SynthParams(n_labels=1, n_train=3, n_test=0))
    assert test == []
    assert all(d["labels"] == [train[0]["labels"][0]] for d in train)


def test_params_are_json_serializable_and_validated() -> None:
    assert SynthParams(**json.loads(json.dumps(SMALL.to_json()))).to_json() == SMALL.to_json()
    with pytest.raises(InvalidInputError):
        generate(SynthParams(max_labels_per_doc=0))
    with pytest.raises(InvalidInputError):
        generate(SynthParams(background_share=0.95, confuser_share=0.1))


# --- the feature-level (XC) form ------------------------------------------------------------

XC_SMALL = SynthParams(n_labels=200, n_train=500, n_test=120, seed=5, mean_doc_words=60)


def _plain_xc(path: Path) -> tuple[list[int], list[list[int]], list[dict[int, float]]]:
    """(header, label ids per line, {fid: value} per line) as written, not normalized again."""
    lines = path.read_text().splitlines()
    header = [int(v) for v in lines[0].split()]
    labels, rows = [], []
    for line in lines[1:]:
        head, *feats = line.split(" ")
        labels.append([int(v) for v in head.split(",")])
        rows.append({int(f): float(v) for f, v in (tok.split(":") for tok in feats)})
    return header, labels, rows


def _tfidf_oracle(train: list[dict], test: list[dict], min_df: int
                  ) -> tuple[int, list[list[float]], list[list[float]]]:
    """Sorted TF-IDF values of each text document: sublinear tf, smoothed idf over the
    training documents, words in >= min_df of them, l2 rows."""
    df = Counter(w for d in train for w in set(d["text"].split()))
    vocab = {w for w, c in df.items() if c >= min_df}

    def rows(docs: list[dict]) -> list[list[float]]:
        out = []
        for d in docs:
            tf = Counter(w for w in d["text"].split() if w in vocab)
            v = [(1 + math.log(c)) * (math.log((1 + len(train)) / (1 + df[w])) + 1)
                 for w, c in tf.items()]
            norm = math.sqrt(sum(x * x for x in v))
            out.append(sorted(x / norm for x in v))
        return out

    return len(vocab), rows(train), rows(test)


def test_xc_form_is_the_tfidf_of_the_text_documents(tmp_path: Path) -> None:
    stats = write_xc(tmp_path, XC_SMALL)
    train, test = generate(XC_SMALL)
    n_features, want_train, want_test = _tfidf_oracle(train, test, min_df=2)
    assert stats["n_features"] == n_features
    for split, docs, want in (("train", train, want_train), ("test", test, want_test)):
        header, labels, rows = _plain_xc(tmp_path / f"{split}.txt")
        assert header == [len(docs), n_features, XC_SMALL.n_labels]
        # the same documents: label ids are the text form's l<id>, in the same order
        assert labels == [[int(n.rsplit("/l", 1)[1]) for n in d["labels"]] for d in docs]
        for row, values in zip(rows, want, strict=True):
            assert list(row) == sorted(row)  # feature ids ascending
            assert np.allclose(sorted(row.values()), values, atol=0.51e-4)
            assert abs(math.sqrt(sum(v * v for v in row.values())) - 1) < 2e-3


def test_xc_files_parse_with_declared_shapes(tmp_path: Path) -> None:
    stats = write_xc(tmp_path, XC_SMALL)
    for split in ("train", "test"):
        corpus = read_xc(tmp_path / f"{split}.txt")
        assert corpus.n_docs == stats[f"n_{split}"] == corpus.extra["n_docs_declared"]
        assert corpus.features.shape == (corpus.n_docs, stats["n_features"])
        assert corpus.labels.matrix.shape[1] == XC_SMALL.n_labels
        assert corpus.features.nnz / corpus.n_docs == pytest.approx(
            stats[f"mean_features_per_doc_{split}"])
        norms = np.sqrt(np.asarray(corpus.features.multiply(corpus.features).sum(axis=1)))
        assert np.allclose(norms, 1, atol=1e-6)


def test_xc_same_seed_same_bytes(tmp_path: Path) -> None:
    write_xc(tmp_path / "a", XC_SMALL)
    write_xc(tmp_path / "b", XC_SMALL)
    write_xc(tmp_path / "c", SynthParams(**{**XC_SMALL.to_json(), "seed": 6}))
    for split in ("train.txt", "test.txt"):
        a = (tmp_path / "a" / split).read_bytes()
        assert a == (tmp_path / "b" / split).read_bytes()
        assert a != (tmp_path / "c" / split).read_bytes()


def test_xc_feature_space_knobs(tmp_path: Path) -> None:
    all_words = write_xc(tmp_path / "all", XC_SMALL, min_df=1)
    capped = write_xc(tmp_path / "cap", XC_SMALL, max_features=500)
    assert capped["n_features"] == 500 < write_xc(tmp_path / "d2", XC_SMALL)["n_features"]
    assert all_words["n_features"] > 500
    # the cap keeps the words in the most documents: few rows lose many features
    assert capped["mean_features_per_doc_train"] > 0.5 * all_words["mean_features_per_doc_train"]
    with pytest.raises(InvalidInputError, match="min_df"):
        write_xc(tmp_path / "x", XC_SMALL, min_df=10**6)
    with pytest.raises(InvalidInputError, match="training documents"):
        write_xc(tmp_path / "x", SynthParams(n_labels=10, n_train=0, n_test=5))


def test_cli_synth_xc_build_eval(tmp_path: Path, capsys) -> None:
    data, bundle = tmp_path / "data", tmp_path / "bundle"
    assert main(["synth", "--format", "xc", "--labels", "60", "--train", "600", "--test",
                 "100", "--seed", "3", "--out", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "xc"
    assert sorted(p.name for p in data.iterdir()) == ["test.txt", "train.txt"]
    assert main(["build", str(data / "train.txt"), "--out", str(bundle), "--n-trees", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(bundle), str(data / "test.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_docs"] == 100 and result["P@1"] > 0.3


@pytest.mark.parametrize("args, message", [
    (["--max-features", "10"], "--format xc only"),
    (["--min-df", "3"], "--format xc only"),
    (["--format", "xc", "--train", "0"], "training documents"),
    (["--format", "xc", "--min-df", "0"], "min_df"),
])
def test_cli_synth_bad_combinations_exit_2(tmp_path: Path, capsys, args: list[str],
                                           message: str) -> None:
    assert main(["synth", "--labels", "20", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
