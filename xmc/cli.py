"""``xmc``: build, evaluate, query and serve extreme multi-label classification bundles.

    xmc synth   --labels 5000 --train 20000 --test 5000 --seed 0 --out data/synth [--format xc]
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
    b.add_argument("train", metavar="TRAIN",
                   help="training data (.jsonl, Annif .tsv or XC .txt)")
    b.add_argument("--out", required=True, help="bundle folder to write")
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
    b.add_argument("--dense-encoder", metavar="minilm|minilm-static|PATH",
                   help="fuse a dense sentence encoder: 'minilm' (packaged MiniLM, exported "
                   "to ONNX at build time; needs the [export] extra), 'minilm-static' (MiniLM "
                   "distilled into static token embeddings at build time: no network at "
                   "serving time; needs the [export] extra) or PATH/model.onnx with "
                   "tokenizer.json beside it")
    b.add_argument("--dense-weight", type=_dense_weight, metavar="ALPHA|auto",
                   help="weight of the dense block in [tfidf ; alpha * dense]; 'auto' (the "
                   "default) chooses it by P@1 on a validation split carved from TRAIN, and "
                   "builds TF-IDF only when that wins")
    b.add_argument("--fine-tune", type=float, metavar="EPOCHS", dest="fine_tune_epochs",
                   help="fine-tune the packaged MiniLM (--dense-encoder minilm) on TRAIN's "
                   "labels for EPOCHS passes before it embeds anything (the documents of the "
                   "validation split excepted); needs the [export] extra")
    b.add_argument("--int8", action="store_true", help="quantize the dense encoder to int8")
    b.add_argument("--knn", action="store_true",
                   help="add a kNN matcher: the training documents nearest a text by its "
                   "dense embedding (usearch index) vote for their labels, joined to the "
                   "trees' scores with a weight chosen on a validation split carved from "
                   "TRAIN (0: no kNN part); needs --dense-encoder")
    b.add_argument("--tune-threshold", action="store_true",
                   help="tune a global score threshold for micro-F1 on a validation split "
                   "carved from TRAIN (a model trained on the rest; about doubles the build "
                   "time); requests use it with threshold 'auto'")
    b.add_argument("--calibrate", action="store_true",
                   help="fit an isotonic map score -> probability that the label is right on "
                   "the same held-out predictions; served scores are then calibrated")
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
                   help="print the default build parameters (with --params, that file's) as "
                   "JSON and exit; needs no TRAIN or --out")

    e = sub.add_parser("eval", help="accuracy and speed of a bundle on a test set",
                       description="P@1/3/5, nDCG@1/3/5, PSP@1/3/5, recall@5, coverage@5, batch "
                       "docs/s and single-document latency (encoding included).")
    e.add_argument("bundle", help="bundle folder (what xmc build wrote)")
    e.add_argument("test", help="labelled test data (.jsonl, Annif .tsv or XC .txt)")
    e.add_argument("--top-k", type=_positive_int,
                   help="labels scored per document (default: the bundle's top_k)")
    e.add_argument("--beam-size", type=_positive_int,
                   help="search beam width (default: the bundle's beam_size)")
    e.add_argument("--label-field", default="labels",
                   help="JSONL field holding the labels (default: labels)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table")

    q = sub.add_parser("predict", help="top-k labels for texts (arguments or stdin lines)",
                       description="Prints one JSON object per text: "
                       '{"labels": [{"label", "score"}, ...], "model": {"name", "version"}}; '
                       'with --explain each label also has "explanation": [{"term", '
                       '"contribution"}, ...].')
    q.add_argument("bundle", help="bundle folder (what xmc build wrote)")
    q.add_argument("texts", nargs="*", help="texts; without any, one text per stdin line")
    q.add_argument("--top-k", type=_positive_int,
                   help="labels to return (default: the bundle's top_k)")
    q.add_argument("--beam-size", type=_positive_int,
                   help="search beam width (default: the bundle's beam_size)")
    q.add_argument("--include", action="append", metavar="LABEL|PREFIX*",
                   help="return only these labels (repeatable; a trailing * matches a prefix)")
    q.add_argument("--exclude", action="append", metavar="LABEL|PREFIX*",
                   help="never return these labels (repeatable; wins over --include)")
    q.add_argument("--threshold", type=_threshold, metavar="SCORE|auto",
                   help="drop labels scoring below SCORE, or below the threshold tuned at "
                   "build ('auto')")
    q.add_argument("--min-score", type=float, help="drop labels scoring below this (with "
                   "--threshold, the larger applies)")
    q.add_argument("--explain", action="store_true",
                   help="add to each label the 5 input terms that pushed it up most")

    s = sub.add_parser("synth", help="write a synthetic XMC corpus (train.jsonl, test.jsonl)",
                       description="A hidden label hierarchy, Zipfian label frequencies with a "
                       "long tail, 1-10 labels a document; seeded. --format xc writes the same "
                       "documents as TF-IDF rows (train.txt, test.txt), no text.")
    s.add_argument("--labels", type=int, default=5000, help="labels (default 5000)")
    s.add_argument("--train", type=int, default=20000,
                   help="training documents (default 20000)")
    s.add_argument("--test", type=int, default=5000, help="test documents (default 5000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--out", required=True, help="folder to write the files into")
    s.add_argument("--format", choices=("jsonl", "xc"), default="jsonl",
                   help="jsonl: text documents; xc: Extreme Classification Repository feature "
                   "files (sublinear TF-IDF of word unigrams, idf from train, l2 rows)")
    s.add_argument("--min-df", type=int,
                   help="xc only: a word is a feature when in >= this many training documents "
                   "(default 2)")
    s.add_argument("--max-features", type=int,
                   help="xc only: keep the words of highest document frequency (default: all)")

    v = sub.add_parser("serve", help="serve a bundle or a model repository over HTTP")
    try:
        from service.cli import add_serve_arguments

        add_serve_arguments(v)
    except ImportError:  # a models-only install: serve is unavailable, the rest works
        v.add_argument("bundle")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest = [a for a in argv if a not in ("-v", "--verbose")]
        if rest[:1] == ["build"] and "--print-default-params" in rest:
            return _print_params(rest[1:])  # before parsing: TRAIN and --out are not needed
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
    except BrokenPipeError:  # `xmc predict ... | head`: the reader left; not an error of ours
        # the interpreter would flush stdout again at exit and fail on the same pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _print_params(argv: list[str]) -> int:
    from models.params import BuildParams

    p = argparse.ArgumentParser(prog="xmc build")
    p.add_argument("--params")
    known, _ = p.parse_known_args(argv)
    try:
        params = BuildParams.from_file(known.params) if known.params else BuildParams()
    except XMCError as exc:
        print(f"xmc build: error: {exc}", file=sys.stderr)
        return 2
    print(params.to_json())
    return 0


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


def _threshold(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'auto'") from None


def _build(args: argparse.Namespace) -> int:
    from models.params import BuildParams

    params = BuildParams.from_file(args.params) if args.params else BuildParams()
    for flag, attr in (("seed", "seed"), ("n_trees", "n_trees"), ("threads", "threads"),
                       ("dense_encoder", "dense_encoder"), ("dense_weight", "dense_weight"),
                       ("fine_tune_epochs", "fine_tune_epochs")):
        value = getattr(args, flag)
        if value is not None:
            setattr(params, attr, value)
    for flag in ("int8", "tune_threshold", "calibrate", "knn"):
        if getattr(args, flag):
            setattr(params, flag, True)
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
          f"{result['n_docs']} documents, top_k={result['top_k']}, "
          f"beam_size={result['beam_size']}")
    for key in ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5",
                "recall@5", "coverage"):
        if key in result:
            print(f"  {key:<9} {100 * result[key]:6.2f}")
    if "micro_f1" in result:
        print(f"  micro-F1  {100 * result['micro_f1']:6.2f} at the tuned threshold "
              f"{result['threshold']:.4f} (precision {100 * result['micro_precision']:.2f}, "
              f"recall {100 * result['micro_recall']:.2f})")
    ece = f"  ECE       {100 * result['ece_raw']:6.2f} (top-5 pairs, 15 bins)"
    if "ece_calibrated" in result:
        ece += f"; calibrated {100 * result['ece_calibrated']:.2f}"
    print(ece)
    source = "encoding included" if test.is_text else "from feature rows"
    print(f"  batch     {result['batch_docs_per_s']:,.0f} docs/s (batches of 256, {source})")
    print(f"  latency   p50 {result['latency_ms_p50']:.3f} ms, p99 {result['latency_ms_p99']:.3f}"
          f" ms (one document, {source})")
    if result.get("n_docs_without_labels"):
        print(f"  ({result['n_docs_without_labels']} documents without labels left out)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import models
    from models.vocab import describe

    blank = [i for i, text in enumerate(args.texts, start=1) if not text.strip()]
    if blank:  # as over HTTP, where an empty text is a 422: nothing is predicted
        print(f"xmc predict: error: text argument {blank[0]} is empty", file=sys.stderr)
        return 2
    predictor = models.load_bundle(args.bundle)
    model = {"name": predictor.name, "version": predictor.version}
    texts = args.texts or (line.rstrip("\n") for line in sys.stdin)
    label_filter = {k: v for k, v in (("include", args.include), ("exclude", args.exclude))
                    if v is not None}
    for line_no, text in enumerate(texts, start=1):
        if not text.strip():
            print(f"xmc predict: error: stdin line {line_no} is empty", file=sys.stderr)
            return 2
        ranked = predictor.predict([text], top_k=args.top_k, beam_size=args.beam_size,
                                   label_filter=label_filter, threshold=args.threshold,
                                   min_score=args.min_score, explain=args.explain)[0]
        labels = [describe(r[0], round(r[1], 6), predictor.label_info) for r in ranked]
        for entry, r in zip(labels, ranked):
            if len(r) == 3:  # asked for with --explain
                entry["explanation"] = [{"term": x["term"],
                                         "contribution": round(x["contribution"], 6)}
                                        for x in r[2]]
        print(json.dumps({"labels": labels, "model": model}, ensure_ascii=False), flush=True)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from models.synth import SynthParams, write_corpus, write_xc

    params = SynthParams(n_labels=args.labels, n_train=args.train, n_test=args.test,
                         seed=args.seed)
    if args.format == "xc":
        feature_knobs = {"min_df": args.min_df, "max_features": args.max_features}
        stats = write_xc(args.out, params,
                         **{k: v for k, v in feature_knobs.items() if v is not None})
    elif args.min_df is not None or args.max_features is not None:
        print("xmc synth: error: --min-df and --max-features apply to --format xc only "
              "(text documents are featurized by xmc build)", file=sys.stderr)
        return 2
    else:
        stats = write_corpus(args.out, params)
    print(json.dumps(stats))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.cli import serve_command

    return serve_command(args)


COMMANDS = {"build": _build, "eval": _eval, "predict": _predict, "synth": _synth,
            "serve": _serve}

if __name__ == "__main__":
    sys.exit(main())
