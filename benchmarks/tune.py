"""Compare build-parameter variants on a validation split carved from the training set.

    python -m benchmarks.tune DATA_DIR [--variants '{"n_trees": 1}' '{"n_trees": 3}' ...]
        [--valid-share 0.15] [--seeds 0 1 2]

The test set is never read: a seeded ``valid_share`` of train is held out, each variant is
built on the rest and scored on it. Prints P@1/3/5, PSP@5, training seconds (wall and CPU,
features excluded) and model size per variant, mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import models
from models.builder import build
from models.data import Corpus, read_corpus, validation_rows
from models.evaluate import evaluate_predictor
from models.params import BuildParams

DEFAULT_VARIANTS = [
    '{"n_trees": 1}',
    '{"n_trees": 2}',
    '{"n_trees": 3}',
]


def split(corpus: Corpus, share: float, seed: int) -> tuple[Corpus, Corpus]:
    fit_rows, valid_rows = validation_rows(corpus.n_docs, share, seed)
    return corpus.subset(fit_rows), corpus.subset(valid_rows)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def train_file(data_dir: Path) -> Path:
    for name in ("train.jsonl", "train.txt"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise SystemExit(f"{data_dir}: no train.jsonl or train.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    ap.add_argument("--valid-share", type=float, default=0.15)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--label-field", default="labels")
    ap.add_argument("--json", type=Path, help="append one line per variant and seed here")
    args = ap.parse_args()
    corpus = read_corpus(train_file(args.data_dir), label_field=args.label_field)
    base = BuildParams().to_dict()
    print(f"{args.data_dir.name}: {corpus.n_docs} train docs, validation share "
          f"{args.valid_share}, seeds {args.seeds}")
    print("| variant | P@1 | P@3 | P@5 | (P@1+P@5)/2 ± sd | PSP@5 | train s (wall) "
          "| train s (CPU) | MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        rows = []
        for seed in args.seeds:
            fit, valid = split(corpus, args.valid_share, seed)
            params = BuildParams.from_dict(merge(base, json.loads(variant)))
            params.seed = seed
            with tempfile.TemporaryDirectory() as tmp:
                out = build(fit, Path(tmp) / "b", params)
                manifest = json.loads((out / "manifest.json").read_text())
                stages = manifest["build"]["stages"]
                wall = sum(v["seconds"] for k, v in stages.items() if k.startswith(
                    ("cluster", "train", "pifa")))
                mb = sum(f.stat().st_size for f in out.iterdir()) / 2**20
                predictor = models.load_bundle(out)
                m = evaluate_predictor(predictor, valid, measure_speed=False)
                rows.append((m["P@1"], m["P@3"], m["P@5"], m["PSP@5"], wall,
                             manifest["build"].get("cpu_seconds_train", float("nan")), mb))
                if args.json:
                    with args.json.open("a") as fh:
                        fh.write(json.dumps({"data": args.data_dir.name, "variant": variant,
                                             "seed": seed, **{k: m[k] for k in (
                                                 "P@1", "P@3", "P@5", "PSP@5")},
                                             "train_s": wall, "train_cpu_s": rows[-1][5],
                                             "mb": mb}) + "\n")
        r = np.mean(rows, axis=0)
        both = 100 * (np.array([x[0] for x in rows]) + np.array([x[2] for x in rows])) / 2
        print(f"| `{variant}` | {100 * r[0]:.2f} | {100 * r[1]:.2f} | {100 * r[2]:.2f} | "
              f"{both.mean():.2f} ± {both.std():.2f} | {100 * r[3]:.2f} | {r[4]:.2f} | "
              f"{r[5]:.2f} | {r[6]:.1f} |", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f}s)")
