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


@pytest.mark.parametrize(("bitmap_mb", "min_rows"), [(0, 16), (64, 1)])
def test_exhaustive_scores_with_and_without_feature_bitmaps(tiny_predictor, test_rows, monkeypatch,
                                                            bitmap_mb, min_rows):
    """No chunk searched through a bitmap, then every chunk: the same exhaustive scores."""
    import models.search

    monkeypatch.setattr(models.search, "BITMAP_MIN_ROWS", min_rows)
    _, X = test_rows
    ref = reference_scores(tiny_predictor, X)
    n = tiny_predictor.n_labels
    ens = tiny_predictor.ensemble
    post = tiny_predictor._searcher.post
    bitmaps = models.search.FeatureBitmaps.build(ens, tiny_predictor.n_features, bitmap_mb)
    with models.search.Searcher(ens, tiny_predictor.n_features, post, threads=1,
                                bitmaps=bitmaps) as searcher:
        labels, scores, counts = searcher.search(X.indptr, X.indices, X.data, n, n)
    assert (counts == n).all()
    for d in range(X.shape[0]):
        assert np.allclose(scores[d], ref[d, labels[d]], atol=1e-6)


def test_feature_bitmaps_mark_each_chunks_features_and_count_the_rows_before(tiny_predictor):
    from models.search import build_feature_bitmaps

    ens = tiny_predictor.ensemble
    n_features = tiny_predictor.n_features
    n_words = (n_features + 63) // 64
    off, bitmap = build_feature_bitmaps(ens.chunk_ptr, ens.chunk_feat, n_features,
                                        budget_bytes=1 << 30, min_rows=1)
    mapped = np.flatnonzero(off >= 0)
    # an ample budget maps every chunk that has a row
    assert sorted(mapped.tolist()) == np.flatnonzero(np.diff(ens.chunk_ptr) > 0).tolist()
    for node in mapped[:: max(1, len(mapped) // 50)]:
        r0, r1 = int(ens.chunk_ptr[node]), int(ens.chunk_ptr[node + 1])
        feats = np.asarray(ens.chunk_feat[r0:r1])
        words = bitmap[off[node] : off[node] + 2 * n_words].reshape(n_words, 2)
        has = [bool((int(words[f // 64, 0]) >> (f % 64)) & 1) for f in range(n_features)]
        assert has == [f in set(feats.tolist()) for f in range(n_features)]
        assert words[:, 1].tolist() == [int((feats < 64 * w).sum()) for w in range(n_words)]


def test_a_small_bitmap_budget_covers_the_top_layers_first(tiny_predictor):
    from models.search import build_feature_bitmaps

    ens = tiny_predictor.ensemble
    per_chunk = 16 * ((tiny_predictor.n_features + 63) // 64)
    n_roots = ens.n_trees
    off, _ = build_feature_bitmaps(ens.chunk_ptr, ens.chunk_feat, tiny_predictor.n_features,
                                   budget_bytes=n_roots * per_chunk, min_rows=1)
    # every tree's root, not the first tree's whole top
    assert sorted(np.flatnonzero(off >= 0).tolist()) == sorted(ens.tree_root.tolist())
