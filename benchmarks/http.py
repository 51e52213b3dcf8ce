"""HTTP load test of ``xmc serve`` on loopback: ``python -m benchmarks.http BUNDLE_DIR``.

Starts ``xmc serve BUNDLE_DIR --workers 2`` on a free 127.0.0.1 port, then runs bounded
scenarios (each a fixed duration and at most ``--max-requests``; it stops by itself):

* single documents, cold cache (every text unique) and all cache hits, at concurrency
  1, 16 and 64;
* batches of ``--batch-size`` documents, cold and all hits (documents per second).

The load generator is ``wrk`` (C, with a Lua script for the POST bodies and percentiles)
when installed (Debian: ``apt-get install -y wrk``), else a lean asyncio generator on raw
sockets. Both share the 2 cores with the server, so each run reports the generator's own
CPU and each worker's CPU, to show whether the generator is the bottleneck and whether
the workers share the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TEXTS = Path("/work/shared/data/cooking_stackexchange/test.jsonl")
TARGETS = {
    "p99_ms_c16": 10.0,
    "hit_p50_ms": 1.0,
    "batch_docs_per_s": 20_000.0,
    "req_per_s": 1_300.0,
}


@dataclass
class Result:
    scenario: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    req_per_s: float
    docs_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    generator: str
    generator_cpu_pct: float  # of one core
    worker_cpu_pct: list[float] = field(default_factory=list)  # each of one core
    docs_per_cpu_s: float = 0.0  # documents per second of the workers' CPU: contention-proof


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, workers: int, env: dict[str, str],
                 log_level: str = "warning", stderr: Any = subprocess.DEVNULL
                 ) -> subprocess.Popen:  # fmt: skip
    xmc = Path(sys.executable).parent / "xmc"
    argv = [
        str(xmc),
        "serve",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        log_level,
    ]
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=stderr)


def wait_ready(base: str, proc: subprocess.Popen, workers: int) -> None:
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                # Every worker listening (one SO_REUSEPORT socket each), not just the first:
                # connections made before a worker listens would all stay on the others.
                if r.status == 200 and listening_sockets(base) >= workers:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server never became ready")


def listening_sockets(base: str) -> int:
    port = int(base.rsplit(":", 1)[1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def worker_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent:
            cmdline = (entry / "cmdline").read_bytes()
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                pids.append(int(entry.name))
    return sorted(pids) or [parent]


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- bodies


def load_texts(path: Path | None, limit: int = 2000) -> list[str]:
    if path and path.is_file():
        texts = []
        with path.open() as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                if len(texts) >= limit:
                    break
        return texts
    words = ["bread", "oven", "knife", "sauce", "cheese", "pasta", "rice", "salt", "egg"]
    rng = random.Random(0)
    return [" ".join(rng.choices(words, k=12)) for _ in range(limit)]


def single_body(text: str) -> bytes:
    return json.dumps({"text": text}).encode()


def batch_body(texts: list[str]) -> bytes:
    return json.dumps({"documents": [{"id": i, "text": t} for i, t in enumerate(texts)]}).encode()


# ----------------------------------------------------------------------------- wrk

_WRK_LUA = r"""
-- Bodies: one per line of XMC_BENCH_BODIES (JSON); in cold mode a unique nonce word is
-- put at the start of every "text" value (an unknown word: same work, new cache key).
local bodies = {}
for line in io.lines(os.getenv("XMC_BENCH_BODIES")) do bodies[#bodies + 1] = line end
local cold = os.getenv("XMC_BENCH_COLD") == "1"
local run = os.getenv("XMC_BENCH_RUN")
local threads = {}
local counter = 0
function setup(thread)
  thread:set("tid", #threads + 1)
  threads[#threads + 1] = thread
end
function init(args)
  counter = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  counter = counter + 1
  local body = bodies[(counter % #bodies) + 1]
  if cold then
    -- tid is set per thread by setup(); run differs per wrk process: never a repeat.
    local nonce = "zq" .. run .. "t" .. tid .. "n" .. counter
    body = body:gsub('"text": "', '"text": "' .. nonce .. ' ')
  end
  return wrk.format(nil, nil, nil, body)
end
function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    "XMC_BENCH {\"requests\": %d, \"errors\": %d, \"us\": %d, " ..
    "\"p50\": %d, \"p95\": %d, \"p99\": %d}\n",
    summary.requests, errors, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def run_wrk(
    url: str, bodies: list[bytes], cold: bool, concurrency: int, seconds: float, workdir: Path
) -> dict[str, Any]:
    script = workdir / "post.lua"
    script.write_text(_WRK_LUA)
    body_file = workdir / "bodies.txt"
    body_file.write_bytes(b"\n".join(bodies) + b"\n")
    threads = 1 if concurrency < 4 else 2
    env = {
        **os.environ,
        "XMC_BENCH_BODIES": str(body_file),
        "XMC_BENCH_COLD": "1" if cold else "0",
        "XMC_BENCH_RUN": f"{os.getpid()}r{time.monotonic_ns()}",
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(concurrency),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 60,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in out.stdout.splitlines() if x.startswith("XMC_BENCH ")), None)
    if line is None:
        raise SystemExit(f"wrk failed: {out.stdout}\n{out.stderr}")
    stats = json.loads(line.split(" ", 1)[1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "requests": stats["requests"],
        "errors": stats["errors"],
        "seconds": stats["us"] / 1e6,
        "p50_ms": stats["p50"] / 1000,
        "p95_ms": stats["p95"] / 1000,
        "p99_ms": stats["p99"] / 1000,
        "generator_cpu_s": cpu,
    }


# ----------------------------------------------------------------------------- asyncio


async def _py_load(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    cold: bool,
    concurrency: int,
    seconds: float,
    max_requests: int,
    content_type: str = "application/json",
    marker: bytes = b'"text": "',
    space: bytes = b" ",
) -> dict[str, Any]:
    """Bounded load on raw sockets; in cold mode a unique nonce word goes after ``marker``
    (the start of the text) in every body, followed by ``space`` (``+`` in a form)."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop_at = time.perf_counter() + seconds
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
    run = time.monotonic_ns()

    async def connection(cid: int) -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection(host, port)
        n = 0
        try:
            while time.perf_counter() < stop_at and sent < max_requests:
                sent += 1
                n += 1
                body = bodies[(cid * 7919 + n) % len(bodies)]
                if cold:
                    nonce = f"zq{run}c{cid}n{n}".encode() + space
                    body = body.replace(marker, marker + nonce)
                t0 = time.perf_counter()
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if b" 200 " not in status_line:
                    errors += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


def run_python(
    port: int,
    path: str,
    bodies: list[bytes],
    cold: bool,
    concurrency: int,
    seconds: float,
    max_requests: int,
    **body_format: Any,
) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    stats = asyncio.run(
        _py_load("127.0.0.1", port, path, bodies, cold, concurrency, seconds, max_requests,
                 **body_format)
    )
    after = resource.getrusage(resource.RUSAGE_SELF)
    stats["generator_cpu_s"] = (after.ru_utime - before.ru_utime) + (
        after.ru_stime - before.ru_stime
    )
    return stats


# ----------------------------------------------------------------------------- main


def warm_cache(base: str, path: str, bodies: list[bytes], rounds: int) -> None:
    """Send each body ``rounds`` times on fresh connections, so every worker's LRU has it."""
    for _ in range(rounds):
        for body in bodies:
            req = urllib.request.Request(
                f"{base}{path}", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("bundle_dir", type=Path)
    ap.add_argument(
        "--texts",
        type=Path,
        default=DEFAULT_TEXTS,
        help="JSONL with a text field (default: the cooking test set)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each scenario")
    ap.add_argument(
        "--max-requests", type=int, default=200_000, help="cap per scenario (asyncio generator)"
    )
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--only", choices=["single", "batch"], default=None, help="one kind only")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--redis-url", default=None, help="use this Redis as the cache")
    ap.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/.work/http.json"))
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"XMC_ACCESS_LOG": "false", "XMC_LRU_SIZE": "100000"}
    if args.redis_url:
        env["XMC_REDIS_URL"] = args.redis_url
        env["XMC_CACHE_PREFIX"] = f"xmc-bench:{os.getpid()}:"
    texts = load_texts(args.texts)
    singles = [single_body(t) for t in texts]
    hot = singles[:64]
    batches = [
        batch_body(texts[i : i + args.batch_size])
        for i in range(0, len(texts) - args.batch_size + 1, args.batch_size)
    ]
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    baseline = model_baseline(args.bundle_dir, texts, args.batch_size)
    print(
        f"model alone (in-process, no HTTP): single text p50 {baseline['single_p50_ms']:.3f} ms,"
        f" batch of {args.batch_size}: {baseline['batch_docs_per_s']:,.0f} docs/s",
        flush=True,
    )
    server = start_server(args.bundle_dir, port, args.workers, env)
    results: list[Result] = []
    try:
        wait_ready(base, server, args.workers)
        workers = worker_pids(server.pid)
        print(f"server pid {server.pid}, workers {workers}, generator {generator}", flush=True)
        warm_cache(base, "/v1/predict", hot, rounds=2 * args.workers)
        warm_cache(base, "/v1/predict/batch", batches[:1], rounds=2 * args.workers)
        plan: list[tuple[str, str, list[bytes], bool, int, int]] = []
        for c in concurrencies if args.only != "batch" else []:
            plan.append(("single cold", "/v1/predict", singles, True, c, 1))
            plan.append(("single hit", "/v1/predict", hot, False, c, 1))
        for c in (1, 4) if args.only != "single" else []:
            plan.append(("batch cold", "/v1/predict/batch", batches, True, c, args.batch_size))
            plan.append(("batch hit", "/v1/predict/batch", batches[:1], False, c, args.batch_size))
        with tempfile.TemporaryDirectory() as tmp:
            for name, path, bodies, cold, c, docs in plan:
                cpu0 = [cpu_seconds(p) for p in workers]
                if generator == "wrk":
                    stats = run_wrk(base + path, bodies, cold, c, args.seconds, Path(tmp))
                else:
                    stats = run_python(port, path, bodies, cold, c, args.seconds, args.max_requests)
                cpu1 = [cpu_seconds(p) for p in workers]
                secs = stats["seconds"]
                r = Result(
                    scenario=name,
                    concurrency=c,
                    requests=stats["requests"],
                    errors=stats["errors"],
                    seconds=round(secs, 3),
                    req_per_s=round(stats["requests"] / secs, 1),
                    docs_per_s=round(stats["requests"] * docs / secs, 1),
                    p50_ms=round(stats["p50_ms"], 3),
                    p95_ms=round(stats["p95_ms"], 3),
                    p99_ms=round(stats["p99_ms"], 3),
                    generator=generator,
                    generator_cpu_pct=round(100 * stats["generator_cpu_s"] / secs, 1),
                    worker_cpu_pct=[round(100 * (b - a) / secs, 1) for a, b in zip(cpu0, cpu1)],
                    docs_per_cpu_s=round(
                        stats["requests"] * docs / max(sum(cpu1) - sum(cpu0), 1e-9)
                    ),
                )
                results.append(r)
                print(format_row(r), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        if args.redis_url:
            _drop_keys(args.redis_url, env["XMC_CACHE_PREFIX"])

    print()
    print(report(results, args, generator, baseline, load_before))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


def _drop_keys(url: str, prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i : i + 1000])
    r.close()


def format_row(r: Result) -> str:
    workers = "/".join(f"{x:.0f}" for x in r.worker_cpu_pct)
    return (
        f"| {r.scenario:<11} | {r.concurrency:>3} | {r.req_per_s:>8.0f} | {r.docs_per_s:>8.0f}"
        f" | {r.p50_ms:>7.2f} | {r.p95_ms:>7.2f} | {r.p99_ms:>7.2f} | {r.errors:>4} "
        f"| {r.generator_cpu_pct:>5.0f} | {workers:>9} | {r.docs_per_cpu_s:>7.0f} |"
    )


def model_baseline(bundle: Path, texts: list[str], batch_size: int) -> dict[str, float]:
    """What the model does alone in this process: the ceiling the HTTP numbers sit under."""
    import models

    predictor = models.load_bundle(str(bundle))
    predictor.warm_up()
    singles = []
    for text in texts[:300]:
        t0 = time.perf_counter()
        predictor.predict([text])
        singles.append(time.perf_counter() - t0)
    singles.sort()
    batch = texts[:batch_size]
    predictor.predict(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        predictor.predict(batch)
        n += len(batch)
    docs_per_s = n / (time.perf_counter() - t0)
    predictor.close()
    return {"single_p50_ms": singles[len(singles) // 2] * 1000, "batch_docs_per_s": docs_per_s}


def report(
    results: list[Result],
    args: argparse.Namespace,
    generator: str,
    baseline: dict[str, float],
    load_before: float,
) -> str:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"machine: {os.cpu_count()} cores ({cpu_model}), Python {platform.python_version()}, "
        f"1-min load average before / after the run {load_before:.1f} / {os.getloadavg()[0]:.1f}"
        " (the machine is shared: other processes compete for the 2 cores)",
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"command: python -m benchmarks.http {args.bundle_dir} (workers {args.workers}, "
        f"{args.seconds:g} s per scenario, generator {generator}, cache "
        f"{'redis' if args.redis_url else 'in-process LRU'})",
        f"model alone (in-process, no HTTP): single text p50 {baseline['single_p50_ms']:.3f} ms, "
        f"batch of {args.batch_size} {baseline['batch_docs_per_s']:,.0f} docs/s",
        "",
        "| scenario    |   c |    req/s |   docs/s | p50 ms  | p95 ms  | p99 ms  | err "
        "| gen CPU % | worker CPU % | docs/CPU-s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(format_row(r) for r in results),
        "",
    ]
    by = {(r.scenario, r.concurrency): r for r in results}
    checks = []
    c16 = by.get(("single cold", 16))
    if c16:
        checks.append(("p99 ≤ 10 ms at c=16 (cold)", c16.p99_ms, TARGETS["p99_ms_c16"], "≤"))
    hit1 = by.get(("single hit", 1))
    if hit1:
        checks.append(("cache-hit p50 ≤ 1 ms (c=1)", hit1.p50_ms, TARGETS["hit_p50_ms"], "≤"))
    batch = max((r.docs_per_s for r in results if r.scenario == "batch cold"), default=None)
    if batch is not None:
        checks.append(("batch ≥ 20,000 docs/s (cold)", batch, TARGETS["batch_docs_per_s"], "≥"))
    rps = max((r.req_per_s for r in results if r.scenario == "single cold"), default=None)
    if rps is not None:
        checks.append(("≥ 1,300 req/s (single, cold)", rps, TARGETS["req_per_s"], "≥"))
    for label, value, target, op in checks:
        met = value <= target if op == "≤" else value >= target
        lines.append(f"- {label}: {value:,.2f} → {'met' if met else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
