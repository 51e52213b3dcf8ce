"""Serving speed of the TF-IDF encoder against scikit-learn's own transform.

Usage: ``python -m benchmarks.tfidf_speed [DATA_DIR]`` (default: ``../shared/data`` next to
the repository). For cooking (question titles) and reuters (articles) it fits on train.jsonl,
then times on test.jsonl: ``transform_one`` and sklearn's ``transform([doc])`` per document
(p50 / p99 µs over documents, each document's time being its best of three calls so that other
processes on a shared machine do not decide the tail), the batch ``transform`` of the whole
test set (docs/s, best of three), and the largest difference to sklearn's values (must stay
below 1e-6). For reuters it adds the p50 of documents of 130-170 words.

``--cpu-time`` times with the process CPU clock instead of the wall clock: on a machine shared
with other busy processes it shows the encoder's own cost, without the time spent preempted.

``--fit [--corpus TRAIN.jsonl ...]`` times the fit instead, on cooking, reuters and each given
corpus: scikit-learn's ``TfidfVectorizer(...).fit_transform(texts)`` against our
``TfidfEncoder.fit(texts, params)`` (both cores), each in its own fresh process so that peak
RSS is its own, timed inside that process with ``perf_counter`` after the texts are read, best
of 2. Prints docs, wall seconds each, their ratio, CPU seconds each (ours: the main process
and its workers; on a shared machine this is the work done, whatever the preemption), peak
RSS (ours: the main process and its largest worker, whose RSS counts the pages it shares
with the main process it was forked from) and whether both produced the same vocabulary.
``--repeat N`` changes the 2.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from models.data import read_corpus
from models.tfidf import TfidfEncoder, TfidfParams

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {"cooking": "cooking_stackexchange", "reuters": "reuters21578_modapte"}
# sklearn needs ~0.5 ms a call: a sample of this many documents bounds the run time.
SKLEARN_SAMPLE = 600


def per_call_us(
    fn: Callable[[str], object], texts: Sequence[str], passes: int, clock: Callable[[], int]
) -> np.ndarray:
    """Best time of ``fn(text)`` over ``passes`` calls, for every text, in µs."""
    for text in texts[:50]:  # warm caches and lazy imports out of the measurement
        fn(text)
    out = []
    for _ in range(passes):
        for text in texts:
            t0 = clock()
            fn(text)
            out.append(clock() - t0)
    return np.asarray(out, dtype=np.float64).reshape(passes, len(texts)).min(axis=0) / 1e3


def batch_docs_per_s(
    fn: Callable[[Sequence[str]], object], texts: Sequence[str], clock: Callable[[], int]
) -> float:
    """Best of three runs of ``fn(texts)``, in documents per second."""
    best = float("inf")
    for _ in range(3):
        t0 = clock()
        fn(texts)
        best = min(best, clock() - t0)
    return len(texts) / (best / 1e9)


def run(name: str, folder: Path, clock: Callable[[], int]) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    train = read_corpus(folder / "train.jsonl").texts
    test = read_corpus(folder / "test.jsonl").texts
    words = np.array([len(t.split()) for t in test])
    params = TfidfParams()

    t0 = time.perf_counter()
    encoder, _ = TfidfEncoder.fit(train, params)
    fit_s = time.perf_counter() - t0
    reference = TfidfVectorizer(
        ngram_range=(1, params.ngram_max),
        min_df=params.min_df,
        max_features=params.max_features,
        sublinear_tf=params.sublinear_tf,
        smooth_idf=params.smooth_idf,
    ).fit(train)

    ours = encoder.transform(test)
    diff = abs(ours - reference.transform(test).astype(np.float32)).max()

    gc.collect()
    ours_us = per_call_us(encoder.transform_one, test, 3, clock)
    sample = test[:: max(1, len(test) // SKLEARN_SAMPLE)]
    sk_us = per_call_us(lambda text: reference.transform([text]), sample, 3, clock)
    ours_batch = batch_docs_per_s(encoder.transform, test, clock)
    sk_batch = batch_docs_per_s(reference.transform, test, clock)

    print(
        f"\n## {name}: {len(train)} train / {len(test)} test docs, "
        f"test words/doc median {np.median(words):.0f} (p99 {np.percentile(words, 99):.0f}), "
        f"{encoder.n_features} features, fit {fit_s:.1f} s, max |ours - sklearn| {diff:.1e}"
    )
    print(f"{'one document (µs)':<34}{'p50':>9}{'p99':>9}")
    print(f"{'TfidfEncoder.transform_one':<34}{np.median(ours_us):>9.1f}"
          f"{np.percentile(ours_us, 99):>9.1f}")
    print(f"{'sklearn transform([doc])':<34}{np.median(sk_us):>9.1f}"
          f"{np.percentile(sk_us, 99):>9.1f}")
    mid = (words >= 130) & (words <= 170)
    if mid.sum() >= 20:
        sk_words = words[:: max(1, len(test) // SKLEARN_SAMPLE)]
        sk_mid = sk_us[(sk_words >= 130) & (sk_words <= 170)]
        print(f"{'  p50 at 130-170 words, ours/sk':<34}{np.median(ours_us[mid]):>9.1f}"
              f"{np.median(sk_mid):>9.1f}   ({mid.sum()} docs)")
    print(f"{'batch, whole test set':<34}{'docs/s':>18}")
    print(f"{'TfidfEncoder.transform':<34}{ours_batch:>18,.0f}")
    print(f"{'sklearn transform':<34}{sk_batch:>18,.0f}")


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the fit's workers)."""
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def fit_one(method: str, path: Path, repeat: int) -> dict:
    """Best of ``repeat`` fits of ``method`` ('sklearn' or 'ours') on the texts of ``path``."""
    texts = read_corpus(path).texts
    params = TfidfParams()
    gc.collect()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best, best_cpu = float("inf"), 0.0
    for _ in range(repeat):
        if method == "sklearn":
            from sklearn.feature_extraction.text import TfidfVectorizer

            vectorizer = TfidfVectorizer(
                ngram_range=(1, params.ngram_max), min_df=params.min_df,
                max_features=params.max_features, sublinear_tf=params.sublinear_tf,
                smooth_idf=params.smooth_idf,
            )
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            X = vectorizer.fit_transform(texts)
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            terms = vectorizer.get_feature_names_out().tolist()
        else:
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            encoder, X = TfidfEncoder.fit(texts, params)
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            terms = encoder.feature_names()
        if seconds < best:
            best, best_cpu = seconds, cpu
        del X
        gc.collect()
    return {
        "docs": len(texts),
        "features": len(terms),
        "vocab_sha": hashlib.sha256("\n".join(terms).encode()).hexdigest()[:12],
        "seconds": best,
        "cpu_seconds": best_cpu,
        "rss_texts_mb": base_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def run_fit(corpora: dict[str, Path], repeat: int) -> None:
    print(f"{'corpus':<16}{'docs':>8}{'features':>10}{'sklearn s':>11}{'ours s':>9}"
          f"{'ratio':>7}{'CPU s sk/ours':>15}{'sklearn MB':>12}{'ours MB (main/worker)':>23}"
          f"  same vocab")
    for name, path in corpora.items():
        if not path.is_file():
            print(f"{name:<16} skipped, {path} not found")
            continue
        out = {}
        for method in ("sklearn", "ours"):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.tfidf_speed", "--fit-one", method, str(path),
                 "--repeat", str(repeat)],
                check=True, capture_output=True, text=True,
            )
            out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        sk, ours = out["sklearn"], out["ours"]
        cpu = f"{sk['cpu_seconds']:.2f}/{ours['cpu_seconds']:.2f}"
        print(f"{name:<16}{ours['docs']:>8}{ours['features']:>10}{sk['seconds']:>11.2f}"
              f"{ours['seconds']:>9.2f}{sk['seconds'] / ours['seconds']:>6.1f}×{cpu:>15}"
              f"{sk['peak_rss_mb']:>12.0f}"
              f"{ours['peak_rss_mb']:>15.0f} / {ours['worker_peak_rss_mb']:<5.0f}"
              f"  {sk['vocab_sha'] == ours['vocab_sha']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process CPU clock instead of the wall clock")
    parser.add_argument("--fit", action="store_true",
                        help="time the fit against sklearn's fit_transform instead")
    parser.add_argument("--corpus", type=Path, action="append", default=[],
                        help="with --fit: another train.jsonl to time (repeatable)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="with --fit: best of this many fits (default 2)")
    parser.add_argument("--fit-one", nargs=2, metavar=("METHOD", "PATH"),
                        help=argparse.SUPPRESS)  # the child process of --fit
    args = parser.parse_args()
    if args.fit_one:
        print(json.dumps(fit_one(args.fit_one[0], Path(args.fit_one[1]), args.repeat)))
        return
    if args.fit:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"# TF-IDF fit, ours vs sklearn fit_transform ({os.cpu_count()} cores, "
              f"load average {load}, Python {platform.python_version()}); "
              f"best of {args.repeat}")
        corpora = {name: args.data_dir / sub / "train.jsonl" for name, sub in DATASETS.items()}
        corpora.update({path.parent.name: path for path in args.corpus})
        run_fit(corpora, args.repeat)
        return
    clock = time.process_time_ns if args.cpu_time else time.perf_counter_ns
    # Wall-clock figures: a busy shared machine inflates them, so say how busy it was.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# TF-IDF encoder speed ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load}, Python {platform.python_version()}, "
          f"{'CPU' if args.cpu_time else 'wall'} clock); "
          f"data: {args.data_dir}")
    for name, sub in DATASETS.items():
        folder = args.data_dir / sub
        if not (folder / "train.jsonl").is_file():
            print(f"\n## {name}: skipped, {folder}/train.jsonl not found")
            continue
        run(name, folder, clock)


if __name__ == "__main__":
    main()
