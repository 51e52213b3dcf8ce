"""Hot reload through the real ``xmc serve`` on loopback: a repository of two models and
2 workers, a version published under load with no failed request, SIGHUP and the reload
route reaching every worker, a corrupt version refused, a bundle overwritten in place."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from service.repository import publish
from tests.service.conftest import corrupt_copy, version_of
from tests.service.test_serve import REPO, XMC, free_port, listening_sockets, stop

# Loopback load: bounded in requests and in time (neither is asserted on).
N_REQUESTS = 20_000
CONCURRENCY = 16
LOAD_DEADLINE_S = 150.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(path: Path, workers: int, log: Path, **env: str) -> Server:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(XMC), "serve", str(path), "--port", str(port), "--workers", str(workers)],
            cwd=REPO, env={**os.environ, "XMC_ACCESS_LOG": "false", **env},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(proc, f"http://127.0.0.1:{port}", port, log)
    end = time.monotonic() + 180
    while time.monotonic() < end and listening_sockets(port) < workers:
        assert proc.poll() is None, server.output()[-3000:]
        time.sleep(0.1)
    assert listening_sockets(port) == workers, server.output()[-3000:]
    return server


def fresh_versions(server: Server, name: str, n: int = 20) -> list[str]:
    """The version each of ``n`` new connections is answered with: the kernel spreads new
    connections over the workers, so 20 of them reach both (all on one: 2 in a million)."""
    versions = []
    for _ in range(n):
        with httpx.Client(base_url=server.base, timeout=30) as c:
            r = c.post(f"/v1/models/{name}/predict", json={"text": "some words"})
            assert r.status_code == 200, r.text
            versions.append(r.json()["model"]["version"])
    return versions


def wait_all(server: Server, name: str, version: str, deadline_s: float = 90) -> list[str]:
    end = time.monotonic() + deadline_s
    seen = fresh_versions(server, name)
    while time.monotonic() < end and set(seen) != {version}:
        time.sleep(0.2)
        seen = fresh_versions(server, name)
    return seen


@pytest.fixture(scope="module")
def bundles(tiny_bundle: Path, other_bundle: Path) -> tuple[Path, Path]:
    return tiny_bundle, other_bundle


@pytest.fixture
def watched(tmp_path: Path, bundles: tuple[Path, Path]) -> Iterator[tuple[Server, Path]]:
    """Two models (alpha, beta), 2 workers, watching the repository."""
    root = tmp_path / "repo"
    publish(root / "alpha", "1", bundles[0])
    publish(root / "beta", "1", bundles[0])
    server = start(root, 2, tmp_path / "server.log")
    try:
        yield server, root
    finally:
        assert stop(server.proc) == 0, server.output()[-3000:]


@dataclass
class Load:
    """What a keep-alive load run saw: per connection the versions in order."""

    versions: list[list[str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    done: int = 0


async def _connection(port: int, texts: list[str], load: Load, stop_when: asyncio.Event,
                      mine: list[str]) -> None:  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while not stop_when.is_set():
            body = orjson.dumps({"text": texts[i % len(texts)]})
            i += 7
            writer.write(
                b"POST /v1/models/alpha/predict HTTP/1.1\r\nHost: t\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body
            )  # fmt: skip
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            payload = await reader.readexactly(length)
            load.done += 1
            if not head.startswith(b"HTTP/1.1 200"):
                load.failures.append(head.split(b"\r\n")[0].decode() + payload.decode())
                continue
            mine.append(orjson.loads(payload)["model"]["version"])
    except (OSError, asyncio.IncompleteReadError) as exc:
        load.failures.append(f"connection: {exc!r}")
    finally:
        writer.close()


async def _run_load(server: Server, texts: list[str], publish_at: int, new: str,
                    publish_new: object) -> Load:  # fmt: skip
    load = Load()
    stop_when = asyncio.Event()
    load.versions = [[] for _ in range(CONCURRENCY)]
    tasks = [asyncio.ensure_future(_connection(server.port, texts, load, stop_when, mine))
             for mine in load.versions]  # fmt: skip
    end = time.monotonic() + LOAD_DEADLINE_S
    published = False
    while time.monotonic() < end and not all(t.done() for t in tasks):
        await asyncio.sleep(0.05)
        if not published and load.done >= publish_at:
            await asyncio.to_thread(publish_new)  # type: ignore[arg-type]
            published = True
        # Enough requests, and every connection (each pinned to a worker) has switched.
        if load.done >= N_REQUESTS and all(v and v[-1] == new for v in load.versions):
            break
    stop_when.set()
    await asyncio.gather(*tasks)
    return load


def test_publish_under_load_fails_no_request(
    watched: tuple[Server, Path], bundles: tuple[Path, Path], sample_texts: list[str]
) -> None:
    server, root = watched
    old, new = version_of(bundles[0]), version_of(bundles[1])
    texts = [f"{t} {i}" for i in range(8) for t in sample_texts]  # some hits, some misses
    load = asyncio.run(_run_load(server, texts, 3000, new,
                                 lambda: publish(root / "alpha", "2", bundles[1])))  # fmt: skip
    assert load.failures == []
    assert load.done >= N_REQUESTS
    seen = {v for per_connection in load.versions for v in per_connection}
    assert seen == {old, new}
    for per_connection in load.versions:
        # Old answers, then new ones: a connection never goes back to the old version.
        switch = per_connection.index(new)
        assert set(per_connection[:switch]) <= {old}
        assert set(per_connection[switch:]) == {new}
    assert set(wait_all(server, "alpha", new)) == {new}
    assert set(fresh_versions(server, "beta")) == {old}  # the other model is untouched
    listed = httpx.get(f"{server.base}/v1/models", timeout=30).json()["models"]
    assert [(m["name"], m["repository_version"]) for m in listed] == [("alpha", "2"),
                                                                       ("beta", "1")]


@pytest.fixture
def unwatched(tmp_path: Path, bundles: tuple[Path, Path]) -> Iterator[tuple[Server, Path]]:
    root = tmp_path / "repo"
    publish(root / "alpha", "1", bundles[0])
    publish(root / "beta", "1", bundles[0])
    server = start(root, 2, tmp_path / "server.log", XMC_WATCH="false")
    try:
        yield server, root
    finally:
        assert stop(server.proc) == 0, server.output()[-3000:]


def test_sighup_and_reload_route_reach_every_worker(
    unwatched: tuple[Server, Path], bundles: tuple[Path, Path]
) -> None:
    server, root = unwatched
    old, new = version_of(bundles[0]), version_of(bundles[1])
    publish(root / "beta", "2", bundles[1])
    time.sleep(1.0)  # not watched: nothing may change by itself
    assert set(fresh_versions(server, "beta")) == {old}
    os.kill(server.proc.pid, signal.SIGHUP)  # the supervisor relays it to every worker
    assert set(wait_all(server, "beta", new)) == {new}

    publish(root / "alpha", "2", bundles[1])
    r = httpx.post(f"{server.base}/v1/models/alpha/reload", timeout=60)
    assert r.status_code == 200, r.text
    assert (r.json()["outcome"], r.json()["version"]) == ("switched", new)
    # The worker that got the route switched before answering; the other one follows.
    assert set(wait_all(server, "alpha", new)) == {new}

    corrupt_copy(bundles[0], root / "alpha" / ".tmp-3")
    (root / "alpha" / ".tmp-3").rename(root / "alpha" / "3")
    r = httpx.post(f"{server.base}/v1/models/alpha/reload", timeout=60)
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    time.sleep(1.0)  # let the relayed rescan run in both workers
    assert set(fresh_versions(server, "alpha")) == {new}
    assert httpx.get(f"{server.base}/readyz", timeout=30).status_code == 200
    output = server.output()
    assert "new version refused" in output and "NAME/.tmp-x/" in output


def test_a_bundle_overwritten_in_place_is_survived(
    tmp_path: Path, bundles: tuple[Path, Path], sample_texts: list[str]
) -> None:
    """Copying over the served files: the truncated memory map kills the worker (SIGBUS);
    the supervisor, even of a single worker, brings the service back on the new files, and
    the log says what happened and how to publish safely."""
    root = tmp_path / "repo"
    served = publish(root / "m", "1", bundles[0])
    server = start(root, 1, tmp_path / "server.log", XMC_LRU_SIZE="0")
    try:
        r = httpx.post(f"{server.base}/v1/predict", json={"text": sample_texts[0]}, timeout=30)
        assert r.json()["model"]["version"] == version_of(bundles[0])
        # What `cp -r new/* served/` does first to each file: truncate it in place (the
        # weights: every search reads them through the memory map).
        for name in ("entry_child", "entry_val"):
            with (served / f"ensemble.{name}.npy").open("r+b") as fh:
                fh.truncate(0)
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{server.base}/v1/predict", json={"text": sample_texts[1]}, timeout=30)
        for src in bundles[1].iterdir():
            shutil.copyfile(src, served / src.name)
        new = version_of(bundles[1])
        end = time.monotonic() + 120
        answer = None
        while time.monotonic() < end and answer != new:
            try:
                r = httpx.post(f"{server.base}/v1/predict", json={"text": sample_texts[2]},
                               timeout=30)  # fmt: skip
                answer = r.json()["model"]["version"] if r.status_code == 200 else None
            except httpx.HTTPError:
                time.sleep(0.2)
        assert answer == new, server.output()[-3000:]
        output = server.output()
        assert "SIGBUS" in output and "NAME/.tmp-x/" in output
        assert server.proc.poll() is None
    finally:
        assert stop(server.proc) == 0, server.output()[-3000:]
