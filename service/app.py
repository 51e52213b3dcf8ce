"""The app factory: routes do HTTP only (parse, authorize, call the DataPlane, shape the
answer)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_offline
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from models.vocab import LabelInfo, describe
from service import metrics
from service.annif import AnnifBatchRequest, LearnRequest, add_annif_routes
from service.cache import Answer
from service.controls import Controls
from service.dataplane import DataPlane, Prediction, install_reload_signal
from service.errors import (
    BODY_PROBLEMS,
    ModelNotFoundError,
    UnauthorizedError,
    install_error_handlers,
    problem_responses,
)
from service.middleware import AdmissionMiddleware, RequestContextMiddleware
from service.parsing import Parser
from service.registry import Loader, ServedPredictor
from service.schemas import (
    BATCH_EXAMPLES,
    PREDICT_EXAMPLES,
    BatchRequest,
    BatchResponse,
    Health,
    ModelInfo,
    ModelList,
    ModelStatus,
    PredictRequest,
    PredictResponse,
    Problem,
    Readiness,
    body_schema,
    fill_limits,
)
from service.settings import Settings
from service.v2 import InferRequest, add_v2_routes

# Swagger UI 5 (renders OpenAPI 3.1) shipped inside a PyPI wheel: /docs needs no internet.
_SWAGGER_STATIC = Path(fastapi_offline.__file__).parent / "static"
_STATIC_URL = "/static/docs"
# The page to try a model (GET /): plain files of this package, calling only the public API.
_PAGE = Path(__file__).parent / "page"
_PAGE_URL = "/static/page"
_JSON = "application/json"
#: the request bodies that routes read themselves (documented in the spec's components)
BODY_MODELS = (PredictRequest, BatchRequest, InferRequest, AnnifBatchRequest, LearnRequest)
_PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
}  # fmt: skip


OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
OPEN_PREFIXES = ("/v2/health/",)


def default_loader(settings: Settings) -> Loader:
    """Memory-mapped, so every worker shares one copy of the arrays; the search uses the
    prediction threads the settings give, no pool of its own beyond them."""
    import models

    def load(path: str) -> ServedPredictor:
        return models.Predictor.load(path, mmap=True, threads=settings.predict_threads)

    return load


def create_app(settings: Settings | None = None, loader: Loader | None = None) -> FastAPI:
    """Build the ASGI app; the models load (and warm up) during startup.

    ``loader`` maps a bundle path to a predictor (tests pass fakes; production uses
    :func:`default_loader`).
    """
    settings = settings or Settings()
    dataplane = DataPlane(settings, loader or default_loader(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            install_reload_signal(dataplane)
            await dataplane.start()
            yield
        finally:
            await dataplane.close()

    keys = [key.encode() for key in settings.api_keys]
    app = FastAPI(
        title="xmc-serve",
        summary="Extreme multi-label text classification: label documents over HTTP.",
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # Every route, including any added later, is authorized unless its path is open.
        # Without keys there is nothing to check, and nothing is added to the request path.
        dependencies=[Depends(_authorizer(keys))] if keys else None,
    )
    app.state.dataplane = dataplane
    app.state.settings = settings
    install_error_handlers(app)
    # added first, so it runs inside the request context (request id, access log, metrics)
    app.add_middleware(AdmissionMiddleware, max_inflight=settings.max_inflight,
                       exempt=_is_exempt)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        access_log_enabled=settings.access_log,
    )
    app.mount(_STATIC_URL, StaticFiles(directory=_SWAGGER_STATIC), name="docs-static")
    app.mount(_PAGE_URL, StaticFiles(directory=_PAGE), name="page-static")
    parse = Parser(settings)
    _add_predict_routes(app, dataplane, parse)
    _add_model_routes(app, dataplane)
    _add_health_routes(app, dataplane)
    _add_page_route(app)
    add_v2_routes(app, dataplane, parse)
    add_annif_routes(app, dataplane, parse)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _authorizer(keys: list[bytes]) -> Callable[[Request], Awaitable[None]]:
    async def authorize(request: Request) -> None:
        route = request.scope.get("route")
        if _is_open(getattr(route, "path", request.url.path)):
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

    return authorize


def _add_predict_routes(app: FastAPI, dataplane: DataPlane, parse: Parser) -> None:
    settings = parse.settings

    async def predict_one(request: Request, name: str | None) -> Response:
        req = await parse.single(request)
        result = await dataplane.predict(name, [req.text], req.top_k, req.beam_size,
                                         Controls.of(req))  # fmt: skip
        payload = {
            "labels": _labels(result.answers[0], result.label_info),
            "model": result.model,
            "cached": result.cached[0],
            "threshold": result.threshold,
        }
        log_fields: dict[str, Any] = {"n_docs": 1, "cached": result.cached[0]}
        if settings.log_text:
            log_fields["text"] = req.text
        request.scope["state"]["log"] = log_fields
        return _json(payload, _fill(dataplane, result))

    async def predict_many(request: Request, name: str | None) -> Response:
        req = await parse.batch(request)
        texts = [doc.text for doc in req.documents]
        result = await dataplane.predict(name, texts, req.top_k, req.beam_size,
                                         Controls.of(req))  # fmt: skip
        results = [
            {"id": doc.id, "labels": _labels(answer, result.label_info), "cached": hit}
            for doc, answer, hit in zip(req.documents, result.answers, result.cached, strict=True)
        ]
        log_fields: dict[str, Any] = {"n_docs": len(texts), "n_cached": sum(result.cached)}
        if settings.log_text:
            log_fields["texts"] = texts
        request.scope["state"]["log"] = log_fields
        payload = {"results": results, "model": result.model, "threshold": result.threshold}
        return _json(payload, _fill(dataplane, result))

    one = body_schema(PredictRequest, PREDICT_EXAMPLES)
    many = body_schema(BatchRequest, BATCH_EXAMPLES)
    errors = problem_responses(*BODY_PROBLEMS, 404, 503)

    @app.post("/v1/predict", response_model=PredictResponse, openapi_extra=one,
              responses=errors, tags=["predict"],
              summary="Labels of one document (default model)")  # fmt: skip
    async def predict(request: Request) -> Response:
        return await predict_one(request, None)

    @app.post("/v1/predict/batch", response_model=BatchResponse, openapi_extra=many,
              responses=errors, tags=["predict"],
              summary="Labels of several documents, one vectorized call (default model)",
              )  # fmt: skip
    async def predict_batch(request: Request) -> Response:
        return await predict_many(request, None)

    @app.post("/v1/models/{name}/predict", response_model=PredictResponse, openapi_extra=one,
              responses=errors, tags=["predict"], summary="Labels of one document")  # fmt: skip
    async def model_predict(request: Request, name: str) -> Response:
        return await predict_one(request, name)

    @app.post("/v1/models/{name}/predict/batch", response_model=BatchResponse,
              openapi_extra=many, responses=errors, tags=["predict"],
              summary="Labels of several documents")  # fmt: skip
    async def model_predict_batch(request: Request, name: str) -> Response:
        return await predict_many(request, name)


def _add_model_routes(app: FastAPI, dataplane: DataPlane) -> None:
    def info(name: str | None) -> Response:
        served = dataplane.served(name)
        p = served.predictor
        manifest = p.manifest
        payload = {
            "name": served.name,
            "version": p.version,
            "repository_version": served.source.repository_version,
            "created_at": p.created_at,
            "n_labels": p.n_labels,
            "n_features": p.n_features,
            "trees": manifest.get("trees"),
            "encoder": manifest.get("encoders"),
            "params": manifest.get("params"),
            "metrics": manifest.get("metrics") or {},
            "threshold": p.tuned_threshold,
            "calibrated": "calibration" in manifest,
            "config": served.config.describe(),
        }
        return Response(orjson.dumps(payload, default=str), media_type=_JSON)

    missing = problem_responses(404, 503)

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"],
             summary="The default model", responses=missing)  # fmt: skip
    async def model_info() -> Response:
        return info(None)

    @app.get("/v1/models", response_model=ModelList, tags=["model"],
             summary="Every model served, with its state and last error")  # fmt: skip
    async def list_models() -> Response:
        return _json({"models": dataplane.models(), "default": _default_or_none(dataplane)})

    @app.get("/v1/models/{name}", response_model=ModelInfo, tags=["model"],
             summary="One model", responses=missing)  # fmt: skip
    async def named_model(name: str) -> Response:
        return info(name)

    @app.get("/v1/models/{name}/ready", response_model=ModelStatus, tags=["model"],
             summary="200 when the model serves, else 503",
             responses={503: {"model": ModelStatus}, **problem_responses(404)})  # fmt: skip
    async def model_ready(name: str) -> Response:
        status = dataplane.describe(name)
        return _json(status, status=200 if status["state"] == "ready" else 503)

    @app.post("/v1/models/{name}/reload", response_model=ModelStatus, tags=["model"],
              summary="Switch to the version the repository names now, in every worker",
              responses=problem_responses(404, 409))  # fmt: skip
    async def reload_model(name: str) -> Response:
        return _json(await dataplane.reload(name))


def _add_health_routes(app: FastAPI, dataplane: DataPlane) -> None:
    @app.get("/healthz", response_model=Health, tags=["health"], summary="Process is alive")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["health"],
        summary="Every model that has not failed is loaded and warmed up (503 until then)",
        responses={503: {"model": Readiness}},
    )
    async def readyz() -> Response:
        cache = dataplane.cache
        await cache.ping()
        ready, payload = dataplane.readiness()
        payload["cache"] = {"backend": cache.backend, "state": cache.state()}
        return _json(payload, status=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             response_class=Response, responses=_PROMETHEUS_TEXT)  # fmt: skip
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


def _add_page_route(app: FastAPI) -> None:
    page = (_PAGE / "index.html").read_bytes()

    @app.get("/", include_in_schema=False)
    async def try_it() -> Response:
        """A page to try the models in a browser; open, like /docs (the API calls it makes
        send the key the user types when keys are set)."""
        return Response(page, media_type="text/html; charset=utf-8")


def _default_or_none(dataplane: DataPlane) -> str | None:
    try:
        return dataplane.default_name()
    except ModelNotFoundError:
        return None


def _json(payload: object, background: BackgroundTask | None = None, status: int = 200
          ) -> Response:  # fmt: skip
    return Response(orjson.dumps(payload, default=str), status_code=status, media_type=_JSON,
                    background=background)  # fmt: skip


def _fill(dataplane: DataPlane, result: Prediction) -> BackgroundTask | None:
    """The cache is filled after the response is sent: the client never waits for it."""
    return BackgroundTask(dataplane.cache.set_many, result.fill) if result.fill else None


def _labels(answer: Answer, info: Mapping[str, LabelInfo]) -> list[dict[str, Any]]:
    out = []
    for entry in answer:
        # no vocabulary: the label's name is all there is (the common, fast case)
        shaped = describe(entry[0], entry[1], info) if info else {
            "label": entry[0], "score": entry[1]}
        if len(entry) == 3:  # explained
            shaped["explanation"] = entry[2]
        out.append(shaped)
    return out


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The spec as the service behaves: the bodies routes read themselves, the limits the
    settings set, no FastAPI validation errors (never answered: routes validate themselves
    into problem+json), and the key check when keys are set."""
    if app.openapi_schema:
        return app.openapi_schema
    settings: Settings = app.state.settings
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (*BODY_MODELS, Problem):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            if "HTTPValidationError" in orjson.dumps(responses.get("422", {})).decode():
                del responses["422"]
            if settings.api_keys and not _is_open(path):
                operation["security"] = [{"bearer": []}]
                responses.update({str(k): v for k, v in problem_responses(401).items()})
    if settings.api_keys:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = fill_limits(schema, settings)
    return app.openapi_schema


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _is_exempt(path: str) -> bool:
    """Not counted against XMC_MAX_INFLIGHT: probes, metrics and docs must answer under load."""
    return _is_open(path) or path.startswith((_STATIC_URL, _PAGE_URL))


def create_app_from_env() -> FastAPI:
    """uvicorn factory (``service.app:create_app_from_env``): every worker process reads its
    settings from ``XMC_*`` variables, which ``xmc serve`` sets before starting them."""
    from service.middleware import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
