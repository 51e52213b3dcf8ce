"""Security properties: keys compared in constant time and declared in the spec, no document
text in logs unless asked, bundle paths confined to their model's folder, and the container's
least privileges (checked in the compose file and the Dockerfile: CI has no engine)."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

import models
from service import repository
from service.app import OPEN_PATHS, OPEN_PREFIXES
from service.middleware import JSONFormatter
from service.repository import publish
from tests.service.test_api import assert_problem

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ keys
def test_every_key_is_compared_whatever_matches(
    make_client: Callable[..., TestClient], sample_texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """hmac.compare_digest against each key, every time: no early exit whose timing would
    tell which key (or how much of one) was right."""
    import service.app as app_module

    calls: list[bytes] = []
    real = app_module.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", counting)
    c = make_client(api_keys="first-key, second-key, third-key")
    payload = {"text": sample_texts[0]}
    for auth, status in (("Bearer first-key", 200), ("Bearer third-key", 200),
                         ("Bearer first-kez", 401), ("Bearer x", 401)):  # fmt: skip
        calls.clear()
        r = c.post("/v1/predict", json=payload, headers={"Authorization": auth})
        assert r.status_code == status
        assert calls == [b"first-key", b"second-key", b"third-key"], auth


def test_spec_declares_the_key_where_it_is_needed(
    make_client: Callable[..., TestClient]
) -> None:  # fmt: skip
    spec = make_client(api_keys="k1").get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
                assert "security" not in operation and "401" not in operation["responses"]
            else:
                assert operation["security"] == [{"bearer": []}], (method, path)
                assert "application/problem+json" in operation["responses"]["401"]["content"]
    assert "/v1/models/{name}/reload" in spec["paths"]  # the admin route is among them
    open_spec = make_client().get("/openapi.json").json()
    assert "securitySchemes" not in open_spec["components"]


# ------------------------------------------------------------------------------ logs
@pytest.fixture
def service_log() -> Iterator[list[str]]:
    """Every line the service's loggers write, formatted as in production, at DEBUG."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep()
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("xmc")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    access = logging.getLogger("xmc.access")
    if not access.propagate:  # configure_logging gave it its own handler
        access.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    access.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.mark.parametrize("log_text", [False, True])
def test_document_text_is_logged_only_when_asked(
    make_client: Callable[..., TestClient], service_log: list[str], log_text: bool
) -> None:
    c = make_client(access_log=True, log_text=log_text)
    secret, other = "zq-private-diagnosis-4471", "zq-private-salary-9902"
    assert c.post("/v1/predict", json={"text": f"patient {secret}"}).status_code == 200
    batch = {"documents": [{"text": f"a {secret}"}, {"text": f"b {other}"}]}
    assert c.post("/v1/predict/batch", json=batch).status_code == 200
    # refused requests too: their detail must not quote the text
    assert c.post("/v1/predict", json={"text": secret, "top_k": 0}).status_code == 422
    assert c.post("/v1/predict", json={"text": secret * 5000}).status_code == 413
    log = "\n".join(service_log)
    assert '"path":"/v1/predict/batch"' in log  # the access log did write
    assert (secret in log and other in log) is log_text, log[-2000:]
    if not log_text:
        assert secret not in log and other not in log


# ------------------------------------------------------------------------------ bundle paths
def _version(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"version": "v"}')
    return folder


def test_a_current_link_out_of_the_model_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "m"
    _version(model / "1")
    _version(tmp_path / "repo" / "other" / "3")
    _version(tmp_path / "elsewhere")
    for target in ("../other/3", str(tmp_path / "elsewhere"), "..", "."):
        link = model / "current"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(models.BundleError, match="outside the model's folder"):
            repository.resolve(model)
    (model / "current").unlink()
    (model / "current").symlink_to("1")  # within the model: served
    assert repository.resolve(model).repository_version == "1"


def test_a_version_or_file_link_out_of_the_model_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m"
    _version(model / "1")
    outside = _version(tmp_path / "outside")
    (model / "2").symlink_to(outside)
    with pytest.raises(models.BundleError, match="outside the model's folder"):
        repository.resolve(model)
    (model / "2").unlink()
    two = _version(model / "2")
    (two / "labels.json").symlink_to(outside / "manifest.json")
    with pytest.raises(models.BundleError, match=r"labels\.json.*outside"):
        repository.resolve(model)
    (two / "labels.json").unlink()
    (two / "labels.json").symlink_to("../1/manifest.json")  # shared within the model: fine
    assert repository.resolve(model).repository_version == "2"


def test_an_escaping_model_is_refused_and_the_others_serve(
    tmp_path: Path, tiny_bundle: Path, make_client: Callable[..., TestClient],
    predictor: Any, sample_texts: list[str],
) -> None:  # fmt: skip
    root = tmp_path / "repo"
    publish(root / "good", "1", tiny_bundle)
    shutil.copytree(tiny_bundle, tmp_path / "stray")
    (root / "evil").mkdir()
    (root / "evil" / "1").symlink_to(tmp_path / "stray")
    c = make_client(bundle_path=root, default_model="good")
    listed = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert listed["good"]["state"] == "ready"
    assert listed["evil"]["state"] == "failed"
    assert "outside the model's folder" in listed["evil"]["last_error"]
    assert_problem(c.post("/v1/models/evil/predict", json={"text": sample_texts[0]}), 503)
    assert c.post("/v1/models/good/predict", json={"text": sample_texts[0]}).status_code == 200
    # names from the URL only ever look models up: ".." is no model (encoded, so that the
    # client does not resolve it first)
    for path in ("/v1/models/..%2Fgood/predict", "/v1/models/%2E%2E/predict",
                 "/v1/models/%2E%2E%2F%2E%2E%2Fetc/predict"):  # fmt: skip
        r = c.post(path, json={"text": sample_texts[0]})
        assert r.status_code in (404, 405), path
        assert r.headers["content-type"].startswith("application/problem+json")


# ------------------------------------------------------------------------------ container
def _compose_api() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]


def _dockerfile() -> str:
    return (REPO / "docker" / "Dockerfile").read_text()


def _env(dockerfile: str) -> dict[str, str]:
    """The ENV settings of the final stage (``ENV A=1 \\`` continuation lines included)."""
    final = dockerfile.split("\nFROM ")[-1].replace("\\\n", " ")
    pairs: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.*)$", final, flags=re.M):
        pairs.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return pairs


def _tmpfs(api: dict[str, Any]) -> list[Path]:
    mounts = api.get("tmpfs") or []
    mounts = [mounts] if isinstance(mounts, str) else mounts
    return [Path(m.split(":")[0]) for m in mounts]


def _under(path: str, mounts: list[Path]) -> bool:
    return any(Path(path) == m or m in Path(path).parents for m in mounts)


def test_compose_runs_the_api_unprivileged_and_read_only() -> None:
    api = _compose_api()
    user = str(api.get("user", ""))
    assert user and user.split(":")[0] not in ("0", "root"), "the container must not be root"
    final_user = re.findall(r"^USER\s+(\S+)", _dockerfile(), flags=re.M)[-1]
    assert user.split(":")[0] == final_user, "compose and the image name the same user"
    assert api.get("read_only") is True
    assert "ALL" in api.get("cap_drop", [])
    assert any("no-new-privileges" in opt for opt in api.get("security_opt", []))


def test_what_the_service_writes_is_on_tmpfs() -> None:
    api = _compose_api()
    mounts = _tmpfs(api)
    env = {**_env(_dockerfile()), **{k: str(v) for k, v in (api.get("environment") or {}).items()}}
    # numba's compiled-kernel cache
    assert "NUMBA_CACHE_DIR" in env and _under(env["NUMBA_CACHE_DIR"], mounts), (env, mounts)
    # the Prometheus multiprocess folder: the one set, else `xmc serve` makes it in TMPDIR
    metrics_dir = env.get("PROMETHEUS_MULTIPROC_DIR") or env.get("TMPDIR") or "/tmp"
    assert _under(metrics_dir, mounts), (metrics_dir, mounts)
    # learning writes only where XMC_FEEDBACK_DIR says: unset, or on a writable mount
    feedback = env.get("XMC_FEEDBACK_DIR")
    volumes = [v for v in api.get("volumes", []) if isinstance(v, dict)]
    writable = [Path(v["target"]) for v in volumes if not v.get("read_only")]
    assert feedback is None or _under(feedback, mounts + writable)
    # the bundle is mounted read-only; bytecode is never written
    assert all(v.get("read_only") for v in volumes if v["target"] == "/bundle")
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
