"""Answer cache for hot documents: Redis when configured, else an in-process LRU.

The cache is an optimisation only: no cache call may fail a request or slow it much. Redis
calls have a hard socket timeout (≤ 50 ms); after an error the Redis cache steps aside for
a back-off pause (1 s doubling to 30 s) during which every lookup is a miss, then tries
again.

Keys: ``prefix + model version + ":" + blake2b(normalized text, top_k, beam_size[, search])``
where ``search`` digests the label filters and ``explain`` when a request has them
(:class:`service.controls.Search`). The model version is the bundle's content hash, so a new
model never reads an old answer. ``threshold`` and ``min_score`` are applied after the
lookup, so they are not part of the key.
Values: the orjson list ``[[label, score], ...]`` best first (floats round-trip exactly), each
entry with its explanation as a third member when asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import orjson

from models.predictor import RankedLabel
from service import metrics

log = logging.getLogger("xmc.cache")

#: best first, each (label, score), or (label, score, explanation) when one was asked for
Answer = list[RankedLabel]


def normalize_text(text: str) -> str:
    """NFC and single spaces: what is cached *and* what is scored, so both agree."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def cache_key(prefix: str, version: str, text: str, top_k: int, beam_size: int,
              search: str = "") -> str:  # fmt: skip
    """Key of one answer; ``text`` must already be normalized; ``search`` is the digest of
    the request's filters and explain option (empty: none)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16)
    digest.update(f"\0{top_k}\0{beam_size}".encode())
    if search:
        digest.update(f"\0{search}".encode())
    return f"{prefix}{version}:{digest.hexdigest()}"


def encode_answer(answer: Answer) -> bytes:
    return orjson.dumps(answer)


def decode_answer(raw: bytes | str) -> Answer:
    answer = []
    for entry in orjson.loads(raw):
        if not isinstance(entry, list) or not 2 <= len(entry) <= 3:
            raise ValueError("not an answer")
        answer.append(tuple(entry))
    return answer


class AnswerCache(Protocol):
    """What the routes need from a cache; implementations never raise."""

    backend: str

    async def get_many(self, keys: Sequence[str]) -> list[Answer | None]: ...

    async def set_many(self, items: Sequence[tuple[str, Answer]]) -> None: ...

    def state(self) -> str: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class NoCache:
    """Caching switched off (``XMC_LRU_SIZE=0`` and no Redis)."""

    backend = "none"

    async def get_many(self, keys: Sequence[str]) -> list[Answer | None]:
        return [None] * len(keys)

    async def set_many(self, items: Sequence[tuple[str, Answer]]) -> None:
        return None

    def state(self) -> str:
        return "off"

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class LRUCache:
    """Per-process LRU with a TTL; touched only from the event loop, so no lock."""

    backend = "in-process"

    def __init__(self, max_items: int, ttl_seconds: float) -> None:
        self._items: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self._max_items = max_items
        self._ttl = ttl_seconds

    async def get_many(self, keys: Sequence[str]) -> list[Answer | None]:
        now = time.monotonic()
        found: list[Answer | None] = []
        for key in keys:
            entry = self._items.get(key)
            if entry is None or entry[0] < now:
                found.append(None)
                continue
            self._items.move_to_end(key)
            found.append(entry[1])
        return found

    async def set_many(self, items: Sequence[tuple[str, Answer]]) -> None:
        expires = time.monotonic() + self._ttl
        for key, answer in items:
            self._items[key] = (expires, answer)
            self._items.move_to_end(key)
        while len(self._items) > self._max_items:
            self._items.popitem(last=False)

    def state(self) -> str:
        return "ok"

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._items.clear()


class RedisCache:
    """Shared cache in Redis (redis-py asyncio + hiredis, one pool per worker)."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        ttl_seconds: int,
        timeout_seconds: float,
        max_connections: int,
        probe_seconds: float = 1.0,
    ) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Blocking pool: a burst waits (at most the timeout) for a free connection instead
        # of failing with "too many connections", which would mark the cache degraded.
        pool = BlockingConnectionPool.from_url(
            url,
            timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            max_connections=max_connections,
            # redis-py retries by default; a retry would multiply the worst-case delay.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._redis = Redis(connection_pool=pool)
        self._ttl = ttl_seconds
        # Degraded: requests bypass Redis entirely, and one PING every probe_seconds (in a
        # task of its own, so no request waits on it) tells when it is back. A fixed, short
        # probe brings the cache back within about a probe period of Redis's return, where
        # a back-off doubling to tens of seconds kept it bypassed long after.
        self._probe_seconds = probe_seconds
        self._degraded = False
        self._probe_at = 0.0  # monotonic time of the next probe while degraded
        self._probe: asyncio.Task[None] | None = None

    def _available(self) -> bool:
        if not self._degraded:
            return True
        if time.monotonic() >= self._probe_at and self._probe is None:
            self._probe_at = time.monotonic() + self._probe_seconds
            self._probe = asyncio.get_running_loop().create_task(self._run_probe())
        return False

    async def _run_probe(self) -> None:
        try:
            await self._redis.ping()
        except Exception:  # still away: the next probe is already scheduled
            metrics.CACHE_ERRORS.inc()
        else:
            self._succeeded()
        finally:
            self._probe = None

    def _failed(self, exc: BaseException) -> None:
        metrics.CACHE_ERRORS.inc()
        if self._degraded:
            return  # said once per outage, not per request
        self._degraded = True
        self._probe_at = time.monotonic() + self._probe_seconds
        log.warning(
            "redis cache error (%s: %s); bypassing it, probing every %.1f s",
            type(exc).__name__,
            exc,
            self._probe_seconds,
        )

    def _succeeded(self) -> None:
        if self._degraded:
            log.info("redis cache is back")
        self._degraded = False

    async def get_many(self, keys: Sequence[str]) -> list[Answer | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            raws = await self._redis.mget(list(keys))
        except Exception as exc:  # any failure means "no cache", never a failed request
            self._failed(exc)
            return [None] * len(keys)
        self._succeeded()
        found: list[Answer | None] = []
        for raw in raws:
            try:
                found.append(None if raw is None else decode_answer(raw))
            except (orjson.JSONDecodeError, ValueError, TypeError):
                found.append(None)  # a foreign or truncated value: treat as a miss
        return found

    async def set_many(self, items: Sequence[tuple[str, Answer]]) -> None:
        if not items or not self._available():
            return
        try:
            if len(items) == 1:  # the common case; a pipeline costs ~25 % more CPU
                key, answer = items[0]
                await self._redis.set(key, encode_answer(answer), ex=self._ttl)
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, answer in items:
                        pipe.set(key, encode_answer(answer), ex=self._ttl)
                    await pipe.execute()
        except Exception as exc:
            self._failed(exc)
            return
        self._succeeded()

    def state(self) -> str:
        return "degraded" if self._degraded else "ok"

    async def ping(self) -> None:
        """Probe Redis (readiness checks); while degraded the periodic probe does it."""
        if not self._available():
            return
        try:
            await self._redis.ping()
        except Exception as exc:
            self._failed(exc)
            return
        self._succeeded()

    async def close(self) -> None:
        try:
            if self._probe is not None:
                self._probe.cancel()
            await self._redis.aclose()
        except Exception:  # closing a dead connection must not fail shutdown
            log.debug("redis close failed", exc_info=True)


def make_cache(
    redis_url: str | None,
    ttl_seconds: int,
    timeout_ms: float,
    max_connections: int,
    lru_size: int,
    probe_seconds: float,
) -> AnswerCache:
    """Redis if a URL is set, else an LRU, else (size 0) nothing."""
    if redis_url:
        return RedisCache(
            redis_url,
            ttl_seconds,
            timeout_ms / 1000.0,
            max_connections,
            probe_seconds,
        )
    if lru_size > 0:
        return LRUCache(lru_size, ttl_seconds)
    return NoCache()
