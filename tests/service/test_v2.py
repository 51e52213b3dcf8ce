"""The Open Inference Protocol (KServe V2) through a real client library, tritonclient, with
its defaults (binary tensor data) and in plain JSON, against a server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.repository import publish
from service.settings import Settings
from tests.service.conftest import served

httpclient = pytest.importorskip("tritonclient.http", reason="dev extra: tritonclient[http]")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[str]:
    """uvicorn in a thread (tritonclient needs a real socket), one model: alpha."""
    root = tmp_path_factory.mktemp("v2") / "repo"
    publish(root / "alpha", "1", tiny_bundle)
    app = create_app(Settings(bundle_path=root, access_log=False, watch=False, lru_size=0))
    with served(app) as base:
        yield base.removeprefix("http://")


def text_input(texts: list[str], binary: bool = True) -> Any:
    tensor = httpclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object),
                               binary_data=binary)  # fmt: skip
    return tensor


def expected(predictor: Any, texts: list[str], k: int, beam: int) -> tuple[list[Any], Any]:
    """What the model says, padded as the protocol answer is: "" and 0 past a doc's labels."""
    answers = predictor.predict(texts, top_k=k, beam_size=beam)
    labels = [[lab for lab, _ in a] + [""] * (k - len(a)) for a in answers]
    scores = np.array([[s for _, s in a] + [0.0] * (k - len(a)) for a in answers], np.float32)
    return labels, scores


def test_health_metadata_and_readiness(server: str) -> None:
    client = httpclient.InferenceServerClient(url=server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("alpha")
    meta = client.get_model_metadata("alpha")
    assert meta["name"] == "alpha" and len(meta["versions"]) == 1
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("text", "BYTES")]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("labels", "BYTES"),
                                                                     ("scores", "FP32")]
    assert not client.is_model_ready("nope")


def test_infer_with_the_clients_defaults(
    server: str, predictor: Any, sample_texts: list[str]
) -> None:
    """Binary tensors both ways; k labels per row, padded where the beam found fewer."""
    client = httpclient.InferenceServerClient(url=server)
    texts = [*sample_texts[:3], "zqxjv wkpfh"]
    result = client.infer("alpha", [text_input(texts)],
                          parameters={"top_k": 40, "beam_size": 1})  # fmt: skip
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == scores.shape == (4, 40)
    assert scores.dtype == np.float32
    want_labels, want_scores = expected(predictor, texts, 40, 1)
    assert [[x.decode() for x in row] for row in labels] == want_labels
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    assert any("" in row for row in want_labels)  # the padding was exercised
    response = result.get_response()
    assert response["model_version"] == predictor.version
    # The client's defaults: binary tensors, described in the JSON header only.
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0
               for o in response["outputs"])  # fmt: skip


def test_infer_in_plain_json_with_bundle_defaults(
    server: str, predictor: Any, sample_texts: list[str]
) -> None:
    client = httpclient.InferenceServerClient(url=server)
    outputs = [httpclient.InferRequestedOutput("scores", binary_data=False),
               httpclient.InferRequestedOutput("labels", binary_data=False)]  # fmt: skip
    result = client.infer("alpha", [text_input(sample_texts[:2], binary=False)],
                          outputs=outputs, request_id="r-7")  # fmt: skip
    response = result.get_response()
    assert response["id"] == "r-7"
    assert [o["name"] for o in response["outputs"]] == ["scores", "labels"]
    assert all("data" in o for o in response["outputs"])
    k = predictor.default_top_k
    want_labels, want_scores = expected(predictor, sample_texts[:2], k,
                                        predictor.default_beam_size)  # fmt: skip
    assert result.as_numpy("labels").shape == (2, k)
    assert [[str(x) for x in row] for row in result.as_numpy("labels")] == want_labels
    np.testing.assert_allclose(result.as_numpy("scores"), want_scores, rtol=1e-6)


def test_errors_carry_the_protocols_error_member(server: str) -> None:
    client = httpclient.InferenceServerClient(url=server)
    with pytest.raises(InferenceServerException, match="empty"):
        client.infer("alpha", [text_input(["fine", "  "])])
    with pytest.raises(InferenceServerException, match="no model named"):
        client.infer("nope", [text_input(["fine"])])
    with pytest.raises(InferenceServerException, match="top_k"):
        client.infer("alpha", [text_input(["fine"])], parameters={"top_k": 0})
    bad = {"inputs": [{"name": "words", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    r = httpx.post(f"http://{server}/v2/models/alpha/infer", json=bad, timeout=30)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["error"] == body["detail"] and "'text'" in body["error"]
