"""TfidfEncoder against scikit-learn's TfidfVectorizer, the reference it must reproduce."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from models.errors import BundleError, InvalidInputError
from models.tfidf import IDF_FILE, VOCAB_FILE, TfidfEncoder, TfidfParams

TfidfVectorizer = pytest.importorskip("sklearn.feature_extraction.text").TfidfVectorizer

REPO_ROOT = Path(__file__).resolve().parents[2]
COOKING_TRAIN = REPO_ROOT.parent / "shared" / "data" / "cooking_stackexchange" / "train.jsonl"

WORDS = [
    # plain, mixed case (lowercasing must merge them), digits and word-internal underscores
    "the", "The", "THE", "sauce", "Sauce", "cheese", "bread", "oven", "350", "2024", "3d",
    "snake_case", "x86_64",
    # unicode letters, including case pairs and a lowercase that changes length (İ)
    "café", "CAFÉ", "naïve", "Straße", "STRASSE", "日本語", "料理", "Ελληνικά", "ελληνικά",
    "ЖАРКОЕ", "жаркое", "İstanbul", "½cup",
    # single letters and punctuation: dropped by the two-character token pattern
    "a", "I", "é", "7", "-", "--", "!", "?!", "'s", "(", ")", ",", ".", "/", "&",
    "don't", "co-op", "e.g.", "U.S.", "well-known", "#tag", "@home",
]  # fmt: skip


def make_corpus(n_docs: int, seed: int) -> list[str]:
    """Zipf-ish random texts (so min_df=2 keeps a real vocabulary) plus edge cases."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(WORDS))]
    seps = [" ", " ", " ", "  ", "\n", "\t", ", ", "; ", "...", "/"]
    docs = []
    for _ in range(n_docs):
        words = rng.choices(WORDS, weights=weights, k=rng.randint(1, 40))
        if rng.random() < 0.3:  # repeated words and repeated bigrams
            words = words + words[: rng.randint(1, len(words))]
        docs.append("".join(w + rng.choice(seps) for w in words).strip())
    docs += [
        "",
        "   ",
        "a I é 7 - !",  # only dropped tokens
        "sauce sauce sauce sauce sauce sauce sauce",
        "the sauce the sauce the sauce",
        "CAFÉ café Café",
    ]
    return docs


def sklearn_for(params: TfidfParams) -> TfidfVectorizer:
    return TfidfVectorizer(
        lowercase=params.lowercase,
        token_pattern=params.token_pattern,
        ngram_range=(1, params.ngram_max),
        min_df=params.min_df,
        max_features=params.max_features,
        sublinear_tf=params.sublinear_tf,
        smooth_idf=params.smooth_idf,
    )


def assert_matches(ours: sp.csr_matrix, ref: sp.csr_matrix) -> None:
    assert ours.shape == ref.shape
    assert ours.dtype == np.float32
    assert ours.indices.dtype == np.int32
    assert ours.has_sorted_indices
    # has_sorted_indices is a flag we set: check the arrays really are sorted per row.
    for i in range(ours.shape[0]):
        row = ours.indices[ours.indptr[i] : ours.indptr[i + 1]]
        assert np.all(np.diff(row) > 0)
    ref = ref.tocsr()
    ref.sort_indices()
    ref.eliminate_zeros()
    np.testing.assert_array_equal(ours.indptr, ref.indptr)
    np.testing.assert_array_equal(ours.indices, ref.indices)
    np.testing.assert_allclose(ours.data, ref.data, rtol=0, atol=1e-6)


def assert_one_matches(encoder: TfidfEncoder, texts: list[str], ref: sp.csr_matrix) -> None:
    ref = ref.tocsr()
    ref.sort_indices()
    for i, text in enumerate(texts):
        ids, vals = encoder.transform_one(text)
        assert ids.dtype == np.int32 and vals.dtype == np.float32
        row = ref[i]
        np.testing.assert_array_equal(ids, row.indices)
        np.testing.assert_allclose(vals, row.data, rtol=0, atol=1e-6)


PARAM_CASES = [
    TfidfParams(),
    TfidfParams(max_features=40),  # exercises sklearn's frequency cut and its tie-breaking
    TfidfParams(ngram_max=1),
    TfidfParams(ngram_max=3, min_df=3),
    TfidfParams(sublinear_tf=False, smooth_idf=False),
    TfidfParams(lowercase=False),
    TfidfParams(token_pattern=r"(?u)\b\w+\b"),  # a non-default pattern keeps single letters
    TfidfParams(min_df=1),
    TfidfParams(ngram_max=3, min_df=1, max_features=300),
    TfidfParams(ngram_max=4, max_features=5, min_df=1),
    # Tokens holding spaces: joined n-grams can collide, the fit takes its string path.
    TfidfParams(token_pattern=r"[^,;.\n]+"),
    TfidfParams(token_pattern=r"[^,;.\n]+", ngram_max=3, min_df=1),
    # Tabs and newlines inside tokens: joined n-grams no longer sort as token tuples.
    TfidfParams(token_pattern=r"[^ ]+", max_features=300),
]


@pytest.mark.parametrize("params", PARAM_CASES, ids=lambda p: json.dumps(asdict(p)))
def test_matches_sklearn(params: TfidfParams) -> None:
    train = make_corpus(400, seed=1)
    # Held-out texts: unseen docs, words the vocabulary never saw, and empty texts.
    test = [*make_corpus(150, seed=2), "zyzzyva quux", "", "unknownword a I", "Café sauce"]
    encoder, train_matrix = TfidfEncoder.fit(train, params)
    ref = sklearn_for(params)
    ref_train = ref.fit_transform(train)

    assert encoder.n_features == len(ref.vocabulary_)
    assert encoder.n_features <= params.max_features
    assert encoder.feature_names() == ref.get_feature_names_out().tolist()
    np.testing.assert_allclose(encoder._idf, ref.idf_, rtol=1e-6)
    # The fit hands the encoder its token tuples: the same lookup keys as splitting terms.
    assert encoder._vocab == TfidfEncoder(encoder.feature_names(), encoder._idf, params)._vocab

    assert_matches(train_matrix, ref_train)
    assert_matches(encoder.transform(test), ref.transform(test))
    assert_one_matches(encoder, test, ref.transform(test))
    assert_one_matches(encoder, train[:100], ref_train)


def assert_same_fit(a: tuple[TfidfEncoder, sp.csr_matrix],
                    b: tuple[TfidfEncoder, sp.csr_matrix]) -> None:
    """Two fits gave the very same encoder and matrix, bit for bit."""
    assert a[0].feature_names() == b[0].feature_names()
    np.testing.assert_array_equal(a[0]._idf, b[0]._idf)
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(a[1], name), getattr(b[1], name))


def tied_corpus(seed: int) -> list[str]:
    """Many terms with the same total count: 300 random words each in exactly two documents
    once (bigrams of them: once), among words of other counts."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzéß日"
    words = sorted({"".join(rng.choices(letters, k=rng.randint(2, 6))) for _ in range(300)})
    common = ["sauce", "cheese", "bread", "oven"]
    docs = [" ".join(rng.sample(common, k=rng.randint(1, 4))) for _ in range(50)]
    for i in range(0, len(words) - 1, 2):
        docs.append(f"{words[i]} {words[i + 1]}")
        docs.append(f"{words[i + 1]} , {words[i]}")
    rng.shuffle(docs)
    return docs


@pytest.mark.parametrize("max_features", [1, 7, 40, 123, 290, 650])
def test_max_features_ties_as_sklearn(max_features: int) -> None:
    # The cut falls inside groups of terms of equal total count: sklearn's unstable argsort
    # decides which survive, and the fit must reproduce that choice, not just the counts.
    train = tied_corpus(seed=max_features)
    for ngram_max in (1, 2):
        params = TfidfParams(max_features=max_features, min_df=1, ngram_max=ngram_max)
        encoder, X = TfidfEncoder.fit(train, params)
        ref = sklearn_for(params)
        ref_train = ref.fit_transform(train)
        assert encoder.feature_names() == ref.get_feature_names_out().tolist()
        assert_matches(X, ref_train)


def test_fit_rows_are_the_transform() -> None:
    # The training matrix is what the server computes for the same texts, bit for bit.
    train = make_corpus(400, seed=12)
    for params in (TfidfParams(), TfidfParams(token_pattern=r"[^,;.\n]+", ngram_max=3)):
        encoder, X = TfidfEncoder.fit(train, params)
        Y = encoder.transform(train)
        for name in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(X, name), getattr(Y, name))


@pytest.mark.parametrize("params", [TfidfParams(), TfidfParams(ngram_max=3, min_df=1),
                                    TfidfParams(token_pattern=r"[^,;.\n]+")],
                         ids=["default", "trigrams", "string-path"])
def test_one_and_two_processes_fit_the_same(
    monkeypatch: pytest.MonkeyPatch, params: TfidfParams
) -> None:
    import models.tfidf_fit as tfidf_fit

    train = make_corpus(500, seed=13)
    one = TfidfEncoder.fit(train, params, workers=1)
    monkeypatch.setattr(tfidf_fit, "_BLOCK_DOCS", 13)  # 39 blocks over 2 forked workers,
    monkeypatch.setattr(tfidf_fit, "_CHARS_PER_WORKER", 1)  # however small the corpus
    two = TfidfEncoder.fit(train, params, workers=2)
    assert_same_fit(one, two)
    assert_matches(two[1], sklearn_for(params).fit_transform(train))


def test_key_overflow_takes_the_string_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.tfidf_fit as tfidf_fit

    train = make_corpus(400, seed=14)
    params = TfidfParams(ngram_max=3, min_df=1)
    packed = TfidfEncoder.fit(train, params)
    # The corpus has over 20 distinct tokens: their 1..3-grams no longer fit keys below 10**3.
    assert packed[0].n_features > 20
    monkeypatch.setattr(tfidf_fit, "_KEY_LIMIT", 10**3)
    assert tfidf_fit._max_base(3) < 10
    passes = []
    count_corpus = tfidf_fit._count_corpus

    def spy(pmap, texts, bounds, tok, n_max):
        passes.append((tok.joined_ngram_max, n_max))
        return count_corpus(pmap, texts, bounds, tok, n_max)

    monkeypatch.setattr(tfidf_fit, "_count_corpus", spy)
    assert_same_fit(packed, TfidfEncoder.fit(train, params))
    assert passes == [(1, 3), (3, 1)]  # packed n-grams gave up, joined strings did it


def test_joined_ngrams_that_collide_merge_as_in_sklearn() -> None:
    # Tokens with spaces: ("a b", "c") and ("a", "b c") are both the bigram "a b c", and
    # the token "a b c" is that term too; sklearn counts them as one feature.
    train = ["a b,c", "a,b c", "a b c", "a b,c,d", "d,a b"] * 2
    params = TfidfParams(token_pattern=r"[^,]+", min_df=1)
    encoder, X = TfidfEncoder.fit(train, params)
    ref = sklearn_for(params)
    ref_train = ref.fit_transform(train)
    assert encoder.feature_names() == ref.get_feature_names_out().tolist()
    np.testing.assert_allclose(encoder._idf, ref.idf_, rtol=1e-6)
    assert_matches(X, ref_train)


def test_fit_does_not_import_sklearn() -> None:
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = None  # any import of it now fails\n"
        "from models.tfidf import TfidfEncoder\n"
        "texts = ['the sauce and the cheese', 'cheese bread', 'the oven bread'] * 30\n"
        "encoder, X = TfidfEncoder.fit(texts, workers=2)\n"
        "assert encoder.n_features > 5 and X.shape == (90, encoder.n_features)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_edge_rows() -> None:
    encoder, _ = TfidfEncoder.fit(make_corpus(200, seed=3))
    texts = ["", "zyzzyva quux", "a I é", "sauce", "sauce cheese sauce"]
    X = encoder.transform(texts)
    assert X.shape == (5, encoder.n_features)
    assert list(np.diff(X.indptr))[:3] == [0, 0, 0]
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms, [0, 0, 0, 1, 1], atol=1e-6)
    ids, vals = encoder.transform_one("zyzzyva quux")
    assert ids.shape == vals.shape == (0,)
    assert ids.dtype == np.int32 and vals.dtype == np.float32
    assert encoder.transform([]).shape == (0, encoder.n_features)
    # Identical rows from the batch and the single-document path.
    for i, text in enumerate(texts):
        ids, vals = encoder.transform_one(text)
        np.testing.assert_array_equal(ids, X[i].indices)
        np.testing.assert_allclose(vals, X[i].data, rtol=0, atol=1e-7)


def test_long_document_uses_same_values() -> None:
    # Many distinct terms take transform_one's numpy branch rather than its Python one.
    train = make_corpus(400, seed=4)
    encoder, _ = TfidfEncoder.fit(train)
    long_doc = " ".join(train[:60])
    assert len(encoder.transform_one(long_doc)[0]) > 100
    ref = sklearn_for(TfidfParams()).fit(train)
    assert_one_matches(encoder, [long_doc], ref.transform([long_doc]))


def test_batch_spans_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.tfidf as tfidf

    train = make_corpus(300, seed=5)
    encoder, X = TfidfEncoder.fit(train)
    monkeypatch.setattr(tfidf, "_BATCH_CHUNK", 7)
    assert_matches(encoder.transform(train), X)


def test_bad_inputs() -> None:
    encoder, _ = TfidfEncoder.fit(make_corpus(100, seed=6))
    with pytest.raises(InvalidInputError):
        encoder.transform("one string, not a list")
    with pytest.raises(InvalidInputError):
        encoder.transform(["ok", None])
    with pytest.raises(InvalidInputError):
        encoder.transform_one(None)
    raw, _ = TfidfEncoder.fit(make_corpus(100, seed=6), TfidfParams(lowercase=False))
    with pytest.raises(InvalidInputError):
        raw.transform_one(b"bytes")
    with pytest.raises(InvalidInputError):
        raw.transform([b"bytes"])
    with pytest.raises(InvalidInputError):
        TfidfEncoder.fit(["a b", "c d"])  # nothing survives the token pattern / min_df
    with pytest.raises(InvalidInputError):
        TfidfEncoder.fit(["sauce", "sauce"], TfidfParams(min_df=3))  # min_df above n_docs
    for texts in ([], ["", " "], "one string"):
        with pytest.raises(InvalidInputError):
            TfidfEncoder.fit(texts)
    with pytest.raises(InvalidInputError, match="strings"):
        TfidfEncoder.fit([*make_corpus(100, seed=6), None])
    with pytest.raises(InvalidInputError, match="strings"):
        TfidfEncoder.fit([*make_corpus(100, seed=6), b"bytes"], TfidfParams(lowercase=False))


def test_worker_errors_reach_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.tfidf_fit as tfidf_fit

    monkeypatch.setattr(tfidf_fit, "_CHARS_PER_WORKER", 1)
    # bytes pass len() but not the str pattern: the worker process raises, we get it.
    with pytest.raises(InvalidInputError, match="strings"):
        TfidfEncoder.fit([*make_corpus(100, seed=6), b"bytes"], workers=2)
    with pytest.raises(InvalidInputError):
        TfidfParams(ngram_max=0)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(tmp_path: Path, mmap: bool) -> None:
    train = make_corpus(300, seed=7)
    test = make_corpus(80, seed=8)
    params = TfidfParams(max_features=500)
    encoder, _ = TfidfEncoder.fit(train, params)
    entry = encoder.save(tmp_path)

    assert entry["kind"] == "tfidf"
    assert entry["n_features"] == encoder.n_features
    assert entry["params"] == asdict(params)
    assert sorted(entry["files"]) == sorted([VOCAB_FILE, IDF_FILE])
    json.dumps(entry)  # goes into the manifest as is
    vocab = json.loads((tmp_path / VOCAB_FILE).read_text(encoding="utf-8"))
    assert vocab == encoder.feature_names()
    assert np.load(tmp_path / IDF_FILE, allow_pickle=False).dtype == np.float32

    loaded = TfidfEncoder.load(tmp_path, json.loads(json.dumps(entry)), mmap=mmap)
    assert loaded.params == params
    assert loaded.n_features == encoder.n_features
    a, b = encoder.transform(test), loaded.transform(test)
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    for text in test:
        for x, y in zip(encoder.transform_one(text), loaded.transform_one(text), strict=True):
            np.testing.assert_array_equal(x, y)


def _saved(tmp_path: Path) -> tuple[dict, Path]:
    encoder, _ = TfidfEncoder.fit(make_corpus(100, seed=9))
    return encoder.save(tmp_path), tmp_path


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        (VOCAB_FILE, None),
        (VOCAB_FILE, b'["sauce", "chee'),
        (VOCAB_FILE, b'{"sauce": 0}'),
        (VOCAB_FILE, b'["sauce", 3]'),
        (VOCAB_FILE, b'["sauce"]'),  # fewer terms than the manifest says
        (VOCAB_FILE, b"\xff\xfe\x00garbage"),
        (IDF_FILE, None),
        (IDF_FILE, b"not an npy file"),
        (IDF_FILE, b""),
    ],
    ids=["vocab-missing", "vocab-truncated", "vocab-dict", "vocab-non-str", "vocab-short",
         "vocab-binary", "idf-missing", "idf-garbage", "idf-empty"],
)  # fmt: skip
def test_load_broken_file_names_it(
    tmp_path: Path, filename: str, content: bytes | None
) -> None:
    entry, folder = _saved(tmp_path)
    target = folder / filename
    if content is None:
        target.unlink()
    else:
        target.write_bytes(content)
    for mmap in (True, False):
        with pytest.raises(BundleError) as info:
            TfidfEncoder.load(folder, entry, mmap=mmap)
        assert info.value.path == str(target)
        assert filename in str(info.value)


def test_load_wrong_idf_array(tmp_path: Path) -> None:
    entry, folder = _saved(tmp_path)
    n = entry["n_features"]
    for bad in (np.ones(n, np.float64), np.ones(n + 1, np.float32), np.full(n, np.nan, np.float32)):
        np.save(folder / IDF_FILE, bad)
        with pytest.raises(BundleError) as info:
            TfidfEncoder.load(folder, entry)
        assert info.value.path == str(folder / IDF_FILE)
    np.save(folder / IDF_FILE, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError):
        TfidfEncoder.load(folder, entry, mmap=False)  # pickled arrays are refused


def test_load_bad_params(tmp_path: Path) -> None:
    entry, folder = _saved(tmp_path)
    for bad in (
        {**entry, "params": {**entry["params"], "bogus": 1}},
        {**entry, "params": {**entry["params"], "ngram_max": 0}},
        {**entry, "params": None},
        {**entry, "kind": "dense"},
    ):
        with pytest.raises(BundleError):
            TfidfEncoder.load(folder, bad)


def test_serving_path_does_not_import_sklearn(tmp_path: Path) -> None:
    entry, folder = _saved(tmp_path)
    (folder / "entry.json").write_text(json.dumps(entry))
    code = (
        "import json, sys, pathlib\n"
        "from models.tfidf import TfidfEncoder\n"
        "folder = pathlib.Path(sys.argv[1])\n"
        "enc = TfidfEncoder.load(folder, json.loads((folder / 'entry.json').read_text()))\n"
        "enc.transform_one('the sauce'); enc.transform(['the sauce', 'cheese'])\n"
        "assert 'sklearn' not in sys.modules, 'sklearn was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, cwd=REPO_ROOT)


@pytest.mark.slow
@pytest.mark.skipif(not COOKING_TRAIN.is_file(), reason=f"real data not found: {COOKING_TRAIN}")
def test_real_cooking_titles() -> None:
    with COOKING_TRAIN.open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    train, test = texts[:3000], texts[3000:3200]
    encoder, X = TfidfEncoder.fit(train)
    ref = sklearn_for(TfidfParams())
    assert_matches(X, ref.fit_transform(train))
    ref_test = ref.transform(test)
    assert_matches(encoder.transform(test), ref_test)
    assert_one_matches(encoder, test, ref_test)


def test_fast_token_pattern_matches_default() -> None:
    # The encoder swaps the default pattern for an equivalent faster one: fuzz the claim.
    import re

    encoder, _ = TfidfEncoder.fit(make_corpus(100, seed=10))
    alphabet = "ab_Z9é\u0301\u00b2\u2167日 \t\n.,'-!\u200b\U0001f600İß"
    rng = random.Random(11)
    reference = re.compile(TfidfParams().token_pattern).findall
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        assert encoder._findall(text) == reference(text), repr(text)
