"""Readers for the input formats: JSONL documents, Annif's short-text TSV corpora and
XC-repository sparse features."""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
import scipy.sparse as sp

from models import xcparse
from models.errors import DataError, InvalidInputError

log = logging.getLogger(__name__)


class LabelLists(Sequence[list[str]]):
    """Each document's label names, read-only, backed by a binary CSR label matrix whose
    column j is the label named ``str(j)`` (XC label ids are integers).

    It reads like the list of lists a JSONL corpus has, but at millions of documents that
    list would take gigabytes of Python strings; this takes 4 bytes a label."""

    def __init__(self, matrix: sp.csr_matrix) -> None:
        self.matrix = matrix

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __repr__(self) -> str:
        n_docs, n_labels = self.matrix.shape
        return f"LabelLists({n_docs} documents, label ids < {n_labels})"

    @overload
    def __getitem__(self, i: int) -> list[str]: ...
    @overload
    def __getitem__(self, i: slice) -> LabelLists: ...

    def __getitem__(self, i: int | slice) -> list[str] | LabelLists:
        if isinstance(i, slice):
            return LabelLists(self.matrix[i])
        m = self.matrix
        row = range(m.shape[0])[i]  # negative indices, IndexError
        return [str(j) for j in m.indices[m.indptr[row]:m.indptr[row + 1]].tolist()]

    def __iter__(self) -> Iterator[list[str]]:
        m = self.matrix
        for lo, hi in zip(m.indptr[:-1].tolist(), m.indptr[1:].tolist()):
            yield [str(j) for j in m.indices[lo:hi].tolist()]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like a list

    def take(self, rows: np.ndarray) -> LabelLists:
        return LabelLists(self.matrix[rows])

    def names(self) -> list[str]:
        """Distinct label names in use, in :func:`distinct_labels` order."""
        used = np.flatnonzero(np.bincount(self.matrix.indices, minlength=self.matrix.shape[1]))
        return sorted(str(j) for j in used.tolist())

    def matrix_for(self, label_names: Sequence[str]) -> sp.csr_matrix:
        """The label matrix with column k = ``label_names[k]``; labels missing from
        ``label_names`` are dropped."""
        m = self.matrix
        column = np.full(m.shape[1], -1, dtype=np.int64)
        for k, name in enumerate(label_names):
            j = int(name) if name.isdecimal() and name.isascii() else -1
            if 0 <= j < m.shape[1] and str(j) == name:
                column[j] = k
        cols = column[m.indices]
        keep = cols >= 0
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))[keep]
        return sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (rows, cols[keep])),
                             shape=(m.shape[0], len(label_names)))


def distinct_labels(labels: Sequence[list[str]]) -> list[str]:
    """The distinct label names of a corpus, sorted (as strings): the label order of a
    bundle built from it."""
    if isinstance(labels, LabelLists):
        return labels.names()
    return sorted({lab for doc in labels for lab in doc})


@dataclass
class Corpus:
    """Documents with their label sets.

    Exactly one of ``texts`` (raw text, from JSONL) and ``features`` (a CSR matrix, from an
    XC-format file) is set. ``labels`` holds each document's label names as strings: a list
    of lists, or for XC input a :class:`LabelLists` over the label matrix. With
    ``features``, ``dense_start`` may say that the columns from there on are a dense block
    (e.g. precomputed sentence embeddings), whose weights are then stored dense.
    """

    labels: Sequence[list[str]]
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

    @property
    def text_list(self) -> list[str]:
        """The texts, for code that needs them (an error for a feature-level corpus)."""
        if self.texts is None:
            raise InvalidInputError(f"{self.source or 'the corpus'} holds feature rows, not texts")
        return self.texts

    @property
    def feature_matrix(self) -> sp.csr_matrix:
        """The feature rows, for code that needs them (an error for a text corpus)."""
        if self.features is None:
            raise InvalidInputError(f"{self.source or 'the corpus'} holds texts, not feature rows")
        return self.features

    def subset(self, rows: Sequence[int] | np.ndarray) -> Corpus:
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.labels, LabelLists):
            labels: Sequence[list[str]] = self.labels.take(rows)
        else:
            labels = [self.labels[i] for i in rows]
        return Corpus(
            labels=labels,
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
    if path.is_dir():
        raise DataError("is a directory, not a data file", path)
    if not path.is_file():
        raise DataError("no such file", path)
    if path.suffix == ".jsonl" or path.suffix == ".json":
        return read_jsonl(path, label_field=label_field, skip_bad_lines=skip_bad_lines)
    if path.name.endswith((".tsv", ".tsv.gz")):
        return read_annif_tsv(path, skip_bad_lines=skip_bad_lines)
    return read_xc(path, skip_bad_lines=skip_bad_lines)


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    with opener(path, "rt", encoding="utf-8", errors="strict") as fh:
        try:
            for line_no, line in enumerate(fh, start=1):
                yield line_no, line
        except UnicodeDecodeError as exc:
            # decoding runs a block ahead of the lines: the bad byte is at or after this line
            raise DataError(f"not UTF-8 text ({exc.reason}) at or after this line", path,
                            line_no + 1) from exc


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


_XC_BUFFER = 1 << 25  # bytes of whole lines parsed at a time
_XC_MESSAGES = {
    xcparse.BAD_LABEL: "bad label list {tok!r} (want comma-separated integer ids)",
    xcparse.LABEL_RANGE: "label id {tok} out of range 0..{n_labels_max}",
    xcparse.BAD_FEATURE: "bad feature {tok!r} (want fid:value)",
    xcparse.FEATURE_RANGE: "feature id {tok} out of range 0..{n_features_max}",
    xcparse.BAD_VALUE: "bad feature value in {tok!r}",
    xcparse.GREW: "more than the first pass counted: the file changed while being read",
}


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

    Rows are returned l2-normalized, as the field's benchmarks use them, with sorted feature
    ids (repeats summed); ``labels`` is a :class:`LabelLists` over the label matrix. Two
    passes over the file (a count of separators sizes the arrays, then a compiled parser
    fills them), so memory is the output plus one buffer."""
    path = Path(path)
    with path.open("rb") as fh:
        header = fh.readline()
        try:
            n_docs_declared, n_features, n_labels = (int(v) for v in header.split())
            if min(n_docs_declared, n_features, n_labels) < 0:
                raise ValueError
        except ValueError:
            raise DataError("header must be 'n_docs n_features n_labels'", path, 1) from None
        body = fh.tell()
        lines = colons = commas = 0
        for buf in _line_buffers(fh):
            n_nl, n_colon, n_comma = xcparse.count_separators(buf)
            lines, colons, commas = lines + n_nl + 1, colons + n_colon, commas + n_comma
        fh.seek(body)
        indptr = np.zeros(lines + 1, dtype=np.int64)
        lab_indptr = np.zeros(lines + 1, dtype=np.int64)
        indices = np.empty(colons, dtype=np.int32)
        data = np.empty(colons, dtype=np.float32)
        lab_ids = np.empty(commas + lines, dtype=np.int32)
        state = np.zeros(xcparse.N_STATE, dtype=np.int64)
        state[xcparse.LINE] = 1  # the header
        for buf in _line_buffers(fh):
            xcparse.parse_lines(buf, n_features, n_labels, skip_bad_lines, indptr, indices,
                                data, lab_indptr, lab_ids, state)
            if state[xcparse.ERR] != xcparse.OK:
                tok = bytes(buf[state[xcparse.ERR_START]:state[xcparse.ERR_END]][:60])
                message = _XC_MESSAGES[int(state[xcparse.ERR])].format(
                    tok=tok.decode("utf-8", "replace"), n_labels_max=n_labels - 1,
                    n_features_max=n_features - 1)
                raise DataError(f"malformed XC line: {message}", path,
                                int(state[xcparse.LINE]))
    n_rows, nnz, nlab = (int(state[k]) for k in (xcparse.ROW, xcparse.NNZ, xcparse.NLAB))
    n_skipped = int(state[xcparse.SKIPPED])
    if n_skipped:
        log.warning("%s: skipped %d malformed line(s)", path, n_skipped)
    X = sp.csr_matrix((data[:nnz], indices[:nnz], indptr[: n_rows + 1]),
                      shape=(n_rows, n_features))
    Y = sp.csr_matrix((np.ones(nlab, dtype=np.float32), lab_ids[:nlab],
                       lab_indptr[: n_rows + 1]), shape=(n_rows, n_labels))
    X.has_sorted_indices = Y.has_sorted_indices = True  # the parser sorts every row
    return Corpus(
        labels=LabelLists(Y),
        features=X,
        n_skipped=n_skipped,
        source=str(path),
        extra={"n_docs_declared": n_docs_declared},
    )


def _line_buffers(fh: io.BufferedIOBase) -> Iterator[np.ndarray]:
    """The rest of a binary file as buffers of whole lines (the last one may lack its
    newline). A buffer is reused: each is valid until the next is asked for."""
    buf = bytearray(_XC_BUFFER)
    carry = 0
    while True:
        with memoryview(buf) as view:
            n_read = fh.readinto(view[carry:])
        end = carry + n_read
        if n_read == 0:
            if carry:
                yield np.frombuffer(buf, dtype=np.uint8, count=carry)
            return
        cut = buf.rfind(b"\n", 0, end) + 1
        if cut == 0:  # one line longer than the buffer: grow it
            buf = buf + bytearray(len(buf))
            carry = end
            continue
        yield np.frombuffer(buf, dtype=np.uint8, count=cut)
        buf[: end - cut] = buf[cut:end]
        carry = end - cut


def label_matrix(labels: Sequence[list[str]], label_names: list[str]) -> sp.csr_matrix:
    """Binary (n_docs, n_labels) matrix; labels missing from ``label_names`` are dropped."""
    if isinstance(labels, LabelLists):
        return labels.matrix_for(label_names)
    index = {name: i for i, name in enumerate(label_names)}
    rows, cols = [], []
    for r, doc_labels in enumerate(labels):
        for lab in doc_labels:
            j = index.get(lab)
            if j is not None:
                rows.append(r)
                cols.append(j)
    Y = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)),
        shape=(len(labels), len(label_names)),
    )
    Y.data[:] = 1.0  # a label given twice is still one label
    return Y


def normalize_rows(X: sp.csr_matrix) -> sp.csr_matrix:
    """l2-normalize every row of a CSR matrix (all-zero rows stay zero); float32 out."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    sq = np.asarray(X.multiply(X).sum(axis=1), dtype=np.float64).ravel()
    norms = np.sqrt(sq)
    norms[norms == 0.0] = 1.0
    X.data /= np.repeat(norms, np.diff(X.indptr)).astype(np.float32)
    return X


def drop_below(Z: sp.csr_matrix, threshold: float, *, unit: bool = True,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (int64 pointers, int32 column ids, float32 values) of the rows of ``Z``
    scaled to norm 1 (``unit``: they are already) without their entries of magnitude below
    ``threshold``, each row scaled to norm 1 again (a row that keeps none stays empty). A
    unit row keeps at most ``1 / threshold ** 2`` entries: the large ones, which tell a row
    apart from the others. ``Z`` is not copied: only the kept entries are."""
    n_rows = Z.shape[0]
    row_of = np.repeat(np.arange(n_rows, dtype=np.int32), np.diff(Z.indptr))
    magnitude = np.abs(Z.data, dtype=np.float32)
    if not unit:
        norms = np.sqrt(np.bincount(row_of, weights=np.square(Z.data, dtype=np.float64),
                                    minlength=n_rows)).astype(np.float32)
        magnitude /= np.where(norms > 0, norms, 1)[row_of]
    keep = magnitude >= threshold
    del magnitude
    rows = row_of[keep]
    data = Z.data[keep].astype(np.float32)
    norms = np.sqrt(np.bincount(rows, weights=np.square(data, dtype=np.float64),
                                minlength=n_rows))
    data /= norms[rows].astype(np.float32)  # a kept entry's row has a norm above 0
    return row_pointers(rows, n_rows), Z.indices[keep].astype(np.int32), data


def row_pointers(row_of: np.ndarray, n_rows: int) -> np.ndarray:
    """int64 CSR row pointers (n_rows + 1) of entries whose rows ``row_of`` ascend."""
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=indptr[1:])
    return indptr
