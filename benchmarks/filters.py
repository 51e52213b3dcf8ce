"""What a label filter (and an explanation) costs a single-document prediction, in process,
from raw text.

    python -m benchmarks.filters BUNDLE TEST.jsonl [--docs 1000] [--include 1000] [--seed 0]

After 50 warm-up calls per variant, the variants take turns over chunks of 50 documents
(the order rotating from chunk to chunk), so a busy machine slows them alike and every call
meets a document the previous call did not (running the variants back to back on one
document let the later ones find its weights in the CPU caches: filtered calls then looked
13-45 % faster than unfiltered ones); p50 / p99 per variant, and the p50 added over the
unfiltered call. Variants: ``include N`` (N random labels, the issue's acceptance case),
``include 1 %`` and a prefix include / exclude pair. Each filter is passed as the request
would pass it (a dict of lists: normalized and looked up in the compiled-mask cache on every
call); its first compilation (label mask, node mask) is timed apart. Also reported: the mean
labels returned (a filter must still fill top_k) and the share of returned labels that are
allowed (must be 1). ``--explain`` adds the variant ``explain`` (no filter, the 5 terms of
every returned label).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import models
from models.data import read_corpus
from models.filters import FilterCompiler

#: documents each variant runs over before the next variant takes the same chunk
CHUNK = 50


def variants(predictor: models.Predictor, n_include: int, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    names = predictor.label_names
    pick = lambda n: [names[i] for i in rng.choice(len(names), n, replace=False)]  # noqa: E731
    prefixes = sorted({n.rsplit("/", 1)[0] for n in names if "/" in n})
    out = {f"include {n_include}": {"include": pick(n_include)},
           "include 1 %": {"include": pick(max(1, len(names) // 100))}}
    if prefixes:
        chosen = [prefixes[i] for i in rng.choice(len(prefixes), min(20, len(prefixes)),
                                                  replace=False)]
        out["prefix include 20 + exclude 1"] = {
            "include": [p + "/*" for p in chosen], "exclude": [chosen[0] + "/*"]}
    return out


def _call(predictor: models.Predictor, text: str, top_k: int, spec) -> list:
    if spec == "explain":
        return predictor.predict([text], top_k=top_k, explain=True)[0]
    return predictor.predict([text], top_k=top_k, label_filter=spec)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("test")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--include", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--explain", action="store_true", help="also time explain=True")
    args = ap.parse_args()

    predictor = models.load_bundle(args.bundle)
    predictor.warm_up()
    texts = read_corpus(args.test).texts[: args.docs]
    specs = variants(predictor, args.include, args.seed)
    compile_ms = {}
    for name, spec in specs.items():
        fresh = FilterCompiler(predictor.label_names, predictor.ensemble)
        t0 = time.perf_counter()
        fresh.label_mask(spec)  # the first call also sorts the names
        t1 = time.perf_counter()
        fresh.node_mask(spec)
        t2 = time.perf_counter()
        compile_ms[name] = {"first_label_mask_ms": round(1e3 * (t1 - t0), 3),
                            "node_mask_ms": round(1e3 * (t2 - t1), 3)}
    allowed = {name: set(np.asarray(predictor.label_names)[predictor.allowed_labels(spec)])
               for name, spec in specs.items()}
    calls = {"none": None, **specs}
    if args.explain:
        calls["explain"] = "explain"
    times = {name: [] for name in calls}
    returned = {name: 0 for name in calls}
    bad = {name: 0 for name in calls}
    names = list(calls)
    for name in names:  # warm-up: compiles, builds the term list, fills the mask cache
        for text in texts[:50]:
            _call(predictor, text, args.top_k, calls[name])
    for c, lo in enumerate(range(0, len(texts), CHUNK)):
        # each variant runs over a chunk of documents in turn, in an order that rotates
        # from chunk to chunk: every call meets a new document, as a request does, and no
        # variant is always the one that brings the chunk's weights into the CPU caches
        for name in names[c % len(names):] + names[: c % len(names)]:
            for text in texts[lo : lo + CHUNK]:
                t0 = time.perf_counter()
                row = _call(predictor, text, args.top_k, calls[name])
                times[name].append(time.perf_counter() - t0)
                returned[name] += len(row)
                if name in allowed:
                    bad[name] += sum(r[0] not in allowed[name] for r in row)
    base = float(np.percentile(times["none"], 50))
    result = {"bundle": args.bundle, "n_labels": predictor.n_labels, "docs": len(texts),
              "top_k": args.top_k, "beam_size": predictor.default_beam_size, "variants": {}}
    for name in calls:
        p50 = float(np.percentile(times[name], 50))
        result["variants"][name] = {
            "p50_ms": round(1e3 * p50, 4),
            "p99_ms": round(1e3 * float(np.percentile(times[name], 99)), 4),
            "p50_added_pct": round(100 * (p50 / base - 1), 1),
            "mean_labels": round(returned[name] / len(texts), 3),
            "not_allowed_returned": bad[name],
            **compile_ms.get(name, {}),
        }
        if name in allowed:
            result["variants"][name]["allowed_labels"] = len(allowed[name])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
