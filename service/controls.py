"""Prediction controls on the service side: a model's defaults and a request's options.

A model in a repository may have ``PATH/NAME/config.json``::

    {"filter": {"include": [...], "exclude": [...]}, "threshold": "auto" | 0.3}

read and checked against the bundle whenever a version of the model is loaded: an unknown
label, ``"auto"`` for a bundle without a tuned threshold or a malformed file refuses that
version like a corrupt bundle (the one served keeps serving). A request's options combine
with it: both filters are passed to the model, which intersects them (the request's include
narrows the configured one, its exclude adds to it); the request's threshold, when given,
replaces the configured one; ``min_score`` and the threshold, the larger applies.

What changes the model's answer (the filters and ``explain``) is a :class:`Search`: part of
the cache key and of the coalescer's grouping. The threshold only drops labels from the
answer, so it is applied after the cache lookup, and a cached answer serves every threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from models.errors import BundleError, XMCError
from models.filters import FilterSpec, LabelFilter, normalize
from models.predictor import Threshold
from service.repository import CONFIG
from service.schemas import FilterSpec as FilterField
from service.schemas import PredictParams, ThresholdField


class _ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: FilterField | None = None
    threshold: ThresholdField | None = None


class Checkable(Protocol):
    """What checking a configuration needs of a loaded model."""

    def allowed_labels(self, label_filter: FilterSpec | None) -> np.ndarray: ...

    def score_cut(self, threshold: Threshold = None, min_score: float | None = None
                  ) -> float: ...  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """A model's defaults (from its ``config.json``; empty without one)."""

    label_filter: LabelFilter | None = None
    threshold: Threshold = None

    @classmethod
    def parse(cls, raw: bytes | None) -> ModelConfig:
        """From the file's bytes (None: no file). Raises :class:`BundleError`."""
        if raw is None:
            return cls()
        try:
            data = _ConfigFile.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or 'file'}: {e['msg']}"
                for e in exc.errors(include_url=False))  # fmt: skip
            raise BundleError(f"{CONFIG} is invalid: {problems}") from None
        return cls(_label_filter(data.filter), data.threshold)

    def check(self, predictor: Checkable) -> None:
        """Raises :class:`BundleError` when the model cannot apply these defaults."""
        try:
            if self.label_filter is not None:
                predictor.allowed_labels(self.label_filter)
            predictor.score_cut(self.threshold)
        except XMCError as exc:  # an unknown label; "auto" without a tuned threshold
            raise BundleError(f"{CONFIG}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        return {
            "filter": None if self.label_filter is None else _filter_dict(self.label_filter),
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class Controls:
    """A request's options (see :class:`service.schemas.PredictParams`)."""

    label_filter: LabelFilter | None = None
    threshold: Threshold = None
    min_score: float | None = None
    explain: bool = False

    @classmethod
    def of(cls, params: PredictParams) -> Controls:
        return cls(_label_filter(params.filter), params.threshold, params.min_score or None,
                   params.explain)  # fmt: skip


@dataclass(frozen=True)
class Search:
    """What the model is asked beside the text, k and the beam: the filters (normalized, open
    ones dropped: equal filters compare equal whatever their order) and ``explain``.
    ``key`` is a digest of both, empty for a plain search, so plain keys stay as they were."""

    filters: tuple[LabelFilter, ...] = ()
    explain: bool = False
    key: str = field(default="", compare=False)

    @classmethod
    def of(cls, filters: tuple[LabelFilter, ...], explain: bool) -> Search:
        if not filters and not explain:
            return PLAIN
        canonical = orjson.dumps([[f.include, f.exclude] for f in filters] + [explain])
        return cls(filters, explain, hashlib.blake2b(canonical, digest_size=16).hexdigest())

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the predictor's predict calls: none for a plain search."""
        out: dict[str, Any] = {}
        if self.filters:
            out["label_filter"] = self.filters
        if self.explain:
            out["explain"] = True
        return out


PLAIN = Search()


def plan(predictor: Checkable, config: ModelConfig, controls: Controls
         ) -> tuple[Search, float]:  # fmt: skip
    """The search to run and the score cut to apply after it. Raises
    :class:`~models.errors.InvalidInputError` for ``"auto"`` without a tuned threshold."""
    given = [f for f in (config.label_filter, controls.label_filter) if f is not None]
    threshold = controls.threshold if controls.threshold is not None else config.threshold
    cut = predictor.score_cut(threshold, controls.min_score)
    return Search.of(normalize(given), controls.explain), cut


def _label_filter(spec: FilterField | None) -> LabelFilter | None:
    if spec is None:
        return None
    return LabelFilter.of(spec.include, spec.exclude)


def _filter_dict(f: LabelFilter) -> Mapping[str, list[str]]:
    out: dict[str, list[str]] = {}
    if f.include is not None:
        out["include"] = list(f.include)
    if f.exclude:
        out["exclude"] = list(f.exclude)
    return out
