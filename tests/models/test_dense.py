"""The ONNX dense encoder's serving path, on a tiny graph built here (no torch, no download)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.bundle import sha256_file
from models.dense import OnnxTextEncoder
from models.errors import BundleError, InvalidInputError, XMCError
from tests.models.tiny_onnx import DIM, make_tiny_encoder, reference_embedding

TEXTS = [
    "How do I bake bread with a fine crumb?",
    "cast iron pan",
    "Oil prices rose as Japan exports fell",
    "",
    "the the the the the the the the the the the the the the the the the the the",
    "what is the secret to a sweet chili sauce with garlic and onion and tomato",
    "unknownword another",
    "BANK RATE",
]


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    return make_tiny_encoder(tmp_path / "src")


def test_shapes_dtype_and_normalized_rows(tiny: tuple[Path, Path]) -> None:
    enc = OnnxTextEncoder(*tiny)
    assert enc.kind == "onnx"
    assert enc.dim == DIM
    assert enc.int8 is False
    emb = enc.encode(TEXTS)
    assert emb.shape == (len(TEXTS), DIM)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_matches_numpy_oracle(tiny: tuple[Path, Path]) -> None:
    enc = OnnxTextEncoder(*tiny)
    emb = enc.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(emb[i], reference_embedding(*tiny, text), atol=1e-5)


def test_empty_list_gives_zero_rows(tiny: tuple[Path, Path]) -> None:
    enc = OnnxTextEncoder(*tiny)
    out = enc.encode([])
    assert out.shape == (0, DIM)
    assert out.dtype == np.float32


def test_single_string_is_refused(tiny: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidInputError):
        OnnxTextEncoder(*tiny).encode("a string is a sequence of characters")


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 32])
def test_results_independent_of_sub_batching(tiny: tuple[Path, Path], batch_size: int) -> None:
    whole = OnnxTextEncoder(*tiny, batch_size=64).encode(TEXTS)
    split = OnnxTextEncoder(*tiny, batch_size=batch_size).encode(TEXTS)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    # One at a time (no padding at all) agrees with padded batches too.
    enc = OnnxTextEncoder(*tiny, batch_size=batch_size)
    one_by_one = np.vstack([enc.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(one_by_one, whole, atol=1e-5)


@pytest.mark.parametrize("max_batch_tokens", [1, 7, 20, 10_000])
def test_results_independent_of_token_budget(
    tiny: tuple[Path, Path], max_batch_tokens: int
) -> None:
    whole = OnnxTextEncoder(*tiny, batch_size=64, max_batch_tokens=10**6).encode(TEXTS)
    split = OnnxTextEncoder(*tiny, max_batch_tokens=max_batch_tokens).encode(TEXTS)
    np.testing.assert_allclose(split, whole, atol=1e-5)


def test_sub_batches_respect_both_bounds(
    tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = OnnxTextEncoder(*tiny, batch_size=4, max_batch_tokens=24)
    shapes: list[tuple[int, int]] = []
    real_run = enc._session.run

    def spy(names, feed):  # type: ignore[no-untyped-def]
        shapes.append(feed["input_ids"].shape)
        return real_run(names, feed)

    monkeypatch.setattr(enc._session, "run", spy, raising=False)
    texts = ["bread " * 20, "salt " * 10, *(["oil"] * 9)]
    enc.encode(texts)
    assert sum(b for b, _ in shapes) == len(texts)
    assert all(b <= 4 and (b == 1 or b * t <= 24) for b, t in shapes)
    # Sorted by length: the two long texts are not padded together with the short ones.
    assert shapes[0] == (1, 22) and shapes[-1][1] == 3


def test_row_order_preserved_after_length_sort(tiny: tuple[Path, Path]) -> None:
    enc = OnnxTextEncoder(*tiny, batch_size=2)
    texts = TEXTS + TEXTS[::-1]
    emb = enc.encode(texts)
    np.testing.assert_allclose(emb[: len(TEXTS)], emb[len(TEXTS) :][::-1], atol=1e-6)


def test_truncation_at_max_length_overrides_tokenizer_file(tiny: tuple[Path, Path]) -> None:
    # The tiny tokenizer.json says truncate at 4 and pad to 16 (like MiniLM's 128 vs 256):
    # the encoder must use its own max_length and dynamic padding instead.
    words = ("bread flour sugar salt butter oil egg milk " * 40).split()
    long_text = " ".join(words)
    enc = OnnxTextEncoder(*tiny, max_length=8)
    head = " ".join(words[:6])  # 6 words + [CLS] + [SEP] = 8 tokens
    np.testing.assert_allclose(enc.encode([long_text]), enc.encode([head]), atol=1e-6)
    assert not np.allclose(enc.encode([head]), enc.encode([" ".join(words[:3])]), atol=1e-3)
    wide = OnnxTextEncoder(*tiny, max_length=256)
    np.testing.assert_allclose(
        wide.encode([long_text])[0], reference_embedding(*tiny, long_text), atol=1e-5
    )
    # Past max_length nothing changes; below it every word counts.
    assert not np.allclose(wide.encode([long_text]), wide.encode([head]), atol=1e-3)


def test_token_level_output_is_pooled_in_numpy(tmp_path: Path) -> None:
    pooled = make_tiny_encoder(tmp_path / "pooled")
    tokens = make_tiny_encoder(tmp_path / "tokens", pooled=False)
    a = OnnxTextEncoder(*pooled, batch_size=3).encode(TEXTS)
    b = OnnxTextEncoder(*tokens, batch_size=3).encode(TEXTS)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_token_type_ids_input_is_fed(tmp_path: Path) -> None:
    plain = OnnxTextEncoder(*make_tiny_encoder(tmp_path / "a")).encode(TEXTS)
    with_tt = OnnxTextEncoder(*make_tiny_encoder(tmp_path / "b", token_type_ids=True))
    np.testing.assert_allclose(with_tt.encode(TEXTS), plain, atol=1e-6)


def test_bad_arguments_rejected(tiny: tuple[Path, Path]) -> None:
    bad = ({"max_length": 1}, {"batch_size": 0}, {"intra_op_threads": 0}, {"max_batch_tokens": 0})
    for kwargs in bad:
        with pytest.raises(InvalidInputError):
            OnnxTextEncoder(*tiny, **kwargs)


def test_save_load_roundtrip(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    enc = OnnxTextEncoder(*tiny, max_length=64, batch_size=4)
    bundle = tmp_path / "bundle"
    entry = enc.save(bundle)
    assert entry["kind"] == "onnx"
    assert entry["files"] == ["dense.onnx", "dense.tokenizer.json"]
    assert entry["dim"] == DIM
    assert entry["max_length"] == 64
    assert entry["int8"] is False
    for name in entry["files"]:
        assert entry["sha256"][name] == sha256_file(bundle / name)
    entry = json.loads(json.dumps(entry))  # what the manifest stores survives JSON
    loaded = OnnxTextEncoder.load(bundle, entry, intra_op_threads=2)
    assert loaded.dim == DIM and loaded.max_length == 64 and loaded.intra_op_threads == 2
    np.testing.assert_allclose(loaded.encode(TEXTS), enc.encode(TEXTS), atol=1e-6)
    # Saving an encoder loaded from the bundle onto itself keeps the files intact.
    assert loaded.save(bundle) == entry


def test_save_with_prefix(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    entry = OnnxTextEncoder(*tiny).save(tmp_path / "b", prefix="title")
    assert entry["files"] == ["title.onnx", "title.tokenizer.json"]
    OnnxTextEncoder.load(tmp_path / "b", entry)


@pytest.mark.parametrize("which", [0, 1])
def test_hash_mismatch_raises_bundle_error(
    tiny: tuple[Path, Path], tmp_path: Path, which: int
) -> None:
    bundle = tmp_path / "bundle"
    entry = OnnxTextEncoder(*tiny).save(bundle)
    target = bundle / entry["files"][which]
    with open(target, "ab") as fh:
        fh.write(b" ")
    with pytest.raises(BundleError, match="sha256") as info:
        OnnxTextEncoder.load(bundle, entry)
    assert info.value.path == str(target)
    assert isinstance(info.value, XMCError)


@pytest.mark.parametrize("which", [0, 1])
def test_missing_file_raises_bundle_error(
    tiny: tuple[Path, Path], tmp_path: Path, which: int
) -> None:
    bundle = tmp_path / "bundle"
    entry = OnnxTextEncoder(*tiny).save(bundle)
    target = bundle / entry["files"][which]
    target.unlink()
    with pytest.raises(BundleError, match="missing") as info:
        OnnxTextEncoder.load(bundle, entry)
    assert info.value.path == str(target)


def test_bad_entries_raise_bundle_error(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    entry = OnnxTextEncoder(*tiny).save(bundle)
    with pytest.raises(BundleError):
        OnnxTextEncoder.load(bundle, {**entry, "kind": "torch"})
    with pytest.raises(BundleError, match="sha256"):
        OnnxTextEncoder.load(bundle, {**entry, "sha256": {}})
    with pytest.raises(BundleError, match="dim"):
        OnnxTextEncoder.load(bundle, {**entry, "dim": DIM + 1})


def test_corrupt_model_with_matching_hash_raises_bundle_error(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    entry = OnnxTextEncoder(*tiny).save(bundle)
    model = bundle / entry["model"]
    model.write_bytes(b"not an onnx model")
    entry["sha256"][entry["model"]] = sha256_file(model)
    with pytest.raises(BundleError, match="cannot open") as info:
        OnnxTextEncoder.load(bundle, entry)
    assert info.value.path == str(model)


def test_wrong_graph_inputs_raise_bundle_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "wrong.onnx"
    onnx.save(model, str(path))
    _, tok = make_tiny_encoder(tmp_path)
    with pytest.raises(BundleError, match="input_ids"):
        OnnxTextEncoder(path, tok)


def test_serving_module_imports_no_torch() -> None:
    code = (
        "import sys, models.dense; "
        "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
