"""xmc-serve (ours): ``xmc build`` from the raw training file, then predict the test set.

Unlike the peers, ours builds from the raw text (its own TF-IDF encoder reproduces the
scikit-learn features) and is timed from raw text at predict time too, encoding included;
XC-format datasets go through ``predict_features`` on the shared, l2-normalized matrix.

Training seconds come from the bundle manifest's stage timings: PIFA, clustering and
rankers, i.e. everything after the features, like the peers' figure; the TF-IDF fit (stage
``features``) is reported beside it, and the whole ``xmc build`` wall time is kept in
result.json. Peak RSS is the larger of the build subprocess and this (predicting) process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

NOT_TRAINING = {"features", "write"}


def core_revision() -> str:
    """The core's commit (the last one touching models/), "+dirty" when models/ had
    uncommitted edits: the core changes under the benchmark while it is being developed."""
    repo = Path(__file__).resolve().parents[2]
    try:
        # the last commit that touched models/: commits elsewhere do not change the core
        head = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h", "--",
                               "models"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "models"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main() -> None:
    def extra(ap) -> None:
        ap.add_argument("--train", type=Path, required=True, help="raw training file")
        ap.add_argument("--test", type=Path, required=True, help="raw test file")
        ap.add_argument("--n-trees", type=int, default=None,
                        help="trees to build (default: the build's own default)")

    args = harness.parse_args(__doc__ or "", extra)
    code = core_revision()
    bundle = args.out_dir / "bundle"
    xmc = Path(sys.executable).with_name("xmc")
    cmd = [str(xmc), "build", str(args.train), "--out", str(bundle), "--seed", str(args.seed),
           "--threads", str(args.threads), "--force"]
    if args.n_trees is not None:
        cmd += ["--n-trees", str(args.n_trees)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    build_wall_s = time.perf_counter() - t0
    (args.out_dir / "build.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"xmc build exited {proc.returncode}")

    manifest = json.loads((bundle / "manifest.json").read_text())
    stages = manifest["build"]["stages"]
    train_s = sum(s["seconds"] for name, s in stages.items() if name not in NOT_TRAINING)
    is_text = args.test.suffix in (".jsonl", ".json")
    tfidf_fit_s = stages["features"]["seconds"] if is_text else None

    from models.data import read_corpus
    from models.predictor import Predictor

    # Same thread count as every peer (load_bundle would pick its own default).
    predictor = Predictor.load(bundle, threads=args.threads)
    predictor.warm_up()
    if is_text:
        texts = read_corpus(args.test).texts or []
        n_test = len(texts)

        def batch() -> list[list[tuple[str, float]]]:
            return predictor.predict(texts, top_k=args.top_k, beam_size=args.beam)

        items: list[object] = [[texts[i]] for i in harness.latency_indices(n_test,
                                                                          args.latency_docs)]

        def one(item: object) -> object:
            return predictor.predict(item, top_k=args.top_k, beam_size=args.beam)
    else:
        X_test = harness.load_csr(args.feature_dir / "X_test.npz")
        n_test = X_test.shape[0]

        def batch() -> list[list[tuple[str, float]]]:
            return predictor.predict_features(X_test, top_k=args.top_k, beam_size=args.beam)

        items = [X_test[i] for i in harness.latency_indices(n_test, args.latency_docs)]

        def one(item: object) -> object:
            return predictor.predict_features(item, top_k=args.top_k, beam_size=args.beam)

    t0 = time.perf_counter()
    ranked = batch()
    batch_s = time.perf_counter() - t0
    latency = harness.time_single(one, items)

    harness.write_result(
        args.out_dir,
        peer="ours",
        version=str(manifest.get("version", "?")),
        params=manifest.get("params", {}),
        train_s=train_s,
        model_mb=harness.dir_size_mb(bundle),
        latency=latency,
        batch_docs_per_s=n_test / batch_s,
        topk_labels=[[label for label, _ in row] for row in ranked],
        notes=["builds from raw text; latency and batch from raw text, encoding included"
               if is_text else "XC features via predict_features"],
        extra={"core_revision": code, "seed": args.seed, "tfidf_fit_s": tfidf_fit_s,
               "build_wall_s": build_wall_s,
               # CPU seconds say what training cost where the wall clock is shared
               "train_cpu_s": manifest["build"].get("cpu_seconds_train"),
               "build_seconds_manifest": manifest["build"]["seconds"], "stages": stages,
               "n_trees": len(manifest["trees"]),
               "ensemble_mb_per_tree": sum(f.stat().st_size for f in bundle.glob(
                   "ensemble.*.npy")) / 2**20 / len(manifest["trees"]),
               # the search's feature lookup, stored beside the trees (apart: an index of
               # the ensemble's arrays, its bitmaps sized by a build parameter)
               "lookup_mb_per_tree": sum(f.stat().st_size for f in bundle.glob(
                   "search.*.npy")) / 2**20 / len(manifest["trees"])},
    )
    predictor.close()
    # The bundle is large on big corpora and reproducible from the seed: keep only figures
    # (unless a caller measures it further, as benchmarks.scale serves it).
    if not os.environ.get("XMC_BENCH_KEEP_BUNDLE"):
        shutil.rmtree(bundle, ignore_errors=True)


if __name__ == "__main__":
    main()
