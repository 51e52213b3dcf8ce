"""Readers for the input formats: JSONL documents, Annif's short-text TSV corpora and
XC-repository sparse features."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from models.errors import DataError, InvalidInputError

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """Documents with their label sets.

    Exactly one of ``texts`` (raw text, from JSONL) and ``features`` (a CSR matrix, from an
    XC-format file) is set. ``labels`` holds each document's label names as strings. With
    ``features``, ``dense_start`` may say that the columns from there on are a dense block
    (e.g. precomputed sentence embeddings), whose weights are then stored dense.
    """

    labels: list[list[str]]
    texts: list[str] | None = None
    features: sp.csr_matrix | None = None
    ids: list[object] | None = None
    n_skipped: int = 0
    source: str = ""
    extra: dict = field(default_factory=dict)
    dense_start: int | None = None

    @property
    def n_docs(self) -> int:
        return len(self.labels)

    @property
    def is_text(self) -> bool:
        return self.texts is not None

    def subset(self, rows: Sequence[int] | np.ndarray) -> Corpus:
        rows = np.asarray(rows, dtype=np.int64)
        return Corpus(
            labels=[self.labels[i] for i in rows],
            texts=[self.texts[i] for i in rows] if self.texts is not None else None,
            features=self.features[rows] if self.features is not None else None,
            ids=[self.ids[i] for i in rows] if self.ids is not None else None,
            source=self.source,
            dense_start=self.dense_start,
        )


def validation_rows(n_docs: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows), both sorted: a seeded ``share`` of ``n_docs`` held out.
    The builder and the benchmarks carve their validation splits with this one rule."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_valid = round(share * n_docs)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def read_corpus(
    path: str | Path, *, label_field: str = "labels", skip_bad_lines: bool = False
) -> Corpus:
    """Read a ``.jsonl`` text corpus, an Annif ``.tsv`` (or ``.tsv.gz``) corpus or an
    XC-format ``.txt`` feature file (by extension)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path, 0)
    if path.suffix == ".jsonl" or path.suffix == ".json":
        return read_jsonl(path, label_field=label_field, skip_bad_lines=skip_bad_lines)
    if path.name.endswith((".tsv", ".tsv.gz")):
        return read_annif_tsv(path, skip_bad_lines=skip_bad_lines)
    return read_xc(path, skip_bad_lines=skip_bad_lines)


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as fh:
        try:
            for line_no, line in enumerate(fh, start=1):
                yield line_no, line
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text ({exc.reason})", path, line_no + 1) from exc


def read_jsonl(
    path: str | Path, *, label_field: str = "labels", skip_bad_lines: bool = False
) -> Corpus:
    """One JSON object a line: ``{"text": str, "labels": [str, ...]}``, ``id`` optional."""
    path = Path(path)
    texts: list[str] = []
    labels: list[list[str]] = []
    ids: list[object] = []
    n_skipped = 0
    for line_no, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("a line must be a JSON object")
            text = doc.get("text")
            if not isinstance(text, str):
                raise ValueError('"text" must be a string')
            doc_labels = doc.get(label_field, [])
            if not isinstance(doc_labels, list) or not all(
                isinstance(lab, (str, int)) for lab in doc_labels
            ):
                raise ValueError(f'"{label_field}" must be a list of strings')
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if skip_bad_lines:
                n_skipped += 1
                continue
            raise DataError(str(exc), path, line_no) from None
        texts.append(text)
        # dict.fromkeys drops repeated labels but keeps their order
        labels.append(list(dict.fromkeys(str(lab) for lab in doc_labels)))
        ids.append(doc.get("id"))
    if n_skipped:
        log.warning("%s: skipped %d malformed line(s)", path, n_skipped)
    return Corpus(labels=labels, texts=texts, ids=ids, n_skipped=n_skipped, source=str(path))


def read_annif_tsv(path: str | Path, *, skip_bad_lines: bool = False) -> Corpus:
    """Annif's short-text corpus: ``text<TAB>subject subject ...`` a line, each subject a URI
    in angle brackets (kept without them) or a bare label; a line without a tab is malformed.
    With a vocabulary the builder maps labels to their URIs (see :mod:`models.vocab`)."""
    path = Path(path)
    texts: list[str] = []
    labels: list[list[str]] = []
    n_skipped = 0
    for line_no, line in _iter_lines(path):
        line = line.lstrip("\ufeff") if line_no == 1 else line  # Annif reads utf-8-sig
        if not line.strip():
            continue
        text, tab, subjects = line.rstrip("\r\n").partition("\t")
        if not tab or not text.strip():
            if skip_bad_lines:
                n_skipped += 1
                continue
            why = "no tab between text and subjects" if not tab else "empty text"
            raise DataError(why, path, line_no)
        names = (s[1:-1] if s.startswith("<") and s.endswith(">") else s
                 for s in subjects.split())
        texts.append(text)
        labels.append(list(dict.fromkeys(n for n in names if n)))
    if n_skipped:
        log.warning("%s: skipped %d malformed line(s)", path, n_skipped)
    return Corpus(labels=labels, texts=texts, ids=[None] * len(texts), n_skipped=n_skipped,
                  source=str(path))


def concat_corpora(parts: Sequence[Corpus]) -> Corpus:
    """Text corpora one after the other (e.g. training data and ``learn`` feedback logs)."""
    if any(not c.is_text for c in parts):
        raise InvalidInputError("extra training data joins text corpora only, not XC features")
    return Corpus(
        labels=[lab for c in parts for lab in c.labels],
        texts=[t for c in parts for t in c.texts or []],
        ids=[i for c in parts for i in (c.ids or [None] * c.n_docs)],
        n_skipped=sum(c.n_skipped for c in parts),
        source=" + ".join(c.source for c in parts),
    )


def read_xc(path: str | Path, *, skip_bad_lines: bool = False) -> Corpus:
    """Extreme Classification Repository format: header ``n_docs n_features n_labels`` then
    ``l1,l2 fid:val ...`` per document (0-based ids; a leading space means no labels).
    Rows are returned l2-normalized, as the field's benchmarks use them."""
    path = Path(path)
    lines = _iter_lines(path)
    try:
        _, header = next(lines)
        n_docs_declared, n_features, n_labels = (int(v) for v in header.split())
    except (StopIteration, ValueError):
        raise DataError("header must be 'n_docs n_features n_labels'", path, 1) from None
    indptr = [0]
    indices: list[int] = []
    values: list[float] = []
    labels: list[list[str]] = []
    n_skipped = 0
    for line_no, line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            head, _, rest = line.partition(" ")
            doc_labels = [int(v) for v in head.split(",")] if head else []
            if any(not 0 <= lab < n_labels for lab in doc_labels):
                raise ValueError(f"label id out of range 0..{n_labels - 1}")
            row_idx, row_val = [], []
            for tok in rest.split():
                fid, _, val = tok.partition(":")
                fid_i = int(fid)
                if not 0 <= fid_i < n_features:
                    raise ValueError(f"feature id {fid_i} out of range 0..{n_features - 1}")
                row_idx.append(fid_i)
                row_val.append(float(val))
        except ValueError as exc:
            if skip_bad_lines:
                n_skipped += 1
                continue
            raise DataError(f"malformed XC line: {exc}", path, line_no) from None
        labels.append([str(lab) for lab in dict.fromkeys(doc_labels)])
        indices.extend(row_idx)
        values.extend(row_val)
        indptr.append(len(indices))
    if n_skipped:
        log.warning("%s: skipped %d malformed line(s)", path, n_skipped)
    X = sp.csr_matrix(
        (np.asarray(values, dtype=np.float32), np.asarray(indices, dtype=np.int32), indptr),
        shape=(len(labels), n_features),
    )
    X.sum_duplicates()
    X = normalize_rows(X)
    return Corpus(
        labels=labels,
        features=X,
        n_skipped=n_skipped,
        source=str(path),
        extra={"n_docs_declared": n_docs_declared},
    )


def normalize_rows(X: sp.csr_matrix) -> sp.csr_matrix:
    """l2-normalize every row of a CSR matrix (all-zero rows stay zero); float32 out."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    sq = np.asarray(X.multiply(X).sum(axis=1), dtype=np.float64).ravel()
    norms = np.sqrt(sq)
    norms[norms == 0.0] = 1.0
    X.data /= np.repeat(norms, np.diff(X.indptr)).astype(np.float32)
    return X
