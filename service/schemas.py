"""Request and response shapes of the HTTP API.

Requests are validated with pydantic (``model_validate_json`` on the raw body, one pass in
Rust). Responses are built as plain dicts and serialized with orjson: these classes only
document them in the OpenAPI schema, since pydantic serialization dominated a cache hit.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PredictParams(BaseModel):
    """Knobs shared by single and batch prediction."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(
        default=None,
        ge=1,
        description="How many labels to return at most; default: the bundle's (its "
        "manifest's params.top_k, 5 unless the build said otherwise).",
    )
    beam_size: int | None = Field(
        default=None,
        ge=1,
        description="Tree nodes kept per level of the beam search: wider is slower and "
        "recalls more; default: the bundle's (params.beam_size, 10 unless built otherwise).",
    )
    min_score: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Drop labels scoring below this."
    )


class PredictRequest(PredictParams):
    """One document to label."""

    text: str = Field(description="The document; not empty, at most XMC_MAX_TEXT_BYTES bytes.")


class Document(BaseModel):
    """One document of a batch; ``id`` is echoed back untouched."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(default=None, description="Your reference, echoed as given.")
    text: str = Field(description="The document; not empty, at most XMC_MAX_TEXT_BYTES bytes.")


class BatchRequest(PredictParams):
    """Several documents scored in one vectorized call."""

    documents: list[Document] = Field(
        min_length=1, description="At most XMC_MAX_BATCH_SIZE documents."
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
        "Comparable within one model version; not a calibrated probability."
    )


class ModelRef(BaseModel):
    name: str = Field(description="The model's name: its folder in a repository, else the "
                      "bundle's own name.")  # fmt: skip
    version: str = Field(description="Content hash of the bundle.")


class PredictResponse(BaseModel):
    labels: list[Label] = Field(description="Best first.")
    model: ModelRef
    cached: bool = Field(description="True when the answer came from the cache.")


class BatchResult(BaseModel):
    id: str | int | None
    labels: list[Label]
    cached: bool


class BatchResponse(BaseModel):
    results: list[BatchResult] = Field(description="In request order.")
    model: ModelRef


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
