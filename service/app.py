"""The app factory: routes do HTTP only (validate, call the runtime, shape the answer)."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import fastapi_offline
import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from models.errors import NoTextEncoderError
from service import metrics
from service.cache import Answer, cache_key, normalize_text
from service.errors import (
    MalformedRequestError,
    PayloadTooLargeError,
    RequestValidationFailed,
    UnauthorizedError,
    install_error_handlers,
)
from service.middleware import RequestContextMiddleware
from service.runtime import Loader, Runtime, default_loader
from service.schemas import (
    BatchRequest,
    BatchResponse,
    Health,
    ModelInfo,
    PredictParams,
    PredictRequest,
    PredictResponse,
    Readiness,
)
from service.settings import Settings

# Swagger UI 5 (renders OpenAPI 3.1) shipped inside a PyPI wheel: /docs needs no internet.
_SWAGGER_STATIC = Path(fastapi_offline.__file__).parent / "static"
_STATIC_URL = "/static/docs"
_JSON = "application/json"
M = TypeVar("M", bound=BaseModel)
# Above these sizes a batch's parsing and key hashing run in a thread, off the event loop.
_OFFLOAD_BYTES = 256 * 1024
_OFFLOAD_DOCS = 512


def create_app(settings: Settings | None = None, loader: Loader = default_loader) -> FastAPI:
    """Build the ASGI app; the bundle loads (and warms up) during startup.

    ``loader`` maps a bundle path to a predictor (tests pass fakes; production uses
    :func:`models.load_bundle` memory-mapped).
    """
    settings = settings or Settings()
    runtime = Runtime(settings, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await runtime.load()
            yield
        finally:
            runtime.status = "stopping"
            await runtime.close()

    app = FastAPI(
        title="xmc-serve",
        summary="Extreme multi-label text classification: label documents over HTTP.",
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        access_log_enabled=settings.access_log,
    )
    app.mount(_STATIC_URL, StaticFiles(directory=_SWAGGER_STATIC), name="docs-static")
    _add_routes(app, runtime, settings)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _add_routes(app: FastAPI, runtime: Runtime, settings: Settings) -> None:
    keys = [key.encode() for key in settings.api_keys]

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        supplied = token.strip().encode()
        # Compare against every key, in constant time, so timing tells nothing.
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(supplied, key)
        if scheme.lower() != "bearer" or not supplied or not ok:
            raise UnauthorizedError("missing or invalid API key")

    def check_params(params: PredictParams) -> None:
        errors = []
        if params.top_k > settings.max_top_k:
            errors.append(_field_error("top_k", f"must be ≤ {settings.max_top_k}"))
        if params.beam_size > settings.max_beam_size:
            errors.append(_field_error("beam_size", f"must be ≤ {settings.max_beam_size}"))
        if errors:
            raise RequestValidationFailed("request validation failed", errors)

    def check_text(text: str, loc: list[Any]) -> None:
        # len(text) chars is a lower bound of its UTF-8 bytes: encode only when it matters.
        if len(text) * 4 > settings.max_text_bytes and (
            len(text) > settings.max_text_bytes
            or len(text.encode("utf-8")) > settings.max_text_bytes
        ):
            raise PayloadTooLargeError(
                f"text is over the limit of {settings.max_text_bytes} bytes",
                [{"loc": loc, "msg": "text too long", "type": "too_long"}],
            )
        if not text or text.isspace():
            raise RequestValidationFailed(
                "text is empty",
                [{"loc": loc, "msg": "text must not be empty or whitespace", "type": "empty"}],
            )

    scorer = _Scorer(runtime, settings)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        openapi_extra=_body_schema(PredictRequest),
        tags=["predict"],
        summary="Labels of one document",
    )
    async def predict(request: Request) -> Response:
        authorize(request)
        runtime.require_predictor()
        start = time.perf_counter()
        body = await _read_body(request, settings.max_body_bytes)
        req = _validate(PredictRequest, body)
        check_params(req)
        check_text(req.text, ["body", "text"])
        metrics.child(metrics.STAGE_LATENCY, "parse").observe(time.perf_counter() - start)
        answers, cached, background = await scorer.score([req.text], req)
        payload = {
            "labels": _labels(answers[0], req.min_score),
            "model": runtime.model_ref,
            "cached": cached[0],
        }
        log_fields: dict[str, Any] = {"n_docs": 1, "cached": cached[0]}
        if settings.log_text:
            log_fields["text"] = req.text
        request.scope["state"]["log"] = log_fields
        return Response(orjson.dumps(payload), media_type=_JSON, background=background)

    @app.post(
        "/v1/predict/batch",
        response_model=BatchResponse,
        openapi_extra=_body_schema(BatchRequest),
        tags=["predict"],
        summary="Labels of several documents, scored as one batch",
    )
    async def predict_batch(request: Request) -> Response:
        authorize(request)
        runtime.require_predictor()
        start = time.perf_counter()
        body = await _read_body(request, settings.max_body_bytes)
        if len(body) > _OFFLOAD_BYTES:
            # Validating megabytes of JSON takes milliseconds: keep the event loop free.
            loop = asyncio.get_running_loop()
            req = await loop.run_in_executor(None, _validate, BatchRequest, body)
        else:
            req = _validate(BatchRequest, body)
        if len(req.documents) > settings.max_batch_size:
            raise PayloadTooLargeError(
                f"batch of {len(req.documents)} documents is over the limit of "
                f"{settings.max_batch_size}"
            )
        check_params(req)
        for i, doc in enumerate(req.documents):
            check_text(doc.text, ["body", "documents", i, "text"])
        metrics.child(metrics.STAGE_LATENCY, "parse").observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.observe(len(req.documents))
        texts = [doc.text for doc in req.documents]
        answers, cached, background = await scorer.score(texts, req)
        results = [
            {"id": doc.id, "labels": _labels(answer, req.min_score), "cached": hit}
            for doc, answer, hit in zip(req.documents, answers, cached, strict=True)
        ]
        log_fields: dict[str, Any] = {"n_docs": len(texts), "n_cached": sum(cached)}
        if settings.log_text:
            log_fields["texts"] = texts
        request.scope["state"]["log"] = log_fields
        payload = {"results": results, "model": runtime.model_ref}
        return Response(orjson.dumps(payload), media_type=_JSON, background=background)

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], summary="The loaded model")
    async def model_info(request: Request) -> Response:
        authorize(request)
        p = runtime.require_predictor()
        manifest = p.manifest or {}
        payload = {
            "name": p.name,
            "version": p.version,
            "created_at": p.created_at,
            "n_labels": p.n_labels,
            "n_features": p.n_features,
            "trees": manifest.get("trees"),
            "encoder": manifest.get("encoders"),
            "params": manifest.get("params"),
            "metrics": manifest.get("metrics") or {},
        }
        return Response(orjson.dumps(payload, default=str), media_type=_JSON)

    @app.get("/healthz", response_model=Health, tags=["health"], summary="Process is alive")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["health"],
        summary="Model loaded and warmed up (503 until then)",
        responses={503: {"model": Readiness}},
    )
    async def readyz() -> Response:
        cache = runtime.cache
        await cache.ping()
        payload = {
            "status": runtime.status,
            "model": runtime.model_ref,
            "cache": {"backend": cache.backend, "state": cache.state()},
            "detail": runtime.detail,
        }
        status = 200 if runtime.status == "ready" else 503
        return Response(orjson.dumps(payload), status_code=status, media_type=_JSON)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="xmc-serve API",
            swagger_js_url=f"{_STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{_STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{_STATIC_URL}/favicon.png",
            # Swagger UI would otherwise send the spec to validator.swagger.io for a badge.
            swagger_ui_parameters={"validatorUrl": None},
        )


class _Scorer:
    """Cache lookup, then one vectorized predict call for the misses, then cache fill."""

    def __init__(self, runtime: Runtime, settings: Settings) -> None:
        self.runtime = runtime
        self.settings = settings

    def _keys(
        self, texts: list[str], version: str, params: PredictParams
    ) -> tuple[list[str], list[str]]:
        prefix = self.settings.cache_prefix
        normalized = [normalize_text(t) for t in texts]
        keys = [cache_key(prefix, version, t, params.top_k, params.beam_size) for t in normalized]
        return normalized, keys

    async def score(
        self, texts: list[str], params: PredictParams
    ) -> tuple[list[Answer], list[bool], BackgroundTask | None]:
        runtime = self.runtime
        predictor = runtime.require_predictor()
        if not predictor.has_text_encoder:
            raise NoTextEncoderError(
                "this bundle was built from feature vectors and has no text encoder"
            )
        if len(texts) > _OFFLOAD_DOCS:
            # A large batch's normalizing and hashing is milliseconds of CPU: not on the loop.
            loop = asyncio.get_running_loop()
            normalized, keys = await loop.run_in_executor(
                None, self._keys, texts, predictor.version, params
            )
        else:
            normalized, keys = self._keys(texts, predictor.version, params)
        start = time.perf_counter()
        found = await runtime.cache.get_many(keys)
        metrics.child(metrics.STAGE_LATENCY, "cache").observe(time.perf_counter() - start)
        # Unique misses only: a batch that repeats a text scores it once.
        miss_index: dict[str, int] = {}
        miss_texts: list[str] = []
        for key, text, answer in zip(keys, normalized, found, strict=True):
            if answer is None and key not in miss_index:
                miss_index[key] = len(miss_texts)
                miss_texts.append(text)
        n_miss = sum(1 for answer in found if answer is None)
        if n_miss < len(found):
            metrics.CACHE_HITS.inc(len(found) - n_miss)
        if n_miss:
            metrics.CACHE_MISSES.inc(n_miss)
        cached = [answer is not None for answer in found]
        if not miss_texts:
            return found, cached, None  # type: ignore[return-value]
        if len(miss_texts) == 1 and len(texts) == 1:
            scored = [await runtime.predict_one(miss_texts[0], params.top_k, params.beam_size)]
        else:
            scored = await runtime.predict(miss_texts, params.top_k, params.beam_size)
        answers = [
            answer if answer is not None else scored[miss_index[key]]
            for key, answer in zip(keys, found, strict=True)
        ]
        new_items = [(key, scored[i]) for key, i in miss_index.items()]
        # Filled after the response is sent: the client never waits for the cache write.
        return answers, cached, BackgroundTask(runtime.cache.set_many, new_items)


def _labels(answer: Answer, min_score: float) -> list[dict[str, Any]]:
    return [{"label": label, "score": score} for label, score in answer if score >= min_score]


def _field_error(field: str, msg: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": msg, "type": "less_than_equal"}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` (chunked bodies have no length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validate(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise MalformedRequestError("request body is not valid JSON") from None
        raise RequestValidationFailed(
            "request validation failed",
            [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors],
        ) from None


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Document a body the route reads itself (for speed) as if FastAPI parsed it."""
    return {
        "requestBody": {
            "required": True,
            "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (PredictRequest, BatchRequest):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    app.openapi_schema = schema
    return schema


def create_app_from_env() -> FastAPI:
    """uvicorn factory (``service.app:create_app_from_env``): every worker process reads its
    settings from ``XMC_*`` variables, which ``xmc serve`` sets before starting them."""
    from service.middleware import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
