"""The curve: ours and PECOS XR-Linear back to back on synthetic sets of growing label count.

    .venv/bin/python -m benchmarks.scale [--sizes 5000 50000 200000 1000000] [--timeout 3600]
        [--only ours,pecos] [--report-only]

Per size N: ``xmc synth --format xc --labels N --train 2N --test 5000 --seed 0`` (feature rows,
no text), the shared feature files (:mod:`benchmarks.features`), then each library in a
subprocess of its own with a time bound (:func:`benchmarks.peers.run_peer`, the same runners
as the peer tables: ours is ``xmc build`` from the XC file, timed by stage). Then ``xmc serve``
starts on our bundle with 2 workers: seconds until ``/readyz`` answers 200, and each
worker's memory from the kernel's ``/proc/PID/smaps_rollup`` (private vs shared pages).

Figures per size: build seconds by stage, build peak RSS, ensemble bytes per tree (ours: the
``ensemble.*.npy`` arrays; PECOS: its saved model folder), P@1/P@5, 1-document p50/p99 and
batch docs/s from feature rows, and the ratios the scale issue asks for. Results accumulate
in ``benchmarks/scale_results.json`` (kept in the repository: one size is rerun at a time,
and the table shows them all); the table goes into benchmarks/RESULTS.md ("Scale") and the
log-log plot into benchmarks/scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.features import prepare
from benchmarks.peers import RESULTS_MD, replace_section, run_peer, score_run

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "scale"
PLOT = HERE / "scale.png"
RESULTS_JSON = HERE / "scale_results.json"
LARGEST = 1_000_000
SECTION = "## Scale: 5k to 1M labels, ours and PECOS back to back"
SMAPS_KEYS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


def synth_dir(n_labels: int) -> Path:
    return WORK / f"synth_xc_{n_labels // 1000}k"


def make_synth(n_labels: int) -> tuple[Path, float]:
    out = synth_dir(n_labels)
    if (out / "train.txt").is_file() and (out / "test.txt").is_file():
        return out, float("nan")
    xmc = Path(sys.executable).with_name("xmc")
    t0 = time.perf_counter()
    subprocess.run([str(xmc), "synth", "--format", "xc", "--labels", str(n_labels),
                    "--train", str(2 * n_labels), "--test", "5000", "--seed", "0",
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smaps_rollup(pid: int) -> dict[str, float]:
    """MB of each SMAPS_KEYS line of a process's smaps_rollup."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    out = {}
    for key in SMAPS_KEYS:
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out[key] = int(m.group(1)) / 1024 if m else float("nan")
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the serving workers and whatever supervises them)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent_of.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def serve_memory(bundle: Path, workers: int = 2, timeout: float = 600) -> dict:
    """Start ``xmc serve`` on the bundle; seconds to ready, and each worker's memory."""
    port = free_port()
    xmc = Path(sys.executable).with_name("xmc")
    proc = subprocess.Popen([str(xmc), "serve", str(bundle), "--port", str(port),
                             "--workers", str(workers)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.perf_counter()
    ready = None
    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        ready = time.perf_counter() - t0
                        break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)  # let every worker finish its warm-up
        mem = {}
        for pid in descendants(proc.pid):
            try:
                mem[str(pid)] = smaps_rollup(pid)
            except OSError:
                continue
        mem = {p: m for p, m in mem.items() if m["Rss"] > 50}  # workers, not helpers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"ready_s": ready, "workers": mem}


def run_size(n_labels: int, args: argparse.Namespace) -> dict:
    data_dir, synth_s = make_synth(n_labels)
    t0 = time.perf_counter()
    fs = prepare(data_dir, WORK)
    print(f"== {fs.name}: {fs.n_train_docs} train / {fs.n_test_docs} test docs, "
          f"{len(fs.label_names)} labels, {fs.n_features} features "
          f"(synth {synth_s:.0f} s, feature files {time.perf_counter() - t0:.0f} s)", flush=True)
    command = ".venv/bin/python -m benchmarks.scale " + shlex.join(sys.argv[1:])
    row: dict = {"n_labels": n_labels, "n_train": fs.n_train_docs, "synth_s": synth_s}
    if not args.report_only:
        row["command"] = command
    truths = fs.test_truth()
    peer_args = argparse.Namespace(threads=2, top_k=5, beam=10, latency_docs=1000,
                                   timeout=args.timeout, n_trees=args.n_trees)
    for peer in args.peers:
        run_dir = WORK / fs.name / peer
        if not args.report_only:
            run_peer(peer, fs, run_dir, peer_args, 0, command)
        if (run_dir / "result.json").is_file():
            row[peer] = score_run(run_dir, fs, truths)
        elif (run_dir / "failed.json").is_file():
            row[peer] = {"missing": json.loads((run_dir / "failed.json").read_text())}
    ours = row.get("ours", {})
    bundle = WORK / fs.name / "ours" / "bundle"
    if "missing" not in ours and bundle.is_dir() and not args.report_only:
        ours["serve"] = serve_memory(bundle)
        shutil.rmtree(bundle)  # large, and reproducible from the seed
    return row


def load_results() -> dict[str, dict]:
    return json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}


def _f(v: object, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and v == v else "–"


def table(results: dict[str, dict]) -> str:
    lines = [
        "| labels | train docs | library | train s (per tree) | peak RSS MB | ensemble MB per "
        "tree (+ lookup) | P@1 | P@5 | 1-doc p50 / p99 ms | batch docs/s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(results, key=int):
        row = results[key]
        for peer, title in (("ours", "**ours**"), ("pecos", "PECOS")):
            r = row.get(peer)
            if not r:
                continue
            if "missing" in r:
                lines.append(f"| {int(key):,} | {row['n_train']:,} | {title} | "
                             f"{r['missing'].get('reason', '?')} | | | | | | |")
                continue
            n_trees = r.get("n_trees", 1)
            if n_trees != DEFAULT_TREES[peer]:
                title += f" ({n_trees} tree{'s' if n_trees > 1 else ''})"
            mb = r.get("ensemble_mb_per_tree", r["model_mb"])
            lookup = _lookup_mb(r)
            lookup_cell = f" (+ {lookup:.1f})" if lookup else ""
            lines.append(
                f"| {int(key):,} | {row['n_train']:,} | {title} | {_f(r['train_s'], '.1f')} "
                f"({_f(r['train_s'] / n_trees, '.1f')}) | {_f(r['peak_rss_mb'], '.0f')} | "
                f"{_f(mb, '.1f')}{lookup_cell} | {_f(100 * r['P@1'], '.2f')} | "
                f"{_f(100 * r['P@5'], '.2f')} "
                f"| {_f(r['latency_p50_ms'], '.3f')} / {_f(r['latency_p99_ms'], '.3f')} | "
                f"{_f(r['batch_docs_per_s'], ',.0f')} |")
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> str:
    lines = ["| labels | bundle bytes per tree (with lookup) | build peak RSS | "
             "training per tree (wall) | training per tree (CPU s) | P@1 ours − PECOS | "
             "ready s | worker private MB (each) | worker shared MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(results, key=int):
        o, p = results[key].get("ours", {}), results[key].get("pecos", {})
        if "P@1" not in o:
            continue
        serve = o.get("serve", {})
        workers = list(serve.get("workers", {}).values())
        private = " / ".join(_f(w["Private_Clean"] + w["Private_Dirty"], ".0f") for w in workers)
        shared = " / ".join(_f(w["Shared_Clean"] + w["Shared_Dirty"], ".0f") for w in workers)
        if "P@1" in p:
            with_lookup = o["ensemble_mb_per_tree"] + (_lookup_mb(o) or 0.0)
            cells = (f"{o['ensemble_mb_per_tree'] / p['model_mb']:.2f}× "
                     f"({with_lookup / p['model_mb']:.2f}×)",
                     f"{o['peak_rss_mb'] / p['peak_rss_mb']:.2f}×",
                     f"{o['train_s'] / o['n_trees'] / p['train_s']:.2f}×",
                     _cpu_ratio(o, p), f"{100 * (o['P@1'] - p['P@1']):+.2f}")
        else:
            cells = ("–",) * 5
        lines.append(f"| {int(key):,} | {' | '.join(cells)} | {_f(serve.get('ready_s'), '.1f')} "
                     f"| {private} | {shared} |")
    return "\n".join(lines)


def _lookup_mb(run: dict) -> float | None:
    """MB per tree of the search's stored lookup (runs before the row directories stored
    bitmaps alone, under their own name)."""
    return run.get("lookup_mb_per_tree", run.get("bitmap_mb_per_tree"))


def _cpu_ratio(ours: dict, pecos: dict) -> str:
    """CPU seconds of training per tree, ours / PECOS's: on a shared machine the wall clock
    also counts the other jobs, the CPU seconds only the work (older runs lack them)."""
    o_cpu, p_cpu = ours.get("train_cpu_s"), pecos.get("train_cpu_s")
    if not (o_cpu and p_cpu):
        return "–"
    per_tree = o_cpu / ours["n_trees"]
    return f"{per_tree / p_cpu:.2f}× ({per_tree:.0f} / {p_cpu:.0f})"


#: each library's tree count in its default build: the extrapolation follows those runs
DEFAULT_TREES = {"ours": 3, "pecos": 1}
#: what a size that was not run is extrapolated for, and from which figures
EXTRAPOLATED = (("training s per tree (wall)", lambda r: r["train_s"] / r.get("n_trees", 1)),
                ("training CPU s per tree", lambda r: r["train_cpu_s"] / r.get("n_trees", 1)),
                ("build peak RSS MB", lambda r: r["peak_rss_mb"]),
                ("ensemble MB per tree", lambda r: r.get("ensemble_mb_per_tree",
                                                         r["model_mb"])),
                ("1-doc p50 ms", lambda r: r["latency_p50_ms"]))


def _figure(get: Callable[[dict], float], run: dict) -> float | None:
    """One figure of a run, None where the run predates it."""
    try:
        return get(run)
    except (KeyError, TypeError):
        return None


def extrapolate(results: dict[str, dict], n_labels: int) -> str:
    """A straight line through the measured sizes on log-log axes (least squares), read at
    ``n_labels``: the figures a size that could not be run with each library's default
    build would have, with the slope (the power of the label count each one grows with)."""
    lines = [f"| figure at {n_labels:,} labels (extrapolated) | ours | slope | PECOS | slope |",
             "|---|---|---|---|---|"]
    for title, get in EXTRAPOLATED:
        cells = []
        for peer in ("ours", "pecos"):
            pts = [(int(k), _figure(get, v[peer])) for k, v in results.items()
                   if int(k) < n_labels and "P@1" in v.get(peer, {})
                   and v[peer].get("n_trees", 1) == DEFAULT_TREES[peer]]
            pts = [pt for pt in pts if pt[1] is not None]
            if len(pts) < 2:
                cells += ["–", "–"]
                continue
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            slope, icept = np.polyfit(x, y, 1)
            cells += [f"{np.exp(icept + slope * np.log(n_labels)):,.1f}", f"{slope:.2f}"]
        lines.append(f"| {title} | {' | '.join(cells)} |")
    return "\n".join(lines)


#: the plot's lines: library, its tree count, marker style, legend
PLOT_LINES = (("ours", 3, "o-", "xmc-serve (3 trees, default)"),
              ("ours", 1, "o:", "xmc-serve (1 tree)"),
              ("pecos", 1, "s--", "PECOS XR-Linear (1 tree)"))


def plot(results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    figure = dict(EXTRAPOLATED)
    panels = [(title, figure[title]) for title in (
        "training CPU s per tree", "ensemble MB per tree", "1-doc p50 ms")]
    for ax, (title, get) in zip(axes, panels):
        for peer, trees, style, label in PLOT_LINES:
            runs = [(int(k), v[peer]) for k, v in sorted(results.items(), key=lambda kv: int(kv[0]))
                    if "P@1" in v.get(peer, {}) and v[peer].get("n_trees", 1) == trees]
            pts = [(n, _figure(get, run)) for n, run in runs]
            pts = [pt for pt in pts if pt[1] is not None]
            if pts:
                ax.loglog(*zip(*pts), style, label=label)
        ax.set_xlabel("labels")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def write_section(results: dict[str, dict]) -> None:
    commands = sorted({c for r in results.values()
                       for c in r.get("commands", [r["command"]] if "command" in r else [])})
    body = ("Run with " + ", ".join(f"`{c}`" for c in commands) + " (this machine: 2 cores, "
            "24 GB; each figure's date and the load average around it are in "
            "`benchmarks/scale_results.json`). Synthetic feature-level sets (`xmc synth "
            "--format xc --labels N --train 2N --test 5000 --seed 0`); both libraries train "
            "from the same feature file with 2 threads, predict with top-5, beam 10, from "
            "feature rows. Ours: 3 trees, default build (int8 weights), unless the row names "
            "another tree count; PECOS: one tree, its CLI defaults. Bundle bytes: ours the "
            "`ensemble.*.npy` arrays divided by the trees (in brackets the search's feature "
            "lookup stored beside them, `search.*.npy`), PECOS its saved model folder.\n\n"
            + table(results) + "\n\nRatios (ours / PECOS) and `xmc serve` (2 workers; memory from "
            "`/proc/PID/smaps_rollup` once ready):\n\n" + ratios(results)
            + "\n\n![scale](scale.png)\n")
    largest = results.get(str(LARGEST), {}).get("ours", {})
    if "P@1" not in largest or largest.get("n_trees") != DEFAULT_TREES["ours"]:
        body += ("\n" + extrapolate(results, LARGEST) + "\n")
    RESULTS_MD.write_text(replace_section(RESULTS_MD.read_text(), SECTION, body))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000, 200000, 1000000])
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per library and size")
    ap.add_argument("--only", default="ours,pecos")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--n-trees", type=int, default=None,
                    help="our trees (default: the build's default); the table says when not 3")
    args = ap.parse_args()
    args.peers = args.only.split(",")
    os.environ["XMC_BENCH_KEEP_BUNDLE"] = "1"  # the runner leaves it for serve_memory
    WORK.mkdir(parents=True, exist_ok=True)
    results = load_results()
    for n in args.sizes:
        old = results.get(str(n), {})
        new = run_size(n, args)
        # a size's libraries may be run by separate commands: keep each one
        commands = {*old.get("commands", []), old.get("command"), new.get("command")} - {None}
        results[str(n)] = {**old, **new, "commands": sorted(commands)}
        if "serve" in old.get("ours", {}) and "serve" not in results[str(n)].get("ours", {}):
            results[str(n)]["ours"]["serve"] = old["ours"]["serve"]
        RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
        print(table({str(n): results[str(n)]}), flush=True)
        print(ratios({str(n): results[str(n)]}), flush=True)
    write_section(results)
    plot(results)
    print(f"wrote {RESULTS_MD.name} ({SECTION[3:]}) and {PLOT.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
