"""The offline builder: a corpus in, a bundle folder out.

Stages: features (TF-IDF fit, or XC features as given; optionally a dense ONNX encoder fused
in), PIFA label embeddings, then per tree of the ensemble a balanced hierarchical clustering
and the node rankers; finally the bundle is written atomically and, when a test set is given,
evaluated into the manifest. Each stage logs its time and the peak memory so far.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from models import bundle as bundle_io
from models.cluster import build_tree, pifa_embeddings
from models.data import Corpus
from models.errors import BundleError, InvalidInputError
from models.features import FeatureEncoder
from models.params import BuildParams
from models.train import train_tree
from models.tree import Ensemble

log = logging.getLogger(__name__)


def label_matrix(labels: list[list[str]], label_names: list[str]) -> sp.csr_matrix:
    """Binary (n_docs, n_labels) matrix; labels missing from ``label_names`` are dropped."""
    index = {name: i for i, name in enumerate(label_names)}
    rows, cols = [], []
    for r, doc_labels in enumerate(labels):
        for lab in doc_labels:
            j = index.get(lab)
            if j is not None:
                rows.append(r)
                cols.append(j)
    return sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)),
        shape=(len(labels), len(label_names)),
    )


class _Stages:
    """Times each stage and records the peak RSS after it."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        yield
        secs = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.records[name] = {"seconds": round(secs, 3), "peak_rss_mb": round(peak, 1)}
        log.info("stage %s: %.2fs, peak RSS %.0f MB", name, secs, peak)


def build(
    train: Corpus,
    out_dir: str | Path,
    params: BuildParams | None = None,
    *,
    test: Corpus | None = None,
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Build a bundle from ``train`` into ``out_dir``; returns the bundle path."""
    params = params or BuildParams()
    params.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise BundleError("exists; pass --force to replace it", out_dir)
    label_names = sorted({lab for doc in train.labels for lab in doc})
    if not label_names:
        raise InvalidInputError(f"{train.source or 'training set'}: no document has a label")
    threads = params.threads or os.cpu_count() or 1
    stages = _Stages()
    t_start = time.perf_counter()

    tmp = bundle_io.tmp_dir_for(out_dir)
    try:
        with stages("features"):
            encoder, X = _fit_features(train, params, tmp)
        Y = label_matrix(train.labels, label_names)
        label_counts = np.asarray(Y.sum(axis=0)).ravel().astype(np.int64)
        with stages("pifa"):
            Z = pifa_embeddings(X, Y)
        trees = []
        cpu_train = time.process_time()
        for t in range(params.n_trees):
            with stages(f"cluster_tree{t}"):
                tree = build_tree(Z, params.cluster, seed=params.seed + t)
            with stages(f"train_tree{t}"):
                trees.append(train_tree(X, Y, tree, params.ranker, seed=params.seed + t,
                                        threads=threads, post_processor=params.post_processor,
                                        desc=f"tree {t + 1}/{params.n_trees}"))
        cpu_train = time.process_time() - cpu_train
        ensemble = Ensemble.concatenate(trees) if len(trees) > 1 else trees[0]
        with stages("write"):
            bundle_io.write_arrays(tmp, ensemble, label_names, label_counts)
            entries = encoder.save(tmp) if encoder is not None else []
            shutil.rmtree(tmp / "_export", ignore_errors=True)  # the dense export's scratch
            encoder_files = [f for e in entries for f in e.get("files", [])]
            param_dict = params.to_dict()
            manifest: dict[str, Any] = {
                "format_version": bundle_io.FORMAT_VERSION,
                "name": name or out_dir.name,
                # threads changes how fast, never what is built: not part of the identity
                "version": bundle_io.content_hash(
                    tmp, {k: v for k, v in param_dict.items() if k != "threads"},
                    encoder_files),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "params": param_dict,
                "n_labels": len(label_names),
                "n_features": int(X.shape[1]),
                "n_train_docs": train.n_docs,
                "trees": ensemble.tree_summary(),
                "encoders": entries,
                "metrics": {},
            }
        build_seconds = time.perf_counter() - t_start
        manifest["build"] = {
            "seconds": round(build_seconds, 3),
            "threads": threads,
            "stages": stages.records,
            "cpu_seconds_train": round(cpu_train, 3),
            "n_weights": int(ensemble.entry_val.shape[0]),
        }
        if test is not None:
            bundle_io.write_manifest(tmp, manifest)
            from models.evaluate import evaluate_predictor
            from models.predictor import Predictor

            predictor = Predictor.load(tmp, mmap=False)
            manifest["metrics"] = evaluate_predictor(predictor, test, measure_speed=False)
            predictor.close()
        bundle_io.finalize(tmp, out_dir, manifest, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle %s (version %s) built in %.1fs", out_dir, manifest["version"],
             build_seconds)
    return out_dir


def _fit_features(train: Corpus, params: BuildParams, folder: Path):
    """Returns (encoder or None, training feature matrix)."""
    if not train.is_text:
        if params.dense_encoder:
            raise InvalidInputError("a dense encoder needs text input, not XC features")
        X = sp.csr_matrix(train.features, dtype=np.float32)
        X.sort_indices()
        return None, X
    from models.tfidf import TfidfEncoder

    tfidf, X = TfidfEncoder.fit(train.texts, params.tfidf)
    if not params.dense_encoder:
        return FeatureEncoder(tfidf), X
    encoder = FeatureEncoder(tfidf, _dense_encoder(params, folder), params.dense_weight)
    return encoder, encoder.transform(train.texts)


def _dense_encoder(params: BuildParams, folder: Path):
    from models.dense import OnnxTextEncoder

    spec = params.dense_encoder
    if spec == "minilm":
        from models.export import export_minilm

        info = export_minilm(folder / "_export", int8=params.int8)
        model, tokenizer = Path(info["model_path"]), Path(info["tokenizer_path"])
    else:
        model = Path(spec)
        candidates = [model.parent / "tokenizer.json", model.with_suffix(".tokenizer.json")]
        tokenizer = next((c for c in candidates if c.is_file()), None)
        if not model.is_file() or tokenizer is None:
            raise InvalidInputError(
                f"{spec}: need an .onnx file with tokenizer.json (or "
                f"{model.stem}.tokenizer.json) beside it")
        if params.int8:
            from models.export import quantize_int8

            q = folder / "_export" / "model.int8.onnx"
            q.parent.mkdir(parents=True, exist_ok=True)
            quantize_int8(model, q)
            model = q
    return OnnxTextEncoder(model, tokenizer, intra_op_threads=params.threads or 2)
