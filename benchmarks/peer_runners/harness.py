"""What every peer runner shares: argument parsing, feature loading, timers, result files.

Runners are started as scripts (``python benchmarks/peer_runners/X_runner.py ...``), some of
them by another virtual environment (PECOS needs numpy<2), so this module uses only the
standard library, numpy and scipy, and nothing from the project.

A runner leaves in its output folder:

* ``topk.npy``  int32 (n_test, top_k) column ids into ``labels.json``, best first, -1 padding;
  or ``topk_labels.json`` (label names, best first) when the model speaks label names;
* ``result.json``  timings and sizes (see :func:`write_result`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse as sp

WARMUP_DOCS = 50

# The machine is shared: the load average at start and end says how busy it was.
_LOAD_AT_START = os.getloadavg()
# The run's settings, recorded with every result.
_RUN: dict[str, int] = {}


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("feature_dir", type=Path, help="folder written by benchmarks.features")
    ap.add_argument("out_dir", type=Path, help="where to leave topk.npy and result.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-docs", type=int, default=1000,
                    help="test documents predicted one at a time for p50/p99")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _RUN.update(threads=args.threads, top_k=args.top_k, beam=args.beam, seed=args.seed)
    return args


def load_csr(path: Path) -> sp.csr_matrix:
    X = sp.load_npz(path).tocsr()
    X = sp.csr_matrix(X, dtype=np.float32)
    X.sort_indices()
    return X


def load_features(feature_dir: Path) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    """X_train, Y_train, X_test."""
    return (
        load_csr(feature_dir / "X_train.npz"),
        load_csr(feature_dir / "Y_train.npz"),
        load_csr(feature_dir / "X_test.npz"),
    )


def latency_indices(n_docs: int, n_wanted: int) -> np.ndarray:
    """Evenly spread test rows for the one-at-a-time latency loop (same rows for every peer)."""
    n = min(n_docs, n_wanted)
    return np.unique(np.linspace(0, n_docs - 1, n).astype(np.int64)) if n else np.zeros(0, int)


def time_single(predict_one: Callable[[object], object], items: Sequence[object]
                ) -> tuple[float, float, int]:
    """p50 and p99 in milliseconds of ``predict_one(item)``, one call at a time, after
    ``WARMUP_DOCS`` untimed calls (first calls fault in pages and fill caches)."""
    for item in items[:WARMUP_DOCS]:
        predict_one(item)
    times = np.empty(len(items), dtype=np.float64)
    for i, item in enumerate(items):
        t0 = time.perf_counter()
        predict_one(item)
        times[i] = time.perf_counter() - t0
    if not len(items):
        return float("nan"), float("nan"), 0
    return (float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3),
            len(items))


def own_peak_rss_kib() -> int:
    """This process's own high-water mark (``VmHWM``), in KiB.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that figure over from the parent
    across fork + exec, so every runner would report at least the resident size of the
    benchmark driver that started it (675 MB for all peers alike once the driver had fitted
    a large TF-IDF). ``VmHWM`` belongs to the runner's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_mb() -> float:
    """Largest resident set of this process or of any child it waited for (ours: the
    ``xmc build`` subprocess, forked from this small runner before it loaded any data)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own_peak_rss_kib(), kids) / 1024.0


def dir_size_mb(path: Path) -> float:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def topk_from_csr(scores: sp.csr_matrix, k: int) -> np.ndarray:
    """Best-first column ids of each row of a sparse score matrix, -1 where a row has fewer."""
    scores = scores.tocsr()
    out = np.full((scores.shape[0], k), -1, dtype=np.int32)
    for i in range(scores.shape[0]):
        lo, hi = scores.indptr[i], scores.indptr[i + 1]
        if hi == lo:
            continue
        cols, vals = scores.indices[lo:hi], scores.data[lo:hi]
        order = np.argsort(-vals, kind="stable")[:k]
        out[i, : len(order)] = cols[order]
    return out


def topk_from_pairs(rows: Sequence[Sequence[tuple[int, float]]], k: int) -> np.ndarray:
    """Best-first ids from per-document (label id, score) lists, -1 padding."""
    out = np.full((len(rows), k), -1, dtype=np.int32)
    for i, pairs in enumerate(rows):
        best = sorted(pairs, key=lambda p: -p[1])[:k]
        out[i, : len(best)] = [int(lab) for lab, _ in best]
    return out


def write_result(out_dir: Path, *, peer: str, version: str, params: dict, train_s: float,
                 model_mb: float, latency: tuple[float, float, int], batch_docs_per_s: float,
                 topk: np.ndarray | None = None, topk_labels: list[list[str]] | None = None,
                 notes: Sequence[str] = (), extra: dict | None = None) -> None:
    """Write the runner's predictions and ``result.json``; peak RSS is read here, last."""
    if topk is not None:
        np.save(out_dir / "topk.npy", np.asarray(topk, dtype=np.int32))
    if topk_labels is not None:
        (out_dir / "topk_labels.json").write_text(json.dumps(topk_labels))
    p50, p99, n_lat = latency
    result = {
        "peer": peer,
        "version": version,
        "params": params,
        "train_s": train_s,
        "peak_rss_mb": peak_rss_mb(),
        "model_mb": model_mb,
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "latency_docs": n_lat,
        "batch_docs_per_s": batch_docs_per_s,
        **_RUN,
        "notes": list(notes),
        "loadavg_start": list(_LOAD_AT_START),
        "loadavg_end": list(os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "argv": sys.argv,
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    if extra:
        result.update(extra)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
