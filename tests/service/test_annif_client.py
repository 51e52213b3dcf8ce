"""Annif's own client library, ``annif-client`` from PyPI, against xmc-serve on loopback:
what an Annif user's integration does, unchanged but for the address."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import models
from models.data import read_corpus
from service.app import create_app
from service.repository import publish
from service.settings import Settings
from tests.service.conftest import free_port
from tests.service.test_serve import XMC, serve, stop, wait_http_ready

annif_client = pytest.importorskip("annif_client", reason="dev extra: annif-client")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, annif_bundle: Path, tiny_bundle: Path
         ) -> Path:  # fmt: skip
    root = tmp_path_factory.mktemp("annif-client") / "models"
    publish(root / "yso", "1", annif_bundle)
    publish(root / "tiny", "1", tiny_bundle)
    return root


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback")


@pytest.fixture(scope="module")
def api(repo: Path, feedback_dir: Path) -> Iterator[Any]:
    """uvicorn in a thread (the client needs a real socket) and a client pointed at it."""
    import uvicorn

    settings = Settings(bundle_path=repo, access_log=False, watch=False,
                        feedback_dir=feedback_dir)  # fmt: skip
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                       log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 120
    while not uv.started and time.monotonic() < end:
        time.sleep(0.05)
    assert uv.started
    yield annif_client.AnnifClient(api_base=f"http://127.0.0.1:{port}/v1/")
    uv.should_exit = True
    thread.join(timeout=60)


@pytest.fixture(scope="module")
def yso(annif_bundle: Path) -> Any:
    return models.load_bundle(annif_bundle)


@pytest.fixture
def texts(tiny_docs: tuple[list[dict], list[dict]]) -> list[str]:
    return [d["text"] for d in tiny_docs[1][10:16]]


def expected(predictor: Any, text: str, k: int) -> list[dict[str, Any]]:
    out = []
    for name, score in predictor.predict([text], top_k=k)[0]:
        info = predictor.label_info[name]
        out.append({"uri": info.uri, "label": info.label, "notation": info.notation,
                    "score": score})  # fmt: skip
    return out


def test_api_info_and_projects(api: Any, yso: Any) -> None:
    assert "Annif" in api.api_info["title"]
    projects = {p["project_id"]: p for p in api.projects}
    assert set(projects) == {"yso", "tiny"}
    project = api.get_project("yso")
    assert project == projects["yso"]
    assert project["is_trained"] is True and project["language"] == "en"
    assert project["modification_time"] == yso.created_at


def test_unknown_project_raises_with_our_detail(api: Any) -> None:
    with pytest.raises(ValueError, match="nope"):
        api.get_project("nope")
    with pytest.raises(ValueError, match="nope"):
        api.suggest("nope", "some text")


def test_suggest_with_limit_and_threshold(api: Any, yso: Any, texts: list[str]) -> None:
    assert api.suggest("yso", texts[0]) == expected(yso, texts[0], 10)
    top = api.suggest("yso", texts[0], limit=4)
    assert top == expected(yso, texts[0], 4)
    cut = top[1]["score"]
    assert api.suggest("yso", texts[0], limit=4, threshold=cut) == [
        x for x in top if x["score"] >= cut]
    # a file-like text, as the client allows
    assert api.suggest("yso", io.StringIO(texts[1]), limit=2) == expected(yso, texts[1], 2)


def test_suggest_batch(api: Any, yso: Any, texts: list[str]) -> None:
    docs = [{"document_id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    got = api.suggest_batch("yso", docs, limit=3)
    assert [r["document_id"] for r in got] == [d["document_id"] for d in docs]
    for doc, res in zip(docs, got, strict=True):
        assert res["results"] == expected(yso, doc["text"], 3)
    cut = got[0]["results"][0]["score"]
    only = api.suggest_batch("yso", docs[:1], limit=3, threshold=cut)
    assert only[0]["results"] == [x for x in got[0]["results"] if x["score"] >= cut]


def test_learn(api: Any, yso: Any, feedback_dir: Path, texts: list[str]) -> None:
    names = yso.label_names[:2]
    docs = [{"text": texts[0], "subjects": [{"uri": names[0]},
                                            {"label": yso.label_info[names[1]].label}]}]
    r = api.learn("yso", docs)
    assert r.status_code == 204
    corpus = read_corpus(feedback_dir / "yso.jsonl")
    assert corpus.texts[-1] == texts[0] and corpus.labels[-1] == names
    with pytest.raises(ValueError, match="nope"):
        api.learn("nope", docs)


def test_learn_from_many_clients_on_two_workers(tmp_path: Path, repo: Path,
                                                tiny_docs: Any) -> None:  # fmt: skip
    """The real ``xmc serve`` with 2 worker processes, 8 clients learning at once: every
    document lands once, each call's documents together and in order."""
    port = free_port()
    folder = tmp_path / "feedback"
    proc = serve([str(XMC), "serve", str(repo), "--port", str(port), "--workers", "2"],
                 {"XMC_FEEDBACK_DIR": str(folder)})  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(base, proc)
        client = annif_client.AnnifClient(api_base=f"{base}/v1/")
        texts = [d["text"] for d in tiny_docs[1][:40]]
        calls, per_call = 40, 6

        def learn(call: int) -> int:
            docs = [{"text": f"call {call} doc {i} {texts[(call + i) % len(texts)]}",
                     "subjects": [{"uri": f"http://example.org/call/{call}"}]}
                    for i in range(per_call)]  # fmt: skip
            return int(client.learn("yso", docs).status_code)

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(learn, range(calls))) == {204}
    finally:
        assert stop(proc) == 0
    rows = [json.loads(line) for line in (folder / "yso.jsonl").read_text().splitlines()]
    assert len(rows) == calls * per_call
    for start in range(0, len(rows), per_call):
        block = rows[start:start + per_call]
        assert len({tuple(r["labels"]) for r in block}) == 1
        assert [r["text"].split()[3] for r in block] == [str(i) for i in range(per_call)]
    assert len({r["labels"][0] for r in rows}) == calls
