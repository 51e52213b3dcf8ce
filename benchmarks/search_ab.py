"""Two searches over the same bundles, in one process: an earlier revision's kernel against
today's, or today's with and without the row directories.

    .venv/bin/python -m benchmarks.search_ab (--before REV | --directories)
        BUNDLE:TEST [BUNDLE:TEST ...] [--rounds 3] [--docs 1000]

With ``--before``, ``models/search.py`` as it was at git revision ``REV`` is loaded as a
module of its own (its numba kernels compiled apart from today's), and both searchers run
over each bundle's stored arrays and feature lookup. With ``--directories``, today's
searcher runs with the bundle's feature bitmaps alone and with them plus row directories
(the bundle's, or built in memory for a bundle that has none). First a check that both
return the same labels and scores, then, in interleaved rounds (A, B, A, B, ...) so that
the machine's drift falls on both alike, the 1-document p50/p99 of
``Predictor.predict_features`` (``--docs`` test documents one at a time after 50 warm-up
calls) and batch docs/s of the whole test set. Prints the median over rounds of each figure.
TEST is the bundle's XC test file (feature rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

from models.data import read_xc
from models.feature_lookup import BITMAP_MB, FeatureLookup
from models.predictor import Predictor
from models.search import Searcher

ROOT = Path(__file__).resolve().parent.parent


def search_module_at(rev: str, folder: Path) -> ModuleType:
    """models/search.py at ``rev``, imported from ``folder`` under a name of its own."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:models/search.py"],
                          check=True, capture_output=True, text=True).stdout
    path = folder / "search_before.py"
    # no on-disk numba cache for a module that lives in a temporary folder
    path.write_text(text.replace("cache=True", "cache=False"))
    spec = importlib.util.spec_from_file_location("search_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["search_before"] = module
    spec.loader.exec_module(module)
    return module


def single_ms(predictor: Predictor, rows: list[sp.csr_matrix]) -> tuple[float, float]:
    for row in rows[:50]:
        predictor.predict_features(row, top_k=5, beam_size=10)
    times = []
    for row in rows:
        t0 = time.perf_counter()
        predictor.predict_features(row, top_k=5, beam_size=10)
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def batch_docs_per_s(predictor: Predictor, X: sp.csr_matrix) -> float:
    predictor.predict_ids(X[:100], top_k=5, beam_size=10)
    t0 = time.perf_counter()
    predictor.predict_ids(X, top_k=5, beam_size=10)
    return X.shape[0] / (time.perf_counter() - t0)


def searcher_at(before: ModuleType, predictor: Predictor) -> Any:
    """The earlier revision's searcher over the predictor's arrays; revisions before the row
    directories took the feature bitmaps alone."""
    lookup = predictor.lookup
    if hasattr(before, "FeatureBitmaps"):
        bitmaps = before.FeatureBitmaps(lookup.bitmap_off, lookup.bitmap_words)
        return before.Searcher(predictor.ensemble, predictor.n_features, predictor.post,
                               threads=predictor.threads, bitmaps=bitmaps)
    return before.Searcher(predictor.ensemble, predictor.n_features, predictor.post,
                           threads=predictor.threads, lookup=lookup)


def with_and_without_directories(predictor: Predictor) -> dict[str, Any]:
    """Today's searcher over the bundle's bitmaps alone, and over them plus directories."""
    lookup = predictor.lookup
    if not (lookup.dir_off >= 0).any():
        bitmap_mb = int(predictor.manifest["params"].get("bitmap_mb", BITMAP_MB))
        lookup = FeatureLookup.build(predictor.ensemble, predictor.n_features, bitmap_mb)
    searchers = {}
    for name, chosen in (("bitmaps", FeatureLookup.bitmaps_only(lookup.bitmap_off,
                                                                lookup.bitmap_words)),
                         ("+dirs", lookup)):
        searchers[name] = Searcher(predictor.ensemble, predictor.n_features, predictor.post,
                                   threads=predictor.threads, lookup=chosen)
    print(f"row directories: {lookup.dir_rows.nbytes / 2**20:,.1f} MB for "
          f"{int((lookup.dir_off >= 0).sum()):,} chunks; bitmaps "
          f"{lookup.bitmap_words.nbytes / 2**20:,.1f} MB for "
          f"{int((lookup.bitmap_off >= 0).sum()):,}", flush=True)
    return searchers


def compare(predictor: Predictor, searchers: dict[str, Any], test: str, rounds: int,
            n_docs: int) -> None:
    X = sp.csr_matrix(read_xc(test).feature_matrix, dtype=np.float32)
    X.sort_indices()
    answers = [s.search(X.indptr, X.indices, X.data, 5, 10) for s in searchers.values()]
    same = all(np.array_equal(a, b) for a, b in zip(*answers))
    rows = [X[i] for i in np.linspace(0, X.shape[0] - 1, n_docs).astype(int)]
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in searchers}
    for _ in range(rounds):
        for name, searcher in searchers.items():
            predictor._searcher = searcher
            figures[name].append((*single_ms(predictor, rows), batch_docs_per_s(predictor, X)))
    print(f"{predictor.path}: same labels and scores: {same}")
    for name, runs in figures.items():
        p50, p99, batch = np.median(np.array(runs), axis=0)
        print(f"  {name:6s} 1-doc p50 {p50:.3f} ms, p99 {p99:.3f} ms, batch {batch:,.0f} docs/s "
              f"(p50 per round: {' '.join(f'{r[0]:.3f}' for r in runs)})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="BUNDLE:TEST")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", help="git revision of the kernel to compare")
    which.add_argument("--directories", action="store_true",
                       help="today's kernel without and with the row directories")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--docs", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = search_module_at(args.before, Path(tmp)) if args.before else None
        for pair in args.pairs:
            bundle, _, test = pair.partition(":")
            predictor = Predictor.load(bundle)
            searchers = (with_and_without_directories(predictor) if before is None else
                         {"before": searcher_at(before, predictor),
                          "after": predictor._searcher})
            compare(predictor, searchers, test, args.rounds, args.docs)


if __name__ == "__main__":
    main()
