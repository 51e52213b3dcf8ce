"""Concurrent single-text requests are scored together, each getting its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.execution import Coalescer


class GatedRuntime:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[list[str], int, int]] = []
        self.models: list[str] = []
        self.gate = asyncio.Event()
        self.fail = fail

    async def predict(self, model: str, texts: list[str], top_k: int, beam_size: int
                      ) -> list[Any]:  # fmt: skip
        self.calls.append((list(texts), top_k, beam_size))
        self.models.append(model)
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("model failed")
        return [[(t, float(top_k))] for t in texts]


async def settle() -> None:
    """Let every ready task run up to its next real wait."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_groups_waiting_texts_by_params_and_size() -> None:
    async def scenario() -> None:
        runtime = GatedRuntime()
        c = Coalescer(runtime.predict, max_inflight=1, max_docs=3)
        first = asyncio.ensure_future(c.submit("m", "a", 5, 10))
        await settle()
        assert runtime.calls == [(["a"], 5, 10)]  # an idle thread: dispatched at once
        later = [asyncio.ensure_future(c.submit("m", t, 5, 10)) for t in "bcde"]
        other = asyncio.ensure_future(c.submit("m", "f", 3, 10))
        gone = asyncio.ensure_future(c.submit("m", "g", 3, 10))
        await settle()
        gone.cancel()  # a client that went away is not scored
        runtime.gate.set()
        results = await asyncio.gather(first, *later, other)
        assert results == [[(t, 5.0)] for t in "abcde"] + [[("f", 3.0)]]
        assert runtime.calls == [
            (["a"], 5, 10),
            (["b", "c", "d"], 5, 10),
            (["f"], 3, 10),
            (["e"], 5, 10),
        ]

    asyncio.run(scenario())


def test_versions_are_never_grouped_together() -> None:
    """Texts for two model versions wait side by side but leave in separate calls."""

    async def scenario() -> None:
        runtime = GatedRuntime()
        c = Coalescer(runtime.predict, max_inflight=1, max_docs=8)
        first = asyncio.ensure_future(c.submit("old", "a", 5, 10))
        await settle()
        rest = [asyncio.ensure_future(c.submit(m, t, 5, 10))
                for m, t in (("old", "b"), ("new", "c"), ("old", "d"))]  # fmt: skip
        await settle()
        runtime.gate.set()
        await asyncio.gather(first, *rest)
        assert list(zip(runtime.models, runtime.calls, strict=True)) == [
            ("old", (["a"], 5, 10)),
            ("old", (["b", "d"], 5, 10)),
            ("new", (["c"], 5, 10)),
        ]

    asyncio.run(scenario())


class PickyRuntime(GatedRuntime):
    """Fails any call that contains the text "bad"."""

    async def predict(self, model: str, texts: list[str], top_k: int, beam_size: int
                      ) -> list[Any]:  # fmt: skip
        self.calls.append((list(texts), top_k, beam_size))
        await self.gate.wait()
        if "bad" in texts:
            raise RuntimeError("model failed")
        return [[(t, 1.0)] for t in texts]


def test_an_error_reaches_only_the_request_that_caused_it() -> None:
    async def scenario() -> None:
        runtime = PickyRuntime()
        c = Coalescer(runtime.predict, max_inflight=1, max_docs=8)
        first = asyncio.ensure_future(c.submit("m", "first", 5, 10))
        await settle()
        tasks = [asyncio.ensure_future(c.submit("m", t, 5, 10)) for t in ("x", "bad", "z")]
        await settle()
        runtime.gate.set()
        outcomes = await asyncio.gather(first, *tasks, return_exceptions=True)
        assert outcomes[0] == [("first", 1.0)]
        assert outcomes[1] == [("x", 1.0)]
        assert isinstance(outcomes[2], RuntimeError)
        assert outcomes[3] == [("z", 1.0)]
        assert runtime.calls[1][0] == ["x", "bad", "z"]  # grouped, then retried one by one

    asyncio.run(scenario())


def test_a_failing_single_text_gets_its_error() -> None:
    async def scenario() -> None:
        runtime = GatedRuntime(fail=True)
        runtime.gate.set()
        c = Coalescer(runtime.predict, max_inflight=1, max_docs=8)
        with pytest.raises(RuntimeError):
            await c.submit("m", "x", 5, 10)

    asyncio.run(scenario())


def test_concurrent_http_requests_get_their_own_answers(
    make_client: Callable[..., TestClient], predictor: Any, sample_texts: list[str]
) -> None:
    client = make_client(lru_size=0, predict_threads=1)
    app = client.app

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(
                *(c.post("/v1/predict", json={"text": t, "top_k": 3}) for t in sample_texts)
            )

    responses = asyncio.run(scenario())
    expected = predictor.predict(sample_texts, top_k=3, beam_size=10)
    for r, exp in zip(responses, expected, strict=True):
        assert r.status_code == 200
        labels = r.json()["labels"]
        # Grouped or not, the same answer (to float rounding of the batch path).
        assert [x["label"] for x in labels] == [lab for lab, _ in exp]
        assert [x["score"] for x in labels] == pytest.approx([s for _, s in exp], rel=1e-5)
