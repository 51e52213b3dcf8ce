from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from models.data import read_jsonl
from models.errors import InvalidInputError
from models.synth import SynthParams, generate, write_corpus

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


XC_SMALL = SynthParams(n_labels=200, n_train=1500, n_test=300, seed=5, mean_doc_words=40)


def reference_xc(path):
    """A plain reader of the XC format: (header, labels per row, {feature: value} per row)."""
    lines = path.read_text().splitlines()
    header = tuple(int(v) for v in lines[0].split())
    labels, rows = [], []
    for line in lines[1:]:
        head, _, body = line.partition(" ")
        labels.append([int(v) for v in head.split(",")] if head else [])
        rows.append({int(f): float(v) for f, v in (t.split(":") for t in body.split())})
    return header, labels, rows


def test_xc_form_is_the_text_form_as_feature_rows(tmp_path):
    from models.synth import write_xc

    stats = write_xc(tmp_path / "xc", XC_SMALL)
    write_corpus(tmp_path / "text", XC_SMALL)
    (n_docs, n_features, n_labels), labels, rows = reference_xc(tmp_path / "xc" / "train.txt")
    assert (n_docs, n_features, n_labels) == (1500, stats["n_features"], 200)
    texts = [json.loads(line) for line in (tmp_path / "text" / "train.jsonl").open()]
    # the same documents: label names of the text form are the hidden tree's labels
    from models.synth import _Structure

    names = _Structure(XC_SMALL).label_names()
    assert [[names[i] for i in labs] for labs in labels] == [d["labels"] for d in texts]
    for row in rows:
        assert row and all(0 <= f < n_features for f in row)
        assert abs(sum(v * v for v in row.values()) - 1.0) < 1e-3  # l2 rows (4 digits)
    (_, n_f_test, _), _, test_rows = reference_xc(tmp_path / "xc" / "test.txt")
    assert n_f_test == n_features and all(f < n_features for r in test_rows for f in r)


def test_xc_form_is_deterministic(tmp_path):
    from models.synth import write_xc

    write_xc(tmp_path / "a", XC_SMALL)
    write_xc(tmp_path / "b", XC_SMALL)
    for name in ("train.txt", "test.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_xc_reader_matches_the_plain_reader(tmp_path):
    from models.data import read_xc
    from models.synth import write_xc

    write_xc(tmp_path / "xc", XC_SMALL)
    corpus = read_xc(tmp_path / "xc" / "train.txt")
    _, labels, rows = reference_xc(tmp_path / "xc" / "train.txt")
    assert corpus.labels == [[str(v) for v in labs] for labs in labels]
    X = corpus.features
    for i, row in enumerate(rows):
        got = dict(zip(X.indices[X.indptr[i]:X.indptr[i + 1]].tolist(),
                       X.data[X.indptr[i]:X.indptr[i + 1]].tolist()))
        norm = sum(v * v for v in row.values()) ** 0.5
        assert got.keys() == row.keys()
        assert all(abs(got[f] - v / norm) < 1e-6 for f, v in row.items())


def test_xc_reader_names_the_bad_line_in_a_large_file(tmp_path):
    from models.data import read_xc
    from models.errors import DataError

    good = "0,1 0:0.5 3:0.25\n"
    path = tmp_path / "big.txt"
    path.write_text("5000 10 4\n" + good * 3000 + "2 1:x\n" + good * 1999)
    with pytest.raises(DataError, match=r"big\.txt:3002"):
        read_xc(path)
    corpus = read_xc(path, skip_bad_lines=True)
    assert corpus.n_skipped == 1 and corpus.n_docs == 4999
