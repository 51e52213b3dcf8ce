"""TF-IDF alone vs TF-IDF fused with MiniLM: accuracy, alpha chosen on validation.

    python -m benchmarks.fusion DATA_DIR [--alphas 0 0.5 1 2 3] [--int8] [--valid-share 0.15]
        [--variants '{}' '{"n_trees": 5}' ...] [--seeds 0 1 2] [--validation-only]

MiniLM is exported once (``models.export``); every text is encoded once, cached beside the
export (keyed by the model's sha256 and the data file) and reused for each alpha and variant.
alpha and the build-parameter variant are chosen on validation splits carved from train (one
per seed; never the test set); the chosen pair and TF-IDF alone (alpha = 0, default
parameters) are then trained on the whole train set and scored on test. Features are exactly
the bundle's: [tfidf ; alpha * dense], rows l2-normalized.
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
from benchmarks.tune import merge
from models.builder import build
from models.bundle import sha256_file
from models.data import Corpus, read_corpus, validation_rows
from models.dense import OnnxTextEncoder
from models.export import export_minilm
from models.features import fuse
from models.metrics import evaluate
from models.params import BuildParams
from models.tfidf import TfidfEncoder


def fused(X_tfidf: sp.csr_matrix, dense: np.ndarray, alpha: float) -> sp.csr_matrix:
    """The bundle's features (models.features.fuse); alpha = 0 is TF-IDF alone."""
    return fuse(X_tfidf, dense, alpha) if alpha > 0 else X_tfidf


def score(train_labels, X_train, test_labels, X_test, seed: int, overrides: dict,
          dense_start: int | None) -> dict:
    params = BuildParams.from_dict(merge(BuildParams().to_dict(), {**overrides, "seed": seed}))
    with tempfile.TemporaryDirectory() as tmp:
        # the dense block's columns are declared, so its weights are stored dense and
        # unpruned exactly as in a bundle built from text
        corpus = Corpus(labels=train_labels, features=X_train, dense_start=dense_start)
        predictor = models.load_bundle(build(corpus, Path(tmp) / "b", params))
        ranked = predictor.predict_features(X_test, top_k=5, beam_size=10)
        counts = dict(zip(predictor.label_names, predictor.label_counts.tolist()))
        return evaluate([[lab for lab, _ in r] for r in ranked], test_labels,
                        label_counts=counts, n_train_docs=len(train_labels))


def row(name: str, m: dict) -> str:
    return (f"| {name} | {100 * m['P@1']:.2f} | {100 * m['P@3']:.2f} | {100 * m['P@5']:.2f} | "
            f"{100 * m['nDCG@5']:.2f} | {100 * m['PSP@5']:.2f} |")


def encode_cached(encoder: OnnxTextEncoder, model_path: Path, data_path: Path,
                  texts: list[str]) -> np.ndarray:
    """Embeddings of ``texts``, cached as .npy beside the model: the key is the model's and
    the data file's sha256, so a re-export or an edited file is never served stale."""
    key = f"{sha256_file(model_path)[:12]}-{sha256_file(data_path)[:12]}"
    cache = model_path.parent / f"embeddings-{data_path.parent.name}-{data_path.stem}-{key}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    dense = encoder.encode(texts)
    np.save(cache, dense, allow_pickle=False)
    return dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0, 3.0])
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--valid-share", type=float, default=0.15)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0],
                    help="validation splits (one per seed); the first seeds the test run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export-dir", type=Path, default=Path("artifacts/minilm"))
    ap.add_argument("--params", type=json.loads, default={},
                    help='build-parameter overrides for every run, e.g. \'{"ranker": {...}}\'')
    ap.add_argument("--variants", nargs="*", default=["{}"],
                    help="build-parameter variants (JSON overrides on top of --params) "
                         "compared on validation")
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
    model_path = Path(info["model_path"])
    dense_train = encode_cached(encoder, model_path, args.data_dir / "train.jsonl", train.texts)
    dense_test = encode_cached(encoder, model_path, args.data_dir / "test.jsonl", test.texts)
    t_encode = time.perf_counter() - t0
    n_enc = train.n_docs + test.n_docs
    print(f"{args.data_dir.name}: MiniLM {'int8' if args.int8 else 'fp32'} export "
          f"{t_export:.0f}s, encoded {n_enc} texts in {t_encode:.0f}s "
          f"({n_enc / t_encode:.0f} docs/s, {args.threads} threads)")

    # alpha and variant on validation, mean over the seeds' splits
    print(f"\nvalidation (alpha sweep; mean over seeds {args.seeds})\n")
    print("| variant | alpha | P@1 | P@3 | P@5 | nDCG@5 | PSP@5 |\n|---|---|---|---|---|---|---|")
    results: dict[tuple[str, float], dict] = {}
    per_seed = {}
    for seed in args.seeds:
        fit_rows, valid_rows = validation_rows(train.n_docs, args.valid_share, seed)
        fit, valid = train.subset(fit_rows), train.subset(valid_rows)
        tfidf, X_fit = TfidfEncoder.fit(fit.texts)
        per_seed[seed] = (fit, valid, X_fit, tfidf.transform(valid.texts), fit_rows, valid_rows)
    for variant in args.variants:
        overrides = merge(args.params, json.loads(variant))
        for alpha in args.alphas:
            ms = []
            for seed, (fit, valid, X_fit, X_valid, fit_rows, valid_rows) in per_seed.items():
                ms.append(score(fit.labels, fused(X_fit, dense_train[fit_rows], alpha),
                                valid.labels, fused(X_valid, dense_train[valid_rows], alpha),
                                seed, overrides, X_fit.shape[1] if alpha > 0 else None))
            m = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
            results[variant, alpha] = m
            print(row(f"`{variant}` | {alpha:g}", m), flush=True)
    best_variant, best = max(results, key=lambda va: (results[va]["P@1"], results[va]["P@5"]))
    print(f"\nchosen: variant {best_variant}, alpha = {best:g} (best mean validation P@1)")
    if args.validation_only:
        return
    seed = args.seeds[0]
    print("\ntest (whole train set)\n")
    print("| features | P@1 | P@3 | P@5 | nDCG@5 | PSP@5 |\n|---|---|---|---|---|---|")
    tfidf, X_train = TfidfEncoder.fit(train.texts)
    X_test = tfidf.transform(test.texts)
    final = {}
    runs = [("TF-IDF", 0.0, args.params)]
    if best > 0:
        runs.append((f"TF-IDF + {best:g} MiniLM, `{best_variant}`", best,
                     merge(args.params, json.loads(best_variant))))
    for name, alpha, overrides in runs:
        m = score(train.labels, fused(X_train, dense_train, alpha), test.labels,
                  fused(X_test, dense_test, alpha), seed, overrides,
                  X_train.shape[1] if alpha > 0 else None)
        final[name] = m
        print(row(name, m), flush=True)
    out = args.export_dir / f"fusion_{args.data_dir.name}.json"
    out.write_text(json.dumps({
        "validation": [{"variant": v, "alpha": a, **m} for (v, a), m in results.items()],
        "test": final, "alpha": best, "variant": best_variant, "int8": args.int8,
    }, indent=1, default=float))


if __name__ == "__main__":
    main()
