"""Annif's file formats: the short-text corpus, vocabularies (TSV, CSV, SKOS) and the label
metadata a bundle keeps from a vocabulary."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

import models
from models.builder import build
from models.data import Corpus, concat_corpora, read_annif_tsv, read_corpus
from models.errors import BundleError, DataError, InvalidInputError
from models.vocab import LABEL_META, LabelInfo, Vocabulary, read_vocab
from tests.annif_data import (
    notation,
    pref_label,
    uri,
    write_annif_corpus,
    write_vocab_csv,
    write_vocab_tsv,
    write_vocab_ttl,
)
from tests.conftest import corpus_from_docs, tiny_params


def label_names(docs: list[dict]) -> list[str]:
    return sorted({lab for d in docs for lab in d["labels"]})


# ---------------------------------------------------------------------- the corpus
def test_annif_tsv_corpus_reads_uris_and_bare_labels(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("\ufeffboiled eggs\t<http://x/eggs> <http://x/boil> <http://x/eggs>\n"
                    "\n"
                    "bread dough\tbaking  <http://x/bread>\n", encoding="utf-8")
    corpus = read_corpus(path)
    assert corpus.texts == ["boiled eggs", "bread dough"]
    assert corpus.labels == [["http://x/eggs", "http://x/boil"], ["baking", "http://x/bread"]]


def test_annif_tsv_gz_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("a text\t<http://x/a>\n")
    assert read_corpus(path).labels == [["http://x/a"]]


def test_annif_tsv_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("fine\t<http://x/a>\nno tab here\n\t<http://x/b>\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.tsv:2: no tab"):
        read_annif_tsv(path)
    corpus = read_annif_tsv(path, skip_bad_lines=True)
    assert corpus.n_docs == 1 and corpus.n_skipped == 2


def test_concat_joins_text_corpora_and_refuses_features(tiny_corpus: tuple[Corpus, Corpus],
                                                         tmp_path: Path) -> None:  # fmt: skip
    train, test = tiny_corpus
    joined = concat_corpora([train, test])
    assert joined.n_docs == train.n_docs + test.n_docs
    assert joined.texts[train.n_docs] == test.texts[0]
    assert joined.labels[-1] == test.labels[-1]
    xc = tmp_path / "x.txt"
    xc.write_text("1 3 2\n0 1:1.0\n")
    with pytest.raises(InvalidInputError):
        concat_corpora([train, read_corpus(xc)])


# ---------------------------------------------------------------------- vocabularies
@pytest.fixture(scope="module")
def names(tiny_docs: tuple[list[dict], list[dict]]) -> list[str]:
    return label_names(tiny_docs[0])


def expected_subjects(names: list[str], prefix: str = "") -> dict[str, LabelInfo]:
    return {uri(n): LabelInfo(uri(n), prefix + pref_label(n), notation(n)) for n in names}


def test_tsv_vocab(tmp_path: Path, names: list[str]) -> None:
    vocab = read_vocab(write_vocab_tsv(tmp_path / "v.tsv", names))
    assert vocab.subjects == expected_subjects(names)


def test_csv_vocab_picks_a_language(tmp_path: Path, names: list[str]) -> None:
    path = write_vocab_csv(tmp_path / "v.csv", names)
    assert read_vocab(path, "en").subjects == expected_subjects(names)
    first = read_vocab(path)  # the first label_xx column
    assert first.language == "fi" and first.subjects == expected_subjects(names, "fi-")
    with pytest.raises(InvalidInputError, match="label_sv"):
        read_vocab(path, "sv")


def test_skos_vocab(tmp_path: Path, names: list[str]) -> None:
    pytest.importorskip("rdflib", reason="build extra: rdflib")
    path = write_vocab_ttl(tmp_path / "v.ttl", names)
    assert read_vocab(path, "en").subjects == expected_subjects(names)
    assert read_vocab(path, "fi").subjects == expected_subjects(names, "fi-")


def test_bad_vocab_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="a vocabulary is"):
        read_vocab(tmp_path / "v.json")
    (tmp_path / "v.csv").write_text("id,name\n1,a\n")
    with pytest.raises(DataError, match="'uri'"):
        read_vocab(tmp_path / "v.csv")
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(DataError, match="no subject"):
        read_vocab(tmp_path / "empty.tsv")
    with pytest.raises(DataError, match="no such"):
        read_vocab(tmp_path / "missing.tsv")


def test_canonical_names() -> None:
    vocab = Vocabulary({
        "http://x/a": LabelInfo("http://x/a", "apple", None),
        "http://x/b": LabelInfo("http://x/b", "pear", "1"),
        "http://x/c": LabelInfo("http://x/c", "pear", "2"),
    })  # fmt: skip
    assert vocab.canonical("http://x/a") == "http://x/a"
    assert vocab.canonical("apple") == "http://x/a"
    assert vocab.canonical("pear") == "pear"  # two subjects share it: it names neither
    assert vocab.canonical("plum") == "plum"
    labels, unknown = vocab.canonicalize([["apple", "http://x/a", "plum"], ["pear"]])
    assert labels == [["http://x/a", "plum"], ["pear"]] and unknown == 2


# ---------------------------------------------------------------------- bundles
@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory: pytest.TempPathFactory,
                tiny_docs: tuple[list[dict], list[dict]]) -> tuple[Path, Path]:  # fmt: skip
    folder = tmp_path_factory.mktemp("annif-files")
    train, _ = tiny_docs
    return (write_annif_corpus(folder / "train.tsv", train),
            write_vocab_tsv(folder / "vocab.tsv", label_names(train)))  # fmt: skip


def test_bundle_from_annif_files_equals_one_from_jsonl_with_uris(
    tmp_path: Path, tiny_docs: tuple[list[dict], list[dict]], vocab_files: tuple[Path, Path]
) -> None:
    """The oracle: the same documents with their URIs spelled out in JSONL, no vocabulary.
    Reading the TSV (bare labels included) through the vocabulary must give the same labels,
    so the same model; only the label metadata differs."""
    train, test = tiny_docs
    corpus_tsv, vocab_tsv = vocab_files
    as_uris = [{"text": d["text"], "labels": [uri(n) for n in d["labels"]]} for d in train]
    params = tiny_params(n_trees=1)
    plain = build(corpus_from_docs(as_uris), tmp_path / "plain", params)
    vocab = read_vocab(vocab_tsv)
    annif = build(read_corpus(corpus_tsv), tmp_path / "annif", tiny_params(n_trees=1),
                  vocab=vocab)
    p_plain, p_annif = models.load_bundle(plain), models.load_bundle(annif)
    assert p_annif.label_names == p_plain.label_names
    texts = [d["text"] for d in test[:20]]
    assert p_annif.predict(texts, top_k=5) == p_plain.predict(texts, top_k=5)

    assert p_plain.label_info == {}
    assert p_annif.label_info == {uri(n): LabelInfo(uri(n), pref_label(n), notation(n))
                                  for n in label_names(train)}  # fmt: skip
    manifest = p_annif.manifest
    assert manifest["vocab"]["n_labels_known"] == manifest["n_labels"]
    # evaluating on an Annif test file (bare labels too) is evaluating on the URIs
    from models.evaluate import evaluate_predictor

    test_tsv = write_annif_corpus(tmp_path / "test.tsv", test, bare_every=2)
    as_uris_test = [{"text": d["text"], "labels": [uri(n) for n in d["labels"]]} for d in test]
    got = evaluate_predictor(p_annif, read_corpus(test_tsv), measure_speed=False)
    want = evaluate_predictor(p_plain, corpus_from_docs(as_uris_test), measure_speed=False)
    assert got == want and got["P@1"] > 0.5
    assert manifest["version"] != p_plain.version  # the metadata is part of the content


def test_bundle_without_label_meta_still_loads(tmp_path: Path, tiny_bundle: Path) -> None:
    assert not (tiny_bundle / LABEL_META).exists()
    assert models.load_bundle(tiny_bundle).label_info == {}


def test_corrupt_label_meta_is_a_bundle_error(tmp_path: Path, vocab_files: tuple[Path, Path]
                                              ) -> None:  # fmt: skip
    corpus_tsv, vocab_tsv = vocab_files
    out = build(read_corpus(corpus_tsv), tmp_path / "b", tiny_params(n_trees=1),
                vocab=read_vocab(vocab_tsv))
    meta = json.loads((out / LABEL_META).read_text())
    (out / LABEL_META).write_text(json.dumps(meta[:-1]))
    with pytest.raises(BundleError, match="label entries"):
        models.load_bundle(out)
    (out / LABEL_META).write_text(json.dumps([{"uri": 3}] * len(meta)))
    with pytest.raises(BundleError, match="string 'label'"):
        models.load_bundle(out)
    shutil.copy(vocab_tsv, out / LABEL_META)
    with pytest.raises(BundleError, match="unreadable"):
        models.load_bundle(out)


def test_cli_build_with_vocab_and_extra_train(
    tmp_path: Path, vocab_files: tuple[Path, Path], tiny_docs: tuple[list[dict], list[dict]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from xmc.cli import main

    corpus_tsv, vocab_tsv = vocab_files
    train, test = tiny_docs
    feedback = tmp_path / "feedback.jsonl"
    # a learn log: extra fields beside text and labels, a label given by its vocabulary name
    new = "brand-new-subject"
    lines = [{"text": d["text"], "labels": [pref_label(d["labels"][0]), new], "model": "m",
              "version": "v", "learned_at": "2026-01-01T00:00:00+00:00"} for d in test[:30]]
    feedback.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "bundle"
    argv = ["build", str(corpus_tsv), "--out", str(out), "--vocab", str(vocab_tsv),
            "--extra-train", str(feedback), "--n-trees", "1"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    predictor = models.load_bundle(out)
    assert predictor.manifest["n_train_docs"] == len(train) + len(lines)
    assert predictor.label_info[new] == LabelInfo(None, new, None)  # kept, without a uri
    assert predictor.manifest["vocab"]["n_labels_known"] == len(label_names(train))
    assert summary["n_labels"] == len(label_names(train)) + 1

    assert main(["predict", str(out), test[0]["text"], "--top-k", "3"]) == 0
    answer = json.loads(capsys.readouterr().out)
    expected = predictor.predict([test[0]["text"]], top_k=3)[0]
    assert len(answer["labels"]) == len(expected)
    for got, (name, _) in zip(answer["labels"], expected, strict=True):
        info = predictor.label_info[name]
        assert got["label"] == info.label
        assert got.get("uri") == info.uri and got.get("notation") == info.notation


def test_cli_build_bad_vocab_exits_2(tmp_path: Path, vocab_files: tuple[Path, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from xmc.cli import main

    corpus_tsv, _ = vocab_files
    (tmp_path / "v.xlsx").write_text("")
    argv = ["build", str(corpus_tsv), "--out", str(tmp_path / "b"), "--vocab",
            str(tmp_path / "v.xlsx")]  # fmt: skip
    assert main(argv) == 2
    assert "a vocabulary is" in capsys.readouterr().err
