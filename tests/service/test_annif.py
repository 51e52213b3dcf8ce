"""Annif's REST API on our DataPlane, in one process: shapes, limits, errors, keys, the
cache, and learn's feedback log (several processes appending at once included)."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import models
from models.data import read_corpus
from models.errors import InvalidInputError
from service import feedback
from service.app import create_app
from service.repository import publish
from service.settings import Settings
from tests.service.conftest import wait_ready
from tests.service.test_api import assert_problem
from tests.service.test_cache import SpyPredictor

FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, annif_bundle: Path, tiny_bundle: Path
         ) -> Path:  # fmt: skip
    """Three models: yso (with a vocabulary), tiny (without), and plain: the tiny bundle in
    a version folder of its own name, as `xmc build --out REPO/plain/tiny` names it."""
    root = tmp_path_factory.mktemp("annif-repo") / "models"
    publish(root / "yso", "1", annif_bundle)
    publish(root / "tiny", "1", tiny_bundle)
    publish(root / "plain", "tiny", tiny_bundle)
    return root


@pytest.fixture(scope="module")
def loaded(repo: Path) -> dict[str, Any]:
    """One predictor per model for the whole module (loading is the slow part)."""
    out = {}
    for name in ("yso", "tiny"):
        p = models.load_bundle(repo / name / "1", mmap=True)
        p.warm_up()
        out[name] = p
    out["plain"] = out["tiny"]
    return out


@pytest.fixture
def make(repo: Path, loaded: dict[str, Any]) -> Iterator[Callable[..., TestClient]]:
    stack = ExitStack()

    def factory(wrap: Callable[[Any], Any] = lambda p: p, **overrides: Any) -> TestClient:
        fields: dict[str, Any] = {"bundle_path": repo, "access_log": False, "watch": False}
        fields.update(overrides)
        app = create_app(Settings(**fields),
                         loader=lambda path: wrap(loaded[Path(path).parent.name]))  # fmt: skip
        client = stack.enter_context(TestClient(app))
        wait_ready(client)
        return client

    yield factory
    stack.close()


@pytest.fixture
def texts(tiny_docs: tuple[list[dict], list[dict]]) -> list[str]:
    return [d["text"] for d in tiny_docs[1][:6]]


def annif_results(predictor: Any, text: str, k: int) -> list[dict[str, Any]]:
    """What Annif's suggest must say, from the predictor and the vocabulary's files."""
    out = []
    for name, score in predictor.predict([text], top_k=k)[0]:
        info = predictor.label_info.get(name)
        out.append({"uri": info.uri if info else name, "label": info.label if info else name,
                    "notation": info.notation if info else None, "score": score})  # fmt: skip
    return out


def suggest(c: TestClient, project: str, **form: Any) -> Any:
    return c.post(f"/v1/projects/{project}/suggest", data=form)


# ---------------------------------------------------------------------- projects
def test_info_and_projects(make: Callable[..., TestClient], loaded: dict[str, Any]) -> None:
    c = make()
    info = c.get("/v1/").json()
    assert set(info) == {"title", "version"} and "Annif" in info["title"]
    projects = c.get("/v1/projects").json()["projects"]
    assert [p["project_id"] for p in projects] == ["plain", "tiny", "yso"]
    yso = c.get("/v1/projects/yso").json()
    assert yso == projects[2]
    assert yso["name"] == "yso-test" and yso["backend"] == {"backend_id": "xmc"}
    assert yso["is_trained"] is True
    assert yso["modification_time"] == loaded["yso"].created_at
    assert yso["vocab"]["size"] == loaded["yso"].n_labels
    assert yso["language"] == yso["vocab_language"] == "en"
    assert projects[1]["vocab"] is None and projects[1]["language"] == "und"
    assert projects[1]["name"] == "tiny"
    # the bundle's name is only its version folder's: the project's name is the model's
    assert projects[0]["name"] == "plain"
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/", "/v1/projects/{project_id}/suggest", "/v1/projects/{project_id}/learn",
            "/v1/projects/{project_id}/suggest-batch"} <= set(paths)  # fmt: skip
    assert "application/x-www-form-urlencoded" in (
        paths["/v1/projects/{project_id}/suggest"]["post"]["requestBody"]["content"])


def test_unknown_project_is_404_with_detail(make: Callable[..., TestClient]) -> None:
    c = make()
    for r in (c.get("/v1/projects/nope"), suggest(c, "nope", text="some text"),
              c.post("/v1/projects/nope/suggest-batch", json={"documents": []}),
              c.post("/v1/projects/nope/learn", json=[])):  # fmt: skip
        assert "nope" in assert_problem(r, 404)["detail"]


# ---------------------------------------------------------------------- suggest
def test_suggest_equals_the_model(make: Callable[..., TestClient], loaded: dict[str, Any],
                                  texts: list[str]) -> None:  # fmt: skip
    c = make()
    for project in ("yso", "tiny"):
        r = suggest(c, project, text=texts[0])
        assert r.status_code == 200, r.text
        # Annif's default limit is 10
        assert r.json() == {"results": annif_results(loaded[project], texts[0], 10)}
    yso = suggest(c, "yso", text=texts[0]).json()["results"]
    assert all(x["uri"].startswith("http://") and x["label"].startswith("label-") for x in yso)


def test_suggest_limit_and_threshold(make: Callable[..., TestClient], loaded: dict[str, Any],
                                     texts: list[str]) -> None:  # fmt: skip
    c = make()
    full = annif_results(loaded["yso"], texts[1], 4)
    assert suggest(c, "yso", text=texts[1], limit=4).json()["results"] == full
    cut = full[2]["score"]
    kept = suggest(c, "yso", text=texts[1], limit=4, threshold=cut).json()["results"]
    assert kept == [x for x in full if x["score"] >= cut] and len(kept) >= 3
    assert suggest(c, "yso", text=texts[1], limit=0).json() == {"results": []}


@pytest.mark.parametrize(("form", "status", "where"), [
    ({"limit": "101"}, 422, "limit"),  # over XMC_MAX_TOP_K, as on our routes
    ({"limit": "-1"}, 422, "limit"),
    ({"limit": "ten"}, 422, "limit"),
    ({"threshold": "1.5"}, 422, "threshold"),
    ({"threshold": "nan"}, 422, "threshold"),
    ({"language": "fi"}, 422, "language"),
    ({"text": ""}, 422, "text"),
    ({"text": None, "limit": "3"}, 422, "text"),
])  # fmt: skip
def test_suggest_bad_form(make: Callable[..., TestClient], form: dict[str, Any], status: int,
                          where: str) -> None:  # fmt: skip
    c = make()
    data = {"text": "a text", **form}
    body = assert_problem(suggest(c, "yso", **{k: v for k, v in data.items() if v is not None}),
                          status)  # fmt: skip
    assert body["errors"][0]["loc"][-1] == where


def test_suggest_takes_a_form_only(make: Callable[..., TestClient]) -> None:
    c = make(max_text_bytes=50)
    r = c.post("/v1/projects/yso/suggest", json={"text": "a text"})
    assert "application/x-www-form-urlencoded" in assert_problem(r, 415)["detail"]
    r = c.post("/v1/projects/yso/suggest", content=b"text=%ff%fe", headers={"content-type": FORM})
    assert_problem(r, 400)
    assert_problem(suggest(c, "yso", text="word " * 20), 413)
    assert suggest(c, "yso", text="a text", language="en").status_code == 200


def test_suggest_uses_the_cache(make: Callable[..., TestClient], texts: list[str]) -> None:
    spies: list[SpyPredictor] = []

    def spy(p: Any) -> SpyPredictor:
        spies.append(SpyPredictor(p))
        return spies[-1]

    c = make(wrap=spy)
    for s in spies:
        s.scored.clear()  # warm-up aside
    first = suggest(c, "yso", text=texts[2], limit=3).json()
    # the same text up to whitespace and the same limit: the same key; threshold filters after
    again = suggest(c, "yso", text=f"  {texts[2]} ", limit=3, threshold=0.0).json()
    assert again == first
    assert sum(len(s.scored) for s in spies) == 1


# ---------------------------------------------------------------------- suggest-batch
def test_suggest_batch(make: Callable[..., TestClient], loaded: dict[str, Any],
                       texts: list[str]) -> None:  # fmt: skip
    c = make()
    docs = [{"document_id": f"doc-{i}", "text": t} for i, t in enumerate(texts[:4])]
    docs.append({"text": texts[0]})  # no id: null, as Annif answers
    r = c.post("/v1/projects/yso/suggest-batch", params={"limit": 3}, json={"documents": docs})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [x["document_id"] for x in got] == ["doc-0", "doc-1", "doc-2", "doc-3", None]
    for doc, res in zip(docs, got, strict=True):
        assert res["results"] == annif_results(loaded["yso"], doc["text"], 3)
    cut = got[0]["results"][1]["score"]
    r = c.post("/v1/projects/yso/suggest-batch", params={"limit": 3, "threshold": cut},
               json={"documents": docs[:1]})  # fmt: skip
    assert r.json()[0]["results"] == [x for x in got[0]["results"] if x["score"] >= cut]


def test_suggest_batch_limits(make: Callable[..., TestClient]) -> None:
    c = make(max_batch_size=3)
    docs = [{"text": f"text {i}"} for i in range(4)]
    assert_problem(c.post("/v1/projects/yso/suggest-batch", json={"documents": docs}), 413)
    r = c.post("/v1/projects/yso/suggest-batch", json={"documents": [{"text": " "}]})
    assert assert_problem(r, 422)["errors"][0]["loc"] == ["body", "documents", 0, "text"]
    r = c.post("/v1/projects/yso/suggest-batch", params={"threshold": "x"},
               json={"documents": docs[:1]})  # fmt: skip
    assert assert_problem(r, 422)["errors"][0]["loc"] == ["query", "threshold"]
    assert c.post("/v1/projects/yso/suggest-batch", json={"documents": []}).json() == []


# ---------------------------------------------------------------------- our own API
def test_our_api_answers_uri_and_notation(make: Callable[..., TestClient],
                                          loaded: dict[str, Any], texts: list[str]) -> None:
    c = make()
    r = c.post("/v1/models/yso/predict", json={"text": texts[0], "top_k": 8})
    labels = r.json()["labels"]
    expected = loaded["yso"].predict([texts[0]], top_k=8)[0]
    assert len(labels) == len(expected)
    for got, (name, score) in zip(labels, expected, strict=True):
        info = loaded["yso"].label_info[name]
        assert got["label"] == info.label and got["uri"] == info.uri == name
        assert got.get("notation") == info.notation and got["score"] == score
    assert any("notation" in x for x in labels) and any("notation" not in x for x in labels)
    plain = c.post("/v1/models/tiny/predict", json={"text": texts[0]}).json()["labels"]
    assert all(set(x) == {"label", "score"} for x in plain)


# ---------------------------------------------------------------------- keys
def test_annif_routes_need_the_key(make: Callable[..., TestClient], texts: list[str]) -> None:
    c = make(api_keys="k1")
    assert_problem(c.get("/v1/projects"), 401)
    assert_problem(suggest(c, "yso", text=texts[0]), 401)
    assert_problem(c.post("/v1/projects/yso/learn", json=[]), 401)
    auth = {"authorization": "Bearer k1"}
    assert c.get("/v1/projects", headers=auth).status_code == 200
    r = c.post("/v1/projects/yso/suggest", data={"text": texts[0]}, headers=auth)
    assert r.status_code == 200


# ---------------------------------------------------------------------- learn
def test_learn_is_off_without_feedback_dir(make: Callable[..., TestClient]) -> None:
    c = make()
    r = c.post("/v1/projects/yso/learn", json=[{"text": "t", "subjects": [{"uri": "u"}]}])
    assert "XMC_FEEDBACK_DIR" in assert_problem(r, 503)["detail"]
    assert "retry-after" not in r.headers  # retrying will not help


def test_learn_appends_to_the_log(make: Callable[..., TestClient], tmp_path: Path,
                                  loaded: dict[str, Any], texts: list[str]) -> None:  # fmt: skip
    c = make(feedback_dir=tmp_path / "feedback")
    known = loaded["yso"].label_names[:3]
    label_of = {n: loaded["yso"].label_info[n].label for n in known}
    before = c.get("/v1/models/yso").json()["version"]
    answer = suggest(c, "yso", text=texts[0]).json()
    docs = [
        {"text": texts[0], "subjects": [{"uri": known[0]}, {"label": label_of[known[1]]}]},
        # the shape: the text inside "document"; a subject the model does not know
        {"document": {"text": texts[1]}, "subjects": [{"label": "a new subject"},
                                                       {"uri": known[2], "label": "x"}]},
    ]  # fmt: skip
    r = c.post("/v1/projects/yso/learn", json=docs)
    assert r.status_code == 204 and r.content == b""
    assert c.post("/v1/projects/yso/learn", json=docs[:1]).status_code == 204
    log = tmp_path / "feedback" / "yso.jsonl"
    corpus = read_corpus(log)  # our own corpus format
    assert corpus.texts == [texts[0], texts[1], texts[0]]
    assert corpus.labels == [known[:2], ["a new subject", known[2]], known[:2]]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["model"] for r in rows} == {"yso"} and {r["version"] for r in rows} == {before}
    # the served model did not change
    assert c.get("/v1/models/yso").json()["version"] == before
    assert suggest(c, "yso", text=texts[0]).json() == answer


@pytest.mark.parametrize(("body", "loc"), [
    ({"text": "t"}, []),  # not a list
    ([{"text": "t", "subjects": []}], [0, "subjects"]),
    ([{"text": "t", "subjects": [{"notation": "1"}]}], [0, "subjects", 0]),
    ([{"subjects": [{"uri": "u"}]}], [0, "text"]),
    ([{"text": " ", "subjects": [{"uri": "u"}]}], [0, "text"]),
])  # fmt: skip
def test_learn_bad_documents(make: Callable[..., TestClient], tmp_path: Path, body: Any,
                             loc: list[Any]) -> None:  # fmt: skip
    c = make(feedback_dir=tmp_path)
    problem = assert_problem(c.post("/v1/projects/yso/learn", json=body), 422)
    assert problem["errors"][0]["loc"][1:len(loc) + 1] == loc
    assert not (tmp_path / "yso.jsonl").exists()


def test_learn_unwritable_log_is_503(make: Callable[..., TestClient], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    c = make(feedback_dir=blocker / "sub")  # a folder under a file cannot exist
    r = c.post("/v1/projects/yso/learn", json=[{"text": "t", "subjects": [{"uri": "u"}]}])
    assert "cannot be written" in assert_problem(r, 503)["detail"]


# ---------------------------------------------------------------------- the log itself
def _writer(path: str, worker: int, calls: int, lines_per_call: int) -> None:
    """One process appending ``calls`` batches, each a distinct, recognisable block; the
    texts are long enough (~20 kB a call) that a write can be split by the kernel."""
    for call in range(calls):
        docs = [(f"w{worker} c{call} l{i} " + "x" * 2000, [f"w{worker}", f"c{call}"])
                for i in range(lines_per_call)]  # fmt: skip
        feedback.append_durably(Path(path), feedback.encode_lines(docs, "m", "v"))


def test_concurrent_appends_from_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "m.jsonl"
    workers, calls, per_call = 6, 25, 10
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, calls, per_call))
             for w in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    rows = [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]
    assert len(rows) == workers * calls * per_call  # nothing lost, every line whole
    # every call's lines are consecutive and in order: no other call came between them
    for start in range(0, len(rows), per_call):
        block = rows[start:start + per_call]
        assert len({tuple(r["labels"]) for r in block}) == 1
        assert [r["text"].split()[2] for r in block] == [f"l{i}" for i in range(per_call)]
    seen = {tuple(r["labels"]) for r in rows}
    assert len(seen) == workers * calls


def test_append_after_a_torn_line_keeps_ours_whole(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"text": "a", "labels": ["x"]}\n{"text": "cut sho')  # a writer died
    feedback.append_durably(path, feedback.encode_lines([("b", ["y"])], "m", "v"))
    corpus = read_corpus(path, skip_bad_lines=True)
    assert corpus.texts == ["a", "b"] and corpus.n_skipped == 1


def test_log_names_are_plain_file_names(tmp_path: Path) -> None:
    assert feedback.log_path(tmp_path, "yso-en.v2") == tmp_path / "yso-en.v2.jsonl"
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(InvalidInputError):
            feedback.log_path(tmp_path, bad)


def test_subjects_map_to_training_labels() -> None:
    from models.vocab import LabelInfo

    info = {"http://x/a": LabelInfo("http://x/a", "apple", None)}
    by_label = {"apple": "http://x/a"}
    got = feedback.label_names([(None, "apple"), ("http://x/a", None), (None, "pear"),
                                ("http://x/b", "apple")], info, by_label)  # fmt: skip
    assert got == ["http://x/a", "pear", "http://x/b"]
