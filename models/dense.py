"""Dense sentence encoders of the serving side (no torch, no transformers): an ONNX model run
with onnxruntime (:class:`OnnxTextEncoder`), or static token embeddings distilled from one
(:class:`StaticTextEncoder`, at the end of this module).

The model contract, so that any ONNX sentence encoder with a ``tokenizer.json`` beside it can
be plugged in by path (``models/export.py`` writes MiniLM in exactly this shape):

* inputs, all int64 of shape ``(batch, sequence)`` with both axes dynamic: ``input_ids`` and
  ``attention_mask`` (1 for a real token, 0 for padding), and optionally ``token_type_ids``
  (fed as zeros: every document is a single segment). No other inputs.
* output: the first graph output is either the pooled sentence embedding ``(batch, dim)``
  (preferably already L2-normalized), or the token embeddings ``(batch, sequence, dim)``, in
  which case they are mean-pooled over the attention mask here. Rows are always L2-normalized
  here as well (idempotent for a graph that already does it), so callers can use dot products
  as cosine similarities.
* the tokenizer is a HuggingFace ``tokenizers`` JSON file that adds the model's special tokens
  itself (a post-processor such as BERT's ``[CLS] … [SEP]`` template). Whatever truncation and
  padding the file declares is replaced: truncation at ``max_length`` tokens (special tokens
  included) and padding to the longest document of each sub-batch.
* the graph may set the metadata property ``xmc_int8`` to ``"true"`` when its weights are
  int8-quantized (``models.export.quantize_int8`` does); it is reported in the manifest entry.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.bundle import load_npy, sha256_file, verify_files
from models.errors import BundleError, InvalidInputError

INT8_METADATA_KEY = "xmc_int8"
_REQUIRED_INPUTS = ("input_ids", "attention_mask")
_OPTIONAL_INPUTS = ("token_type_ids",)


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` scaled to norm 1, in its dtype; a zero row (an empty text, a label
    without documents) stays zero instead of NaN."""
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


class OnnxTextEncoder:
    """Encodes texts into L2-normalized float32 embeddings with an ONNX sentence encoder.

    One session run takes at most ``batch_size`` documents and at most ``max_batch_tokens``
    padded tokens: activation memory grows with batch × padded length (attention alone is
    batch × 12 heads × length² floats), and 64 × 256 tokens took 1.2 GB RSS in a study. Requests
    are sorted by token count first, so each sub-batch pads little; titles still go 32 at a
    time while 256-token articles go 16 at a time (peak RSS of MiniLM fp32: ~400 MB instead of
    ~650 MB at 32 × 256; see benchmarks/RESULTS.md).
    """

    kind = "onnx"

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        max_length: int = 256,
        intra_op_threads: int = 1,
        batch_size: int = 32,
        max_batch_tokens: int = 4096,
        memory_arena: bool = True,
        allow_spinning: bool = False,
    ) -> None:
        if max_length < 2:
            raise InvalidInputError(f"max_length must be at least 2, got {max_length}")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        if max_batch_tokens < 1:
            raise InvalidInputError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
        if intra_op_threads < 1:
            raise InvalidInputError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
        self.model_path = Path(model_path)
        self.tokenizer_path = Path(tokenizer_path)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.intra_op_threads = int(intra_op_threads)

        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        padding = self._tokenizer.padding
        # The pad id only fills masked positions, so any id is correct; use the file's own.
        self._pad_id = int(padding["pad_id"]) if padding else 0
        # The file's own settings are not trusted: MiniLM's shipped tokenizer.json truncates at
        # 128 while the model was trained at 256, and pads every text to a fixed 128.
        self._tokenizer.enable_truncation(max_length=self.max_length)
        self._tokenizer.no_padding()

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        # One request is one run; parallel runs come from several server workers instead.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle intra-op threads busy-wait by default, on cores that other server workers may
        # need; an interleaved A/B on MiniLM titles (2 threads) showed no latency cost to
        # turning it off (p50 6.8 vs 6.1 ms fp32, 2.4 vs 2.1 ms int8, within noise).
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
        )
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Shapes change with every sub-batch, so memory patterns are never reused: measured
        # +300 MB peak with them on. The arena stays on by default: it holds its peak for the
        # life of the process, but without it glibc's heap peaked higher still (1.0 GB against
        # 650 MB for 64 articles of 256 tokens in sub-batches of 32) and kept most of it.
        options.enable_mem_pattern = False
        options.enable_cpu_mem_arena = memory_arena
        self._session = ort.InferenceSession(
            str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )

        names = [i.name for i in self._session.get_inputs()]
        missing = [n for n in _REQUIRED_INPUTS if n not in names]
        unknown = [n for n in names if n not in _REQUIRED_INPUTS + _OPTIONAL_INPUTS]
        if missing or unknown:
            raise BundleError(
                f"ONNX encoder inputs must be input_ids, attention_mask[, token_type_ids]; "
                f"missing {missing}, unexpected {unknown}",
                path=self.model_path,
            )
        self._input_names = names
        output = self._session.get_outputs()[0]
        self._output_name = output.name
        if len(output.shape) not in (2, 3):
            raise BundleError(
                f"ONNX encoder output {output.name!r} must be (batch, dim) or "
                f"(batch, sequence, dim), got shape {output.shape}",
                path=self.model_path,
            )
        self._token_level = len(output.shape) == 3
        meta = self._session.get_modelmeta().custom_metadata_map
        self.int8 = meta.get(INT8_METADATA_KEY, "false").lower() == "true"
        last = output.shape[-1]
        # A dynamic last axis is only known after one run.
        self.dim = int(last) if isinstance(last, int) else int(self.encode(["dim"]).shape[1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``: float32 ``(len(texts), dim)``, rows L2-normalized."""
        if isinstance(texts, str):
            raise InvalidInputError("encode() takes a sequence of texts, not a single string")
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=n)
        # Longest first, stable, so sub-batches hold similar lengths and pad little.
        order = np.argsort(-lengths, kind="stable")
        out: np.ndarray | None = None
        start = 0
        while start < n:
            longest = max(int(lengths[order[start]]), 1)  # the first of a sub-batch is longest
            size = min(self.batch_size, max(1, self.max_batch_tokens // longest))
            rows = order[start : start + size]
            emb = self._run([encodings[i].ids for i in rows], longest)
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[rows] = emb
            start += size
        assert out is not None
        return out

    def _run(self, ids: list[list[int]], width: int) -> np.ndarray:
        """One session run over one sub-batch, padded to ``width`` (its longest member, >= 1:
        a tokenizer without special tokens can give 0 tokens)."""
        input_ids = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        emb = np.asarray(self._session.run([self._output_name], feed)[0], dtype=np.float32)
        if self._token_level:
            weights = mask[:, :, None].astype(np.float32)
            emb = (emb * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return unit_rows(emb).astype(np.float32, copy=False)

    def save(self, folder: Path, prefix: str = "dense") -> dict:
        """Copy the model and tokenizer into the bundle ``folder``; return the manifest entry.

        Files are ``{prefix}.onnx`` and ``{prefix}.tokenizer.json``, listed in that order in
        ``files`` (``load`` relies on the order; ``model``/``tokenizer`` name them too).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model_name, tok_name = f"{prefix}.onnx", f"{prefix}.tokenizer.json"
        for src, name in ((self.model_path, model_name), (self.tokenizer_path, tok_name)):
            dst = folder / name
            if not (dst.exists() and dst.samefile(src)):
                shutil.copyfile(src, dst)
        return {
            "kind": self.kind,
            "files": [model_name, tok_name],
            "model": model_name,
            "tokenizer": tok_name,
            "sha256": {name: sha256_file(folder / name) for name in (model_name, tok_name)},
            "dim": self.dim,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "int8": self.int8,
        }

    @classmethod
    def load(cls, folder: Path, entry: dict, *, intra_op_threads: int = 1) -> OnnxTextEncoder:
        """Open the encoder described by a manifest ``entry`` (from :meth:`save`) in ``folder``.

        Raises :class:`BundleError` naming the file when one is missing, does not match its
        recorded sha256, or is not a usable encoder.
        """
        folder = Path(folder)
        if entry.get("kind") != cls.kind:
            raise BundleError(f"dense encoder kind is {entry.get('kind')!r}, expected 'onnx'")
        files = list(entry.get("files") or [])
        model_name = entry.get("model") or (files[0] if files else None)
        tok_name = entry.get("tokenizer") or (files[1] if len(files) > 1 else None)
        if not model_name or not tok_name:
            raise BundleError("dense encoder entry names no model and tokenizer files")
        verify_files(folder, [*files, model_name, tok_name], entry, "dense encoder")
        try:
            encoder = cls(
                folder / model_name,
                folder / tok_name,
                max_length=int(entry.get("max_length", 256)),
                intra_op_threads=intra_op_threads,
                batch_size=int(entry.get("batch_size", 32)),
                max_batch_tokens=int(entry.get("max_batch_tokens", 4096)),
            )
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime / tokenizers raise their own types
            raise BundleError(
                f"cannot open dense encoder: {exc}", path=folder / model_name
            ) from exc
        if "dim" in entry and int(entry["dim"]) != encoder.dim:
            raise BundleError(
                f"dense encoder dim is {encoder.dim}, manifest says {entry['dim']}",
                path=folder / model_name,
            )
        return encoder


class TextEncoder(Protocol):
    """What a bundle's dense encoder offers (:class:`OnnxTextEncoder`,
    :class:`StaticTextEncoder`)."""

    kind: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def save(self, folder: Path, prefix: str = "dense") -> dict: ...


class StaticTextEncoder:
    """Static token embeddings: a document's embedding is the mean of its tokens' rows,
    L2-normalized; no neural network runs at serving time, only the tokenizer and a lookup.

    The rows come from a model2vec distillation of a sentence encoder
    (:func:`models.export.distill_minilm_static`): each vocabulary token's embedding through
    the full model, reduced by PCA and weighted down by its frequency. Tokens are taken
    without the special tokens and without the unknown token, up to ``max_length`` of them,
    as model2vec's own ``encode`` does (the build checks the two agree).
    """

    kind = "static"

    def __init__(self, embeddings: np.ndarray, tokenizer_path: Path, *,
                 max_length: int = 512) -> None:
        if embeddings.ndim != 2 or embeddings.dtype not in (np.float16, np.float32):
            raise InvalidInputError(
                f"static embeddings must be a float16/float32 matrix, got {embeddings.dtype} "
                f"{embeddings.shape}")
        if max_length < 1:
            raise InvalidInputError(f"max_length must be at least 1, got {max_length}")
        self.embeddings = embeddings
        self.tokenizer_path = Path(tokenizer_path)
        self.max_length = int(max_length)
        self.dim = int(embeddings.shape[1])
        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        n_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if n_vocab > embeddings.shape[0]:
            # a token id past the last row would index out of the matrix
            raise InvalidInputError(
                f"the tokenizer has {n_vocab} tokens but there are only "
                f"{embeddings.shape[0]} embedding rows")
        unk = getattr(self._tokenizer.model, "unk_token", None)
        unk_id = self._tokenizer.token_to_id(unk) if unk else None
        self._unk_id = -1 if unk_id is None else int(unk_id)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``: float32 ``(len(texts), dim)``, rows L2-normalized (a text
        without known tokens: a zero row)."""
        if isinstance(texts, str):
            raise InvalidInputError("encode() takes a sequence of texts, not a single string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for i, enc in enumerate(encodings):
            ids = np.asarray(enc.ids[: self.max_length + 1], dtype=np.int64)
            ids = ids[ids != self._unk_id][: self.max_length]
            if ids.size:
                out[i] = self.embeddings[ids].astype(np.float32).mean(axis=0)
        return unit_rows(out)

    def save(self, folder: Path, prefix: str = "dense") -> dict:
        """Write ``{prefix}.static.npy`` and ``{prefix}.tokenizer.json`` into the bundle
        ``folder``; return the manifest entry."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        emb_name, tok_name = f"{prefix}.static.npy", f"{prefix}.tokenizer.json"
        np.save(folder / emb_name, np.asarray(self.embeddings), allow_pickle=False)
        dst = folder / tok_name
        if not (dst.exists() and dst.samefile(self.tokenizer_path)):
            shutil.copyfile(self.tokenizer_path, dst)
        return {
            "kind": self.kind,
            "files": [emb_name, tok_name],
            "embeddings": emb_name,
            "tokenizer": tok_name,
            "sha256": {name: sha256_file(folder / name) for name in (emb_name, tok_name)},
            "dim": self.dim,
            "max_length": self.max_length,
        }

    @classmethod
    def load(cls, folder: Path, entry: dict, *, mmap: bool = True) -> StaticTextEncoder:
        """Open the encoder of a manifest ``entry`` (from :meth:`save`): a BundleError naming
        the file when one is missing, does not match its sha256 or does not fit the other."""
        folder = Path(folder)
        emb_name, tok_name = entry.get("embeddings"), entry.get("tokenizer")
        if not (isinstance(emb_name, str) and isinstance(tok_name, str)):
            raise BundleError("static encoder entry names no embeddings and tokenizer files")
        verify_files(folder, [emb_name, tok_name], entry, "static encoder")
        emb_path = folder / emb_name
        embeddings = load_npy(emb_path, mmap=mmap, dtype=(np.float16, np.float32))
        try:
            encoder = cls(embeddings, folder / tok_name,
                          max_length=int(entry.get("max_length", 512)))
        except InvalidInputError as exc:
            raise BundleError(str(exc), path=emb_path) from None
        except Exception as exc:  # tokenizers raises its own types
            raise BundleError(f"cannot open static encoder: {exc}",
                              path=folder / tok_name) from exc
        if int(entry.get("dim", encoder.dim)) != encoder.dim:
            raise BundleError(f"static encoder dim is {encoder.dim}, manifest says "
                              f"{entry['dim']}", path=emb_path)
        return encoder
