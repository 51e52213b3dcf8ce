"""Beam search against a slow exhaustive reference that shares no code with it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import models
from models.builder import build
from models.data import Corpus
from tests.conftest import tiny_params
from tests.models.reference import leaf_scores


def reference_scores(predictor: models.Predictor, X: sp.csr_matrix) -> np.ndarray:
    return leaf_scores(predictor.ensemble, X, predictor.manifest["params"]["post_processor"])


def as_dense(result: list[list[tuple[str, float]]], predictor) -> list[dict[int, float]]:
    index = {name: i for i, name in enumerate(predictor.label_names)}
    return [{index[name]: score for name, score in row} for row in result]


@pytest.fixture(scope="module")
def test_rows(tiny_predictor, tiny_corpus):
    _, test = tiny_corpus
    texts = [*test.texts[:25], "", "qqqq zzzz unknownword"]
    return texts, tiny_predictor.encode(texts)


def test_tree_is_deep_enough_to_matter(tiny_predictor):
    # 120 labels, branching 4, at most 6 labels a leaf: 5 binary splits, the leftover one
    # widening the top layer (8 clusters), then 4-way down to 32 clusters
    n = tiny_predictor.n_labels
    assert tiny_predictor.manifest["trees"] == [
        {"depth": 3, "layer_widths": [8, 32, n]}] * 3
    assert tiny_predictor.ensemble.n_trees == 3


def test_full_beam_gives_exhaustive_scores(tiny_predictor, test_rows):
    texts, X = test_rows
    ref = reference_scores(tiny_predictor, X)
    n = tiny_predictor.n_labels
    got = as_dense(tiny_predictor.predict(texts, top_k=n, beam_size=n), tiny_predictor)
    for d, row in enumerate(got):
        assert set(row) == set(range(n))
        for lab, score in row.items():
            assert score == pytest.approx(ref[d, lab], abs=1e-6)
    # order: best first, same ranking as the reference except within ties
    ranked = tiny_predictor.predict(texts, top_k=n, beam_size=n)
    for d, row in enumerate(ranked):
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True)
        ref_sorted = np.sort(ref[d])[::-1]
        assert np.allclose(scores, ref_sorted, atol=1e-6)


@pytest.mark.parametrize("beam_size", [1, 2, 5])
def test_narrow_beam_returns_exact_ensemble_scores(tiny_predictor, test_rows, beam_size):
    texts, X = test_rows
    ref = reference_scores(tiny_predictor, X)
    got = tiny_predictor.predict(texts, top_k=5, beam_size=beam_size)
    for d, row in enumerate(as_dense(got, tiny_predictor)):
        assert 1 <= len(row) <= 5
        for lab, score in row.items():
            assert score == pytest.approx(ref[d, lab], abs=1e-6)


def test_single_and_batch_and_features_agree(tiny_predictor, test_rows):
    texts, X = test_rows
    batch = tiny_predictor.predict(texts, top_k=5, beam_size=3)
    singles = [tiny_predictor.predict([t], top_k=5, beam_size=3)[0] for t in texts]
    feats = tiny_predictor.predict_features(X, top_k=5, beam_size=3)
    assert batch == singles == feats


def test_parallel_batch_matches_serial(tiny_predictor, tiny_corpus):
    _, test = tiny_corpus
    X = tiny_predictor.encode(test.texts)  # > 64 rows: the thread pool splits the batch
    parallel = tiny_predictor.predict_ids(X, top_k=5, beam_size=4)
    serial = [tiny_predictor.predict_ids(X[i], top_k=5, beam_size=4) for i in range(X.shape[0])]
    for i, (lab, score, count) in enumerate(serial):
        assert np.array_equal(parallel[0][i], lab[0])
        assert np.array_equal(parallel[1][i], score[0])
        assert parallel[2][i] == count[0]


@pytest.mark.parametrize("post", ["sigmoid", "l3-hinge"])
def test_other_post_processors_match_reference(tmp_path, tiny_corpus, post):
    train, test = tiny_corpus
    out = build(train, tmp_path / "post", tiny_params(post_processor=post, n_trees=2))
    predictor = models.load_bundle(out)
    X = predictor.encode(test.texts[:10])
    ref = reference_scores(predictor, X)
    n = predictor.n_labels
    for d, row in enumerate(as_dense(predictor.predict_features(X, top_k=n, beam_size=n),
                                     predictor)):
        for lab, score in row.items():
            assert score == pytest.approx(ref[d, lab], abs=1e-6)


def test_one_level_tree_is_one_vs_all(tmp_path, tiny_corpus):
    train, test = tiny_corpus
    params = tiny_params(n_trees=1)
    params.cluster.max_leaf_size = 10_000
    predictor = models.load_bundle(build(train, tmp_path / "ova", params))
    assert predictor.manifest["trees"] == [{"depth": 1,
                                            "layer_widths": [predictor.n_labels]}]
    X = predictor.encode(test.texts[:10])
    ref = reference_scores(predictor, X)
    got = as_dense(predictor.predict_features(X, top_k=3, beam_size=1), predictor)
    for d, row in enumerate(got):
        top = np.argsort(-ref[d], kind="stable")[:3]
        assert np.allclose(sorted(row.values(), reverse=True), ref[d, top], atol=1e-6)


def test_model_does_not_depend_on_thread_count(tmp_path, tiny_corpus, tiny_predictor):
    train, _ = tiny_corpus
    one = models.load_bundle(build(train, tmp_path / "one", tiny_params(threads=1)))
    three = models.load_bundle(build(train, tmp_path / "three", tiny_params(threads=3)))
    for name, arr in one.ensemble.arrays().items():
        assert np.array_equal(arr, three.ensemble.arrays()[name]), name
    assert one.version == three.version == tiny_predictor.version


@pytest.mark.parametrize(("bitmap_mb", "min_rows", "dir_min_rows"),
                         [(0, 16, 1 << 40), (64, 1, 1), (0, 16, 1)])
def test_exhaustive_scores_with_and_without_feature_lookups(tiny_predictor, test_rows, monkeypatch,
                                                            bitmap_mb, min_rows, dir_min_rows):
    """No chunk searched through a bitmap or directory, then every chunk through a bitmap,
    then every chunk through a row directory: the same exhaustive scores."""
    import models.feature_lookup
    import models.search

    monkeypatch.setattr(models.feature_lookup, "BITMAP_MIN_ROWS", min_rows)
    monkeypatch.setattr(models.feature_lookup, "DIR_MIN_ROWS", dir_min_rows)
    _, X = test_rows
    ref = reference_scores(tiny_predictor, X)
    n = tiny_predictor.n_labels
    ens = tiny_predictor.ensemble
    post = tiny_predictor._searcher.post
    lookup = models.feature_lookup.FeatureLookup.build(ens, tiny_predictor.n_features, bitmap_mb)
    assert (lookup.bitmap_off >= 0).any() == (bitmap_mb > 0)
    assert (lookup.dir_off >= 0).any() == (bitmap_mb == 0 and dir_min_rows == 1)
    with models.search.Searcher(ens, tiny_predictor.n_features, post, threads=1,
                                lookup=lookup) as searcher:
        labels, scores, counts = searcher.search(X.indptr, X.indices, X.data, n, n)
    assert (counts == n).all()
    for d in range(X.shape[0]):
        assert np.allclose(scores[d], ref[d, labels[d]], atol=1e-6)


def test_ordered_post_processor_ranks_by_margin_where_l3_hinge_ties(tmp_path):
    """The same tree scored both ways: where l3-hinge gives several labels exactly 1 (their
    margins past the hinge), l3-hinge-ordered ranks them apart, and it keeps the order of
    everything else. Documents of three clean label words each, so that margins pass 1."""
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for _ in range(400):
        labs = sorted(rng.choice(12, size=3, replace=False).tolist())
        texts.append(" ".join(f"w{k} w{k}x" for k in labs) + f" noise{rng.integers(50)}")
        labels.append([f"l{k}" for k in labs])
    params = tiny_params(n_trees=1)
    params.cluster.max_leaf_size = 10_000  # one level: a label ties as soon as its margin does
    corpus = Corpus(labels=labels, texts=texts, ids=[None] * len(texts))
    ordered = models.load_bundle(build(corpus, tmp_path / "o", params))
    assert ordered.manifest["params"]["post_processor"] == "l3-hinge-ordered"
    X = ordered.encode(texts[:100])
    plain = leaf_scores(ordered.ensemble, X, "l3-hinge")
    n = ordered.n_labels
    ids, scores, _ = ordered.predict_ids(X, top_k=n, beam_size=n)
    tied_docs = 0
    for d in range(X.shape[0]):
        top = np.flatnonzero(plain[d] == 1.0)
        if len(top) >= 2:
            tied_docs += 1
            assert len(np.unique(scores[d][np.isin(ids[d], top)])) == len(top)
        p = plain[d, ids[d]]  # the l3-hinge scores in the ordered ranking
        assert np.all(p[:-1] >= p[1:])
    assert tied_docs > 0  # the data has such ties, so the check above ran


def some_labels(predictor, n_rows: int, most: int, seed: int,
                ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Up to ``most`` distinct labels per row in no order, seeded: per row, and as CSR
    pointers and ids."""
    rng = np.random.default_rng(seed)
    wanted = [rng.choice(predictor.n_labels, size=rng.integers(0, most + 1), replace=False)
              for _ in range(n_rows)]
    ptr = np.concatenate(([0], np.cumsum([len(w) for w in wanted])))
    return wanted, ptr, np.concatenate(wanted).astype(np.int64)


def fresh_searcher(predictor, threads: int) -> models.search.Searcher:
    """A searcher of the predictor's ensemble with ``threads`` threads of its own."""
    ens = predictor.ensemble
    lookup = models.feature_lookup.FeatureLookup.build(ens, predictor.n_features, 128)
    return models.search.Searcher(ens, predictor.n_features, predictor._searcher.post,
                                  threads=threads, lookup=lookup)


@pytest.mark.parametrize(("threads", "beam_size"), [(1, 1), (1, 3), (2, 2)])
def test_labels_scored_in_the_search_are_the_exhaustive_scores(tiny_predictor, tiny_corpus,
                                                               threads, beam_size):
    """Labels scored in the search's own pass, inside the clusters the beam opened or not
    (a narrow beam opens few): the exhaustive scores, and the search's ranking unchanged."""
    _, test = tiny_corpus
    X = tiny_predictor.encode(test.texts)
    ref = reference_scores(tiny_predictor, X)
    wanted, ptr, ids = some_labels(tiny_predictor, X.shape[0], 7, seed=1)
    with fresh_searcher(tiny_predictor, threads) as searcher:
        rows = (X.indptr, X.indices, X.data)
        found, got = searcher.search_scoring(*rows, 5, beam_size, None, ptr, ids)
        plain = searcher.search(*rows, 5, beam_size)
        with pytest.raises(models.InvalidInputError):
            searcher.search_scoring(*rows, 5, beam_size, None, ptr[:-1], ids[:ptr[-2]])
    want = np.concatenate([ref[d, w] for d, w in enumerate(wanted)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    for a, b in zip(found, plain):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("beam_size", "weight"), [(1, 0.0), (1, 0.1), (2, 0.5)])
def test_labels_a_fusion_bound_leaves_out_could_not_enter_the_top_k(
        tiny_predictor, tiny_corpus, beam_size, weight):
    """With a fusion bound, each label scored beside the search gets its exhaustive score,
    or 0 when even that score, fused with its vote and the most the rest may add, stays
    below the fused score of every label the search returned: it could not have entered the
    top 5 of any pool holding those. Narrow beams leave some out."""
    _, test = tiny_corpus
    X = tiny_predictor.encode(test.texts)
    ref = reference_scores(tiny_predictor, X)
    wanted, ptr, ids = some_labels(tiny_predictor, X.shape[0], 7, seed=2)
    rng = np.random.default_rng(3)
    voted = [np.sort(w) for w in wanted]
    vote_values = [rng.random(len(w)) for w in wanted]
    vote_of = [dict(zip(v.tolist(), x.tolist())) for v, x in zip(voted, vote_values)]
    rest = 0.05
    bound = models.search.FusionBound(1.0 - weight, weight, rest,
                                      (ptr, np.concatenate(voted), np.concatenate(vote_values)))
    with fresh_searcher(tiny_predictor, 1) as searcher:
        rows = (X.indptr, X.indices, X.data)
        (top, top_scores, counts), got = searcher.search_scoring(*rows, 5, beam_size, None,
                                                                 ptr, ids, bound)
    n_left_out = 0
    for d, labels in enumerate(wanted):
        floor = -np.inf
        if counts[d] == 5:
            floor = min((1.0 - weight) * top_scores[d, j] + weight * vote_of[d].get(top[d, j], 0.0)
                        for j in range(5))
        for c, label in zip(range(ptr[d], ptr[d + 1]), labels.tolist()):
            exact = ref[d, label]
            if got[c] == 0.0 and exact > 0.0:
                n_left_out += 1
                assert (1.0 - weight) * exact + weight * vote_of[d][label] + rest < floor
            else:
                assert got[c] == pytest.approx(exact, abs=1e-6)
    assert n_left_out > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_label_scores_are_the_exhaustive_scores(tiny_predictor, tiny_corpus, threads):
    """Any labels of each row, scored exactly: a batch of more than 64 rows, on one thread
    and split across two."""
    _, test = tiny_corpus
    X = tiny_predictor.encode(test.texts)
    assert X.shape[0] > 64
    ref = reference_scores(tiny_predictor, X)
    wanted, ptr, ids = some_labels(tiny_predictor, X.shape[0], 5, seed=0)
    with fresh_searcher(tiny_predictor, threads) as searcher:
        got = searcher.label_scores(X.indptr, X.indices, X.data, ptr, ids)
    want = np.concatenate([ref[d, w] for d, w in enumerate(wanted)])
    np.testing.assert_allclose(got, want, atol=1e-6)
