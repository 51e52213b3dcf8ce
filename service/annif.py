"""Annif's REST API beside our own, so that Annif's clients (``annif-client``, catalogue
plugins, pipelines) switch to xmc-serve without a code change.

Every model served is an Annif *project* whose ``project_id`` is the model's name. The same
DataPlane answers (cache, coalescing, hot reload), behind the same limits and keys; errors are
our problem+json documents, whose ``detail`` member is the one Annif's clients read.

* ``GET /v1/`` and ``GET /v1/projects[/{project_id}]``: what is served;
* ``POST /v1/projects/{project_id}/suggest``: a form-encoded ``text``, optional ``limit``
  (default 10, as Annif's; 0 gives no result) and ``threshold`` (keep scores ≥ it);
* ``POST /v1/projects/{project_id}/suggest-batch?limit=&threshold=``: JSON documents;
* ``POST /v1/projects/{project_id}/learn``: appended to a feedback log for the next build
  (:mod:`service.feedback`), 204; 503 while ``XMC_FEEDBACK_DIR`` is unset.

A result's ``uri`` and ``label`` come from the bundle's vocabulary (``xmc build --vocab``);
without one both are the label's name as trained and ``notation`` is null.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator
from starlette.background import BackgroundTask

from models.vocab import LabelInfo
from service.cache import Answer
from service.dataplane import DataPlane, Prediction
from service.errors import MalformedRequestError, PayloadTooLargeError, RequestValidationFailed
from service.parsing import Parser, read_body, validate

_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"
#: Annif's default number of results
DEFAULT_LIMIT = 10


# ---------------------------------------------------------------------- request bodies
class AnnifDocument(BaseModel):
    """A document of suggest-batch; ``metadata`` is accepted and not used."""

    model_config = ConfigDict(extra="ignore")

    text: str
    document_id: str | int | None = None
    metadata: dict[str, Any] | None = None


class AnnifBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    documents: list[AnnifDocument]


class LearnSubject(BaseModel):
    model_config = ConfigDict(extra="ignore")

    uri: str | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _named(self) -> LearnSubject:
        if not (self.uri or self.label):
            raise ValueError("a subject needs a uri or a label")
        return self


class LearnText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str


class LearnDocument(BaseModel):
    """Annif's IndexedDocument: ``text`` at the top (Annif's schema) or inside
    ``document``; the subjects a person gave it."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = None
    document: LearnText | None = None
    subjects: list[LearnSubject] = Field(min_length=1)


class LearnRequest(RootModel[list[LearnDocument]]):
    pass


# ---------------------------------------------------------------------- response shapes
class AnnifInfo(BaseModel):
    title: str
    version: str


class AnnifBackend(BaseModel):
    backend_id: str


class AnnifVocab(BaseModel):
    vocab_id: str
    languages: list[str]
    size: int | None
    loaded: bool


class AnnifProject(BaseModel):
    project_id: str = Field(description="The model's name.")
    name: str = Field(description="The bundle's own name.")
    language: str = Field(description="The vocabulary's language; 'und' without one.")
    backend: AnnifBackend
    vocab: AnnifVocab | None
    vocab_language: str | None
    is_trained: bool = Field(description="True while a version of the model serves.")
    modification_time: str | None = Field(description="When the served version was built.")


class AnnifProjectList(BaseModel):
    projects: list[AnnifProject]


class AnnifSuggestion(BaseModel):
    uri: str
    label: str
    notation: str | None
    score: float


class AnnifResults(BaseModel):
    results: list[AnnifSuggestion] = Field(description="Best first.")


class AnnifBatchResult(AnnifResults):
    document_id: str | int | None


_SUGGEST_FORM = {
    "requestBody": {
        "required": True,
        "content": {_FORM: {"schema": {
            "type": "object", "required": ["text"],
            "properties": {
                "text": {"type": "string"},
                "limit": {"type": "integer", "minimum": 0, "default": DEFAULT_LIMIT},
                "threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
                "language": {"type": "string"},
            }}}},
    }
}  # fmt: skip


def _version() -> str:
    try:
        return metadata.version("xmc-serve")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def add_annif_routes(app: FastAPI, dataplane: DataPlane, parse: Parser) -> None:
    settings = parse.settings
    info = orjson.dumps({"title": "Annif REST API (xmc-serve)", "version": _version()})

    @app.get("/v1/", response_model=AnnifInfo, tags=["annif"], summary="Annif: API information")
    async def api_info() -> Response:
        return Response(info, media_type=_JSON)

    @app.get("/v1/projects", response_model=AnnifProjectList, tags=["annif"],
             summary="Annif: every model, as a project")  # fmt: skip
    async def projects() -> Response:
        found = [_project(dataplane, name) for name in dataplane.names()]
        return _json({"projects": found})

    @app.get("/v1/projects/{project_id}", response_model=AnnifProject, tags=["annif"],
             summary="Annif: one project")  # fmt: skip
    async def project(project_id: str) -> Response:
        return _json(_project(dataplane, project_id))

    @app.post("/v1/projects/{project_id}/suggest", response_model=AnnifResults,
              openapi_extra=_SUGGEST_FORM, tags=["annif"],
              summary="Annif: subjects of one text")  # fmt: skip
    async def suggest(request: Request, project_id: str) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        form = _form(request, body)
        text = form.get("text")
        if text is None:
            raise _invalid(["body", "text"], "text is required")
        parse.check_text(text, ["body", "text"])
        limit = _limit(form.get("limit"), settings.max_top_k, "body")
        threshold = _threshold(form.get("threshold"), "body")
        _check_language(dataplane, project_id, form.get("language"), "body")
        request.scope["state"]["log"] = {"n_docs": 1}
        if limit == 0:
            return _json({"results": []})
        result = await dataplane.predict(project_id, [text], limit, None)
        request.scope["state"]["log"]["cached"] = result.cached[0]
        payload = {"results": _results(result.answers[0], result.label_info, threshold)}
        return _json(payload, _fill(dataplane, result))

    @app.post("/v1/projects/{project_id}/suggest-batch", response_model=list[AnnifBatchResult],
              tags=["annif"], summary="Annif: subjects of several texts")  # fmt: skip
    async def suggest_batch(request: Request, project_id: str) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        req = validate(AnnifBatchRequest, body)
        docs = req.documents
        if len(docs) > settings.max_batch_size:
            raise PayloadTooLargeError(f"batch of {len(docs)} documents is over the limit of "
                                       f"{settings.max_batch_size}")  # fmt: skip
        for i, doc in enumerate(docs):
            parse.check_text(doc.text, ["body", "documents", i, "text"])
        query = request.query_params
        limit = _limit(query.get("limit"), settings.max_top_k, "query")
        threshold = _threshold(query.get("threshold"), "query")
        _check_language(dataplane, project_id, query.get("language"), "query")
        request.scope["state"]["log"] = {"n_docs": len(docs)}
        if limit == 0 or not docs:
            dataplane.served(project_id)  # an unknown project is still a 404
            return _json([{"document_id": d.document_id, "results": []} for d in docs])
        result = await dataplane.predict(project_id, [d.text for d in docs], limit, None)
        request.scope["state"]["log"]["n_cached"] = sum(result.cached)
        payload = [
            {"document_id": doc.document_id,
             "results": _results(answer, result.label_info, threshold)}
            for doc, answer in zip(docs, result.answers, strict=True)
        ]  # fmt: skip
        return _json(payload, _fill(dataplane, result))

    @app.post("/v1/projects/{project_id}/learn", status_code=204, tags=["annif"],
              summary="Annif: keep labelled documents for the next build (the served model "
              "does not change)",
              responses={503: {"description": "Learning is off (XMC_FEEDBACK_DIR unset) or "
                               "the feedback log cannot be written"}})  # fmt: skip
    async def learn(request: Request, project_id: str) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        docs = validate(LearnRequest, body).root
        if len(docs) > settings.max_batch_size:
            raise PayloadTooLargeError(f"{len(docs)} documents are over the limit of "
                                       f"{settings.max_batch_size}")  # fmt: skip
        documents = []
        for i, doc in enumerate(docs):
            text = doc.document.text if doc.text is None and doc.document else doc.text
            if text is None:
                raise _invalid(["body", i, "text"], "a document needs a text")
            parse.check_text(text, ["body", i, "text"])
            documents.append((text, [(s.uri, s.label) for s in doc.subjects]))
        n = await dataplane.learn(project_id, documents)
        request.scope["state"]["log"] = {"n_docs": n}
        return Response(status_code=204)


# ---------------------------------------------------------------------- helpers
def _project(dataplane: DataPlane, name: str) -> dict[str, Any]:
    """Annif's project object of model ``name`` (404 when there is none)."""
    status = dataplane.describe(name)
    trained = status["state"] == "ready" and dataplane.status == "ready"
    manifest: Mapping[str, Any] = {}
    if trained:
        manifest = dataplane.served(name).predictor.manifest
    vocab = manifest.get("vocab") or {}
    language = vocab.get("language")
    title = str(manifest.get("name", name))
    if title == status["repository_version"]:  # built without --name into NAME/VERSION/
        title = name
    return {
        "project_id": name,
        "name": title,
        "language": language or "und",
        "backend": {"backend_id": "xmc"},
        "vocab": {"vocab_id": vocab.get("source", ""), "languages": [language] if language
                  else [], "size": vocab.get("n_subjects"), "loaded": True} if vocab else None,
        "vocab_language": language,
        "is_trained": trained,
        "modification_time": manifest.get("created_at"),
    }  # fmt: skip


def _results(answer: Answer, info: Mapping[str, LabelInfo], threshold: float
             ) -> list[dict[str, Any]]:  # fmt: skip
    out = []
    for name, score in answer:  # best first
        if score < threshold:
            break
        meta = info.get(name)
        if meta is None:
            out.append({"uri": name, "label": name, "notation": None, "score": score})
        else:
            out.append({"uri": meta.uri or name, "label": meta.label,
                        "notation": meta.notation, "score": score})  # fmt: skip
    return out


def _form(request: Request, body: bytes) -> dict[str, str]:
    """The fields of a form-encoded body (the last of a repeated one wins)."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != _FORM:
        raise MalformedRequestError(
            f"suggest takes a form-encoded body ({_FORM}) with text and optionally limit, "
            "threshold and language")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedRequestError("the form is not UTF-8 text") from None


def _invalid(loc: list[str | int], msg: str) -> RequestValidationFailed:
    return RequestValidationFailed(msg, [{"loc": loc, "msg": msg, "type": "value_error"}])


def _limit(value: str | None, most: int, where: str) -> int:
    if value is None or value == "":
        return min(DEFAULT_LIMIT, most)
    try:
        limit = int(value)
    except ValueError:
        raise _invalid([where, "limit"], "limit must be an integer") from None
    if not 0 <= limit <= most:
        raise _invalid([where, "limit"], f"limit must be in 0..{most}")
    return limit


def _threshold(value: str | None, where: str) -> float:
    if value is None or value == "":
        return 0.0
    try:
        threshold = float(value)
    except ValueError:
        raise _invalid([where, "threshold"], "threshold must be a number") from None
    if math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
        raise _invalid([where, "threshold"], "threshold must be in 0..1")
    return threshold


def _check_language(dataplane: DataPlane, name: str, language: str | None, where: str) -> None:
    """Annif refuses a label language its vocabulary lacks; a bundle without a vocabulary
    has language-less labels and takes any."""
    if not language:
        return
    vocab = dataplane.served(name).predictor.manifest.get("vocab") or {}
    known = vocab.get("language") if isinstance(vocab, dict) else None
    if known and language != known:
        raise _invalid([where, "language"],
                       f'language "{language}" not supported by vocabulary')  # fmt: skip


def _json(payload: object, background: BackgroundTask | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type=_JSON, background=background)


def _fill(dataplane: DataPlane, result: Prediction) -> BackgroundTask | None:
    """As on our routes: new answers go to the cache after the response is sent."""
    return BackgroundTask(dataplane.cache.set_many, result.fill) if result.fill else None
