"""``xmc serve`` as a real server process: multi-worker metrics, SIGTERM drain, exit codes,
and a fresh virtual environment with only the serving dependencies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
XMC = Path(sys.executable).parent / "xmc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ready(base: str, proc: subprocess.Popen[bytes], deadline_s: float = 180) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"server exited with {proc.returncode}: {out[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became ready")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def serve(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, "XMC_ACCESS_LOG": "false", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def two_workers(tiny_bundle: Path) -> Iterator[str]:
    port = free_port()
    env = {"XMC_LRU_SIZE": "0"}  # every request reaches a worker's model
    proc = serve([str(XMC), "serve", str(tiny_bundle), "--port", str(port), "--workers", "2"],
                 env)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(base, proc)
        yield base
    finally:
        assert stop(proc) == 0


def listening_sockets(port: int) -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_two_workers_count_every_request(two_workers: str, sample_texts: list[str]) -> None:
    """Multi-process metrics: N requests spread over 2 workers are N in /metrics."""
    port = int(two_workers.rsplit(":", 1)[1])
    # Each worker has its own SO_REUSEPORT socket, once loaded (the kernel spreads
    # connections over them); wait for the second one (a deadline, not a timing assertion).
    end = time.monotonic() + 120
    while listening_sockets(port) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    assert listening_sockets(port) == 2
    n = 24
    for i in range(n):
        # A new connection per request, so both workers take some.
        with httpx.Client(base_url=two_workers, timeout=30) as c:
            r = c.post("/v1/predict", json={"text": sample_texts[i % len(sample_texts)]})
            assert r.status_code == 200
    bad = httpx.post(f"{two_workers}/v1/predict", json={"text": ""}, timeout=30)
    assert bad.status_code == 422
    text = httpx.get(f"{two_workers}/metrics", timeout=30).text
    counts = {}
    pids = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "xmc_requests_total" and s.labels["endpoint"] == "/v1/predict":
                counts[s.labels["status"]] = s.value
            if s.name == "xmc_model_info":
                assert s.value == 1
            pid = s.labels.get("pid")
            if pid:
                pids.add(pid)
    assert counts == {"200": n, "422": 1}
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in ("xmc_requests", "xmc_request_duration_seconds", "xmc_stage_duration_seconds",
                 "xmc_cache_hits", "xmc_cache_misses", "xmc_cache_errors", "xmc_batch_size",
                 "xmc_model_info"):  # fmt: skip
        assert name in names, name


def test_sigterm_drains_in_flight_requests(tiny_bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    started, release = tmp_path / "started", tmp_path / "release"
    proc = serve(
        [sys.executable, str(Path(__file__).with_name("slow_app.py")), str(tiny_bundle),
         str(port), str(started), str(release)],
        env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(base, proc)
        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(f"{base}/v1/predict", json={"text": "in flight"}, timeout=120)
            )
        )
        thread.start()
        end = time.monotonic() + 60
        while not started.exists() and time.monotonic() < end:
            time.sleep(0.01)
        assert started.exists()
        proc.send_signal(signal.SIGTERM)
        # The server is shutting down but holds the in-flight request until it is answered.
        assert proc.poll() is None
        release.touch()
        thread.join(timeout=120)
        assert result["r"].status_code == 200
        assert "labels" in result["r"].json()
        # Plain uvicorn.run re-raises SIGTERM after draining (xmc serve turns that into 0).
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        release.touch()
        stop(proc)


def test_serve_refuses_a_bad_bundle(tmp_path: Path) -> None:
    missing = subprocess.run([str(XMC), "serve", str(tmp_path)], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert missing.returncode == 2
    assert "manifest.json" in missing.stderr
    (tmp_path / "manifest.json").write_text("{not json")
    corrupt = subprocess.run([str(XMC), "serve", str(tmp_path)], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert corrupt.returncode == 2
    assert "cannot load" in corrupt.stderr


@pytest.mark.slow
def test_fresh_venv_serves_without_builder_deps(tiny_bundle: Path, tmp_path: Path) -> None:
    """Only the serving dependencies (no extras): it serves, and sklearn/torch are absent."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("xmc-serve\n")
    for pkg in ("models", "service", "xmc"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(src)],
                             capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    for module in ("sklearn", "torch"):
        probe = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"{module} is importable in the serving venv"
    port = free_port()
    proc = subprocess.Popen(
        [str(venv / "bin" / "xmc"), "serve", str(tiny_bundle), "--port", str(port)],
        cwd=tmp_path,  # not the repo: the installed packages must be the ones used
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(base, proc)
        r = httpx.post(f"{base}/v1/predict", json={"text": "some words here", "top_k": 3},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert 1 <= len(body["labels"]) <= 3
        assert all(0 < x["score"] <= 1 for x in body["labels"])
        assert body["model"]["name"]
        # The page's files are package data: the installed package serves them.
        for path in ("/", "/static/page/page.js", "/static/page/page.css"):
            assert httpx.get(f"{base}{path}", timeout=10).status_code == 200, path
    finally:
        assert stop(proc) == 0


def test_single_worker_sigterm_exits_zero(tiny_bundle: Path, sample_texts: list[str]) -> None:
    port = free_port()
    proc = serve([str(XMC), "serve", str(tiny_bundle), "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(base, proc)
        r = httpx.post(f"{base}/v1/predict", json={"text": sample_texts[0]}, timeout=30)
        assert r.status_code == 200
    finally:
        assert stop(proc) == 0


def test_supervisor_restarts_a_dead_worker(two_workers: str, sample_texts: list[str]) -> None:
    port = int(two_workers.rsplit(":", 1)[1])
    end = time.monotonic() + 120
    while listening_sockets(port) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    supervisor = next(
        int(p.name) for p in Path("/proc").iterdir()
        if p.name.isdigit() and f"--port\0{port}".encode() in _cmdline(p)
    )  # fmt: skip
    workers = _workers(supervisor)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        now = _workers(supervisor)
        if len(now) == 2 and workers[0] not in now and listening_sockets(port) == 2:
            break
        time.sleep(0.1)
    now = _workers(supervisor)
    assert workers[0] not in now and workers[1] in now and len(now) == 2
    assert listening_sockets(port) == 2
    for text in sample_texts:
        with httpx.Client(base_url=two_workers, timeout=30) as c:
            assert c.post("/v1/predict", json={"text": text}).status_code == 200


def _workers(supervisor: int) -> list[int]:
    """Live worker processes (not zombies, not multiprocessing's resource tracker)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or _ppid(p) != supervisor:
            continue
        cmd = _cmdline(p)
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            found.append(int(p.name))
    return sorted(found)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_serving_imports_no_builder_sklearn_or_torch(tiny_bundle: Path) -> None:
    code = f"""
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
import service.cli, service.workers
with TestClient(create_app(Settings(bundle_path={str(tiny_bundle)!r}, access_log=False))) as c:
    assert c.post("/v1/predict", json={{"text": "a text"}}).status_code == 200
bad = sorted(m for m in sys.modules
             if m.split(".")[0] in ("sklearn", "torch") or m == "models.builder")
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
