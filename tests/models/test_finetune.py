"""Fine-tuning the packaged MiniLM on a corpus' labels (models.finetune), alone and in a build."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.data import Corpus, validation_rows
from models.dense import OnnxTextEncoder
from models.errors import InvalidInputError
from models.params import BuildParams
from tests.models.test_export import require_export_stack

# Questions whose label is the cooking method, while the food in them varies: a generic
# encoder groups them by food as much as by method, the labels want the method.
METHODS = {
    "frying": ["How hot should the oil be to fry {}?", "Why does my fried {} turn out soggy?",
               "Can I deep fry {} without a thermometer?"],
    "baking": ["How long do I bake {} in the oven?", "Why is my baked {} dry inside?",
               "What oven temperature is best to bake {}?"],
    "boiling": ["How long should I boil {} for?", "Do I salt the water before boiling {}?",
                "Why does boiled {} go mushy?"],
    "grilling": ["How do I keep {} from sticking to the grill?",
                 "Should I grill {} over direct heat?", "How long to grill {} on charcoal?"],
}
FOODS = ["potatoes", "chicken", "fish", "eggplant", "tofu", "carrots", "salmon", "dumplings"]


def method_corpus() -> tuple[list[str], list[list[str]]]:
    texts, labels = [], []
    for (method, templates), food in itertools.product(METHODS.items(), FOODS):
        for template in templates[:2]:
            texts.append(template.format(food))
            labels.append([method])
    return texts, labels


def label_margin(emb: np.ndarray, labels: list[list[str]]) -> float:
    """Mean cosine of documents sharing their label minus that of documents that do not."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    names = np.array([labs[0] for labs in labels])
    same = names[:, None] == names[None, :]
    off_diagonal = ~np.eye(len(names), dtype=bool)
    return float(sims[same & off_diagonal].mean() - sims[~same].mean())


@pytest.mark.slow
def test_fine_tuning_pulls_documents_of_a_label_together(tmp_path: Path) -> None:
    require_export_stack()
    from models.export import export_minilm
    from models.finetune import fine_tune_minilm

    texts, labels = method_corpus()
    base = export_minilm(tmp_path / "base")
    tuned = fine_tune_minilm(texts, labels, tmp_path / "tuned", epochs=8, seed=0)
    summary = tuned["fine_tune"]
    assert summary["n_docs"] == len(texts) and summary["n_labels"] == len(METHODS)
    assert summary["steps"] == 8 * -(-len(texts) // 32)
    assert summary["loss_last"] < summary["loss_first"]
    # exported as the packaged model is: same checks, same graph contract
    assert tuned["parity_min_cosine"] >= 0.999 and tuned["dim"] == 384

    def margin(result: dict) -> float:
        encoder = OnnxTextEncoder(result["model_path"], result["tokenizer_path"])
        return label_margin(encoder.encode(texts), labels)

    before, after = margin(base), margin(tuned)
    assert after > before + 0.05, (before, after)


def test_finetune_module_imports_without_torch() -> None:
    # the builder's params name it; the serving image has no torch
    code = "import sys, models.finetune; sys.exit(1 if 'torch' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_fine_tuning_is_refused_without_the_packaged_minilm() -> None:
    for params in (BuildParams(fine_tune_epochs=1.0),
                   BuildParams(fine_tune_epochs=1.0, dense_encoder="minilm-static"),
                   BuildParams(fine_tune_epochs=-1.0, dense_encoder="minilm")):
        with pytest.raises(InvalidInputError, match="fine_tune_epochs"):
            params.validate()
    BuildParams(fine_tune_epochs=1.0, dense_encoder="minilm").validate()


@pytest.mark.slow
def test_a_build_fine_tunes_on_the_documents_outside_the_validation_split(
        tmp_path: Path) -> None:
    """The held-out documents' labels must not reach the encoder: changing them changes
    nothing it embeds."""
    require_export_stack()
    from models.builder import build

    texts, labels = method_corpus()
    params = BuildParams(dense_encoder="minilm", dense_weight=1.0, fine_tune_epochs=2.0,
                         n_trees=1, seed=3)
    _, valid_rows = validation_rows(len(texts), params.validation_share, params.seed)
    assert len(valid_rows) > 0
    relabelled = [list(labs) for labs in labels]
    for i in valid_rows:  # another method's label on every held-out question
        names = sorted(METHODS)
        relabelled[i] = [names[(names.index(labels[i][0]) + 1) % len(names)]]

    embeddings = []
    for name, corpus_labels in (("a", labels), ("b", relabelled)):
        bundle = build(Corpus(texts=texts, labels=corpus_labels), tmp_path / name, params)
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["params"]["fine_tune_epochs"] == 2.0
        assert manifest["build"]["stages"]["fine_tune"]["seconds"] > 0
        encoder = OnnxTextEncoder(bundle / "dense.onnx", bundle / "dense.tokenizer.json")
        embeddings.append(encoder.encode(texts))
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-6)
    packaged = build(Corpus(texts=texts, labels=labels), tmp_path / "packaged",
                     BuildParams(dense_encoder="minilm", dense_weight=1.0, n_trees=1, seed=3))
    untuned = OnnxTextEncoder(packaged / "dense.onnx", packaged / "dense.tokenizer.json")
    assert np.abs(untuned.encode(texts) - embeddings[0]).max() > 1e-3
