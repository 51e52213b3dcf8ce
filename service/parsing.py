"""Reading and checking request bodies: everything a route needs before the DataPlane.

pydantic validates straight from the raw bytes (``model_validate_json``, one pass in Rust);
limits that depend on the settings are checked here too, each failure a problem+json error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from service import metrics
from service.errors import (
    MalformedRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    RequestValidationFailed,
    UnsupportedMediaTypeError,
)
from service.schemas import BatchRequest, PredictParams, PredictRequest
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)
# Above this size a batch's parsing runs in a thread, off the event loop.
_OFFLOAD_BYTES = 256 * 1024
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
#: the binary tensor data extension of the Open Inference Protocol
OCTET_STREAM = "application/octet-stream"
# Python 3.10 has no asyncio.timeout: wait_for there (a task per body, still correct).
_TIMEOUT = getattr(asyncio, "timeout", None)


class Parser:
    """Request parsing and the checks that depend on settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def body(self, request: Request, media_types: Collection[str] = (JSON,)) -> bytes:
        """The raw body, once its content type is one of ``media_types`` (or absent), read
        within the size and time limits."""
        check_media_type(request, media_types)
        settings = self.settings
        return await read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)

    async def single(self, request: Request) -> PredictRequest:
        start = time.perf_counter()
        body = await self.body(request)
        req = validate(PredictRequest, body)
        self.check_params(req)
        self.check_text(req.text, ["body", "text"])
        metrics.child(metrics.STAGE_LATENCY, "parse").observe(time.perf_counter() - start)
        return req

    async def batch(self, request: Request) -> BatchRequest:
        start = time.perf_counter()
        settings = self.settings
        body = await self.body(request)
        if len(body) > _OFFLOAD_BYTES:
            # Validating megabytes of JSON takes milliseconds: keep the event loop free.
            loop = asyncio.get_running_loop()
            req = await loop.run_in_executor(None, validate, BatchRequest, body)
        else:
            req = validate(BatchRequest, body)
        if len(req.documents) > settings.max_batch_size:
            raise PayloadTooLargeError(
                f"batch of {len(req.documents)} documents is over the limit of "
                f"{settings.max_batch_size}"
            )
        self.check_params(req)
        for i, doc in enumerate(req.documents):
            self.check_text(doc.text, ["body", "documents", i, "text"])
        metrics.child(metrics.STAGE_LATENCY, "parse").observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.observe(len(req.documents))
        return req

    def check_params(self, params: PredictParams) -> None:
        settings = self.settings
        errors = []
        if params.top_k is not None and params.top_k > settings.max_top_k:
            errors.append(_field_error("top_k", f"must be ≤ {settings.max_top_k}"))
        if params.beam_size is not None and params.beam_size > settings.max_beam_size:
            errors.append(_field_error("beam_size", f"must be ≤ {settings.max_beam_size}"))
        if errors:
            raise RequestValidationFailed("request validation failed", errors)

    def check_text(self, text: str, loc: list[str | int]) -> None:
        limit = self.settings.max_text_bytes
        # len(text) chars is a lower bound of its UTF-8 bytes: encode only when it matters.
        if len(text) * 4 > limit and (len(text) > limit or len(text.encode("utf-8")) > limit):
            raise PayloadTooLargeError(
                f"text is over the limit of {limit} bytes",
                [{"loc": loc, "msg": "text too long", "type": "too_long"}],
            )
        if not text or text.isspace():
            raise RequestValidationFailed(
                "text is empty",
                [{"loc": loc, "msg": "text must not be empty or whitespace", "type": "empty"}],
            )


def _field_error(field: str, msg: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": msg, "type": "less_than_equal"}


def check_media_type(request: Request, media_types: Collection[str]) -> None:
    """Refuse a body declared as something the route does not read. No content type at all
    is taken as the route's own (tritonclient sends none); JSON routes take ``+json`` types."""
    declared = request.headers.get("content-type", "").strip()
    media = declared.partition(";")[0].strip().lower()
    if not declared or media in media_types or (JSON in media_types and media.endswith("+json")):
        return
    raise UnsupportedMediaTypeError(
        f"content type {media!r} is not read here: send {' or '.join(media_types)}"
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused as soon as it passes ``limit`` (chunked bodies have no length), or
    when it has not all arrived after ``timeout_s`` (a client trickling bytes would
    otherwise hold its connection and its in-flight slot for as long as it likes)."""
    reading = _read_all(request, limit)
    try:
        if _TIMEOUT is None:
            return await asyncio.wait_for(reading, timeout_s)
        async with _TIMEOUT(timeout_s):
            return await reading
    except asyncio.TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:g} s"
        ) from None


async def _read_all(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def validate(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise MalformedRequestError("request body is not valid JSON") from None
        shaped = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                  for e in errors]  # fmt: skip
        first = shaped[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        # The detail names the first problem: many clients (tritonclient, annif-client) show
        # only the detail, not the errors list.
        raise RequestValidationFailed(
            f"request validation failed: {where}: {first['msg']}", shaped
        ) from None
