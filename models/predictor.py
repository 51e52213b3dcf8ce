"""The predictor: a loaded bundle that turns texts (or feature rows) into ranked labels."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from models import bundle as bundle_io
from models.errors import BundleError, InvalidInputError
from models.features import FeatureEncoder, require_text
from models.params import POST_PROCESSORS
from models.search import Searcher
from models.tree import Ensemble
from models.vocab import LabelInfo, read_label_meta

#: per-process memory for direct feature maps of the widest chunks (see build_dense_maps)
DENSE_MAP_MB = 128


class Predictor:
    """Ranks a bundle's labels for documents; thread-safe.

    Scores lie in (0, 1]: a label's score is the mean over the ensemble's trees of the
    product of its node scores along its root-to-label path (see ``post_processor``).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], ensemble: Ensemble,
                 label_names: list[str], encoder: FeatureEncoder | None,
                 label_counts: np.ndarray, *, threads: int | None = None,
                 dense_map_mb: int = DENSE_MAP_MB,
                 label_info: Mapping[str, LabelInfo] | None = None) -> None:
        self.path = path
        #: uri, label and notation by label name (empty: the bundle has no vocabulary)
        self.label_info: Mapping[str, LabelInfo] = label_info or {}
        self.manifest = manifest
        self.ensemble = ensemble
        self.label_names = label_names
        self.encoder = encoder
        self.label_counts = label_counts
        params = manifest.get("params", {})
        self.post = POST_PROCESSORS[params.get("post_processor", "l3-hinge")]
        self.default_top_k = int(params.get("top_k", 5))
        self.default_beam_size = int(params.get("beam_size", 10))
        self.threads = threads or min(2, os.cpu_count() or 1)
        self._searcher = Searcher(ensemble, self.n_features, self.post, threads=self.threads,
                                  dense_map_mb=dense_map_mb)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = True, threads: int | None = None,
             dense_threads: int = 1) -> Predictor:
        folder = Path(path)
        manifest = bundle_io.read_manifest(folder)
        ensemble = bundle_io.load_ensemble(folder, manifest, mmap=mmap)
        label_names = bundle_io.read_label_names(folder, ensemble.n_labels)
        counts = bundle_io.load_npy(folder / "label_counts.npy", mmap=mmap, dtype=np.int64)
        encoder = FeatureEncoder.load(folder, manifest["encoders"], mmap=mmap,
                                      dense_threads=dense_threads)
        if encoder is not None and encoder.n_features != int(manifest["n_features"]):
            raise BundleError(
                f"encoders give {encoder.n_features} features, manifest says "
                f"{manifest['n_features']}", folder / "manifest.json")
        return cls(folder, manifest, ensemble, label_names, encoder, counts,
                   threads=threads, label_info=read_label_meta(folder, label_names))

    # ----------------------------------------------------------------- facts
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at", ""))

    @property
    def n_labels(self) -> int:
        return int(self.manifest["n_labels"])

    @property
    def n_features(self) -> int:
        return int(self.manifest["n_features"])

    @property
    def has_text_encoder(self) -> bool:
        return self.encoder is not None

    # ----------------------------------------------------------------- predicting
    def encode(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Feature rows of texts, exactly as the builder computed them."""
        return require_text(self.encoder).transform(texts)

    def predict(self, texts: Sequence[str], *, top_k: int | None = None,
                beam_size: int | None = None) -> list[list[tuple[str, float]]]:
        """Top ``top_k`` (label, score) per text, best first; one vectorized batch."""
        if isinstance(texts, str):
            raise InvalidInputError("predict takes a sequence of texts, not one string")
        encoder = require_text(self.encoder)
        top_k, beam_size = self._check_args(top_k, beam_size)
        if len(texts) == 1:
            idx, val = encoder.transform_one(texts[0])
            indptr = np.array([0, idx.shape[0]], dtype=np.int64)
            labels, scores, counts = self._searcher.search(indptr, idx, val, top_k, beam_size)
        else:
            X = encoder.transform(texts)
            labels, scores, counts = self.predict_ids(X, top_k=top_k, beam_size=beam_size)
        return self._named(labels, scores, counts)

    def predict_features(self, X: sp.spmatrix | np.ndarray, *, top_k: int | None = None,
                         beam_size: int | None = None) -> list[list[tuple[str, float]]]:
        """Like :meth:`predict`, from feature rows (n_docs, n_features), e.g. XC data."""
        labels, scores, counts = self.predict_ids(X, top_k=top_k, beam_size=beam_size)
        return self._named(labels, scores, counts)

    def predict_ids(self, X: sp.spmatrix | np.ndarray, *, top_k: int | None = None,
                    beam_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw result: label ids (n, top_k; -1 pads), scores (n, top_k), counts (n,)."""
        top_k, beam_size = self._check_args(top_k, beam_size)
        X = self._as_features(X)
        return self._searcher.search(X.indptr, X.indices, X.data, top_k, beam_size)

    def warm_up(self) -> None:
        """Compile the kernels and run one prediction, so the first request is not slow."""
        X = sp.csr_matrix((1, self.n_features), dtype=np.float32)
        self.predict_ids(X, top_k=1, beam_size=1)
        if self.encoder is not None:
            self.predict(["warm up"], top_k=1, beam_size=1)
            self.predict(["warm up", "two documents"], top_k=1, beam_size=1)

    def close(self) -> None:
        self._searcher.close()

    # ----------------------------------------------------------------- internals
    def _check_args(self, top_k: int | None, beam_size: int | None) -> tuple[int, int]:
        top_k = self.default_top_k if top_k is None else top_k
        beam_size = self.default_beam_size if beam_size is None else beam_size
        for name, value in (("top_k", top_k), ("beam_size", beam_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
        return min(int(top_k), self.n_labels), int(beam_size)

    def _as_features(self, X: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        if not sp.issparse(X):
            X = np.asarray(X)
            if X.ndim != 2:
                raise InvalidInputError("feature input must be a 2-d matrix")
        X = sp.csr_matrix(X)
        if X.shape[1] != self.n_features:
            raise InvalidInputError(
                f"feature rows have {X.shape[1]} columns, the bundle has {self.n_features}")
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        if not X.has_sorted_indices:
            X = X.sorted_indices()
        return X

    def _named(self, labels, scores, counts) -> list[list[tuple[str, float]]]:
        names = self.label_names
        return [
            [(names[j], float(s)) for j, s in zip(row[:c].tolist(), srow[:c].tolist())]
            for row, srow, c in zip(labels, scores, counts.tolist())
        ]
