"""A batch of N documents vs N single calls, from raw text, on one bundle.

    python -m benchmarks.batch_vs_single BUNDLE TEST.jsonl [--n 1000] [--repeats 5]

Prints the best-of-repeats wall and CPU (process) seconds of ``predict(texts)`` on N texts
at once and of N calls ``predict([text])``, and their ratio. CPU seconds are the figure to
trust on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import models
from models.data import read_corpus


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("test")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    predictor = models.load_bundle(args.bundle)
    predictor.warm_up()
    texts = read_corpus(args.test).texts[: args.n]
    predictor.predict(texts[:50])

    def singles() -> None:
        for t in texts:
            predictor.predict([t])

    batch = [timed(lambda: predictor.predict(texts)) for _ in range(args.repeats)]
    single = [timed(singles) for _ in range(args.repeats)]
    bw, bc = min(b[0] for b in batch), min(b[1] for b in batch)
    sw, sc = min(s[0] for s in single), min(s[1] for s in single)
    n = len(texts)
    print(f"{n} documents, {predictor.name} ({predictor.threads} search threads)")
    print(f"batch : wall {bw * 1e3:8.1f} ms ({n / bw:8.0f} docs/s)   CPU {bc * 1e3:8.1f} ms")
    print(f"single: wall {sw * 1e3:8.1f} ms ({n / sw:8.0f} docs/s)   CPU {sc * 1e3:8.1f} ms")
    print(f"ratio : wall {sw / bw:.2f}x   CPU {sc / bc:.2f}x")


if __name__ == "__main__":
    main()
