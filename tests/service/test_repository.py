"""The model repository in one process: layout rules, several models, default-model rules,
reload (route and watcher), refused versions, and versions released only once drained."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import models
from service import repository
from service.app import create_app
from service.repository import publish
from service.settings import Settings
from tests.service.conftest import corrupt_copy, version_of
from tests.service.test_api import assert_problem


def make_dirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)


def test_current_link_wins(tmp_path: Path) -> None:
    make_dirs(tmp_path, "1", "2", "10")
    (tmp_path / "current").symlink_to("2")
    source = repository.resolve(tmp_path)
    assert (source.path, source.repository_version) == ((tmp_path / "2").resolve(), "2")


def test_greatest_version_as_integers_when_all_digits(tmp_path: Path) -> None:
    make_dirs(tmp_path, "2", "9", "10", ".tmp-x", ".99")
    (tmp_path / "notes.txt").write_text("a file is not a version")
    assert repository.resolve(tmp_path).repository_version == "10"


def test_greatest_version_as_strings_otherwise(tmp_path: Path) -> None:
    make_dirs(tmp_path, "2024-05-01", "2024-12-01", "2024-06-30")
    assert repository.resolve(tmp_path).repository_version == "2024-12-01"
    make_dirs(tmp_path, "9")  # one non-digit name: all compare as strings
    assert repository.resolve(tmp_path).repository_version == "9"


def test_no_version_or_broken_link_is_a_bundle_error(tmp_path: Path) -> None:
    make_dirs(tmp_path, ".tmp-only")
    with pytest.raises(models.BundleError, match="no version folder"):
        repository.resolve(tmp_path)
    (tmp_path / "current").symlink_to("7")
    with pytest.raises(models.BundleError, match="links to"):
        repository.resolve(tmp_path)


def test_models_are_folders_without_a_leading_dot(tmp_path: Path) -> None:
    make_dirs(tmp_path, "b", "a", ".hidden")
    assert repository.model_names(tmp_path) == ["a", "b"]


@pytest.fixture
def repo(tmp_path: Path, tiny_bundle: Path) -> Path:
    """Two models, alpha (versions 1 and 2, the same bundle) and beta (version 7)."""
    root = tmp_path / "repo"
    publish(root / "alpha", "1", tiny_bundle)
    publish(root / "alpha", "2", tiny_bundle)
    publish(root / "beta", "7", tiny_bundle)
    return root


@pytest.fixture
def serve_repo() -> Iterator[Callable[..., TestClient]]:
    stack = ExitStack()

    def factory(path: Path, **overrides: Any) -> TestClient:
        fields: dict[str, Any] = {"bundle_path": path, "access_log": False, "watch": False}
        fields.update(overrides)
        return stack.enter_context(TestClient(create_app(Settings(**fields))))

    yield factory
    stack.close()


def test_lists_models_and_routes_by_name(
    repo: Path, serve_repo: Callable[..., TestClient], tiny_bundle: Path, sample_texts: list[str]
) -> None:
    c = serve_repo(repo)
    body = c.get("/v1/models").json()
    assert body["default"] is None
    listed = {m["name"]: m for m in body["models"]}
    assert set(listed) == {"alpha", "beta"}
    assert listed["alpha"]["repository_version"] == "2"
    assert listed["beta"]["repository_version"] == "7"
    for m in listed.values():
        assert m["version"] == version_of(tiny_bundle)
        assert m["state"] == "ready" and m["last_error"] is None
        assert m["n_labels"] > 0 and m["encoders"]
    r = c.post("/v1/models/beta/predict", json={"text": sample_texts[0]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == {"name": "beta", "version": version_of(tiny_bundle)}
    r = c.post("/v1/models/alpha/predict/batch", json={"documents": [{"text": "x y"}]})
    assert r.json()["model"]["name"] == "alpha"
    info = c.get("/v1/models/alpha").json()
    assert (info["name"], info["repository_version"]) == ("alpha", "2")
    assert c.get("/v1/models/alpha/ready").json()["state"] == "ready"
    for path in ("/v1/models/gamma", "/v1/models/gamma/ready"):
        assert assert_problem(c.get(path), 404)["models"] == ["alpha", "beta"]
    problem = assert_problem(c.post("/v1/models/gamma/predict", json={"text": "a"}), 404)
    assert problem["models"] == ["alpha", "beta"]


def test_default_model_rules(repo: Path, serve_repo: Callable[..., TestClient]) -> None:
    several = serve_repo(repo)
    for r in (
        several.post("/v1/predict", json={"text": "a text"}),
        several.post("/v1/predict/batch", json={"documents": [{"text": "a text"}]}),
        several.get("/v1/model"),
    ):
        problem = assert_problem(r, 404)
        assert problem["models"] == ["alpha", "beta"]
        assert "XMC_DEFAULT_MODEL" in problem["detail"]
    named = serve_repo(repo, default_model="beta")
    assert named.post("/v1/predict", json={"text": "a text"}).json()["model"]["name"] == "beta"
    assert named.get("/v1/model").json()["repository_version"] == "7"
    assert named.get("/readyz").json()["model"]["name"] == "beta"
    wrong = serve_repo(repo, default_model="gamma")
    assert "gamma" in assert_problem(wrong.get("/v1/model"), 404)["detail"]


def test_one_model_is_the_default(
    tmp_path: Path, tiny_bundle: Path, serve_repo: Callable[..., TestClient]
) -> None:
    publish(tmp_path / "only", "3", tiny_bundle)
    c = serve_repo(tmp_path)
    assert c.post("/v1/predict", json={"text": "a text"}).json()["model"]["name"] == "only"


def test_bundle_defaults_for_top_k_and_beam_size(
    tmp_path: Path, tiny_bundle: Path, serve_repo: Callable[..., TestClient],
    sample_texts: list[str],
) -> None:  # fmt: skip
    """Without top_k, the answer has the bundle's top_k (params.top_k), not a fixed 5."""
    import json

    bundle = tmp_path / "b"
    import shutil

    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["params"]["top_k"] = 2
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    c = serve_repo(bundle, lru_size=0)
    text = next(t for t in sample_texts
                if len(c.post("/v1/predict", json={"text": t, "top_k": 5}).json()["labels"]) > 2)
    assert len(c.post("/v1/predict", json={"text": text}).json()["labels"]) == 2  # fmt: skip
    batch = c.post("/v1/predict/batch", json={"documents": [{"text": text}]}).json()
    assert len(batch["results"][0]["labels"]) == 2


def metric(c: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_reload_route_switches_and_refuses_a_corrupt_version(
    tmp_path: Path, tiny_bundle: Path, other_bundle: Path,
    serve_repo: Callable[..., TestClient], sample_texts: list[str],
) -> None:  # fmt: skip
    root = tmp_path / "repo"
    publish(root / "m", "1", tiny_bundle)
    c = serve_repo(root)
    old, new = version_of(tiny_bundle), version_of(other_bundle)
    assert c.post("/v1/models/m/reload").json()["outcome"] == "unchanged"
    publish(root / "m", "2", other_bundle)
    # Not watched here: nothing changes until the reload.
    assert c.post("/v1/predict", json={"text": sample_texts[0]}).json()["model"]["version"] == old
    r = c.post("/v1/models/m/reload")
    assert r.status_code == 200, r.text
    assert (r.json()["outcome"], r.json()["version"], r.json()["repository_version"]) == (
        "switched", new, "2")
    assert c.post("/v1/predict", json={"text": sample_texts[0]}).json()["model"]["version"] == new

    refused_before = metric(c, "xmc_model_reloads_total", model="m", outcome="refused")
    corrupt_copy(other_bundle, root / "m" / ".tmp-3")
    (root / "m" / ".tmp-3").rename(root / "m" / "3")
    problem = assert_problem(c.post("/v1/models/m/reload"), 409)
    assert "keeps serving" in problem["detail"] and new in problem["detail"]
    assert problem["model"]["version"] == new
    r = c.post("/v1/predict", json={"text": sample_texts[1]})
    assert r.status_code == 200 and r.json()["model"]["version"] == new
    listed = c.get("/v1/models").json()["models"][0]
    assert listed["state"] == "ready" and listed["repository_version"] == "2"
    assert "corrupt" in listed["last_error"] or "mmap" in listed["last_error"]
    assert c.get("/readyz").status_code == 200
    after = metric(c, "xmc_model_reloads_total", model="m", outcome="refused")
    assert after == refused_before + 1


def test_a_model_that_cannot_load_is_failed_and_the_others_serve(
    tmp_path: Path, tiny_bundle: Path, serve_repo: Callable[..., TestClient]
) -> None:
    root = tmp_path / "repo"
    publish(root / "good", "1", tiny_bundle)
    corrupt_copy(tiny_bundle, root / "bad" / "1")
    c = serve_repo(root)
    ready = c.get("/readyz")
    assert ready.status_code == 200
    assert [f["name"] for f in ready.json()["failed"]] == ["bad"]
    states = {m["name"]: m["state"] for m in c.get("/v1/models").json()["models"]}
    assert states == {"bad": "failed", "good": "ready"}
    assert_problem(c.post("/v1/models/bad/predict", json={"text": "a"}), 503)
    assert c.get("/v1/models/bad/ready").status_code == 503
    assert c.post("/v1/models/good/predict", json={"text": "a b"}).status_code == 200


def test_no_model_at_all_stops_startup(tmp_path: Path, tiny_bundle: Path) -> None:
    corrupt_copy(tiny_bundle, tmp_path / "repo" / "bad" / "1")
    app = create_app(Settings(bundle_path=tmp_path / "repo", access_log=False, watch=False))
    with pytest.raises(models.BundleError, match="no model can be served"), TestClient(app):
        pass


def test_a_watched_repository_switches_by_itself(
    tmp_path: Path, tiny_bundle: Path, other_bundle: Path, serve_repo: Callable[..., TestClient]
) -> None:
    root = tmp_path / "repo"
    publish(root / "m", "1", tiny_bundle)
    c = serve_repo(root, watch=True)
    publish(root / "m", "2", other_bundle)
    end = time.monotonic() + 60  # a deadline, not a timing assertion
    while time.monotonic() < end:
        if c.get("/v1/models/m").json()["version"] == version_of(other_bundle):
            break
        time.sleep(0.1)
    assert c.get("/v1/models/m").json()["repository_version"] == "2"
    # A new model published into the repository is found too.
    publish(root / "n", "1", tiny_bundle)
    while time.monotonic() < end and c.get("/v1/models/n/ready").status_code != 200:
        time.sleep(0.1)
    assert c.get("/v1/models/n/ready").json()["repository_version"] == "1"


def test_reload_needs_a_key_and_health_stays_open(
    repo: Path, serve_repo: Callable[..., TestClient]
) -> None:
    c = serve_repo(repo, api_keys="k1")
    for method, path in (("POST", "/v1/models/alpha/reload"), ("GET", "/v1/models"),
                         ("GET", "/v1/models/alpha"), ("GET", "/v1/models/alpha/ready"),
                         ("POST", "/v1/models/alpha/predict")):  # fmt: skip
        assert_problem(c.request(method, path), 401)
    auth = {"Authorization": "Bearer k1"}
    assert c.post("/v1/models/alpha/reload", headers=auth).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert c.get(path).status_code == 200, path


def test_every_route_is_authorized_unless_open(
    repo: Path, serve_repo: Callable[..., TestClient]
) -> None:
    """A route added to the app later gets the key check without asking for it."""
    from service.app import OPEN_PATHS, OPEN_PREFIXES

    c = serve_repo(repo, api_keys="k1")

    @c.app.get("/v1/added-later")  # type: ignore[attr-defined]
    async def added() -> dict[str, str]:
        return {"secret": "x"}

    assert_problem(c.get("/v1/added-later"), 401)
    assert c.get("/v1/added-later", headers={"Authorization": "Bearer k1"}).status_code == 200
    spec = c.get("/openapi.json").json()
    checked = 0
    for path, methods in spec["paths"].items():
        url = path.replace("{name}", "alpha")
        for method in methods:
            r = c.request(method.upper(), url)
            if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
                assert r.status_code == 200, (method, path)
            else:
                assert_problem(r, 401)
                checked += 1
    assert checked >= 12


class Gated:
    """The real predictor; predictions wait for ``release``; counts closes."""

    def __init__(self, inner: Any, started: threading.Event, release: threading.Event) -> None:
        self._inner, self.started, self.release = inner, started, release
        self.closed = 0

    def predict(self, texts: Any, **kwargs: Any) -> Any:
        self.started.set()
        self.release.wait(60)
        return self._inner.predict(texts, **kwargs)

    def close(self) -> None:
        self.closed += 1
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_replaced_version_is_released_only_after_its_requests(
    tmp_path: Path, tiny_bundle: Path, other_bundle: Path
) -> None:
    root = tmp_path / "repo"
    publish(root / "m", "1", tiny_bundle)
    started, release = threading.Event(), threading.Event()
    loaded: list[Gated] = []

    def loader(path: str) -> Any:
        gated = Gated(models.load_bundle(path), started, release)
        loaded.append(gated)
        return gated

    settings = Settings(bundle_path=root, access_log=False, watch=False, lru_size=0)
    app = create_app(settings, loader=loader)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url="http://t")
        async with client as c, app.router.lifespan_context(app):
            old = loaded[0]  # warm-up runs the inner predictor: not gated
            in_flight = asyncio.ensure_future(c.post("/v1/predict", json={"text": "a b c"}))
            while not started.is_set():
                await asyncio.sleep(0.01)
            publish(root / "m", "2", other_bundle)
            reload = await c.post("/v1/models/m/reload")
            assert reload.json()["outcome"] == "switched"
            assert old.closed == 0  # its request is still running
            release.set()
            answer = await in_flight
            assert answer.json()["model"]["version"] == version_of(tiny_bundle)
            for _ in range(250):  # closed in a thread: wait for it, with a deadline
                if old.closed:
                    break
                await asyncio.sleep(0.02)
            assert old.closed == 1
            fresh = await c.post("/v1/predict", json={"text": "a b c"})
            assert fresh.json()["model"]["version"] == version_of(other_bundle)
            assert loaded[1].closed == 0

    asyncio.run(scenario())


def test_a_replaced_version_is_freed(
    tmp_path: Path, tiny_bundle: Path, other_bundle: Path, serve_repo: Callable[..., TestClient],
) -> None:  # fmt: skip
    """Closed and garbage once drained: nothing in the service (threads, coalescer, registry)
    keeps a replaced version and its memory maps alive."""
    import weakref

    root = tmp_path / "repo"
    publish(root / "m", "1", tiny_bundle)
    refs: list[weakref.ref[Any]] = []

    def loader(path: str) -> Any:
        predictor = models.Predictor.load(path, threads=2)  # a search pool: more cycles
        refs.append(weakref.ref(predictor))
        return predictor

    c = TestClient(create_app(Settings(bundle_path=root, access_log=False, watch=False,
                                       lru_size=0), loader=loader))  # fmt: skip
    batch = {"documents": [{"text": f"a b {i}"} for i in range(600)]}
    with c:
        assert c.post("/v1/predict/batch", json=batch).status_code == 200
        publish(root / "m", "2", other_bundle)
        assert c.post("/v1/models/m/reload").json()["outcome"] == "switched"
        assert c.post("/v1/predict", json={"text": "a b"}).status_code == 200
        end = time.monotonic() + 30  # closed in a thread: a deadline, not a timing
        while refs[0]() is not None and time.monotonic() < end:
            time.sleep(0.05)
        assert refs[0]() is None
        assert refs[1]() is not None


def test_lone_bundle_replaced_by_rename_is_reloaded(
    tmp_path: Path, tiny_bundle: Path, other_bundle: Path, serve_repo: Callable[..., TestClient]
) -> None:
    """`xmc build --force` over a served bundle renames a new folder into place."""
    import shutil

    served = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, served)
    c = serve_repo(served)
    name = c.get("/v1/model").json()["name"]
    shutil.copytree(other_bundle, tmp_path / ".new")
    served.rename(tmp_path / ".old")
    (tmp_path / ".new").rename(served)
    r = c.post(f"/v1/models/{name}/reload")
    assert r.status_code == 200 and r.json()["version"] == version_of(other_bundle)
    assert os.path.isdir(served)


def test_lone_bundle_behind_a_link_follows_the_link(
    tmp_path: Path, tiny_bundle: Path, other_bundle: Path, serve_repo: Callable[..., TestClient]
) -> None:
    """`xmc serve live` where live -> a: re-pointing the link (atomically) switches."""
    live = tmp_path / "live"
    live.symlink_to(tiny_bundle)
    c = serve_repo(live)
    name = c.get("/v1/model").json()["name"]
    (tmp_path / ".live.tmp").symlink_to(other_bundle)
    os.replace(tmp_path / ".live.tmp", live)
    r = c.post(f"/v1/models/{name}/reload")
    assert r.status_code == 200 and r.json()["version"] == version_of(other_bundle)


def test_a_fault_seen_again_is_logged_once(
    tmp_path: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the watcher looks again at every change under the repository: a model folder that has
    # no version yet must not fill the log at each look (it did, several lines a second)
    from service.registry import ModelEntry, refresh

    empty = tmp_path / "repo" / "pending"
    empty.mkdir(parents=True)
    entry = ModelEntry("pending", empty, in_repository=True)

    def load(path: str) -> Any:
        return models.Predictor.load(path, mmap=True)

    async def scenario() -> tuple[list[str], str]:
        first = [await refresh(entry, load, force=False) for _ in range(5)]
        publish(tmp_path / "repo" / "pending", "1", tiny_bundle)  # once there, it serves
        then = await refresh(entry, load, force=False)
        if entry.current is not None:
            entry.current.retire()
        return first, then

    with caplog.at_level("ERROR", logger="xmc.service"):
        first, then = asyncio.run(scenario())
    assert first == ["refused"] * 5 and then == "switched"
    assert len([r for r in caplog.records if "cannot be served" in r.getMessage()]) == 1
