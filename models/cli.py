"""``xmc``: build, evaluate, query and serve extreme multi-label classification bundles.

    xmc synth   --labels 5000 --train 20000 --test 5000 --seed 0 --out data/synth
    xmc build   data/synth/train.jsonl --out artifacts/synth --test data/synth/test.jsonl
    xmc eval    artifacts/synth data/synth/test.jsonl
    xmc predict artifacts/synth "a document to tag"
    xmc serve   artifacts/synth --port 8000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from models.errors import XMCError

EPILOG = """Typical session:
  xmc synth --labels 5000 --train 20000 --test 5000 --seed 0 --out data/synth
  xmc build data/synth/train.jsonl --out artifacts/synth --test data/synth/test.jsonl
  xmc eval artifacts/synth data/synth/test.jsonl
  xmc predict artifacts/synth "some text to tag"
  xmc serve artifacts/synth

Input files: .jsonl with one {"text": ..., "labels": [...]} object a line, Annif's short-text
corpus (.tsv or .tsv.gz: text, a tab, then <uri> or label subjects separated by spaces), or an
Extreme Classification Repository feature file (.txt; header 'n_docs n_features n_labels')."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xmc", description="Extreme multi-label text classification: build a model "
        "bundle from labelled documents, evaluate it, and serve top-k label predictions.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="train a bundle from labelled documents",
                       description="Fit the encoder, cluster the labels into an ensemble of "
                       "trees, train a ranker per node and write a bundle folder.")
    b.add_argument("train", nargs="?", help="training data (.jsonl, Annif .tsv or XC .txt)")
    b.add_argument("--out", help="bundle folder to write")
    b.add_argument("--params", help="JSON file of build parameters (see --print-default-params)")
    b.add_argument("--test", help="test set: its metrics are stored in the manifest")
    b.add_argument("--seed", type=int, help="random seed (overrides --params)")
    b.add_argument("--name", help="model name in the manifest (default: the folder name)")
    b.add_argument("--label-field", default="labels", help="JSONL field holding the labels")
    b.add_argument("--force", action="store_true", help="replace an existing --out folder")
    b.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed input lines (their count is reported) instead of failing")
    b.add_argument("--n-trees", type=int, help="trees in the ensemble (overrides --params)")
    b.add_argument("--threads", type=int, help="training threads, 0 = all cores")
    b.add_argument("--dask", metavar="ADDRESS",
                   help="train the trees on the Dask cluster whose scheduler is at ADDRESS "
                   "(e.g. tcp://scheduler:8786; default: $XMC_DASK, else local cores; needs "
                   "the [build] extra); the bundle is the same, see docs/dask.md")
    b.add_argument("--dense-encoder", metavar="minilm|PATH",
                   help="fuse a dense ONNX sentence encoder: 'minilm' (packaged MiniLM, exported "
                   "at build time; needs the [export] extra) or PATH/model.onnx with "
                   "tokenizer.json beside it")
    b.add_argument("--dense-weight", type=_dense_weight, metavar="ALPHA|auto",
                   help="weight of the dense block in [tfidf ; alpha * dense]; 'auto' (the "
                   "default) chooses it by P@1 on a validation split carved from TRAIN, and "
                   "builds TF-IDF only when that wins")
    b.add_argument("--int8", action="store_true", help="quantize the dense encoder to int8")
    b.add_argument("--extra-train", action="append", default=[], metavar="FILE",
                   help="more training documents, after TRAIN (e.g. a learn feedback log, "
                   "XMC_FEEDBACK_DIR/NAME.jsonl); repeatable")
    b.add_argument("--vocab", metavar="FILE",
                   help="subject vocabulary (Annif's .tsv, .csv or SKOS .ttl): labels that "
                   "are a subject's URI or label become its URI, and the bundle answers uri, "
                   "label and notation")
    b.add_argument("--vocab-language", metavar="LANG",
                   help="label language of a CSV or SKOS vocabulary (default: the first "
                   "label_xx column; in SKOS the most common language)")
    b.add_argument("--print-default-params", action="store_true",
                   help="print the default build parameters as JSON and exit")

    e = sub.add_parser("eval", help="accuracy and speed of a bundle on a test set",
                       description="P@1/3/5, nDCG@1/3/5, PSP@1/3/5, recall@5, coverage@5, batch "
                       "docs/s and single-document latency (encoding included).")
    e.add_argument("bundle")
    e.add_argument("test", help="test data (.jsonl or XC .txt)")
    e.add_argument("--top-k", type=int, default=5)
    e.add_argument("--beam-size", type=int, default=10)
    e.add_argument("--label-field", default="labels")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    q = sub.add_parser("predict", help="top-k labels for texts (arguments or stdin lines)",
                       description="Prints one JSON object per text: "
                       '{"labels": [{"label", "score"}, ...], "model": {"name", "version"}}.')
    q.add_argument("bundle")
    q.add_argument("texts", nargs="*", help="texts; without any, one text per stdin line")
    q.add_argument("--top-k", type=int)
    q.add_argument("--beam-size", type=int)

    s = sub.add_parser("synth", help="write a synthetic XMC corpus (train.jsonl, test.jsonl)",
                       description="A hidden label hierarchy, Zipfian label frequencies with a "
                       "long tail, 1-10 labels a document; seeded.")
    s.add_argument("--labels", type=int, default=5000)
    s.add_argument("--train", type=int, default=20000)
    s.add_argument("--test", type=int, default=5000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)

    v = sub.add_parser("serve", help="serve a bundle or a model repository over HTTP")
    try:
        from service.cli import add_serve_arguments

        add_serve_arguments(v)
    except ImportError:  # a models-only install: serve is unavailable, the rest works
        v.add_argument("bundle")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except XMCError as exc:
        print(f"xmc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dense_weight(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        alpha = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'auto'") from None
    if not alpha > 0:
        raise argparse.ArgumentTypeError("must be > 0 (leave out --dense-encoder for none)")
    return alpha


def _build(args: argparse.Namespace) -> int:
    from models.params import BuildParams

    params = BuildParams.from_file(args.params) if args.params else BuildParams()
    if args.print_default_params:
        print(BuildParams().to_json() if not args.params else params.to_json())
        return 0
    if not args.train or not args.out:
        print("xmc build: error: TRAIN and --out are required", file=sys.stderr)
        return 2
    for flag, attr in (("seed", "seed"), ("n_trees", "n_trees"), ("threads", "threads"),
                       ("dense_encoder", "dense_encoder"), ("dense_weight", "dense_weight")):
        value = getattr(args, flag)
        if value is not None:
            setattr(params, attr, value)
    if args.int8:
        params.int8 = True
    logging.getLogger("models").setLevel(logging.INFO)
    from models.builder import build
    from models.data import concat_corpora, read_corpus
    from models.engine import open_engine
    from models.vocab import read_vocab

    # the flag wins over the environment; the engine connects before the data is read, so
    # that a wrong address fails fast
    with contextlib.closing(open_engine(args.dask or os.environ.get("XMC_DASK"))) as engine:
        vocab = read_vocab(args.vocab, args.vocab_language) if args.vocab else None
        train = read_corpus(args.train, label_field=args.label_field,
                            skip_bad_lines=args.skip_bad_lines)
        if args.extra_train:
            train = concat_corpora([train, *(
                read_corpus(f, label_field=args.label_field, skip_bad_lines=args.skip_bad_lines)
                for f in args.extra_train)])
        if train.n_skipped:
            print(f"skipped {train.n_skipped} malformed line(s) in {train.source}",
                  file=sys.stderr)
        test = None
        if args.test:
            test = read_corpus(args.test, label_field=args.label_field,
                               skip_bad_lines=args.skip_bad_lines)
        out = build(train, args.out, params, test=test, name=args.name, force=args.force,
                    engine=engine, vocab=vocab)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    summary = {k: manifest[k] for k in ("name", "version", "n_labels", "n_features")}
    summary["build_seconds"] = manifest["build"]["seconds"]
    summary["skipped_lines"] = train.n_skipped
    if manifest.get("metrics"):
        summary["metrics"] = manifest["metrics"]
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import models
    from models.data import read_corpus
    from models.evaluate import evaluate_predictor

    predictor = models.load_bundle(args.bundle)
    test = read_corpus(args.test, label_field=args.label_field)
    result = evaluate_predictor(predictor, test, top_k=args.top_k, beam_size=args.beam_size)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{predictor.name} (version {predictor.version}) on {args.test}: "
          f"{result['n_docs']} documents, top_k={args.top_k}, beam_size={args.beam_size}")
    for key in ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5",
                "recall@5", "coverage"):
        if key in result:
            print(f"  {key:<9} {100 * result[key]:6.2f}")
    print(f"  batch     {result['batch_docs_per_s']:,.0f} docs/s (batches of 256, encoding "
          "included)")
    print(f"  latency   p50 {result['latency_ms_p50']:.3f} ms, p99 {result['latency_ms_p99']:.3f}"
          " ms (one document, encoding included)")
    if result.get("n_docs_without_labels"):
        print(f"  ({result['n_docs_without_labels']} documents without labels left out)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import models
    from models.vocab import describe

    predictor = models.load_bundle(args.bundle)
    model = {"name": predictor.name, "version": predictor.version}
    texts = args.texts or (line.rstrip("\n") for line in sys.stdin)
    for text in texts:
        ranked = predictor.predict([text], top_k=args.top_k, beam_size=args.beam_size)[0]
        print(json.dumps({"labels": [describe(lab, round(score, 6), predictor.label_info)
                                     for lab, score in ranked], "model": model},
                         ensure_ascii=False), flush=True)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from models.synth import SynthParams, write_corpus

    stats = write_corpus(args.out, SynthParams(n_labels=args.labels, n_train=args.train,
                                               n_test=args.test, seed=args.seed))
    print(json.dumps(stats))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.cli import serve_command

    return serve_command(args)


COMMANDS = {"build": _build, "eval": _eval, "predict": _predict, "synth": _synth,
            "serve": _serve}

if __name__ == "__main__":
    sys.exit(main())
