"""Fitting the TF-IDF encoder: scikit-learn's ``TfidfVectorizer`` features, without it.

The corpus is cut into blocks of documents and goes through three steps:

1. **count** (worker processes, one block each): tokenize with the serving tokenizer, give the
   block's distinct tokens local ids, pack every n-gram into one int64 key (its token ids as
   digits in base ``n_tokens``, each order in its own key range) and count the distinct
   (document, term) pairs with two numpy sorts. A block sends back its distinct tokens, its
   distinct terms with their document and corpus frequencies, and the (document, term, count)
   triples: no Python object per occurrence, no per-document token list survives the block.
2. **vocabulary** (this process): merge the blocks' tokens into global ids, re-key and sum the
   block terms, keep ``min_df``, build the strings of the surviving terms only, sort them by
   name and cut to ``max_features`` the way sklearn's ``_limit_features`` does: the same
   float64 totals in the same order through the same ``argsort`` call, so the same ties win.
3. **rows** (worker processes): map each block's terms to feature ids and weight them with
   :func:`models.tfidf.weighted_rows`, the tail of the serving transform, so training rows are
   bit-identical to what the server computes for the same text.

Memory: the triples (8 bytes per nonzero, as the output matrix) and one int64 key with two
counts per distinct term of the corpus. Results do not depend on the block size or the number
of processes.

If a token holds a space (a custom ``token_pattern``), joined n-grams no longer tell their
tokens apart (sklearn merges ``"a b" + "c"`` with ``"a" + "b c"``); such corpora, and those
whose n-gram keys would not fit 63 bits, are counted again with every n-gram as a string:
slower, same result.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

from models.errors import InvalidInputError
from models.tfidf import (
    _FAST_DEFAULT_PATTERN,
    DEFAULT_TOKEN_PATTERN,
    TfidfParams,
    _joined_ngrams,
    stack_rows,
    weighted_rows,
)

# Documents per block: large enough that numpy calls amortize and few terms repeat across
# blocks, small enough that a block's arrays stay in cache-sized tens of MB.
_BLOCK_DOCS = 2048
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
    """Step 1's result for one block (local token ids, local term keys)."""

    tokens: list[str]
    """Distinct tokens (or terms, on the string path), position = local id."""
    terms: np.ndarray
    """int64 distinct term keys in first-seen order, packed in base ``len(tokens)``."""
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


def fit_tfidf(
    texts: Sequence[str], params: TfidfParams, workers: int | None = None
) -> tuple[list[str], np.ndarray, sp.csr_matrix]:
    """(feature terms in sklearn order, float32 idf, training matrix) of ``texts``."""
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a sequence of strings, not one string")
    n_docs = len(texts)
    bounds = [(lo, min(lo + _BLOCK_DOCS, n_docs)) for lo in range(0, n_docs, _BLOCK_DOCS)]
    workers = workers or len(os.sched_getaffinity(0))
    # Compile (or load from numba's cache) here, once, so forked workers inherit the code.
    one = np.ones(1, np.int64)
    _count_terms(one, one, 2, np.zeros(1, np.int64))
    _merge_terms(one, one, one)
    with _pool(workers if len(bounds) > 1 else 1) as pmap:
        pattern = params.token_pattern
        if pattern == DEFAULT_TOKEN_PATTERN:
            pattern = _FAST_DEFAULT_PATTERN
        n_max = params.ngram_max
        tok = _Tokenizer(pattern, params.lowercase, 1)
        vocab = _fit_vocabulary(pmap, texts, bounds, tok, n_max, params)
        if vocab is None:  # a token holds a space, or the packed keys would overflow
            tok = _Tokenizer(pattern, params.lowercase, n_max)
            vocab = _fit_vocabulary(pmap, texts, bounds, tok, 1, params)
            assert vocab is not None  # one packed digit always fits
        terms, idf, blocks, col_maps = vocab
        tasks = (
            (cmap, b.row_nnz, b.term_idx, b.counts, idf, params.sublinear_tf)
            for cmap, b in zip(col_maps, blocks, strict=True)
        )
        row_nnz, indices, data = [], [], []
        for nnz, ind, val in pmap(_block_rows, tasks):
            row_nnz.append(nnz)
            indices.append(ind)
            data.append(val)
    return terms, idf, stack_rows(row_nnz, indices, data, len(terms))


_Vocabulary = tuple[list[str], np.ndarray, list[_BlockCounts], list[np.ndarray]]


def _fit_vocabulary(
    pmap: Callable, texts: Sequence[str], bounds: list[tuple[int, int]], tok: _Tokenizer,
    n_max: int, params: TfidfParams,
) -> _Vocabulary | None:
    """Steps 1 and 2: (terms, idf, block counts, each block's term -> feature id or -1);
    None when n-grams cannot be packed (then count again with ``joined_ngram_max``)."""
    tasks = ((list(texts[lo:hi]), tok, n_max) for lo, hi in bounds)
    blocks: list[_BlockCounts] = []
    global_ids: dict[str, int] = {}
    remaps = []
    local_bases = []
    setdefault = global_ids.setdefault
    for block in pmap(_count_block, tasks):
        if block is None:
            return None
        remaps.append(np.array([setdefault(t, len(global_ids)) for t in block.tokens], np.int64))
        local_bases.append(len(block.tokens))
        block.tokens = []  # merged: the global dict holds each token once
        blocks.append(block)
    tokens = list(global_ids)
    del global_ids
    if not tokens:
        raise InvalidInputError(
            "cannot fit TF-IDF on these texts: no token matches the token pattern")
    base = len(tokens)
    if n_max > 1 and (_key_bound(base, n_max) > _KEY_LIMIT or any(" " in t for t in tokens)):
        return None
    keys = [
        _rekey(b.terms, local_base, remap, base, n_max)
        for b, local_base, remap in zip(blocks, local_bases, remaps, strict=True)
    ]
    del remaps
    # One global id per distinct term; `where` cuts it back into per-block pieces.
    all_terms, term_of, df, tf = _merge_terms(
        np.concatenate(keys),
        np.concatenate([b.df for b in blocks]),
        np.concatenate([b.tf for b in blocks]),
    )
    where = np.cumsum([0, *(len(k) for k in keys)])
    del keys
    survivors = np.flatnonzero(df >= params.min_df)
    names = _term_strings(all_terms[survivors], tokens, base, n_max)
    del all_terms, tokens
    kept = _limit_features(names, tf[survivors], params.max_features)
    if not len(kept):
        raise InvalidInputError(
            "cannot fit TF-IDF on these texts: after pruning, no terms remain; try a lower "
            "min_df")
    terms = [names[i] for i in kept.tolist()]
    del names
    feature_of = np.full(len(df), -1, np.int32)
    feature_of[survivors[kept]] = np.arange(len(kept), dtype=np.int32)
    idf = _idf(df[survivors[kept]], len(texts), params.smooth_idf)
    col_maps = [feature_of[term_of[where[i] : where[i + 1]]] for i in range(len(blocks))]
    return terms, idf, blocks, col_maps


def _limit_features(names: list[str], tf: np.ndarray, max_features: int) -> np.ndarray:
    """Positions in ``names`` of the kept features, in sklearn's feature order (by name).

    sklearn sorts the whole vocabulary by name, then keeps the ``max_features`` terms of
    largest float64 total count by ``(-tf).argsort()``: an unstable sort, so which of the
    terms tied at the cut survive depends on the exact array. The same array (min_df
    survivors in name order, float64 totals) through the same call picks the same terms."""
    by_name = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)
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


def _key_bound(base: int, n_max: int) -> int:
    """One past the largest key of n-grams up to ``n_max`` over ``base`` tokens."""
    return _offsets(base, n_max + 1)[-1]


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


def _rekey(
    keys: np.ndarray, base: int, remap: np.ndarray, new_base: int, n_max: int
) -> np.ndarray:
    """Block keys (token ids local to the block) -> global keys (``remap``ped ids)."""
    if n_max == 1:
        return remap[keys]
    order, digits = _digits(keys, base, n_max)
    out = np.array(_offsets(new_base, n_max), dtype=np.int64)[order - 1]
    scale = 1
    for j, d in enumerate(digits):
        out += np.where(order > j, remap[d] * scale, 0)
        scale *= new_base
    return out


def _term_strings(keys: np.ndarray, tokens: list[str], base: int, n_max: int) -> list[str]:
    """sklearn's term (tokens joined by a space) of each global key, in the order given."""
    if n_max == 1:
        return [tokens[i] for i in keys.tolist()]
    order, digits = _digits(keys, base, n_max)
    names: list[str | None] = [None] * len(keys)
    for k in range(1, n_max + 1):
        at = np.flatnonzero(order == k)
        columns = [[tokens[i] for i in digits[j][at].tolist()] for j in range(k - 1, -1, -1)]
        for i, name in zip(at.tolist(), map(" ".join, zip(*columns, strict=True)), strict=True):
            names[i] = name
    return names  # type: ignore[return-value]  # every order filled its positions


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
def _count_terms(ids: np.ndarray, lengths: np.ndarray, base: int, offsets: np.ndarray):
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
    table, bits = _hash_table(n_occ)
    terms = np.empty(n_occ, np.int64)
    df = np.zeros(n_occ, np.int64)
    tf = np.zeros(n_occ, np.int64)
    last_doc = np.full(n_occ, -1, np.int64)
    last_pair = np.empty(n_occ, np.int64)
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
                    n_terms += 1
                tf[term] += 1
                if last_doc[term] == doc:
                    pair_count[last_pair[term]] += 1
                else:
                    last_doc[term] = doc
                    last_pair[term] = n_pairs
                    df[term] += 1
                    pair_term[n_pairs] = term
                    pair_count[n_pairs] = 1
                    n_pairs += 1
                    row_nnz[doc] += 1
        start = end
    return (terms[:n_terms].copy(), df[:n_terms].copy(), tf[:n_terms].copy(), row_nnz,
            pair_term[:n_pairs].copy(), pair_count[:n_pairs].copy())


@numba.njit(cache=True)
def _merge_terms(keys: np.ndarray, df: np.ndarray, tf: np.ndarray):
    """(distinct keys in first-seen order, index of each input key in them, summed df, tf)."""
    table, bits = _hash_table(len(keys))
    distinct = np.empty(len(keys), np.int64)
    index = np.empty(len(keys), np.int64)
    total_df = np.zeros(len(keys), np.int64)
    total_tf = np.zeros(len(keys), np.int64)
    n = 0
    for i in range(len(keys)):
        term, new = _id_of(table, bits, keys[i], n)
        if new:
            distinct[n] = keys[i]
            n += 1
        index[i] = term
        total_df[term] += df[i]
        total_tf[term] += tf[i]
    return distinct[:n].copy(), index, total_df[:n].copy(), total_tf[:n].copy()


# ------------------------------------------------------------------ worker tasks


def _count_block(task: tuple[list[str], _Tokenizer, int]) -> _BlockCounts | None:
    """Step 1 for one block; None if its n-gram keys would overflow (string path then)."""
    texts, tok, n_max = task
    flat, lengths = _tokenize(texts, tok)
    ids_of = dict.fromkeys(flat)  # distinct tokens in first-seen order
    tokens = list(ids_of)
    if n_max > 1 and _key_bound(len(tokens), n_max) > _KEY_LIMIT:
        return None
    ids_of = dict(zip(tokens, range(len(tokens)), strict=True))
    ids = np.fromiter(map(ids_of.__getitem__, flat), np.int64, len(flat))
    del flat, ids_of
    offsets = np.array(_offsets(len(tokens), n_max), dtype=np.int64)
    terms, df, tf, row_nnz, term_idx, counts = _count_terms(ids, lengths, len(tokens), offsets)
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
            if n_join > 1:
                toks += _joined_ngrams(toks, n_join)
            extend(toks)
            lengths.append(len(toks))
    except (AttributeError, TypeError) as exc:
        raise InvalidInputError(f"texts must be strings: {exc}") from None
    return flat, np.array(lengths, dtype=np.int64)


def _block_rows(
    task: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 3 for one block: (nnz per row, feature ids, values) of its CSR rows."""
    col_map, row_nnz, term_idx, counts, idf, sublinear = task
    n_rows = len(row_nnz)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), row_nnz)
    cols = col_map[term_idx]
    known = cols >= 0
    keys = rows[known] * len(idf) + cols[known]
    order = np.argsort(keys)
    return weighted_rows(keys[order], counts[known][order], n_rows, idf, sublinear)


@contextmanager
def _pool(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered ``map`` over ``workers`` forked processes (the builtin one for 1)."""
    if workers <= 1:
        yield map
        return
    # fork: workers start in milliseconds and need nothing re-imported; tasks carry their data.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as executor:
        yield executor.map
