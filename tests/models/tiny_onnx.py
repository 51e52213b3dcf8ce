"""A tiny ONNX sentence encoder and its tokenizer, built in milliseconds without torch.

It follows the contract of ``models/dense.py`` exactly like the exported MiniLM does
(int64 ``input_ids``/``attention_mask``[/``token_type_ids``] in, L2-normalized pooled
embedding out), so the runtime path, bundles and fusion can be tested in CI with no model
download. The graph is: embedding lookup -> per-token dense + tanh -> masked mean pooling ->
L2 normalization. Use it from other tests as::

    from tests.models.tiny_onnx import make_tiny_encoder
    model_path, tokenizer_path = make_tiny_encoder(tmp_path)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
# Cooking and finance words, so tests on both shared data sets get few [UNK]s.
_WORD_TEXT = """
the a an of to in and or for with on how what why is are do does can i my it this that
cook cooking bake baking bread dough flour sugar salt butter oil egg eggs milk cheese oven
pan pot cast iron grill steak chicken beef pork fish rice pasta sauce soup knife temperature
heat boil fry roast sweet spicy chili pepper garlic onion tomato water market trade bank rate
rates price prices stock shares profit loss dollar yen japan tariff exports imports growth
company year quarter billion million percent
"""
WORDS = _WORD_TEXT.split()
DIM = 8


def make_tiny_encoder(
    folder: Path,
    *,
    dim: int = DIM,
    pooled: bool = True,
    token_type_ids: bool = False,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``tiny.onnx`` and ``tiny.tokenizer.json`` into ``folder``; return their paths.

    ``pooled=False`` makes the graph output token embeddings ``(batch, seq, dim)`` instead,
    to test pooling on the numpy side; ``token_type_ids=True`` adds that (unused) input, as
    BERT-style graphs have it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}

    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    # Deliberately "wrong" settings, like MiniLM's shipped file: the encoder must override them.
    tokenizer.enable_truncation(max_length=4)
    tokenizer.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]", length=16)
    tokenizer_path = folder / "tiny.tokenizer.json"
    tokenizer.save(str(tokenizer_path))

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((len(vocab), dim)).astype(np.float32)
    proj = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    init = [
        numpy_helper.from_array(emb, "embeddings"),
        numpy_helper.from_array(proj, "proj"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"),
        numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["tok_raw"], axis=0),
        helper.make_node("MatMul", ["tok_raw", "proj"], ["tok_lin"]),
        helper.make_node("Tanh", ["tok_lin"], ["token_embeddings"]),
    ]
    if pooled:
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "axis_last"], ["mask3"]),
            helper.make_node("Mul", ["token_embeddings", "mask3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
            helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
            helper.make_node("Max", ["count", "eps"], ["count_safe"]),
            helper.make_node("Div", ["summed", "count_safe"], ["mean"]),
            helper.make_node("ReduceL2", ["mean", "axis_last"], ["norm"], keepdims=1),
            helper.make_node("Max", ["norm", "eps"], ["norm_safe"]),
            helper.make_node("Div", ["mean", "norm_safe"], ["sentence_embedding"]),
        ]
        output = helper.make_tensor_value_info(
            "sentence_embedding", TensorProto.FLOAT, ["batch", dim]
        )
    else:
        output = helper.make_tensor_value_info(
            "token_embeddings", TensorProto.FLOAT, ["batch", "sequence", dim]
        )
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    if token_type_ids:
        inputs.append(
            helper.make_tensor_value_info(
                "token_type_ids", TensorProto.INT64, ["batch", "sequence"]
            )
        )
    graph = helper.make_graph(nodes, "tiny_sentence_encoder", inputs, [output], init)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="xmc-serve-tests"
    )
    model.ir_version = 9  # readable by every onnxruntime the project allows (>= 1.18)
    onnx.checker.check_model(model)
    model_path = folder / "tiny.onnx"
    onnx.save(model, str(model_path))
    return model_path, tokenizer_path


def reference_embedding(
    model_path: Path, tokenizer_path: Path, text: str, *, max_length: int = 256
) -> np.ndarray:
    """The tiny model's embedding of one text computed in plain numpy, as an oracle."""
    model = onnx.load(str(model_path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    ids = tokenizer.encode(text).ids
    tokens = np.tanh(weights["embeddings"][ids] @ weights["proj"])
    mean = tokens.mean(axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)
