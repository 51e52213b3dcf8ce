"""Prometheus metrics of the service; every name starts with ``xmc_`` and is stable.

With several uvicorn workers, ``xmc serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
worker starts, so prometheus-client writes each worker's samples to shared files and
``/metrics`` (answered by whichever worker) sums them.
"""

from __future__ import annotations

import os
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.metrics import MetricWrapperBase


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


if multiprocess_dir():
    # In multi-process mode every inc/observe asks os.getpid() (a system call) to detect a
    # fork; our workers are spawned, never forked after this import, so the pid is fixed.
    # This was ~9 % of a worker's GIL time in the request-path profile.
    _PID = os.getpid()
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: _PID)

# Sub-millisecond buckets: cache hits and single predictions live there.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5
)  # fmt: skip

REQUESTS = Counter(
    "xmc_requests_total",
    "HTTP requests answered, by endpoint (route template) and status code.",
    ["endpoint", "status"],
)
REQUEST_LATENCY = Histogram(
    "xmc_request_duration_seconds",
    "Wall time from first byte in to last byte out, by endpoint.",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "xmc_stage_duration_seconds",
    "Wall time of one stage of a prediction request: parse, cache, encode, search; "
    "a single uncached text runs encode+search fused, timed as predict.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
CACHE_HITS = Counter("xmc_cache_hits_total", "Documents answered from the cache.")
OVERLOADED = Counter(
    "xmc_overload_refusals_total", "Requests refused (503) because XMC_MAX_INFLIGHT were in flight."
)
CACHE_MISSES = Counter("xmc_cache_misses_total", "Documents the cache did not have.")
CACHE_ERRORS = Counter(
    "xmc_cache_errors_total", "Cache calls that failed or timed out (the request went on)."
)
BATCH_SIZE = Histogram(
    "xmc_batch_size",
    "Documents per batch request.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
MODEL_INFO = Gauge(
    "xmc_model_info",
    "1 for each model version this service answers with (0 once replaced); name is the "
    "model's name in the API.",
    ["name", "version", "n_labels", "n_features"],
    multiprocess_mode="max",
)

RELOADS = Counter(
    "xmc_model_reloads_total",
    "Versions found by a reload, per worker: outcome switched (now served) or refused "
    "(corrupt, incomplete or incompatible: the old version kept serving).",
    ["model", "outcome"],
)
LEARNED_DOCS = Counter(
    "xmc_learned_documents_total",
    "Documents appended to a model's feedback log by the Annif learn route.",
    ["model"],
)


_children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
W = TypeVar("W", bound=MetricWrapperBase)


def child(metric: W, *labels: str) -> W:
    """``metric.labels(*labels)``, memoized: ``labels()`` takes a lock and builds tuples on
    every call, and the hot path asks for the same few children each request."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found  # type: ignore[return-value]  # labels() gives the metric's own class


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics`` and its content type."""
    path = multiprocess_dir()
    if path:
        from prometheus_client import multiprocess

        # A fresh registry per scrape, as prometheus-client's multiprocess docs require.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
