"""Readers for the two input formats: JSONL documents and XC-repository sparse features."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from models.errors import DataError

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
    """Read a ``.jsonl`` text corpus or an XC-format ``.txt`` feature file (by extension)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path, 0)
    if path.suffix == ".jsonl" or path.suffix == ".json":
        return read_jsonl(path, label_field=label_field, skip_bad_lines=skip_bad_lines)
    return read_xc(path, skip_bad_lines=skip_bad_lines)


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding="utf-8", errors="strict") as fh:
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


def read_xc(path: str | Path, *, skip_bad_lines: bool = False) -> Corpus:
    """Extreme Classification Repository format: header ``n_docs n_features n_labels`` then
    ``l1,l2 fid:val ...`` per document (0-based ids; a leading space means no labels).
    Rows are returned l2-normalized, as the field's benchmarks use them.

    Read streaming in blocks of lines, each parsed by numpy's C number parser into the
    CSR arrays (no Python object per non-zero); a block that does not parse cleanly is
    parsed again line by line, to name the bad line (or skip it)."""
    path = Path(path)
    with path.open("rb") as fh:
        header = fh.readline()
        try:
            n_docs_declared, n_features, n_labels = (int(v) for v in header.split())
        except ValueError:
            raise DataError("header must be 'n_docs n_features n_labels'", path, 1) from None
        dims = (n_features, n_labels)
        # label names are the ids as strings: made once, looked up per block
        label_str = np.array([str(i) for i in range(n_labels)], dtype=object)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str]]]] = []
        n_skipped, line_no = 0, 1
        while True:
            block = fh.readlines(_XC_BLOCK_BYTES)
            if not block:
                break
            lines = [line for line in block if line.strip()]
            try:
                parts.append(_parse_xc_block(lines, dims, label_str))
            except ValueError:
                part, skipped = _parse_xc_lines(block, dims, path, line_no, skip_bad_lines)
                parts.append(part)
                n_skipped += skipped
            line_no += len(block)
    if n_skipped:
        log.warning("%s: skipped %d malformed line(s)", path, n_skipped)
    counts = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    X = sp.csr_matrix(
        (np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32),
         np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32),
         np.concatenate(([0], np.cumsum(counts)))),
        shape=(len(counts), n_features),
    )
    X.sum_duplicates()
    X = normalize_rows(X)
    return Corpus(
        labels=[labs for p in parts for labs in p[3]],
        features=X,
        n_skipped=n_skipped,
        source=str(path),
        extra={"n_docs_declared": n_docs_declared},
    )


#: bytes of XC lines parsed at once: the block's arrays stay small beside the output's
_XC_BLOCK_BYTES = 16 << 20


def _parse_xc_block(lines: list[bytes], dims: tuple[int, int], label_str: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str]]]:
    """(non-zeros per row, feature ids, values, label names per row) of well-formed lines;
    ValueError when any line is not."""
    n_features, n_labels = dims
    heads, bodies = [], []
    for line in lines:
        head, _, body = line.partition(b" ")
        heads.append(head)
        bodies.append(body)
    counts = np.array([b.count(b":") for b in bodies], dtype=np.int64)
    n_lab = np.array([h.count(b",") + 1 if h.strip() else 0 for h in heads], dtype=np.int64)
    text = b" ".join(bodies).replace(b":", b" ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (not raises) on text it cannot parse
        numbers = np.fromstring(text, dtype=np.float64, sep=" ") if text.strip() else (
            np.zeros(0))
        labs = np.fromstring(b" ".join(heads).replace(b",", b" "), dtype=np.float64,
                             sep=" ") if n_lab.any() else np.zeros(0)
    if numbers.size != 2 * counts.sum() or labs.size != n_lab.sum():
        raise ValueError("token count")
    fid, val = numbers[0::2], numbers[1::2]
    for ids, n in ((fid, n_features), (labs, n_labels)):
        if ids.size and (ids.min() < 0 or ids.max() >= n or np.any(ids != np.floor(ids))):
            raise ValueError("id out of range")
    names = label_str[labs.astype(np.int64)].tolist()
    ends = np.cumsum(n_lab).tolist()
    per_doc = [list(dict.fromkeys(names[e - k : e])) for e, k in zip(ends, n_lab.tolist())]
    return counts, fid.astype(np.int32), val.astype(np.float32), per_doc


def _parse_xc_lines(block: list[bytes], dims: tuple[int, int], path: Path, first_line: int,
                    skip_bad_lines: bool
                    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str]]], int]:
    """The slow path of a block that did not parse: line by line, naming (or skipping) the
    malformed ones."""
    n_features, n_labels = dims
    counts, fids, vals, labels = [], [], [], []
    n_skipped = 0
    for offset, raw in enumerate(block):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
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
            raise DataError(f"malformed XC line: {exc}", path, first_line + offset + 1) from None
        labels.append([str(lab) for lab in dict.fromkeys(doc_labels)])
        counts.append(len(row_idx))
        fids.extend(row_idx)
        vals.extend(row_val)
    return (np.asarray(counts, dtype=np.int64), np.asarray(fids, dtype=np.int32),
            np.asarray(vals, dtype=np.float32), labels), n_skipped


def normalize_rows(X: sp.csr_matrix) -> sp.csr_matrix:
    """l2-normalize every row of a CSR matrix (all-zero rows stay zero); float32 out."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    sq = np.asarray(X.multiply(X).sum(axis=1), dtype=np.float64).ravel()
    norms = np.sqrt(sq)
    norms[norms == 0.0] = 1.0
    X.data /= np.repeat(norms, np.diff(X.indptr)).astype(np.float32)
    return X
