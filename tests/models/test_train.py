"""Ranker training: hard negatives mined by the partly trained tree's own beam."""

from __future__ import annotations

import numpy as np
import pytest

import models
from models import train as train_module
from models.builder import build
from models.tree import row_start
from tests.conftest import tiny_params
from tests.models.reference import beam_leaves, leaf_scores


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
        ref = beam_leaves(partial, X[:300], beam)
        for d, nodes in enumerate(ref):
            assert set(np.flatnonzero(got[d]).tolist()) == nodes, d


def test_one_layer_partial_tree_mines_the_exhaustive_top(mined):
    _, calls = mined
    X, partial, beam, reached = calls[0]
    ref = leaf_scores(partial, X[:300], "l3-hinge")
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
    ref = leaf_scores(predictor.ensemble, X, "l3-hinge")
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
