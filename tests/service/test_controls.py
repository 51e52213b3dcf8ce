"""Prediction controls over HTTP: label filters, thresholds, explanations, a model's
config.json, and the cache and coalescer keeping requests with other controls apart.

Every expected answer comes from the model's own ``predict`` (the model-level tests check
the filters and explanations themselves); these tests check that the service passes the
controls through, combines them with the model's config and never mixes answers."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import models
from service.app import create_app
from service.repository import publish
from service.settings import Settings
from tests.service.test_api import assert_problem
from tests.service.test_cache import SpyPredictor


def pairs(labels: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(x["label"], x["score"]) for x in labels]


def expected(predictor: Any, text: str, **kwargs: Any) -> list[tuple[str, float]]:
    return [(label, float(score)) for label, score in predictor.predict([text], **kwargs)[0]]


@pytest.fixture(scope="session")
def label_names(predictor: Any) -> list[str]:
    return list(predictor.label_names)


# ----------------------------------------------------------------------------- filters
def test_filters_are_the_models(
    client: TestClient, predictor: Any, sample_texts: list[str], label_names: list[str]
) -> None:
    text = sample_texts[0]
    top = expected(predictor, text, top_k=3)[0][0]
    prefix = top.rsplit("/", 1)[0] + "/*"
    for spec in ({"include": [prefix]}, {"exclude": [top]}, {"include": ["t1/*", top]},
                 {"include": [prefix], "exclude": [top]}):  # fmt: skip
        r = client.post("/v1/predict", json={"text": text, "top_k": 4, "filter": spec})
        assert r.status_code == 200, r.text
        want = expected(predictor, text, top_k=4, label_filter=spec)
        assert pairs(r.json()["labels"]) == want
        assert want != expected(predictor, text, top_k=4)  # the filter did something
    docs = [{"id": i, "text": t} for i, t in enumerate(sample_texts[:3])]
    spec = {"exclude": ["t0/*"]}
    r = client.post("/v1/predict/batch", json={"documents": docs, "top_k": 4, "filter": spec})
    assert r.status_code == 200, r.text
    for res, doc in zip(r.json()["results"], docs, strict=True):
        assert pairs(res["labels"]) == expected(predictor, doc["text"], top_k=4,
                                                label_filter=spec)  # fmt: skip
        assert not any(x["label"].startswith("t0/") for x in res["labels"])


def test_unknown_label_is_a_422_naming_it(client: TestClient, label_names: list[str]) -> None:
    known = label_names[0]
    for path, body in (("/v1/predict", {"text": "a b"}),
                       ("/v1/predict/batch", {"documents": [{"text": "a b"}]})):  # fmt: skip
        for spec in ({"include": [known, "no-such-label"]}, {"exclude": ["no-such-label"]}):
            problem = assert_problem(client.post(path, json={**body, "filter": spec}), 422)
            assert "no-such-label" in problem["detail"]
            assert problem["unknown_labels"] == ["no-such-label"]


def test_filters_that_allow_nothing_answer_no_label(client: TestClient,
                                                    label_names: list[str]) -> None:  # fmt: skip
    known = label_names[0]
    for spec in ({"include": ["zzz/*"]}, {"include": [known], "exclude": [known]},
                 {"include": []}):  # fmt: skip
        r = client.post("/v1/predict", json={"text": "a b", "filter": spec})
        assert r.status_code == 200, r.text
        assert r.json()["labels"] == []


@pytest.mark.parametrize("spec", [{"include": "t0/*"}, {"include": [""]}, {"only": ["x"]},
                                  {"include": [5]}, []])  # fmt: skip
def test_malformed_filters_are_422(client: TestClient, spec: Any) -> None:
    assert_problem(client.post("/v1/predict", json={"text": "a", "filter": spec}), 422)


# ----------------------------------------------------------------------------- thresholds
def test_threshold_and_min_score(client: TestClient, predictor: Any,
                                 sample_texts: list[str]) -> None:  # fmt: skip
    text = sample_texts[1]
    full = expected(predictor, text, top_k=5)
    cut = full[1][1]  # keeps the first two (or more on a tie)
    for body, applied in (({"threshold": cut}, cut), ({"min_score": cut}, cut),
                          ({"threshold": cut, "min_score": cut / 2}, cut),
                          ({"threshold": cut / 2, "min_score": cut}, cut),
                          ({"threshold": 0}, 0.0), ({}, 0.0)):  # fmt: skip
        r = client.post("/v1/predict", json={"text": text, "top_k": 5, **body})
        assert r.status_code == 200, r.text
        assert r.json()["threshold"] == applied
        assert pairs(r.json()["labels"]) == [x for x in full if x[1] >= applied]
    r = client.post("/v1/predict/batch", json={"documents": [{"text": text}], "threshold": cut})
    assert r.json()["threshold"] == cut
    assert pairs(r.json()["results"][0]["labels"]) == [x for x in full if x[1] >= cut]
    for bad in (1.5, -0.1, "high", True, "0.5"):
        assert_problem(client.post("/v1/predict", json={"text": text, "threshold": bad}), 422)


def test_auto_needs_a_tuned_threshold(client: TestClient) -> None:
    problem = assert_problem(client.post("/v1/predict", json={"text": "a", "threshold": "auto"}),
                             422)  # fmt: skip
    assert "tune" in problem["detail"]
    assert client.get("/v1/model").json()["threshold"] is None


def test_auto_applies_the_tuned_threshold(
    make_client: Callable[..., TestClient], tuned_bundle: Path, sample_texts: list[str]
) -> None:
    tuned = models.load_bundle(str(tuned_bundle))
    c = make_client(loader=lambda path: tuned, bundle_path=tuned_bundle)
    info = c.get("/v1/model").json()
    value = tuned.manifest["threshold"]["value"]
    assert info["threshold"]["value"] == value
    assert {"micro_f1", "precision", "recall"} <= set(info["threshold"])
    assert info["calibrated"] is False
    for text in sample_texts[:4]:
        r = c.post("/v1/predict", json={"text": text, "threshold": "auto"})
        assert r.json()["threshold"] == value
        assert pairs(r.json()["labels"]) == expected(tuned, text, threshold="auto")


# ----------------------------------------------------------------------------- explanations
def test_explain_gives_the_models_explanations(
    client: TestClient, predictor: Any, sample_texts: list[str]
) -> None:
    text = sample_texts[2]
    r = client.post("/v1/predict", json={"text": text, "top_k": 3, "explain": True})
    assert r.status_code == 200, r.text
    want = predictor.predict([text], top_k=3, explain=True)[0]
    labels = r.json()["labels"]
    assert [(x["label"], x["score"], x["explanation"]) for x in labels] == [
        (label, float(score), why) for label, score, why in want]
    assert any(x["explanation"] for x in labels)
    assert all(set(t) == {"term", "contribution"} for x in labels for t in x["explanation"])
    plain = client.post("/v1/predict", json={"text": text, "top_k": 3}).json()["labels"]
    assert all("explanation" not in x for x in plain)
    docs = [{"text": t} for t in sample_texts[:3]]
    batch = client.post("/v1/predict/batch", json={"documents": docs, "explain": True}).json()
    for res, doc in zip(batch["results"], docs, strict=True):
        want = predictor.predict([doc["text"]], explain=True)[0]
        assert [x["explanation"] for x in res["labels"]] == [why for _, _, why in want]


# ----------------------------------------------------------------------------- the cache
def test_other_filters_or_explain_never_share_a_cache_entry(
    make_client: Callable[..., TestClient], predictor: Any, sample_texts: list[str]
) -> None:
    spy = SpyPredictor(predictor)
    c = make_client(loader=lambda path: spy)
    text = sample_texts[3]
    top = expected(predictor, text)[0][0]
    plain = {"text": text}
    variants = [
        {"filter": {"exclude": [top]}},
        {"filter": {"exclude": [top, "t0/*"]}},
        {"filter": {"include": ["t0/*", "t1/*"]}},
        {"explain": True},
        {"filter": {"exclude": [top]}, "explain": True},
    ]
    answers = [c.post("/v1/predict", json=plain).json()]
    for extra in variants:
        spy.scored.clear()
        r = c.post("/v1/predict", json={**plain, **extra}).json()
        assert r["cached"] is False, extra
        assert spy.scored == [text]
        answers.append(r)
    for extra, first in zip([{}, *variants], answers, strict=True):
        again = c.post("/v1/predict", json={**plain, **extra}).json()
        assert again["cached"] is True
        assert again["labels"] == first["labels"]
    # The same filter written otherwise (order, repeats) is the same entry; a threshold is
    # applied after the lookup, so it is served from the entry too.
    same = {"filter": {"include": ["t1/*", "t0/*", "t1/*"]}, "threshold": 0.01}
    r = c.post("/v1/predict", json={**plain, **same}).json()
    assert r["cached"] is True
    assert r["labels"] == [x for x in answers[3]["labels"] if x["score"] >= 0.01]


# ----------------------------------------------------------------------------- coalescing
class GatedSpy(SpyPredictor):
    """Records every model call with its options; the first call waits for ``release``."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def _gate(self) -> None:
        if not self.started.is_set():
            self.started.set()
            self.release.wait(60)

    def predict(self, texts: Any, **kwargs: Any) -> Any:
        self.calls.append((list(texts), kwargs))
        self._gate()
        return self._inner.predict(texts, **kwargs)

    def encode(self, texts: Any) -> Any:
        self._pending = list(texts)
        return self._inner.encode(texts)

    def predict_features(self, X: Any, **kwargs: Any) -> Any:
        self.calls.append((self._pending, kwargs))
        self._gate()
        return self._inner.predict_features(X, **kwargs)


def test_other_filters_or_explain_never_share_a_coalesced_batch(
    tiny_bundle: Path, predictor: Any, sample_texts: list[str]
) -> None:
    spy = GatedSpy(predictor)
    settings = Settings(bundle_path=tiny_bundle, access_log=False, lru_size=0,
                        predict_threads=1)  # fmt: skip
    app = create_app(settings, loader=lambda path: spy)
    top = expected(predictor, sample_texts[0])[0][0]
    options: list[dict[str, Any]] = [{}, {"filter": {"exclude": [top]}}, {"explain": True},
                                     {"filter": {"exclude": [top]}, "explain": True}]  # fmt: skip
    # two texts per option, sent while the only prediction thread is busy: they queue up
    sent = [(text, options[i % 4]) for i, text in enumerate(sample_texts)]

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url="http://t")
        async with client as c, app.router.lifespan_context(app):
            spy.calls.clear()
            blocker = asyncio.ensure_future(c.post("/v1/predict", json={"text": "x y z"}))
            while not spy.started.is_set():
                await asyncio.sleep(0.01)
            tasks = [asyncio.ensure_future(c.post("/v1/predict", json={"text": t, **o}))
                     for t, o in sent]  # fmt: skip
            pending = app.state.dataplane._coalescer._pending
            for _ in range(500):  # every request parsed and waiting (a deadline, no timing)
                if sum(len(group) for group in pending.values()) == len(sent):
                    break
                await asyncio.sleep(0.01)
            spy.release.set()
            await blocker
            return list(await asyncio.gather(*tasks))

    responses = asyncio.run(scenario())
    option_of = {text: opts for text, opts in sent}
    grouped = [texts for texts, _ in spy.calls[1:]]
    assert max(len(texts) for texts in grouped) == 2  # they were coalesced
    for texts, kwargs in spy.calls[1:]:
        assert len({json.dumps(option_of[t], sort_keys=True) for t in texts}) == 1, texts
        opts = option_of[texts[0]]
        assert kwargs.get("explain", False) == opts.get("explain", False)
        assert ("label_filter" in kwargs) == ("filter" in opts)
    for (text, opts), r in zip(sent, responses, strict=True):
        assert r.status_code == 200, r.text
        want = predictor.predict([text], label_filter=opts.get("filter"),
                                 explain=opts.get("explain", False))[0]  # fmt: skip
        assert [x["label"] for x in r.json()["labels"]] == [e[0] for e in want]
        assert ("explanation" in r.json()["labels"][0]) == opts.get("explain", False)


# ----------------------------------------------------------------------------- config.json
@pytest.fixture
def serve_repo() -> Iterator[Callable[..., TestClient]]:
    stack = ExitStack()

    def factory(path: Path, **overrides: Any) -> TestClient:
        fields: dict[str, Any] = {"bundle_path": path, "access_log": False, "watch": False}
        fields.update(overrides)
        return stack.enter_context(TestClient(create_app(Settings(**fields))))

    yield factory
    stack.close()


def write_config(model_dir: Path, config: Any) -> None:
    text = config if isinstance(config, str) else json.dumps(config)
    (model_dir / "config.json").write_text(text)


def test_config_defaults_combine_with_the_request(
    tmp_path: Path, tiny_bundle: Path, predictor: Any, sample_texts: list[str],
    serve_repo: Callable[..., TestClient],
) -> None:  # fmt: skip
    root = tmp_path / "repo"
    publish(root / "m", "1", tiny_bundle)
    text = sample_texts[0]
    excluded = expected(predictor, text, label_filter={"include": ["t0/*", "t1/*"]})[0][0]
    config = {"filter": {"include": ["t0/*", "t1/*"], "exclude": [excluded]}, "threshold": 0.02}
    write_config(root / "m", config)
    c = serve_repo(root)
    info = c.get("/v1/models/m").json()
    assert info["config"] == config
    for request, filters, applied in (
        ({}, [config["filter"]], 0.02),
        ({"filter": {"include": ["t1/*", "t2/*"]}}, [config["filter"], {"include": ["t1/*",
                                                                         "t2/*"]}], 0.02),
        ({"filter": {"exclude": ["t0/*"]}}, [config["filter"], {"exclude": ["t0/*"]}], 0.02),
        ({"threshold": 0}, [config["filter"]], 0.0),
        ({"min_score": 0.05}, [config["filter"]], 0.05),
    ):  # fmt: skip
        r = c.post("/v1/models/m/predict", json={"text": text, "top_k": 8, **request})
        assert r.status_code == 200, r.text
        assert r.json()["threshold"] == applied
        want = [x for x in expected(predictor, text, top_k=8, label_filter=filters)
                if x[1] >= applied]  # fmt: skip
        assert pairs(r.json()["labels"]) == want, request
        assert all(x["label"] != excluded and x["label"][:3] in ("t0/", "t1/")
                   for x in r.json()["labels"])  # fmt: skip
    # The V2 protocol answers with the model's defaults too.
    infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    out = c.post("/v2/models/m/infer", json=infer).json()["outputs"]
    got = [label for label in out[0]["data"] if label]
    assert got == [x for x, s in expected(predictor, text, label_filter=[config["filter"]])
                   if s >= 0.02]  # fmt: skip


@pytest.mark.parametrize(("config", "why"), [
    ({"filter": {"include": ["no-such-label"]}}, "no-such-label"),
    ({"threshold": "auto"}, "tuned"),
    ({"threshold": 2}, "threshold"),
    ({"filtre": {}}, "filtre"),
    ("{not json", "invalid"),
])  # fmt: skip
def test_a_bad_config_refuses_the_version(
    tmp_path: Path, tiny_bundle: Path, serve_repo: Callable[..., TestClient], config: Any,
    why: str,
) -> None:  # fmt: skip
    root = tmp_path / "repo"
    publish(root / "good", "1", tiny_bundle)
    publish(root / "bad", "1", tiny_bundle)
    write_config(root / "bad", config)
    c = serve_repo(root)
    states = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert states["good"]["state"] == "ready"
    assert states["bad"]["state"] == "failed"
    assert "config.json" in states["bad"]["last_error"] and why in states["bad"]["last_error"]
    assert_problem(c.post("/v1/models/bad/predict", json={"text": "a"}), 503)
    write_config(root / "bad", {"threshold": 0.5})  # fixed: the reload serves it
    assert c.post("/v1/models/bad/reload").json()["outcome"] == "switched"
    assert c.post("/v1/models/bad/predict", json={"text": "a"}).json()["threshold"] == 0.5


def test_a_changed_config_reloads_and_a_bad_one_keeps_the_old(
    tmp_path: Path, tiny_bundle: Path, serve_repo: Callable[..., TestClient],
    sample_texts: list[str],
) -> None:  # fmt: skip
    root = tmp_path / "repo"
    publish(root / "m", "1", tiny_bundle)
    c = serve_repo(root)
    ask = {"text": sample_texts[0]}
    assert c.post("/v1/predict", json=ask).json()["threshold"] == 0.0
    write_config(root / "m", {"filter": {"exclude": ["t0/*"]}})
    assert c.post("/v1/models/m/reload").json()["outcome"] == "switched"
    labels = c.post("/v1/predict", json=ask).json()["labels"]
    assert labels and not any(x["label"].startswith("t0/") for x in labels)
    write_config(root / "m", {"filter": {"exclude": ["typo"]}})
    problem = assert_problem(c.post("/v1/models/m/reload"), 409)
    assert "typo" in problem["detail"]
    labels = c.post("/v1/predict", json=ask).json()["labels"]
    assert labels and not any(x["label"].startswith("t0/") for x in labels)  # old config
    (root / "m" / "config.json").unlink()
    assert c.post("/v1/models/m/reload").json()["outcome"] == "switched"
    assert c.get("/v1/models/m").json()["config"] == {"filter": None, "threshold": None}


# ----------------------------------------------------------------------------- schema
def test_openapi_documents_the_controls(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("PredictRequest", "BatchRequest"):
        props = schemas[name]["properties"]
        assert {"filter", "threshold", "explain", "min_score"} <= set(props)
        for field in ("filter", "threshold"):
            assert props[field]["examples"], field
        assert any("filter" in ex and "threshold" in ex for ex in schemas[name]["examples"])
    assert set(schemas["FilterSpec"]["properties"]) == {"include", "exclude"}
    assert "explanation" in schemas["Label"]["properties"]
    assert "threshold" in schemas["PredictResponse"]["properties"]
    assert {"threshold", "calibrated", "config"} <= set(schemas["ModelInfo"]["properties"])
    for path in ("/v1/predict", "/v1/predict/batch", "/v1/models/{name}/predict",
                 "/v1/models/{name}/predict/batch"):  # fmt: skip
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert any("filter" in e["value"] for e in body["examples"].values()), path
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "408", "413", "415", "422", "503"} <= set(responses)
        assert "401" not in responses, path  # no keys set: none is refused for want of one
        assert "application/problem+json" in responses["422"]["content"]
