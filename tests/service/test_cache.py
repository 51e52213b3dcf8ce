"""The answer cache: in-process LRU and the real Redis, including Redis going away."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.cache import cache_key, normalize_text


class SpyPredictor:
    """The real predictor, counting the documents it is asked to score; ``version`` can be
    overridden to stand for a rebuilt bundle."""

    def __init__(self, inner: Any, version: str | None = None) -> None:
        self._inner = inner
        self._version = version
        self.scored: list[str] = []

    @property
    def version(self) -> str:
        return self._version or self._inner.version

    def predict(self, texts: Any, **kwargs: Any) -> Any:
        self.scored.extend(texts)
        return self._inner.predict(texts, **kwargs)

    def encode(self, texts: Any) -> Any:
        self.scored.extend(texts)
        return self._inner.encode(texts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def counter(client: TestClient, name: str) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def labels_of(r: Any) -> list[tuple[str, float]]:
    assert r.status_code == 200, r.text
    return [(x["label"], x["score"]) for x in r.json()["labels"]]


def test_key_depends_on_version_text_and_params() -> None:
    base = cache_key("p:", "v1", "some text", 5, 10)
    assert base.startswith("p:v1:")
    assert cache_key("p:", "v2", "some text", 5, 10) != base
    assert cache_key("p:", "v1", "other text", 5, 10) != base
    assert cache_key("p:", "v1", "some text", 6, 10) != base
    assert cache_key("p:", "v1", "some text", 5, 11) != base
    assert normalize_text("  some \n text\t") == "some text"


def test_lru_cached_equals_uncached(
    make_client: Callable[..., TestClient], predictor: Any, sample_texts: list[str]
) -> None:
    spy = SpyPredictor(predictor)
    c = make_client(loader=lambda path: spy)
    spy.scored.clear()
    first = c.post("/v1/predict", json={"text": sample_texts[0], "top_k": 4})
    assert first.json()["cached"] is False
    # Same text up to whitespace: the same key, a hit, the identical answer.
    again = c.post("/v1/predict", json={"text": f"  {sample_texts[0]} ", "top_k": 4})
    assert again.json()["cached"] is True
    assert labels_of(again) == labels_of(first)
    assert len(spy.scored) == 1
    # Other parameters are another key.
    other = c.post("/v1/predict", json={"text": sample_texts[0], "top_k": 3})
    assert other.json()["cached"] is False
    # min_score filters after the lookup, so it is served from the cache.
    cut = labels_of(first)[1][1]
    r = c.post("/v1/predict", json={"text": sample_texts[0], "top_k": 4, "min_score": cut})
    assert r.json()["cached"] is True
    assert labels_of(r) == [x for x in labels_of(first) if x[1] >= cut]


def test_batch_scores_only_misses(
    make_client: Callable[..., TestClient], predictor: Any, sample_texts: list[str]
) -> None:
    spy = SpyPredictor(predictor)
    c = make_client(loader=lambda path: spy)
    single = c.post("/v1/predict", json={"text": sample_texts[1]})
    spy.scored.clear()
    docs = [{"id": i, "text": t} for i, t in enumerate(sample_texts[:4])]
    docs.append({"id": "dup", "text": sample_texts[2]})
    body = c.post("/v1/predict/batch", json={"documents": docs}).json()
    assert [r["cached"] for r in body["results"]] == [False, True, False, False, False]
    # One vectorized call for the three unique misses: the hit and the repeat are not scored.
    assert sorted(spy.scored) == sorted([sample_texts[0], sample_texts[2], sample_texts[3]])
    assert body["results"][1]["labels"] == single.json()["labels"]
    assert body["results"][4]["labels"] == body["results"][2]["labels"]
    spy.scored.clear()
    again = c.post("/v1/predict/batch", json={"documents": docs}).json()
    assert all(r["cached"] for r in again["results"])
    assert spy.scored == []
    assert [r["labels"] for r in again["results"]] == [r["labels"] for r in body["results"]]


@pytest.mark.redis
def test_redis_cached_equals_uncached(
    make_client: Callable[..., TestClient],
    redis_url: str,
    redis_prefix: str,
    sample_texts: list[str],
    predictor: Any,
) -> None:
    c = make_client(redis_url=redis_url, cache_prefix=redis_prefix, cache_ttl_seconds=120)
    assert c.get("/readyz").json()["cache"] == {"backend": "redis", "state": "ok"}
    hits = counter(c, "xmc_cache_hits_total")
    first = c.post("/v1/predict", json={"text": sample_texts[3]})
    assert first.json()["cached"] is False
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{redis_prefix}*"))
    assert len(keys) == 1
    assert keys[0].decode().startswith(f"{redis_prefix}{predictor.version}:")
    assert 0 < r.ttl(keys[0]) <= 120
    second = c.post("/v1/predict", json={"text": sample_texts[3]})
    assert second.json()["cached"] is True
    assert labels_of(second) == labels_of(first)
    assert counter(c, "xmc_cache_hits_total") == hits + 1
    # A batch reads its hits from Redis too, with identical answers.
    docs = [{"text": sample_texts[3]}, {"text": sample_texts[4]}]
    batch = c.post("/v1/predict/batch", json={"documents": docs}).json()
    assert [x["cached"] for x in batch["results"]] == [True, False]
    assert batch["results"][0]["labels"] == first.json()["labels"]
    r.close()


@pytest.mark.redis
def test_new_version_never_reads_old_answers(
    make_client: Callable[..., TestClient],
    redis_url: str,
    redis_prefix: str,
    sample_texts: list[str],
    predictor: Any,
) -> None:
    old = make_client(redis_url=redis_url, cache_prefix=redis_prefix)
    old.post("/v1/predict", json={"text": sample_texts[5]})
    assert old.post("/v1/predict", json={"text": sample_texts[5]}).json()["cached"] is True
    rebuilt = SpyPredictor(predictor, version="rebuilt-0001")
    new = make_client(loader=lambda p: rebuilt, redis_url=redis_url, cache_prefix=redis_prefix)
    r = new.post("/v1/predict", json={"text": sample_texts[5]})
    assert r.json()["cached"] is False
    assert r.json()["model"]["version"] == "rebuilt-0001"
    assert new.post("/v1/predict", json={"text": sample_texts[5]}).json()["cached"] is True


@pytest.mark.redis
def test_batch_hits_in_one_round_trip(
    make_client: Callable[..., TestClient], own_redis: Any, sample_texts: list[str]
) -> None:
    c = make_client(redis_url=own_redis.url)
    docs = [{"text": t} for t in sample_texts[:6]]
    c.post("/v1/predict/batch", json={"documents": docs})
    r = redis.Redis.from_url(own_redis.url)
    r.config_resetstat()
    body = c.post("/v1/predict/batch", json={"documents": docs}).json()
    assert all(x["cached"] for x in body["results"])
    stats = r.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats
    r.close()


def wait_cache_state(c: TestClient, state: str, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if c.get("/readyz").json()["cache"]["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"cache never became {state}")


@pytest.mark.redis
def test_paused_redis_is_bypassed_then_used_again(
    make_client: Callable[..., TestClient], own_redis: Any, sample_texts: list[str]
) -> None:
    c = make_client(
        redis_url=own_redis.url,
        cache_probe_seconds=0.2,
    )
    warm = c.post("/v1/predict", json={"text": sample_texts[6]})
    assert c.post("/v1/predict", json={"text": sample_texts[6]}).json()["cached"] is True
    errors = counter(c, "xmc_cache_errors_total")
    own_redis.pause()  # SIGSTOP: connections hang, the socket timeout must fire
    try:
        for text in (sample_texts[6], sample_texts[7], sample_texts[6]):
            r = c.post("/v1/predict", json={"text": text})
            assert r.status_code == 200
            assert r.json()["cached"] is False
        assert labels_of(r) == labels_of(warm)
        assert counter(c, "xmc_cache_errors_total") > errors
        ready = c.get("/readyz")
        assert ready.status_code == 200  # a degraded cache is still ready
        assert ready.json()["cache"] == {"backend": "redis", "state": "degraded"}
    finally:
        own_redis.resume()
    wait_cache_state(c, "ok")
    r = c.post("/v1/predict", json={"text": sample_texts[6]})
    assert r.json()["cached"] is True
    assert labels_of(r) == labels_of(warm)


@pytest.mark.redis
def test_client_pause_and_dead_redis(
    make_client: Callable[..., TestClient], own_redis: Any, sample_texts: list[str]
) -> None:
    c = make_client(redis_url=own_redis.url, cache_probe_seconds=0.2)
    c.post("/v1/predict", json={"text": sample_texts[0]})
    admin = redis.Redis.from_url(own_redis.url)
    admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")
    try:
        r = c.post("/v1/predict", json={"text": sample_texts[0]})
        assert r.status_code == 200
        assert r.json()["cached"] is False
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    wait_cache_state(c, "ok")
    own_redis.stop()  # gone for good: connection refused, never a failed request
    for text in sample_texts[:3]:
        r = c.post("/v1/predict", json={"text": text})
        assert r.status_code == 200
        assert r.json()["cached"] is False
    batch = c.post("/v1/predict/batch", json={"documents": [{"text": sample_texts[1]}]})
    assert batch.status_code == 200
    assert c.get("/readyz").status_code == 200
