"""/metrics exposition and the structured access log."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):  # raises if it does not parse
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict[Any, float], name: str, **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_stages_cache_and_batches(
    make_client: Callable[..., TestClient], sample_texts: list[str], predictor: Any
) -> None:
    c = make_client()
    before = samples(c)
    c.post("/v1/predict", json={"text": sample_texts[0]})
    c.post("/v1/predict", json={"text": sample_texts[0]})  # a hit
    c.post("/v1/predict", json={"text": ""})  # 422
    docs = [{"text": t} for t in sample_texts[1:4]]
    c.post("/v1/predict/batch", json={"documents": docs})
    after = samples(c)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("xmc_requests_total", endpoint="/v1/predict", status="200") == 2
    assert delta("xmc_requests_total", endpoint="/v1/predict", status="422") == 1
    assert delta("xmc_requests_total", endpoint="/v1/predict/batch", status="200") == 1
    assert delta("xmc_request_duration_seconds_count", endpoint="/v1/predict") == 3
    assert delta("xmc_cache_hits_total") == 1
    assert delta("xmc_cache_misses_total") == 4
    assert delta("xmc_batch_size_count") == 1
    assert delta("xmc_batch_size_sum") == 3
    for stage in ("parse", "cache", "predict", "encode", "search"):
        assert delta("xmc_stage_duration_seconds_count", stage=stage) >= 1, stage
    info = [k for k in after if k[0] == "xmc_model_info"]
    assert any(("version", predictor.version) in labels for _, labels in info)


def test_unmatched_paths_share_one_label(client: TestClient) -> None:
    for path in ("/a", "/b/c", "/d?x=1"):
        client.get(path)
    endpoints = {dict(labels).get("endpoint") for name, labels in samples(client)
                 if name == "xmc_requests_total"}  # fmt: skip
    assert "unmatched" in endpoints
    assert not {"/a", "/b/c", "/d"} & endpoints


@pytest.mark.parametrize("log_text", [False, True])
def test_access_log_is_json_without_text_unless_asked(
    make_client: Callable[..., TestClient],
    sample_texts: list[str],
    caplog: pytest.LogCaptureFixture,
    log_text: bool,
) -> None:
    from service.middleware import JSONFormatter

    c = make_client(access_log=True, log_text=log_text)
    with caplog.at_level(logging.INFO, logger="xmc.access"):
        c.post("/v1/predict", json={"text": sample_texts[2]}, headers={"X-Request-ID": "r-1"})
    records = [r for r in caplog.records if r.name == "xmc.access"]
    assert records
    line = JSONFormatter().format(records[-1])
    entry = json.loads(line)
    assert entry["request_id"] == "r-1"
    assert entry["status"] == 200
    assert entry["path"] == "/v1/predict"
    assert entry["duration_ms"] >= 0
    assert (sample_texts[2] in line) is log_text
