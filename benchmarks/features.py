"""Identical features for every library in the side-by-side benchmark.

Each peer is trained on the same matrices, written once per dataset to a work folder:

* text corpora (``train.jsonl``/``test.jsonl``): scikit-learn ``TfidfVectorizer`` fitted on
  train only (lowercase, ``(?u)\\b\\w\\w+\\b``, uni+bigrams, sublinear tf, min_df=2, at most
  200k features, smooth idf, l2 rows);
* XC-format corpora (``train.txt``/``test.txt``): the features as given, rows l2-normalized
  (:func:`models.data.read_xc` does that).

Files written (npz via ``scipy.sparse.save_npz``, the rest JSON, so the PECOS venv with its
older numpy/scipy reads them too): ``X_train.npz``, ``X_test.npz``, ``Y_train.npz``,
``Y_test.npz`` (float32 CSR; columns are ``labels.json``, the labels seen in training),
``test_truth.json`` (every test document's label names, unseen ones included, for scoring),
``meta.json`` (sizes, label frequencies, the TF-IDF fit time).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from models.data import Corpus, label_matrix, read_corpus

# Bumped whenever the feature recipe changes, so cached feature folders are rebuilt.
FEATURE_VERSION = 1

TFIDF_PARAMS: dict[str, object] = {
    "lowercase": True,
    "token_pattern": r"(?u)\b\w\w+\b",
    "ngram_range": (1, 2),
    "sublinear_tf": True,
    "min_df": 2,
    "max_features": 200_000,
    "smooth_idf": True,
    "norm": "l2",
}


@dataclass
class FeatureSet:
    """Paths and bookkeeping of one dataset's prepared features."""

    name: str
    data_dir: Path
    feature_dir: Path
    kind: str  # "text" or "xc"
    train_path: Path
    test_path: Path
    label_names: list[str]
    label_counts: dict[str, int]
    n_train_docs: int
    n_test_docs: int
    n_features: int
    tfidf_fit_s: float | None

    def test_truth(self) -> list[list[str]]:
        return json.loads((self.feature_dir / "test_truth.json").read_text())


def dataset_files(data_dir: Path) -> tuple[str, Path, Path]:
    """Find ``train``/``test`` files in a dataset folder: JSONL text wins over XC features."""
    for kind, ext in (("text", ".jsonl"), ("xc", ".txt")):
        train, test = data_dir / f"train{ext}", data_dir / f"test{ext}"
        if train.is_file() and test.is_file():
            return kind, train, test
    raise FileNotFoundError(
        f"{data_dir}: needs train.jsonl + test.jsonl or train.txt + test.txt"
    )


def _source_stamp(paths: list[Path]) -> list[list[object]]:
    return [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in paths]


def prepare(data_dir: str | Path, work_root: str | Path, *, label_field: str = "labels",
            force: bool = False) -> FeatureSet:
    """Write (or reuse, when the sources are unchanged) the features of one dataset."""
    data_dir = Path(data_dir).resolve()
    kind, train_path, test_path = dataset_files(data_dir)
    name = data_dir.name
    feature_dir = Path(work_root) / name / "features"
    stamp = {
        "version": FEATURE_VERSION,
        "sources": _source_stamp([train_path, test_path]),
        "label_field": label_field,
    }
    meta_path = feature_dir / "meta.json"
    if not force and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("stamp") == stamp:
            return _feature_set(name, data_dir, feature_dir, kind, train_path, test_path, meta)

    feature_dir.mkdir(parents=True, exist_ok=True)
    train = read_corpus(train_path, label_field=label_field)
    test = read_corpus(test_path, label_field=label_field)
    tfidf_fit_s: float | None = None
    if kind == "text":
        X_train, X_test, tfidf_fit_s = _tfidf(train, test)
    else:
        X_train, X_test = train.features, test.features
        # XC test files may declare fewer columns than train; align to the train width.
        if X_test.shape[1] != X_train.shape[1]:
            X_test = sp.csr_matrix(
                (X_test.data, X_test.indices, X_test.indptr),
                shape=(X_test.shape[0], X_train.shape[1]),
            )
    counts = Counter(lab for doc in train.labels for lab in doc)
    # Deterministic column order: by name, so every run maps the same ids to the same labels.
    label_names = sorted(counts)
    for fname, X in (("X_train.npz", X_train), ("X_test.npz", X_test)):
        X = sp.csr_matrix(X, dtype=np.float32)
        X.sort_indices()
        sp.save_npz(feature_dir / fname, X)
    # test labels unseen in train are dropped (no model can predict them); they stay in
    # test_truth.json as misses
    sp.save_npz(feature_dir / "Y_train.npz", label_matrix(train.labels, label_names))
    sp.save_npz(feature_dir / "Y_test.npz", label_matrix(test.labels, label_names))
    (feature_dir / "labels.json").write_text(json.dumps(label_names))
    (feature_dir / "test_truth.json").write_text(json.dumps(list(test.labels)))
    meta = {
        "stamp": stamp,
        "kind": kind,
        "label_counts": dict(counts),
        "n_train_docs": train.n_docs,
        "n_test_docs": test.n_docs,
        "n_features": int(X_train.shape[1]),
        "tfidf_fit_s": tfidf_fit_s,
        "tfidf_params": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in TFIDF_PARAMS.items()} if kind == "text" else None,
    }
    meta_path.write_text(json.dumps(meta))
    return _feature_set(name, data_dir, feature_dir, kind, train_path, test_path, meta)


def _tfidf(train: Corpus, test: Corpus) -> tuple[sp.csr_matrix, sp.csr_matrix, float]:
    # Imported here: scikit-learn is a build-time dependency, not needed to score results.
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(dtype=np.float32, **TFIDF_PARAMS)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    X_train = vec.fit_transform(train.texts or [])
    fit_s = time.perf_counter() - t0
    X_test = vec.transform(test.texts or [])
    return X_train, X_test, fit_s


def _feature_set(name: str, data_dir: Path, feature_dir: Path, kind: str, train_path: Path,
                 test_path: Path, meta: dict) -> FeatureSet:
    return FeatureSet(
        name=name,
        data_dir=data_dir,
        feature_dir=feature_dir,
        kind=kind,
        train_path=train_path,
        test_path=test_path,
        label_names=json.loads((feature_dir / "labels.json").read_text()),
        label_counts=meta["label_counts"],
        n_train_docs=meta["n_train_docs"],
        n_test_docs=meta["n_test_docs"],
        n_features=meta["n_features"],
        tfidf_fit_s=meta["tfidf_fit_s"],
    )
