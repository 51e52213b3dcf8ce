"""Request and response shapes of the HTTP API.

Requests are validated with pydantic (``model_validate_json`` on the raw body, one pass in
Rust). Responses are built as plain dicts and serialized with orjson: these classes only
document them in the OpenAPI schema, since pydantic serialization dominated a cache hit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

if TYPE_CHECKING:
    from service.settings import Settings

#: spec key naming the setting that bounds a field: ``{"maxLength": "max_text_bytes"}``
#: becomes ``"maxLength": 65536`` in the served spec (:func:`fill_limits`)
LIMIT_KEY = "x-xmc-limit"


def limit(keyword: str, setting: str) -> dict[str, Any]:
    """json_schema_extra of a field bounded by a setting (the number is filled at serve
    time, since the settings decide it)."""
    return {LIMIT_KEY: {keyword: setting}}

#: a label name, or a prefix ending in ``*``
LabelEntry = Annotated[str, Field(min_length=1)]
#: ``"auto"`` (the threshold tuned at build) or a score in 0..1
ThresholdField = Literal["auto"] | Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
#: A document's text. Emptiness and length are checked by the parser (one clear error
#: each, the length in UTF-8 bytes), so the spec only declares them: the pattern is "has a
#: non-space character", and maxLength, in characters, is the bytes limit (a longer
#: text is surely refused; a shorter one may still be over in bytes).
#: a character that ``str.isspace()`` (the parser's emptiness test) does not call space,
#: spelled out: regex dialects disagree on what ``\s`` is (ECMA's lacks \x1c-\x1f)
NOT_SPACE = r"[^\x09-\x0d\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
TEXT_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": NOT_SPACE,
                               **limit("maxLength", "max_text_bytes")}  # fmt: skip
Text = Annotated[str, Field(json_schema_extra=TEXT_SCHEMA)]
def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's integers, which 3.0 is as much as 3 (strict models refuse floats otherwise).
# The bounds come before the validator, or pydantic writes them unchanged ("ge") into the spec.
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), BeforeValidator(_integral)]
#: a client's reference of a document, echoed back: integers within 64 bits, which every JSON
#: writer (orjson included) and most readers can carry
DocumentId = str | Int64 | None
#: what pydantic would otherwise coerce (0 to false, "5" to 5) the spec's types refuse
STRICT = ConfigDict(extra="forbid", strict=True)

_EXAMPLE_TEXT = "How long should I knead bread dough?"
#: request examples, named for the OpenAPI media type (Swagger UI offers them in a list)
PREDICT_EXAMPLES: dict[str, dict[str, Any]] = {
    "labels": {"summary": "The 3 best labels", "value": {"text": _EXAMPLE_TEXT, "top_k": 3}},
    "controls": {
        "summary": "A filter, the tuned threshold and explanations",
        "value": {"text": _EXAMPLE_TEXT, "top_k": 5, "filter": {"exclude": ["baking"]},
                  "threshold": "auto", "explain": True},
    },
}
BATCH_EXAMPLES: dict[str, dict[str, Any]] = {
    "filtered": {
        "summary": "Two documents, an include filter and a threshold",
        "value": {"documents": [{"id": "q1", "text": "sourdough starter"},
                                {"id": 2, "text": "knife"}],
                  "top_k": 5, "filter": {"include": ["bread", "baking", "knives"]},
                  "threshold": 0.1},
    },
}


class FilterSpec(BaseModel):
    """Which labels may be returned: an entry is an exact label name or, ending in ``*``, a
    prefix (``science/physics/*``). Exclude wins over include."""

    model_config = STRICT

    include: list[LabelEntry] | None = Field(
        default=None,
        description="Only these labels may be returned (absent: all). An exact name the model "
        "does not know is a 422 naming it; a prefix that matches nothing allows nothing.",
        examples=[["baking", "bread*"]],
    )
    exclude: list[LabelEntry] | None = Field(
        default=None, description="These labels are never returned.", examples=[["dough"]]
    )


class PredictParams(BaseModel):
    """Knobs shared by single and batch prediction."""

    model_config = STRICT

    top_k: PositiveInt | None = Field(
        default=None,
        json_schema_extra=limit("maximum", "max_top_k"),
        description="How many labels to return at most; default: the bundle's (its "
        "manifest's params.top_k, 5 unless the build said otherwise).",
    )
    beam_size: PositiveInt | None = Field(
        default=None,
        json_schema_extra=limit("maximum", "max_beam_size"),
        description="Tree nodes kept per level of the beam search: wider is slower and "
        "recalls more; default: the bundle's (params.beam_size, 10 unless built otherwise).",
    )
    min_score: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Drop labels scoring below this."
    )
    filter: FilterSpec | None = Field(
        default=None,
        description="Label filter, applied inside the search (filtered labels never take a "
        "beam slot, so k allowed labels come back when the model has them). Combined with "
        "the model's configured filter: this include narrows it, this exclude adds to it.",
        examples=[{"include": ["baking", "bread*"], "exclude": ["dough"]}],
    )
    threshold: ThresholdField | None = Field(
        default=None,
        description='Drop labels scoring below this: a score in 0..1, or "auto" for the '
        "threshold tuned at build (422 when the model has none; see /v1/models/{name}). "
        "With min_score too, the larger applies; top_k still caps. Default: the model's "
        "configured threshold, else none.",
        examples=["auto", 0.3],
    )
    explain: bool = Field(
        default=False,
        description="Add to each label its explanation: the 5 input terms that pushed it up "
        "most, with their contributions (costs nothing when false).",
    )


class PredictRequest(PredictParams):
    """One document to label."""

    model_config = ConfigDict(json_schema_extra={
        "examples": [e["value"] for e in PREDICT_EXAMPLES.values()]})  # fmt: skip

    text: Text = Field(description="The document; not empty, at most XMC_MAX_TEXT_BYTES bytes.")


class Document(BaseModel):
    """One document of a batch; ``id`` is echoed back untouched."""

    model_config = STRICT

    id: DocumentId = Field(default=None, description="Your reference, echoed as given.")
    text: Text = Field(description="The document; not empty, at most XMC_MAX_TEXT_BYTES bytes.")


class BatchRequest(PredictParams):
    """Several documents scored in one vectorized call."""

    model_config = ConfigDict(json_schema_extra={
        "examples": [e["value"] for e in BATCH_EXAMPLES.values()]})  # fmt: skip

    documents: list[Document] = Field(
        min_length=1,
        description="At most XMC_MAX_BATCH_SIZE documents.",
        json_schema_extra=limit("maxItems", "max_batch_size"),
    )


class Term(BaseModel):
    term: str = Field(description="An input term (or \"[dense encoder]\" for a fused "
                      "bundle's sentence-embedding block, \"[kNN neighbours]\" for a bundle's "
                      "kNN votes, \"[label centroid]\" for its label centroids, "
                      "\"[label profile]\" for its label profiles).")  # fmt: skip
    contribution: float = Field(
        description="How much it raised the label's classifier margins (TF-IDF value times "
        "the weights on the label's path, averaged over the trees): margin units, not "
        "score units. The \"[kNN neighbours]\", \"[label centroid]\" and \"[label "
        "profile]\" entries are in score units: what the votes of the nearest training "
        "documents, the label's centroid and its profile add to the returned score."
    )


class Label(BaseModel):
    label: str = Field(description="Label name as in the training data; with a vocabulary "
                       "(xmc build --vocab), the subject's label in it.")
    uri: str | None = Field(default=None, description="The subject's URI: present when the "
                            "bundle's vocabulary knows the label.")  # fmt: skip
    notation: str | None = Field(default=None, description="The subject's notation "
                                 "(e.g. a class number), when the vocabulary has one.")
    score: float = Field(
        description="Confidence in (0, 1], higher is better: the mean over the bundle's "
        "trees of the product of the node scores on the label's root-to-leaf path. "
        "Comparable within one model version; not a calibrated probability unless the "
        "model was built with --calibrate (see /v1/models/{name}: calibrated)."
    )
    explanation: list[Term] | None = Field(
        default=None,
        description="With explain: the terms that pushed this label up most, largest first.",
    )


class ModelRef(BaseModel):
    name: str = Field(description="The model's name: its folder in a repository, else the "
                      "bundle's own name.")  # fmt: skip
    version: str = Field(description="Content hash of the bundle.")


_CUT = ("The score below which labels were dropped: the larger of threshold (the request's "
        "or the model's configured one) and min_score; 0 when none applied.")


class PredictResponse(BaseModel):
    labels: list[Label] = Field(description="Best first.")
    model: ModelRef
    cached: bool = Field(description="True when the answer came from the cache.")
    threshold: float = Field(description=_CUT)


class BatchResult(BaseModel):
    id: DocumentId
    labels: list[Label]
    cached: bool


class BatchResponse(BaseModel):
    results: list[BatchResult] = Field(description="In request order.")
    model: ModelRef
    threshold: float = Field(description=_CUT)


class TunedThreshold(BaseModel):
    model_config = ConfigDict(extra="allow")

    value: float = Field(description='The score threshold that "auto" applies.')
    micro_f1: float = Field(description="Micro-F1 at that threshold on the held-out split.")
    precision: float
    recall: float


class ModelConfigInfo(BaseModel):
    filter: FilterSpec | None = Field(description="Filter applied to every request.")
    threshold: ThresholdField | None = Field(description="Threshold of requests without one.")


class ModelInfo(BaseModel):
    name: str
    version: str
    repository_version: str | None = Field(
        description="The version folder's name in the repository (null for a lone bundle)."
    )
    created_at: str
    n_labels: int
    n_features: int
    trees: Any = Field(description="Label tree(s) of the bundle, from its manifest.")
    encoder: Any = Field(description="Text encoder(s) of the bundle, from its manifest.")
    params: Any = Field(default=None, description="Build parameters from the manifest.")
    metrics: Any = Field(description="Evaluation metrics recorded at build time (may be {}).")
    threshold: TunedThreshold | None = Field(
        description="The threshold tuned at build (xmc build --tune-threshold), else null."
    )
    calibrated: bool = Field(description="Scores are calibrated probabilities (--calibrate).")
    config: ModelConfigInfo = Field(
        description="The model's defaults from PATH/NAME/config.json (empty without one)."
    )


class ModelStatus(BaseModel):
    name: str
    version: str | None = Field(description="Content hash of the version served (null: none).")
    repository_version: str | None
    n_labels: int | None
    encoders: Any
    state: str = Field(description="ready; loading; failed (nothing could be loaded).")
    last_error: str | None = Field(
        description="Why the last version found was refused (null after a success)."
    )


class ModelList(BaseModel):
    models: list[ModelStatus]
    default: str | None = Field(
        description="The model /v1/predict answers with (null: several and none named)."
    )


class Problem(BaseModel):
    """An error (RFC 9457 problem+json)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Field-level errors: loc, msg, type."
    )


class FailedModel(BaseModel):
    name: str | None
    error: str | None


class CacheState(BaseModel):
    backend: str = Field(description="redis, in-process or none.")
    state: str = Field(description="ok, degraded (Redis failing: bypassed) or off.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="ready; loading, failed or stopping answer 503.")
    model: ModelRef | None = Field(description="The default model, if there is one.")
    failed: list[FailedModel] = Field(
        description="Models that could not be loaded at all (the others serve)."
    )
    cache: CacheState
    detail: str | None = None


def body_schema(model: type[BaseModel], examples: dict[str, Any] | None = None,
                media_type: str = "application/json") -> dict[str, Any]:  # fmt: skip
    """``openapi_extra`` of a route that reads its body itself (for speed), documenting the
    body as if FastAPI parsed it (the model goes into the spec's components)."""
    content: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    if examples:
        content["examples"] = examples
    return {"requestBody": {"required": True, "content": {media_type: content}}}


def fill_limits(node: Any, settings: Settings) -> Any:
    """A copy of a spec with every :func:`limit` marker replaced by the number its setting
    holds now (a copy: the markers' dicts are shared module constants)."""
    if isinstance(node, dict):
        out = {key: fill_limits(value, settings) for key, value in node.items()
               if key != LIMIT_KEY}  # fmt: skip
        for keyword, setting in node.get(LIMIT_KEY, {}).items():
            out[keyword] = getattr(settings, setting)
        return out
    if isinstance(node, list):
        return [fill_limits(value, settings) for value in node]
    return node
