"""micro-F1 of a bundle's top-5 labels on a test set at several cuts: the tuned threshold,
every top-5 label, the top label only, and the best threshold on test itself (an oracle the
tuned one is measured against).

    python -m benchmarks.thresholds BUNDLE TEST.jsonl

Scores as served (calibrated on a calibrated bundle); documents without labels left out.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import models
from models.data import read_corpus
from models.evaluate import predict_corpus
from models.metrics import best_threshold, micro_prf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("test")
    args = ap.parse_args()
    predictor = models.load_bundle(args.bundle)
    test = read_corpus(args.test)
    preds, raw, _ = predict_corpus(predictor, test, top_k=5, beam_size=10)
    keep = [i for i, t in enumerate(test.labels) if t]
    scores = np.concatenate([predictor.calibrated(np.asarray(raw[i])) for i in keep])
    correct = np.array([lab in set(test.labels[i]) for i in keep for lab in preds[i]])
    n_true = sum(len(set(test.labels[i])) for i in keep)
    first = np.array([j == 0 for i in keep for j in range(len(preds[i]))])
    cuts = {"all_top5": micro_prf(scores, correct, n_true, 0.0),
            "top1_only": micro_prf(first.astype(float), correct, n_true, 0.5),
            "best_on_test": micro_prf(scores, correct, n_true,
                                      best_threshold(scores, correct, n_true))}
    if predictor.tuned_threshold is not None:
        cuts["tuned"] = micro_prf(scores, correct, n_true,
                                  float(predictor.tuned_threshold["value"]))
    print(json.dumps({k: {m: round(v, 4) for m, v in d.items()} for k, d in cuts.items()}))


if __name__ == "__main__":
    main()
