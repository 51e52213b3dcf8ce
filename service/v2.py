"""The Open Inference Protocol (KServe V2) beside our own API, HTTP/REST with the binary
tensor data extension, so that the serving ecosystem's clients (tritonclient, KServe) work
unchanged.

One input tensor, ``text`` (BYTES, shape ``[n]``); two outputs, ``labels`` (BYTES) and
``scores`` (FP32), both ``[n, k]`` with k the request's top_k, padded with ``""`` and 0 where
a document has fewer labels. Request ``parameters`` may carry ``top_k`` and ``beam_size``
(default: the bundle's). Errors are our problem+json documents, which also carry the
protocol's ``error`` member.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.cache import Answer
from service.dataplane import DataPlane
from service.errors import PayloadTooLargeError, RequestValidationFailed
from service.parsing import Parser, read_body, validate

#: the binary data extension: the JSON part's length when binary tensor data follows it
HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"


class Tensor(BaseModel):
    """One input tensor of an infer request (``data`` absent when it travels as binary)."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[Tensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def _invalid(loc: list[str | int], msg: str) -> RequestValidationFailed:
    errors = [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}]
    return RequestValidationFailed(msg, errors)


def _bytes_elements(raw: bytes) -> list[bytes]:
    """Decode a BYTES tensor in the binary layout: each element a 4-byte little-endian
    length, then that many bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _invalid(["inputs", 0], "binary BYTES data is truncated")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise _invalid(["inputs", 0], "binary BYTES data is truncated")
        out.append(raw[pos : pos + size])
        pos += size
    return out


def _texts(req: InferRequest, binary: bytes) -> list[str]:
    """The documents of the one input tensor ``text``."""
    if len(req.inputs) != 1 or req.inputs[0].name != "text":
        raise _invalid(["inputs"], "exactly one input tensor, named 'text', is expected")
    tensor = req.inputs[0]
    if tensor.datatype != "BYTES":
        raise _invalid(["inputs", 0, "datatype"], "the 'text' tensor must be BYTES")
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise _invalid(["inputs", 0, "shape"], "the 'text' tensor's shape must be [n], n ≥ 1")
    size = tensor.parameters.get("binary_data_size")
    if tensor.data is not None:
        elements: list[Any] = tensor.data
    elif isinstance(size, int) and 0 <= size <= len(binary):
        elements = _bytes_elements(binary[:size])
    else:
        raise _invalid(["inputs", 0, "data"], "the 'text' tensor has no data")
    if len(elements) != tensor.shape[0]:
        msg = f"shape says {tensor.shape[0]} elements, data has {len(elements)}"
        raise _invalid(["inputs", 0, "shape"], msg)
    texts = []
    for i, element in enumerate(elements):
        try:
            texts.append(element.decode("utf-8") if isinstance(element, bytes) else element)
        except UnicodeDecodeError:
            raise _invalid(["inputs", 0, "data", i], "not UTF-8 text") from None
        if not isinstance(texts[-1], str):
            raise _invalid(["inputs", 0, "data", i], "each element must be a string")
    return texts


def _param(req: InferRequest, name: str, limit: int) -> int | None:
    value = req.parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise _invalid(["parameters", name], f"{name} must be an integer in 1..{limit}")
    return value


def _outputs(answers: list[Answer], k: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.full((len(answers), k), "", dtype=object)
    scores = np.zeros((len(answers), k), dtype=np.float32)
    for i, answer in enumerate(answers):
        for j, (label, score) in enumerate(answer[:k]):
            labels[i, j] = label
            scores[i, j] = score
    return labels, scores


def _encode(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes]:
    """One output tensor: its JSON description, and its binary data when asked for."""
    datatype = "BYTES" if array.dtype == object else "FP32"
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if not binary:
        entry["data"] = array.ravel().tolist()
        return entry, b""
    if datatype == "BYTES":
        raw = b"".join(struct.pack("<I", len(b)) + b
                       for b in (s.encode("utf-8") for s in array.ravel()))  # fmt: skip
    else:
        raw = array.astype("<f4").tobytes()
    entry["parameters"] = {"binary_data_size": len(raw)}
    return entry, raw


def add_v2_routes(app: FastAPI, dataplane: DataPlane, parse: Parser) -> None:
    settings = parse.settings

    @app.get("/v2/health/live", tags=["v2"], summary="Open Inference Protocol: live")
    async def live() -> Response:
        return Response(b'{"live":true}', media_type=_JSON)

    @app.get("/v2/health/ready", tags=["v2"], summary="Open Inference Protocol: ready")
    async def ready() -> Response:
        ok, _ = dataplane.readiness()
        return Response(orjson.dumps({"ready": ok}), status_code=200 if ok else 503,
                        media_type=_JSON)  # fmt: skip

    @app.get("/v2/models/{name}", tags=["v2"], summary="Open Inference Protocol: metadata")
    async def metadata(name: str) -> Response:
        served = dataplane.served(name)
        payload = {
            "name": name,
            "versions": [served.ref["version"]],
            "platform": "xmc",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            ],
        }
        return Response(orjson.dumps(payload), media_type=_JSON)

    @app.get("/v2/models/{name}/ready", tags=["v2"], summary="Open Inference Protocol: "
             "model ready")  # fmt: skip
    async def model_ready(name: str) -> Response:
        ok = dataplane.describe(name)["state"] == "ready"
        return Response(orjson.dumps({"name": name, "ready": ok}),
                        status_code=200 if ok else 503, media_type=_JSON)  # fmt: skip

    @app.post("/v2/models/{name}/infer", tags=["v2"], summary="Open Inference Protocol: infer")
    async def infer(request: Request, name: str) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        header = request.headers.get(HEADER_LENGTH)
        json_size = int(header) if header and header.isdigit() else len(body)
        req = validate(InferRequest, body[:json_size])
        texts = _texts(req, body[json_size:])
        if len(texts) > settings.max_batch_size:
            raise PayloadTooLargeError(
                f"{len(texts)} documents are over the limit of {settings.max_batch_size}"
            )
        for i, text in enumerate(texts):
            parse.check_text(text, ["inputs", 0, "data", i])
        top_k = _param(req, "top_k", settings.max_top_k)
        beam_size = _param(req, "beam_size", settings.max_beam_size)
        result = await dataplane.predict(name, texts, top_k, beam_size)
        return _answer(req, name, result.model["version"], _outputs(result.answers, result.k))


def _answer(req: InferRequest, name: str, version: str,
            arrays: tuple[np.ndarray, np.ndarray]) -> Response:  # fmt: skip
    """The infer response, JSON only or JSON then binary tensors, as the request asks."""
    all_binary = bool(req.parameters.get("binary_data_output", False))
    wanted = {"labels": all_binary, "scores": all_binary}
    if req.outputs is not None:
        unknown = [o.name for o in req.outputs if o.name not in wanted]
        if unknown:
            raise _invalid(["outputs"], f"unknown outputs {unknown}: labels, scores exist")
        wanted = {o.name: bool(o.parameters.get("binary_data", all_binary)) for o in req.outputs}
    by_name = dict(zip(("labels", "scores"), arrays, strict=True))
    outputs, blobs = [], []
    for output, binary in wanted.items():
        entry, raw = _encode(output, by_name[output], binary)
        outputs.append(entry)
        blobs.append(raw)
    payload: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": outputs}
    if req.id is not None:
        payload["id"] = req.id
    head = orjson.dumps(payload)
    tail = b"".join(blobs)
    if not tail:
        return Response(head, media_type=_JSON)
    return Response(head + tail, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})  # fmt: skip
