"""TF-IDF alone vs TF-IDF fused with MiniLM: accuracy, alpha chosen on validation.

    python -m benchmarks.fusion DATA_DIR [--alphas 0 0.5 1 2 3] [--int8] [--valid-share 0.15]

MiniLM is exported once (``models.export``); every text is encoded once and reused for each
alpha. alpha is chosen on a validation split carved from train (never the test set); the
chosen alpha and alpha = 0 (TF-IDF alone) are then trained on the whole train set and scored
on test. Features are exactly the bundle's: [tfidf ; alpha * dense], rows l2-normalized.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import models
from benchmarks.tune import split
from models.builder import build
from models.data import Corpus, normalize_rows, read_corpus
from models.dense import OnnxTextEncoder
from models.export import export_minilm
from models.metrics import evaluate
from models.params import BuildParams
from models.tfidf import TfidfEncoder


def fused(X_tfidf: sp.csr_matrix, dense: np.ndarray, alpha: float) -> sp.csr_matrix:
    if alpha == 0:
        return X_tfidf
    X = normalize_rows(sp.hstack([X_tfidf, sp.csr_matrix(alpha * dense)], format="csr"))
    X.sort_indices()
    return X


def score(train_labels, X_train, test_labels, X_test, seed: int, overrides: dict) -> dict:
    params = BuildParams.from_dict({**BuildParams().to_dict(), **overrides, "seed": seed})
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Corpus(labels=train_labels, features=X_train)
        predictor = models.load_bundle(build(corpus, Path(tmp) / "b", params))
        ranked = predictor.predict_features(X_test, top_k=5, beam_size=10)
        counts = dict(zip(predictor.label_names, predictor.label_counts.tolist()))
        return evaluate([[lab for lab, _ in r] for r in ranked], test_labels,
                        label_counts=counts, n_train_docs=len(train_labels))


def row(name: str, m: dict) -> str:
    return (f"| {name} | {100 * m['P@1']:.2f} | {100 * m['P@3']:.2f} | {100 * m['P@5']:.2f} | "
            f"{100 * m['nDCG@5']:.2f} | {100 * m['PSP@5']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0, 3.0])
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--valid-share", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export-dir", type=Path, default=Path("artifacts/minilm"))
    ap.add_argument("--params", type=json.loads, default={},
                    help='build-parameter overrides as JSON, e.g. \'{"ranker": {...}}\'')
    ap.add_argument("--validation-only", action="store_true")
    args = ap.parse_args()
    train = read_corpus(args.data_dir / "train.jsonl")
    test = read_corpus(args.data_dir / "test.jsonl")
    t0 = time.perf_counter()
    info = export_minilm(args.export_dir, int8=args.int8)
    encoder = OnnxTextEncoder(Path(info["model_path"]), Path(info["tokenizer_path"]),
                              intra_op_threads=args.threads)
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense_train = encoder.encode(train.texts)
    dense_test = encoder.encode(test.texts)
    t_encode = time.perf_counter() - t0
    n_enc = train.n_docs + test.n_docs
    print(f"{args.data_dir.name}: MiniLM {'int8' if args.int8 else 'fp32'} export "
          f"{t_export:.0f}s, encoded {n_enc} texts in {t_encode:.0f}s "
          f"({n_enc / t_encode:.0f} docs/s, {args.threads} threads)")

    # alpha on validation
    rows = np.random.default_rng(args.seed).permutation(train.n_docs)
    n_valid = round(args.valid_share * train.n_docs)
    fit_rows, valid_rows = np.sort(rows[n_valid:]), np.sort(rows[:n_valid])
    fit, valid = split(train, args.valid_share, args.seed)
    tfidf, X_fit = TfidfEncoder.fit(fit.texts)
    X_valid = tfidf.transform(valid.texts)
    print("\nvalidation (alpha sweep)\n")
    print("| alpha | P@1 | P@3 | P@5 | nDCG@5 | PSP@5 |\n|---|---|---|---|---|---|")
    results = {}
    for alpha in args.alphas:
        m = score(fit.labels, fused(X_fit, dense_train[fit_rows], alpha), valid.labels,
                  fused(X_valid, dense_train[valid_rows], alpha), args.seed, args.params)
        results[alpha] = m
        print(row(f"{alpha:g}", m), flush=True)
    best = max(results, key=lambda a: (results[a]["P@1"], results[a]["P@5"]))
    print(f"\nchosen alpha = {best:g} (best validation P@1)")
    if args.validation_only:
        return
    print("\ntest (whole train set)\n")
    print("| features | P@1 | P@3 | P@5 | nDCG@5 | PSP@5 |\n|---|---|---|---|---|---|")
    tfidf, X_train = TfidfEncoder.fit(train.texts)
    X_test = tfidf.transform(test.texts)
    final = {}
    for alpha in sorted({0.0, best}):
        m = score(train.labels, fused(X_train, dense_train, alpha), test.labels,
                  fused(X_test, dense_test, alpha), args.seed, args.params)
        final[alpha] = m
        print(row("TF-IDF" if alpha == 0 else f"TF-IDF + {alpha:g} MiniLM", m), flush=True)
    out = args.export_dir / f"fusion_{args.data_dir.name}.json"
    out.write_text(json.dumps({"validation": results, "test": final, "alpha": best,
                               "int8": args.int8}, indent=1, default=float))


if __name__ == "__main__":
    main()
