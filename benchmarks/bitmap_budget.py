"""The feature-bitmap budget as a speed knob: the same bundle searched with bitmaps of each size.

    .venv/bin/python -m benchmarks.bitmap_budget BUNDLE TEST [--mb 128 256 512 1024]
        [--docs 1000]

For each budget (the build parameter ``bitmap_mb``: the chunks that get a bitmap, top layers
of every tree first) the bitmaps are built in memory over the bundle's trees and searched
with: MB of bitmaps, chunks covered, 1-document p50/p99 of ``Predictor.predict_features``
(``--docs`` test documents one at a time after 50 warm-up calls), batch docs/s of the whole
test set, and whether the answers equal those of the first budget (they must: the bitmaps
only find rows faster). TEST is the bundle's XC test file (feature rows).
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp

from benchmarks.search_ab import batch_docs_per_s, single_ms
from models.data import read_xc
from models.feature_lookup import BITMAP_MIN_ROWS, FeatureLookup
from models.predictor import Predictor
from models.search import Searcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("test")
    ap.add_argument("--mb", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--docs", type=int, default=1000)
    args = ap.parse_args()
    predictor = Predictor.load(args.bundle)
    ensemble = predictor.ensemble
    X = sp.csr_matrix(read_xc(args.test).feature_matrix, dtype=np.float32)
    X.sort_indices()
    rows = [X[i] for i in np.linspace(0, X.shape[0] - 1, args.docs).astype(int)]
    eligible = int((np.diff(np.asarray(ensemble.chunk_ptr)) >= BITMAP_MIN_ROWS).sum())
    first = None
    for mb in args.mb:
        lookup = FeatureLookup.build(ensemble, predictor.n_features, mb)
        predictor._searcher = Searcher(ensemble, predictor.n_features, predictor.post,
                                       threads=predictor.threads, lookup=lookup)
        p50, p99 = single_ms(predictor, rows)
        batch = batch_docs_per_s(predictor, X)
        answers = predictor.predict_ids(X, top_k=5, beam_size=10)[:2]
        first = first or answers
        same = all(np.array_equal(a, b) for a, b in zip(first, answers))
        print(f"bitmap_mb {mb}: {lookup.bitmap_words.nbytes / 2**20:,.0f} MB, chunks with a "
              f"bitmap {int((lookup.bitmap_off >= 0).sum())} of {eligible}, directories "
              f"{lookup.dir_rows.nbytes / 2**20:,.0f} MB, 1-doc p50 {p50:.3f} ms, "
              f"p99 {p99:.3f} ms, batch {batch:,.0f} docs/s, same answers: {same}", flush=True)


if __name__ == "__main__":
    main()
