"""Endpoints, validation, limits, problem bodies, request ids and API keys."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

PROBLEM = "application/problem+json"


def assert_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert body["request_id"] == r.headers["x-request-id"]
    return body


def test_predict_shape(client: TestClient, sample_texts: list[str], predictor: Any) -> None:
    r = client.post("/v1/predict", json={"text": sample_texts[0], "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"labels", "model", "cached", "threshold"}
    assert body["threshold"] == 0.0
    assert body["model"] == {"name": predictor.name, "version": predictor.version}
    assert body["cached"] is False
    labels = body["labels"]
    assert 1 <= len(labels) <= 3
    scores = [item["score"] for item in labels]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < s <= 1 for s in scores)
    # The HTTP answer is exactly the model's answer.
    expected = predictor.predict([sample_texts[0]], top_k=3, beam_size=10)[0]
    assert [(x["label"], x["score"]) for x in labels] == [(lab, float(s)) for lab, s in expected]


def test_predict_defaults_and_min_score(client: TestClient, sample_texts: list[str]) -> None:
    r = client.post("/v1/predict", json={"text": sample_texts[1]})
    assert r.status_code == 200
    labels = r.json()["labels"]
    assert len(labels) <= 5
    cut = labels[0]["score"]
    r = client.post("/v1/predict", json={"text": sample_texts[1], "min_score": cut})
    assert r.status_code == 200
    assert all(x["score"] >= cut for x in r.json()["labels"])
    assert r.json()["labels"][0] == labels[0]


def test_unknown_words_are_not_an_error(client: TestClient) -> None:
    r = client.post("/v1/predict", json={"text": "zqxjv wkpfh qqqzz xyzzy"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["labels"], list)


def test_batch_order_ids_and_equality(
    client: TestClient, sample_texts: list[str], predictor: Any
) -> None:
    docs = [
        {"id": "a", "text": sample_texts[0]},
        {"id": 7, "text": sample_texts[1]},
        {"id": None, "text": sample_texts[2]},
        {"text": sample_texts[0]},  # a repeat, and no id at all
    ]
    r = client.post("/v1/predict/batch", json={"documents": docs, "top_k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["version"] == predictor.version
    assert [res["id"] for res in body["results"]] == ["a", 7, None, None]
    expected = predictor.predict([d["text"] for d in docs], top_k=4, beam_size=10)
    for res, exp in zip(body["results"], expected, strict=True):
        assert [(x["label"], x["score"]) for x in res["labels"]] == [
            (lab, float(s)) for lab, s in exp
        ]
    # Each single answer equals its batch answer.
    single = client.post("/v1/predict", json={"text": sample_texts[1], "top_k": 4}).json()
    assert single["labels"] == body["results"][1]["labels"]


def test_model_endpoint(client: TestClient, predictor: Any) -> None:
    r = client.get("/v1/model")
    assert r.status_code == 200
    body = r.json()
    for field in ("name", "version", "created_at", "n_labels", "n_features"):
        assert body[field] == getattr(predictor, field)
    assert body["trees"] == predictor.manifest.get("trees")
    assert body["encoder"] == predictor.manifest.get("encoders")
    assert isinstance(body["metrics"], dict)


def test_health_and_ready(client: TestClient, predictor: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert body["model"]["version"] == predictor.version
    assert body["cache"] == {"backend": "in-process", "state": "ok"}


def test_ready_only_after_warm_up(make_client: Callable[..., TestClient], predictor: Any) -> None:
    events: list[str] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(predictor, name)

        def warm_up(self) -> None:
            events.append("warm_up")
            predictor.warm_up()

    c = make_client(loader=lambda path: Recording())
    assert events == ["warm_up"]
    assert c.get("/readyz").json()["status"] == "ready"


def test_bad_bundle_stops_startup(tmp_path: Any) -> None:
    """A bundle that cannot load fails startup with its BundleError (fail fast)."""
    import models
    from service.app import create_app
    from service.settings import Settings

    app = create_app(
        Settings(bundle_path=tmp_path / "missing", access_log=False),
        loader=lambda path: models.load_bundle(path),
    )
    with pytest.raises(models.BundleError), TestClient(app):
        pass


def test_cache_state_none(make_client: Callable[..., TestClient]) -> None:
    c = make_client(lru_size=0)
    assert c.get("/readyz").json()["cache"] == {"backend": "none", "state": "off"}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b"[1, 2]", 422),
        (b'{"text": 5}', 422),
        (b'{"txt": "hello"}', 422),
        (b'{"text": ""}', 422),
        (b'{"text": "   \\n\\t "}', 422),
        (b'{"text": "a", "top_k": 0}', 422),
        (b'{"text": "a", "top_k": "many"}', 422),
        (b'{"text": "a", "top_k": 101}', 422),
        (b'{"text": "a", "beam_size": 0}', 422),
        (b'{"text": "a", "beam_size": 201}', 422),
        (b'{"text": "a", "min_score": 1.5}', 422),
        (b'{"text": "a", "min_score": -0.1}', 422),
        (b'{"text": "a", "extra": 1}', 422),
    ],
)
def test_predict_bad_input(client: TestClient, body: bytes, status: int) -> None:
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    problem = assert_problem(r, status)
    if status == 422:
        assert problem["errors"]


@pytest.mark.parametrize(
    "payload",
    [
        {"documents": []},
        {"documents": [{"text": ""}]},
        {"documents": [{"id": 1, "text": "ok"}, {"id": 2, "text": "  "}]},
        {"documents": [{"id": [1], "text": "ok"}]},
        {"documents": [{"id": 1}]},
        {"documents": "text"},
        {"documents": [{"text": "ok"}], "top_k": 1000},
    ],
)
def test_batch_bad_input(client: TestClient, payload: dict[str, Any]) -> None:
    assert_problem(client.post("/v1/predict/batch", json=payload), 422)


def test_batch_empty_text_points_at_document(client: TestClient) -> None:
    payload = {"documents": [{"text": "ok"}, {"text": "ok"}, {"text": " "}]}
    problem = assert_problem(client.post("/v1/predict/batch", json=payload), 422)
    assert problem["errors"][0]["loc"] == ["body", "documents", 2, "text"]


def test_limits_give_413(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_text_bytes=100, max_batch_size=3, max_body_bytes=2000)
    assert c.post("/v1/predict", json={"text": "a" * 100}).status_code == 200
    assert_problem(c.post("/v1/predict", json={"text": "a" * 101}), 413)
    # The limit is in UTF-8 bytes, not characters: 34 × 3 bytes = 102 > 100.
    assert_problem(c.post("/v1/predict", json={"text": "€" * 34}), 413)
    docs = [{"text": "x"}] * 3
    assert c.post("/v1/predict/batch", json={"documents": docs}).status_code == 200
    assert_problem(c.post("/v1/predict/batch", json={"documents": [*docs, {"text": "y"}]}), 413)
    assert_problem(c.post("/v1/predict/batch", json={"documents": [{"text": "a" * 101}]}), 413)
    assert_problem(c.post("/v1/predict", json={"text": "a " * 1500}), 413)  # body > 2000


def test_chunked_body_over_limit(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_body_bytes=1000)

    def chunks() -> Any:
        yield b'{"text": "'
        for _ in range(20):
            yield b"a" * 100
        yield b'"}'

    assert_problem(c.post("/v1/predict", content=chunks()), 413)


def test_request_id(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    # An id that would be unsafe in logs or headers is replaced, not echoed.
    r = client.get("/healthz", headers={"X-Request-ID": 'a b"<script>' * 20})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    r = client.post("/v1/predict", content=b"{", headers={"X-Request-ID": "req-9"})
    assert r.headers["x-request-id"] == "req-9"
    assert r.json()["request_id"] == "req-9"


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_problem(client.get("/v2/nothing"), 404)
    assert_problem(client.get("/v1/predict"), 405)


def test_api_keys(make_client: Callable[..., TestClient], sample_texts: list[str]) -> None:
    c = make_client(api_keys="key-one, key-two")
    payload = {"text": sample_texts[0]}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-one"},
                    {"Authorization": "Basic key-one"}, {"Authorization": "Bearer "}):  # fmt: skip
        assert_problem(c.post("/v1/predict", json=payload, headers=headers), 401)
        assert_problem(c.get("/v1/model", headers=headers), 401)
        assert_problem(
            c.post("/v1/predict/batch", json={"documents": [payload]}, headers=headers), 401
        )
    for key in ("key-one", "key-two"):
        auth = {"Authorization": f"Bearer {key}"}
        assert c.post("/v1/predict", json=payload, headers=auth).status_code == 200
        assert c.get("/v1/model", headers=auth).status_code == 200
    # Health, readiness and metrics stay open.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert c.get(path).status_code == 200
    assert c.post("/v1/predict", json=payload, headers={}).headers["www-authenticate"] == "Bearer"


def test_docs_render_offline(client: TestClient) -> None:
    """/docs and every asset it references come from the app itself."""
    page = client.get("/docs")
    assert page.status_code == 200
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    refs += re.findall(r"""url:\s*["']([^"']+)["']""", page.text)
    assert refs, page.text
    for ref in refs:
        assert ref.startswith("/"), f"/docs references an outside asset: {ref}"
        r = client.get(ref)
        assert r.status_code == 200, ref
        assert len(r.content) > 0
    assert "http://" not in page.text and "https://" not in page.text
    assert '"validatorUrl": null' in page.text  # no spec sent to an online validator
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/readyz"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(spec["components"]["schemas"][ref]["properties"]) == {
        "text",
        "top_k",
        "beam_size",
        "min_score",
        "filter",
        "threshold",
        "explain",
    }


def test_bundle_without_text_encoder_gives_422(
    make_client: Callable[..., TestClient], predictor: Any
) -> None:
    class FeaturesOnly:
        has_text_encoder = False

        def __getattr__(self, name: str) -> Any:
            return getattr(predictor, name)

    c = make_client(loader=lambda path: FeaturesOnly())
    problem = assert_problem(c.post("/v1/predict", json={"text": "some text"}), 422)
    assert "text encoder" in problem["detail"]
    assert_problem(c.post("/v1/predict/batch", json={"documents": [{"text": "x"}]}), 422)
    assert c.get("/v1/model").status_code == 200


def test_model_error_maps_to_its_status(
    make_client: Callable[..., TestClient], predictor: Any
) -> None:
    import models

    class Refusing:
        def __getattr__(self, name: str) -> Any:
            return getattr(predictor, name)

        def predict(self, texts: Any, **kwargs: Any) -> Any:
            raise models.InvalidInputError("refused by the model")

    c = make_client(loader=lambda path: Refusing())
    problem = assert_problem(c.post("/v1/predict", json={"text": "some text"}), 422)
    assert problem["detail"] == "refused by the model"


def test_large_batch_parsed_off_the_loop(client: TestClient, predictor: Any) -> None:
    """Over the offload thresholds (bytes and documents) the answer is the same."""
    texts = [f"document number {i} " + "word " * 120 for i in range(600)]
    docs = [{"id": i, "text": t} for i, t in enumerate(texts)]
    r = client.post("/v1/predict/batch", json={"documents": docs, "top_k": 2})
    assert r.status_code == 200, r.text[:500]
    results = r.json()["results"]
    assert [x["id"] for x in results] == list(range(600))
    expected = predictor.predict(texts[:3], top_k=2, beam_size=10)
    for res, exp in zip(results[:3], expected, strict=True):
        assert [x["label"] for x in res["labels"]] == [lab for lab, _ in exp]
