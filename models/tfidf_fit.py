"""Fitting the TF-IDF encoder: scikit-learn's ``TfidfVectorizer`` features, without it.

The corpus is cut into blocks of documents and goes through three steps:

1. **count** (worker processes, a block each): tokenize with the serving tokenizer, number the
   block's distinct tokens, pack every n-gram into one int64 key (its token ids as digits in
   a fixed base, each order in its own key range) and count it in one pass of a compiled hash
   table. A block sends back its distinct tokens, its distinct terms with their document and
   corpus frequencies, and its (document, term, count) triples: no Python object per
   occurrence, no per-document token list outlives the block.
2. **vocabulary** (this process, as blocks arrive): give tokens corpus-wide ids, re-key each
   block's terms and add them to one table of the corpus's distinct terms; then keep
   ``min_df``, sort the survivors by name (through their tokens' ranks: no strings) and cut
   to ``max_features`` the way sklearn's ``_limit_features`` does: the same float64 totals in
   the same order through the same ``argsort`` call, so the same ties win. Strings are built
   for the kept terms only.
3. **rows** (worker processes, forked after step 2 so they inherit its arrays): map each
   block's terms to feature ids and weight them with :func:`models.tfidf.weighted_rows`, the
   tail of the serving transform, so training rows are bit-identical to what the server
   computes for the same text.

Memory: the triples (8 bytes per pair, as the output matrix before min_df), a 4-byte term
id per distinct term of each block, and 32-80 bytes per distinct term of the corpus (int64
key, df and tf in arrays grown by doubling, 4-byte hash slots at most half full). Results do
not depend on the block size or the number of processes.

If a token holds a space (a custom ``token_pattern``), joined n-grams no longer tell their
tokens apart (sklearn merges ``"a b" + "c"`` with ``"a" + "b c"``); such corpora, and those
with too many distinct tokens for their n-gram keys to fit 63 bits (over 3e9 for bigrams,
2e6 for trigrams), are counted again with every n-gram as a string: slower, same result.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import count

import numba
import numpy as np
import scipy.sparse as sp

from models.data import row_pointers
from models.errors import InvalidInputError
from models.tfidf import (
    _FAST_DEFAULT_PATTERN,
    DEFAULT_TOKEN_PATTERN,
    TfidfParams,
    _joined_ngrams,
    stack_rows,
    weighted_rows,
)

# Documents per block, at most: few enough that a block's arrays stay in the tens of MB,
# enough that per-block overheads amortize and few terms repeat across blocks.
_BLOCK_DOCS = 2048
# ... and at least this many blocks per worker, so no worker idles while another finishes.
_BLOCKS_PER_WORKER = 4
# A worker process only pays off past this much text (~0.2 s of work against ~40 ms to
# start, feed and join it): cooking's 12k titles (1.1M characters) fit faster in-process.
_CHARS_PER_WORKER = 2_000_000
# Largest packed n-gram key; a test lowers it to force the string path.
_KEY_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class _Tokenizer:
    """What a worker needs to turn texts into terms (picklable, unlike a compiled regex)."""

    pattern: str
    lowercase: bool
    joined_ngram_max: int
    """1: tokens only (n-grams are packed from token ids); n > 1: the tokenizer also yields
    the 2..n-grams as joined strings (the string path)."""


@dataclass
class _BlockCounts:
    """Step 1's result for one block (token ids local to the block)."""

    tokens: list[str]
    """Distinct tokens (or terms, on the string path), position = local id."""
    terms: np.ndarray
    """int64 distinct term keys in first-seen order."""
    df: np.ndarray
    """int64 documents of the block holding each term."""
    tf: np.ndarray
    """int64 occurrences of each term in the block."""
    row_nnz: np.ndarray
    """int64 distinct terms of each document."""
    term_idx: np.ndarray
    """int32 (into ``terms``) of each (document, term) pair, grouped by document."""
    counts: np.ndarray
    """int32 occurrences of each pair."""


@dataclass
class _Block:
    """What step 3 needs of a block: its pairs, and its terms' corpus-wide ids."""

    row_nnz: np.ndarray
    term_idx: np.ndarray
    counts: np.ndarray
    term_ids: np.ndarray
    """int32 corpus-wide id of each of the block's terms."""


_RowsInput = tuple[list[_Block], np.ndarray, np.ndarray, bool]
# Step 3's input in a worker process, set by the pool's initializer: its forked workers get
# the parent's arrays by inheritance, never pickled (the parent's own global stays None).
_ROWS_INPUT: _RowsInput | None = None


@dataclass
class _Features:
    """The fitted vocabulary: what :class:`models.tfidf.TfidfEncoder` is built from."""

    terms: list[str]
    """Feature terms in sklearn's order (by name)."""
    token_keys: list | None
    """Each term as the serving vocabulary keys it (token tuple, or str for a unigram) when it
    keys by token tuples (default pattern, n-grams), else None."""
    idf: np.ndarray
    """float32 idf of each feature."""


def fit_tfidf(
    texts: Sequence[str], params: TfidfParams, workers: int | None = None
) -> tuple[_Features, sp.csr_matrix]:
    """(the features, the training matrix) of ``texts``, on at most ``workers`` processes
    (default: the cores this process may run on)."""
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a sequence of strings, not one string")
    n_docs = len(texts)
    try:
        n_chars = sum(map(len, texts))
    except TypeError as exc:
        raise InvalidInputError(f"texts must be strings: {exc}") from None
    workers = min(workers or _usable_cores(), max(1, n_chars // _CHARS_PER_WORKER))
    size = max(1, min(_BLOCK_DOCS, -(-n_docs // (workers * _BLOCKS_PER_WORKER))))
    bounds = [(lo, min(lo + size, n_docs)) for lo in range(0, n_docs, size)]
    workers = min(workers, len(bounds))
    _compile()
    pattern = params.token_pattern
    if pattern == DEFAULT_TOKEN_PATTERN:
        pattern = _FAST_DEFAULT_PATTERN
    n_max = params.ngram_max
    with _pool(workers) as pmap:
        corpus = _count_corpus(pmap, texts, bounds, _Tokenizer(pattern, params.lowercase, 1),
                               n_max)
    if corpus is None:  # a token holds a space, or too many tokens for packed n-grams
        n_max, tok = 1, _Tokenizer(pattern, params.lowercase, params.ngram_max)
        with _pool(workers) as pmap:
            corpus = _count_corpus(pmap, texts, bounds, tok, n_max)
        assert corpus is not None  # one token per key always fits
    tokens, table, blocks = corpus
    features, feature_of = _select_features(tokens, table, n_max, params, n_docs)
    del tokens, table
    return features, _rows(blocks, feature_of, features.idf, params.sublinear_tf, workers)


def _rows(blocks: list[_Block], feature_of: np.ndarray, idf: np.ndarray, sublinear: bool,
          workers: int) -> sp.csr_matrix:
    """Step 3: the training matrix, a block per task; empties ``blocks`` as it goes."""
    rows_input = (blocks, feature_of, idf, sublinear)
    row_nnz, indices, data = [], [], []
    with _pool(workers, rows_input) as pmap:
        for i, (nnz, ind, val) in enumerate(pmap(_block_rows, range(len(blocks)))):
            blocks[i] = None  # type: ignore[call-overload]  # done: free it now
            row_nnz.append(nnz)
            indices.append(ind)
            data.append(val)
    return stack_rows(row_nnz, indices, data, len(idf))


def _count_corpus(
    pmap: Callable, texts: Sequence[str], bounds: list[tuple[int, int]], tok: _Tokenizer,
    n_max: int,
) -> tuple[list[str], _TermTable, list[_Block]] | None:
    """Steps 1 and 2a: (corpus tokens by id, the corpus's terms, the blocks), merging each
    block as it arrives; None if n-grams cannot be packed (count again on the string path)."""
    tasks = ((list(texts[lo:hi]), tok, n_max) for lo, hi in bounds)
    base = _max_base(n_max)
    # token -> the number of setdefault calls before its first one: a C-level map() call
    # per token instead of a Python loop; `firsts` (ascending) turns that into dense ids.
    first_call: dict[str, int] = {}
    n_calls = 0
    firsts = np.zeros(0, np.int64)
    table = _TermTable()
    blocks = []
    for counted in pmap(_count_block, tasks):
        if counted is None:
            return None
        n = len(counted.tokens)
        calls = np.fromiter(map(first_call.setdefault, counted.tokens, count(n_calls)),
                            np.int64, n)
        firsts = np.concatenate([firsts, calls[calls == np.arange(n_calls, n_calls + n)]])
        n_calls += n
        if len(firsts) > base:
            return None
        remap = np.searchsorted(firsts, calls)
        term_ids = table.add(_rekey(counted.terms, remap, base, n_max), counted.df, counted.tf)
        blocks.append(_Block(counted.row_nnz, counted.term_idx, counted.counts, term_ids))
    if not first_call:
        raise InvalidInputError(
            "cannot fit TF-IDF on these texts: no token matches the token pattern")
    return list(first_call), table, blocks


def _select_features(
    tokens: list[str], table: _TermTable, n_max: int, params: TfidfParams, n_docs: int
) -> tuple[_Features, np.ndarray]:
    """Step 2b: (the features, feature id of each corpus term or -1)."""
    df, tf = table.df[: table.n], table.tf[: table.n]
    survivors = np.flatnonzero(df >= params.min_df)
    keys, base = table.keys[survivors], _max_base(n_max)
    by_name = _by_name(keys, tokens, base, n_max)
    if by_name is None:  # a token holds a character <= " ": sort the joined strings
        names = _term_strings(keys, tokens, base, n_max)[0]
        by_name = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)
        del names
    kept = _limit_features(by_name, tf[survivors], params.max_features)
    if not len(kept):
        raise InvalidInputError(
            "cannot fit TF-IDF on these texts: after pruning, no terms remain; try a lower "
            "min_df")
    # Strings for the kept terms only (200k at most, where millions may pass min_df), and
    # the token tuples the encoder keys its vocabulary by: no splitting of strings there.
    tuples = n_max > 1 and params.token_pattern == DEFAULT_TOKEN_PATTERN
    terms, token_keys = _term_strings(keys[kept], tokens, base, n_max, tuples=tuples)
    feature_of = np.full(table.n, -1, np.int32)
    feature_of[survivors[kept]] = np.arange(len(kept), dtype=np.int32)
    idf = _idf(df[survivors[kept]], n_docs, params.smooth_idf)
    return _Features(terms, token_keys, idf), feature_of


def _by_name(keys: np.ndarray, tokens: list[str], base: int, n_max: int) -> np.ndarray | None:
    """Positions of ``keys`` in sklearn's order of their terms (by name), without building
    the terms: when no token holds a character <= " ", comparing two joined n-grams is
    comparing their token tuples token by token, a tuple before any it is a prefix of (the
    space that follows it sorts first). So the terms sort by their tokens' ranks, with one
    numpy lexsort. None when some token does hold such a character."""
    if n_max > 1 and tokens and min("".join(tokens)) <= " ":
        return None
    rank = np.empty(len(tokens), np.int64)
    rank[np.array(sorted(range(len(tokens)), key=tokens.__getitem__), dtype=np.int64)] = (
        np.arange(len(tokens)))
    order, digits = _digits(keys, base, n_max)
    columns = []  # columns[p]: rank of the term's token p, -1 past its end
    for p in range(n_max):
        column = np.full(len(keys), -1, np.int64)
        for k in range(p + 1, n_max + 1):
            at = order == k
            column[at] = rank[digits[k - 1 - p][at]]
        columns.append(column)
    return np.lexsort(columns[::-1])  # the last key given is lexsort's primary one


class _TermTable:
    """The distinct terms of the blocks added so far, with summed df and tf (grows by
    doubling, its :func:`_id_slots` rebuilt at each growth)."""

    def __init__(self) -> None:
        self.n = 0
        self.keys = np.zeros(0, np.int64)
        self.df = np.zeros(0, np.int64)
        self.tf = np.zeros(0, np.int64)
        self._slots, self._bits = _id_slots(self.keys, 0)

    def add(self, keys: np.ndarray, df: np.ndarray, tf: np.ndarray) -> np.ndarray:
        """Adds a block's distinct terms; returns their int32 ids in the table."""
        need = self.n + len(keys)
        if need > len(self.keys):
            size = max(need, 2 * len(self.keys), 1024)
            if size >= 2**31:
                raise InvalidInputError("more than 2**31 distinct terms: cannot fit TF-IDF")
            self.keys, self.df, self.tf = (_grown(a, size) for a in (self.keys, self.df, self.tf))
            self._slots, self._bits = _id_slots(self.keys[: self.n], size)
        self.n, ids = _merge_into(self._slots, self._bits, self.keys, self.df, self.tf, self.n,
                                  keys, df, tf)
        return ids


def _grown(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, a.dtype)
    out[: len(a)] = a
    return out


def _limit_features(by_name: np.ndarray, tf: np.ndarray, max_features: int) -> np.ndarray:
    """Of the terms ``by_name`` (positions, in name order), those kept, in that order.

    sklearn sorts the whole vocabulary by name, then keeps the ``max_features`` terms of
    largest float64 total count by ``(-tf).argsort()``: an unstable sort, so which of the
    terms tied at the cut survive depends on the exact array. The same array (min_df
    survivors in name order, float64 totals) through the same call picks the same terms."""
    if len(by_name) <= max_features:
        return by_name
    tfs = tf[by_name].astype(np.float64)  # sklearn sums a float64 count matrix
    return by_name[np.sort((-tfs).argsort()[:max_features])]


def _idf(df: np.ndarray, n_docs: int, smooth: bool) -> np.ndarray:
    """float32 idf, computed in float64 with sklearn's ``TfidfTransformer.fit`` operations."""
    df = df.astype(np.float64)
    df += float(smooth)
    idf = np.full_like(df, fill_value=n_docs + int(smooth), dtype=np.float64)
    idf /= df
    np.log(idf, out=idf)
    idf += 1.0
    return idf.astype(np.float32)


# ------------------------------------------------------------------ packed n-gram keys


def _offsets(base: int, n_max: int) -> list[int]:
    """First key of each n-gram order: order k holds keys offset[k-1] + [0, base**k)."""
    out = [0]
    for k in range(1, n_max):
        out.append(out[-1] + base**k)
    return out


def _max_base(n_max: int) -> int:
    """Largest token count whose 1..n_max-gram keys all fit ``_KEY_LIMIT``."""
    if n_max == 1:
        return 2**63 - 1  # a key is a token id: any count fits
    def fits(base: int) -> bool:
        return _offsets(base, n_max + 1)[-1] - 1 <= _KEY_LIMIT

    base = min(round((_KEY_LIMIT + 1) ** (1 / n_max)), _KEY_LIMIT)
    while not fits(base):
        base -= 1
    while base < _KEY_LIMIT and fits(base + 1):
        base += 1
    return base


def _digits(keys: np.ndarray, base: int, n_max: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(order of each key, its token ids from the last token back; past the order: 0)."""
    offsets = np.array(_offsets(base, n_max), dtype=np.int64)
    order = np.searchsorted(offsets, keys, side="right")
    rest = keys - offsets[order - 1]
    digits = []
    for _ in range(n_max):
        digits.append(rest % base)
        rest //= base
    return order, digits


def _rekey(keys: np.ndarray, remap: np.ndarray, base: int, n_max: int) -> np.ndarray:
    """Block keys (token ids local to the block) -> corpus keys (``remap``ped ids)."""
    if n_max == 1:
        return remap[keys]
    order, digits = _digits(keys, base, n_max)
    out = np.array(_offsets(base, n_max), dtype=np.int64)[order - 1]
    scale = 1
    for j, d in enumerate(digits):
        out += np.where(order > j, remap[d] * scale, 0)
        scale *= base
    return out


def _term_strings(
    keys: np.ndarray, tokens: list[str], base: int, n_max: int, *, tuples: bool = False
) -> tuple[list[str], list | None]:
    """(sklearn's term, tokens joined by a space, of each corpus key in the order given; with
    ``tuples``, each as the serving vocabulary keys it: a token tuple, a unigram its str)."""
    # By key, each n-gram order is one slice: whole lists built by map() and zip() in C.
    by_key = np.argsort(keys, kind="stable")
    order, digits = _digits(keys[by_key], base, n_max)
    bounds = np.searchsorted(order, np.arange(1, n_max + 2)).tolist()
    joined: list = []
    split: list = []
    for k in range(1, n_max + 1):
        lo, hi = bounds[k - 1], bounds[k]
        columns = [list(map(tokens.__getitem__, digits[j][lo:hi].tolist()))
                   for j in range(k - 1, -1, -1)]
        grams = columns[0] if k == 1 else list(zip(*columns, strict=True))
        joined += grams if k == 1 else map(" ".join, grams)
        if tuples:
            split += grams
    back = np.argsort(by_key).tolist()
    return (list(map(joined.__getitem__, back)),
            list(map(split.__getitem__, back)) if tuples else None)


# ------------------------------------------------------------------ compiled counting

_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: 2**64 / golden ratio


@numba.njit(cache=True)
def _hash_table(n_keys: int) -> tuple[np.ndarray, int]:
    """Empty open-addressing table for up to ``n_keys`` keys >= 0 (at most half full): slot
    ``s`` holds its key at ``2s`` (-1: free) and the key's id at ``2s + 1``, so one probe
    reads one cache line."""
    bits = 1
    while (1 << bits) < 2 * n_keys:
        bits += 1
    return np.full(2 << bits, -1, np.int64), bits


@numba.njit(inline="always")
def _id_of(table: np.ndarray, bits: int, key: int, next_id: int) -> tuple[int, bool]:
    """(id of ``key``, whether it was absent and got ``next_id``); linear probing."""
    mask = (1 << bits) - 1
    slot = np.int64((np.uint64(key) * _HASH_MULTIPLIER) >> np.uint64(64 - bits))
    while True:
        found = table[2 * slot]
        if found == key:
            return table[2 * slot + 1], False
        if found == -1:
            table[2 * slot] = key
            table[2 * slot + 1] = next_id
            return next_id, True
        slot = (slot + 1) & mask


@numba.njit(cache=True)
def _dense_ids(first: np.ndarray) -> np.ndarray:
    """First-occurrence positions -> 0, 1, 2, ... in order of first occurrence."""
    ids = np.empty(len(first), np.int64)
    n = 0
    for i in range(len(first)):
        if first[i] == i:  # the token's first occurrence
            ids[i] = n
            n += 1
        else:
            ids[i] = ids[first[i]]
    return ids


@numba.njit(cache=True)
def _count_terms(ids: np.ndarray, lengths: np.ndarray, base: int, offsets: np.ndarray
                 ) -> tuple[np.ndarray, ...]:
    """Every 1..n-gram of every document of a block, counted in one pass (n = len(offsets)).

    Returns (distinct term keys in first-seen order, their df, their tf, distinct terms per
    document, term of each (document, term) pair grouped by document, count of each pair).
    A hash table gives term ids; ``last_doc`` tells a term's first occurrence in a document,
    so no sort is needed."""
    n_max = len(offsets)
    n_occ = 0
    for length in lengths:
        for k in range(1, n_max + 1):
            n_occ += max(length - k + 1, 0)
    # Sized for a guess of the distinct terms, doubled when half full: a small table stays
    # in cache, where one sized for every occurrence would not.
    table, bits = _hash_table(max(n_occ // 8, 1024))
    terms = np.empty(n_occ, np.int64)
    # Per term, side by side (one cache line): document of its last pair, that pair, df, tf.
    state = np.empty((n_occ, 4), np.int64)
    pair_term = np.empty(n_occ, np.int32)
    pair_count = np.empty(n_occ, np.int32)
    row_nnz = np.zeros(len(lengths), np.int64)
    n_terms = 0
    n_pairs = 0
    start = 0
    for doc in range(len(lengths)):
        end = start + lengths[doc]
        for k in range(1, n_max + 1):
            for i in range(start, end - k + 1):
                key = 0
                for j in range(i, i + k):
                    key = key * base + ids[j]
                key += offsets[k - 1]
                term, new = _id_of(table, bits, key, n_terms)
                if new:
                    terms[n_terms] = key
                    state[n_terms, 0] = -1
                    state[n_terms, 2] = 0
                    state[n_terms, 3] = 0
                    n_terms += 1
                    if 4 * n_terms > len(table):  # half of the len(table) // 2 slots
                        table, bits = _rehash(terms[:n_terms], 2 * n_terms)
                state[term, 3] += 1
                if state[term, 0] == doc:
                    pair_count[state[term, 1]] += 1
                else:
                    state[term, 0] = doc
                    state[term, 1] = n_pairs
                    state[term, 2] += 1
                    pair_term[n_pairs] = term
                    pair_count[n_pairs] = 1
                    n_pairs += 1
                    row_nnz[doc] += 1
        start = end
    return (terms[:n_terms].copy(), state[:n_terms, 2].copy(), state[:n_terms, 3].copy(),
            row_nnz, pair_term[:n_pairs].copy(), pair_count[:n_pairs].copy())


@numba.njit(cache=True)
def _rehash(keys: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """A :func:`_hash_table` for ``size`` keys holding ``keys`` (key i has id i)."""
    slots, bits = _hash_table(size)
    for i in range(len(keys)):
        _id_of(slots, bits, keys[i], i)
    return slots, bits


@numba.njit(cache=True)
def _id_slots(keys: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """An open-addressing table for ``size`` keys of the array ``keys`` holding its current
    ones: slots hold only int32 ids (-1: free), the key is read from ``keys[id]``. A quarter
    of :func:`_hash_table`'s bytes, for the corpus table of millions of terms."""
    bits = 1
    while (1 << bits) < 2 * size:
        bits += 1
    slots = np.full(1 << bits, -1, np.int32)
    for i in range(len(keys)):
        _slot_id(slots, bits, keys, keys[i], i)
    return slots, bits


@numba.njit(inline="always")
def _slot_id(slots: np.ndarray, bits: int, all_keys: np.ndarray, key: int,
             next_id: int) -> tuple[int, bool]:
    """:func:`_id_of` for :func:`_id_slots` tables (``all_keys[next_id]`` is set by the
    caller when the key is new)."""
    mask = (1 << bits) - 1
    slot = np.int64((np.uint64(key) * _HASH_MULTIPLIER) >> np.uint64(64 - bits))
    while True:
        found = slots[slot]
        if found == -1:
            slots[slot] = next_id
            return next_id, True
        if all_keys[found] == key:
            return found, False
        slot = (slot + 1) & mask


@numba.njit(cache=True)
def _merge_into(slots: np.ndarray, bits: int, all_keys: np.ndarray, all_df: np.ndarray,
                all_tf: np.ndarray, n: int, keys: np.ndarray, df: np.ndarray,
                tf: np.ndarray) -> tuple[int, np.ndarray]:
    """Adds ``keys`` (distinct) with their df and tf to the first ``n`` of ``all_*``, which
    have room for them; returns the new ``n`` and each key's int32 id."""
    ids = np.empty(len(keys), np.int32)
    for i in range(len(keys)):
        term, new = _slot_id(slots, bits, all_keys, keys[i], n)
        if new:
            all_keys[n] = keys[i]
            n += 1
        all_df[term] += df[i]
        all_tf[term] += tf[i]
        ids[i] = term
    return n, ids


def _compile() -> None:
    """Compile (or load from numba's cache) every kernel here, once, before workers fork:
    they inherit the machine code instead of each compiling it."""
    one = np.ones(1, np.int64)
    _count_terms(one, one, 2, np.zeros(1, np.int64))
    _rehash(one, 1)
    slots, bits = _id_slots(one, 1)
    _merge_into(slots, bits, one, one, one, 1, one, one, one)
    _dense_ids(np.zeros(1, np.int64))


# ------------------------------------------------------------------ worker tasks


def _count_block(task: tuple[list[str], _Tokenizer, int]) -> _BlockCounts | None:
    """Step 1 for one block; None if its n-gram keys would overflow (string path then)."""
    texts, tok, n_max = task
    flat, lengths = _tokenize(texts, tok)
    # One dict pass: each occurrence -> the position of its token's first occurrence.
    first_of: dict[str, int] = {}
    first = np.fromiter(map(first_of.setdefault, flat, count()), np.int64, len(flat))
    tokens = list(first_of)  # distinct, in first-seen order: dense id = index here
    del flat, first_of
    base = _max_base(n_max)
    # (joining cannot create a space, so this asks whether some token holds one)
    if n_max > 1 and (len(tokens) > base or " " in "".join(tokens)):
        return None
    ids = _dense_ids(first)
    offsets = np.array(_offsets(base, n_max), dtype=np.int64)
    terms, df, tf, row_nnz, term_idx, counts = _count_terms(ids, lengths, base, offsets)
    return _BlockCounts(tokens, terms, df, tf, row_nnz, term_idx, counts)


def _tokenize(texts: list[str], tok: _Tokenizer) -> tuple[list[str], np.ndarray]:
    """(every term occurrence of the block, in order; terms per document)."""
    findall = re.compile(tok.pattern).findall
    lowercase = tok.lowercase
    n_join = tok.joined_ngram_max
    flat: list[str] = []
    extend = flat.extend
    lengths: list[int] = []
    try:
        for text in texts:
            toks = findall(text.lower() if lowercase else text)
            if n_join > 1:  # (listed first: the n-grams are sliced from toks lazily)
                toks += list(_joined_ngrams(toks, n_join))
            extend(toks)
            lengths.append(len(toks))
    except (AttributeError, TypeError) as exc:
        raise InvalidInputError(f"texts must be strings: {exc}") from None
    return flat, np.array(lengths, dtype=np.int64)


def _set_rows_input(rows_input: _RowsInput) -> None:
    global _ROWS_INPUT
    _ROWS_INPUT = rows_input


def _block_rows(index: int, rows_input: _RowsInput | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 3 for block ``index``: (nnz per row, feature ids, values); the input is
    ``rows_input``, or in a worker the one its pool's initializer set."""
    rows_input = rows_input or _ROWS_INPUT
    assert rows_input is not None
    blocks, feature_of, idf, sublinear = rows_input
    block = blocks[index]
    n_rows = len(block.row_nnz)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), block.row_nnz)
    cols = feature_of[block.term_ids][block.term_idx]
    known = cols >= 0
    rows = rows[known]
    indptr = row_pointers(rows, n_rows)
    # scipy sorts each short row (C++), about twice as fast as one argsort of the block.
    counts = sp.csr_matrix((block.counts[known], cols[known], indptr), shape=(n_rows, len(idf)))
    counts.sort_indices()
    keys = rows * len(idf) + counts.indices
    return weighted_rows(keys, counts.data, n_rows, idf, sublinear)


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (Linux)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def _pool(
    workers: int, rows_input: _RowsInput | None = None
) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered ``map`` over ``workers`` forked processes (the builtin one for 1), whose
    workers start with ``rows_input`` (for :func:`_block_rows`)."""
    if workers <= 1:
        yield map if rows_input is None else (
            lambda fn, items: map(partial(fn, rows_input=rows_input), items))
        return
    # fork: workers start in milliseconds and need nothing re-imported; tasks carry their
    # data, or inherit it through the initializer's arguments (not pickled under fork).
    context = multiprocessing.get_context("fork")
    if rows_input is None:
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    else:
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                       initializer=_set_rows_input, initargs=(rows_input,))
    with executor:
        yield executor.map
