"""Explanations against the margins of tests/models/reference.py (no code shared): the
contributions add up to the path margins, and one term's contribution is what removing that
term takes off them."""

from __future__ import annotations

import numpy as np
import pytest

import models
from models.builder import build
from models.explain import DENSE_TERM, explain_label
from tests.conftest import tiny_params
from tests.models.reference import node_margins
from tests.models.tiny_onnx import make_tiny_encoder


def mean_path_margin(ens, margins: np.ndarray, label: int) -> float:
    """Average over trees of the sum of the margins on the label's root-to-leaf path."""
    total = 0.0
    for t in range(ens.n_trees):
        node = int(ens.label_node[t, label])
        while ens.parent[node] >= 0:
            total += margins[node]
            node = int(ens.parent[node])
    return total / ens.n_trees


@pytest.fixture(scope="module")
def fused(tmp_path_factory, tiny_corpus):
    folder = tmp_path_factory.mktemp("fused-explain")
    model, _ = make_tiny_encoder(folder / "enc")
    train, _ = tiny_corpus
    return models.load_bundle(str(build(train, folder / "b", tiny_params(
        dense_encoder=str(model), dense_weight=2.0, n_trees=2))))


@pytest.mark.parametrize("which", ["tfidf", "fused"])
def test_contributions_add_up_to_the_path_margins(which, tiny_predictor, fused, tiny_corpus):
    predictor = tiny_predictor if which == "tfidf" else fused
    _, test = tiny_corpus
    X = predictor.encode(test.texts[:12])
    margins = node_margins(predictor.ensemble, X)
    rng = np.random.default_rng(0)
    for d in range(X.shape[0]):
        x = X[d]
        for label in rng.choice(predictor.n_labels, 6, replace=False):
            e = explain_label(predictor.ensemble, x.indices, x.data, int(label))
            want = mean_path_margin(predictor.ensemble, margins[d], int(label))
            assert e.total() == pytest.approx(want, abs=1e-5)
            assert (e.dense is not None) == (which == "fused")
            assert np.all(np.diff(e.contributions) <= 0)


def test_a_terms_contribution_is_what_removing_it_takes_off(tiny_predictor, tiny_corpus):
    _, test = tiny_corpus
    ens = tiny_predictor.ensemble
    X = tiny_predictor.encode(test.texts[:4])
    for d in range(X.shape[0]):
        x = X[d]
        label = tiny_predictor.predict_ids(x, top_k=1)[0][0, 0]
        e = explain_label(ens, x.indices, x.data, int(label))
        full = mean_path_margin(ens, node_margins(ens, x)[0], int(label))
        for f, c in zip(e.features[:3].tolist(), e.contributions[:3].tolist()):
            without = x.copy()
            without.data[without.indices == f] = 0.0
            rest = mean_path_margin(ens, node_margins(ens, without)[0], int(label))
            assert c == pytest.approx(full - rest, abs=1e-5)
        assert e.contributions[0] > 0  # the top label has terms that pushed it up


def test_predict_with_explain(tiny_predictor, fused, tiny_corpus):
    _, test = tiny_corpus
    texts = test.texts[:8]
    terms = set(tiny_predictor.encoder.tfidf.feature_names())
    for predictor in (tiny_predictor, fused):
        plain = predictor.predict(texts, top_k=3)
        explained = predictor.predict(texts, top_k=3, explain=True)
        single = [predictor.predict([t], top_k=3, explain=True)[0] for t in texts]
        # (a dense encoder's batch and single encodings differ in float rounding)
        for row, srow in zip(explained, single):
            assert [lab for lab, _, _ in row] == [lab for lab, _, _ in srow]
            for (_, _, e), (_, _, se) in zip(row, srow):
                assert [x["term"] for x in e] == [x["term"] for x in se]
                assert np.allclose([x["contribution"] for x in e],
                                   [x["contribution"] for x in se], atol=1e-5)
        for row, erow in zip(plain, explained):
            assert row == [(lab, s) for lab, s, _ in erow]
            for _, _, expl in erow:
                words = [x for x in expl if x["term"] != DENSE_TERM]
                assert 1 <= len(words) <= 5
                assert all(x["contribution"] > 0 for x in words)
                assert [x["contribution"] for x in words] == sorted(
                    (x["contribution"] for x in words), reverse=True)
                if predictor is tiny_predictor:
                    assert {x["term"] for x in words} <= terms
                assert (expl[-1]["term"] == DENSE_TERM) == (predictor is fused)
    # the terms are the document's own words
    text = test.texts[0]
    for _, _, expl in tiny_predictor.predict([text], top_k=3, explain=True)[0]:
        assert all(set(x["term"].split()) <= set(text.lower().split()) for x in expl)


def test_explain_follows_filters_and_thresholds(tiny_predictor, tiny_corpus):
    _, test = tiny_corpus
    texts = test.texts[:5]
    got = tiny_predictor.predict(texts, top_k=4, label_filter={"include": ["t0/*"]},
                                 min_score=0.01, explain=True)
    plain = tiny_predictor.predict(texts, top_k=4, label_filter={"include": ["t0/*"]},
                                   min_score=0.01)
    assert [[(lab, s) for lab, s, _ in row] for row in got] == plain


def test_feature_bundles_name_features_by_id(tmp_path, tiny_corpus):
    from models.data import Corpus

    train, test = tiny_corpus
    tiny = models.load_bundle(str(build(train, tmp_path / "t", tiny_params(n_trees=1))))
    corpus = Corpus(labels=train.labels, features=tiny.encode(train.texts))
    predictor = models.load_bundle(str(build(corpus, tmp_path / "xc", tiny_params(n_trees=1))))
    row = predictor.predict_features(tiny.encode(test.texts[:1]), top_k=1, explain=True)[0]
    assert row[0][2] and all(x["term"].startswith("feature ") for x in row[0][2])
