"""The kNN matcher's worth: fused bundles built without and with ``--knn``, scored on test.

    python -m benchmarks.knn DATA_DIR [DATA_DIR ...] [--out artifacts/knn] [--int8]
        [--params '{"knn_k_grid": [30]}'] [--knn-only] [--tag NAME]

Per data folder (``train.jsonl``, ``test.jsonl``) two bundles, each exactly as ``xmc build
TRAIN --dense-encoder minilm [--knn]`` builds it (default parameters; every choice made on the
builder's own validation split, never on test): (a) TF-IDF fused with MiniLM, (b) the same
with the kNN part. Each is evaluated once on test (``models.evaluate``: P@1, P@5, PSP@5, the
single-document latency from raw text after warm-up, p50); printed with the chosen dense
weight, the chosen kNN rule and weight, and the bytes of the trees and of the kNN part.
``--knn-only`` builds (b) alone (e.g. with ``--params '{"knn_weight_grid": [0.1, 0.2]}'``:
the kNN's worth on test when validation may not refuse it); ``--tag`` names its folders.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import models
from models.builder import build
from models.data import read_corpus
from models.evaluate import evaluate_predictor
from models.params import BuildParams


def run(data_dir: Path, out: Path, knn: bool, int8: bool, extra: dict[str, Any],
        tag: str = "") -> dict[str, Any]:
    train = read_corpus(data_dir / "train.jsonl")
    test = read_corpus(data_dir / "test.jsonl")
    params = BuildParams.from_dict({**extra, "dense_encoder": "minilm", "int8": int8,
                                    "knn": knn})
    folder = out / f"{data_dir.name}-{'knn' if knn else 'fused'}{tag}"
    t0 = time.perf_counter()
    build(train, folder, params, force=True)
    seconds = time.perf_counter() - t0
    predictor = models.load_bundle(str(folder))
    m = predictor.manifest
    metrics = evaluate_predictor(predictor, test)
    dense = [e for e in m["encoders"] if e["kind"] == "onnx"]
    chosen = m["build"].get("knn_selection", {}).get("chosen")
    predictor.close()
    return {"data": data_dir.name, "bundle": "fused + kNN" if knn else "fused",
            "P@1": metrics["P@1"], "P@5": metrics["P@5"], "PSP@5": metrics["PSP@5"],
            "p50_ms": metrics["latency_ms_p50"], "p99_ms": metrics["latency_ms_p99"],
            "dense_weight": dense[0]["weight"] if dense else 0.0,
            "knn": chosen, "knn_bytes": m["build"].get("knn_bytes", 0),
            "ensemble_bytes": m["build"]["ensemble_bytes"], "build_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("artifacts/knn"))
    ap.add_argument("--int8", action="store_true", help="int8 MiniLM (default fp32)")
    ap.add_argument("--knn-only", action="store_true", help="build the kNN bundles only")
    ap.add_argument("--tag", default="", help="suffix of the bundle folders")
    ap.add_argument("--params", default="{}",
                    help="JSON of build parameters for both bundles (e.g. the kNN grids)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("models.train").setLevel(logging.WARNING)
    extra = json.loads(args.params)
    rows = [run(d, args.out, knn, args.int8, extra, args.tag) for d in args.data_dirs
            for knn in ((True,) if args.knn_only else (False, True))]
    print("| data | bundle | P@1 | P@5 | PSP@5 | dense weight | kNN (k, power, weight) "
          "| 1-doc p50 ms | kNN bytes | tree bytes | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rule = ("-" if r["knn"] is None else
                f"{r['knn']['k']}, {r['knn']['power']:g}, {r['knn']['weight']:g}")
        print(f"| {r['data']} | {r['bundle']} | {100 * r['P@1']:.2f} | {100 * r['P@5']:.2f} "
              f"| {100 * r['PSP@5']:.2f} | {r['dense_weight']:g} | {rule} | "
              f"{r['p50_ms']:.2f} | {r['knn_bytes']:,} | {r['ensemble_bytes']:,} | "
              f"{r['build_s']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
