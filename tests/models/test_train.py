"""Ranker training: the solver against liblinear's (through scikit-learn), the same model
however the work is split, and hard negatives mined by the partly trained tree's own beam."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import models
from models import train as train_module
from models.builder import build
from models.cluster import LabelTree
from models.data import normalize_rows
from models.params import RankerParams
from models.tree import row_start
from tests.conftest import tiny_params
from tests.models.reference import beam_leaves, leaf_scores

#: the post-processor the tests' builds rank by (the default)
POST = tiny_params().post_processor


def man_params(beam: int, n_trees: int = 1):
    # mining runs on the float32 tree being trained: compare the final tree unquantized
    params = tiny_params(n_trees=n_trees, weight_dtype="float32")
    params.ranker.negatives = "tfn+man"
    params.ranker.negative_beam_size = beam
    return params


def build_recording_mining(train, out, params) -> tuple[models.Predictor, list]:
    """Build, recording every call of the miner as (X, partial tree, beam, mined nodes)."""
    calls = []
    real = train_module._matcher_nodes

    def spy(X, partial, beam_size, post, threads):
        reached = real(X, partial, beam_size, post, threads)
        calls.append((X, partial, beam_size, reached))
        return reached

    mp = pytest.MonkeyPatch()
    mp.setattr(train_module, "_matcher_nodes", spy)
    try:
        out = build(train, out, params)
    finally:
        mp.undo()
    return models.load_bundle(out), calls


@pytest.fixture(scope="module")
def mined(tmp_path_factory, tiny_corpus):
    """A one-tree tfn+man build, with every call of the miner recorded."""
    train, _ = tiny_corpus
    return build_recording_mining(train, tmp_path_factory.mktemp("man") / "b",
                                  man_params(beam=3))


def test_every_layer_above_the_labels_mines(mined):
    predictor, calls = mined
    depth = predictor.manifest["trees"][0]["depth"]
    assert [c[1].tree_depth[0] for c in calls] == list(range(1, depth))


def test_partial_tree_is_the_final_trees_top(mined):
    predictor, calls = mined
    final = predictor.ensemble
    for _, partial, _, _ in calls:
        n = partial.n_nodes
        inner = n - partial.n_labels  # nodes whose children the partial tree holds
        assert np.array_equal(partial.parent, final.parent[:n])
        assert np.array_equal(partial.bias, final.bias[:n])
        assert np.array_equal(partial.child_ptr[: inner + 1], final.child_ptr[: inner + 1])
        rows = slice(0, int(final.chunk_ptr[inner]))
        entries = slice(0, row_start(final.row_len, final.row_mark, int(final.chunk_ptr[inner])))
        assert np.array_equal(partial.chunk_feat, final.chunk_feat[rows])
        assert np.array_equal(partial.entry_val, final.entry_val[entries])
        assert np.array_equal(partial.entry_child, final.entry_child[entries])
        assert np.array_equal(partial.row_len, final.row_len[rows])


def test_mined_nodes_are_the_partial_trees_beam(mined):
    _, calls = mined
    for X, partial, beam, reached in calls:
        got = reached[:300].toarray()
        want = min(beam, partial.n_labels)
        assert (got.sum(axis=1) == want).all()
        ref = beam_leaves(partial, X[:300], beam, POST)
        for d, nodes in enumerate(ref):
            assert set(np.flatnonzero(got[d]).tolist()) == nodes, d


def test_one_layer_partial_tree_mines_the_exhaustive_top(mined):
    _, calls = mined
    X, partial, beam, reached = calls[0]
    ref = leaf_scores(partial, X[:300], POST)
    top = np.argsort(-ref, axis=1, kind="stable")[:, :beam]
    assert np.array_equal(np.sort(top, axis=1), reached[:300].tolil().rows.tolist())


def test_hard_negatives_change_the_lower_layers_only(mined, tmp_path, tiny_corpus):
    predictor, _ = mined
    train, _ = tiny_corpus
    plain = models.load_bundle(build(train, tmp_path / "tfn", tiny_params(n_trees=1)))
    a, b = predictor.ensemble, plain.ensemble
    top = int(a.child_ptr[1])  # the root's children see every document either way
    assert np.array_equal(a.bias[:top], b.bias[:top])
    assert not np.array_equal(a.bias, b.bias)
    assert predictor.version != plain.version


def test_full_beam_is_exhaustive_with_hard_negatives(tmp_path, tiny_corpus):
    train, test = tiny_corpus
    predictor = models.load_bundle(build(train, tmp_path / "man3", man_params(beam=2, n_trees=2)))
    X = predictor.encode(test.texts[:20])
    ref = leaf_scores(predictor.ensemble, X, POST)
    n = predictor.n_labels
    got = predictor.predict_ids(X, top_k=n, beam_size=n)
    for d in range(X.shape[0]):
        assert np.allclose(got[1][d], ref[d, got[0][d]], atol=1e-6)
        assert np.allclose(got[1][d], np.sort(ref[d])[::-1], atol=1e-6)


def test_a_beam_as_wide_as_the_layers_gives_every_parent_every_document(tmp_path, tiny_corpus):
    train, _ = tiny_corpus
    _, calls = build_recording_mining(train, tmp_path / "wide", man_params(beam=10_000))
    reached = [c[3] for c in calls]
    assert reached and all(r.nnz == r.shape[0] * r.shape[1] for r in reached)


def solve(X: sp.csr_matrix, Y: np.ndarray, ranker: RankerParams,
          dense_start: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's classifiers of the columns of ``Y`` (+1 / 0) on the rows of ``X``, as
    one chunk: (weights (n_children, n_features) with the dense block, bias terms, entries
    per row); every feature is used, so local ids are the feature ids."""
    X = sp.csr_matrix(X, dtype=np.float32)
    X.sort_indices()
    pos = sp.csr_matrix(Y)
    n_features = X.shape[1]
    dense_start = n_features if dense_start is None else dense_start
    rows, row_len, child, val, bias, dense_w = train_module._train_chunk(
        X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data, n_features,
        pos.indptr.astype(np.int64), pos.indices.astype(np.int32), Y.shape[1], ranker.C,
        ranker.eps, ranker.max_iter, ranker.bias, ranker.weight_threshold, 0, 0, dense_start,
        np.arange(n_features - dense_start, dtype=np.int32), n_features - dense_start)
    W = np.zeros((Y.shape[1], n_features))
    W[child, np.repeat(rows, row_len)] = val
    W[:, dense_start:] = dense_w
    return W, bias, np.split(child, np.cumsum(row_len)[:-1])


def random_problem(n_docs: int, n_features: int, n_children: int,
                   seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = sp.random(n_docs, n_features, density=0.1, random_state=rng, format="csr",
                  dtype=np.float64)
    X.data += 0.1
    X = normalize_rows(X)
    # each child's positives lean on a few features of their own, so the problems differ
    lean = rng.random((n_features, n_children)) < 0.05
    score = X @ lean + 0.3 * rng.random((n_docs, n_children))
    return X, (score > np.quantile(score, 0.85, axis=0)).astype(np.int8)


@pytest.mark.parametrize("n_children", [1, 8, 13])  # one block, one full, one and a part
def test_each_classifier_is_liblinears_optimum(n_children):
    """Blocks of children trained side by side reach, child by child, the optimum that
    liblinear's own dual solver finds for that child alone (run tight on both sides)."""
    svm = pytest.importorskip("sklearn.svm")
    X, Y = random_problem(300, 40, n_children, seed=n_children)
    ranker = RankerParams(C=1.0, eps=1e-6, max_iter=5000, bias=1.0, weight_threshold=0.0)
    W, bias, _ = solve(X, Y, ranker)
    for c in range(n_children):
        ref = svm.LinearSVC(C=ranker.C, loss="squared_hinge", dual=True, tol=1e-9,
                            max_iter=100_000, intercept_scaling=ranker.bias)
        ref.fit(X, 2 * Y[:, c] - 1)
        assert np.allclose(W[c], ref.coef_[0], atol=2e-4), c
        assert bias[c] == pytest.approx(ref.intercept_[0], abs=2e-4)


def test_pruned_entries_are_the_weights_above_the_threshold_children_ascending():
    X, Y = random_problem(200, 30, 11, seed=1)
    full, _, _ = solve(X, Y, RankerParams(weight_threshold=0.0))
    pruned, _, children = solve(X, Y, RankerParams(weight_threshold=0.1))
    assert np.array_equal(pruned, np.where(np.abs(full) >= 0.1, full.astype(np.float32), 0))
    assert all(np.all(np.diff(c) > 0) for c in children)


def test_dense_block_weights_are_kept_unpruned():
    X, Y = random_problem(200, 30, 9, seed=2)
    full, _, _ = solve(X, Y, RankerParams(weight_threshold=0.0))
    mixed, _, _ = solve(X, Y, RankerParams(weight_threshold=0.1), dense_start=20)
    assert np.allclose(mixed[:, 20:], full[:, 20:], atol=1e-6)
    assert np.array_equal(mixed[:, :20], np.where(np.abs(full[:, :20]) >= 0.1,
                                                  full[:, :20].astype(np.float32), 0))


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_any_split_of_a_parents_children_trains_the_same_tree(threads, monkeypatch):
    """A one-level tree (the root over 21 labels: two blocks and a part), its children split
    over several jobs as the thread count plans them, gives the arrays of one job for all."""
    X, Y = random_problem(400, 50, 21, seed=3)
    tree = LabelTree(leaf_code=np.zeros(21, dtype=np.int64), depth_bits=0, layer_bits=[])
    jobs = train_module._plan_jobs(sp.csc_matrix(np.ones((400, 1))), np.array([21]), threads)
    assert len(jobs) > 1 and all(lo % train_module.CHILD_BLOCK == 0 for _, lo, _ in jobs)
    split = train_module.train_tree(X, sp.csr_matrix(Y), tree, RankerParams(), seed=4,
                                    threads=threads)
    monkeypatch.setattr(train_module, "_plan_jobs",
                        lambda parent_docs, counts, threads: [(0, 0, int(counts[0]))])
    whole = train_module.train_tree(X, sp.csr_matrix(Y), tree, RankerParams(), seed=4,
                                    threads=threads)
    for name, arr in whole.arrays().items():
        assert np.array_equal(arr, split.arrays()[name]), name
