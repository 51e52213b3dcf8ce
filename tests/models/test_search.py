"""Beam search against a slow exhaustive reference that shares no code with it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import models
from models.builder import build
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


def test_sigmoid_post_processor_matches_reference(tmp_path, tiny_corpus):
    train, test = tiny_corpus
    out = build(train, tmp_path / "sig", tiny_params(post_processor="sigmoid", n_trees=2))
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


