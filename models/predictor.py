"""The predictor: a loaded bundle that turns texts (or feature rows) into ranked labels."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from models import bundle as bundle_io
from models.calibration import Calibration
from models.errors import BundleError, InvalidInputError
from models.explain import TermContribution, explain_labels
from models.feature_lookup import BITMAP_MB, FeatureLookup
from models.features import FeatureEncoder, require_text
from models.filters import FilterCompiler, FilterSpec
from models.knn import NO_KNN, KnnMatcher, KnnPart, knn_search
from models.params import POST_PROCESSORS
from models.profiles import NO_PROFILES, LabelProfiles, ProfilePart
from models.search import Searcher
from models.tree import Ensemble
from models.vocab import LabelInfo, read_label_meta

#: what ``threshold`` may be: a score, the bundle's tuned one, or none
Threshold = float | Literal["auto"] | None


#: a prediction, best first: (label, score), or (label, score, its terms) when explained
RankedLabel = tuple[str, float] | tuple[str, float, list[TermContribution]]


class Predictor:
    """Ranks a bundle's labels for documents; thread-safe.

    Scores lie in (0, 1]: a label's score is the mean over the ensemble's trees of the
    product of its node scores along its root-to-label path (see ``post_processor``). A
    bundle built with ``knn`` fuses in its neighbours' votes and its label centroids (see
    :mod:`models.knn`: the scores stay in 0..1; the explanations name each part).

    With a calibrated bundle (``xmc build --calibrate``) :meth:`predict` and
    :meth:`predict_features` return calibrated scores instead (see
    :mod:`models.calibration`); :meth:`predict_ids` always returns the raw scores.

    Controls of every predict call: ``label_filter`` (see :mod:`models.filters`: only labels
    it allows are searched and returned), ``threshold`` and ``min_score`` (labels scoring
    below the larger are dropped; ``threshold="auto"`` is the one tuned at build, see
    :attr:`tuned_threshold`); ``top_k`` always caps the count.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], ensemble: Ensemble,
                 label_names: list[str], encoder: FeatureEncoder | None,
                 label_counts: np.ndarray, *, lookup: FeatureLookup,
                 threads: int | None = None,
                 calibration: Calibration | None = None,
                 label_info: Mapping[str, LabelInfo] | None = None,
                 knn: KnnPart = NO_KNN, profiles: ProfilePart = NO_PROFILES) -> None:
        self.path = path
        #: the kNN matcher whose votes join the trees' scores (:class:`NoKnn`: the trees alone)
        self.knn = knn
        #: the label profiles that re-rank the trees' top labels (:class:`NoProfiles`: none)
        self.profiles = profiles
        self.calibration = calibration
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
        #: the search's feature lookup: the bundle's, mapped, or built at load for an older one
        self.lookup = lookup
        self._searcher = Searcher(ensemble, self.n_features, self.post, threads=self.threads,
                                  lookup=lookup)
        self._filters = FilterCompiler(label_names, ensemble)
        self._terms: list[str] | None = None

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
        calibration = Calibration.load(folder) if "calibration" in manifest else None
        knn: KnnPart = NO_KNN
        if "knn" in manifest:
            if not isinstance(manifest["knn"], dict):
                raise BundleError("the knn entry must be an object", folder / "manifest.json")
            knn = KnnMatcher.load(folder, manifest["knn"], n_labels=ensemble.n_labels,
                                  n_features=int(manifest["n_features"]),
                                  dense_start=int(ensemble.dense_start[0]), mmap=mmap)
        profiles: ProfilePart = NO_PROFILES
        if "profiles" in manifest:
            if not isinstance(manifest["profiles"], dict):
                raise BundleError("the profiles entry must be an object",
                                  folder / "manifest.json")
            profiles = LabelProfiles.load(folder, manifest["profiles"],
                                          n_labels=ensemble.n_labels,
                                          n_features=int(manifest["n_features"]), mmap=mmap)
        lookup = bundle_io.load_feature_lookup(folder, ensemble, int(manifest["n_features"]),
                                               mmap=mmap, bitmap_mb_if_absent=BITMAP_MB)
        return cls(folder, manifest, ensemble, label_names, encoder, counts, lookup=lookup,
                   threads=threads, calibration=calibration,
                   label_info=read_label_meta(folder, label_names), knn=knn,
                   profiles=profiles)

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

    @property
    def tuned_threshold(self) -> dict[str, Any] | None:
        """The score threshold tuned at build (``value``, ``micro_f1``, ``precision``,
        ``recall``, ``n_validation_docs``), or None when the bundle was built without one."""
        found = self.manifest.get("threshold")
        return dict(found) if isinstance(found, dict) else None

    # ----------------------------------------------------------------- predicting
    def encode(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Feature rows of texts, exactly as the builder computed them."""
        return require_text(self.encoder).transform(texts)

    def predict(self, texts: Sequence[str], *, top_k: int | None = None,
                beam_size: int | None = None, label_filter: FilterSpec | None = None,
                threshold: Threshold = None, min_score: float | None = None,
                explain: bool = False) -> list[list[RankedLabel]]:
        """Top ``top_k`` (label, score) per text, best first; one vectorized batch. See the
        class for ``label_filter``, ``threshold`` and ``min_score``. With ``explain`` each
        entry is (label, score, explanation): see :meth:`explain`."""
        if isinstance(texts, str):
            raise InvalidInputError("predict takes a sequence of texts, not one string")
        encoder = require_text(self.encoder)
        top_k, beam_size = self._check_args(top_k, beam_size)
        cut = self.score_cut(threshold, min_score)
        rows: tuple[np.ndarray, np.ndarray, np.ndarray]
        if len(texts) == 1:
            idx, val = encoder.transform_one(texts[0])
            rows = (np.array([0, idx.shape[0]], dtype=np.int64), idx, val)
        else:
            X = self._as_features(encoder.transform(texts))
            rows = (X.indptr, X.indices, X.data)
        labels, scores, counts = self._search(rows, top_k, beam_size, label_filter)
        return self._named(labels, scores, counts, cut, rows if explain else None)

    def predict_features(self, X: sp.spmatrix | np.ndarray, *, top_k: int | None = None,
                         beam_size: int | None = None, label_filter: FilterSpec | None = None,
                         threshold: Threshold = None, min_score: float | None = None,
                         explain: bool = False) -> list[list[RankedLabel]]:
        """Like :meth:`predict`, from feature rows (n_docs, n_features), e.g. XC data."""
        cut = self.score_cut(threshold, min_score)
        X = self._as_features(X)
        labels, scores, counts = self.predict_ids(X, top_k=top_k, beam_size=beam_size,
                                                  label_filter=label_filter)
        return self._named(labels, scores, counts, cut,
                           (X.indptr, X.indices, X.data) if explain else None)

    def explain(self, indices: np.ndarray, values: np.ndarray, labels: list[int],
                n_terms: int = 5) -> list[list[TermContribution]]:
        """Per label id: the ``n_terms`` input terms that pushed it up most for the document
        whose sorted feature ids and values are given, as ``[{"term", "contribution"},
        ...]`` (positive contributions only), plus one entry for a dense encoder's block. A
        contribution is in margin units, averaged over trees: see :mod:`models.explain`.
        A bundle with a kNN part adds the shares of each label's score that its votes and
        its label centroids gave, last; one with label profiles, the share they gave."""
        names = self._term_names()
        why = [e.top(names, n_terms)
               for e in explain_labels(self.ensemble, indices, values, labels)]
        shares = self.knn.score_shares(indices, values, labels,
                                       dense_start=int(self.ensemble.dense_start[0]))
        shares |= self.profiles.score_shares(indices, values, labels)
        for term, share in shares.items():
            for entry, value in zip(why, share.tolist()):
                entry.append({"term": term, "contribution": value})
        return why

    def predict_ids(self, X: sp.spmatrix | np.ndarray, *, top_k: int | None = None,
                    beam_size: int | None = None, label_filter: FilterSpec | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw result: label ids (n, top_k; -1 pads), scores (n, top_k), counts (n,);
        neither calibration nor threshold applied. The scores are the ensemble's, fused
        with the kNN votes when the bundle has a kNN part (:mod:`models.knn`)."""
        top_k, beam_size = self._check_args(top_k, beam_size)
        X = self._as_features(X)
        return self._search((X.indptr, X.indices, X.data), top_k, beam_size, label_filter)

    def calibrated(self, scores: np.ndarray) -> np.ndarray:
        """Raw ensemble scores as this bundle serves them: calibrated when it has a
        calibration, else as they are."""
        return self.calibration.apply(scores) if self.calibration is not None else scores

    def allowed_labels(self, label_filter: FilterSpec | None) -> np.ndarray:
        """bool (n_labels,): the labels ``label_filter`` allows (all for None); raises
        :class:`~models.errors.UnknownLabelError` for an unknown exact name."""
        return self._filters.label_mask(label_filter)

    def score_cut(self, threshold: Threshold = None, min_score: float | None = None) -> float:
        """The score below which labels are dropped: the larger of ``threshold`` (a score in
        0..1, ``"auto"`` for the tuned one, None for none) and ``min_score``. Both compare
        with the scores as returned (calibrated ones on a calibrated bundle, where the tuned
        threshold was tuned on that scale too)."""
        cut = 0.0
        if threshold == "auto":
            tuned = self.tuned_threshold
            if tuned is None:
                raise InvalidInputError(
                    f"threshold 'auto': bundle {self.name} (version {self.version}) was built "
                    "without a tuned threshold (xmc build --tune-threshold); give a number")
            cut = float(tuned["value"])
        elif threshold is not None:
            cut = _score_arg("threshold", threshold)
        if min_score is not None:
            cut = max(cut, _score_arg("min_score", min_score))
        return cut

    def warm_up(self) -> None:
        """Compile the kernels and run one prediction, so the first request is not slow."""
        X = sp.csr_matrix((np.empty(0, np.float32), np.empty(0, np.int32), np.zeros(2, np.int64)),
                          shape=(1, self.n_features))
        self.predict_ids(X, top_k=1, beam_size=1)
        if self.encoder is not None:
            self.predict(["warm up"], top_k=1, beam_size=1)
            self.predict(["warm up", "two documents"], top_k=1, beam_size=1)

    def close(self) -> None:
        self._searcher.close()

    # ----------------------------------------------------------------- internals
    def _search(self, rows: tuple[np.ndarray, np.ndarray, np.ndarray], top_k: int,
                beam_size: int, label_filter: FilterSpec | None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mask = self._filters.node_mask(label_filter)

        def allowed() -> np.ndarray | None:
            return None if label_filter is None else self._filters.label_mask(label_filter)

        return knn_search(self._searcher, self.knn, rows, top_k, beam_size,
                          dense_start=int(self.ensemble.dense_start[0]), node_mask=mask,
                          allowed=allowed, threads=self.threads, profiles=self.profiles)

    def _check_args(self, top_k: int | None, beam_size: int | None) -> tuple[int, int]:
        top_k = self.default_top_k if top_k is None else top_k
        beam_size = self.default_beam_size if beam_size is None else beam_size
        for name, value in (("top_k", top_k), ("beam_size", beam_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
        return min(int(top_k), self.n_labels), int(beam_size)

    def _as_features(self, given: Any) -> sp.csr_matrix:  # whatever a caller passed
        if not sp.issparse(given):
            given = np.asarray(given)
            if given.ndim != 2:
                raise InvalidInputError("feature input must be a 2-d matrix")
        X = sp.csr_matrix(given)
        if X.shape[1] != self.n_features:
            raise InvalidInputError(
                f"feature rows have {X.shape[1]} columns, the bundle has {self.n_features}")
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        if not X.has_sorted_indices:
            X = X.sorted_indices()
        return X

    def _named(self, labels: np.ndarray, scores: np.ndarray, counts: np.ndarray, cut: float = 0.0,
               explain_rows: tuple | None = None) -> list[list[RankedLabel]]:
        names = self.label_names
        scores = self.calibrated(scores)
        if explain_rows is None:
            return [
                [(names[j], s) for j, s in zip(row[:c].tolist(), srow[:c].tolist()) if s >= cut]
                for row, srow, c in zip(labels, scores, counts.tolist())
            ]
        indptr, idx, val = explain_rows
        out: list[list[RankedLabel]] = []
        for d, (row, srow, c) in enumerate(zip(labels, scores, counts.tolist())):
            kept = [(j, s) for j, s in zip(row[:c].tolist(), srow[:c].tolist()) if s >= cut]
            why = self.explain(idx[indptr[d] : indptr[d + 1]], val[indptr[d] : indptr[d + 1]],
                               [j for j, _ in kept])
            out.append([(names[j], s, w) for (j, s), w in zip(kept, why)])
        return out

    def _term_names(self) -> list[str] | None:
        """Feature id -> term of the TF-IDF block (None without one), built on first use."""
        if self._terms is None and self.encoder is not None and self.encoder.tfidf is not None:
            self._terms = self.encoder.tfidf.feature_names()
        return self._terms


def _score_arg(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidInputError(f"{name} must be a number in 0..1, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise InvalidInputError(f"{name} must lie in 0..1, got {value!r}")
    return float(value)
