"""The DataPlane: everything between a parsed request and its answer, without HTTP.

One object per worker owns the model registry (name -> version served now, with in-flight
counts so a replaced version is released only after its requests drain), the answer cache,
the coalescer and the prediction threads. Routes parse, authorize, call one method here and
shape the answer; single-vs-batch is decided once, in :meth:`DataPlane.predict`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import BundleError, NoTextEncoderError
from models.predictor import RankedLabel
from models.vocab import LabelInfo
from service import feedback, metrics, repository
from service.cache import Answer, AnswerCache, cache_key, make_cache, normalize_text
from service.controls import PLAIN, Controls, Search, plan
from service.errors import (
    LearningUnavailableError,
    ModelNotFoundError,
    NotReadyError,
    VersionRefusedError,
)
from service.execution import Coalescer, PredictThreads
from service.registry import Loader, ModelEntry, ServedPredictor, ServedVersion, refresh
from service.settings import Settings

log = logging.getLogger("xmc.service")

# Above this many documents a batch's key hashing runs in a thread, off the event loop.
_OFFLOAD_DOCS = 512

#: what a coalesced group is scored by: one model version and one search (filters, explain)
Job = tuple[ServedVersion, Search]


@dataclass
class Prediction:
    """Answers in request order, whether each came from the cache, the model that answered,
    how many labels were asked for (``k``, at most the model's label count), the new
    answers to write to the cache once the response is sent (whole: before the threshold),
    and the score below which labels were dropped (``threshold``, 0: none)."""

    answers: list[Answer]
    cached: list[bool]
    model: dict[str, str]
    k: int
    fill: list[tuple[str, Answer]] = field(default_factory=list)
    #: uri, label and notation of the answering version's labels (empty: no vocabulary)
    label_info: Mapping[str, LabelInfo] = field(default_factory=dict)
    threshold: float = 0.0

    def cut(self, threshold: float) -> Prediction:
        """Drop the labels scoring below ``threshold`` (answers are best first)."""
        if threshold > 0:
            self.answers = [[e for e in answer if e[1] >= threshold] for answer in self.answers]
        self.threshold = threshold
        return self


class DataPlane:
    """Models, cache, coalescing and prediction threads of one worker process."""

    def __init__(self, settings: Settings, loader: Loader) -> None:
        self.settings = settings
        self.status = "loading"
        self.detail: str | None = None
        self._loader = loader
        self._entries: dict[str, ModelEntry] = {}
        self._repository = False
        self.threads = PredictThreads(settings.predict_threads)
        self._coalescer: Coalescer[Job] = Coalescer(
            self._predict_batch, settings.predict_threads, settings.coalesce_max_docs
        )
        self.cache: AnswerCache = make_cache(
            settings.redis_url,
            settings.cache_ttl_seconds,
            settings.redis_timeout_ms,
            settings.redis_max_connections,
            settings.lru_size,
            settings.cache_probe_seconds,
        )
        self._watcher: repository.Watcher | None = None
        self._rescan: asyncio.Task[None] | None = None
        self._rescan_again: bool | None = None  # None: none queued; else whether forced
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load every model (and warm it up) off the event loop. Raises
        :class:`BundleError` when no model can be served; models that fail are reported."""
        path = self.settings.bundle_path
        try:
            if path is None:
                raise BundleError("no bundle configured (set XMC_BUNDLE_PATH)")
            self._repository = path.is_dir() and not repository.is_bundle(path)
            await self._discover(path)
            if not any(e.state == "ready" for e in self._entries.values()):
                errors = "; ".join(f"{e.last_error}" for e in self._entries.values())
                raise BundleError(f"no model can be served ({errors or 'no model found'})",
                                  path)  # fmt: skip
        except Exception as exc:
            self.status, self.detail = "failed", str(exc)
            log.error("no model could be loaded: %s", exc)
            raise
        # Everything allocated so far (web stack, numba, the models) lives as long as the
        # process. Freezing it takes ~150k objects out of the garbage collector's view: a full
        # collection otherwise walks them all, ~100 ms on a loaded 2-core machine, which
        # showed up as the p99 of single predictions.
        gc.collect()
        gc.freeze()
        self.status = "ready"
        self._started = True
        if self.settings.watch:
            loop = asyncio.get_running_loop()

            def changed() -> None:  # called from the watcher's thread
                loop.call_soon_threadsafe(self.rescan, False)

            self._watcher = repository.Watcher(path, self._repository, changed)
            self._watcher.start()
        if self._rescan_again is not None:  # a reload was asked for while we loaded
            self.rescan(self._rescan_again)

    async def _discover(self, path: Path) -> None:
        """Add the models the path holds now that are not known yet, and load them."""
        found: list[tuple[str | None, Path]] = [(None, path)]
        if self._repository:
            found = [(name, path / name) for name in repository.model_names(path)]
        for name, location in found:
            key = name or ""
            if key in self._entries:
                continue
            if self._started and not _has_version(location):
                continue  # a model folder being set up: found again once it has a version
            entry = ModelEntry(name, location, self._repository)
            self._entries[key] = entry
            await refresh(entry, self._loader, force=True)
            if not self._repository and entry.name:  # a lone bundle: known by its name
                self._entries = {entry.name: entry}

    async def close(self) -> None:
        self.status = "stopping"
        if self._watcher is not None:
            self._watcher.stop()
        if self._rescan is not None:
            self._rescan.cancel()
        await self.cache.close()
        self.threads.shutdown()

    # ------------------------------------------------------------------ reloading
    def rescan(self, force: bool) -> None:
        """Look at the repository again (a watched change, SIGHUP); one rescan at a time,
        and requests that arrive during one are merged into a single next one."""
        if not self._started or (self._rescan is not None and not self._rescan.done()):
            self._rescan_again = bool(self._rescan_again) or force
            return
        self._rescan_again = None
        self._rescan = asyncio.ensure_future(self._rescan_all(force))

    async def _rescan_all(self, force: bool) -> None:
        try:
            path = self.settings.bundle_path
            if self._repository and path is not None:
                await self._discover(path)
            for entry in list(self._entries.values()):
                await refresh(entry, self._loader, force)
        except Exception:  # a rescan must never take the worker down
            log.exception("rescanning the models failed")
        if self._rescan_again is not None and self.status == "ready":
            again, self._rescan_again = self._rescan_again, None
            self._rescan = asyncio.ensure_future(self._rescan_all(again))

    async def reload(self, name: str) -> dict[str, object]:
        """Reload one model in this worker now, then ask every other worker to rescan.
        Raises :class:`VersionRefusedError` when the version found cannot be served."""
        entry = self._entry(name)
        outcome = await refresh(entry, self._loader, force=True)
        notify_siblings()
        status = {**entry.describe(), "outcome": outcome}
        if outcome == "refused":
            serving = entry.current.predictor.version if entry.current else None
            raise VersionRefusedError(
                f"model {name!r}: the version found was refused ({entry.last_error}); "
                + (f"version {serving} keeps serving" if serving else "nothing is served"),
                extra={"model": status},
            )
        return status

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"no model named {name!r}", self.names())
        return entry

    def default_name(self) -> str:
        """The model that answers the routes without a model name."""
        wanted = self.settings.default_model
        if wanted:
            if wanted not in self._entries:
                raise ModelNotFoundError(
                    f"XMC_DEFAULT_MODEL names {wanted!r}, which is not served", self.names()
                )
            return wanted
        if len(self._entries) == 1:
            return next(iter(self._entries))
        raise ModelNotFoundError(
            "several models are served and XMC_DEFAULT_MODEL names none: use "
            "/v1/models/{name}/...", self.names()
        )  # fmt: skip

    def served(self, name: str | None) -> ServedVersion:
        """The version of ``name`` (None: the default model) that answers now."""
        if self.status != "ready":
            raise NotReadyError(
                "the model is still loading" if self.status == "loading" else "model unavailable"
            )
        entry = self._entry(name if name is not None else self.default_name())
        if entry.current is None:
            raise NotReadyError(f"model {entry.name!r} is {entry.state}: {entry.last_error}")
        return entry.current

    def describe(self, name: str) -> dict[str, object]:
        return self._entry(name).describe()

    def models(self) -> list[dict[str, object]]:
        return [self._entries[name].describe() for name in self.names()]

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when every model that has not failed serves; lists the failed ones."""
        entries = self._entries.values()
        status = self.status
        if status == "ready" and any(e.state == "loading" for e in entries):
            status = "loading"  # a model that appeared in the repository is being loaded
        failed = [{"name": e.name, "error": e.last_error} for e in entries if e.state == "failed"]
        model = None
        with contextlib.suppress(ModelNotFoundError):
            current = self._entries[self.default_name()].current if self._entries else None
            model = current.ref if current else None
        payload: dict[str, object] = {"status": status, "model": model, "failed": failed,
                                      "detail": self.detail}  # fmt: skip
        return status == "ready", payload

    # ------------------------------------------------------------------ predicting
    async def predict(
        self, name: str | None, texts: list[str], top_k: int | None, beam_size: int | None,
        controls: Controls | None = None,
    ) -> Prediction:  # fmt: skip
        """Answer ``texts`` with model ``name`` (None: the default); ``top_k`` and
        ``beam_size`` default to the bundle's; ``controls`` (filter, threshold, min_score,
        explain) combine with the model's config (:mod:`service.controls`). Cache first,
        then one model call for the unique misses: a lone text joins the coalescer,
        anything else is one batch; the threshold applies last."""
        served = self.served(name)
        served.inflight += 1  # released below; a replaced version closes after the last
        try:
            if not served.predictor.has_text_encoder:
                raise NoTextEncoderError(
                    "this bundle was built from feature vectors and has no text encoder"
                )
            top_k = top_k or served.top_k
            beam_size = beam_size or served.beam_size
            search, threshold = plan(served.predictor, served.config, controls or Controls())
            version = served.ref["version"]
            if len(texts) > _OFFLOAD_DOCS:
                # A large batch's normalizing and hashing is milliseconds of CPU: not on the loop.
                loop = asyncio.get_running_loop()
                normalized, keys = await loop.run_in_executor(
                    None, self._keys, texts, version, top_k, beam_size, search.key
                )
            else:
                normalized, keys = self._keys(texts, version, top_k, beam_size, search.key)
            found = await self._answer((served, search), normalized, keys, top_k, beam_size)
            return found.cut(threshold)
        finally:
            served.release()

    def _keys(
        self, texts: Sequence[str], version: str, top_k: int, beam_size: int, search: str
    ) -> tuple[list[str], list[str]]:
        prefix = self.settings.cache_prefix
        normalized = [normalize_text(t) for t in texts]
        return normalized, [cache_key(prefix, version, t, top_k, beam_size, search)
                            for t in normalized]  # fmt: skip

    async def _answer(
        self, job: Job, texts: list[str], keys: list[str], top_k: int, beam_size: int,
    ) -> Prediction:  # fmt: skip
        start = time.perf_counter()
        found = await self.cache.get_many(keys)
        metrics.child(metrics.STAGE_LATENCY, "cache").observe(time.perf_counter() - start)
        # Unique misses only: a batch that repeats a text scores it once.
        miss_index: dict[str, int] = {}
        miss_texts: list[str] = []
        for key, text, answer in zip(keys, texts, found, strict=True):
            if answer is None and key not in miss_index:
                miss_index[key] = len(miss_texts)
                miss_texts.append(text)
        n_miss = sum(1 for answer in found if answer is None)
        if n_miss < len(found):
            metrics.CACHE_HITS.inc(len(found) - n_miss)
        if n_miss:
            metrics.CACHE_MISSES.inc(n_miss)
        cached = [answer is not None for answer in found]
        served = job[0]
        if not miss_texts:
            k = min(top_k, served.n_labels)
            return Prediction(found, cached, served.ref, k,  # type: ignore[arg-type]
                              label_info=served.label_info)  # fmt: skip
        if len(texts) == 1:
            scored = [await self._coalescer.submit(job, miss_texts[0], top_k, beam_size)]
        else:
            scored = await self._predict_batch(job, miss_texts, top_k, beam_size)
        answers = [
            answer if answer is not None else scored[miss_index[key]]
            for key, answer in zip(keys, found, strict=True)
        ]
        fill = [(key, scored[i]) for key, i in miss_index.items()]
        return Prediction(answers, cached, served.ref, min(top_k, served.n_labels), fill,
                          served.label_info)  # fmt: skip

    # ------------------------------------------------------------------ learning
    async def learn(
        self, name: str, documents: Sequence[tuple[str, Sequence[feedback.Subject]]]
    ) -> int:
        """Append ``documents`` (text, subjects) to model ``name``'s feedback log, durably;
        the model served does not change. Returns how many were written. Raises
        :class:`LearningUnavailableError` when learning is off or the log cannot be written."""
        served = self.served(name)  # an unknown model is a 404 whether learning is on or off
        folder = self.settings.feedback_dir
        if folder is None:
            raise LearningUnavailableError(
                "learning is off: set XMC_FEEDBACK_DIR to keep learned documents for the "
                "next build (xmc build --extra-train)"
            )
        if not documents:
            return 0
        by_label = {info.label: n for n, info in served.label_info.items()}
        docs = [(text, feedback.label_names(subjects, served.label_info, by_label))
                for text, subjects in documents]  # fmt: skip
        data = feedback.encode_lines(docs, served.name, served.ref["version"])
        loop = asyncio.get_running_loop()
        try:
            path = feedback.log_path(folder, served.name)
            await loop.run_in_executor(None, feedback.append_durably, path, data)
        except (OSError, ValueError) as exc:
            log.error("learn: the feedback log of %s cannot be written: %s", served.name, exc)
            raise LearningUnavailableError(f"the feedback log cannot be written: {exc}") from None
        metrics.LEARNED_DOCS.labels(served.name).inc(len(docs))
        return len(docs)

    async def _predict_batch(
        self, job: Job, texts: list[str], top_k: int, beam_size: int
    ) -> list[Answer]:
        """Score ``texts`` as one batch in a prediction thread (the kernels release the GIL)."""
        served, search = job
        answers, stages = await self.threads.submit(
            _predict_staged, served.predictor, texts, top_k, beam_size, search
        )
        for stage, seconds in stages:
            metrics.child(metrics.STAGE_LATENCY, stage).observe(seconds)
        return answers


def _predict_staged(
    predictor: ServedPredictor, texts: list[str], top_k: int, beam_size: int,
    search: Search = PLAIN,
) -> tuple[list[Answer], list[tuple[str, float]]]:  # fmt: skip
    """Predict and time the stages. One text takes the model's fused path (encode and
    search in one call, ~3x cheaper than apart), timed as stage ``predict``; a batch is
    encoded, then searched, each timed."""
    start = time.perf_counter()
    kwargs = search.kwargs()
    if len(texts) == 1:
        raw = predictor.predict(texts, top_k=top_k, beam_size=beam_size, **kwargs)
        stages = [("predict", time.perf_counter() - start)]
    else:
        features = predictor.encode(texts)
        encoded = time.perf_counter()
        raw = predictor.predict_features(features, top_k=top_k, beam_size=beam_size, **kwargs)
        stages = [("encode", encoded - start), ("search", time.perf_counter() - encoded)]
    # float(): numpy scalars would not survive the cache's JSON round trip identically.
    return [[_plain(entry) for entry in answer] for answer in raw], stages


def _plain(entry: RankedLabel) -> RankedLabel:
    """Python str and float: numpy scalars would not survive the cache's JSON round trip."""
    if len(entry) == 3:
        return str(entry[0]), float(entry[1]), entry[2]
    return str(entry[0]), float(entry[1])


def _has_version(model_dir: Path) -> bool:
    try:
        repository.resolve(model_dir)
    except (BundleError, OSError):
        return False
    return True


def notify_siblings() -> None:
    """Ask the supervisor to relay SIGHUP to every worker (this one included), so a reload
    that reached one worker reaches all. Without our supervisor (tests, a bare uvicorn) there
    are no siblings."""
    supervisor = os.environ.get(repository.SUPERVISOR_PID_ENV)
    if supervisor and supervisor == str(os.getppid()):
        with contextlib.suppress(OSError):
            os.kill(int(supervisor), signal.SIGHUP)


def install_reload_signal(dataplane: DataPlane) -> bool:
    """SIGHUP rescans the models (forced: a refused version is tried again). Only the main
    thread may set signal handlers: False elsewhere (a TestClient's app runs in a thread)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, dataplane.rescan, True)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True
