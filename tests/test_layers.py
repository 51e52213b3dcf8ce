"""Layers point one way: ``models`` (the core) imports neither ``service`` nor ``xmc``;
``service`` never imports ``xmc``; only the ``xmc`` command sits above both."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, pkgutil, sys
import {package}
for info in pkgutil.walk_packages({package}.__path__, "{package}."):
    if not info.name.endswith("__main__"):  # running it is not importing it
        importlib.import_module(info.name)
print(" ".join(sorted({{m.split(".")[0] for m in sys.modules}} & {forbidden!r})))
"""


def modules(package: str) -> list[str]:
    return [m.name for m in pkgutil.walk_packages([str(REPO / package)], f"{package}.")]


@pytest.mark.parametrize(("package", "forbidden"), [
    ("models", {"service", "xmc"}),
    ("service", {"xmc"}),
])
def test_lower_layer_never_imports_a_higher_one(package: str, forbidden: set[str]) -> None:
    assert modules(package), f"no modules found under {package}"
    code = CHECK.format(package=package, forbidden=forbidden)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "", f"{package} imports {out.stdout.strip()}"


def test_the_check_sees_an_upward_import() -> None:
    # the same check, on a module that does import the layer above, must report it
    code = CHECK.format(package="xmc", forbidden={"models"})
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["models"]
