"""Fixtures of the service tests: apps on the real tiny bundle, real Redis servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import models
from service.app import create_app
from service.settings import Settings

IN_CI = os.environ.get("CI") == "true"


def need(reason: str) -> None:
    """A missing service fails the run in CI and skips the test elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client: TestClient) -> None:
    """Startup loads the bundle before the first request, so the app is ready at once."""
    r = client.get("/readyz")
    assert r.status_code == 200, r.text


@pytest.fixture(scope="session")
def predictor(tiny_bundle: Path) -> Any:
    """One loaded predictor for the whole session: apps reuse it instead of re-loading."""
    p = models.load_bundle(str(tiny_bundle), mmap=True)
    p.warm_up()
    return p


@pytest.fixture(scope="session")
def sample_texts(request: pytest.FixtureRequest, tiny_bundle: Path) -> list[str]:
    """Eight distinct texts like the tiny bundle's corpus, so that answers differ; the tests
    compare with ``predictor.predict``, never with fixed labels."""
    try:  # the lead's conftest also offers the corpus the tiny bundle was built from
        _, test_docs = request.getfixturevalue("tiny_docs")
        texts = list(dict.fromkeys(d["text"] for d in test_docs))
        if len(texts) >= 8:
            return texts[:8]
    except pytest.FixtureLookupError:
        pass
    words: list[str] = []
    vocab = tiny_bundle / "tfidf_vocab.json"
    if vocab.is_file():
        words = [w for w in json.loads(vocab.read_text()) if " " not in w]
    if len(words) < 40:
        words = [f"word{i}" for i in range(40)]
    step = max(1, len(words) // 40)
    picked = words[::step]
    return [" ".join(picked[i : i + 5]) for i in range(0, 40, 5)]


@pytest.fixture
def make_client(tiny_bundle: Path, predictor: Any) -> Iterator[Callable[..., TestClient]]:
    """Factory: ``make_client(**settings)`` -> a TestClient whose app is ready."""
    stack = ExitStack()

    def factory(loader: Callable[[str], Any] | None = None, **overrides: Any) -> TestClient:
        fields: dict[str, Any] = {"bundle_path": tiny_bundle, "access_log": False}
        fields.update(overrides)
        app = create_app(Settings(**fields), loader=loader or (lambda path: predictor))
        client = stack.enter_context(TestClient(app))
        wait_ready(client)
        return client

    yield factory
    stack.close()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis at 127.0.0.1:6379."""
    import redis

    url = "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        need(f"no Redis at {url}: {exc}")
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    import redis

    prefix = f"xmc-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


class RedisProcess:
    """A redis-server of our own on a free port, to stop, pause and resume."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            need("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_up()

    def _wait_up(self) -> None:
        import redis

        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                redis.Redis.from_url(self.url, socket_timeout=0.5).ping()
                return
            except redis.RedisError:
                time.sleep(0.02)
        raise AssertionError("own redis-server did not start")

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tuned_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Any) -> Path:
    """A bundle with a threshold tuned at build, so that ``threshold: "auto"`` is valid."""
    from models.builder import build
    from tests.conftest import tiny_params

    train, _ = tiny_corpus
    out = tmp_path_factory.mktemp("bundles") / "tuned"
    return build(train, out, tiny_params(tune_threshold=True), name="tuned")


@contextmanager
def served(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a loopback port (for clients that need a
    real socket); yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 120
    while not server.started and time.monotonic() < end and thread.is_alive():
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="session")
def other_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Any) -> Path:
    """A second bundle from the same corpus with another seed: other content, so another
    version (content hash), which is what a reload must switch to."""
    from models.builder import build
    from tests.conftest import tiny_params

    train, _ = tiny_corpus
    out = tmp_path_factory.mktemp("bundles") / "other"
    return build(train, out, tiny_params(seed=1), name="other")


def largest_array(bundle: Path) -> Path:
    return max(bundle.glob("*.npy"), key=lambda p: p.stat().st_size)


def corrupt_copy(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` whose largest array lost its second half (an interrupted copy)."""
    shutil.copytree(bundle, dest)
    victim = largest_array(dest)
    with victim.open("r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    return dest


def version_of(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["version"])


@pytest.fixture(scope="session")
def annif_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_docs: Any) -> Path:
    """A bundle built the way an Annif user would: Annif's short-text corpus (URIs, some
    subjects by bare label) and a TSV vocabulary in English, so every label has a uri and a
    label, and every other one a notation."""
    from models.builder import build
    from models.data import read_corpus
    from models.vocab import read_vocab
    from tests.annif_data import write_annif_corpus, write_vocab_tsv
    from tests.conftest import tiny_params

    train, _ = tiny_docs
    folder = tmp_path_factory.mktemp("annif")
    corpus = write_annif_corpus(folder / "train.tsv", train)
    names = sorted({lab for d in train for lab in d["labels"]})
    vocab = read_vocab(write_vocab_tsv(folder / "vocab.tsv", names), language="en")
    return build(read_corpus(corpus), folder / "yso", tiny_params(), name="yso-test",
                 vocab=vocab)
