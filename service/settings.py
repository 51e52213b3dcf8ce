"""Every knob of the prediction service, read from ``XMC_*`` environment variables.

One class so that ``xmc serve``, uvicorn workers (which re-read the environment in each
process) and tests all see the same names and defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings; each field is read from ``XMC_<FIELD NAME>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="XMC_", extra="ignore")

    bundle_path: Path | None = Field(
        default=None,
        description="A bundle folder written by `xmc build`, or a model repository "
        "(NAME/VERSION/ bundle folders); memory-mapped so workers share one copy.",
    )
    default_model: str | None = Field(
        default=None,
        description="Model that /v1/predict, /v1/predict/batch and /v1/model answer with "
        "when the repository holds several (with one, it is the default).",
    )
    watch: bool = Field(
        default=True,
        description="Watch the bundle or repository folder and switch to a new version as "
        "soon as it is published (off: only SIGHUP and the reload route do).",
    )
    feedback_dir: Path | None = Field(
        default=None,
        description="Folder of the learn feedback logs: the Annif route POST "
        "/v1/projects/{name}/learn appends its documents to NAME.jsonl there (fsync'ed; "
        "`xmc build --extra-train` reads it). Unset: learning is off (503).",
    )
    host: str = Field(default="127.0.0.1", description="Address uvicorn binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port uvicorn binds to.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="uvicorn worker processes (>1 switches metrics to multi-process mode).",
    )
    predict_threads: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Threads per worker that run predictions, off the event loop; 0 (the "
        "default) shares the machine's cores among the workers, at least 1 each. More "
        "threads than cores only contend: on 2 cores with 2 workers, 1 thread each served "
        "14-25 % more cold requests than 2 each, with a lower p99.",
    )
    coalesce_max_docs: int = Field(
        default=64,
        ge=1,
        description="Most single-text requests scored together in one predict call when "
        "they arrive while every prediction thread is busy (1 = never group).",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Level of the service's and uvicorn's logs."
    )
    access_log: bool = Field(
        default=True, description="Write one structured JSON line per request."
    )
    log_text: bool = Field(
        default=False,
        description="Include document text in access logs (off: texts may be private).",
    )
    graceful_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long in-flight requests may run before the worker exits.",
    )

    redis_url: str | None = Field(
        default=None,
        description="redis://host:port/db of the shared answer cache; unset = in-process LRU.",
    )
    redis_timeout_ms: float = Field(
        default=50.0,
        gt=0,
        le=50,
        description="Connect and socket timeout of every Redis call, so a sick Redis "
        "never slows a request by more than this.",
    )
    redis_max_connections: int = Field(
        default=128, ge=1, description="Size of each worker's Redis connection pool."
    )
    cache_ttl_seconds: int = Field(
        default=3600, ge=1, description="Lifetime of one cached answer in Redis or the LRU."
    )
    cache_prefix: str = Field(
        default="xmc:", description="Prefix of every cache key (the model version follows)."
    )
    lru_size: int = Field(
        default=10_000,
        ge=0,
        description="Answers kept by the in-process LRU when no Redis is set; 0 = no cache.",
    )
    cache_probe_seconds: float = Field(
        default=1.0,
        gt=0,
        description="While Redis fails, requests bypass it and one PING this often tells when "
        "it is back.",
    )

    max_text_bytes: int = Field(
        default=65_536, ge=1, description="Longest accepted text (UTF-8 bytes); longer = 413."
    )
    max_batch_size: int = Field(
        default=1024, ge=1, description="Most documents in one batch request; more = 413."
    )
    max_top_k: int = Field(default=100, ge=1, description="Largest accepted top_k; more = 422.")
    max_beam_size: int = Field(
        default=200, ge=1, description="Largest accepted beam_size; more = 422."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1, description="Largest request body in bytes; more = 413."
    )
    max_inflight: int = Field(
        default=128,
        ge=1,
        description="Requests a worker works on at once (health, metrics and docs not counted); "
        "one more is refused at once with 503 and Retry-After instead of queueing.",
    )
    body_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Time a client has to send a whole request body; later = 408 and the "
        "connection is closed (a client trickling bytes holds a connection until then).",
    )

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Comma-separated bearer keys; when set, predict and model endpoints "
        "need `Authorization: Bearer <key>`. Health and metrics stay open.",
    )

    @model_validator(mode="after")
    def _share_cores(self) -> Settings:
        if self.predict_threads == 0:
            self.predict_threads = max(1, (os.cpu_count() or 1) // self.workers)
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # The environment gives one string; a comma list is friendlier than JSON there.
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
