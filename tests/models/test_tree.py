"""The lean layout: row marks, narrow dtypes, quantized weights, and the forest joined on disk
tree by tree; every search result checked against the exhaustive reference."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import models
from models import bundle as bundle_io
from models.builder import _train_trees
from models.data import label_matrix
from models.engine import StageTimer
from models.errors import BundleError, InvalidInputError
from models.tree import ROW_BLOCK, Ensemble, narrowest, quantize, row_marks, row_start, row_starts
from tests.conftest import corpus_from_docs, tiny_params
from tests.models.reference import leaf_scores


@pytest.mark.parametrize("n_rows", [0, 1, 15, 16, 17, 100, 4 * ROW_BLOCK])
def test_row_marks_and_starts_match_a_plain_cumsum(n_rows):
    rng = np.random.default_rng(n_rows)
    row_len = rng.integers(0, 5, n_rows).astype(np.uint8)
    ptr = np.concatenate(([0], np.cumsum(row_len, dtype=np.int64)))
    marks = row_marks(row_len)
    assert np.array_equal(marks, ptr[::ROW_BLOCK])
    for r in range(n_rows + 1):
        assert row_start(row_len, marks, r) == ptr[r]
    for lo in range(0, n_rows + 1, 7):
        assert np.array_equal(row_starts(row_len, marks, lo, n_rows), ptr[lo:])


def test_narrowest_integer_dtype_holds_the_values():
    assert narrowest("entry_child", [np.array([0, 255])]) == np.uint8
    assert narrowest("entry_child", [np.array([3]), np.array([256])]) == np.uint16
    assert narrowest("row_len", [np.array([70_000])]) == np.int32
    assert narrowest("entry_val", [np.zeros(2, np.int8)]) == np.int8
    assert narrowest("bias", [np.zeros(2)]) == np.float32


def one_tree_ensembles(corpus, predictor, params) -> list[Ensemble]:
    train, _ = corpus
    X = predictor.encode(train.texts)
    Y = label_matrix(train.labels, predictor.label_names)
    return list(_train_trees(X, Y, params.resolved(fused=False), 2, StageTimer(verbose=False)))


def test_forest_written_tree_by_tree_equals_the_joined_forest(tmp_path, tiny_corpus,
                                                              tiny_predictor):
    params = tiny_params()
    trees = [quantize(t, params.weight_dtype)
             for t in one_tree_ensembles(tiny_corpus, tiny_predictor, params)]
    joined = Ensemble.concatenate(trees)
    writer = bundle_io.ForestWriter(tmp_path)
    for tree in trees:
        writer.add(tree)
    written = writer.finish()
    assert not (tmp_path / "_trees").exists()
    for name, arr in joined.arrays().items():
        got = written.arrays()[name]
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
        # the builder wrote the same forest into the bundle
        assert np.array_equal(tiny_predictor.ensemble.arrays()[name], arr), name


@pytest.fixture(scope="module", params=["int16", "int8"])
def quantized(request, tmp_path_factory, tiny_corpus, tiny_bundle):
    from models.builder import build

    if request.param == "int8":  # the default
        return "int8", models.load_bundle(tiny_bundle)
    train, _ = tiny_corpus
    out = tmp_path_factory.mktemp("quantized") / request.param
    return request.param, models.load_bundle(
        build(train, out, tiny_params(weight_dtype=request.param)))


def test_quantized_weights_are_within_half_a_step(quantized, tiny_float32_bundle):
    weight_dtype, q = quantized
    full, ens = models.load_bundle(tiny_float32_bundle).ensemble, q.ensemble
    assert q.manifest["params"]["weight_dtype"] == weight_dtype
    assert ens.entry_val.dtype == np.dtype(weight_dtype)
    # quantized after training: the same entries, the same children
    assert np.array_equal(ens.entry_child, full.entry_child)
    assert np.array_equal(ens.row_len, full.row_len)
    step = np.asarray(ens.weight_scale)[ens.entry_node(0, ens.n_entries)]
    err = np.abs(ens.weights(0, ens.n_entries) - full.weights(0, full.n_entries))
    # half a step, plus float32 rounding of the product value * scale
    assert np.all(err <= step / 2 + 1e-6 * np.abs(full.weights(0, full.n_entries)))
    # each classifier's largest weight is its type's largest value
    qmax = np.iinfo(np.dtype(weight_dtype)).max
    assert np.abs(np.asarray(ens.entry_val, dtype=np.int64)).max() == qmax


def test_quantized_full_beam_gives_exhaustive_scores(quantized, tiny_corpus):
    _, q = quantized
    _, test = tiny_corpus
    X = q.encode(test.texts[:20])
    ref = leaf_scores(q.ensemble, X, q.manifest["params"]["post_processor"])
    n = q.n_labels
    index = {name: i for i, name in enumerate(q.label_names)}
    for d, row in enumerate(q.predict_features(X, top_k=n, beam_size=n)):
        assert len(row) == n
        for name, score in row:
            assert score == pytest.approx(ref[d, index[name]], abs=1e-6)
    for d, row in enumerate(q.predict_features(X, top_k=5, beam_size=2)):
        for name, score in row:
            assert score == pytest.approx(ref[d, index[name]], abs=1e-6)


def test_chunk_wider_than_a_byte_is_searched_exactly(tmp_path):
    from models.builder import build
    from models.synth import SynthParams, generate

    train_docs, test_docs = generate(SynthParams(n_labels=300, n_train=1200, n_test=20, seed=3,
                                                 mean_doc_words=30))
    params = tiny_params(n_trees=1, weight_dtype="int8")
    params.cluster.max_leaf_size = 10_000  # one level: every label a child of the root
    q = models.load_bundle(build(corpus_from_docs(train_docs), tmp_path / "wide", params))
    assert q.n_labels > 256 and q.ensemble.entry_child.dtype == np.uint16
    X = q.encode([d["text"] for d in test_docs])
    ref = leaf_scores(q.ensemble, X, q.manifest["params"]["post_processor"])
    index = {name: i for i, name in enumerate(q.label_names)}
    for d, row in enumerate(q.predict_features(X, top_k=q.n_labels, beam_size=1)):
        for name, score in row:
            assert score == pytest.approx(ref[d, index[name]], abs=1e-6)


def test_quantize_keeps_float32_and_refuses_twice(tiny_float32_bundle):
    ens = models.load_bundle(tiny_float32_bundle).ensemble
    assert quantize(ens, "float32") is ens
    int8 = quantize(Ensemble(**{k: np.asarray(v) for k, v in ens.arrays().items()}), "int8")
    with pytest.raises(InvalidInputError):
        quantize(int8, "int16")


def copy_bundle(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_row_marks_that_disagree_with_row_lengths_are_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    marks = np.load(b / "ensemble.row_mark.npy")
    marks[1] += 1
    np.save(b / "ensemble.row_mark.npy", marks)
    with pytest.raises(BundleError) as err:
        models.load_bundle(b)
    assert "ensemble.row_mark.npy" in str(err.value)


def test_child_offset_beyond_its_chunk_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    child = np.load(b / "ensemble.entry_child.npy")
    child[0] = 200  # the root has 4 children
    np.save(b / "ensemble.entry_child.npy", child)
    with pytest.raises(BundleError) as err:
        models.load_bundle(b)
    assert "ensemble.entry_child.npy" in str(err.value)
