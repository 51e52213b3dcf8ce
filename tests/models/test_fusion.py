"""TF-IDF fused with a dense ONNX encoder: build, save, load, predict (tiny ONNX model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

import models
from models.builder import build
from models.errors import BundleError
from tests.conftest import corpus_from_docs, tiny_params
from tests.models.test_builder import learnable_docs
from tests.models.tiny_onnx import make_tiny_encoder


@pytest.fixture(scope="module")
def fused_bundle(tmp_path_factory, tiny_corpus):
    folder = tmp_path_factory.mktemp("fused")
    model, _ = make_tiny_encoder(folder / "enc")
    train, _ = tiny_corpus
    params = tiny_params(dense_encoder=str(model), dense_weight=2.0)
    return build(train, folder / "bundle", params)


def test_manifest_lists_both_encoders_with_weight(fused_bundle):
    manifest = json.loads((fused_bundle / "manifest.json").read_text())
    kinds = [e["kind"] for e in manifest["encoders"]]
    assert kinds == ["tfidf", "onnx"]
    dense = manifest["encoders"][1]
    assert dense["weight"] == 2.0 and dense["dim"] == 8
    tfidf_n = manifest["encoders"][0]["n_features"]
    assert manifest["n_features"] == tfidf_n + 8
    assert not (fused_bundle / "_export").exists()
    for name in dense["files"]:
        assert (fused_bundle / name).is_file()
    # negatives "auto" resolves to hard negatives for a fused bundle, and says so
    assert manifest["params"]["ranker"]["negatives"] == "tfn+man"


def test_tfidf_bundle_resolves_auto_negatives_to_teacher_forced(tiny_predictor):
    assert tiny_predictor.manifest["params"]["ranker"]["negatives"] == "tfn"


def test_dense_block_is_stored_dense_and_scored_exactly(fused_bundle, tiny_corpus):
    from tests.models.reference import leaf_scores

    predictor = models.load_bundle(fused_bundle)
    ens = predictor.ensemble
    n_tfidf = predictor.encoder.n_tfidf
    assert int(ens.dense_start[0]) == n_tfidf
    assert ens.chunk_feat.max() < n_tfidf  # the sparse rows hold TF-IDF features only
    blocks = np.diff(ens.dense_ptr)
    n_children = np.diff(ens.child_ptr)
    assert np.array_equal(blocks, n_children * 8)  # every parent: children x dim, unpruned
    assert np.count_nonzero(ens.dense_val) > 0.9 * ens.dense_val.size
    _, test = tiny_corpus
    X = predictor.encode(test.texts[:15])
    ref = leaf_scores(ens, X, predictor.manifest["params"]["post_processor"])
    n = predictor.n_labels
    ids, scores, _ = predictor.predict_ids(X, top_k=n, beam_size=n)
    for d in range(X.shape[0]):
        assert np.allclose(scores[d], ref[d, ids[d]], atol=1e-6)
        assert np.allclose(scores[d], np.sort(ref[d])[::-1], atol=1e-6)


def test_fused_features_are_normalized_and_weighted(fused_bundle, tiny_corpus):
    _, test = tiny_corpus
    predictor = models.load_bundle(fused_bundle)
    X = predictor.encode(test.texts[:20])
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    assert np.allclose(norms, 1.0, atol=1e-5)
    enc = predictor.encoder
    tf = enc.tfidf.transform(test.texts[:20])
    dense = enc.dense.encode(test.texts[:20])
    expected = sp.hstack([tf, sp.csr_matrix(2.0 * dense)]).toarray()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(X.toarray(), expected, atol=1e-5)
    for i, text in enumerate(test.texts[:20]):  # the single-document path agrees
        idx, val = enc.transform_one(text)
        assert np.allclose(sp.csr_matrix((val, idx, [0, len(idx)]),
                                         shape=(1, X.shape[1])).toarray(), X[i].toarray(),
                           atol=1e-5)


def test_fused_bundle_predicts_like_its_features(fused_bundle, tiny_corpus):
    _, test = tiny_corpus
    predictor = models.load_bundle(fused_bundle)
    texts = test.texts[:30]
    by_text = predictor.predict(texts, top_k=5)
    by_features = predictor.predict_features(predictor.encode(texts), top_k=5)
    assert [[lab for lab, _ in r] for r in by_text] == [[lab for lab, _ in r] for r in
                                                         by_features]
    singles = [predictor.predict([t], top_k=5)[0] for t in texts[:5]]
    for a, b in zip(singles, by_text[:5]):
        assert [lab for lab, _ in a] == [lab for lab, _ in b]
        assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)


def test_dense_only_vocabulary_still_learns(tmp_path):
    """A corpus whose words the tiny encoder knows: the fused model still reaches P@1 = 1."""
    from models.evaluate import evaluate_predictor

    model, _ = make_tiny_encoder(tmp_path / "enc")
    train = corpus_from_docs(learnable_docs(200, seed=1))
    test = corpus_from_docs(learnable_docs(40, seed=2))
    params = tiny_params(n_trees=1, dense_encoder=str(model), dense_weight=0.5)
    predictor = models.load_bundle(build(train, tmp_path / "b", params))
    assert evaluate_predictor(predictor, test, measure_speed=False)["P@1"] == 1.0


def test_tampered_dense_model_is_refused(fused_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fused_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    model_file = copy / manifest["encoders"][1]["files"][0]
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(BundleError) as err:
        models.load_bundle(copy)
    assert model_file.name in str(err.value)


# ----------------------------------------------------------------- dense_weight = "auto"
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model, _ = make_tiny_encoder(tmp_path_factory.mktemp("enc-auto"))
    return model


def test_auto_weight_is_chosen_on_validation_and_recorded(tmp_path, tiny_corpus, tiny_model):
    train, _ = tiny_corpus
    params = tiny_params(n_trees=1, dense_encoder=str(tiny_model),
                         dense_weight_grid=[0.0, 0.5, 4.0])
    assert params.dense_weight == "auto"  # the default
    manifest = json.loads((build(train, tmp_path / "b", params) / "manifest.json").read_text())
    sel = manifest["build"]["dense_weight_selection"]
    assert [c["dense_weight"] for c in sel["candidates"]] == [0.0, 0.5, 4.0]
    assert sel["n_validation_docs"] == round(0.15 * train.n_docs)
    best = max(sel["candidates"], key=lambda c: (c["P@1"], c["P@5"], -c["dense_weight"]))
    assert sel["chosen"] == best["dense_weight"]
    if sel["chosen"] == 0:
        assert [e["kind"] for e in manifest["encoders"]] == ["tfidf"]
    else:
        assert manifest["encoders"][1]["weight"] == sel["chosen"]

    # the TF-IDF candidate's figure is reproduced by an independent build on the same split
    from benchmarks.tune import split
    from models.evaluate import evaluate_predictor

    fit, valid = split(train, 0.15, params.seed)
    alone = models.load_bundle(build(fit, tmp_path / "alone", tiny_params(n_trees=1)))
    m = evaluate_predictor(alone, valid, measure_speed=False)
    assert sel["candidates"][0]["P@1"] == pytest.approx(m["P@1"], abs=1e-6)


def test_auto_weight_zero_builds_a_tfidf_only_bundle(tmp_path, tiny_corpus, tiny_model):
    train, test = tiny_corpus
    params = tiny_params(n_trees=1, dense_encoder=str(tiny_model), dense_weight_grid=[0.0])
    out = build(train, tmp_path / "b", params)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["kind"] for e in manifest["encoders"]] == ["tfidf"]
    assert manifest["n_features"] == manifest["encoders"][0]["n_features"]
    assert not list(out.glob("*.onnx")) and not (out / "_export").exists()
    plain = build(train, tmp_path / "plain", tiny_params(n_trees=1))
    a, b = models.load_bundle(out), models.load_bundle(plain)
    assert a.predict(test.texts[:10]) == b.predict(test.texts[:10])


def test_auto_weight_single_candidate_is_used(tmp_path, tiny_corpus, tiny_model):
    train, _ = tiny_corpus
    params = tiny_params(n_trees=1, dense_encoder=str(tiny_model), dense_weight_grid=[0.5])
    manifest = json.loads((build(train, tmp_path / "b", params) / "manifest.json").read_text())
    assert manifest["encoders"][1]["weight"] == 0.5
    assert manifest["params"]["dense_weight"] == "auto"


def test_auto_weight_needs_enough_documents(tmp_path, tiny_corpus, tiny_model):
    from models.errors import InvalidInputError

    train, _ = tiny_corpus
    params = tiny_params(n_trees=1, dense_encoder=str(tiny_model))
    with pytest.raises(InvalidInputError, match="too few"):
        build(train.subset(np.arange(3)), tmp_path / "b", params)


@pytest.mark.parametrize("bad", [0, -1, "best", True])
def test_bad_dense_weight_is_refused(bad):
    from models.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="dense_weight"):
        tiny_params(dense_weight=bad).validate()


def test_cli_dense_weight_flag(tmp_path, capsys):
    from xmc.cli import main

    for bad in ("0", "best"):
        with pytest.raises(SystemExit) as exc:
            main(["build", "x.jsonl", "--out", str(tmp_path / "b"), "--dense-weight", bad])
        assert exc.value.code == 2
        assert "--dense-weight" in capsys.readouterr().err


def test_feature_input_can_declare_a_dense_block(tmp_path, tiny_corpus):
    from models.data import Corpus
    from models.features import fuse
    from models.tfidf import TfidfEncoder
    from tests.models.reference import leaf_scores

    train, test = tiny_corpus
    tfidf, X = TfidfEncoder.fit(train.texts)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(train.n_docs + 10, 6)).astype(np.float32)
    X = fuse(X, emb[: train.n_docs], 1.5)
    corpus = Corpus(labels=train.labels, features=X, dense_start=tfidf.n_features)
    predictor = models.load_bundle(build(corpus, tmp_path / "b", tiny_params(n_trees=2)))
    ens = predictor.ensemble
    assert int(ens.dense_start[0]) == tfidf.n_features
    assert np.array_equal(np.diff(ens.dense_ptr), np.diff(ens.child_ptr) * 6)
    X_test = fuse(tfidf.transform(test.texts[:10]), emb[train.n_docs :], 1.5)
    ref = leaf_scores(ens, X_test, predictor.manifest["params"]["post_processor"])
    n = predictor.n_labels
    ids, scores, _ = predictor.predict_ids(X_test, top_k=n, beam_size=n)
    for d in range(10):
        assert np.allclose(scores[d], ref[d, ids[d]], atol=1e-6)
        assert np.allclose(scores[d], np.sort(ref[d])[::-1], atol=1e-6)
