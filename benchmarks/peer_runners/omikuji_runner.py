"""omikuji on the shared features: ``--variant parabel`` (its defaults) or ``bonsai``.

Bonsai-like settings are the ones omikuji's README gives: ``cluster_balanced=False,
cluster_k=100, max_depth=3``; everything else stays at its default (3 trees, beam 10 by
default at predict time, which we pass explicitly).

omikuji's Python API trains only from a file in the XC repository format, so the runner
writes one from the shared matrices first (untimed); the training time therefore includes
omikuji parsing that file, which is how its users train. Its API predicts one document per
call; the batch figure runs those calls from ``--threads`` Python threads (cffi releases the
GIL during the call), which is how one would serve a batch with it.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import numpy as np
import scipy.sparse as sp

BONSAI = {"cluster_balanced": False, "cluster_k": 100, "max_depth": 3}


def write_xc(path: Path, X: sp.csr_matrix, Y: sp.csr_matrix) -> None:
    """XC repository format. A document without labels keeps an empty label field (the line
    starts with a space), as the format allows; one without features ends after its labels."""
    with path.open("w") as fh:
        fh.write(f"{X.shape[0]} {X.shape[1]} {Y.shape[1]}\n")
        for i in range(X.shape[0]):
            labs = ",".join(str(j) for j in Y.indices[Y.indptr[i]:Y.indptr[i + 1]])
            lo, hi = X.indptr[i], X.indptr[i + 1]
            feats = " ".join(f"{j}:{v:.6g}" for j, v in zip(X.indices[lo:hi], X.data[lo:hi]))
            # omikuji rejects a trailing space, i.e. a document with no feature at all
            fh.write(f"{labs} {feats}\n" if feats else f"{labs}\n")


def row_pairs(X: sp.csr_matrix) -> list[list[tuple[int, float]]]:
    return [
        list(zip(X.indices[X.indptr[i]:X.indptr[i + 1]].tolist(),
                 X.data[X.indptr[i]:X.indptr[i + 1]].tolist()))
        for i in range(X.shape[0])
    ]


def main() -> None:
    args = harness.parse_args(
        __doc__ or "",
        lambda ap: ap.add_argument("--variant", choices=["parabel", "bonsai"], default="parabel"),
    )
    import omikuji

    X, Y, X_test = harness.load_features(args.feature_dir)
    train_file = args.out_dir / "train.xc.txt"
    write_xc(train_file, X, Y)
    del X, Y

    hp = omikuji.Model.default_hyper_param()
    if args.variant == "bonsai":
        for key, value in BONSAI.items():
            setattr(hp, key, value)
    t0 = time.perf_counter()
    model = omikuji.Model.train_on_data(str(train_file), hp, n_threads=args.threads)
    train_s = time.perf_counter() - t0
    train_file.unlink()

    model_dir = args.out_dir / "model"
    model.save(str(model_dir))
    model.init_prediction_thread_pool(args.threads)

    docs = row_pairs(X_test)

    def predict_one(pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
        return model.predict(pairs, beam_size=args.beam, top_k=args.top_k)

    t0 = time.perf_counter()
    if args.threads > 1:
        with ThreadPoolExecutor(args.threads) as pool:
            preds = list(pool.map(predict_one, docs, chunksize=64))
    else:
        preds = [predict_one(d) for d in docs]
    batch_s = time.perf_counter() - t0
    topk = harness.topk_from_pairs(preds, args.top_k)

    lat_docs = [docs[i] for i in harness.latency_indices(len(docs), args.latency_docs)]
    latency = harness.time_single(predict_one, lat_docs)

    harness.write_result(
        args.out_dir,
        peer=f"omikuji-{args.variant}",
        version=omikuji.__version__,
        params={"variant": args.variant, "n_trees": hp.n_trees, "cluster_k": hp.cluster_k,
                "cluster_balanced": bool(hp.cluster_balanced), "max_depth": hp.max_depth,
                "beam_size": args.beam, "top_k": args.top_k},
        train_s=train_s,
        model_mb=harness.dir_size_mb(model_dir),
        latency=latency,
        batch_docs_per_s=X_test.shape[0] / batch_s,
        topk=np.asarray(topk),
        notes=["train includes omikuji parsing its XC-format training file",
               "batch = one-document calls from --threads Python threads"],
    )


if __name__ == "__main__":
    main()
