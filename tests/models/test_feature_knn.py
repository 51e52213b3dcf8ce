"""The kNN part over the feature rows (models.knn.PostingsIndex) against a plain numpy oracle
that shares no code with it (brute-force cosines of the dense training rows, the vote, the
trees' exhaustive scores from tests.models.reference), and bundles that choose it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

import models
from models.builder import build
from models.errors import BundleError, InvalidInputError
from models.explain import KNN_TERM, PROFILE_TERM
from models.knn import KnnMatcher, PostingsIndex
from models.params import BuildParams
from tests.conftest import tiny_params
from tests.models.reference import (
    assert_last_explanation_entry,
    assert_ranks_all_labels_as,
    assert_text_paths_agree,
    leaf_scores,
    oracle_pool,
)

#: the kNN rule of the bundle under test (one candidate: the choice keeps it)
K, POWER, WEIGHT = 6, 1.0, 0.4


def oracle_nearest(train: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k training rows of largest cosine with ``query`` among those sharing a feature
    with it (ties: the smaller row), with their cosines."""
    norms = np.linalg.norm(train, axis=1)
    qn = np.linalg.norm(query)
    if qn == 0:
        return []
    shares = [i for i in range(train.shape[0]) if np.any((train[i] != 0) & (query != 0))]
    cos = {i: float(train[i] @ query / (norms[i] * qn)) for i in shares}
    return sorted(cos.items(), key=lambda item: (-item[1], item[0]))[:k]


def oracle_votes(predictor, train, X: sp.csr_matrix, k: int = K, power: float = POWER,
                 n_columns: int | None = None) -> np.ndarray:
    """(n_docs, n_labels): each label's share of the k nearest training documents' weight
    cos ** power (negative cosines: 0), over the first ``n_columns`` features (None: all)."""
    X_train = predictor.encode(train.texts)[:, :n_columns].toarray().astype(np.float64)
    index = {name: j for j, name in enumerate(predictor.label_names)}
    out = np.zeros((X.shape[0], predictor.n_labels))
    for d, query in enumerate(X[:, :n_columns].toarray().astype(np.float64)):
        nearest = oracle_nearest(X_train, query, k)
        weights = [max(c, 0.0) ** power for _, c in nearest]
        if not sum(weights):
            continue
        for (i, _), w in zip(nearest, weights):
            for lab in train.labels[i]:
                out[d, index[lab]] += w
        out[d] /= sum(weights)
    return out


def knn_params(**overrides) -> BuildParams:
    base = dict(feature_knn_max_postings=10**9, knn_k_grid=[K], knn_power_grid=[POWER],
                knn_weight_grid=[WEIGHT], feature_knn_threshold_grid=[0.0])
    return tiny_params(**{**base, **overrides})


@pytest.fixture(scope="module")
def knn_bundle(tmp_path_factory, tiny_corpus):
    train, _ = tiny_corpus
    # the held-out threshold fuses the votes too: built here to run that path
    return build(train, tmp_path_factory.mktemp("fknn") / "b",
                 knn_params(tune_threshold=True))


# ----------------------------------------------------------------- the index alone
def random_rows(seed: int, n: int, n_features: int = 60) -> sp.csr_matrix:
    X = sp.random(n, n_features, density=0.08, random_state=seed, format="csr",
                  dtype=np.float32)
    X.sort_indices()
    return X


@pytest.mark.parametrize(("threads", "negative"),
                         [(1, None), (2, None), (1, "index"), (1, "query")])
def test_postings_find_the_nearest_with_their_cosine(threads, negative):
    """Also with values below zero (given features may have them) in the index (then every
    query takes the general path) or in the queries only: there the float32 sums may order
    near ties otherwise than the oracle, so each document is checked by its true cosine."""
    X, Q = random_rows(1, 400), random_rows(2, 40)
    Q.data *= 3.0  # a query's norm does not matter
    if negative is not None:
        (X if negative == "index" else Q).data[::3] *= -1.0
    index = PostingsIndex.build(X)
    assert index.positive == (negative != "index")
    keys, sims = index.neighbours((Q.indptr, Q.indices, Q.data), 7, threads)
    train, queries = X.toarray().astype(np.float64), Q.toarray().astype(np.float64)
    for q in range(Q.shape[0]):
        every = dict(oracle_nearest(train, queries[q], train.shape[0]))
        want = sorted(every.values(), reverse=True)[:7]
        got = [int(key) for key in keys[q] if key >= 0]
        assert len(set(got)) == len(got) == len(want)
        np.testing.assert_allclose(sims[q, : len(got)], want, atol=1e-5)
        np.testing.assert_allclose([every[i] for i in got], want, atol=1e-5)
        assert (keys[q, len(got):] == -1).all() and (sims[q, len(got):] == 0).all()
        if negative is None:
            assert got == [i for i, _ in oracle_nearest(train, queries[q], 7)]


def test_a_document_whose_partial_sum_cancels_to_zero_is_found_once():
    X = sp.csr_matrix(np.array([[0.5, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32))
    Q = sp.csr_matrix(np.array([[1.0, -1.0, 1.0, 0.5]], np.float32))
    keys, _ = PostingsIndex.build(X).neighbours((Q.indptr, Q.indices, Q.data), 3)
    assert keys[0].tolist() == [1, 0, -1]


def test_a_query_without_features_has_no_neighbours_and_a_foreign_feature_is_refused():
    X = random_rows(3, 50)
    index = PostingsIndex.build(X)
    keys, _ = index.neighbours((np.array([0, 0]), np.zeros(0, np.int32),
                                np.zeros(0, np.float32)), 3)
    assert (keys == -1).all()
    with pytest.raises(InvalidInputError, match="feature id"):
        index.neighbours((np.array([0, 1]), np.array([X.shape[1]], np.int32),
                          np.ones(1, np.float32)), 3)


@pytest.mark.parametrize("threshold", [0.2, 0.4])
def test_a_threshold_keeps_each_documents_large_entries(threshold):
    X, Q = random_rows(4, 300), random_rows(5, 30)
    keys, sims = PostingsIndex.build(X, threshold).neighbours(
        (Q.indptr, Q.indices, Q.data), 5)
    train = X.toarray().astype(np.float64)
    norms = np.linalg.norm(train, axis=1, keepdims=True)
    train = np.divide(train, norms, out=np.zeros_like(train), where=norms > 0)
    train[train < threshold] = 0  # the oracle scales the kept entries to norm 1 again
    assert 0 < np.count_nonzero(train) < X.nnz
    for q, query in enumerate(Q.toarray().astype(np.float64)):
        # documents left with one feature tie exactly, which float32 rounding may order
        # either way: the neighbours must be a best 5 with their true cosines
        every = dict(oracle_nearest(train, query, train.shape[0]))
        want = sorted(every.values(), reverse=True)[:5]
        got = [int(key) for key in keys[q] if key >= 0]
        assert len(set(got)) == len(got) == len(want)
        np.testing.assert_allclose(sims[q, : len(got)], want, atol=1e-5)
        np.testing.assert_allclose([every[i] for i in got], want, atol=1e-5)


def test_reads_are_the_postings_of_the_queries_features():
    X = sp.csr_matrix(np.array([[1, 0.1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]], np.float32))
    rows = (X.indptr, X.indices, X.data)
    # the rows as queries, features held by 3, 1 and 2 documents: (3 + 1) + 3 + (3 + 2) + 2
    assert PostingsIndex.build(X).reads(rows) == pytest.approx(14 / 4)
    # at 0.2 the first document keeps feature 0 alone (its unit entries 0.995 and 0.0995)
    assert PostingsIndex.build(X, 0.2).reads(rows) == pytest.approx(13 / 4)


# ----------------------------------------------------------------- bundles
def test_manifest_records_the_knn_part_over_the_features(knn_bundle):
    m = json.loads((knn_bundle / "manifest.json").read_text())
    assert m["format_version"] == 8  # the pool takes the labels of most votes
    entry = m["knn"]
    assert (entry["kind"], entry["k"], entry["power"], entry["weight"],
            entry["centroid_weight"], entry["max_voted_labels"]) == (
        "postings", K, POWER, WEIGHT, 0.0, BuildParams().knn_max_voted_labels)
    assert entry["n_docs"] == m["n_train_docs"] and entry["n_features"] == m["n_features"]
    assert entry["bytes"] == sum((knn_bundle / f).stat().st_size for f in entry["files"])
    assert m["build"]["knn_bytes"] == entry["bytes"]
    sel = m["build"]["knn_selection"]
    assert sel["index"] == "postings" and sel["thresholds"][0]["mean_postings"] > 0
    assert sel["chosen"] == {"threshold": 0.0, "k": K, "power": POWER, "weight": WEIGHT}
    assert "rerank_choice" in m["build"]["stages"] and "threshold" in m


@pytest.mark.parametrize("max_voted", [None, 0, 1])
def test_fused_scores_match_the_oracle(knn_bundle, tiny_corpus, max_voted):
    train, test = tiny_corpus
    predictor = models.load_bundle(knn_bundle)
    assert isinstance(predictor.knn, KnnMatcher)
    if max_voted is not None:  # None: the bundle's own
        predictor.knn = predictor.knn.with_rule(
            dataclasses.replace(predictor.knn.rule, max_voted=max_voted))
    cap = predictor.knn.rule.max_voted
    X = predictor.encode(test.texts[:30])
    trees = leaf_scores(predictor.ensemble, X, predictor.manifest["params"]["post_processor"])
    votes = oracle_votes(predictor, train, X)
    assert votes.any()
    want = (1 - WEIGHT) * trees + WEIGHT * votes
    assert_ranks_all_labels_as(predictor, X, want)
    # the best 5 of the pool: the trees' exact top 5 and the voted labels of most votes
    ids, scores, _ = predictor.predict_ids(X, top_k=5, beam_size=predictor.n_labels)
    moved = capped = 0
    for d in range(X.shape[0]):
        top = sorted(range(predictor.n_labels), key=lambda j: (-trees[d, j], j))[:5]
        pool = oracle_pool(top, votes[d], cap)
        best = sorted(pool, key=lambda j: (-want[d, j], j))[:5]
        assert ids[d].tolist() == best
        np.testing.assert_allclose(scores[d], want[d, best], atol=1e-5)
        moved += best != top
        capped += best != sorted(oracle_pool(top, votes[d], 0),
                                 key=lambda j: (-want[d, j], j))[:5]
    assert moved > 0  # the votes changed some ranking
    assert (capped > 0) == (cap == 1)  # one voted label a document is too few here


def test_text_single_batch_and_features_agree(knn_bundle, tiny_corpus):
    _, test = tiny_corpus
    assert_text_paths_agree(models.load_bundle(knn_bundle), test.texts[:12], top_k=5)


def test_explanations_name_the_votes_share(knn_bundle, tiny_corpus):
    train, test = tiny_corpus
    predictor = models.load_bundle(knn_bundle)
    X = predictor.encode(test.texts[:8])
    assert_last_explanation_entry(predictor, X, KNN_TERM,
                                  WEIGHT * oracle_votes(predictor, train, X))


def test_a_label_filter_applies_to_voted_labels(knn_bundle, tiny_corpus):
    _, test = tiny_corpus
    predictor = models.load_bundle(knn_bundle)
    allowed = predictor.label_names[::3]
    got = predictor.predict(test.texts[:20], top_k=3, label_filter={"include": allowed})
    assert all(lab in set(allowed) for row in got for lab, _ in row)


@pytest.mark.parametrize(("name", "change"), [
    ("knn.postings_ptr.npy", lambda a: a[:-1]),
    ("knn.postings_docs.npy", lambda a: a + 10**6),
    ("knn.postings_values.npy", lambda a: a[:-1]),
    ("knn.postings_values.npy", lambda a: a.astype(np.float64)),
])
def test_damaged_postings_are_refused_naming_the_file(knn_bundle, tmp_path, name, change):
    copy = tmp_path / "copy"
    shutil.copytree(knn_bundle, copy)
    np.save(copy / name, change(np.load(copy / name)), allow_pickle=False)
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        models.load_bundle(copy)


def test_an_unknown_knn_kind_is_refused(knn_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(knn_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["knn"]["kind"] = "faiss"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="kNN kind"):
        models.load_bundle(copy)


@pytest.mark.parametrize(("key", "value"), [("max_voted_labels", -1), ("k", "ten"),
                                            ("k", None)])
def test_a_bad_rule_in_the_knn_entry_is_refused(knn_bundle, tmp_path, key, value):
    copy = tmp_path / "copy"
    shutil.copytree(knn_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["knn"][key] = value
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"(?s)k(nn entry)?.*manifest\.json"):
        models.load_bundle(copy)


def test_votes_then_profiles_match_the_oracle(tmp_path, tiny_corpus):
    """Both parts: the pool fused with the votes is cut at the profiles' pool of 4, which
    the profiles re-rank (tests/models/test_profiles.py has the profiles' oracle)."""
    from tests.models.test_profiles import oracle_cosines

    train, test = tiny_corpus
    w_p, t_p = 4.0, 0.05
    out = build(train, tmp_path / "b", knn_params(
        profile_weight_grid=[w_p], profile_threshold_grid=[t_p], profile_pool_size=4))
    predictor = models.load_bundle(out)
    assert predictor.manifest["format_version"] == 8 and "profiles" in predictor.manifest
    X = predictor.encode(test.texts[:25])
    n = predictor.n_labels
    trees = leaf_scores(predictor.ensemble, X, predictor.manifest["params"]["post_processor"])
    fused = (1 - WEIGHT) * trees + WEIGHT * oracle_votes(predictor, train, X)
    cos = oracle_cosines(predictor, train, X, threshold=t_p)
    ids, scores, _ = predictor.predict_ids(X, top_k=2, beam_size=n)
    for d in range(X.shape[0]):
        top = sorted(range(n), key=lambda j: (-trees[d, j], j))[:4]
        pool = oracle_pool(top, fused[d] - (1 - WEIGHT) * trees[d],
                           predictor.knn.rule.max_voted)
        kept = sorted(pool, key=lambda j: (-fused[d, j], j))[:4]
        final = (fused[d] + w_p * cos[d]) / (1 + w_p)
        best = sorted(kept, key=lambda j: (-final[j], j))[:2]
        assert ids[d].tolist() == best
        np.testing.assert_allclose(scores[d], final[best], atol=1e-5)
    why = predictor.predict_features(X[:3], top_k=2, explain=True)
    assert all([t["term"] for t in entry[-2:]] == [KNN_TERM, PROFILE_TERM]
               for row in why for _, _, entry in row)


def test_a_query_too_costly_builds_no_knn_part(tmp_path, tiny_corpus):
    train, _ = tiny_corpus
    out = build(train, tmp_path / "b", knn_params(feature_knn_max_postings=1))
    m = json.loads((out / "manifest.json").read_text())
    sel = m["build"]["knn_selection"]
    assert sel["chosen"] is None and sel["max_postings"] == 1
    assert [(t["admitted"], t["mean_postings"] > 1) for t in sel["thresholds"]] == [
        (False, True)]
    assert "knn" not in m and m["format_version"] == 3 and not list(out.glob("knn.*"))


def test_the_rule_is_picked_on_the_split_and_kept_on_its_cross_fitted_gain(tmp_path,
                                                                           tiny_corpus):
    train, _ = tiny_corpus
    out = build(train, tmp_path / "b", knn_params(knn_weight_grid=[0.0, 0.5]))
    m = json.loads((out / "manifest.json").read_text())
    sel = m["build"]["knn_selection"]
    assert 0 < sel["n_first_half_docs"] < sel["n_validation_docs"]
    assert sel["n_first_half_docs"] + sel["n_second_half_docs"] == sel["n_validation_docs"]
    alone = next(c for c in sel["candidates"] if c["weight"] == 0)
    voted = next(c for c in sel["candidates"] if c["weight"] == 0.5)
    assert len(alone["halves"]) == len(voted["halves"]) == 2
    picked = (voted["P@1"] + voted["P@5"], voted["P@1"]) > (
        alone["P@1"] + alone["P@5"], alone["P@1"])
    kept = picked and sel["gain"] > sel["standard_error"]
    assert sel["chosen"]["weight"] == (0.5 if kept else 0.0)
    assert ("knn" in m) == kept
    if not picked:  # the trees alone picked: no gain to measure
        assert sel["gain"] == 0.0


def test_a_held_out_half_scores_its_documents_alone():
    from models.builder import HeldOutTruth

    truth = HeldOutTruth(["a", "b"], [["a"], ["b"], ["a"], []])
    ids = np.array([[0, 1], [0, 1], [1, 0], [0, 1]])
    counts = np.array([2, 2, 2, 2])
    assert truth.p1_p5(ids, counts) == {"P@1": pytest.approx(1 / 3), "P@5": 0.2}
    half = truth.only(np.array([True, False, True, True]))
    assert half.p1_p5(ids, counts) == {"P@1": 0.5, "P@5": 0.2}
    assert truth.only(np.zeros(4, dtype=bool)).p1_p5(ids, counts) == {"P@1": 0.0, "P@5": 0.0}


def test_a_negative_cost_bound_and_a_threshold_outside_0_1_are_refused():
    with pytest.raises(InvalidInputError, match="feature_knn_max_postings"):
        BuildParams(feature_knn_max_postings=-1).validate()
    with pytest.raises(InvalidInputError, match="feature_knn_threshold_grid"):
        BuildParams(feature_knn_threshold_grid=[0.1, 1.0]).validate()


def test_a_split_too_small_to_confirm_the_gain_keeps_the_trees_alone(tmp_path, tiny_corpus):
    train, _ = tiny_corpus
    # one held-out document: no standard error to beat
    share = 1.2 / train.n_docs
    out = build(train, tmp_path / "b", knn_params(knn_weight_grid=[0.0, 0.5],
                                                  validation_share=share))
    m = json.loads((out / "manifest.json").read_text())
    sel = m["build"]["knn_selection"]
    assert sel["n_validation_docs"] == 1
    assert sel["chosen"]["weight"] == 0.0 and "knn" not in m
    assert np.isfinite(sel["gain"])
