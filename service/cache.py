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

import hashlib
import logging
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from service import metrics

log = logging.getLogger("xmc.cache")

#: best first, each (label, score), or (label, score, explanation) when one was asked for
Answer = list[tuple[Any, ...]]


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
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Blocking pool: a burst waits (at most the timeout) for a free connection instead
        # of failing with "too many connections", which would trip the back-off.
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
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._backoff = 0.0
        self._retry_at = 0.0  # monotonic time before which Redis is not tried

    def _available(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _failed(self, exc: BaseException) -> None:
        metrics.CACHE_ERRORS.inc()
        if time.monotonic() < self._retry_at:
            return  # a concurrent call already started the pause; don't double it again
        self._backoff = (
            self._backoff_initial
            if self._backoff == 0
            else min(self._backoff * 2, self._backoff_max)
        )
        self._retry_at = time.monotonic() + self._backoff
        log.warning(
            "redis cache error (%s: %s); bypassing it for %.1f s",
            type(exc).__name__,
            exc,
            self._backoff,
        )

    def _succeeded(self) -> None:
        if self._backoff:
            log.info("redis cache is back")
        self._backoff = 0.0

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
        return "ok" if self._backoff == 0 else "degraded"

    async def ping(self) -> None:
        """Probe Redis (readiness checks), unless it is in its back-off pause."""
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
            await self._redis.aclose()
        except Exception:  # closing a dead connection must not fail shutdown
            log.debug("redis close failed", exc_info=True)


def make_cache(
    redis_url: str | None,
    ttl_seconds: int,
    timeout_ms: float,
    max_connections: int,
    lru_size: int,
    backoff_initial: float,
    backoff_max: float,
) -> AnswerCache:
    """Redis if a URL is set, else an LRU, else (size 0) nothing."""
    if redis_url:
        return RedisCache(
            redis_url,
            ttl_seconds,
            timeout_ms / 1000.0,
            max_connections,
            backoff_initial,
            backoff_max,
        )
    if lru_size > 0:
        return LRUCache(lru_size, ttl_seconds)
    return NoCache()
