"""Per-request plumbing as one pure ASGI middleware: request id, body-size gate, metrics,
structured access log, and a last-resort 500 that still carries the request id.

Pure ASGI (not ``BaseHTTPMiddleware``) because it sits on every request's hot path.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import PROBLEM_JSON

access_log = logging.getLogger("xmc.access")
log = logging.getLogger("xmc.service")

# A client-sent id is echoed only if it is short and harmless in logs and headers.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

# Our own ids: a random per-process prefix and a counter, 32 hex digits like a uuid4 but
# without a urandom call per request (uuid4 showed up in the request-path profile).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


class JSONFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` adds keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the service's loggers and uvicorn's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    for name in ("xmc", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # uvicorn's own access log is replaced by ours (JSON, with request id and timings).
    logging.getLogger("uvicorn.access").disabled = True


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, access_log_enabled: bool) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = None
        content_length = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    request_id = candidate
            elif name == b"content-length":
                content_length = value
        if request_id is None:
            request_id = _new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            if content_length is not None and _too_long(content_length, self.max_body_bytes):
                # Refuse before reading a byte of an oversized body.
                await _send_problem(
                    send_with_id,
                    scope,
                    413,
                    "Payload too large",
                    f"request body is over the limit of {self.max_body_bytes} bytes",
                    request_id,
                )
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if started:
                raise
            await _send_problem(
                send_with_id, scope, 500, "Internal error", "internal error", request_id
            )
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.child(metrics.REQUESTS, endpoint, str(status)).inc()
            metrics.child(metrics.REQUEST_LATENCY, endpoint).observe(elapsed)
            if self.access_log_enabled:
                fields: dict[str, Any] = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                }
                client = scope.get("client")
                if client:
                    fields["client"] = client[0]
                fields.update(state.get("log", {}))
                access_log.info("request", extra={"fields": fields})


class AdmissionMiddleware:
    """Bounds the requests a worker works on at once. Beyond ``max_inflight`` a request is
    refused at once (503, ``Retry-After``) before its body is read, so that overload costs
    the client a quick retry instead of a queue that grows without limit and times out.
    Requests for which ``exempt(path)`` holds (health, metrics, docs) are never refused."""

    def __init__(self, app: ASGIApp, max_inflight: int, exempt: Callable[[str], bool]) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.exempt = exempt
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            metrics.OVERLOADED.inc()
            request_id = scope.get("state", {}).get("request_id", "")
            await _send_problem(
                send, scope, 503, "Overloaded",
                f"{self.max_inflight} requests are in flight in this worker; retry shortly",
                request_id, headers=[(b"retry-after", b"1")],
            )  # fmt: skip
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


def _too_long(content_length: bytes, limit: int) -> bool:
    try:
        return int(content_length) > limit
    except ValueError:
        return False  # a bad header: the server (h11/httptools) rejects it


async def _send_problem(
    send: Send, scope: Scope, status: int, title: str, detail: str, request_id: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = orjson.dumps(
        {
            "type": "about:blank",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": scope["path"],
            "request_id": request_id,
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
