"""Reliability under load: ``python -m benchmarks.reliability [--quick] [--scenario NAME ...]``.

Starts the real service (``xmc serve``, 2 workers, loopback) on a repository holding a
cooking bundle it builds, with a Redis of its own (its own port, debug commands on), drives
it with a bounded asyncio load generator on raw keep-alive sockets (fixed request counts,
90 % single documents and 10 % batches of 32, half of the texts made unique so the model
works), and runs one scenario per function:

* ``sustained``: 100k requests at c=64, 0 failed;
* ``soak``: 300k requests; worker RSS, open files and Redis connections at 10 % and at the
  end, p99 of the first and last 10 % of the requests;
* ``redis``: Redis killed, stopped (SIGSTOP), paused (CLIENT PAUSE), slowed (DEBUG SLEEP),
  restarted empty and full (maxmemory) under load: 0 failed, p99 against a healthy run,
  /readyz degraded, cache errors counted, seconds until the cache is used again;
* ``overload``: 5x the in-flight bound in closed-loop connections: 503 + Retry-After beyond
  it, refusal latency (client and server side), admitted p99, recovery once load drops;
* ``workers``: a worker killed (SIGKILL) under load is restarted and only its in-flight
  requests fail; SIGTERM to ``xmc serve`` drains: no request in flight fails;
* ``swaps``: versions published into the repository during a load, one corrupt: 0 failed,
  every answer from a published version, the corrupt one refused.

Each prints a row and, with ``--write``, the table goes into docs/RELIABILITY.md. ``--quick``
is the CI size (tests/benchmarks/test_reliability.py asserts the checks, never timings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.http import free_port, listening_sockets, start_server, wait_ready, worker_pids
from service.repository import publish

DATA = Path(__file__).resolve().parents[1] / "data" / "cooking"
DOC = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"
SECTION = "## Scenarios under load"
VERSION = re.compile(rb'"version":"([0-9a-f]+)"')


# ----------------------------------------------------------------------------- load


@dataclass
class Outcome:
    start: float  # perf_counter seconds
    end: float
    status: int  # 0: the connection failed while the request was in flight
    version: bytes = b""
    retry_after: bool = False


@dataclass
class Load:
    """Closed-loop connections sending ``total`` requests (or until ``stop`` is set)."""

    port: int
    texts: list[str]
    concurrency: int
    total: int
    batch_share: float = 0.1
    batch_size: int = 32
    unique_share: float = 0.5
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event | None = None

    def _body(self, rng: random.Random, n: int) -> tuple[str, bytes]:
        def text() -> str:
            t = rng.choice(self.texts)
            return f"zq{n}r{rng.random():.6f} {t}" if rng.random() < self.unique_share else t

        if rng.random() < self.batch_share:
            docs = [{"text": text()} for _ in range(self.batch_size)]
            return "/v1/predict/batch", json.dumps({"documents": docs}).encode()
        return "/v1/predict", json.dumps({"text": text()}).encode()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        path: str, body: bytes) -> Outcome:
        t0 = time.perf_counter()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await reader.readline()).split()[1])
        length, retry = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name = line.split(b":", 1)[0].lower()
            if name == b"content-length":
                length = int(line.split(b":", 1)[1])
            retry = retry or name == b"retry-after"
        payload = await reader.readexactly(length)
        m = VERSION.search(payload) if status == 200 else None
        return Outcome(t0, time.perf_counter(), status, m.group(1) if m else b"", retry)

    async def _connection(self, cid: int, counter: list[int]) -> None:
        rng = random.Random(cid)
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while counter[0] < self.total and not (self.stop and self.stop.is_set()):
            counter[0] += 1
            path, body = self._body(rng, counter[0])
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                self.outcomes.append(await self._exchange(*conn, path, body))
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                self.outcomes.append(Outcome(t0, time.perf_counter(), 0))
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.01)  # a refused connect must not spin
        if conn is not None:
            conn[1].close()

    async def run(self) -> list[Outcome]:
        counter = [0]
        await asyncio.gather(*(self._connection(i, counter) for i in range(self.concurrency)))
        return self.outcomes


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latencies_ms(outcomes: list[Outcome], status: int = 200) -> list[float]:
    return [1000 * (o.end - o.start) for o in outcomes if o.status == status]


# ----------------------------------------------------------------------------- processes


class Redis:
    """A redis-server of the run's own, on its own port, debug commands on, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--enable-debug-command", "yes", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if self.client().ping():
                    return
            except Exception:  # not up yet
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def connections(self) -> int:
        return int(self.client().info("clients")["connected_clients"])


class Service:
    """``xmc serve ROOT --workers 2`` on a free loopback port, stderr kept in a file."""

    def __init__(self, root: Path, workdir: Path, env: dict[str, str], workers: int = 2,
                 log_level: str = "warning") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log = workdir / f"serve-{self.port}.log"
        with self.log.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = start_server(root, self.port, workers, env, log_level, stderr=log)
        wait_ready(self.base, self.proc, workers)

    def pids(self) -> list[int]:
        return [p for p in worker_pids(self.proc.pid) if p != self.proc.pid]

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def counter(self, name: str) -> float:
        text = self.get("/metrics")[1].decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ----------------------------------------------------------------------------- bundles


def build_bundle(out: Path, seed: int, n_trees: int) -> Path:
    xmc = Path(sys.executable).parent / "xmc"
    subprocess.run([str(xmc), "build", str(DATA / "train.jsonl"), "--out", str(out), "--force",
                    "--seed", str(seed), "--n-trees", str(n_trees)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def warm_kernels(bundles: list[Path]) -> None:
    """Load and warm each bundle once here, so numba's on-disk cache holds every kernel the
    versions use before a worker loads one. Without it, on a fresh checkout, the first
    version with a kNN part compiled its kernels during the swap, under the load: tens of
    seconds on a 2-core machine, which the scenarios would report as swapping time."""
    from models.predictor import Predictor

    for bundle in bundles:
        predictor = Predictor.load(bundle)
        predictor.warm_up()
        predictor.close()


def corrupt(bundle: Path) -> None:
    """Cut the largest array in half: a version that must be refused."""
    largest = max(bundle.glob("*.npy"), key=lambda p: p.stat().st_size)
    with largest.open("r+b") as fh:
        fh.truncate(largest.stat().st_size // 2)


def texts() -> list[str]:
    with (DATA / "test.jsonl").open() as fh:
        return [json.loads(line)["text"] for line in fh][:2000]


@dataclass
class Row:
    scenario: str
    requests: int
    failed: int
    p50_ms: float
    p99_ms: float
    recovery: str
    checked: str
    ok: bool


@dataclass
class Env:
    """What every scenario gets: the run's folder, a repository with one cooking model,
    its bundles, the texts, the sizes and a Redis."""

    workdir: Path
    root: Path
    bundles: list[Path]
    texts: list[str]
    quick: bool
    redis: Redis

    def serve(self, root: Path | None = None, log_level: str = "warning", **env: str) -> Service:
        base = {"XMC_REDIS_URL": self.redis.url, "XMC_CACHE_PROBE_SECONDS": "1",
                "XMC_CACHE_PREFIX": f"rel{time.monotonic_ns()}:"}
        return Service(root or self.root, self.workdir, {**base, **env}, log_level=log_level)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def run_load(load: Load, during: Callable[[], Awaitable[Any]] | None = None) -> Any:
    """Runs the load (its outcomes land in ``load.outcomes``) and, beside it, ``during``,
    whose result is returned."""
    async def main() -> Any:
        task = asyncio.ensure_future(load.run())
        side = await during() if during else None
        await task
        return side

    return asyncio.run(main())


def summary(scenario: str, outcomes: list[Outcome], recovery: str, checked: str,
            ok: bool) -> Row:
    lat = latencies_ms(outcomes)
    failed = sum(o.status != 200 for o in outcomes)
    return Row(scenario, len(outcomes), failed, pct(lat, 0.5), pct(lat, 0.99), recovery,
               checked, ok)


@contextmanager
def service(env: Env, root: Path | None = None, log_level: str = "warning",
            **settings: str) -> Iterator[Service]:
    svc = env.serve(root, log_level, **settings)
    try:
        yield svc
    finally:
        svc.stop()


# ----------------------------------------------------------------------------- scenarios


def sustained(env: Env) -> Row:
    with service(env) as svc:
        load = Load(svc.port, env.texts, env.size(64, 16), env.size(100_000, 4_000))
        run_load(load)
        outcomes = load.outcomes
    failed = sum(o.status != 200 for o in outcomes)
    return summary("sustained", outcomes, "-", "every answer 200 (90 % single, 10 % batches "
                   "of 32, half the texts unique)", failed == 0)


def _sample(svc: Service, redis: Redis) -> dict[str, Any]:
    pids = svc.pids()
    return {"rss_mb": [round(rss_mb(p), 1) for p in pids],
            "open_files": [open_files(p) for p in pids], "redis_connections": redis.connections()}


def soak(env: Env) -> Row:
    total = env.size(300_000, 8_000)
    with service(env) as svc:
        load = Load(svc.port, env.texts, env.size(64, 16), total)

        async def at_ten_percent() -> dict[str, Any]:
            while len(load.outcomes) < total // 10:
                await asyncio.sleep(0.05)
            return await asyncio.to_thread(_sample, svc, env.redis)

        first = run_load(load, at_ten_percent)
        last = _sample(svc, env.redis)
    by_start = sorted(load.outcomes, key=lambda o: o.start)
    tenth = len(by_start) // 10
    p99_first = pct(latencies_ms(by_start[:tenth]), 0.99)
    p99_last = pct(latencies_ms(by_start[-tenth:]), 0.99)
    growth = max(b / a - 1 for a, b in zip(first["rss_mb"], last["rss_mb"]))
    fd_growth = max(b - a for a, b in zip(first["open_files"], last["open_files"]))
    ok = (sum(o.status != 200 for o in by_start) == 0 and growth < 0.05 and fd_growth <= 2)
    checked = (f"worker RSS at 10 % {first['rss_mb']} MB, at the end {last['rss_mb']} MB "
               f"(+{100 * growth:.1f} % at most, target < 5 %); open files {first['open_files']}"
               f" -> {last['open_files']}; Redis connections {first['redis_connections']} -> "
               f"{last['redis_connections']}; p99 of the last 10 % / first 10 %: "
               f"{p99_last:.1f} / {p99_first:.1f} ms = {p99_last / p99_first:.2f} (target <= 1.2)")
    return summary("soak", by_start, "-", checked, ok)


def _redis_faults(redis: Redis) -> list[tuple[str, Callable[[], None], Callable[[], None]]]:
    """(name, break it, mend it): each held for a while under load."""
    sleeper: list[threading.Thread] = []

    def debug_sleep() -> None:  # blocks the server 2 s; the call itself waits as long
        sleeper.append(threading.Thread(
            target=lambda: redis.client().execute_command("DEBUG", "SLEEP", "2")))
        sleeper[-1].start()

    def full() -> None:
        c = redis.client()
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", "1")  # every write now fails: OOM

    return [
        ("killed (down, then restarted empty)", redis.kill, redis.start),
        ("stopped (SIGSTOP)", lambda: redis.signal(signal.SIGSTOP),
         lambda: redis.signal(signal.SIGCONT)),
        ("CLIENT PAUSE 2 s", lambda: redis.client().execute_command("CLIENT", "PAUSE", "2000",
                                                                    "ALL"), lambda: None),
        ("DEBUG SLEEP 2 s", debug_sleep, lambda: sleeper[-1].join()),
        ("maxmemory reached", full, lambda: redis.client().config_set("maxmemory", "0")),
        ("restarted (killed and started at once, empty)", redis.restart, lambda: None),
    ]


async def _cache_state(svc: Service) -> str:
    status, body = await asyncio.to_thread(svc.get, "/readyz")
    return str(json.loads(body).get("cache", {}).get("state")) if status == 200 else "not ready"


async def _until_ok(svc: Service, deadline_s: float = 60) -> float:
    """Seconds until 8 answers of /readyz in a row (both workers) say the cache is ok."""
    t0, streak = time.monotonic(), 0
    while streak < 8 and time.monotonic() < t0 + deadline_s:
        streak = streak + 1 if await _cache_state(svc) == "ok" else 0
        await asyncio.sleep(0.05)
    return time.monotonic() - t0 if streak >= 8 else float("inf")


def redis_faults(env: Env) -> Row:
    hold = 1.0 if env.quick else 3.0
    with service(env) as svc:
        baseline = Load(svc.port, env.texts, 32, env.size(30_000, 3_000))
        run_load(baseline)
        healthy = baseline.outcomes
        errors_before = svc.counter("xmc_cache_errors_total")
        stop = asyncio.Event()
        load = Load(svc.port, env.texts, 32, 10**9, stop=stop)
        report: list[str] = []

        async def faults() -> list[float]:
            recoveries = []
            for name, apply, mend in _redis_faults(env.redis):
                await asyncio.to_thread(apply)
                t_end = time.monotonic() + hold
                seen = set()
                while time.monotonic() < t_end:
                    seen.add(await _cache_state(svc))
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(mend)
                recoveries.append(await _until_ok(svc))
                report.append(f"{name}: readyz saw {'/'.join(sorted(seen))}, cache back in "
                              f"{recoveries[-1]:.2f} s")
            stop.set()
            return recoveries

        recoveries = run_load(load, faults)
        errors = svc.counter("xmc_cache_errors_total") - errors_before
    faulty = load.outcomes
    p99_healthy = pct(latencies_ms(healthy), 0.99)
    p99 = pct(latencies_ms(faulty), 0.99)
    failed = sum(o.status != 200 for o in faulty)
    # met: nothing failed, the faults were seen and counted, the cache came back every time
    # (how fast is the figure to read, not a condition: it is a timing)
    ok = failed == 0 and errors > 0 and max(recoveries) < float("inf")
    checked = (f"p99 {p99:.1f} ms vs {p99_healthy:.1f} ms with a healthy Redis "
               f"({p99 / p99_healthy:.2f}x, target <= 2x); cache errors counted {errors:.0f}; "
               + "; ".join(report))
    return summary("redis faults", faulty, f"cache back in {max(recoveries):.2f} s at most",
                   checked, ok)


def _served_refusals_ms(log: Path) -> list[float]:
    """Server-side durations of the 503s, from the access log (JSON lines)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"status":503' in line.replace(" ", ""):
            try:
                out.append(float(json.loads(line)["duration_ms"]))
            except (ValueError, KeyError):
                continue
    return out


def overload(env: Env) -> Row:
    bound = 4
    settings = {"XMC_MAX_INFLIGHT": str(bound), "XMC_REDIS_URL": "", "XMC_LRU_SIZE": "0",
                "XMC_ACCESS_LOG": "true"}
    with service(env, log_level="info", **settings) as svc:
        connections = 5 * bound * svc.workers
        flood = Load(svc.port, env.texts, connections, env.size(20_000, 3_000),
                     batch_share=0.0, unique_share=1.0)
        calm = Load(svc.port, env.texts, 4, env.size(2_000, 400), batch_share=0.0)
        run_load(flood)
        run_load(calm)
        heavy, after = flood.outcomes, calm.outcomes
        served = _served_refusals_ms(svc.log)
    refused = [o for o in heavy if o.status == 503]
    errors = sum(o.status not in (200, 503) for o in heavy)
    refusal_client = pct(latencies_ms(heavy, 503), 0.99)
    refusal_server = pct(served, 0.99)
    after_bad = sum(o.status != 200 for o in after)
    ok = (errors == 0 and len(refused) > 0 and all(o.retry_after for o in refused)
          and after_bad == 0)
    checked = (f"{connections} closed-loop connections against a bound of {bound} per worker: "
               f"{len(refused)} refused with 503, all with Retry-After: "
               f"{all(o.retry_after for o in refused)}; refusal p99 {refusal_server:.2f} ms in "
               f"the server (access log), {refusal_client:.1f} ms at the client (target <= 5 "
               f"ms); admitted p99 {pct(latencies_ms(heavy), 0.99):.1f} ms; other errors "
               f"{errors}; then at c=4 {len(after)} requests, {after_bad} not 200")
    row = summary("overload", heavy, "at once: 0 refusals once load dropped" if after_bad == 0
                  else f"{after_bad} refusals after load dropped", checked, ok)
    row.failed = errors  # a 503 here is the bound doing its job, not a failure
    return row


def _kill_a_worker(env: Env) -> tuple[list[Outcome], int, float]:
    with service(env) as svc:
        total = env.size(30_000, 4_000)
        load = Load(svc.port, env.texts, 16, total)

        async def kill() -> tuple[float, float]:
            while len(load.outcomes) < total // 3:
                await asyncio.sleep(0.01)
            victim = svc.pids()[0]
            t_kill = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            while victim in svc.pids() or len(svc.pids()) < svc.workers \
                    or listening_sockets(svc.base) < svc.workers:
                await asyncio.sleep(0.05)
            return t_kill, time.monotonic() - t0

        t_kill, restart_s = run_load(load, kill)
    inflight = sum(o.start <= t_kill <= o.end for o in load.outcomes)
    return load.outcomes, inflight, restart_s


def _terminate(env: Env) -> tuple[list[Outcome], float, int | None]:
    svc = env.serve()
    stop = asyncio.Event()
    load = Load(svc.port, env.texts, 16, 10**9, stop=stop)

    async def term() -> float:
        while len(load.outcomes) < env.size(5_000, 1_000):
            await asyncio.sleep(0.01)
        t_term = time.perf_counter()
        svc.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(svc.proc.wait, 120)
        stop.set()
        return t_term

    t_term = run_load(load, term)
    svc.stop()
    return load.outcomes, t_term, svc.proc.returncode


def worker_faults(env: Env) -> Row:
    killed, inflight, restart_s = _kill_a_worker(env)
    failed_kill = sum(o.status != 200 for o in killed)
    drained, t_term, code = _terminate(env)
    before = [o for o in drained if o.start < t_term]
    failed_term = sum(o.status != 200 for o in before)
    ok = failed_kill <= inflight and failed_term == 0 and code == 0
    checked = (f"SIGKILL to a worker at a third of the load: {failed_kill} failed, {inflight} "
               f"requests were in flight on the 2 workers then; restarted and listening in "
               f"{restart_s:.2f} s. SIGTERM to xmc serve: {len(before)} requests sent before "
               f"it, {failed_term} failed; exit code {code}")
    return summary("worker faults", killed + before, f"worker back in {restart_s:.2f} s",
                   checked, ok)


def _version(bundle: Path) -> bytes:
    return str(json.loads((bundle / "manifest.json").read_text())["version"]).encode()


def swaps(env: Env) -> Row:
    root = env.workdir / "swaps-repo"
    model = root / "cooking"
    model.mkdir(parents=True)
    publish(model, "1", env.bundles[0])
    n_versions, period = env.size(10, 4), env.size(6.0, 2.5)
    corrupt_at = n_versions // 2
    good = {_version(env.bundles[0])}
    with service(env, root) as svc:
        stop = asyncio.Event()
        load = Load(svc.port, env.texts, 16, 10**9, stop=stop)
        refusal: list[str] = []

        async def publish_all() -> None:
            for i in range(n_versions):
                await asyncio.sleep(period)
                bundle = env.bundles[(i + 1) % len(env.bundles)]
                if i == corrupt_at:
                    tmp = model / f".tmp-bad{i}"
                    shutil.copytree(bundle, tmp)
                    corrupt(tmp)
                    tmp.rename(model / str(i + 2))
                    refusal.append(await _refused(svc))
                else:
                    good.add(_version(bundle))
                    await asyncio.to_thread(publish, model, str(i + 2), bundle)
            await asyncio.sleep(2.0)
            stop.set()

        run_load(load, publish_all)
    seen = {o.version for o in load.outcomes if o.status == 200}
    failed = sum(o.status != 200 for o in load.outcomes)
    ok = failed == 0 and seen <= good and bool(refusal and refusal[0])
    checked = (f"{n_versions} versions published (copy, then rename) every {period:.1f} s, "
               f"number {corrupt_at + 1} corrupt: refused ({refusal[0] if refusal else 'never'});"
               f" answers came from {len(seen)} distinct versions, all published: "
               f"{seen <= good}")
    return summary("model swaps", load.outcomes, "-", checked, ok)


async def _refused(svc: Service, deadline_s: float = 60) -> str:
    """The model's last error once the corrupt version was refused ('' if it never was); the
    wait includes loading the version published before it."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status, body = await asyncio.to_thread(svc.get, "/v1/models")
        errors = [m.get("last_error") for m in json.loads(body).get("models", [])]
        if status == 200 and any(errors):
            return str(errors[0])[:80]
        await asyncio.sleep(0.1)
    return ""


SCENARIOS: dict[str, Callable[[Env], Row]] = {
    "sustained": sustained, "soak": soak, "redis": redis_faults, "overload": overload,
    "workers": worker_faults, "swaps": swaps,
}


# ----------------------------------------------------------------------------- report


def _command(args: argparse.Namespace, name: str) -> str:
    return f"python -m benchmarks.reliability --scenario {name}" + (
        " --quick" if args.quick else "")


def table(rows: list[tuple[Row, str]]) -> str:
    lines = ["| scenario | requests | failed | p50 / p99 ms | recovery | what was checked | "
             "met | command |", "|---|---:|---:|---|---|---|---|---|"]
    for row, command in rows:
        lines.append(f"| {row.scenario} | {row.requests:,} | {row.failed} | "
                     f"{row.p50_ms:.1f} / {row.p99_ms:.1f} | {row.recovery} | {row.checked} | "
                     f"{'yes' if row.ok else '**no**'} | `{command}` |")
    return "\n".join(lines)


def write_doc(rows: list[tuple[Row, str]], machine: str) -> None:
    """Replace (or add, first in the file) the scenarios section of docs/RELIABILITY.md,
    keeping the rows of scenarios not rerun."""
    text = DOC.read_text()
    old_rows: dict[str, str] = {}
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        end = len(text) if end < 0 else end
        for line in text[start:end].splitlines():
            if line.startswith("| ") and not line.startswith(("| scenario", "|---")):
                old_rows[line.split("|")[1].strip()] = line
        text = text[:start] + text[end + 1:]
    new = table(rows).splitlines()
    for line in new[2:]:
        old_rows[line.split("|")[1].strip()] = line
    order = ["sustained", "soak", "redis faults", "overload", "worker faults", "model swaps"]
    body = "\n".join(new[:2] + [old_rows[k] for k in order if k in old_rows])
    section = (f"{SECTION}\n\nThe real service (`xmc serve`, 2 workers, a cooking repository, "
               f"a Redis of its own) on loopback, driven by `benchmarks/reliability.py`'s "
               f"closed-loop generator on the same 2 cores. Latest run: {machine}.\n\n{body}\n\n")
    head, _, rest = text.partition("\n\n")
    DOC.write_text(f"{head}\n\n{section}{rest}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="run only these (repeatable); default: all")
    ap.add_argument("--quick", action="store_true", help="CI sizes")
    ap.add_argument("--write", action="store_true", help="update docs/RELIABILITY.md")
    args = ap.parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="xmc-rel-") as tmp:
        env = make_env(Path(tmp), args.quick)
        try:
            for name in names:
                load_before = os.getloadavg()[0]
                row = SCENARIOS[name](env)
                rows.append((row, _command(args, name)))
                print(table([rows[-1]]).splitlines()[-1], flush=True)
                print(f"  load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}",
                      flush=True)
        finally:
            env.redis.kill()
    machine = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} "
               f"cores, 1-min load average {os.getloadavg()[0]:.1f} at the end")
    if args.write:
        write_doc(rows, machine)
    return 0 if all(r.ok for r, _ in rows) else 1


def make_env(workdir: Path, quick: bool) -> Env:
    n_trees = 1 if quick else 3
    bundles = [build_bundle(workdir / f"bundle-{seed}", seed, n_trees) for seed in (0, 1, 2)]
    warm_kernels(bundles)
    root = workdir / "repo"
    (root / "cooking").mkdir(parents=True)
    publish(root / "cooking", "1", bundles[0])
    return Env(workdir, root, bundles, texts(), quick, Redis(workdir))


if __name__ == "__main__":
    sys.exit(main())
