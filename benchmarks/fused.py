"""Fused bundles side by side: TF-IDF alone, with MiniLM (fp32 or int8), with MiniLM distilled
into static token embeddings, each with or without the kNN matcher; scored on test.

    python -m benchmarks.fused DATA_DIR [DATA_DIR ...] [--out artifacts/fused]
        [--bundles tfidf minilm minilm+knn minilm-int8 minilm-static minilm-static+knn]
        [--params '{"knn_k_grid": [30]}'] [--tag NAME] [--reuse]

Each bundle is built exactly as ``xmc build TRAIN [--dense-encoder minilm|minilm-static]
[--int8] [--knn]`` builds it (default parameters; the dense weight, the kNN rule and its
weight chosen on the builder's own validation split, never on test), then evaluated once on
test (``models.evaluate``: P@1, P@5, PSP@5, the single-document latency from raw text after
warm-up). Printed per bundle: those, the chosen dense weight and kNN rule (with the label
centroids' weight), the dense
encoder's own p50 per text (one text per call, as a request has it), the bytes of the trees
and of the kNN part, and the build seconds. ``--reuse`` evaluates bundles built by an earlier
run again instead of rebuilding them (their build seconds are the manifest's): to time them
on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

import models
from models.builder import build
from models.data import read_corpus
from models.evaluate import evaluate_predictor
from models.params import BuildParams

#: bundle name -> the build parameters that make it (``+knn`` adds the kNN matcher)
ENCODERS: dict[str, dict[str, Any]] = {
    "tfidf": {},
    "minilm": {"dense_encoder": "minilm"},
    "minilm-int8": {"dense_encoder": "minilm", "int8": True},
    "minilm-static": {"dense_encoder": "minilm-static"},
}


def bundle_params(name: str) -> dict[str, Any]:
    encoder, _, knn = name.partition("+")
    if encoder not in ENCODERS or knn not in ("", "knn") or (knn and encoder == "tfidf"):
        raise SystemExit(f"unknown bundle {name!r}: one of {sorted(ENCODERS)}, the dense "
                         "ones optionally with +knn")
    return {**ENCODERS[encoder], "knn": bool(knn)}


def encoder_p50_ms(predictor: models.Predictor, texts: list[str]) -> float:
    """Median seconds of the dense encoder alone on one text per call, in ms (0: none)."""
    dense = predictor.encoder.dense if predictor.encoder is not None else None
    if dense is None:
        return 0.0
    for text in texts[:20]:
        dense.encode([text])  # warm-up
    times = []
    for text in texts:
        t0 = time.perf_counter()
        dense.encode([text])
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def run(data_dir: Path, out: Path, name: str, extra: dict[str, Any],
        tag: str = "", reuse: bool = False) -> dict[str, Any]:
    test = read_corpus(data_dir / "test.jsonl")
    folder = out / f"{data_dir.name}-{name}{tag}"
    if not (reuse and (folder / "manifest.json").is_file()):
        params = BuildParams.from_dict({**extra, **bundle_params(name)})
        build(read_corpus(data_dir / "train.jsonl"), folder, params, force=True)
    predictor = models.load_bundle(str(folder))
    m = predictor.manifest
    metrics = evaluate_predictor(predictor, test)
    dense = [e for e in m["encoders"] if e["kind"] != "tfidf"]
    chosen = m["build"].get("knn_selection", {}).get("chosen")
    row = {"data": data_dir.name, "bundle": name,
           "P@1": metrics["P@1"], "P@5": metrics["P@5"], "PSP@5": metrics["PSP@5"],
           "p50_ms": metrics["latency_ms_p50"], "p99_ms": metrics["latency_ms_p99"],
           "encoder_p50_ms": encoder_p50_ms(predictor, test.text_list[:1000]),
           "dense_weight": dense[0]["weight"] if dense else 0.0,
           "knn": chosen, "knn_bytes": m["build"].get("knn_bytes", 0),
           "ensemble_bytes": m["build"]["ensemble_bytes"], "build_s": m["build"]["seconds"]}
    predictor.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("artifacts/fused"))
    ap.add_argument("--bundles", nargs="+", default=["minilm", "minilm+knn"],
                    help=f"which bundles: {', '.join(ENCODERS)}, the dense ones with "
                    "an optional +knn")
    ap.add_argument("--tag", default="", help="suffix of the bundle folders")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate the bundles an earlier run built instead of rebuilding")
    ap.add_argument("--params", default="{}",
                    help="JSON of build parameters for every bundle (e.g. the kNN grids)")
    args = ap.parse_args()
    for name in args.bundles:
        bundle_params(name)  # refuse a misspelt name before hours of building
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("models.train").setLevel(logging.WARNING)
    extra = json.loads(args.params)
    rows = []
    for d in args.data_dirs:
        for name in args.bundles:
            rows.append(run(d, args.out, name, extra, args.tag, args.reuse))
            print(json.dumps(rows[-1]), flush=True)
    print("| data | bundle | P@1 | P@5 | PSP@5 | dense weight | kNN (k, power, weight, "
          "centroid weight) | 1-doc p50 ms | encoder p50 ms | kNN bytes | tree bytes "
          "| build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rule = ("-" if r["knn"] is None else
                f"{r['knn']['k']}, {r['knn']['power']:g}, {r['knn']['weight']:g}, "
                f"{r['knn'].get('centroid_weight', 0):g}")
        print(f"| {r['data']} | {r['bundle']} | {100 * r['P@1']:.2f} | {100 * r['P@5']:.2f} "
              f"| {100 * r['PSP@5']:.2f} | {r['dense_weight']:g} | {rule} | "
              f"{r['p50_ms']:.2f} | {r['encoder_p50_ms']:.3f} | {r['knn_bytes']:,} | "
              f"{r['ensemble_bytes']:,} | {r['build_s']:.0f} |")


if __name__ == "__main__":
    main()
