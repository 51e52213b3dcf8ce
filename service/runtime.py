"""The one object routes talk to: the loaded predictor, the cache and the prediction threads.

The bundle is loaded and warmed up (kernels compiled, one prediction run) during the app's
startup, before uvicorn listens: with several workers this is what keeps a still-loading
worker from taking connections, and a bundle that cannot load stops the server with its
error instead of leaving it alive and never ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import models
from service import metrics
from service.cache import Answer, AnswerCache, make_cache
from service.errors import NotReadyError
from service.settings import Settings

log = logging.getLogger("xmc.service")

Loader = Callable[[str], Any]


def default_loader(path: str) -> models.Predictor:
    """Memory-mapped, so every uvicorn worker shares one copy of the arrays."""
    return models.load_bundle(path, mmap=True)


class Runtime:
    """Loaded predictor, cache and prediction threads of one worker process."""

    def __init__(self, settings: Settings, loader: Loader = default_loader) -> None:
        self.settings = settings
        self._loader = loader
        self.predictor: Any = None
        self.status = "loading"
        self.detail: str | None = None
        self.model_ref: dict[str, str] | None = None
        self.threads = PredictThreads(settings.predict_threads)
        self._coalescer = Coalescer(self, settings.predict_threads, settings.coalesce_max_docs)
        self.cache: AnswerCache = make_cache(
            settings.redis_url,
            settings.cache_ttl_seconds,
            settings.redis_timeout_ms,
            settings.redis_max_connections,
            settings.lru_size,
            settings.cache_backoff_initial_seconds,
            settings.cache_backoff_max_seconds,
        )

    async def load(self) -> None:
        """Load the bundle and warm it up off the event loop; raises what the loader raised
        (:class:`models.BundleError` for a missing or corrupt bundle)."""
        loop = asyncio.get_running_loop()
        path = self.settings.bundle_path
        try:
            if path is None:
                raise models.BundleError("no bundle configured (set XMC_BUNDLE_PATH)")
            predictor = await loop.run_in_executor(None, self._loader, str(path))
            await loop.run_in_executor(None, predictor.warm_up)
        except Exception as exc:
            self.status = "failed"
            self.detail = str(exc)
            log.error("bundle failed to load: %s", exc)
            raise
        # Everything allocated so far (web stack, numba, the model) lives as long as the
        # process. Freezing it takes ~150k objects out of the garbage collector's view: a full
        # collection otherwise walks them all, ~100 ms on a loaded 2-core machine, which
        # showed up as the p99 of single predictions.
        gc.collect()
        gc.freeze()
        self.predictor = predictor
        self.model_ref = {"name": predictor.name, "version": predictor.version}
        metrics.MODEL_INFO.labels(
            predictor.name, predictor.version, str(predictor.n_labels), str(predictor.n_features)
        ).set(1)
        self.status = "ready"
        log.info(
            "model ready",
            extra={"fields": {"model": predictor.name, "version": predictor.version}},
        )

    def require_predictor(self) -> Any:
        if self.predictor is None:
            raise NotReadyError(
                "the model is still loading" if self.status == "loading" else "model unavailable"
            )
        return self.predictor

    async def predict(self, texts: Sequence[str], top_k: int, beam_size: int) -> list[Answer]:
        """Score ``texts`` as one batch in a prediction thread (the kernels release the GIL)."""
        predictor = self.require_predictor()
        answers, stages = await self.threads.submit(
            _predict_staged, predictor, list(texts), top_k, beam_size
        )
        for stage, seconds in stages:
            metrics.child(metrics.STAGE_LATENCY, stage).observe(seconds)
        return answers

    async def predict_one(self, text: str, top_k: int, beam_size: int) -> Answer:
        """One text, scored together with whatever other single texts are waiting."""
        return await self._coalescer.submit(text, top_k, beam_size)

    async def close(self) -> None:
        await self.cache.close()
        self.threads.shutdown()


def _predict_staged(
    predictor: Any, texts: list[str], top_k: int, beam_size: int
) -> tuple[list[Answer], list[tuple[str, float]]]:
    """Predict and time the stages. One text takes the model's fused path (encode and
    search in one call, ~3x cheaper than apart), timed as stage ``predict``; a batch is
    encoded, then searched, each timed."""
    start = time.perf_counter()
    if len(texts) == 1:
        raw = predictor.predict(texts, top_k=top_k, beam_size=beam_size)
        stages = [("predict", time.perf_counter() - start)]
    else:
        features = predictor.encode(texts)
        encoded = time.perf_counter()
        raw = predictor.predict_features(features, top_k=top_k, beam_size=beam_size)
        stages = [("encode", encoded - start), ("search", time.perf_counter() - encoded)]
    # float(): numpy scalars would not survive the cache's JSON round trip identically.
    return [[(str(label), float(score)) for label, score in answer] for answer in raw], stages


class Coalescer:
    """Groups concurrent single-text requests into one vectorized predict call.

    A batch costs the model less per document than single calls (cooking bundle: ~63 µs
    each in a group of 64 against ~103 µs one at a time), so under load this lowers CPU per
    request and the queueing behind it. It adds no wait: a text
    is dispatched at once when a prediction thread is free; texts that arrive while every
    thread is busy queue up and leave together, by (top_k, beam_size), when one frees.
    """

    def __init__(self, runtime: Runtime, max_inflight: int, max_docs: int) -> None:
        self._runtime = runtime
        self._max_inflight = max_inflight
        self._max_docs = max_docs
        self._inflight = 0
        self._pending: dict[tuple[int, int], list[tuple[str, asyncio.Future[Answer]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, text: str, top_k: int, beam_size: int) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending.setdefault((top_k, beam_size), []).append((text, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._inflight < self._max_inflight and self._pending:
            params = next(iter(self._pending))  # the group waiting longest
            waiting = self._pending.pop(params)
            group, rest = waiting[: self._max_docs], waiting[self._max_docs :]
            if rest:
                self._pending[params] = rest
            group = [(text, future) for text, future in group if not future.cancelled()]
            if not group:
                continue
            self._inflight += 1
            task = asyncio.ensure_future(self._run(params, group))
            self._tasks.add(task)  # keep a reference until done (asyncio holds weak ones)
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self, params: tuple[int, int], group: list[tuple[str, asyncio.Future[Answer]]]
    ) -> None:
        try:
            try:
                answers = await self._runtime.predict([t for t, _ in group], *params)
            except Exception as exc:
                if len(group) == 1:
                    _settle(group[0][1], None, exc)
                    return
                # One text must not fail its neighbours: score each alone, so only the
                # request that caused the error gets it.
                for text, future in group:
                    try:
                        answer = (await self._runtime.predict([text], *params))[0]
                    except Exception as own:
                        _settle(future, None, own)
                    else:
                        _settle(future, answer, None)
                return
            for (_, future), answer in zip(group, answers, strict=True):
                _settle(future, answer, None)
        finally:
            self._inflight -= 1
            self._dispatch()


class PredictThreads:
    """Threads that run predictions off the event loop.

    Leaner than ``loop.run_in_executor`` with a ThreadPoolExecutor (no concurrent Future and
    chained callbacks per call): 13 vs 33 µs of CPU per hand-off under uvloop, paid by every
    uncached request.
    """

    def __init__(self, n_threads: int) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"xmc-predict-{i}", daemon=True)
            for i in range(n_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a prediction thread; await the returned future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            loop, future, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting request, never lost
                result, error = None, exc
            # RuntimeError: the loop closed while we worked, nobody waits for this answer.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, error)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
