"""The service's errors and the one map from error type to HTTP status.

Everything the service refuses on purpose is an :class:`models.XMCError`; routes raise and
the handlers installed by :func:`install_error_handlers` turn it into an
``application/problem+json`` body (RFC 9457). Bad input never becomes a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import BundleError, DataError, InvalidInputError, UnknownLabelError, XMCError

log = logging.getLogger("xmc.service")

PROBLEM_JSON = "application/problem+json"


class ServiceError(XMCError):
    """A request the HTTP layer refuses; ``errors`` lists field-level details if any."""

    def __init__(
        self,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        #: extension members of the problem document (RFC 9457 section 3.2)
        self.extra = extra or {}


class MalformedRequestError(ServiceError):
    """The body is not JSON (or not a JSON object)."""


class PayloadTooLargeError(ServiceError):
    """The body, a text or a batch is over its configured limit."""


class UnsupportedMediaTypeError(ServiceError):
    """The body's declared content type is not one the route reads."""


class RequestTimeoutError(ServiceError):
    """The client did not send the whole body within the allowed time (a trickle)."""


class RequestValidationFailed(ServiceError, InvalidInputError):
    """A field is missing, of the wrong type or out of range."""


class UnauthorizedError(ServiceError):
    """API keys are configured and the request has none or a wrong one."""


class NotReadyError(ServiceError):
    """The bundle is not loaded (yet)."""


class ModelNotFoundError(ServiceError):
    """No model of that name, or no default model among several; lists the models."""

    def __init__(self, detail: str, models: list[str]) -> None:
        super().__init__(detail, extra={"models": models})


class VersionRefusedError(ServiceError):
    """A reload found a version that cannot be served; the old one keeps serving."""


class LearningUnavailableError(ServiceError):
    """Learning is off (no XMC_FEEDBACK_DIR) or its log cannot be written."""


# Most specific first: the first class in a raised error's MRO that is here decides.
STATUS_BY_ERROR: dict[type[BaseException], tuple[int, str]] = {
    MalformedRequestError: (400, "Malformed request"),
    UnauthorizedError: (401, "Unauthorized"),
    ModelNotFoundError: (404, "Model not found"),
    RequestTimeoutError: (408, "Request timeout"),
    VersionRefusedError: (409, "Version refused"),
    PayloadTooLargeError: (413, "Payload too large"),
    UnsupportedMediaTypeError: (415, "Unsupported media type"),
    RequestValidationFailed: (422, "Invalid request"),
    NotReadyError: (503, "Model not ready"),
    LearningUnavailableError: (503, "Learning unavailable"),
    InvalidInputError: (422, "Invalid input"),  # includes NoTextEncoderError
    DataError: (422, "Invalid data"),
    BundleError: (503, "Model unavailable"),
    XMCError: (500, "Internal error"),
}


#: what each problem status means, for the OpenAPI description of the routes answering it
PROBLEM_WHEN: dict[int, str] = {
    400: "The body is not JSON (or, for a form, not UTF-8).",
    401: "API keys are set and the request has none or a wrong one.",
    404: "No model of that name (or several and no default); `models` lists them.",
    408: "The body did not arrive within XMC_BODY_TIMEOUT_SECONDS.",
    409: "The version found was refused; the old one keeps serving.",
    413: "The body, a text or the batch is over its limit.",
    415: "The body's content type is not one this route reads.",
    422: "A field is invalid, or the filter names a label the model does not know "
    "(`unknown_labels` lists them), or threshold is \"auto\" for a model without one.",
    503: "The model is not loaded (yet), the service is stopping, or XMC_MAX_INFLIGHT "
    "requests are in flight in this worker (with Retry-After).",
}


#: the problems of every route that reads a body (besides those of the model it names)
BODY_PROBLEMS = (400, 408, 413, 415, 422)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of the problem+json errors a route answers."""
    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {s: {"description": PROBLEM_WHEN[s], "content": {PROBLEM_JSON: ref}}
            for s in statuses}  # fmt: skip


def status_for(exc: BaseException) -> tuple[int, str]:
    """HTTP status and title of ``exc``; unknown exceptions are 500s."""
    for cls in type(exc).__mro__:
        found = STATUS_BY_ERROR.get(cls)
        if found is not None:
            return found
    return 500, "Internal error"


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """An RFC 9457 problem document; ``request_id`` lets a user quote it in a bug report."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    request_id = request.scope.get("state", {}).get("request_id")
    if request_id:
        body["request_id"] = request_id
    if errors:
        body["errors"] = errors
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    if request.url.path.startswith("/v2/"):
        body["error"] = detail  # the Open Inference Protocol's error member
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


async def _xmc_error(request: Request, exc: Exception) -> Response:
    status, title = status_for(exc)
    if status >= 500:
        log.error("request failed: %s", exc, exc_info=status == 500)
    errors = exc.errors if isinstance(exc, ServiceError) else None
    headers = None
    if isinstance(exc, UnauthorizedError):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, RequestTimeoutError):
        headers = {"Connection": "close"}  # the rest of the body may still be on its way
    elif status == 503 and not isinstance(exc, LearningUnavailableError):
        headers = {"Retry-After": "1"}  # learning stays off until an operator turns it on
    detail = exc.detail if isinstance(exc, ServiceError) else str(exc)
    extra = exc.extra if isinstance(exc, ServiceError) else None
    if isinstance(exc, UnknownLabelError):  # all of them, where the detail shows ten
        extra = {"unknown_labels": exc.labels}
    return problem_response(request, status, title, detail, errors, headers, extra)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return problem_response(
        request, exc.status_code, str(exc.detail), str(exc.detail), headers=exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return problem_response(request, 422, "Invalid request", "request validation failed", errors)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error")
    return problem_response(request, 500, "Internal error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through the problem+json shape."""
    app.add_exception_handler(XMCError, _xmc_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
