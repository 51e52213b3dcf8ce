"""The kNN matcher against a plain numpy oracle that shares no code with it (brute-force
cosine neighbours, then the vote; label centroids summed document by document), and bundles
built with ``knn`` (tiny ONNX encoder)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import models
from models.builder import build, knn_preference
from models.errors import BundleError, InvalidInputError
from models.explain import CENTROID_TERM, KNN_TERM
from models.knn import (
    KnnMatcher,
    NoKnn,
    Pool,
    VoteRule,
    candidate_pool,
    label_centroids,
    most_voted,
)
from tests.conftest import corpus_from_docs, tiny_params
from tests.models.reference import (
    assert_ranks_all_labels_as,
    assert_text_paths_agree,
    leaf_scores,
    oracle_pool,
)
from tests.models.tiny_onnx import WORDS, make_tiny_encoder


# ----------------------------------------------------------------- the oracle
def oracle_votes(train: np.ndarray, Y: np.ndarray, queries: np.ndarray, k: int,
                 power: float) -> np.ndarray:
    """(n_queries, n_labels): the k most cosine-similar training rows (ties: the smaller
    row), each voting sim ** power (negative sims: 0) for its labels, over the total."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((queries.shape[0], Y.shape[1]))
    for q, query in enumerate(queries):
        norm = np.linalg.norm(query)
        if norm == 0:
            continue
        sims = a @ (query / norm)
        nearest = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:k]
        weights = np.array([max(sims[i], 0.0) ** power for i in nearest])
        if weights.sum() == 0:
            continue
        for w, i in zip(weights, nearest):
            out[q] += w * Y[i]
        out[q] /= weights.sum()
    return out


def oracle_centroid_scores(train: np.ndarray, Y: np.ndarray, queries: np.ndarray,
                           ) -> np.ndarray:
    """(n_queries, n_labels): max(0, cosine) of each query to each label's centroid, the sum
    of its training rows scaled to norm 1 (a label without rows: 0)."""
    out = np.zeros((queries.shape[0], Y.shape[1]))
    for j in range(Y.shape[1]):
        total = np.zeros(train.shape[1])
        for i in np.flatnonzero(Y[:, j]):
            total += train[i] / np.linalg.norm(train[i])
        if np.linalg.norm(total) == 0:
            continue
        for q, query in enumerate(queries):
            if np.linalg.norm(query):
                cos = total @ query / (np.linalg.norm(total) * np.linalg.norm(query))
                out[q, j] = max(cos, 0.0)
    return out


def random_set(seed: int, n: int = 300, dim: int = 16, n_labels: int = 25,
               ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    Y = (rng.random((n, n_labels)) < 0.08).astype(np.float64)
    Y[np.arange(n), rng.integers(0, n_labels, n)] = 1  # every document has a label
    return emb, Y


def test_the_knn_module_and_onnxruntime_import_in_either_order() -> None:
    # a script that imports models.knn before loading a bundle with a dense encoder
    root = Path(__file__).resolve().parents[2]
    for code in ("import models.knn, onnxruntime", "import onnxruntime, models.knn"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=root)
        assert proc.returncode == 0, (code, proc.returncode)


def dense_votes(matcher: KnnMatcher, queries: np.ndarray) -> np.ndarray:
    """(n, n_labels): the matcher's votes for ``queries``, densely."""
    indptr, ids, votes = matcher.votes(queries)
    return sp.csr_matrix((votes, ids, indptr),
                         shape=(queries.shape[0], matcher.n_labels)).toarray()


@pytest.mark.parametrize(("k", "power"), [(1, 1.0), (5, 1.0), (10, 0.0), (30, 4.0)])
def test_votes_match_the_oracle(k: int, power: float) -> None:
    emb, Y = random_set(0)
    rng = np.random.default_rng(1)
    queries = np.vstack([rng.normal(size=(40, emb.shape[1])), emb[:5] * 3.0,
                         np.zeros((1, emb.shape[1]))]).astype(np.float32)
    matcher = KnnMatcher.build(emb, sp.csr_matrix(Y), VoteRule(k, power, 0.5))
    got = dense_votes(matcher, queries)
    want = oracle_votes(emb.astype(np.float64), Y, queries.astype(np.float64), k, power)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not got[-1].any()  # a zero query has no neighbour


def test_centroids_match_the_oracle() -> None:
    emb, Y = random_set(3, n_labels=30)
    Y[:, 29] = 0  # a label without documents
    queries = np.random.default_rng(4).normal(size=(20, emb.shape[1]))
    queries[0] = 0  # a query without a direction
    C = label_centroids(emb, sp.csr_matrix(Y))
    assert C.dtype == np.float32 and not C[29].any()
    np.testing.assert_allclose(np.linalg.norm(C[:29], axis=1), 1.0, atol=1e-6)
    want = oracle_centroid_scores(emb.astype(np.float64), Y, queries)
    got = np.maximum(queries @ C.T.astype(np.float64), 0) / np.maximum(
        np.linalg.norm(queries, axis=1, keepdims=True), 1e-300)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pool_ranks_every_row_as_a_plain_sort() -> None:
    rng = np.random.default_rng(5)
    sizes = [0, 1, 7, 3, 12]
    ptr = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    ids = np.concatenate([np.sort(rng.choice(50, size=m, replace=False)) for m in sizes])
    parts = [rng.random(int(ptr[-1])).round(1) for _ in range(3)]  # rounded: ties happen
    pool = Pool(ptr, ids.astype(np.int64), *parts)
    for w, c, top_k in ((0.3, 0.0, 5), (0.2, 0.5, 3), (0.0, 1.0, 20)):
        got_ids, got_scores, counts = pool.rank(w, c, top_k)
        for d in range(len(sizes)):
            span = slice(ptr[d], ptr[d + 1])
            fused = ((1 - w) * parts[0][span] + w * parts[1][span] + c * parts[2][span]) / (
                1 + c)
            want = sorted(zip(-fused, ids[span]))[:top_k]
            assert counts[d] == len(want)
            assert got_ids[d, : counts[d]].tolist() == [int(i) for _, i in want]
            np.testing.assert_allclose(got_scores[d, : counts[d]], [-f for f, _ in want])
            assert (got_ids[d, counts[d]:] == -1).all()


def test_neighbours_are_the_nearest_with_their_similarity() -> None:
    emb, Y = random_set(2)
    matcher = KnnMatcher.build(emb, sp.csr_matrix(Y), VoteRule(7, 1.0, 0.5))
    keys, sims = matcher.neighbours(emb[:10], 7)
    a = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for q in range(10):
        exact = a @ a[q]
        assert keys[q, 0] == q  # a training document is its own nearest
        np.testing.assert_allclose(sims[q], exact[keys[q]], atol=1e-5)
        np.testing.assert_allclose(sims[q], np.sort(exact)[::-1][:7], atol=1e-5)


def test_a_large_index_walks_its_graph_and_finds_nearly_all_neighbours() -> None:
    emb, Y = random_set(5, n=6000, dim=12)
    matcher = KnnMatcher.build(emb, sp.csr_matrix(Y), VoteRule(10, 1.0, 0.5))
    assert not matcher.index.exact  # above EXACT_MAX_DOCS
    queries = emb[:200] + 0.1 * np.random.default_rng(6).normal(size=(200, 12))
    got, _ = matcher.neighbours(queries.astype(np.float32), 10)
    a = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    exact = np.argsort(-(queries @ a.T), axis=1)[:, :10]
    recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact)])
    assert recall > 0.9


def test_more_neighbours_asked_than_indexed() -> None:
    emb, Y = random_set(3, n=6)
    matcher = KnnMatcher.build(emb, sp.csr_matrix(Y), VoteRule(10, 1.0, 0.5))
    keys, _ = matcher.neighbours(emb[:2], 10)
    assert (keys[:, :6] >= 0).all() and (keys[:, 6:] == -1).all()
    np.testing.assert_allclose(dense_votes(matcher, emb[:2]),
                               oracle_votes(emb, Y, emb[:2], 10, 1.0), atol=1e-5)


def test_index_file_is_the_same_for_the_same_data(tmp_path) -> None:
    emb, Y = random_set(4, n=2000)
    entries = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        matcher = KnnMatcher.build(emb, sp.csr_matrix(Y), VoteRule(5, 1.0, 0.5))
        entries.append(matcher.save(tmp_path / name))
    assert entries[0] == entries[1]  # the index's sha256 among them
    assert (tmp_path / "a" / "knn.usearch").read_bytes() == (
        tmp_path / "b" / "knn.usearch").read_bytes()


# ----------------------------------------------------------------- bundles with a kNN part
def knn_params(model, **overrides):
    base = dict(n_trees=2, dense_encoder=str(model), dense_weight=2.0, knn=True,
                knn_k_grid=[5], knn_power_grid=[1.0], knn_weight_grid=[0.4],
                knn_centroid_weight_grid=[0.3])
    return tiny_params(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model, _ = make_tiny_encoder(tmp_path_factory.mktemp("enc-knn"))
    return model


def word_docs(n: int, seed: int, n_labels: int = 24) -> list[dict]:
    """Documents of the tiny encoder's own words (so that their embeddings differ: unknown
    words all map to one token), 1-3 labels each, each label with words of its own."""
    rng = np.random.default_rng(seed)
    topics = [rng.choice(WORDS, size=6, replace=False) for _ in range(n_labels)]
    docs = []
    for i in range(n):
        labels = rng.choice(n_labels, size=rng.integers(1, 4), replace=False)
        words = [w for j in labels for w in rng.choice(topics[j], size=3)]
        words += list(rng.choice(WORDS, size=3))
        rng.shuffle(words)
        docs.append({"id": i, "text": " ".join(words), "labels": [f"t{j:02d}" for j in labels]})
    return docs


@pytest.fixture(scope="module")
def word_corpus():
    return corpus_from_docs(word_docs(700, seed=1)), corpus_from_docs(word_docs(60, seed=2))


@pytest.fixture(scope="module")
def knn_bundle(tmp_path_factory, word_corpus, tiny_model):
    train, _ = word_corpus
    # the held-out threshold fuses the kNN votes too: built here to run that path
    return build(train, tmp_path_factory.mktemp("knn") / "b",
                 knn_params(tiny_model, tune_threshold=True))


def oracle_parts(predictor, train, X: sp.csr_matrix,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each (n_docs, n_labels): the exact ensemble scores, the oracle votes over the
    training documents' embeddings (the dense block of their feature rows) and the oracle
    centroid scores."""
    entry = predictor.manifest["knn"]
    start = int(predictor.ensemble.dense_start[0])
    X_train = predictor.encode(train.texts)[:, start:].toarray().astype(np.float64)
    index = {name: j for j, name in enumerate(predictor.label_names)}
    Y = np.zeros((train.n_docs, predictor.n_labels))
    for i, labels in enumerate(train.labels):
        Y[i, [index[lab] for lab in labels]] = 1
    queries = X[:, start:].toarray().astype(np.float64)
    trees = leaf_scores(predictor.ensemble, X, predictor.manifest["params"]["post_processor"])
    return (trees, oracle_votes(X_train, Y, queries, entry["k"], entry["power"]),
            oracle_centroid_scores(X_train, Y, queries))


def oracle_fused(predictor, train, X: sp.csr_matrix) -> np.ndarray:
    """(n_docs, n_labels): ((1 - w) * trees + w * votes + c * centroids) / (1 + c)."""
    entry = predictor.manifest["knn"]
    w, c = entry["weight"], entry["centroid_weight"]
    trees, votes, centroids = oracle_parts(predictor, train, X)
    return ((1 - w) * trees + w * votes + c * centroids) / (1 + c)


def test_manifest_records_the_knn_part(knn_bundle):
    m = json.loads((knn_bundle / "manifest.json").read_text())
    assert m["format_version"] == 8  # the pool takes the voted labels of most votes
    assert m["params"]["knn"] is True
    entry = m["knn"]
    assert (entry["kind"], entry["k"], entry["power"], entry["weight"],
            entry["centroid_weight"]) == ("usearch", 5, 1.0, 0.4, 0.3)
    assert "knn.label_centroids.npy" in entry["files"]
    assert entry["n_docs"] == m["n_train_docs"] and entry["dim"] == 8
    assert entry["bytes"] == sum((knn_bundle / f).stat().st_size for f in entry["files"])
    assert m["build"]["knn_bytes"] == entry["bytes"]
    assert m["build"]["ensemble_bytes"] > 0
    sel = m["build"]["knn_selection"]
    assert sel["chosen"] == {"index": "usearch", "k": 5, "power": 1.0, "weight": 0.4,
                             "centroid_weight": 0.3}
    assert [(c["weight"], c["centroid_weight"]) for c in sel["candidates"]] == [(0.4, 0.3)]
    # each half picks for the other to measure the gain (kept: no trees-alone rule)
    assert 0 < sel["n_first_half_docs"] < sel["n_validation_docs"]
    assert sel["n_first_half_docs"] + sel["n_second_half_docs"] == sel["n_validation_docs"]
    assert {"gain", "standard_error"} <= set(sel)
    assert "threshold" in m


def test_fused_scores_match_the_oracle(knn_bundle, word_corpus):
    train, test = word_corpus
    predictor = models.load_bundle(knn_bundle)
    assert isinstance(predictor.knn, KnnMatcher)
    X = predictor.encode(test.texts[:30])
    entry = predictor.manifest["knn"]
    w, c = entry["weight"], entry["centroid_weight"]
    trees, votes, centroids = oracle_parts(predictor, train, X)
    want = ((1 - w) * trees + w * votes + c * centroids) / (1 + c)
    assert (want <= 1).all() and centroids.any()
    n = predictor.n_labels
    assert_ranks_all_labels_as(predictor, X, want)
    # a narrow top-k over a full beam: the best 5 of the pool, the trees' top 5 and the
    # voted labels of most votes (their tree scores computed exactly); the centroids
    # re-rank that pool
    ids, scores, _ = predictor.predict_ids(X, top_k=5, beam_size=n)
    for d in range(X.shape[0]):
        pool = oracle_pool(np.argsort(-trees[d], kind="stable")[:5].tolist(), votes[d],
                           predictor.knn.rule.max_voted)
        best = sorted(pool, key=lambda j: (-want[d, j], j))[:5]
        assert ids[d].tolist() == best
        np.testing.assert_allclose(scores[d], want[d, ids[d]], atol=1e-5)
    # and a narrow beam still returns exact fused scores
    ids, scores, counts = predictor.predict_ids(X, top_k=5, beam_size=2)
    for d in range(X.shape[0]):
        np.testing.assert_allclose(scores[d, : counts[d]], want[d, ids[d, : counts[d]]],
                                   atol=1e-5)


def test_a_fused_bundle_may_vote_by_the_postings_of_its_sparse_block(tmp_path, word_corpus,
                                                                     tiny_model):
    from tests.models.test_feature_knn import oracle_votes as oracle_sparse_votes

    train, test = word_corpus
    out = build(train, tmp_path / "b", knn_params(
        tiny_model, knn_indexes=["postings"], feature_knn_max_postings=10**9,
        feature_knn_threshold_grid=[0.0], knn_max_voted_labels=0))
    predictor = models.load_bundle(out)
    m = predictor.manifest
    start = int(predictor.ensemble.dense_start[0])
    assert (m["knn"]["kind"], m["knn"]["n_features"]) == ("postings", start)
    assert 0 < start < m["n_features"] and m["knn"]["centroid_weight"] == 0
    assert m["build"]["knn_selection"]["chosen"]["index"] == "postings"
    X = predictor.encode(test.texts[:30])
    trees = leaf_scores(predictor.ensemble, X, m["params"]["post_processor"])
    votes = oracle_sparse_votes(predictor, train, X, m["knn"]["k"], m["knn"]["power"],
                                n_columns=start)
    assert votes.any()
    assert_ranks_all_labels_as(predictor, X, (1 - m["knn"]["weight"]) * trees
                               + m["knn"]["weight"] * votes)


def test_text_single_batch_and_features_agree(knn_bundle, word_corpus):
    _, test = word_corpus
    assert_text_paths_agree(models.load_bundle(knn_bundle), test.texts[:12], top_k=5)


def test_explanations_name_the_votes_and_centroids_shares_of_the_score(
        knn_bundle, word_corpus, tiny_predictor, tiny_corpus):
    train, test = word_corpus
    predictor = models.load_bundle(knn_bundle)
    X = predictor.encode(test.texts[:10])
    entry = predictor.manifest["knn"]
    w, c = entry["weight"], entry["centroid_weight"]
    index = {name: j for j, name in enumerate(predictor.label_names)}
    _, votes, centroids = oracle_parts(predictor, train, X)
    n_voted = 0
    for d, row in enumerate(predictor.predict_features(X, top_k=5, explain=True)):
        for name, _, why in row:
            assert [t["term"] for t in why[-2:]] == [KNN_TERM, CENTROID_TERM]
            want = w * votes[d, index[name]] / (1 + c)
            assert why[-2]["contribution"] == pytest.approx(want, abs=1e-6)
            assert why[-1]["contribution"] == pytest.approx(
                c * centroids[d, index[name]] / (1 + c), abs=1e-6)
            n_voted += want > 0
            assert all(t["term"] not in (KNN_TERM, CENTROID_TERM) for t in why[:-2])
    assert n_voted > 0
    # a bundle without a kNN part names neither
    _, tiny_test = tiny_corpus
    for row in tiny_predictor.predict(tiny_test.texts[:5], top_k=3, explain=True):
        assert all(t["term"] not in (KNN_TERM, CENTROID_TERM)
                   for _, _, why in row for t in why)


def test_label_filter_applies_to_voted_labels(knn_bundle, word_corpus):
    _, test = word_corpus
    predictor = models.load_bundle(knn_bundle)
    allowed = predictor.label_names[::4]  # 6 of 24
    got = predictor.predict(test.texts[:20], top_k=5, label_filter={"include": allowed})
    assert all(lab in set(allowed) for row in got for lab, _ in row)
    assert all(len(row) == 5 for row in got)


def test_tampered_index_is_refused(knn_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(knn_bundle, copy)
    index = copy / "knn.usearch"
    raw = bytearray(index.read_bytes())
    raw[-1] ^= 0xFF
    index.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256") as err:
        models.load_bundle(str(copy))
    assert "knn.usearch" in str(err.value)


def test_out_of_range_label_ids_are_refused(knn_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(knn_bundle, copy)
    ids = np.load(copy / "knn.label_ids.npy")
    ids[0] = 10_000
    np.save(copy / "knn.label_ids.npy", ids)
    with pytest.raises(BundleError, match="out of range"):
        models.load_bundle(str(copy))


def test_centroids_of_another_shape_are_refused(knn_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(knn_bundle, copy)
    np.save(copy / "knn.label_centroids.npy", np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(BundleError, match="centroids") as err:
        models.load_bundle(str(copy))
    assert "knn.label_centroids.npy" in str(err.value)


def test_centroid_weight_zero_writes_the_kNN_format_of_before(tmp_path, word_corpus,
                                                              tiny_model):
    train, _ = word_corpus
    out = build(train, tmp_path / "b", knn_params(tiny_model, n_trees=1,
                                                 knn_centroid_weight_grid=[0.0],
                                                 knn_max_voted_labels=0))
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 4 and m["knn"]["centroid_weight"] == 0.0
    assert not (out / "knn.label_centroids.npy").exists()
    predictor = models.load_bundle(str(out))
    assert predictor.knn.centroids is None
    # a format-4 manifest of an earlier build has no centroid_weight: the votes alone
    del m["knn"]["centroid_weight"]
    (out / "manifest.json").write_text(json.dumps(m))
    again = models.load_bundle(str(out))
    assert again.knn.rule == VoteRule(5, 1.0, 0.4, 0.0)
    texts = word_corpus[1].texts[:5]
    assert again.predict(texts) == predictor.predict(texts)


def test_bundle_without_knn_loads_as_before(tiny_predictor):
    assert isinstance(tiny_predictor.knn, NoKnn)
    assert tiny_predictor.manifest["format_version"] == 3
    assert "knn" not in tiny_predictor.manifest


def test_weight_zero_builds_no_knn_part(tmp_path, tiny_corpus, tiny_model):
    train, _ = tiny_corpus
    params = knn_params(tiny_model, n_trees=1, knn_weight_grid=[0.0],
                        knn_centroid_weight_grid=[0.0])
    out = build(train, tmp_path / "b", params)
    m = json.loads((out / "manifest.json").read_text())
    assert "knn" not in m and m["format_version"] == 3 and not list(out.glob("knn.*"))
    assert m["build"]["knn_selection"]["chosen"]["weight"] == 0.0
    assert isinstance(models.load_bundle(str(out)).knn, NoKnn)


def test_the_knn_choice_weighs_the_fifth_label_as_the_first():
    def cand(p1, p5, weight, k=10, power=1.0):
        return {"P@1": p1, "P@5": p5, "weight": weight, "k": k, "power": power}

    trees_alone = cand(0.720, 0.310, 0.0, 0, 0.0)
    heavy = cand(0.745, 0.280, 0.5)  # the best first label, a worse fifth
    light = cand(0.738, 0.319, 0.2)
    assert max([trees_alone, heavy, light], key=knn_preference) is light
    assert max([trees_alone, heavy], key=knn_preference) is trees_alone
    # on the same mean, P@1 decides; then the lighter weight, the fewer neighbours
    sharper = cand(0.740, 0.317, 0.3)
    assert max([light, sharper], key=knn_preference) is sharper
    same = [cand(0.74, 0.31, 0.3), cand(0.74, 0.31, 0.2, 30), cand(0.74, 0.31, 0.2, 10)]
    assert max(same, key=knn_preference) is same[2]
    # then the lighter centroid weight
    centroids = [{**cand(0.74, 0.31, 0.2, 10), "centroid_weight": c} for c in (0.1, 0.05)]
    assert max([*centroids, same[2]], key=knn_preference) is same[2]
    assert max(centroids, key=knn_preference) is centroids[1]


def test_knn_needs_a_dense_block(tmp_path, tiny_corpus):
    train, _ = tiny_corpus
    with pytest.raises(InvalidInputError, match="dense block"):
        build(train, tmp_path / "b", tiny_params(n_trees=1, knn=True))


def test_knn_keeps_alpha_zero_out_of_the_dense_weight_choice(tiny_model):
    with pytest.raises(InvalidInputError, match="dense block"):
        knn_params(tiny_model, dense_weight="auto", dense_weight_grid=[0.0]).validate()


@pytest.mark.parametrize("bad", [{"knn_k_grid": [0]}, {"knn_power_grid": [-1.0]},
                                 {"knn_weight_grid": [1.5]}, {"knn_weight_grid": []},
                                 {"knn_centroid_weight_grid": [-0.1]},
                                 {"knn_centroid_weight_grid": []}])
def test_bad_knn_grids_are_refused(bad, tiny_model):
    with pytest.raises(InvalidInputError, match="knn_"):
        knn_params(tiny_model, **bad).validate()


def test_cli_knn_flag_sets_the_parameter(tmp_path, tiny_docs, tiny_model):
    from xmc.cli import main

    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(d) + "\n" for d in tiny_docs[0][:400]))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"n_trees": 1, "knn_k_grid": [5], "knn_power_grid": [1.0],
                                  "knn_weight_grid": [0.3],
                                  "cluster": {"branching_factor": 4, "max_leaf_size": 6}}))
    assert main(["build", str(train_file), "--out", str(tmp_path / "b"), "--params",
                 str(params), "--dense-encoder", str(tiny_model), "--dense-weight", "1",
                 "--knn"]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["params"]["knn"] is True and m["knn"]["weight"] == 0.3


@pytest.mark.parametrize(("n_keep", "filtered"), [(0, False), (3, False), (3, True), (1, True)])
def test_the_labels_scored_in_the_search_are_those_of_most_votes(n_keep, filtered):
    """Per row, the ``n_keep`` allowed voted labels of most votes (ties: the smaller id),
    ascending: the labels the pool may take (tests/models/reference.oracle_pool)."""
    rng = np.random.default_rng(4)
    votes = sp.random(30, 40, density=0.2, random_state=5, format="csr")
    votes.data = np.round(votes.data, 1)  # ties
    votes.sort_indices()
    allowed = rng.random(40) < 0.6 if filtered else np.zeros(0, dtype=bool)
    ptr, ids = most_voted(votes.indptr.astype(np.int64), votes.indices, votes.data,
                           allowed, n_keep)
    for d in range(30):
        row = votes.getrow(d)
        pairs = sorted((-v, j) for j, v in zip(row.indices, row.data)
                       if not filtered or allowed[j])
        want = sorted(j for _, j in (pairs[:n_keep] if n_keep else pairs))
        assert ids[ptr[d]:ptr[d + 1]].tolist() == want


def test_the_pool_asks_only_for_the_scores_not_given():
    """A voted label joining the pool takes its trees' score from ``scored`` when that
    holds it; only the others are asked for."""
    tree = (np.array([[1, -1], [4, 2]]), np.array([[0.9, 0.0], [0.8, 0.6]]), np.array([1, 2]))
    votes = (np.array([0, 2, 4]), np.array([3, 5, 2, 7], dtype=np.int32),
             np.array([0.5, 0.5, 0.4, 0.6]))
    scored = (np.array([0, 1, 1]), np.array([3]), np.array([0.3]))
    asked = []

    def exact(ptr: np.ndarray, ids: np.ndarray) -> np.ndarray:
        asked.append((ptr.tolist(), ids.tolist()))
        return ids / 100.0

    pool = candidate_pool(tree, votes, exact, scored=scored)
    assert pool.ptr.tolist() == [0, 3, 6]
    assert pool.ids.tolist() == [1, 3, 5, 2, 4, 7]
    np.testing.assert_allclose(pool.tree, [0.9, 0.3, 0.05, 0.6, 0.8, 0.07])
    np.testing.assert_allclose(pool.votes, [0.0, 0.5, 0.5, 0.4, 0.0, 0.6])
    assert asked == [([0, 1, 2], [5, 7])]
