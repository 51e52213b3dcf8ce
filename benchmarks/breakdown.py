"""Where one document's prediction time goes: text encoding vs tree search (CPU time).

    python -m benchmarks.breakdown BUNDLE TEST.jsonl [--n 500]

Per document, median CPU microseconds of: ``transform_one`` (TF-IDF), the search kernel
on that row (one call, all trees), and the whole ``predict([text])``; then the search
alone per tree. numba kernels show up as one opaque frame in a sampling profiler, so this
is the profile of the hot path.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import models
from models.data import read_corpus


def median_us(fn, items) -> float:
    out = []
    for it in items:
        t = time.process_time_ns()
        fn(it)
        out.append(time.process_time_ns() - t)
    return float(np.median(out)) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("test")
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    p = models.load_bundle(args.bundle)
    p.warm_up()
    texts = read_corpus(args.test).texts[: args.n]
    rows = [p.encoder.transform_one(t) for t in texts]
    for t in texts[:30]:
        p.predict([t])
    enc = median_us(p.encoder.transform_one, texts)
    top_k, beam = p.default_top_k, p.default_beam_size
    search = median_us(
        lambda r: p._searcher.search(np.array([0, len(r[0])]), r[0], r[1], top_k, beam), rows)
    whole = median_us(lambda t: p.predict([t]), texts)
    nnz = np.median([len(r[0]) for r in rows])
    n_trees = p.ensemble.n_trees
    print(f"{p.name}: {n_trees} trees, {p.n_labels} labels, median {nnz:.0f} features/doc")
    print(f"  encode (encoders)    {enc:8.1f} us")
    print(f"  search (all trees)   {search:8.1f} us  ({search / n_trees:.1f} per tree)")
    print(f"  whole predict([t])   {whole:8.1f} us")


if __name__ == "__main__":
    main()
