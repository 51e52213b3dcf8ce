"""Text -> feature vector: the bundle's encoders in order, fused and row-normalized.

With TF-IDF only, a document's features are its TF-IDF vector. With a dense encoder too
(ONNX or static, models.dense), they are ``[tfidf ; alpha * dense]`` l2-normalized, so PIFA,
clustering and rankers run on one fused sparse row whose last ``dim`` columns are the dense
block.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from models.data import normalize_rows
from models.errors import BundleError, NoTextEncoderError

if TYPE_CHECKING:
    from models.dense import TextEncoder
    from models.tfidf import TfidfEncoder


class FeatureEncoder:
    """The text encoders of a bundle (``tfidf`` and optionally ``dense`` with its weight)."""

    def __init__(self, tfidf: TfidfEncoder | None, dense: TextEncoder | None = None,
                 dense_weight: float = 1.0) -> None:
        self.tfidf = tfidf
        self.dense = dense
        self.dense_weight = float(dense_weight)
        self.n_tfidf = tfidf.n_features if tfidf is not None else 0
        self.n_features = self.n_tfidf + (dense.dim if dense is not None else 0)
        if dense is not None:
            self._dense_cols = np.arange(self.n_tfidf, self.n_features, dtype=np.int32)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Feature rows (float32 CSR, sorted indices, l2-normalized) for many texts."""
        if self.dense is None:
            assert self.tfidf is not None  # a bundle has at least one encoder
            return self.tfidf.transform(texts)
        tfidf = self.tfidf.transform(texts) if self.tfidf is not None else None
        return fuse(tfidf, self.dense.encode(texts), self.dense_weight)

    def transform_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(sorted indices int32, values float32) of one text: the fastest path."""
        if self.dense is None:
            assert self.tfidf is not None
            return self.tfidf.transform_one(text)
        emb = self.dense.encode([text])[0].astype(np.float32) * self.dense_weight
        if self.tfidf is None:
            idx, val = self._dense_cols, emb
        else:
            t_idx, t_val = self.tfidf.transform_one(text)
            idx = np.concatenate((t_idx, self._dense_cols))
            val = np.concatenate((t_val, emb))
        norm = float(np.sqrt(np.dot(val, val)))
        return idx, (val / norm if norm > 0 else val)

    def save(self, folder: Path) -> list[dict]:
        entries = []
        if self.tfidf is not None:
            entries.append(self.tfidf.save(folder))
        if self.dense is not None:
            entry = self.dense.save(folder)
            entry["weight"] = self.dense_weight
            entries.append(entry)
        return entries

    @classmethod
    def load(cls, folder: Path, entries: list[dict], *, mmap: bool = True,
             dense_threads: int = 1) -> FeatureEncoder | None:
        """Rebuild from the manifest's ``encoders`` list; None when it is empty."""
        tfidf: TfidfEncoder | None = None
        dense: TextEncoder | None = None
        weight = 1.0
        for entry in entries:
            kind = entry.get("kind")
            if kind == "tfidf":
                from models.tfidf import TfidfEncoder

                tfidf = TfidfEncoder.load(folder, entry, mmap=mmap)
            elif kind == "onnx":
                from models.dense import OnnxTextEncoder

                dense = OnnxTextEncoder.load(folder, entry, intra_op_threads=dense_threads)
                weight = float(entry.get("weight", 1.0))
            elif kind == "static":
                from models.dense import StaticTextEncoder

                dense = StaticTextEncoder.load(folder, entry, mmap=mmap)
                weight = float(entry.get("weight", 1.0))
            else:
                raise BundleError(f"unknown encoder kind {kind!r}", folder / "manifest.json")
        if tfidf is None and dense is None:
            return None
        return cls(tfidf, dense, weight)


def fuse(tfidf: sp.csr_matrix | None, dense: np.ndarray, dense_weight: float) -> sp.csr_matrix:
    """``[tfidf ; dense_weight * dense]`` rows l2-normalized (float32 CSR, sorted indices)."""
    dense_block = sp.csr_matrix(np.asarray(dense, dtype=np.float32) * np.float32(dense_weight))
    X = dense_block if tfidf is None else sp.hstack([tfidf, dense_block], format="csr")
    X = normalize_rows(X)
    X.sort_indices()
    return X


def require_text(encoder: FeatureEncoder | None) -> FeatureEncoder:
    if encoder is None:
        raise NoTextEncoderError(
            "this bundle was built from feature vectors (encoder 'none'): it cannot read "
            "text; pass feature rows to predict_features instead"
        )
    return encoder
