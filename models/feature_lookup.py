"""Where a document's features are among a chunk's rows: the search's lookups.

A chunk (see :mod:`models.tree`) stores its rows sorted by feature id, and a document's
search asks, for each of its features, which row holds it. A binary search over the whole
chunk answers with a chain of dependent loads, each a cache miss once the ensemble is larger
than the CPU's cache. Two stored indexes shorten that chain:

- a **feature bitmap** (the largest chunks first, within a memory budget): 64 features a
  word, each word followed by the rows of the words before it; one cache line says whether
  and where a feature is. It costs 2 bits per vocabulary feature per chunk.
- a **row directory** (every other chunk of some size): the chunk's rows before each range
  of feature ids, the ranges as wide as to hold a few rows each; a feature's range leaves a
  search of a few neighbouring rows. It costs about one byte per row.

Both are written at build time and memory-mapped by every serving process
(:class:`FeatureLookup`); the search kernels read them (:mod:`models.search`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from models.tree import Ensemble


@numba.njit(inline="always")
def popcount(x: np.uint64) -> int:
    """Set bits of a 64-bit word (SWAR: numba has no popcount intrinsic)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return int((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


#: chunks with fewer rows are searched directly: a binary search of a few rows is as fast as
#: a bitmap word and costs no memory
BITMAP_MIN_ROWS = 16
#: a row directory is kept for chunks of at least this many rows that have no bitmap
DIR_MIN_ROWS = 64
#: rows a directory range holds on average: its ranges are as wide as to hold that many
DIR_ROWS_PER_RANGE = 4
#: memory for the feature bitmaps of a bundle that has none stored (older formats) and of
#: the builder's own short-lived searchers
BITMAP_MB = 128


def build_feature_bitmaps(chunk_ptr: np.ndarray, chunk_feat: np.ndarray, n_features: int,
                          budget_bytes: int,
                          min_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Feature bitmaps for the chunks with at least ``min_rows`` rows, in node order until
    ``budget_bytes`` is spent: nodes are numbered layer by layer across the trees
    (:func:`models.tree.join_trees`), so the top layers of every tree, which every document
    expands, come first. Returns (bitmap_off per node, -1 for none; bitmap uint64: per chunk
    and 64 features, the word of the features it has, then the chunk's rows in the words
    before)."""
    n_nodes = chunk_ptr.shape[0] - 1
    bitmap_off = np.full(n_nodes, -1, dtype=np.int64)
    n_words = (n_features + 63) >> 6
    per_chunk = 2 * n_words * 8
    min_rows = BITMAP_MIN_ROWS if min_rows is None else min_rows
    eligible = np.flatnonzero(np.diff(chunk_ptr) >= max(1, min_rows))
    chosen = eligible[: budget_bytes // per_chunk].astype(np.int64)
    bitmap = np.zeros(len(chosen) * 2 * n_words, dtype=np.uint64)
    _fill_feature_bitmaps(np.asarray(chunk_ptr), np.asarray(chunk_feat), chosen, n_words,
                          bitmap)
    bitmap_off[chosen] = np.arange(len(chosen), dtype=np.int64) * 2 * n_words
    return bitmap_off, bitmap


@numba.njit(nogil=True, cache=True)
def _fill_feature_bitmaps(chunk_ptr: np.ndarray, chunk_feat: np.ndarray, chosen: np.ndarray,
                          n_words: int, out: np.ndarray) -> None:
    """Sets each chosen chunk's feature bits, then the running row count before each word."""
    for k in range(chosen.shape[0]):
        node = chosen[k]
        base = k * 2 * n_words
        for r in range(chunk_ptr[node], chunk_ptr[node + 1]):
            f = chunk_feat[r]
            out[base + 2 * (f >> 6)] |= np.uint64(1) << np.uint64(f & 63)
        acc = 0
        for w in range(n_words):
            out[base + 2 * w + 1] = np.uint64(acc)
            acc += popcount(out[base + 2 * w])


def directory_shift(n_rows: np.ndarray, n_features: int) -> np.ndarray:
    """Per chunk, log2 of its directory's range width: the narrowest power of two that
    leaves at most n_rows / DIR_ROWS_PER_RANGE ranges (at least one)."""
    n_ranges = np.maximum(1, np.asarray(n_rows, dtype=np.int64) // DIR_ROWS_PER_RANGE)
    width = -(-n_features // n_ranges)  # ceil
    return np.ceil(np.log2(np.maximum(width, 1))).astype(np.int64)


def directory_lengths(shift: np.ndarray, n_features: int) -> np.ndarray:
    """uint32 words of each directory: its shift, then the rows before each of its ranges
    and after the last."""
    width = np.left_shift(1, shift)
    return -(-n_features // width) + 2


def build_row_directories(chunk_ptr: np.ndarray, chunk_feat: np.ndarray, n_features: int,
                          skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row directories for the chunks of at least DIR_MIN_ROWS rows that ``skip`` (bool per
    node: those with a bitmap) leaves. Returns (dir_off per node, -1 for none; dir_rows
    uint32: per chunk its shift s, then for g = 0..ceil(n_features / 2**s) the chunk's rows
    whose feature is below g * 2**s)."""
    n_nodes = chunk_ptr.shape[0] - 1
    n_rows = np.diff(np.asarray(chunk_ptr))
    chosen = np.flatnonzero((n_rows >= DIR_MIN_ROWS) & ~skip).astype(np.int64)
    shift = directory_shift(n_rows[chosen], n_features)
    lengths = directory_lengths(shift, n_features)
    starts = (np.cumsum(lengths) - lengths).astype(np.int64)
    dir_off = np.full(n_nodes, -1, dtype=np.int64)
    dir_off[chosen] = starts
    dir_rows = np.zeros(int(lengths.sum()), dtype=np.uint32)
    _fill_row_directories(np.asarray(chunk_ptr), np.asarray(chunk_feat), chosen, starts,
                          shift, lengths, dir_rows)
    return dir_off, dir_rows


@numba.njit(nogil=True, cache=True)
def _fill_row_directories(chunk_ptr: np.ndarray, chunk_feat: np.ndarray, chosen: np.ndarray,
                          starts: np.ndarray, shift: np.ndarray, lengths: np.ndarray,
                          out: np.ndarray) -> None:
    """Each chosen chunk's shift, then its rows per range, summed into rows before each."""
    for k in range(chosen.shape[0]):
        node = chosen[k]
        base = starts[k]
        out[base] = shift[k]
        for r in range(chunk_ptr[node], chunk_ptr[node + 1]):
            out[base + 2 + (chunk_feat[r] >> shift[k])] += 1
        for g in range(base + 2, base + lengths[k]):
            out[g] += out[g - 1]


#: the stored lookup: FeatureLookup field -> dtype (file search.<field>.npy)
LOOKUP_ARRAYS: dict[str, type] = {"bitmap_off": np.int64, "bitmap_words": np.uint64,
                                  "dir_off": np.int64, "dir_rows": np.uint32}


@dataclass(frozen=True)
class FeatureLookup:
    """The feature bitmaps (``bitmap_off`` per node, -1 for none; ``bitmap_words``) and row
    directories (``dir_off`` per node, -1 for none; ``dir_rows``) of an ensemble's chunks.
    A bundle stores them, so every serving process maps one copy."""

    bitmap_off: np.ndarray
    bitmap_words: np.ndarray
    dir_off: np.ndarray
    dir_rows: np.ndarray

    @classmethod
    def build(cls, ensemble: Ensemble, n_features: int, bitmap_mb: int) -> FeatureLookup:
        chunk_ptr, chunk_feat = np.asarray(ensemble.chunk_ptr), np.asarray(ensemble.chunk_feat)
        bitmap_off, words = build_feature_bitmaps(chunk_ptr, chunk_feat, n_features,
                                                  bitmap_mb << 20)
        dir_off, dir_rows = build_row_directories(chunk_ptr, chunk_feat, n_features,
                                                  bitmap_off >= 0)
        return cls(bitmap_off, words, dir_off, dir_rows)

    @classmethod
    def bitmaps_only(cls, bitmap_off: np.ndarray, bitmap_words: np.ndarray) -> FeatureLookup:
        """A lookup without row directories: what a bundle written before them stores."""
        return cls(bitmap_off, bitmap_words, np.full(bitmap_off.shape, -1, dtype=np.int64),
                   np.zeros(0, dtype=np.uint32))

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, name).nbytes for name in LOOKUP_ARRAYS))

    def problem(self, chunk_ptr: np.ndarray, n_features: int) -> tuple[str, str] | None:
        """(array name, what is wrong) when the lookup could lead the search out of a
        chunk's rows, else None. Checked vectorized, block by block, without a copy of the
        large arrays."""
        n_nodes = chunk_ptr.shape[0] - 1
        for name in ("bitmap_off", "dir_off"):
            if getattr(self, name).shape != (n_nodes,):
                return name, "length does not match the node count"
        n_rows = np.diff(np.asarray(chunk_ptr))
        return (_bitmap_problem(self.bitmap_off, self.bitmap_words, n_rows, n_features)
                or _directory_problem(self.dir_off, self.dir_rows, n_rows, n_features))


def _bitmap_problem(off: np.ndarray, words: np.ndarray, n_rows: np.ndarray,
                    n_features: int) -> tuple[str, str] | None:
    """The search trusts each word's row count plus the bits below a feature to land within
    the chunk: so every mapped block must count its words' bits exactly and in total hold
    the chunk's rows."""
    block = 2 * ((n_features + 63) >> 6)
    if words.ndim != 1 or words.shape[0] % block:
        return "bitmap_words", f"length is not a multiple of {block} words (one chunk)"
    n_blocks = words.shape[0] // block
    nodes = np.flatnonzero(off >= 0)
    used = np.asarray(off[nodes])
    if np.any(off < -1) or np.any(used % block) or np.any(used >= n_blocks * block):
        return "bitmap_off", "offset out of range"
    totals = np.zeros(n_blocks, dtype=np.int64)
    by_block = words.reshape(n_blocks, block // 2, 2)
    step = max(1, (8 << 20) // (block * 8))
    for s in range(0, n_blocks, step):
        part = np.asarray(by_block[s : s + step])
        bits = np.bitwise_count(part[:, :, 0]).astype(np.int64)
        before = np.cumsum(bits, axis=1) - bits
        if not np.array_equal(part[:, :, 1].astype(np.int64), before):
            return "bitmap_words", "a row count does not match the bits before it"
        totals[s : s + step] = before[:, -1] + bits[:, -1]
    if not np.array_equal(totals[used // block], n_rows[nodes]):
        return "bitmap_words", "a chunk's bits do not add up to its rows"
    return None


def _directory_problem(off: np.ndarray, rows: np.ndarray, n_rows: np.ndarray,
                       n_features: int) -> tuple[str, str] | None:
    """The search trusts a directory's two entries around a feature's range to lie within
    the chunk: so the directories must lie end to end in node order, each as long as its
    shift says, start at 0, never decrease, and end at the chunk's rows."""
    if rows.ndim != 1:
        return "dir_rows", "not one-dimensional"
    nodes = np.flatnonzero(off >= 0)
    starts = np.asarray(off[nodes])
    if np.any(off < -1) or np.any(starts >= rows.shape[0]):
        return "dir_off", "offset out of range"
    shift = np.asarray(rows[starts]).astype(np.int64)
    if np.any(shift > 31):
        return "dir_rows", "a range width is out of range"
    ends = starts + directory_lengths(shift, n_features)
    if (nodes.size and starts[0] != 0) or np.any(starts[1:] != ends[:-1]) or (
            (ends[-1] if nodes.size else 0) != rows.shape[0]):
        return "dir_off", "directories do not lie end to end"
    if np.any(rows[starts + 1] != 0) or not np.array_equal(
            np.asarray(rows[ends - 1]).astype(np.int64), n_rows[nodes]):
        return "dir_rows", "a directory does not span its chunk's rows"
    # within a directory its entries never decrease: a decrease may only step onto the next
    # directory's shift word or off it
    boundary = np.zeros(0, dtype=np.int64) if not nodes.size else starts
    step = 8 << 20
    for s in range(0, max(rows.shape[0] - 1, 0), step):
        part = np.asarray(rows[s : s + step + 1]).astype(np.int64)
        falls = np.flatnonzero(np.diff(part) < 0) + s
        if not np.all(np.isin(falls, boundary) | np.isin(falls + 1, boundary)):
            return "dir_rows", "a directory's row counts decrease"
    return None
