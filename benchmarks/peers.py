"""Side-by-side benchmark: our model against PECOS XR-Linear, omikuji and napkinXC.

    .venv/bin/python -m benchmarks.peers DATA_DIR [DATA_DIR ...] [--seeds 0 1 2] [--threads N]
        [--only ours,pecos,omikuji-parabel,omikuji-bonsai,napkinxc]

Every library sees identical features (:mod:`benchmarks.features`, written once per dataset)
and runs in a subprocess of its own (``benchmarks/peer_runners/``; PECOS with the python of
``benchmarks/.venv-pecos``, built by ``benchmarks/pecos_env.sh``), so one library's memory
and threads never touch another's figures. Runners leave their top-k label ids and timings
in ``benchmarks/.work/peers/DATASET/PEER/seedN/`` (one run per seed); this module scores all
of them with the one metrics module, :func:`models.metrics.evaluate`, prints a table per
dataset and rewrites the "Peers" section of benchmarks/RESULTS.md from every result in the
work folder (so a later run with ``--only ours`` completes the tables of an earlier
peers-only run).

Nothing is tuned per dataset: every peer runs with its library's defaults (omikuji also
with the Bonsai-like settings of its README), top-5, beam 10, the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.features import FeatureSet, prepare
from models.metrics import evaluate

HERE = Path(__file__).resolve().parent
RUNNERS = HERE / "peer_runners"
WORK_ROOT = HERE / ".work" / "peers"
RESULTS_MD = HERE / "RESULTS.md"
PECOS_PYTHON = HERE / ".venv-pecos" / "bin" / "python"
SECTION = "## Peers: side by side with PECOS XR-Linear, omikuji and napkinXC"

PEERS = ("ours", "pecos", "omikuji-parabel", "omikuji-bonsai", "napkinxc")
PEER_TITLES = {
    "ours": "**xmc-serve (ours)**",
    "pecos": "PECOS XR-Linear",
    "omikuji-parabel": "omikuji (Parabel-like, defaults)",
    "omikuji-bonsai": "omikuji (Bonsai-like)",
    "napkinxc": "napkinXC PLT",
}
ACCURACY_KEYS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")
TIMING_KEYS = ("train_s", "peak_rss_mb", "model_mb", "latency_p50_ms", "latency_p99_ms",
               "batch_docs_per_s")


# ---------------------------------------------------------------- scoring glue


def load_predictions(run_dir: Path, label_names: Sequence[str]) -> list[list[str]]:
    """A runner's top-k as label names, best first.

    Runners write either ``topk.npy`` (column ids into ``labels.json``, -1 = no prediction)
    or ``topk_labels.json`` (names, for a model that speaks label names: ours)."""
    named = run_dir / "topk_labels.json"
    if named.is_file():
        return [[str(lab) for lab in row] for row in json.loads(named.read_text())]
    ids = np.load(run_dir / "topk.npy")
    return ids_to_names(ids, label_names)


def ids_to_names(ids: np.ndarray, label_names: Sequence[str]) -> list[list[str]]:
    """Map a (docs, k) array of column ids to names; negative ids are padding and dropped."""
    n = len(label_names)
    out: list[list[str]] = []
    for row in np.asarray(ids):
        names = []
        for j in row:
            if j < 0:
                continue
            if j >= n:
                raise ValueError(f"label id {j} outside the {n} training labels")
            names.append(label_names[j])
        out.append(names)
    return out


def score(predictions: Sequence[Sequence[str]], truths: Sequence[Sequence[str]],
          label_counts: Mapping[str, int], n_train_docs: int) -> dict[str, float]:
    """The figures of the table, from :func:`models.metrics.evaluate` and nothing else."""
    m = evaluate(predictions, truths, ks=(1, 3, 5), label_counts=label_counts,
                 n_train_docs=n_train_docs)
    return {k: float(m[k]) for k in ACCURACY_KEYS}


def score_run(run_dir: Path, fs: FeatureSet, truths: Sequence[Sequence[str]]) -> dict:
    """Accuracy plus the runner's own timings, written beside them as ``scores.json``."""
    result = json.loads((run_dir / "result.json").read_text())
    preds = load_predictions(run_dir, fs.label_names)
    if len(preds) != len(truths):
        raise ValueError(f"{run_dir}: {len(preds)} predictions for {len(truths)} test docs")
    out = {**result, **score(preds, truths, fs.label_counts, fs.n_train_docs)}
    (run_dir / "scores.json").write_text(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------- running peers


def runner_command(peer: str, fs: FeatureSet, run_dir: Path, args: argparse.Namespace,
                   seed: int) -> list[str]:
    common = [str(fs.feature_dir), str(run_dir), "--threads", str(args.threads),
              "--top-k", str(args.top_k), "--beam", str(args.beam), "--seed", str(seed),
              "--latency-docs", str(args.latency_docs)]
    if peer == "pecos":
        return [str(PECOS_PYTHON), str(RUNNERS / "pecos_runner.py"), *common]
    if peer.startswith("omikuji-"):
        return [sys.executable, str(RUNNERS / "omikuji_runner.py"), *common,
                "--variant", peer.split("-", 1)[1]]
    if peer == "napkinxc":
        return [sys.executable, str(RUNNERS / "napkinxc_runner.py"), *common]
    if peer == "ours":
        n_trees = getattr(args, "n_trees", None)  # only the scale benchmark sets it
        return [sys.executable, str(RUNNERS / "ours_runner.py"), *common,
                "--train", str(fs.train_path), "--test", str(fs.test_path),
                *(["--n-trees", str(n_trees)] if n_trees else [])]
    raise ValueError(f"unknown peer {peer!r}")


def thread_env(threads: int) -> dict[str, str]:
    """Every threading runtime the libraries use gets the same cap."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "RAYON_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    # The runners import the project (ours) from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent),
                                                      env.get("PYTHONPATH", "")]))
    return env


def run_peer(peer: str, fs: FeatureSet, run_dir: Path, args: argparse.Namespace, seed: int,
             command_line: str) -> bool:
    """Run one runner; on failure leave ``failed.json`` (why) instead of ``result.json``."""
    # A fresh folder: libraries that save into an existing one (omikuji) would otherwise
    # leave the previous model's files there and inflate "model MB".
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "command.txt").write_text(command_line + "\n")
    if peer == "pecos" and not PECOS_PYTHON.exists():
        reason = f"{PECOS_PYTHON} missing: run benchmarks/pecos_env.sh"
        (run_dir / "failed.json").write_text(json.dumps({"reason": reason}))
        print(f"  {peer}: skipped ({reason})", flush=True)
        return False
    cmd = runner_command(peer, fs, run_dir, args, seed)
    t0 = time.perf_counter()
    with (run_dir / "log.txt").open("w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  env=thread_env(args.threads), timeout=args.timeout,
                                  check=False)
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {args.timeout} s"
    wall = time.perf_counter() - t0
    if rc != 0 or not (run_dir / "result.json").is_file():
        tail = (run_dir / "log.txt").read_text(errors="replace").splitlines()[-15:]
        (run_dir / "failed.json").write_text(
            json.dumps({"reason": f"runner exit {rc}", "log_tail": tail}, indent=1))
        print(f"  {peer}: FAILED ({rc}); see {run_dir / 'log.txt'}", flush=True)
        return False
    print(f"  {peer}: done in {wall:.1f} s", flush=True)
    return True


def run_dir_of(dataset_dir: Path, peer: str, seed: int) -> Path:
    """Where one run of a peer keeps its result: one folder per seed (``PEER/seedN``)."""
    return dataset_dir / peer / f"seed{seed}"


def run_dirs(dataset_dir: Path, peer: str) -> list[Path]:
    """Result folders of one peer, one per seed it ran with."""
    return sorted(p for p in (dataset_dir / peer).glob("seed*") if p.is_dir())


# ---------------------------------------------------------------- tables


def collect(dataset_dir: Path, fs: FeatureSet) -> dict[str, dict]:
    """Per peer: scored figures (the mean over its runs), or why it is missing."""
    truths = fs.test_truth()
    rows: dict[str, dict] = {}
    for peer in PEERS:
        scored, failures = [], []
        for run_dir in run_dirs(dataset_dir, peer):
            if (run_dir / "result.json").is_file():
                scored.append(score_run(run_dir, fs, truths))
            elif (run_dir / "failed.json").is_file():
                failures.append(json.loads((run_dir / "failed.json").read_text())["reason"])
        if scored:
            rows[peer] = mean_runs(scored)
        elif failures:
            rows[peer] = {"missing": "failed: " + failures[0]}
        else:
            rows[peer] = {"missing": "pending"}
    return rows


def mean_runs(runs: list[dict]) -> dict:
    """Accuracy and timings averaged over seeds; the spread of P@1 and P@5 kept beside."""
    out = dict(runs[0])
    for key in (*ACCURACY_KEYS, *TIMING_KEYS, "tfidf_fit_s"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = statistics.fmean(vals)
    out["n_runs"] = len(runs)
    out["seeds"] = [r.get("seed") for r in runs]
    out["core_revisions"] = sorted({r["core_revision"] for r in runs if r.get("core_revision")})
    for key in ("P@1", "P@5"):
        out[f"{key}_sd"] = statistics.pstdev([r[key] for r in runs]) if len(runs) > 1 else 0.0
    return out


def _num(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, fmt)


def _load(row: Mapping) -> str:
    """1-minute load average when the runner started and ended: above the core count, other
    jobs on the shared machine were competing for it and the timings are pessimistic."""
    start, end = row.get("loadavg_start"), row.get("loadavg_end")
    return f"{start[0]:.1f}→{end[0]:.1f}" if start and end else "–"


def markdown_table(fs: FeatureSet, rows: Mapping[str, dict]) -> str:
    head = ("| library | P@1 | P@3 | P@5 | nDCG@5 | PSP@5 | train s (after features) "
            "| peak RSS MB | model MB | 1-doc p50 ms | 1-doc p99 ms | batch docs/s "
            "| load avg |")
    lines = [head, "|" + "---|" * 13]
    for peer in PEERS:
        row = rows.get(peer, {"missing": "pending"})
        title = PEER_TITLES[peer]
        if "missing" in row:
            lines.append(f"| {title} | {row['missing']} |" + " |" * 11)
            continue
        acc = [_num(100 * row[k], ".1f") for k in ACCURACY_KEYS]
        if row.get("n_runs", 1) > 1:
            acc[0] += f" ±{100 * row['P@1_sd']:.1f}"
            acc[2] += f" ±{100 * row['P@5_sd']:.1f}"
        train = _num(row["train_s"], ".2f")
        if peer == "ours" and row.get("tfidf_fit_s") is not None:
            train += f" (+ TF-IDF fit {row['tfidf_fit_s']:.2f})"
        lines.append(
            f"| {title} | " + " | ".join(acc) + f" | {train} | "
            f"{_num(row['peak_rss_mb'], '.0f')} | {_num(row['model_mb'], '.1f')} | "
            f"{_num(row['latency_p50_ms'], '.3f')} | {_num(row['latency_p99_ms'], '.3f')} | "
            f"{_num(row['batch_docs_per_s'], ',.0f')} | {_load(row)} |"
        )
    return "\n".join(lines)


def dataset_block(fs: FeatureSet, rows: Mapping[str, dict]) -> str:
    if fs.kind == "text":
        feats = (f"scikit-learn TF-IDF, {fs.n_features:,} features, fitted on train in "
                 f"{fs.tfidf_fit_s:.2f} s (not in the peers' training time)")
    else:
        feats = f"{fs.n_features:,} XC features as given, rows l2-normalized"
    ours = rows.get("ours", {})
    seeds = ours.get("seeds")
    ours_note = (f"ours: mean of {len(seeds)} seed(s) {seeds} (± population sd), core at "
                 f"{', '.join(ours.get('core_revisions') or ['an unrecorded commit'])}"
                 if seeds else "ours: pending")
    n_runs = sorted({r.get("n_runs", 1) for p, r in rows.items()
                     if p != "ours" and "missing" not in r})
    peers_note = (f"peers: mean of {' or '.join(map(str, n_runs))} run(s), the same seeds "
                  f"(omikuji takes none: its runs are independent draws)"
                  if n_runs else "peers: pending")
    lines = [
        f"### {fs.name}",
        "",
        f"{fs.n_train_docs:,} train / {fs.n_test_docs:,} test documents, "
        f"{len(fs.label_names):,} training labels; {feats}. {ours_note}; {peers_note}.",
        "",
        markdown_table(fs, rows),
        "",
    ]
    pecos = rows.get("pecos", {})
    if pecos.get("latency_1thread_p50_ms") is not None:
        lines[-1:-1] = [
            "",
            f"PECOS one-document latency with 1 thread instead of {pecos.get('threads', 'all')}"
            f" (no OpenMP barrier): p50 {pecos['latency_1thread_p50_ms']:.3f} ms, "
            f"p99 {pecos['latency_1thread_p99_ms']:.3f} ms.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- RESULTS.md


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"`nproc` = {os.cpu_count()}, {cpu}, Linux {platform.release()}"


def replace_section(text: str, heading: str, body: str) -> str:
    """Swap the body under ``heading`` (up to the next ``## `` heading) for ``body``; every
    other section stays byte-for-byte as it was (other helpers own them)."""
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, ln in enumerate(lines) if ln.rstrip("\n") == heading)
    except StopIteration:
        return text.rstrip("\n") + f"\n\n{heading}\n\n{body.rstrip()}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[: start + 1]) + "\n" + body.rstrip("\n") + "\n" + (
        "\n" + tail if tail else "")


def section_body(blocks: Sequence[str], commands: Sequence[str], threads: int,
                 written_by: str = "") -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = f"""Machine: {machine_description()}; run {now}; {threads} thread(s) for every
library. The machine is shared with other jobs, so timings carry noise: the last column is
the 1-minute load average when each runner started and ended; above {os.cpu_count()} other
jobs were competing for the cores and that row's timings are pessimistic. Accuracy is
unaffected by load.

How it is run: features are built once per dataset (`benchmarks/features.py`) and written as
npz; each library then trains and predicts in its own subprocess
(`benchmarks/peer_runners/`; PECOS in `benchmarks/.venv-pecos`, made by
`benchmarks/pecos_env.sh`, because libpecos pins numpy<2 and scipy<1.14), and one module,
`models.metrics.evaluate`, scores every library's top-5. No per-dataset tuning: PECOS
XR-Linear with the defaults of its training CLI (PIFA + hierarchical k-means, 16 splits,
leaves of 100; predict-only load, beam 10), omikuji with its defaults (Parabel-like) and with
the Bonsai-like settings of its README (`cluster_balanced=False, cluster_k=100,
max_depth=3`), napkinXC `PLT` with its defaults (exact top-k search, so no beam). Top-5,
beam 10 wherever there is a beam.

Columns: P@k, nDCG@5 and PSP@5 (Jain et al. propensities, A=0.55, B=1.5, normalized) in %;
test labels never seen in training count as misses. Training seconds start from the
feature matrix (the peers' TF-IDF fit is given once per dataset); ours builds from the raw
text and its TF-IDF fit time is shown beside its training time. Peak RSS is the runner
process's own high-water mark (`VmHWM`; `getrusage`'s `ru_maxrss` is inherited from the
driver across fork + exec, so it cannot be used for the runner itself) and, for ours, the
`xmc build` subprocess's (`getrusage(RUSAGE_CHILDREN)`): training included. Model MB is the
saved model on disk (ours: the whole bundle, TF-IDF vocabulary included; the peers' models
hold no vectorizer). Single-document latency (p50/p99 over up to 1,000 test documents, one
at a time, after 50 warm-up calls): **ours from raw text, encoding included**; the peers
from the feature vector (search only). Batch docs/s: the whole test set in one call (omikuji
has no batch call: its one-document calls from as many Python threads as cores); ours
again from raw text.

Commands (`.venv/bin/python -m benchmarks.peers --help`):

"""
    cmd_lines = "\n".join(f"    {c}" for c in commands)
    if written_by:
        cmd_lines += ("\n\nThis section was then written (runs with a result kept, all "
                      f"re-scored) by:\n\n    {written_by}")
    return intro + cmd_lines + "\n\n" + "\n".join(blocks)


def dataset_registry(root: Path) -> list[dict]:
    path = root / "datasets.json"
    return json.loads(path.read_text()) if path.is_file() else []


def synth_name(n_labels: int) -> str:
    size = f"{n_labels // 1000}k" if n_labels % 1000 == 0 else str(n_labels)
    return f"synth_{size}_labels"


def synth_corpus(root: Path, n_labels: int, n_test: int = 5000) -> tuple[Path, str]:
    """Write (once) the synthetic corpus of the brief: N labels, 4N train, 5,000 test docs."""
    out = root.parent / "synth" / synth_name(n_labels)
    cmd = [str(Path(sys.executable).with_name("xmc")), "synth", "--labels", str(n_labels),
           "--train", str(4 * n_labels), "--test", str(n_test), "--seed", "0", "--out",
           str(out)]
    shown = "xmc " + " ".join(cmd[1:-1]) + f" {out.relative_to(HERE.parent)}"
    if not ((out / "train.jsonl").is_file() and (out / "test.jsonl").is_file()):
        print(f"== writing {shown}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out, shown


def register_dataset(root: Path, name: str, data_dir: Path, label_field: str,
                     made_by: str | None = None) -> None:
    """Remember every benchmarked dataset (in first-run order) for the RESULTS section."""
    entries = [e for e in dataset_registry(root) if e["name"] != name]
    old = [e for e in dataset_registry(root) if e["name"] == name]
    entry = {"name": name, "data_dir": str(data_dir), "label_field": label_field}
    if made_by:
        entry["made_by"] = made_by
    elif old and old[0].get("made_by"):
        entry["made_by"] = old[0]["made_by"]
    if old:
        entries.insert(dataset_registry(root).index(old[0]), entry)
    else:
        entries.append(entry)
    root.mkdir(parents=True, exist_ok=True)
    (root / "datasets.json").write_text(json.dumps(entries, indent=1))


def all_commands(root: Path) -> list[str]:
    seen: dict[str, None] = {}
    for path in sorted(root.glob("*/*/command.txt")) + sorted(root.glob("*/ours/*/command.txt")):
        seen.setdefault(path.read_text().strip(), None)
    return list(seen)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dirs", nargs="*", type=Path,
                    help="dataset folders: train/test .jsonl (text) or .txt (XC features)")
    ap.add_argument("--synth", nargs="+", type=int, default=[], metavar="N_LABELS",
                    help="also benchmark synthetic corpora made by `xmc synth --labels N "
                         "--train 4N --test 5000 --seed 0` (written once under the work dir)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="one run of every library per seed (accuracy is their mean); omikuji "
                         "takes no seed, so its runs are independent draws")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default=",".join(PEERS),
                    help="comma-separated subset of: " + ",".join(PEERS))
    ap.add_argument("--skip-existing", action="store_true",
                    help="keep runs that already have a result.json")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--latency-docs", type=int, default=1000)
    ap.add_argument("--label-field", default="labels")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="per runner, seconds")
    ap.add_argument("--work-dir", type=Path, default=WORK_ROOT)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: re-score the results in the work dir and write the "
                         "tables")
    args = ap.parse_args(argv)
    if not args.data_dirs and not args.synth:
        ap.error("give at least one DATA_DIR or --synth N")
    args.peers = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        ap.error(f"unknown peer(s) {sorted(unknown)}; choose from {','.join(PEERS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command_line = ".venv/bin/python -m benchmarks.peers " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    root: Path = args.work_dir
    made_by: dict[Path, str] = {}
    for n_labels in args.synth:
        data_dir, cmd = synth_corpus(root, n_labels)
        made_by[data_dir] = cmd
    for data_dir in [*args.data_dirs, *made_by]:
        fs = prepare(data_dir, root, label_field=args.label_field)
        register_dataset(root, fs.name, fs.data_dir, args.label_field,
                         made_by.get(Path(data_dir)))
        print(f"== {fs.name}: {fs.n_train_docs} train / {fs.n_test_docs} test docs, "
              f"{len(fs.label_names)} labels, {fs.n_features} features", flush=True)
        for peer in [] if args.report_only else args.peers:
            # omikuji takes no seed but draws a fresh random state on every run (its P@1
            # moves by several tenths between runs on the same features): it runs once per
            # seed too, so every library's figures are a mean of as many runs
            for seed in args.seeds:
                run_dir = run_dir_of(root / fs.name, peer, seed)
                if args.skip_existing and (run_dir / "result.json").is_file():
                    print(f"  {peer}: kept existing result", flush=True)
                    continue
                run_peer(peer, fs, run_dir, args, seed, command_line)
        print()
        print(dataset_block(fs, collect(root / fs.name, fs)), flush=True)

    if args.no_write:
        return 0
    blocks = []
    synth_cmds = [e["made_by"] for e in dataset_registry(root) if e.get("made_by")]
    for entry in dataset_registry(root):
        fs = prepare(entry["data_dir"], root, label_field=entry["label_field"])
        blocks.append(dataset_block(fs, collect(root / fs.name, fs)))
    body = section_body(blocks, [*synth_cmds, *all_commands(root)], args.threads,
                        command_line)
    RESULTS_MD.write_text(replace_section(RESULTS_MD.read_text(), SECTION, body))
    print(f"wrote {RESULTS_MD.relative_to(HERE.parent)} ({SECTION[3:]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
