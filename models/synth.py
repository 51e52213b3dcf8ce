"""Realistic synthetic XMC corpora (``xmc synth``).

The generative process, in the spirit of the public XMC benchmarks:

* a hidden three-level tree, topics → subtopics → labels, with uneven branch sizes;
* every node owns a few characteristic pseudo-words ("kelomar"); sibling labels draw their
  own words from one shared subtopic pool, so siblings overlap and confuse like real ones;
* label popularity is Zipfian over a random ranking, so a few head labels are frequent and
  most labels sit in the tail (< 5 training documents);
* a document takes 1-10 labels clustered around one or two anchor labels (mostly the same
  subtopic or topic), and its words mix the labels' words (own, subtopic, topic), words of
  related but unassigned labels, and a Zipfian background vocabulary;
* test documents come from the same process, so a few test labels never occur in training.

:func:`write_corpus` writes the documents as text (JSONL); :func:`write_xc` writes the very
same documents as TF-IDF feature rows in the XC format, with no text, for sizes where
gigabytes of text and a TF-IDF fit would only be in the way.

Everything is vectorized numpy over fixed blocks of documents, each with its own random
stream, so the output is byte-identical for a seed whatever the caller does, memory stays
bounded by the block size plus a few arrays per label, and 1M labels take minutes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.errors import InvalidInputError

# Documents per random stream. Part of the output's definition: changing it changes files.
_BLOCK_DOCS = 2048
# Candidate label draws per document; more than max_labels_per_doc so that after dropping
# repeats a document still reaches its target label count.
_CANDIDATES = 24
_ONSETS = b"bdfgklmnprstvz"
_VOWELS = b"aeiou"
_CODAS = b"\x00nrslmkt"  # \x00: no final consonant
_N_SYL = len(_ONSETS) * len(_VOWELS)
_STRUCTURE_STREAM = 0x5EED
_SPLIT_STREAM = {"train": 1, "test": 2}


@dataclass
class SynthParams:
    """Knobs of the synthetic corpus; defaults are tuned so that at 5k labels / 20k training
    documents the default model lands at P@1 ≈ 0.8 and most labels are tail labels."""

    n_labels: int = 5000
    """Labels in the hidden tree (not all need occur in the corpus)."""
    n_train: int = 20000
    """Documents in train.jsonl."""
    n_test: int = 5000
    """Documents in test.jsonl (ids continue after the training ids)."""
    seed: int = 0
    """Same seed and knobs → byte-identical files."""
    mean_doc_words: int = 150
    """Mean document length in words (lognormal lengths)."""
    doc_words_sigma: float = 0.4
    """Shape of the lognormal length distribution (0 = every document the same length)."""
    min_doc_words: int = 10
    """Shortest document."""
    zipf_exponent: float = 1.2
    """Label popularity ∝ (rank + zipf_offset) ** -zipf_exponent."""
    zipf_offset: float = 5.0
    """Flattens the very head, so the top label is not in a third of all documents."""
    min_labels_per_doc: int = 1
    """Fewest labels of a document."""
    max_labels_per_doc: int = 10
    """Most labels of a document."""
    mean_labels_per_doc: float = 3.5
    """Mean of the (geometric, truncated) number of labels per document."""
    p_second_anchor: float = 0.3
    """Share of a document's extra labels clustered around a second, unrelated anchor label
    instead of the first one: documents span one or two subtrees."""
    p_same_subtopic: float = 0.6
    """Share of extra labels drawn from the anchor's subtopic (popularity-weighted)."""
    p_same_topic: float = 0.3
    """Share drawn from the anchor's topic; the rest come from the whole label set."""
    background_share: float = 0.7
    """Share of a document's words from the background vocabulary."""
    confuser_share: float = 0.16
    """Share of words belonging to unassigned labels of the first label's topic (documents
    mention related concepts; this is what makes siblings hard to tell apart)."""
    level_mix: tuple[float, float, float] = (0.6, 0.25, 0.15)
    """How a label's words split between its own words, its subtopic's and its topic's."""
    background_vocab: int = 30000
    """Size of the background vocabulary."""
    background_zipf: float = 1.05
    """Zipf exponent of background word frequencies."""
    words_per_topic: int = 40
    """Characteristic words of a topic."""
    words_per_subtopic: int = 15
    """Characteristic words of a subtopic."""
    words_per_label: int = 6
    """Own words of a label, drawn from its subtopic's shared pool."""
    label_word_sharing: float = 1.5
    """Average number of sibling labels that use one label-level word (1 = no sharing)."""
    node_word_zipf: float = 0.7
    """Skew of word use within a node's word list (a node has a few signature words)."""
    fanout: int = 0
    """Mean children per tree node; 0 = cube root of n_labels (three balanced levels)."""

    def validate(self) -> None:
        """Raise :class:`InvalidInputError` on knobs the generator cannot honour."""
        problems = []
        if self.n_labels < 1:
            problems.append("n_labels must be >= 1")
        if self.n_train < 0 or self.n_test < 0:
            problems.append("n_train and n_test must be >= 0")
        if not 1 <= self.min_labels_per_doc <= self.max_labels_per_doc <= _CANDIDATES:
            problems.append(f"need 1 <= min_labels_per_doc <= max_labels_per_doc <= {_CANDIDATES}")
        if not self.min_labels_per_doc <= self.mean_labels_per_doc <= self.max_labels_per_doc:
            problems.append("mean_labels_per_doc must lie between the min and the max")
        if self.mean_doc_words < 1 or self.min_doc_words < 1:
            problems.append("mean_doc_words and min_doc_words must be >= 1")
        for name in ("background_share", "confuser_share", "p_second_anchor",
                     "p_same_subtopic", "p_same_topic"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in [0, 1]")
        if self.background_share + self.confuser_share > 1.0:
            problems.append("background_share + confuser_share must be <= 1")
        if self.p_same_subtopic + self.p_same_topic > 1.0:
            problems.append("p_same_subtopic + p_same_topic must be <= 1")
        if len(self.level_mix) != 3 or min(self.level_mix) < 0 or sum(self.level_mix) <= 0:
            problems.append("level_mix must be three non-negative weights")
        for name in ("background_vocab", "words_per_topic", "words_per_subtopic",
                     "words_per_label"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.label_word_sharing < 1.0:
            problems.append("label_word_sharing must be >= 1")
        if self.zipf_exponent < 0 or self.zipf_offset < 0 or self.doc_words_sigma < 0:
            problems.append("zipf_exponent, zipf_offset and doc_words_sigma must be >= 0")
        if self.fanout < 0 or self.fanout == 1:
            problems.append("fanout must be 0 (automatic) or >= 2")
        if problems:
            raise InvalidInputError("bad synth parameters: " + "; ".join(problems))

    def to_json(self) -> dict:
        """Plain JSON-serializable dict (level_mix becomes a list)."""
        d = asdict(self)
        d["level_mix"] = list(self.level_mix)
        return d


class _Structure:
    """The hidden tree, label popularity and the vocabulary, shared by both splits."""

    def __init__(self, p: SynthParams) -> None:
        rng = np.random.default_rng([p.seed, _STRUCTURE_STREAM])
        n = p.n_labels
        b = p.fanout or max(2, math.ceil(n ** (1.0 / 3.0)))
        # Label ids are contiguous per subtopic and subtopics contiguous per topic, so every
        # subtree is an id range and drawing "from the anchor's subtree" is one searchsorted.
        n_sub = math.ceil(n / b)
        n_top = math.ceil(n_sub / b)
        sub_start = _random_cuts(rng, n, n_sub)
        top_start_sub = _random_cuts(rng, n_sub, n_top)
        self.n_labels, self.n_sub, self.n_top = n, n_sub, n_top
        self.sub_of = (np.searchsorted(sub_start, np.arange(n), side="right") - 1).astype(np.int32)
        top_of_sub = np.searchsorted(top_start_sub, np.arange(n_sub), side="right") - 1
        self.top_of = top_of_sub[self.sub_of].astype(np.int32)
        sub_bounds = np.append(sub_start, n)
        top_bounds = np.append(sub_bounds[top_start_sub], n)
        self.sub_lo = sub_bounds[:-1][self.sub_of]
        self.sub_hi = sub_bounds[1:][self.sub_of]
        self.top_lo = top_bounds[:-1][self.top_of]
        self.top_hi = top_bounds[1:][self.top_of]

        # Popularity follows a random ranking, independent of the tree.
        rank = rng.permutation(n)
        weight = (rank + 1.0 + p.zipf_offset) ** -p.zipf_exponent
        self.cum = np.concatenate([[0.0], np.cumsum(weight)])

        # Word ids: [background | topic words | subtopic words | label-level pools].
        self.bg_cdf = _zipf_cdf(p.background_vocab, p.background_zipf)
        self.top_base = p.background_vocab
        self.sub_base = self.top_base + n_top * p.words_per_topic
        self.pool_base = self.sub_base + n_sub * p.words_per_subtopic
        sub_size = np.diff(sub_bounds)
        pool_size = np.maximum(
            1, np.ceil(sub_size * p.words_per_label / p.label_word_sharing)
        ).astype(np.int64)
        pool_start = self.pool_base + np.concatenate([[0], np.cumsum(pool_size)[:-1]])
        self.label_words = (
            pool_start[self.sub_of, None]
            + (rng.random((n, p.words_per_label)) * pool_size[self.sub_of, None]).astype(np.int64)
        ).astype(np.int32)
        n_words = self.pool_base + int(pool_size.sum())
        # Frequent background words are short, topic words medium, label words long (as in
        # natural language, where rarer words are longer).
        syllables = np.full(n_words, 4, dtype=np.int8)
        syllables[: p.background_vocab] = 3
        syllables[: min(p.background_vocab, 4000)] = 2
        syllables[: min(p.background_vocab, 150)] = 1
        syllables[self.top_base : self.sub_base] = 3
        self.vocab, self.vocab_len = _pseudo_words(rng, syllables)

        self.level_cdfs = [
            _zipf_cdf(w, p.node_word_zipf)
            for w in (p.words_per_label, p.words_per_subtopic, p.words_per_topic)
        ]
        self.names, self.names_len = _label_names(
            self.top_of, self.sub_of - top_start_sub[top_of_sub[self.sub_of]], n_top, b
        )

    def label_names(self) -> list[str]:
        """Label names in id order."""
        pairs = zip(self.names, self.names_len, strict=True)
        return [bytes(row[:k]).decode("ascii") for row, k in pairs]


def _random_cuts(rng: np.random.Generator, n_items: int, n_groups: int) -> np.ndarray:
    """Start offsets of n_groups non-empty contiguous groups over n_items, random sizes."""
    if n_groups <= 1:
        return np.zeros(1, dtype=np.int64)
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_groups - 1, replace=False))
    return np.concatenate([[0], cuts]).astype(np.int64)


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def _pseudo_words(rng: np.random.Generator, syllables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pronounceable words (consonant-vowel syllables, optional final consonant) as
    a zero-padded byte matrix plus lengths; word i has ``syllables[i]`` syllables."""
    n = len(syllables)
    k_max = int(syllables.max()) if n else 1
    out = np.zeros((n, 2 * k_max + 1), dtype=np.uint8)
    syl = np.array([[o, v] for o in _ONSETS for v in _VOWELS], dtype=np.uint8)
    codas = np.frombuffer(_CODAS, dtype=np.uint8)
    for k in range(1, k_max + 1):
        idx = np.flatnonzero(syllables == k)
        if len(idx) == 0:
            continue
        space = _N_SYL**k * len(_CODAS)
        if len(idx) > space:
            raise InvalidInputError(f"too many {k}-syllable words; lower the vocabulary sizes")
        # Word i of this length gets a random code in its own stride of the code space, so
        # codes are distinct without a global uniqueness pass; a seeded bijective mixing of
        # the digits then keeps one node's consecutive words from sharing syllables.
        stride = space // len(idx)
        first = rng.permutation(_N_SYL)
        shifts = rng.integers(0, _N_SYL, size=(k, _N_SYL))
        coda_shift = rng.integers(0, len(_CODAS), size=_N_SYL)
        for lo in range(0, len(idx), 1 << 20):
            part = idx[lo : lo + (1 << 20)]
            code = (np.arange(lo, lo + len(part), dtype=np.int64) * stride
                    + rng.integers(0, stride, size=len(part)))
            prev = None
            for j in range(k):
                digit = code % _N_SYL
                code //= _N_SYL
                prev = first[digit] if j == 0 else (digit + shifts[j, prev]) % _N_SYL
                out[part, 2 * j : 2 * j + 2] = syl[prev]
            out[part, 2 * k] = codas[(code % len(_CODAS) + coda_shift[prev]) % len(_CODAS)]
    lengths = (out != 0).sum(axis=1).astype(np.int64)
    return out, lengths


def _label_names(top: np.ndarray, sub_in_top: np.ndarray, n_top: int, fanout: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Names like ``t03/s12/l00457`` as a zero-padded byte matrix plus lengths."""
    n = len(top)
    wt = len(str(max(n_top - 1, 0)))
    ws = max(2, len(str(int(sub_in_top.max()) if n else 0)))
    wl = len(str(max(n - 1, 0)))
    names = np.char.add(
        np.char.add(np.char.add(b"t", np.char.zfill(top.astype("S"), wt)), b"/s"),
        np.char.add(np.char.zfill(sub_in_top.astype("S"), ws), b"/l"),
    )
    names = np.char.add(names, np.char.zfill(np.arange(n).astype("S"), wl))
    width = names.dtype.itemsize
    mat = np.frombuffer(names.tobytes(), dtype=np.uint8).reshape(n, width).copy()
    return mat, (mat != 0).sum(axis=1).astype(np.int64)


def _draw_in_range(rng: np.random.Generator, cum: np.ndarray, lo: np.ndarray, hi: np.ndarray
                   ) -> np.ndarray:
    """One popularity-weighted label id from each id range [lo, hi)."""
    u = cum[lo] + rng.random(lo.shape) * (cum[hi] - cum[lo])
    return np.clip(np.searchsorted(cum, u, side="right") - 1, lo, hi - 1)


def _join_rows(mat: np.ndarray, lengths: np.ndarray, ids: np.ndarray, sep: bytes,
               prefix: bytes = b"", suffix: bytes = b"") -> tuple[bytes, np.ndarray]:
    """Concatenate ``prefix + row + suffix + sep`` for the given rows of a zero-padded byte
    matrix, in one buffer; returns the buffer and each piece's end offset."""
    pieces = []
    if prefix:
        pieces.append(np.broadcast_to(np.frombuffer(prefix, np.uint8), (len(ids), len(prefix))))
    pieces.append(mat[ids])
    tail = suffix + sep
    pieces.append(np.broadcast_to(np.frombuffer(tail, np.uint8), (len(ids), len(tail))))
    full = np.concatenate(pieces, axis=1)
    # Word bytes are never zero, so the zero padding is exactly what the mask drops.
    mask = full != 0
    buf = full[mask].tobytes()
    ends = np.cumsum(lengths[ids] + len(prefix) + len(tail))
    return buf, ends


@dataclass
class _Draws:
    """A block of documents before any text: each document's labels and words."""

    start: int
    """Index of the block's first document within its split."""
    labs: np.ndarray
    """Label ids, each document's contiguous, in draw order."""
    n_lab: np.ndarray
    """Labels per document."""
    words: np.ndarray
    """Word ids, each document's contiguous."""
    n_words: np.ndarray
    """Words per document."""


def _iter_draws(st: _Structure, p: SynthParams, split: str) -> Iterator[_Draws]:
    """One split, a block of documents at a time, each block from its own random stream."""
    n_docs = p.n_train if split == "train" else p.n_test
    for block, start in enumerate(range(0, n_docs, _BLOCK_DOCS)):
        rng = np.random.default_rng([p.seed, _SPLIT_STREAM[split], block])
        n = min(_BLOCK_DOCS, n_docs - start)
        labs, n_lab = _draw_labels(rng, st, p, n)
        words, n_words = _draw_words(rng, st, p, labs, n_lab)
        yield _Draws(start, labs, n_lab, words, n_words)


def _draw_labels(rng: np.random.Generator, st: _Structure, p: SynthParams, n: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Label ids of n documents (concatenated, in draw order) and labels per document."""
    geo_p = 1.0 / (1.0 + p.mean_labels_per_doc - p.min_labels_per_doc)
    want = np.clip(
        p.min_labels_per_doc + rng.geometric(geo_p, size=n) - 1,
        p.min_labels_per_doc, p.max_labels_per_doc,
    )
    full = (np.zeros(n, np.int64), np.full(n, st.n_labels, np.int64))
    anchors = np.stack([_draw_in_range(rng, st.cum, *full) for _ in range(2)], axis=1)
    cand = np.empty((n, _CANDIDATES), dtype=np.int64)
    cand[:, 0] = anchors[:, 0]
    anchor = anchors[np.arange(n)[:, None],
                     (rng.random((n, _CANDIDATES - 1)) < p.p_second_anchor).astype(int)]
    level = rng.random(anchor.shape)
    in_sub = level < p.p_same_subtopic
    in_top = ~in_sub & (level < p.p_same_subtopic + p.p_same_topic)
    lo = np.where(in_sub, st.sub_lo[anchor], np.where(in_top, st.top_lo[anchor], 0))
    hi = np.where(in_sub, st.sub_hi[anchor], np.where(in_top, st.top_hi[anchor], st.n_labels))
    cand[:, 1:] = _draw_in_range(rng, st.cum, lo, hi)
    # Keep the first `want` distinct candidates of each row, in draw order.
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, axis=1)
    first_sorted = np.ones_like(srt, dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    rank = np.cumsum(first, axis=1) - 1
    keep = first & (rank < want[:, None])
    # row-major: each document's labels, contiguous, in draw order; the first candidate
    # (the anchor) is always kept, so a document's first label is its anchor
    return cand[keep], keep.sum(axis=1)


def _draw_words(rng: np.random.Generator, st: _Structure, p: SynthParams, labs: np.ndarray,
                n_lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Word ids of the documents (concatenated) and words per document."""
    n = len(n_lab)
    mu = math.log(p.mean_doc_words) - p.doc_words_sigma**2 / 2.0
    max_len = max(4 * p.mean_doc_words, p.min_doc_words)
    level_p = np.asarray(p.level_mix, dtype=np.float64) / sum(p.level_mix)
    lab_start = np.concatenate([[0], np.cumsum(n_lab)[:-1]])
    n_words = np.clip(
        np.rint(rng.lognormal(mu, p.doc_words_sigma, size=n)), p.min_doc_words, max_len
    ).astype(np.int64)
    doc = np.repeat(np.arange(n), n_words)
    kind = rng.random(len(doc))
    words = np.empty(len(doc), dtype=np.int64)
    is_bg = kind < p.background_share
    words[is_bg] = np.searchsorted(st.bg_cdf, rng.random(int(is_bg.sum())), side="right")
    is_conf = ~is_bg & (kind < p.background_share + p.confuser_share)
    d = doc[is_conf]
    primary = labs[lab_start[d]]
    other = _draw_in_range(rng, st.cum, st.top_lo[primary], st.top_hi[primary])
    words[is_conf] = _own_word(rng, st, other)
    is_lab = ~(is_bg | is_conf)
    d = doc[is_lab]
    lab = labs[lab_start[d] + (rng.random(len(d)) * n_lab[d]).astype(np.int64)]
    lvl = np.searchsorted(np.cumsum(level_p)[:-1], rng.random(len(d)), side="right")
    w = np.empty(len(d), dtype=np.int64)
    m = lvl == 0
    w[m] = _own_word(rng, st, lab[m])
    m = lvl == 1
    j = np.searchsorted(st.level_cdfs[1], rng.random(int(m.sum())), side="right")
    w[m] = st.sub_base + st.sub_of[lab[m]].astype(np.int64) * p.words_per_subtopic + j
    m = lvl == 2
    j = np.searchsorted(st.level_cdfs[2], rng.random(int(m.sum())), side="right")
    w[m] = st.top_base + st.top_of[lab[m]].astype(np.int64) * p.words_per_topic + j
    words[is_lab] = w
    return words, n_words


def _iter_blocks(
    st: _Structure, p: SynthParams, split: str
) -> Iterator[tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray]]:
    """One split, a block of documents at a time: JSONL lines, the block's label ids
    (concatenated), labels per document and words per document."""
    id_base = 0 if split == "train" else p.n_train
    for b in _iter_draws(st, p, split):
        # Pseudo-words and label names are plain ASCII letters, digits and "/", so they go
        # into JSON strings without escaping.
        text, t_end = _join_rows(st.vocab, st.vocab_len, b.words, b" ")
        t_end = t_end[np.cumsum(b.n_words) - 1]
        t_start = np.concatenate([[0], t_end[:-1]])
        names, n_end = _join_rows(st.names, st.names_len, b.labs, b", ", b'"', b'"')
        n_end = n_end[np.cumsum(b.n_lab) - 1]
        n_start = np.concatenate([[0], n_end[:-1]])
        lines = [
            b'{"id": %d, "text": "%s", "labels": [%s]}\n'
            % (id_base + b.start + i, text[ts:te - 1], names[ns:ne - 2])
            for i, (ts, te, ns, ne) in enumerate(
                zip(t_start.tolist(), t_end.tolist(), n_start.tolist(), n_end.tolist(), strict=True)
            )
        ]
        yield lines, b.labs, b.n_lab, b.n_words


def _own_word(rng: np.random.Generator, st: _Structure, labels: np.ndarray) -> np.ndarray:
    j = np.searchsorted(st.level_cdfs[0], rng.random(len(labels)), side="right")
    return st.label_words[labels, j].astype(np.int64)


def generate(params: SynthParams) -> tuple[list[dict], list[dict]]:
    """Both splits in memory, as ``{"id", "text", "labels"}`` dicts (for small sizes; the
    documents are exactly those :func:`write_corpus` writes)."""
    params.validate()
    st = _Structure(params)
    out = []
    for split in ("train", "test"):
        docs: list[dict] = []
        for lines, *_ in _iter_blocks(st, params, split):
            docs.extend(json.loads(line) for line in lines)
        out.append(docs)
    return out[0], out[1]


def write_corpus(out_dir: str | Path, params: SynthParams) -> dict:
    """Stream ``out_dir/train.jsonl`` and ``out_dir/test.jsonl``; return corpus statistics.

    ``share_labels_lt5_train`` is over the labels that occur in train.jsonl (a label with no
    training document does not count as a tail label); ``test_labels_unseen_share`` is the
    share of test label occurrences whose label never occurs in training.
    """
    params.validate()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st = _Structure(params)
    stats: dict = {"params": params.to_json()}
    counts = {}
    for split in ("train", "test"):
        acc = _SplitStats(params.n_labels)
        with (out_dir / f"{split}.jsonl").open("wb") as fh:
            for lines, labs, n_lab, n_words in _iter_blocks(st, params, split):
                fh.write(b"".join(lines))
                acc.add(labs, n_lab, n_words)
        counts[split] = acc.freq
        stats.update(acc.summary(split))
    stats.update(_label_stats(counts["train"], counts["test"]))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


class _SplitStats:
    """Label and length statistics of one split, gathered block by block."""

    def __init__(self, n_labels: int) -> None:
        self.freq = np.zeros(n_labels, dtype=np.int64)
        self.n_docs = self.n_label_occ = self.n_word_occ = self.max_labels = 0

    def add(self, labs: np.ndarray, n_lab: np.ndarray, n_words: np.ndarray) -> None:
        self.freq += np.bincount(labs, minlength=len(self.freq))
        self.n_docs += len(n_lab)
        self.n_label_occ += int(n_lab.sum())
        self.n_word_occ += int(n_words.sum())
        self.max_labels = max(self.max_labels, int(n_lab.max()))

    def summary(self, split: str) -> dict:
        n = max(self.n_docs, 1)
        return {f"n_{split}": self.n_docs,
                f"mean_labels_per_doc_{split}": self.n_label_occ / n,
                f"mean_words_per_doc_{split}": self.n_word_occ / n,
                f"max_labels_per_doc_{split}": self.max_labels}


def _label_stats(train: np.ndarray, test: np.ndarray) -> dict:
    used = train > 0
    return {
        "n_labels": len(train),
        "n_labels_used": int(used.sum()),
        "n_labels_used_test": int((test > 0).sum()),
        "share_labels_lt5_train": float((train[used] < 5).mean()) if used.any() else 0.0,
        "share_labels_lt5_train_all": float((train < 5).mean()),
        "median_label_freq_train": float(np.median(train[used])) if used.any() else 0.0,
        "max_label_freq_train": int(train.max()),
        "test_labels_unseen_share": float(test[~used].sum() / test.sum()) if test.sum() else 0.0,
    }


def write_xc(out_dir: str | Path, params: SynthParams, *, min_df: int = 2,
             max_features: int = 0) -> dict:
    """Stream ``out_dir/train.txt`` and ``out_dir/test.txt``: the documents
    :func:`write_corpus` writes for the same parameters (same labels, same words), as TF-IDF
    rows in the Extreme Classification Repository format, with no text at all.

    Features are the words occurring in at least ``min_df`` training documents (the
    ``max_features`` of highest document frequency when that is > 0), numbered in word-id
    order; a value is sublinear tf times scikit-learn's smoothed idf of the training split,
    each row l2-normalized and written with four decimals. Label ids are the synthetic
    label ids (``l00457`` of the text form is label 457). Returns the statistics of
    :func:`write_corpus` plus the feature space's.
    """
    params.validate()
    if min_df < 1 or max_features < 0:
        raise InvalidInputError("min_df must be >= 1 and max_features >= 0 (0 = no cap)")
    if params.n_train == 0:
        raise InvalidInputError("the XC form needs training documents: idf comes from them")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st = _Structure(params)
    df = _document_frequencies(st, params)
    fid_of_word, idf = _feature_space(df, params.n_train, min_df, max_features)
    if not len(idf):
        raise InvalidInputError(f"no word occurs in {min_df} training documents; lower min_df")
    stats: dict = {"params": params.to_json(), "format": "xc", "min_df": min_df,
                   "max_features": max_features, "n_features": len(idf)}
    counts = {}
    for split in ("train", "test"):
        acc = _SplitStats(params.n_labels)
        n_docs = params.n_train if split == "train" else params.n_test
        nnz = 0
        with (out_dir / f"{split}.txt").open("wb") as fh:
            fh.write(b"%d %d %d\n" % (n_docs, len(idf), params.n_labels))
            for b in _iter_draws(st, params, split):
                fid, val, n_fid = _tfidf_rows(b, fid_of_word, idf)
                fh.write(_xc_lines(b.labs, b.n_lab, fid, val, n_fid))
                acc.add(b.labs, b.n_lab, b.n_words)
                nnz += len(fid)
        counts[split] = acc.freq
        stats.update(acc.summary(split))
        stats[f"mean_features_per_doc_{split}"] = nnz / max(n_docs, 1)
    stats.update(_label_stats(counts["train"], counts["test"]))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


# Blocks of word ids gathered before one bincount into the document frequencies: a bincount
# per block would sweep the whole vocabulary (millions of words at 1M labels) every block.
_DF_FLUSH = 32
# Decimals of an XC feature value. Rows are l2-normalized, so values lie in (0, 1]; four
# decimals keep the file small and move a typical value (0.02-0.3) by well under 1 %.
_XC_DECIMALS = 4


def _document_frequencies(st: _Structure, p: SynthParams) -> np.ndarray:
    """Training documents containing each word: a first pass over the training split (the
    second, which writes it, regenerates the same blocks from their seeds)."""
    n_vocab = len(st.vocab_len)
    df = np.zeros(n_vocab, dtype=np.int64)
    pending: list[np.ndarray] = []
    for b in _iter_draws(st, p, "train"):
        pending.append(_doc_word_counts(b, n_vocab)[1])
        if len(pending) == _DF_FLUSH:
            df += np.bincount(np.concatenate(pending), minlength=n_vocab)
            pending = []
    if pending:
        df += np.bincount(np.concatenate(pending), minlength=n_vocab)
    return df


def _feature_space(df: np.ndarray, n_train: int, min_df: int, max_features: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(feature id of every word, -1 for none; idf of every feature)."""
    kept = df >= min_df
    if max_features and int(kept.sum()) > max_features:
        words = np.flatnonzero(kept)
        top = words[np.lexsort((words, -df[words]))[:max_features]]  # ties: lower word id
        kept = np.zeros_like(kept)
        kept[top] = True
    words = np.flatnonzero(kept)
    fid_of_word = np.full(len(df), -1, dtype=np.int64)
    fid_of_word[words] = np.arange(len(words))
    # scikit-learn's smooth_idf: as if one more document contained every word
    idf = np.log((1.0 + n_train) / (1.0 + df[words])) + 1.0
    return fid_of_word, idf


def _doc_word_counts(b: _Draws, n_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document, word, count) of every distinct word of every document, sorted by document
    then word."""
    doc = np.repeat(np.arange(len(b.n_words), dtype=np.int64), b.n_words)
    key = np.sort(doc * n_vocab + b.words)
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(key)))
    key = key[starts]
    return key // n_vocab, key % n_vocab, counts


def _tfidf_rows(b: _Draws, fid_of_word: np.ndarray, idf: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block's TF-IDF rows: feature ids (ascending within a row), l2-normalized values
    and features per document."""
    doc, word, tf = _doc_word_counts(b, len(fid_of_word))
    fid = fid_of_word[word]
    keep = fid >= 0
    doc, fid, tf = doc[keep], fid[keep], tf[keep]
    val = (1.0 + np.log(tf)) * idf[fid]
    n = len(b.n_words)
    norm = np.sqrt(np.bincount(doc, val * val, minlength=n))
    val /= norm[doc]
    return fid, val, np.bincount(doc, minlength=n)


def _xc_lines(labs: np.ndarray, n_lab: np.ndarray, fid: np.ndarray, val: np.ndarray,
              n_fid: np.ndarray) -> bytes:
    """``l1,l2 fid:val fid:val\n`` for every document of a block, as one buffer.

    Every piece (a label and its comma, a feature, a newline) is a row of one zero-padded
    byte matrix, in output order; dropping the zero bytes leaves the text."""
    lab_tok = np.concatenate([_digits(labs), np.full((len(labs), 1), ord(","), np.uint8)], 1)
    last_lab = np.cumsum(n_lab) - 1
    lab_tok[last_lab, -1] = 0  # no comma after a document's last label
    feat_tok = np.concatenate([
        np.full((len(fid), 1), ord(" "), np.uint8), _digits(fid),
        np.full((len(fid), 1), ord(":"), np.uint8), _decimals(val)], 1)
    per_doc = n_lab + n_fid + 1
    line_start = np.cumsum(per_doc) - per_doc
    doc_of_lab = np.repeat(np.arange(len(n_lab)), n_lab)
    doc_of_fid = np.repeat(np.arange(len(n_fid)), n_fid)
    lab_dest = line_start[doc_of_lab] + np.arange(len(labs)) - (np.cumsum(n_lab) - n_lab)[
        doc_of_lab]
    fid_dest = (line_start + n_lab)[doc_of_fid] + np.arange(len(fid)) - (
        np.cumsum(n_fid) - n_fid)[doc_of_fid]
    out = np.zeros((int(per_doc.sum()), max(lab_tok.shape[1], feat_tok.shape[1])), np.uint8)
    out[lab_dest, : lab_tok.shape[1]] = lab_tok
    out[fid_dest, : feat_tok.shape[1]] = feat_tok
    out[line_start + per_doc - 1, 0] = ord("\n")
    return out[out != 0].tobytes()


def _digits(a: np.ndarray) -> np.ndarray:
    """Decimal digits of non-negative integers as a right-aligned byte matrix whose leading
    positions are zero bytes."""
    width = len(str(int(a.max()))) if len(a) else 1
    pow10 = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    out = (a[:, None] // pow10 % 10 + ord("0")).astype(np.uint8)
    lead = a[:, None] < pow10
    lead[:, -1] = False  # zero itself is "0"
    out[lead] = 0
    return out


def _decimals(val: np.ndarray) -> np.ndarray:
    """Values in (0, 1] as ``0.dddd`` (trailing zeros dropped, at least 0.0001) or ``1``, as a
    zero-padded byte matrix."""
    scale = 10**_XC_DECIMALS
    q = np.clip(np.rint(val * scale).astype(np.int64), 1, scale)
    pow10 = 10 ** np.arange(_XC_DECIMALS - 1, -1, -1, dtype=np.int64)
    digits = q[:, None] // pow10 % 10
    out = np.empty((len(q), 2 + _XC_DECIMALS), dtype=np.uint8)
    out[:, 0] = ord("0")
    out[:, 1] = ord(".")
    out[:, 2:] = digits + ord("0")
    # a digit stays when it or a digit after it is non-zero
    out[:, 2:][~np.flip(np.logical_or.accumulate(np.flip(digits != 0, 1), 1), 1)] = 0
    one = q == scale
    out[one] = 0
    out[one, 0] = ord("1")
    return out
