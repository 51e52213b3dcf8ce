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
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from service.cache import Answer
from service.dataplane import DataPlane
from service.errors import (
    BODY_PROBLEMS,
    PayloadTooLargeError,
    RequestValidationFailed,
    problem_responses,
)
from service.parsing import JSON, OCTET_STREAM, Parser, validate
from service.schemas import TEXT_SCHEMA, NonNegativeInt, PositiveInt, body_schema, limit

#: the binary data extension: the JSON part's length when binary tensor data follows it
HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"


class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    binary_data_size: NonNegativeInt | None = Field(
        default=None, description="Binary extension: bytes of this tensor after the JSON."
    )


#: a JSON ``text`` tensor's data as the service reads it (the binary extension sends none)
_TEXT_DATA = {
    "type": "array", "minItems": 1, **limit("maxItems", "max_batch_size"),
    "items": TEXT_SCHEMA,
    "description": "The documents; as many as shape[0].",
}  # fmt: skip


class Tensor(BaseModel):
    """The input tensor of an infer request: ``text``, BYTES, shape ``[n]``."""

    # In plain JSON the data is required; with the binary extension it follows the JSON.
    model_config = ConfigDict(strict=True, json_schema_extra={
        "required": ["name", "shape", "datatype", "data"]})  # fmt: skip

    name: Literal["text"]
    shape: list[PositiveInt] = Field(min_length=1, max_length=1)
    datatype: Literal["BYTES"]
    parameters: TensorParameters = Field(default_factory=TensorParameters)
    data: Annotated[list[Any] | None, WithJsonSchema(_TEXT_DATA)] = None


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    binary_data: bool | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: Literal["labels", "scores"]
    parameters: OutputParameters = Field(default_factory=OutputParameters)


class InferParameters(BaseModel):
    """Known request parameters; others are accepted and ignored, as the protocol allows."""

    model_config = ConfigDict(extra="allow", strict=True)

    top_k: PositiveInt | None = Field(default=None, json_schema_extra=limit("maximum", "max_top_k"))
    beam_size: PositiveInt | None = Field(
        default=None, json_schema_extra=limit("maximum", "max_beam_size")
    )
    binary_data_output: bool = False


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    id: str | None = None
    parameters: InferParameters = Field(default_factory=InferParameters)
    inputs: list[Tensor] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorInfo(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


class OutputTensor(BaseModel):
    name: Literal["labels", "scores"]
    datatype: Literal["BYTES", "FP32"]
    shape: list[int]
    data: list[str] | list[float] | None = Field(
        default=None, description="Row-major; absent when the tensor is sent as binary data."
    )
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


_INFER_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or (binary data asked for) the JSON part followed by the "
          "tensors' bytes, its length in Inference-Header-Content-Length",
          "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}},
    **problem_responses(*BODY_PROBLEMS, 404, 503),
}  # fmt: skip


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
    """The documents of the one input tensor ``text`` (its name, type and shape are checked
    by the model)."""
    tensor = req.inputs[0]
    size = tensor.parameters.binary_data_size
    if tensor.data is not None:
        elements: list[Any] = tensor.data
    elif size is not None and size <= len(binary):
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


def _param(value: int | None, name: str, most: int) -> int | None:
    """A request parameter within its setting's bound (the model checked it is ≥ 1)."""
    if value is not None and value > most:
        raise _invalid(["parameters", name], f"{name} must be an integer in 1..{most}")
    return value


def _outputs(answers: list[Answer], k: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.full((len(answers), k), "", dtype=object)
    scores = np.zeros((len(answers), k), dtype=np.float32)
    for i, answer in enumerate(answers):
        for j, (label, score, *_) in enumerate(answer[:k]):
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

    @app.get("/v2/health/live", response_model=Live, tags=["v2"],
             summary="Open Inference Protocol: live")  # fmt: skip
    async def live() -> Response:
        return Response(b'{"live":true}', media_type=_JSON)

    @app.get("/v2/health/ready", response_model=Ready, tags=["v2"],
             summary="Open Inference Protocol: ready", responses={503: {"model": Ready}})
    async def ready() -> Response:
        ok, _ = dataplane.readiness()
        return Response(orjson.dumps({"ready": ok}), status_code=200 if ok else 503,
                        media_type=_JSON)  # fmt: skip

    @app.get("/v2/models/{name}", response_model=ModelMetadata, tags=["v2"],
             summary="Open Inference Protocol: metadata",
             responses=problem_responses(404, 503))  # fmt: skip
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

    @app.get("/v2/models/{name}/ready", response_model=ModelReady, tags=["v2"],
             summary="Open Inference Protocol: model ready",
             responses={503: {"model": ModelReady}, **problem_responses(404)})  # fmt: skip
    async def model_ready(name: str) -> Response:
        ok = dataplane.describe(name)["state"] == "ready"
        return Response(orjson.dumps({"name": name, "ready": ok}),
                        status_code=200 if ok else 503, media_type=_JSON)  # fmt: skip

    @app.post("/v2/models/{name}/infer", response_model=InferResponse, tags=["v2"],
              summary="Open Inference Protocol: infer", responses=_INFER_ANSWERS,
              openapi_extra=body_schema(InferRequest))  # fmt: skip
    async def infer(request: Request, name: str) -> Response:
        body = await parse.body(request, (JSON, OCTET_STREAM))
        header = request.headers.get(HEADER_LENGTH)
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        json_size = int(header) if header and header.isascii() and header.isdigit() else len(body)
        req = validate(InferRequest, body[:json_size])
        texts = _texts(req, body[json_size:])
        if len(texts) > settings.max_batch_size:
            raise PayloadTooLargeError(
                f"{len(texts)} documents are over the limit of {settings.max_batch_size}"
            )
        for i, text in enumerate(texts):
            parse.check_text(text, ["inputs", 0, "data", i])
        top_k = _param(req.parameters.top_k, "top_k", settings.max_top_k)
        beam_size = _param(req.parameters.beam_size, "beam_size", settings.max_beam_size)
        result = await dataplane.predict(name, texts, top_k, beam_size)
        return _answer(req, name, result.model["version"], _outputs(result.answers, result.k))


def _answer(req: InferRequest, name: str, version: str,
            arrays: tuple[np.ndarray, np.ndarray]) -> Response:  # fmt: skip
    """The infer response, JSON only or JSON then binary tensors, as the request asks."""
    all_binary = req.parameters.binary_data_output
    wanted = {"labels": all_binary, "scores": all_binary}
    if req.outputs is not None:
        wanted = {o.name: all_binary if o.parameters.binary_data is None
                  else o.parameters.binary_data for o in req.outputs}  # fmt: skip
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
