"""The models a worker serves: for each name, the version loaded now, and how it changes.

A version is loaded, verified and warmed up off the request path, then swapped in with one
assignment (the event loop is single-threaded: a request sees the old version or the new one,
never a mix). Each request holds a reference on the version it started with; a replaced
version is closed only once the last of those requests has finished.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import scipy.sparse as sp

from models.errors import BundleError
from models.filters import FilterSpec
from models.predictor import RankedLabel, Threshold
from models.vocab import LabelInfo
from service import metrics, repository
from service.controls import ModelConfig
from service.repository import SAFE_PUBLISHING, Fingerprint, Source

log = logging.getLogger("xmc.service")

State = Literal["loading", "ready", "failed"]
Outcome = Literal["switched", "unchanged", "refused"]



class ServedPredictor(Protocol):
    """What the service needs of a loaded bundle (:class:`models.Predictor` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def created_at(self) -> str: ...
    @property
    def n_labels(self) -> int: ...
    @property
    def n_features(self) -> int: ...
    @property
    def has_text_encoder(self) -> bool: ...
    @property
    def manifest(self) -> Mapping[str, object]: ...
    @property
    def default_top_k(self) -> int: ...
    @property
    def default_beam_size(self) -> int: ...
    @property
    def label_info(self) -> Mapping[str, LabelInfo]: ...
    @property
    def tuned_threshold(self) -> dict[str, Any] | None: ...

    def encode(self, texts: Sequence[str]) -> sp.csr_matrix: ...

    # label_filter and explain are passed only when a request asks for them
    def predict(
        self, texts: Sequence[str], *, top_k: int | None = None, beam_size: int | None = None,
        label_filter: FilterSpec | None = None, explain: bool = False,
    ) -> list[list[RankedLabel]]: ...

    def predict_features(
        self, X: sp.csr_matrix, *, top_k: int | None = None, beam_size: int | None = None,
        label_filter: FilterSpec | None = None, explain: bool = False,
    ) -> list[list[RankedLabel]]: ...

    def allowed_labels(self, label_filter: FilterSpec | None) -> np.ndarray: ...

    def score_cut(self, threshold: Threshold = None, min_score: float | None = None
                  ) -> float: ...  # fmt: skip

    def warm_up(self) -> None: ...

    def close(self) -> None: ...


Loader = Callable[[str], ServedPredictor]


class ServedVersion:
    """One loaded version of a model and the requests using it (counted on the loop)."""

    __slots__ = ("beam_size", "config", "inflight", "label_info", "n_labels", "name", "predictor",
                 "ref", "retired", "source", "top_k")  # fmt: skip

    def __init__(self, name: str, predictor: ServedPredictor, source: Source,
                 config: ModelConfig | None = None) -> None:  # fmt: skip
        self.name = name
        self.predictor = predictor
        self.source = source
        self.config = config or ModelConfig()
        self.ref = {"name": name, "version": predictor.version}
        self.top_k = predictor.default_top_k
        self.beam_size = predictor.default_beam_size
        self.n_labels = predictor.n_labels
        self.label_info = predictor.label_info
        self.inflight = 0
        self.retired = False

    def release(self) -> None:
        self.inflight -= 1
        if self.retired and self.inflight == 0:
            self._close()

    def retire(self) -> None:
        self.retired = True
        metrics.MODEL_INFO.labels(*self._info_labels()).set(0)
        if self.inflight == 0:
            self._close()

    def announce(self) -> None:
        metrics.MODEL_INFO.labels(*self._info_labels()).set(1)

    def _info_labels(self) -> tuple[str, str, str, str]:
        p = self.predictor
        return (self.name, p.version, str(p.n_labels), str(p.n_features))

    def _close(self) -> None:
        predictor = self.predictor
        asyncio.get_running_loop().run_in_executor(None, _close_predictor, predictor)


def _close_predictor(predictor: ServedPredictor) -> None:
    predictor.close()
    # A version loaded at startup was frozen out of the collector's view with everything
    # else (see DataPlane.start). A predictor is usually freed by reference counting, but one
    # caught in a cycle (seen after the kernels' first compilation) would then stay mapped
    # for good: unfreeze and collect, once per replaced version (~100 ms of this worker).
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
        gc.freeze()


class ModelEntry:
    """One model name: where its versions are, the one served, and the last refusal."""

    def __init__(self, name: str | None, location: Path, in_repository: bool) -> None:
        self.name = name  # None until a lone bundle's manifest names it
        self.location = location
        self.in_repository = in_repository
        self.current: ServedVersion | None = None
        self.state: State = "loading"
        self.last_error: str | None = None
        self.refused: Fingerprint | None = None
        self.lock = asyncio.Lock()

    def locate(self) -> Source:
        if self.in_repository:
            return repository.resolve(self.location)
        return repository.single(self.location)

    def describe(self) -> dict[str, object]:
        cur = self.current
        p = cur.predictor if cur else None
        return {
            "name": self.name,
            "version": p.version if p else None,
            "repository_version": cur.source.repository_version if cur else None,
            "n_labels": p.n_labels if p else None,
            "encoders": p.manifest.get("encoders") if p else None,
            "state": self.state,
            "last_error": self.last_error,
        }


async def refresh(entry: ModelEntry, loader: Loader, force: bool) -> Outcome:
    """Serve what the repository now says for ``entry``: load, verify and warm up a new
    version off the loop and swap it in; a version that fails is refused (the one served
    stays). ``force`` retries a version refused before (reload route, SIGHUP)."""
    async with entry.lock:
        try:
            source = entry.locate()
        except (BundleError, OSError) as exc:
            return _refuse(entry, None, str(exc))
        cur = entry.current
        if cur is not None and cur.source.fingerprint == source.fingerprint:
            return "unchanged"
        if not force and entry.refused == source.fingerprint:
            return "refused"
        loop = asyncio.get_running_loop()
        try:
            predictor, config = await loop.run_in_executor(None, _load_verified, loader, source)
        except Exception as exc:
            return _refuse(entry, source.fingerprint, f"{type(exc).__name__}: {exc}")
        if cur is not None and cur.predictor.has_text_encoder and not predictor.has_text_encoder:
            await loop.run_in_executor(None, predictor.close)
            why = "the new version has no text encoder: it cannot answer text requests"
            return _refuse(entry, source.fingerprint, why)
        # What was loaded, not what the manifest said a moment before: a manifest rewritten
        # during the load shows as a change at the next look.
        loaded = Source(source.path, source.repository_version, predictor.version, source.config)
        entry.name = entry.name or predictor.name
        new = ServedVersion(entry.name, predictor, loaded, config)
        new.announce()
        entry.current, entry.state, entry.last_error, entry.refused = new, "ready", None, None
        if cur is not None:
            cur.retire()
            metrics.RELOADS.labels(entry.name, "switched").inc()
        log.info(
            "model version switched in" if cur else "model ready",
            extra={"fields": {"model": entry.name, "version": predictor.version,
                              "repository_version": loaded.repository_version,
                              "previous": cur.predictor.version if cur else None}},
        )  # fmt: skip
        return "switched"


def _load_verified(loader: Loader, source: Source) -> tuple[ServedPredictor, ModelConfig]:
    """Load (the loader checks every array's bounds), run one prediction and check the
    model's config.json against it: a version that passes all three can serve."""
    config = ModelConfig.parse(source.config)
    predictor = loader(str(source.path))
    try:
        predictor.warm_up()
        config.check(predictor)
    except BaseException:
        predictor.close()
        raise
    return predictor, config


def _refuse(entry: ModelEntry, fingerprint: Fingerprint | None, why: str) -> Outcome:
    # the watcher looks again at every change in the folder: a fault it already reported
    # (a model folder with no version yet, say) is logged and counted once, not per look
    repeated = entry.last_error == why and entry.refused == fingerprint
    entry.last_error = why
    entry.refused = fingerprint
    if repeated:
        return "refused"
    name = entry.name or str(entry.location)
    if entry.current is None:
        entry.state = "failed"
        log.error("model %s cannot be served: %s", name, why)
    else:
        log.error(
            "model %s: new version refused, version %s keeps serving: %s (%s)",
            name, entry.current.predictor.version, why, SAFE_PUBLISHING,
        )  # fmt: skip
    metrics.RELOADS.labels(name, "refused").inc()
    return "refused"
