"""Speed, memory and int8 accuracy of the ONNX dense encoder (all-MiniLM-L6-v2).

Usage: ``HF_HUB_OFFLINE=1 python -m benchmarks.encoders [--data DIR] [--out DIR]`` (needs the
``[export]`` extra for the export step; ``--out`` keeps the exported models, and reuses them on
the next run when they are there). It exports MiniLM to ONNX (fp32, and int8 per-channel),
then, with the serving class :class:`models.dense.OnnxTextEncoder`:

* single-document ``encode([doc])`` latency p50 / p99 (ms) over 150 10-word cooking titles
  and 40 150-word reuters articles (first 150 words of longer ones), at 1 and 2 intra-op
  threads; each document's time is its best of three calls, so that other processes on a
  shared machine do not decide the tail (the same rule as benchmarks/tfidf_speed.py);
* the title p50 at 2 threads with onnxruntime's thread spinning off (the default) and on;
* batch throughput (docs/s) for calls of 32 titles over 640 titles, each call's time being
  its best of three, and docs per CPU-second of the process (contention-proof);
* model file size (MB), and resident memory (MB) of the encoder in a fresh process: growth
  after the session is created, and the peak growth while encoding 64 full reuters articles
  (256 tokens each) with the defaults (arena on, sub-batches of at most 4096 tokens), with the
  CPU memory arena off, and with no token budget (sub-batches of 32 × 256 tokens);
* cosine of int8 to fp32 embeddings (min / mean) on cooking titles and reuters articles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models.data import read_corpus
from models.dense import OnnxTextEncoder

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TITLE_WORDS = 10
ARTICLE_WORDS = 150
N_TITLES = 150  # titles timed per configuration
N_ARTICLES = 40  # articles timed per configuration (each ~15x a title)
PASSES = 3
# Memory variants measured in a child process: (label, memory_arena, max_batch_tokens).
RSS_VARIANTS = (("default", True, 4096), ("arena off", False, 4096), ("no budget", True, 10**6))


def _percentiles_ms(encoder: OnnxTextEncoder, texts: Sequence[str]) -> tuple[float, float]:
    """p50 and p99 over ``texts`` of each one's best ``encode([text])`` time of PASSES, in ms."""
    for text in texts[:10]:  # warm-up: first runs allocate the arena and thread pool
        encoder.encode([text])
    times = np.empty((PASSES, len(texts)))
    for p in range(PASSES):
        for i, text in enumerate(texts):
            t0 = time.perf_counter()
            encoder.encode([text])
            times[p, i] = time.perf_counter() - t0
    ms = times.min(axis=0) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _batch_docs_per_s(
    encoder: OnnxTextEncoder, texts: Sequence[str], batch: int
) -> tuple[float, float]:
    """Docs/s and docs per CPU-second over ``texts`` in calls of ``batch`` documents.

    Each call's wall time is its best of PASSES (as for latency: a whole pass of several
    seconds on a shared machine always catches other processes' bursts, one call often does
    not); CPU time (all threads of this process) is immune to contention, and with thread
    spinning off it counts only work.
    """
    encoder.encode(texts[:batch])
    wall = cpu = 0.0
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        best = float("inf")
        for _ in range(PASSES):
            t0, c0 = time.perf_counter(), time.process_time()
            encoder.encode(chunk)
            best = min(best, time.perf_counter() - t0)
            cpu += time.process_time() - c0
        wall += best
    return len(texts) / wall, len(texts) * PASSES / cpu


def _spinning_ab(model: Path, tokenizer: Path, texts: Sequence[str]) -> tuple[float, float]:
    """Title p50 (ms, best of PASSES per text) at 2 threads with spinning off and on, the two
    sessions called alternately so that both see the same load from other processes."""
    encoders = [
        OnnxTextEncoder(model, tokenizer, intra_op_threads=2, allow_spinning=spin)
        for spin in (False, True)
    ]
    best = np.full((2, len(texts)), np.inf)
    for enc in encoders:
        enc.encode(texts[:10])
    for _ in range(PASSES):
        for i, text in enumerate(texts):
            for k, enc in enumerate(encoders):
                t0 = time.perf_counter()
                enc.encode([text])
                best[k, i] = min(best[k, i], time.perf_counter() - t0)
    p50 = np.percentile(best * 1e3, 50, axis=1)
    return float(p50[0]), float(p50[1])


def _rss_mb() -> tuple[float, float]:
    """Current and peak resident set size of this process, in MB (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _rss_child(model: str, tokenizer: str, arena: bool, budget: int, texts_file: str) -> None:
    """Run in a fresh process: print the encoder's memory as JSON (see :func:`_measure_rss`)."""
    texts = json.loads(Path(texts_file).read_text())
    base, _ = _rss_mb()
    enc = OnnxTextEncoder(
        Path(model),
        Path(tokenizer),
        intra_op_threads=2,
        batch_size=32,
        max_batch_tokens=budget,
        memory_arena=arena,
    )
    enc.encode(["warm up"])
    loaded, _ = _rss_mb()
    enc.encode(texts)
    after, peak = _rss_mb()
    print(
        json.dumps({"session_mb": loaded - base, "peak_mb": peak - base, "after_mb": after - base})
    )


def _measure_rss(
    model: Path, tokenizer: Path, arena: bool, budget: int, texts: Sequence[str]
) -> dict:
    """Memory of one encoder in a fresh interpreter, so that nothing else here is counted:
    growth of RSS over the bare imports after creating the session, and the peak growth
    while encoding ``texts`` in sub-batches of 32."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(list(texts), fh)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.encoders", "--rss-child", str(model),
             str(tokenizer), "1" if arena else "0", str(budget), fh.name],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
    finally:
        os.unlink(fh.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _export(out: Path) -> dict:
    """Export fp32 + int8 into ``out`` unless a previous run left them there."""
    fp32, int8, tok = out / "model.onnx", out / "model.int8.onnx", out / "tokenizer.json"
    if fp32.is_file() and int8.is_file() and tok.is_file():
        return {"fp32": fp32, "int8": int8, "tokenizer": tok, "export_s": None}
    from models.export import export_minilm

    result = export_minilm(out, int8=True)
    return {"fp32": fp32, "int8": int8, "tokenizer": tok, "export_s": result["seconds"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=None, help="keep the exported models here")
    parser.add_argument("--rss-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        model, tokenizer, arena, budget, texts_file = args.rss_child
        _rss_child(model, tokenizer, arena == "1", int(budget), texts_file)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cooking = read_corpus(args.data / "cooking_stackexchange" / "test.jsonl").texts or []
    reuters = read_corpus(args.data / "reuters21578_modapte" / "test.jsonl").texts or []
    titles = [t for t in cooking if len(t.split()) == TITLE_WORDS][:N_TITLES]
    articles = [
        " ".join(t.split()[:ARTICLE_WORDS]) for t in reuters if len(t.split()) >= ARTICLE_WORDS
    ][:N_ARTICLES]
    long_articles = [t for t in reuters if len(t.split()) >= 300][:64]
    batch_titles = cooking[:640]

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = args.out if args.out is not None else Path(tmp.name)  # type: ignore[union-attr]
    paths = _export(out)
    tok = paths["tokenizer"]

    print(f"# machine: {os.cpu_count()} cores ({_cpu_model()}), {platform.python_version()}")
    print(f"# date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    # Other processes on the machine skew thread scaling most: say how busy it was.
    print(f"# load average at start: {os.getloadavg()[0]:.1f}")
    if paths["export_s"] is not None:
        print(f"# export fp32 + parity + int8 + check: {paths['export_s']:.1f} s")
    print(
        f"# {len(titles)} titles of {TITLE_WORDS} words, {len(articles)} articles of "
        f"{ARTICLE_WORDS} words, batches of 32 over {len(batch_titles)} titles"
    )

    rows = []
    for name in ("fp32", "int8"):
        model = paths[name]
        row: dict = {"model": name, "mb": model.stat().st_size / 2**20}
        for threads in (1, 2):
            enc = OnnxTextEncoder(model, tok, intra_op_threads=threads)
            row[f"title_{threads}"] = _percentiles_ms(enc, titles)
            row[f"article_{threads}"] = _percentiles_ms(enc, articles)
            row[f"batch_{threads}"] = _batch_docs_per_s(enc, batch_titles, 32)
        row["rss"] = [_measure_rss(model, tok, a, b, long_articles) for _, a, b in RSS_VARIANTS]
        rows.append(row)
        print(f"# {name} done", flush=True)

    # Thread spinning is off by default (see models/dense.py); show what it would change.
    spinning = {name: _spinning_ab(paths[name], tok, titles) for name in ("fp32", "int8")}
    fp32 = OnnxTextEncoder(paths["fp32"], tok, intra_op_threads=2)
    int8 = OnnxTextEncoder(paths["int8"], tok, intra_op_threads=2)
    cos_titles = _cosines(fp32.encode(cooking[:500]), int8.encode(cooking[:500]))
    cos_articles = _cosines(fp32.encode(reuters[:200]), int8.encode(reuters[:200]))

    print()
    print(
        "| model | MB | title p50 / p99 ms, 1 thr | title p50 / p99 ms, 2 thr "
        "| article p50 / p99 ms, 1 thr | article p50 / p99 ms, 2 thr "
        "| batch-32 titles docs/s, 1 thr / 2 thr | docs/CPU-s, 1 thr / 2 thr | session RSS MB "
        "| peak RSS MB, 64 × 256 tok: default / arena off / no token budget |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            r["model"],
            f"{r['mb']:.0f}",
            *(
                f"{r[f'{kind}_{t}'][0]:.1f} / {r[f'{kind}_{t}'][1]:.1f}"
                for kind in ("title", "article")
                for t in (1, 2)
            ),
            f"{r['batch_1'][0]:.0f} / {r['batch_2'][0]:.0f}",
            f"{r['batch_1'][1]:.0f} / {r['batch_2'][1]:.0f}",
            f"{r['rss'][0]['session_mb']:.0f}",
            " / ".join(f"{m['peak_mb']:.0f}" for m in r["rss"]),
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        f"int8 vs fp32 cosine: titles (n={len(cos_titles)}) min {cos_titles.min():.4f} "
        f"mean {cos_titles.mean():.4f}; articles (n={len(cos_articles)}) "
        f"min {cos_articles.min():.4f} mean {cos_articles.mean():.4f}"
    )
    print(
        "title p50 ms at 2 threads, thread spinning off / on (interleaved): "
        + ", ".join(f"{k} {v[0]:.1f} / {v[1]:.1f}" for k, v in spinning.items())
    )
    print(f"# load average at end: {os.getloadavg()[0]:.1f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
