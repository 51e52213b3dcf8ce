"""The one object routes talk to: the loaded predictor, the cache and the prediction threads.

Loading runs in the background at startup so liveness answers at once and readiness turns
true only when the bundle is loaded *and* one warm-up prediction ran (kernels compiled).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
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
    def __init__(self, settings: Settings, loader: Loader = default_loader) -> None:
        self.settings = settings
        self._loader = loader
        self.predictor: Any = None
        self.status = "loading"
        self.detail: str | None = None
        self.model_ref: dict[str, str] | None = None
        self.ready = asyncio.Event()
        self.executor = ThreadPoolExecutor(
            max_workers=settings.predict_threads, thread_name_prefix="xmc-predict"
        )
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
        """Load the bundle and warm it up off the event loop; never raises."""
        loop = asyncio.get_running_loop()
        path = self.settings.bundle_path
        try:
            if path is None:
                raise models.BundleError("no bundle configured (set XMC_BUNDLE_PATH)")
            predictor = await loop.run_in_executor(self.executor, self._loader, str(path))
            await loop.run_in_executor(self.executor, predictor.warm_up)
        except Exception as exc:
            self.status = "failed"
            self.detail = str(exc)
            log.error("bundle failed to load: %s", exc)
            return
        self.predictor = predictor
        self.model_ref = {"name": predictor.name, "version": predictor.version}
        metrics.MODEL_INFO.labels(
            predictor.name, predictor.version, str(predictor.n_labels), str(predictor.n_features)
        ).set(1)
        self.status = "ready"
        self.ready.set()
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
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(
            self.executor,
            partial(predictor.predict, list(texts), top_k=top_k, beam_size=beam_size),
        )
        # float(): numpy scalars would not survive the cache's JSON round trip identically.
        return [[(str(label), float(score)) for label, score in answer] for answer in raw]

    async def close(self) -> None:
        await self.cache.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
