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
from service.errors import (
    BODY_PROBLEMS,
    MalformedRequestError,
    PayloadTooLargeError,
    RequestValidationFailed,
    problem_responses,
)
from service.parsing import FORM, Parser, validate
from service.schemas import TEXT_SCHEMA, DocumentId, Text, body_schema, limit

_JSON = "application/json"
#: Annif's default number of results
DEFAULT_LIMIT = 10


# ---------------------------------------------------------------------- request bodies
class AnnifDocument(BaseModel):
    """A document of suggest-batch; ``metadata`` is accepted and not used."""

    model_config = ConfigDict(extra="ignore", strict=True)

    text: Text
    document_id: DocumentId = None
    metadata: dict[str, Any] | None = None


class AnnifBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    documents: list[AnnifDocument] = Field(json_schema_extra=limit("maxItems", "max_batch_size"))


def _one_of_present(*fields: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """The spec of "at least one of these fields, as given": what a model validator checks."""
    return {"anyOf": [{"required": [name], "properties": {name: schema}}
                      for name, schema in fields]}  # fmt: skip


class LearnSubject(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_one_of_present(
        ("uri", {"type": "string", "minLength": 1}),
        ("label", {"type": "string", "minLength": 1})))  # fmt: skip

    uri: str | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _named(self) -> LearnSubject:
        if not (self.uri or self.label):
            raise ValueError("a subject needs a uri or a label")
        return self


class LearnText(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    text: Text


class LearnDocument(BaseModel):
    """Annif's IndexedDocument: ``text`` at the top (Annif's schema) or inside
    ``document``; the subjects a person gave it."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_one_of_present(
        ("text", {"type": "string"}), ("document", {"type": "object"})))  # fmt: skip

    text: Text | None = None
    document: LearnText | None = None
    subjects: list[LearnSubject] = Field(min_length=1)


class LearnRequest(RootModel[list[LearnDocument]]):
    root: list[LearnDocument] = Field(json_schema_extra=limit("maxItems", "max_batch_size"))


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


_LIMIT = {"type": "integer", "minimum": 0, "default": DEFAULT_LIMIT,
          **limit("maximum", "max_top_k")}  # fmt: skip
_THRESHOLD = {"type": "number", "minimum": 0, "maximum": 1, "default": 0}
_SUGGEST = {
    "requestBody": {
        "required": True,
        "content": {FORM: {"schema": {
            "type": "object", "required": ["text"],
            "properties": {"text": TEXT_SCHEMA, "limit": _LIMIT, "threshold": _THRESHOLD,
                           "language": {"type": "string"}},
        }}},
    }
}  # fmt: skip
_SUGGEST_BATCH = {
    **body_schema(AnnifBatchRequest),
    "parameters": [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in (("limit", _LIMIT), ("threshold", _THRESHOLD),
                                        ("language", {"type": "string"}))],
}  # fmt: skip
#: Annif's routes that predict: their body's problems, and those of the model they name
_PREDICT_PROBLEMS = problem_responses(*BODY_PROBLEMS, 404, 503)
_LEARN_PROBLEMS = {
    **_PREDICT_PROBLEMS,
    503: {**_PREDICT_PROBLEMS[503], "description": "Learning is off (XMC_FEEDBACK_DIR unset) "
          "or the feedback log cannot be written."},
}  # fmt: skip
#: the form and query fields the suggest routes read
_FIELDS = frozenset(("text", "limit", "threshold", "language"))


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
             summary="Annif: one project", responses=problem_responses(404))  # fmt: skip
    async def project(project_id: str) -> Response:
        return _json(_project(dataplane, project_id))

    @app.post("/v1/projects/{project_id}/suggest", response_model=AnnifResults,
              openapi_extra=_SUGGEST, responses=_PREDICT_PROBLEMS, tags=["annif"],
              summary="Annif: subjects of one text")  # fmt: skip
    async def suggest(request: Request, project_id: str) -> Response:
        form = _form(await parse.body(request, (FORM,)))
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
              openapi_extra=_SUGGEST_BATCH, responses=_PREDICT_PROBLEMS, tags=["annif"],
              summary="Annif: subjects of several texts")  # fmt: skip
    async def suggest_batch(request: Request, project_id: str) -> Response:
        req = validate(AnnifBatchRequest, await parse.body(request))
        docs = req.documents
        if len(docs) > settings.max_batch_size:
            raise PayloadTooLargeError(f"batch of {len(docs)} documents is over the limit of "
                                       f"{settings.max_batch_size}")  # fmt: skip
        for i, doc in enumerate(docs):
            parse.check_text(doc.text, ["body", "documents", i, "text"])
        query = _fields(request.query_params.multi_items(), "query")
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
              openapi_extra=body_schema(LearnRequest), responses=_LEARN_PROBLEMS)
    async def learn(request: Request, project_id: str) -> Response:
        docs = validate(LearnRequest, await parse.body(request)).root
        if len(docs) > settings.max_batch_size:
            raise PayloadTooLargeError(f"{len(docs)} documents are over the limit of "
                                       f"{settings.max_batch_size}")  # fmt: skip
        documents = []
        for i, doc in enumerate(docs):
            if doc.document is not None:  # checked even when the top-level text is used
                parse.check_text(doc.document.text, ["body", i, "document", "text"])
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
    for name, score, *_ in answer:  # best first
        if score < threshold:
            break
        meta = info.get(name)
        if meta is None:
            out.append({"uri": name, "label": name, "notation": None, "score": score})
        else:
            out.append({"uri": meta.uri or name, "label": meta.label,
                        "notation": meta.notation, "score": score})  # fmt: skip
    return out


def _form(body: bytes) -> dict[str, str]:
    """The fields of a form-encoded body."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise MalformedRequestError("the form is not UTF-8 text") from None
    return _fields(pairs, "body")


def _fields(pairs: list[tuple[str, str]], where: str) -> dict[str, str]:
    """Form or query fields by name; each of ours may be given once (which of several
    would count is a guess a client should not have to make)."""
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields and name in _FIELDS:
            raise _invalid([where, name], f"{name} is given more than once")
        fields[name] = value
    return fields


def _invalid(loc: list[str | int], msg: str) -> RequestValidationFailed:
    return RequestValidationFailed(msg, [{"loc": loc, "msg": msg, "type": "value_error"}])


def _limit(value: str | None, most: int, where: str) -> int:
    if value is None:
        return min(DEFAULT_LIMIT, most)
    # ASCII digits only: int() would also take " 5", "+5", "5_0" and other scripts' digits.
    if not (value.isascii() and value.isdigit()):
        if value.startswith("-") and value[1:].isascii() and value[1:].isdigit():
            raise _invalid([where, "limit"], f"limit must be in 0..{most}")
        raise _invalid([where, "limit"], "limit must be an integer")
    limit = int(value)
    if not 0 <= limit <= most:
        raise _invalid([where, "limit"], f"limit must be in 0..{most}")
    return limit


def _threshold(value: str | None, where: str) -> float:
    if value is None:
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
