"""Where a bundle's bytes go, and what each ``weight_dtype`` costs in accuracy and speed.

    python -m benchmarks.lean DATA_DIR [--seeds 0 1 2] [--valid-share 0.15] [--test]

Per seed, a float32 bundle is built (default parameters otherwise) on train less a seeded
validation share, and its forest quantized in memory to each weight dtype; quantizing after
training is exactly what ``xmc build --params '{"weight_dtype": ...}'`` does, so one
training serves all three. Each is scored on the validation rows (``--test``: built on all
of train and scored on test.jsonl / test.txt instead): P@1, P@5, single-document search
p50 / p99 from feature rows (one thread, 1,000 documents after 50 warm-up calls), and the
ensemble's bytes per tree, per array and per layer.
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
from benchmarks.tune import split, train_file
from models.builder import build
from models.data import Corpus, read_corpus
from models.feature_lookup import BITMAP_MB, FeatureLookup
from models.metrics import evaluate
from models.params import POST_PROCESSORS, BuildParams
from models.search import Searcher, ranked_names
from models.tree import WEIGHT_DTYPES, Ensemble, quantize, row_start

ROW_ARRAYS = ("chunk_feat", "row_len", "row_mark")
ENTRY_ARRAYS = ("entry_child", "entry_val")


def layer_bytes(ens: Ensemble) -> list[float]:
    """Bytes of the rows and entries of the chunks whose parents sit in each layer (root
    first), summed over trees; the per-node arrays are left out."""
    row_b = sum(getattr(ens, n).dtype.itemsize for n in ("chunk_feat", "row_len")) + 8 / 16
    entry_b = sum(getattr(ens, n).dtype.itemsize for n in ENTRY_ARRAYS)
    out: dict[int, float] = {}
    for t in range(ens.n_trees):
        # layer d of tree t: nodes seg..seg+width, found by walking child_ptr
        lo, hi = int(ens.tree_root[t]), int(ens.tree_root[t]) + 1
        for d in range(int(ens.tree_depth[t])):
            r0, r1 = int(ens.chunk_ptr[lo]), int(ens.chunk_ptr[hi])
            e0 = row_start(ens.row_len, ens.row_mark, r0)
            e1 = row_start(ens.row_len, ens.row_mark, r1)
            out[d] = out.get(d, 0.0) + (r1 - r0) * row_b + (e1 - e0) * entry_b
            lo, hi = int(ens.child_ptr[lo]), int(ens.child_ptr[hi])
    return [out[d] for d in sorted(out)]


def search_metrics(ens: Ensemble, X: sp.csr_matrix, truth: list[list[str]],
                   names: list[str], post: int) -> dict[str, float]:
    lookup = FeatureLookup.build(ens, X.shape[1], BITMAP_MB)
    with Searcher(ens, X.shape[1], post, threads=1, lookup=lookup) as searcher:
        ids, _, counts = searcher.search(X.indptr, X.indices, X.data, 5, 10)
        m = evaluate(ranked_names(ids, counts, names), truth, ks=(1, 5))
        rows = [X[i] for i in np.linspace(0, X.shape[0] - 1, min(1000, X.shape[0])).astype(int)]
        for x in rows[:50]:
            searcher.search(x.indptr, x.indices, x.data, 5, 10)
        times = []
        for x in rows:
            t0 = time.perf_counter()
            searcher.search(x.indptr, x.indices, x.data, 5, 10)
            times.append(time.perf_counter() - t0)
    return {"P@1": 100 * m["P@1"], "P@5": 100 * m["P@5"],
            "p50_us": 1e6 * float(np.percentile(times, 50)),
            "p99_us": 1e6 * float(np.percentile(times, 99))}


def array_bytes(ens: Ensemble) -> dict[str, int]:
    return {name: int(arr.nbytes) for name, arr in ens.arrays().items()}


def one_run(fit: Corpus, valid: Corpus, seed: int, tmp: Path) -> dict[str, dict]:
    params = BuildParams()
    params.seed = seed
    params.weight_dtype = "float32"  # the forest every dtype is quantized from
    predictor = models.load_bundle(build(fit, tmp / f"b{seed}", params), mmap=False)
    X = (predictor.encode(valid.texts) if valid.is_text
         else sp.csr_matrix(valid.features, dtype=np.float32))
    X.sort_indices()
    post = POST_PROCESSORS[predictor.manifest["params"]["post_processor"]]
    out = {}
    for dtype in WEIGHT_DTYPES:
        ens = quantize(predictor.ensemble, dtype)
        out[dtype] = {**search_metrics(ens, X, valid.labels, predictor.label_names, post),
                      "arrays": array_bytes(ens), "layers": layer_bytes(ens),
                      "n_trees": ens.n_trees, "n_rows": int(ens.chunk_feat.shape[0]),
                      "n_entries": ens.n_entries}
    predictor.close()
    return out


def test_file(data_dir: Path) -> Path:
    for name in ("test.jsonl", "test.txt"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise SystemExit(f"{data_dir}: no test.jsonl or test.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--valid-share", type=float, default=0.15)
    ap.add_argument("--test", action="store_true", help="train on all of train, score on test")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()
    corpus = read_corpus(train_file(args.data_dir))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            if args.test:
                fit, valid = corpus, read_corpus(test_file(args.data_dir))
            else:
                fit, valid = split(corpus, args.valid_share, seed)
            runs.append(one_run(fit, valid, seed, Path(tmp)))
    what = "test" if args.test else f"validation ({args.valid_share} of train)"
    print(f"{args.data_dir.name}: {what}, seeds {args.seeds}, {runs[0]['float32']['n_rows']:,} "
          f"rows, {runs[0]['float32']['n_entries']:,} entries")
    print("| weight_dtype | ensemble MB per tree | P@1 | P@5 | search p50 µs | p99 µs |")
    print("|---|---|---|---|---|---|")
    for dtype in WEIGHT_DTYPES:
        r = [run[dtype] for run in runs]
        mb = np.mean([sum(x["arrays"].values()) / x["n_trees"] / 2**20 for x in r])
        p1, p5 = (np.mean([x[k] for x in r]) for k in ("P@1", "P@5"))
        sd = np.std([x["P@1"] for x in r])
        p50, p99 = (np.mean([x[k] for x in r]) for k in ("p50_us", "p99_us"))
        print(f"| {dtype} | {mb:.2f} | {p1:.2f} ±{sd:.2f} | {p5:.2f} | {p50:.0f} | {p99:.0f} |")
    first = runs[0]
    for dtype in ("float32", "int8"):
        arrays = first[dtype]["arrays"]
        total = sum(arrays.values())
        print(f"\n{dtype} bytes per array (seed {args.seeds[0]}, all trees): " + ", ".join(
            f"{k} {v / 2**20:.2f} MB ({100 * v / total:.0f}%)"
            for k, v in sorted(arrays.items(), key=lambda kv: -kv[1]) if v > total / 200))
        print(f"{dtype} rows + entries MB per layer (root first): " + ", ".join(
            f"{b / 2**20:.2f}" for b in first[dtype]["layers"]))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
