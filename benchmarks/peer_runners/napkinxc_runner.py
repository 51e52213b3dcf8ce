"""napkinXC PLT on the shared features, every option at its default.

Its defaults include exact top-k tree search (``tree_search_type='exact'``): PLT's search is
exact, so it has no beam to set to 10 and returns at least the beam's accuracy. Threads and
seed are the only arguments passed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness


def main() -> None:
    args = harness.parse_args(__doc__ or "")
    from importlib.metadata import version

    from napkinxc.models import PLT

    X, Y, X_test = harness.load_features(args.feature_dir)
    # napkinXC writes the model into this folder while training.
    model_dir = args.out_dir / "model"
    model = PLT(str(model_dir), threads=args.threads, seed=args.seed)
    t0 = time.perf_counter()
    model.fit(X, Y)
    train_s = time.perf_counter() - t0
    del X, Y

    t0 = time.perf_counter()
    preds = model.predict_proba(X_test, top_k=args.top_k)
    batch_s = time.perf_counter() - t0
    topk = harness.topk_from_pairs(preds, args.top_k)

    rows = [X_test[i] for i in harness.latency_indices(X_test.shape[0], args.latency_docs)]
    latency = harness.time_single(lambda x: model.predict_proba(x, top_k=args.top_k), rows)

    params = model.get_params()
    harness.write_result(
        args.out_dir,
        peer="napkinxc",
        version=version("napkinxc"),
        params={k: params.get(k) for k in ("tree_type", "arity", "max_leaves", "loss",
                                           "tree_search_type", "ensemble")} | {"top_k": args.top_k},
        train_s=train_s,
        model_mb=harness.dir_size_mb(model_dir),
        latency=latency,
        batch_docs_per_s=X_test.shape[0] / batch_s,
        topk=topk,
        notes=["exact top-k search (its default), no beam"],
    )


if __name__ == "__main__":
    main()
