"""The in-flight bound (XMC_MAX_INFLIGHT): beyond it a request is refused at once with 503,
problem+json and Retry-After, probes and metrics still answer, and the worker takes requests
again as soon as one finishes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import served
from tests.service.test_api import assert_problem


class HeldPredictor:
    """The real predictor, whose text predictions wait until the test lets them go."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict(self, texts: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.release.wait(120), "the test never released the prediction"
        return self._inner.predict(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_beyond_the_bound_requests_are_refused_at_once(tiny_bundle: Path,
                                                       predictor: Any) -> None:
    held = HeldPredictor(predictor)
    settings = Settings(bundle_path=tiny_bundle, lru_size=0, access_log=False, max_inflight=1)
    app = create_app(settings, loader=lambda path: held)
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        first: dict[str, httpx.Response] = {}
        worker = threading.Thread(
            target=lambda: first.update(r=client.post("/v1/predict", json={"text": "a b"})))
        worker.start()
        try:
            assert held.entered.wait(60)
            refused = client.post("/v1/predict", json={"text": "another text"})
            assert_problem(refused, 503)
            assert refused.headers["retry-after"] == "1"
            assert "in flight" in refused.json()["detail"]
            # probes and metrics are not counted: they answer while the worker is full
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            metrics = client.get("/metrics").text
            assert "xmc_overload_refusals_total 1.0" in metrics
        finally:
            held.release.set()
            worker.join(60)
        assert first["r"].status_code == 200
        again = client.post("/v1/predict", json={"text": "another text"})
        assert again.status_code == 200  # the bound frees as soon as a request ends
