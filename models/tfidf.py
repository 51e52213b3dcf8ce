"""Sparse TF-IDF text encoder: scikit-learn's features, fitted and applied without it.

The feature space is exactly scikit-learn's ``TfidfVectorizer`` (lowercase, regex tokens, word
n-grams, min_df, max_features, sublinear tf, smoothed idf, l2 rows). :meth:`TfidfEncoder.fit`
computes it in :mod:`models.tfidf_fit`: a streaming count over blocks of documents on every
core, with sklearn's vocabulary order and ``max_features`` tie-breaking reproduced, several
times faster than sklearn's ``fit_transform`` (benchmarks/RESULTS.md, "TF-IDF fit"); the
parity tests compare the two. The serving transform reproduces sklearn's ``transform`` from
the saved vocabulary and idf with a regex, one dict lookup per term and a handful of float
operations (sklearn takes about 0.5 ms per call, against ~10-100 µs here); neither path
imports scikit-learn, which only the parity tests and benchmarks use.

Bundle files (plain JSON / .npy, never pickle):

* ``tfidf_vocab.json`` - the terms as a JSON list, position = feature id;
* ``tfidf_idf.npy`` - float32 idf weight of each feature.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import chain, islice, pairwise, repeat
from math import hypot, log
from pathlib import Path
from typing import cast

import numpy as np
import scipy.sparse as sp

from models.errors import BundleError, InvalidInputError

VOCAB_FILE = "tfidf_vocab.json"
IDF_FILE = "tfidf_idf.npy"

DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"
# Same matches as the default pattern under findall's left-to-right scan, ~35% faster in `re`:
# a greedy \w+ run always ends on a word boundary, and the scan only ever tries a mid-word
# position right after a failed 1-letter word, so neither \b ever rejects a match.
_FAST_DEFAULT_PATTERN = r"\w\w+"

# Below this many distinct features per document, plain Python float math beats the fixed
# cost (~1 µs each) of the ten numpy calls of the array path; above it numpy wins (measured
# crossover: ~30 terms, about a 15-word text).
_SMALL_DOC_TERMS = 32
# Batch transforms work in chunks so the flat Python list of term ids stays small.
_BATCH_CHUNK = 4096


@dataclass
class TfidfParams:
    """Build parameters of the TF-IDF encoder; defaults are the XMC benchmarks' features."""

    lowercase: bool = True
    """Apply ``str.lower()`` to the text before tokenizing."""
    token_pattern: str = DEFAULT_TOKEN_PATTERN
    """Regex whose ``findall`` matches are the tokens (one capture group: the group is used)."""
    ngram_max: int = 2
    """Features are word n-grams of 1..ngram_max consecutive tokens joined by a space."""
    min_df: int = 2
    """Keep only n-grams occurring in at least this many training documents."""
    max_features: int = 200_000
    """Keep at most this many n-grams, the most frequent in the training corpus."""
    sublinear_tf: bool = True
    """Term frequency is ``1 + ln(count)`` instead of the raw count."""
    smooth_idf: bool = True
    """idf = ln((1 + n) / (1 + df)) + 1, as if one extra document held every term."""

    def __post_init__(self) -> None:
        if not isinstance(self.ngram_max, int) or self.ngram_max < 1:
            raise InvalidInputError(f"ngram_max must be an integer >= 1, got {self.ngram_max!r}")
        if not isinstance(self.min_df, int) or self.min_df < 1:
            raise InvalidInputError(f"min_df must be an integer >= 1, got {self.min_df!r}")
        if not isinstance(self.max_features, int) or self.max_features < 1:
            raise InvalidInputError(
                f"max_features must be an integer >= 1, got {self.max_features!r}"
            )
        try:
            groups = re.compile(self.token_pattern).groups
        except (re.error, TypeError) as exc:
            raise InvalidInputError(f"token_pattern is not a valid regex: {exc}") from exc
        if groups > 1:
            # sklearn refuses these too: findall would return tuples, not tokens.
            raise InvalidInputError("token_pattern may have at most one capture group")


class TfidfEncoder:
    """Maps raw texts to l2-normalized float32 TF-IDF rows (sklearn ``TfidfVectorizer`` space)."""

    kind = "tfidf"

    def __init__(
        self, terms: Sequence[str], idf: np.ndarray, params: TfidfParams | None = None, *,
        token_keys: Sequence[str | tuple[str, ...]] | None = None,
    ) -> None:
        """``terms[i]`` is the n-gram of feature ``i``; ``idf[i]`` its weight (kept as given,
        so a read-only memory map stays shared between processes). ``token_keys``: each
        term already split into its token tuple (a unigram: the term itself), when the caller
        has them (the fit does), so they need not be split again; trusted to match ``terms``
        (the tests compare the fit's vocabulary with a loaded one)."""
        self.params = params if params is not None else TfidfParams()
        pattern = self.params.token_pattern
        ngram_max = self.params.ngram_max
        # Default-pattern tokens are runs of \w, never holding a space, so an n-gram term splits
        # back into its tokens and can be keyed by the token tuple: looking up the tuples
        # pairwise() yields is ~40% cheaper than building and hashing " ".join strings. Other
        # patterns may match spaces, so their n-grams stay joined strings, as in sklearn.
        self._tuple_keys = pattern == DEFAULT_TOKEN_PATTERN and ngram_max > 1
        self._vocab: dict[str | tuple[str, ...], int] = (
            _tuple_keyed(terms, token_keys)
            if self._tuple_keys
            else {t: i for i, t in enumerate(terms)}
        )
        if len(self._vocab) != len(terms):
            raise InvalidInputError("terms contain duplicates")
        # toks -> lookup keys of its 2..ngram_max-grams (None: unigrams only).
        self._ngram_keys: Callable[[list[str]], Iterable] | None
        if ngram_max == 1:
            self._ngram_keys = None
        elif self._tuple_keys and ngram_max == 2:
            self._ngram_keys = pairwise
        else:
            self._ngram_keys = partial(
                _tuple_ngrams if self._tuple_keys else _joined_ngrams, n_max=ngram_max
            )
        idf = np.asarray(idf)  # drops the np.memmap subclass (slow to index), keeps the mapping
        if idf.shape != (len(terms),) or idf.dtype != np.float32:
            raise InvalidInputError(
                f"idf must be float32 of shape ({len(terms)},), got {idf.dtype} {idf.shape}"
            )
        self._idf = idf
        # Indexing a memoryview yields Python floats without creating numpy scalars.
        self._idf_py = idf.data
        if pattern == DEFAULT_TOKEN_PATTERN:
            pattern = _FAST_DEFAULT_PATTERN
        self._findall = re.compile(pattern).findall

    @property
    def n_features(self) -> int:
        return len(self._vocab)

    def feature_names(self) -> list[str]:
        """The term of each feature id, as sklearn writes it (n-grams joined by a space)."""
        return [k if isinstance(k, str) else " ".join(k) for k in self._vocab]

    # ------------------------------------------------------------------ fit

    @classmethod
    def fit(
        cls, texts: Sequence[str], params: TfidfParams | None = None, *,
        workers: int | None = None,
    ) -> tuple[TfidfEncoder, sp.csr_matrix]:
        """Fit on ``texts``; returns the encoder and the training matrix (float32 CSR, sorted
        indices, rows l2-normalized, bit-identical to :meth:`transform` of ``texts``).

        Counts in blocks on at most ``workers`` forked processes (default: the cores this
        process may run on; fewer for a small corpus); the result does not depend on it. See
        :mod:`models.tfidf_fit`."""
        from models.tfidf_fit import fit_tfidf  # build-time code, not loaded when serving

        params = params if params is not None else TfidfParams()
        features, matrix = fit_tfidf(texts, params, workers)
        encoder = cls(features.terms, features.idf, params, token_keys=features.token_keys)
        return encoder, matrix

    # ------------------------------------------------------------ transform

    def transform_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One document -> (feature ids int32 ascending, values float32, l2-normalized).

        The per-request path: no sparse matrix, no sklearn; unknown terms are dropped and a
        text with no known term gives two empty arrays."""
        try:  # free on the happy path (3.11 zero-cost exceptions); no isinstance check
            toks = self._findall(text.lower() if self.params.lowercase else text)
        except (AttributeError, TypeError):
            kind = type(text).__name__
            raise InvalidInputError(f"text must be a string, got {kind}") from None
        get = self._vocab.get
        counts = Counter(map(get, toks))
        ngram_keys = self._ngram_keys
        if ngram_keys is not None:
            counts.update(map(get, ngram_keys(toks)))
        counts.pop(None, None)
        known = cast("Counter[int]", counts)  # unknown terms counted under None, dropped
        n = len(known)
        if n == 0:
            return np.empty(0, np.int32), np.empty(0, np.float32)
        sublinear = self.params.sublinear_tf
        if n <= _SMALL_DOC_TERMS:
            idf = self._idf_py
            term_ids = sorted(known)
            if sublinear:
                vals = [idf[i] * (1.0 + log(known[i])) for i in term_ids]
            else:
                vals = [idf[i] * known[i] for i in term_ids]
            scale = 1.0 / hypot(*vals)
            return (
                np.array(term_ids, dtype=np.int32),
                np.array([v * scale for v in vals], dtype=np.float32),
            )
        ids = np.fromiter(known.keys(), np.int32, n)
        tf = np.fromiter(known.values(), np.float64, n)
        order = ids.argsort()
        ids = ids[order]
        tf = tf[order]
        if sublinear:
            np.log(tf, out=tf)
            tf += 1.0
        tf *= self._idf[ids]
        tf *= 1.0 / np.sqrt(tf @ tf)
        return ids, tf.astype(np.float32)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Many documents -> one float32 CSR matrix (int32 sorted indices, l2 rows); a text
        with no known term is an empty row."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a sequence of strings, not one string")
        it = iter(texts)
        row_nnz: list[np.ndarray] = []
        indices: list[np.ndarray] = []
        data: list[np.ndarray] = []
        while chunk := list(islice(it, _BATCH_CHUNK)):
            nnz, ind, val = self._transform_chunk(chunk)
            row_nnz.append(nnz)
            indices.append(ind)
            data.append(val)
        return stack_rows(row_nnz, indices, data, self.n_features)

    def _transform_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(nnz per row, column ids, values) of the rows of ``texts``, in CSR order.

        One Python pass maps every term occurrence to its id (-1 = unknown) in a flat list;
        counting, tf-idf and normalization are then numpy over the whole chunk."""
        get = self._vocab.get
        findall = self._findall
        lowercase = self.params.lowercase
        ngram_keys = self._ngram_keys
        unknown = repeat(-1)  # infinite: map() stops at the shorter iterable
        flat: list[int] = []
        extend = flat.extend
        ends: list[int] = []
        try:
            for text in texts:
                toks = findall(text.lower() if lowercase else text)
                extend(map(get, toks, unknown))
                if ngram_keys is not None:
                    extend(map(get, ngram_keys(toks), unknown))
                ends.append(len(flat))
        except (AttributeError, TypeError) as exc:
            raise InvalidInputError(f"texts must be strings: {exc}") from exc
        n_rows = len(texts)
        n_features = self.n_features
        cols = np.array(flat, dtype=np.int64)
        occurrences: np.ndarray = np.diff(np.array([0, *ends], dtype=np.int64))
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), occurrences)
        known = cols >= 0
        # One sort of row-major keys both counts repeated terms and orders the CSR entries.
        keys, tf = np.unique(rows[known] * n_features + cols[known], return_counts=True)
        return weighted_rows(keys, tf, n_rows, self._idf, self.params.sublinear_tf)

    # ----------------------------------------------------------- save / load

    def save(self, folder: Path) -> dict:
        """Write the vocabulary and idf into the bundle ``folder``; returns the manifest entry."""
        folder = Path(folder)
        with (folder / VOCAB_FILE).open("w", encoding="utf-8") as fh:
            json.dump(self.feature_names(), fh, ensure_ascii=False)
        np.save(folder / IDF_FILE, np.ascontiguousarray(self._idf, dtype=np.float32))
        return {
            "kind": self.kind,
            "files": [VOCAB_FILE, IDF_FILE],
            "params": asdict(self.params),
            "n_features": self.n_features,
        }

    @classmethod
    def load(cls, folder: Path, entry: dict, *, mmap: bool = True) -> TfidfEncoder:
        """Inverse of :meth:`save`; raises :class:`BundleError` naming the faulty file."""
        folder = Path(folder)
        params = _params_from_entry(folder, entry)
        n_features = entry.get("n_features")

        vocab_path = folder / VOCAB_FILE
        try:
            with vocab_path.open("r", encoding="utf-8") as fh:
                terms = json.load(fh)
        except FileNotFoundError:
            raise BundleError("TF-IDF vocabulary file is missing", path=vocab_path) from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise BundleError(f"TF-IDF vocabulary is unreadable: {exc}", path=vocab_path) from exc
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise BundleError("TF-IDF vocabulary must be a JSON list of strings", path=vocab_path)
        if not terms:
            raise BundleError("TF-IDF vocabulary is empty", path=vocab_path)
        if n_features is not None and n_features != len(terms):
            raise BundleError(
                f"TF-IDF vocabulary has {len(terms)} terms, the manifest says {n_features}",
                path=vocab_path,
            )
        if len(set(terms)) != len(terms):
            raise BundleError("TF-IDF vocabulary has duplicate terms", path=vocab_path)

        idf_path = folder / IDF_FILE
        try:
            idf = np.load(idf_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            raise BundleError("TF-IDF idf file is missing", path=idf_path) from None
        except (OSError, ValueError, EOFError) as exc:
            raise BundleError(f"TF-IDF idf is not a valid .npy: {exc}", path=idf_path) from exc
        if idf.dtype != np.float32 or idf.shape != (len(terms),):
            raise BundleError(
                f"TF-IDF idf must be float32 of shape ({len(terms)},), "
                f"got {idf.dtype} {idf.shape}",
                path=idf_path,
            )
        if not (np.isfinite(idf).all() and (idf > 0).all()):
            raise BundleError("TF-IDF idf has non-finite or non-positive weights", path=idf_path)
        return cls(terms, idf, params)


def weighted_rows(
    keys: np.ndarray, tf: np.ndarray, n_rows: int, idf: np.ndarray, sublinear: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nnz per row, column ids int32, values float32) of l2-normalized TF-IDF rows.

    ``keys`` are ``row * len(idf) + column``, ascending and distinct, ``tf`` the count of
    each. The transform and the fit both end here, so training rows are bit-identical to what
    the server computes for the same text."""
    n_features = len(idf)
    rows = keys // n_features
    cols = (keys - rows * n_features).astype(np.int32)
    vals = tf.astype(np.float64)
    if sublinear:
        np.log(vals, out=vals)
        vals += 1.0
    vals *= idf[cols]
    norms = np.sqrt(np.bincount(rows, weights=vals * vals, minlength=n_rows))
    vals /= norms[rows]  # every row present in `rows` has a positive norm
    return np.bincount(rows, minlength=n_rows), cols, vals.astype(np.float32)


def stack_rows(
    row_nnz: list[np.ndarray], indices: list[np.ndarray], data: list[np.ndarray],
    n_features: int,
) -> sp.csr_matrix:
    """One float32 CSR matrix (sorted indices) from consecutive blocks of rows."""
    n_rows = sum(len(x) for x in row_nnz)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    if n_rows:
        np.cumsum(np.concatenate(row_nnz), out=indptr[1:])
    total = int(indptr[-1])
    # int32 index arrays unless the matrix is too big for them (scipy needs one dtype).
    index_dtype = np.int32 if total < np.iinfo(np.int32).max else np.int64
    matrix = sp.csr_matrix(
        (
            np.concatenate(data) if data else np.empty(0, np.float32),
            np.concatenate(indices).astype(index_dtype, copy=False)
            if indices
            else np.empty(0, index_dtype),
            indptr.astype(index_dtype, copy=False),
        ),
        shape=(n_rows, n_features),
        copy=False,
    )
    matrix.has_sorted_indices = True
    return matrix


def _tuple_keyed(
    terms: Sequence[str], token_keys: Sequence[str | tuple[str, ...]] | None = None
) -> dict[str | tuple[str, ...], int]:
    """term -> feature id, with each n-gram keyed by its token tuple (``token_keys``, if
    given, already holds them)."""
    if token_keys is not None:
        # Only the count is checked: joining every key back costs what splitting does.
        if len(token_keys) != len(terms):
            raise InvalidInputError("token_keys and terms differ in length")
        return dict(zip(token_keys, range(len(terms)), strict=True))
    # One string object per distinct token: 200k bigrams share a few 10k words.
    tokens: dict[str, str] = {}
    intern = tokens.setdefault
    vocab: dict[str | tuple[str, ...], int] = {}
    for i, term in enumerate(terms):
        if " " in term:
            vocab[tuple(intern(t, t) for t in term.split(" "))] = i
        else:
            vocab[intern(term, term)] = i
    return vocab


def _tuple_ngrams(toks: list[str], n_max: int) -> Iterator[tuple[str, ...]]:
    """The 2..n_max-grams of ``toks`` as token tuples."""
    return chain.from_iterable(
        zip(*(toks[k:] for k in range(n)), strict=False) for n in range(2, n_max + 1)
    )


def _joined_ngrams(toks: list[str], n_max: int) -> Iterator[str]:
    """The 2..n_max-grams of ``toks`` as sklearn writes them (tokens joined by a space)."""
    return map(" ".join, _tuple_ngrams(toks, n_max))


def _params_from_entry(folder: Path, entry: dict) -> TfidfParams:
    """The TfidfParams of a manifest entry; unknown or missing keys are a corrupt bundle."""
    if not isinstance(entry, dict) or entry.get("kind") != TfidfEncoder.kind:
        raise BundleError(f"not a TF-IDF encoder manifest entry: {entry!r}", path=folder)
    raw = entry.get("params")
    known = {f.name for f in fields(TfidfParams)}
    if not isinstance(raw, dict) or not set(raw) <= known:
        raise BundleError(f"TF-IDF params are malformed: {raw!r}", path=folder)
    try:
        return TfidfParams(**raw)
    except InvalidInputError as exc:
        raise BundleError(f"TF-IDF params are invalid: {exc}", path=folder) from exc
