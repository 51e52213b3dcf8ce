"""The dense encoder's block of the weights: stored dense (unpruned, one matrix per chunk,
a vectorized dot product) vs stored like TF-IDF weights (sparse rows, pruned at
``weight_threshold``). Same features, same parameters, same seed; test-set accuracy, search
CPU time and weight memory.

    python -m benchmarks.dense_block DATA_DIR [--alpha 2] [--int8] [--params JSON]

Embeddings come from the fusion benchmark's cache (``benchmarks.fusion`` writes it; this
script encodes and caches when it is missing).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import models
from benchmarks.fusion import encode_cached, fused
from benchmarks.tune import merge
from models.builder import build
from models.data import Corpus, read_corpus
from models.dense import OnnxTextEncoder
from models.export import export_minilm
from models.metrics import evaluate
from models.params import BuildParams
from models.search import ranked_names
from models.tfidf import TfidfEncoder


def search_us(predictor, X, reps: int = 5) -> tuple[float, float]:
    """(single-document search, batch search) CPU microseconds per document, 1 thread:
    the median over ``reps`` passes of the row-by-row time, and one batch call."""
    searcher = predictor._searcher
    searcher.threads = 1
    rows = [(np.array([0, X.indptr[i + 1] - X.indptr[i]]),
             X.indices[X.indptr[i]:X.indptr[i + 1]], X.data[X.indptr[i]:X.indptr[i + 1]])
            for i in range(X.shape[0])]
    for r in rows[:20]:
        searcher.search(*r, 5, 10)
    passes = []
    for _ in range(reps):
        t = time.process_time_ns()
        for r in rows:
            searcher.search(*r, 5, 10)
        passes.append((time.process_time_ns() - t) / len(rows) / 1e3)
    t = time.process_time_ns()
    searcher.search(X.indptr, X.indices, X.data, 5, 10)
    return float(np.median(passes)), (time.process_time_ns() - t) / len(rows) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--export-dir", type=Path, default=Path("artifacts/minilm-int8"))
    ap.add_argument("--params", type=json.loads, default={"ranker": {"negatives": "tfn+man"}},
                    help="build-parameter overrides (default: the fused default, hard "
                         "negatives, made explicit so both storages train alike)")
    ap.add_argument("--latency-docs", type=int, default=500)
    args = ap.parse_args()
    train = read_corpus(args.data_dir / "train.jsonl")
    test = read_corpus(args.data_dir / "test.jsonl")
    info = export_minilm(args.export_dir, int8=args.int8)
    model_path = Path(info["model_path"])
    encoder = OnnxTextEncoder(model_path, Path(info["tokenizer_path"]), intra_op_threads=2)
    dense_train = encode_cached(encoder, model_path, args.data_dir / "train.jsonl", train.texts)
    dense_test = encode_cached(encoder, model_path, args.data_dir / "test.jsonl", test.texts)
    tfidf, X_train = TfidfEncoder.fit(train.texts)
    X_train = fused(X_train, dense_train, args.alpha)
    X_test = fused(tfidf.transform(test.texts), dense_test, args.alpha)
    params = BuildParams.from_dict(merge(BuildParams().to_dict(), args.params))
    print(f"{args.data_dir.name}: alpha {args.alpha:g}, MiniLM {'int8' if args.int8 else 'fp32'}"
          f", params {json.dumps(args.params)}; search CPU us per document, 1 thread\n")
    print("| dense block | P@1 | P@5 | PSP@5 | search single us | search batch us/doc | "
          "weights MB | build s |\n|---|---|---|---|---|---|---|---|")
    for name, dense_start in (("sparse, pruned", None), ("dense, unpruned", tfidf.n_features)):
        corpus = Corpus(labels=train.labels, features=X_train, dense_start=dense_start)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            predictor = models.load_bundle(build(corpus, Path(tmp) / "b", params))
            secs = time.perf_counter() - t0
            ids, _, counts = predictor.predict_ids(X_test, top_k=5, beam_size=10)
            names = predictor.label_names
            m = evaluate(ranked_names(ids, counts, names), test.labels, ks=(1, 5),
                         label_counts=dict(zip(names, predictor.label_counts.tolist())),
                         n_train_docs=train.n_docs)
            single, batch = search_us(predictor, X_test[: args.latency_docs])
            ens = predictor.ensemble
            mb = (ens.entry_val.nbytes + ens.entry_child.nbytes + ens.chunk_feat.nbytes
                  + ens.row_ptr.nbytes + ens.dense_val.nbytes) / 2**20
            print(f"| {name} | {100 * m['P@1']:.2f} | {100 * m['P@5']:.2f} | "
                  f"{100 * m['PSP@5']:.2f} | {single:.0f} | {batch:.0f} | {mb:.1f} | "
                  f"{secs:.0f} |", flush=True)
            predictor.close()


if __name__ == "__main__":
    main()
