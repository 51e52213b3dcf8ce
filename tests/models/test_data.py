"""The XC reader against a plain-Python reference parser that shares no code with it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models import data
from models.data import Corpus, LabelLists, distinct_labels, label_matrix, read_corpus, read_xc
from models.errors import DataError


def reference_xc(path: Path) -> tuple[list[list[str]], list[dict[int, float]], tuple[int, int]]:
    """(label names per document, {feature id: l2-normalized value} per document, (n_features,
    n_labels)) the slow, obvious way: float64 sums in the order of the file, then float32."""
    lines = path.read_text().splitlines()
    _, n_features, n_labels = (int(v) for v in lines[0].split())
    labels, rows = [], []
    for line in lines[1:]:
        if not line.strip():
            continue
        head, _, rest = line.partition(" ")
        ids = sorted({int(v) for v in head.split(",")}) if head else []
        row: dict[int, float] = {}
        for tok in rest.split():
            fid, val = tok.split(":")
            row[int(fid)] = row.get(int(fid), 0.0) + float(val)
        norm = math.sqrt(sum(v * v for v in [row[k] for k in sorted(row)])) or 1.0
        labels.append([str(i) for i in ids])
        rows.append({k: float(np.float32(row[k] / norm)) for k in sorted(row)})
    return labels, rows, (n_features, n_labels)


def assert_matches_reference(corpus: Corpus, path: Path) -> None:
    labels, rows, (n_features, n_labels) = reference_xc(path)
    X = corpus.features
    assert X.shape == (len(rows), n_features) and X.dtype == np.float32
    assert corpus.labels.matrix.shape == (len(rows), n_labels)
    assert list(corpus.labels) == labels
    for i, row in enumerate(rows):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        assert X.indices[lo:hi].tolist() == list(row)  # sorted, repeats merged
        assert X.data[lo:hi].tolist() == list(row.values())


def random_xc(rng: np.random.Generator, n_docs: int, n_features: int, n_labels: int) -> str:
    """Valid lines with every liberty the format allows: repeated and unsorted ids, no labels,
    no features, blank lines, exponents, signs, CRLF and trailing blanks."""
    out = [f"{n_docs} {n_features} {n_labels}"]
    for _ in range(n_docs):
        labs = ",".join(str(v) for v in rng.integers(0, n_labels, rng.integers(0, 5)))
        feats = []
        for fid in rng.integers(0, n_features, rng.integers(0, 12)):
            kind = rng.integers(0, 5)
            val = rng.random() * 10.0 ** rng.integers(-3, 3)
            text = (f"{val:.6f}", f"{val:.3e}", f"{val:.12g}", f"-{val:.4f}", f"+{val:.2E}")[kind]
            feats.append(f"{fid}:{text}")
        line = labs + " " + " ".join(feats)
        ending = ("\r" if rng.random() < 0.1 else "") + (" " if rng.random() < 0.1 else "")
        out.append(line + ending)
        if rng.random() < 0.05:
            out.append("")
    return "\n".join(out)  # and no final newline


@pytest.mark.parametrize("seed", [0, 1])
def test_reader_matches_reference_parser(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "r.txt"
    path.write_text(random_xc(np.random.default_rng(seed), 300, 50, 20))
    corpus = read_xc(path)
    assert_matches_reference(corpus, path)
    assert corpus.extra["n_docs_declared"] == 300 and corpus.n_skipped == 0
    assert corpus.source == str(path)


def test_lines_across_buffers_read_the_same(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "r.txt"
    path.write_text(random_xc(np.random.default_rng(2), 200, 40, 10))
    whole = read_xc(path)
    monkeypatch.setattr(data, "_XC_BUFFER", 16)  # most lines longer than a buffer
    small = read_xc(path)
    for a, b in ((whole.features, small.features), (whole.labels.matrix, small.labels.matrix)):
        assert (a != b).nnz == 0 and (a.indptr == b.indptr).all()


@pytest.mark.parametrize("line, message", [
    ("0,x 1:1", "bad label list '0,x'"),
    ("0, 1:1", "bad label list '0,'"),
    ("3 1:1", "label id 3 out of range 0..2"),
    ("0 5:1", "feature id 5 out of range 0..4"),
    ("0 1:1 2", "bad feature '2'"),
    ("0 a:1", "bad feature 'a:1'"),
    ("0 1:", "bad feature value in '1:'"),
    ("0 1:1.2.3", "bad feature value in '1:1.2.3'"),
    ("0 1:nan", "bad feature value in '1:nan'"),
    ("0 1:1e99", "bad feature value in '1:1e99'"),
    ("0 1:1:2", "bad feature value in '1:1:2'"),
])
def test_malformed_line_names_file_line_and_token(tmp_path: Path, line: str,
                                                  message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(f"3 5 3\n0 1:1\n\n{line}\n1 2:0.5\n")
    with pytest.raises(DataError, match=r"bad\.txt:4") as err:
        read_corpus(path)
    assert err.value.line_no == 4 and message in str(err.value)
    corpus = read_corpus(path, skip_bad_lines=True)
    assert corpus.n_skipped == 1 and list(corpus.labels) == [["0"], ["1"]]
    assert corpus.features.toarray().tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]


@pytest.mark.parametrize("header", ["", "3 5", "3 5 x", "3 -5 3", "3 5 3 1"])
def test_bad_header_is_line_1(tmp_path: Path, header: str) -> None:
    path = tmp_path / "h.txt"
    path.write_text(header + "\n0 1:1\n")
    with pytest.raises(DataError, match=r"h\.txt:1"):
        read_xc(path)


def test_label_lists_read_like_a_list_of_lists(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text("4 3 12\n10,2,10 0:1\n 1:1\n11 2:1\n2,0 0:1\n")
    labels = read_xc(path).labels
    plain = [["2", "10"], [], ["11"], ["0", "2"]]
    assert isinstance(labels, LabelLists) and labels == plain and len(labels) == 4
    assert labels[-1] == ["0", "2"] and labels[1:3] == plain[1:3]
    with pytest.raises(IndexError):
        labels[4]
    # the builder's label order and label matrix, the same as for the plain lists
    assert distinct_labels(labels) == distinct_labels(plain) == ["0", "10", "11", "2"]
    names = ["2", "7", "10", "0", "zz", "011"]  # unused, non-numeric and non-canonical names
    assert (label_matrix(labels, names) != label_matrix(plain, names)).nnz == 0
    sub = Corpus(labels=labels, features=read_xc(path).features).subset([3, 0])
    assert sub.labels == [plain[3], plain[0]] and sub.features.shape == (2, 3)


def test_empty_body_and_label_only_lines(tmp_path: Path) -> None:
    path = tmp_path / "e.txt"
    path.write_text("0 4 2\n")
    corpus = read_xc(path)
    assert corpus.n_docs == 0 and corpus.features.shape == (0, 4)
    path.write_text("2 4 2\n1\n0,1\n")
    corpus = read_xc(path)
    assert corpus.labels == [["1"], ["0", "1"]] and corpus.features.nnz == 0


@pytest.mark.parametrize("skip", [False, True])
def test_a_file_that_grows_between_the_passes_is_refused(tmp_path: Path, monkeypatch,
                                                         skip: bool) -> None:
    path = tmp_path / "g.txt"
    path.write_text("3 5 3\n0 1:1\n1,2 2:1 3:1\n2 4:1\n")
    # as if the first pass had seen a shorter file: the arrays are too small for the second
    monkeypatch.setattr(data.xcparse, "count_separators", lambda buf: (1, 1, 0))
    with pytest.raises(DataError, match="changed while being read"):
        read_xc(path, skip_bad_lines=skip)
