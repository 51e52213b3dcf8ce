"""Hand-made hostile requests against a served app (a real socket: some of them are not what
an HTTP client library would send). Each must get a 4xx problem+json, never a 5xx, and the
service must answer normally right after it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.fuzz import answers_by_status
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import served

PROBLEM = "application/problem+json"
JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
MB = 1024 * 1024
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def base(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    feedback = tmp_path_factory.mktemp("feedback")
    settings = Settings(bundle_path=tiny_bundle, access_log=False, watch=False,
                        feedback_dir=feedback, body_timeout_seconds=BODY_TIMEOUT_S)  # fmt: skip
    with served(create_app(settings)) as url:
        before = _server_errors(url)
        yield url
        assert _server_errors(url) == before, "a hostile request got a 5xx"


def _server_errors(url: str) -> int:
    return sum(n for status, n in answers_by_status(url).items() if status >= 500)


def _still_serving(base: str, text: str) -> None:
    r = httpx.post(f"{base}/v1/predict", json={"text": text}, timeout=30)
    assert r.status_code == 200 and r.json()["labels"], r.text
    assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200


def _problem(r: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == r.status_code and body["detail"]
    return body


def _nested(depth: int) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"


def _docs(n: int) -> list[dict[str, str]]:
    return [{"text": f"doc {i}"} for i in range(n)]


# (path, headers, body, the statuses that are right)
CASES: dict[str, tuple[str, dict[str, str], bytes, tuple[int, ...]]] = {
    "10 MB body": ("/v1/predict", JSON, b'{"text": "' + b"a" * (10 * MB) + b'"}', (413,)),
    "10 MB batch": ("/v1/predict/batch", JSON,
                    json.dumps({"documents": [{"text": "a" * 1000}] * 10_000}).encode(), (413,)),
    "deeply nested JSON": ("/v1/predict", JSON, _nested(100_000), (400, 422)),
    "nested, moderately": ("/v1/predict", JSON, _nested(500), (400, 422)),
    "invalid UTF-8": ("/v1/predict", JSON, b'{"text": "caf\xe9 \xff\xfe"}', (400,)),
    "lone surrogate": ("/v1/predict", JSON, b'{"text": "\\ud800 egg"}', (200, 400, 422)),
    "raw NUL in a string": ("/v1/predict", JSON, b'{"text": "a\x00b"}', (400,)),
    "not an object": ("/v1/predict", JSON, b'"just a string"', (422,)),
    "100k-document batch": ("/v1/predict/batch", JSON,
                            json.dumps({"documents": _docs(100_000)}).encode(), (413,)),
    "100k documents, V2": ("/v2/models/tiny/infer", JSON, json.dumps({"inputs": [{
        "name": "text", "datatype": "BYTES", "shape": [100_000],
        "data": ["doc"] * 100_000}]}).encode(), (404, 413)),
    "100k documents, Annif": ("/v1/projects/tiny/suggest-batch", JSON,
                              json.dumps({"documents": _docs(100_000)}).encode(), (404, 413)),
    "100k documents, learn": ("/v1/projects/tiny/learn", JSON, json.dumps(
        [{"text": "a", "subjects": [{"label": "x"}]}] * 100_000).encode(), (404, 413)),
    "top_k beyond": ("/v1/predict", JSON, b'{"text": "egg", "top_k": 101}', (422,)),
    "beam_size beyond": ("/v1/predict", JSON, b'{"text": "egg", "beam_size": 201}', (422,)),
    "top_k huge": ("/v1/predict", JSON, b'{"text": "egg", "top_k": ' + b"9" * 400 + b"}",
                   (422,)),
    "top_k 1e308": ("/v1/predict", JSON, b'{"text": "egg", "top_k": 1e308}', (422,)),
    "top_k overflows a float": ("/v1/predict", JSON, b'{"text": "egg", "top_k": 1e999}', (422,)),
    "beam_size negative huge": ("/v1/predict", JSON,
                                b'{"text": "egg", "beam_size": -' + b"9" * 30 + b"}", (422,)),
    "min_score infinite": ("/v1/predict", JSON, b'{"text": "egg", "min_score": 1e999}', (422,)),
    "min_score NaN": ("/v1/predict", JSON, b'{"text": "egg", "min_score": NaN}', (400, 422)),
    "threshold NaN": ("/v1/predict", JSON, b'{"text": "egg", "threshold": NaN}', (400, 422)),
    # a 65-bit id was echoed into a response orjson cannot write: a 500 until it was bounded
    "id over 64 bits": ("/v1/predict/batch", JSON,
                        b'{"documents": [{"id": 36893488147419103232, "text": "egg"}]}', (422,)),
    "Annif id over 64 bits": ("/v1/projects/tiny/suggest-batch", JSON,
                              b'{"documents": [{"document_id": 36893488147419103232, '
                              b'"text": "egg"}]}', (404, 422)),
    "top_k 3.5": ("/v1/predict", JSON, b'{"text": "egg", "top_k": 3.5}', (422,)),
    "explain 0": ("/v1/predict", JSON, b'{"text": "egg", "explain": 0}', (422,)),
    "text/plain": ("/v1/predict", {"content-type": "text/plain"}, b'{"text": "egg"}', (415,)),
    "XML": ("/v1/predict/batch", {"content-type": "application/xml"}, b"<doc>egg</doc>", (415,)),
    "a form to JSON": ("/v1/predict", FORM, b"text=egg", (415,)),
    "JSON to the form route": ("/v1/projects/tiny/suggest", JSON, b'{"text": "egg"}', (415,)),
    "multipart": ("/v2/models/tiny/infer", {"content-type": "multipart/form-data; boundary=x"},
                  b"--x--", (415,)),
    "garbage content type": ("/v1/predict", {"content-type": ";;; =="}, b'{"text": "e"}',
                             (415,)),
    # str.isdigit() takes "²", int() does not: a 500 until only ASCII digits were read
    "inference header ²": ("/v2/models/tiny/infer", {**JSON, "inference-header-content-length":
                           b"\xb2"}, b'{"inputs": []}', (404, 422)),
    # which of two values counts would be a guess; int() would take "+5" and " 5"
    "form field twice": ("/v1/projects/tiny/suggest", FORM, b"text=egg&text=ham", (422,)),
    "limit +5": ("/v1/projects/tiny/suggest", FORM, b"text=egg&limit=%2B5", (422,)),
    "limit empty": ("/v1/projects/tiny/suggest", FORM, b"text=egg&limit=", (422,)),
    "query field twice": ("/v1/projects/tiny/suggest-batch?limit=1&limit=2", JSON,
                          b'{"documents": [{"text": "egg"}]}', (422,)),
    "inference header past the body": ("/v2/models/tiny/infer",
                                       {**JSON, "inference-header-content-length": "999999"},
                                       b'{"inputs": []}', (404, 422)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request(base: str, name: str, sample_texts: list[str]) -> None:
    path, headers, body, statuses = CASES[name]
    path = path.replace("/tiny/", f"/{_model_name(base)}/")
    r = httpx.post(f"{base}{path}", content=body, headers=headers, timeout=60)
    if 200 in statuses and r.status_code == 200:
        assert r.headers["content-type"].startswith("application/json")
    else:
        _problem(r, *statuses)
    _still_serving(base, sample_texts[0])


def _model_name(base: str) -> str:
    return str(httpx.get(f"{base}/v1/models", timeout=30).json()["default"])


def test_limits_are_inclusive(base: str, sample_texts: list[str]) -> None:
    """top_k and beam_size at their limits are served (and top_k caps the answer)."""
    r = httpx.post(f"{base}/v1/predict", timeout=30,
                   json={"text": sample_texts[0], "top_k": 100, "beam_size": 200})  # fmt: skip
    assert r.status_code == 200 and 0 < len(r.json()["labels"]) <= 100
    r = httpx.post(f"{base}/v1/predict", timeout=30, json={"text": sample_texts[0], "top_k": 3.0})
    assert r.status_code == 200 and len(r.json()["labels"]) <= 3  # JSON Schema's integer
    r = httpx.post(f"{base}/v1/predict", timeout=30,
                   json={"text": "nul\u0000 byte " + sample_texts[0]})  # fmt: skip
    assert r.status_code == 200  # an escaped NUL is text like any other


def _raw(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.lower(), body


def test_a_trickling_body_is_cut_off(base: str, sample_texts: list[str]) -> None:
    """A client sending a byte now and then gets 408 once the body timeout has passed, and
    its connection is closed; others are served meanwhile."""
    body = json.dumps({"text": sample_texts[0]}).encode()
    with _raw(base) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        sent = 0
        sock.settimeout(0.25)
        status = None
        for byte in body:
            sock.sendall(bytes([byte]))
            sent += 1
            _still_serving(base, sample_texts[1])
            try:
                status, head, _ = _read_response(sock)
                break
            except TimeoutError:
                continue
        assert status == 408, (status, sent)
        assert PROBLEM.encode() in head and b"connection: close" in head
        sock.settimeout(5)
        end = time.monotonic() + 5
        closed = False
        while time.monotonic() < end and not closed:
            try:
                closed = sock.recv(65536) == b""
            except (TimeoutError, ConnectionResetError):
                closed = True
        assert closed
    _still_serving(base, sample_texts[0])


def test_a_stalled_body_is_cut_off(base: str, sample_texts: list[str]) -> None:
    """Headers announcing a body that never comes: 408, not a connection held for ever."""
    with _raw(base) as sock:
        sock.sendall(b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{")
        status, head, _ = _read_response(sock)
        assert status == 408 and PROBLEM.encode() in head
    _still_serving(base, sample_texts[0])


def test_a_bad_request_line_and_headers(base: str, sample_texts: list[str]) -> None:
    """What the HTTP parser itself refuses (uvicorn answers 400 or closes): never a 5xx."""
    for raw in (b"GARBAGE\r\n\r\n", b"POST /v1/predict HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: \x01\r\n\r\n",
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 100_000
                + b"\r\n\r\n"):  # fmt: skip
        with _raw(base) as sock:
            sock.sendall(raw)
            try:
                status, _, _ = _read_response(sock)
            except (ConnectionResetError, IndexError, ValueError):
                status = 400  # closed without an answer: refused all the same
            assert 400 <= status < 500, (raw[:40], status)
        _still_serving(base, sample_texts[0])
