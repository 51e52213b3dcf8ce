"""Every error raised to a caller belongs to the ``models.errors`` tree: a bare ``ValueError``
or ``TypeError`` may be raised only where the same function catches it (parsing a line and
reporting it as a DataError, say), or where a library turns it into its own error (pydantic
validators). The service maps the tree to statuses; anything else would be a 500."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from models.errors import InvalidInputError
from models.metrics import evaluate
from service import feedback

REPO = Path(__file__).resolve().parents[1]
BARE = {"ValueError", "TypeError"}
# raised for the one caller that catches it: a cache value that is not an answer is a miss
CAUGHT_BY_CALLER = {("service/cache.py", "decode_answer")}


def _caught(handlers: list[ast.ExceptHandler], name: str) -> bool:
    for h in handlers:
        types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if any(isinstance(t, ast.Name) and t.id == name for t in types):
            return True
    return False


def bare_raises(path: Path) -> list[str]:
    """``file:line function`` of each bare raise that nothing in its function catches."""
    rel = path.relative_to(REPO).as_posix()
    found: list[str] = []

    def visit(node: ast.AST, func: ast.FunctionDef | ast.AsyncFunctionDef | None,
              catching: list[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func, catching = node, []
        if isinstance(node, ast.Try):
            inner = catching + [n for n in BARE if _caught(node.handlers, n)]
            for child in node.body:
                visit(child, func, inner)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, func, catching)
            return
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BARE and exc.id not in catching:
                name = func.name if func else "<module>"
                validator = func is not None and any(
                    "validator" in ast.unparse(d) for d in func.decorator_list)
                if not validator and (rel, name) not in CAUGHT_BY_CALLER:
                    found.append(f"{rel}:{node.lineno} {name}")
        for child in ast.iter_child_nodes(node):
            visit(child, func, catching)

    visit(ast.parse(path.read_text()), None, [])
    return found


def test_no_bare_value_or_type_error_reaches_a_caller() -> None:
    files = [p for pkg in ("models", "service", "xmc") for p in sorted((REPO / pkg).rglob("*.py"))]
    assert files
    offenders = [hit for p in files for hit in bare_raises(p)]
    assert offenders == []


def test_the_checker_finds_an_uncaught_raise(tmp_path: Path) -> None:
    # the scan must be able to fail: a module under the repository with one of each kind
    probe = REPO / "tests" / f"_probe_{tmp_path.name}.py"
    probe.write_text(
        "def bad(x):\n    raise ValueError('x')\n\n"
        "def fine(x):\n    try:\n        raise ValueError('x')\n    except ValueError:\n"
        "        return 0\n")
    try:
        assert bare_raises(probe) == [f"tests/{probe.name}:2 bad"]
    finally:
        probe.unlink()


def test_converted_entry_points_raise_the_tree(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        evaluate([["a"]], [["a"], ["b"]])
    with pytest.raises(InvalidInputError):
        feedback.log_path(tmp_path, "../escape")
