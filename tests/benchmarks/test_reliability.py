"""The reliability scenarios at CI size (``benchmarks/reliability.py --quick``): the real
service with 2 workers under bounded loopback load, each scenario's checks asserted (no
failed request, refusals with Retry-After, the cache back after every Redis fault, a killed
worker costing no more than the requests in flight, a drained SIGTERM, a corrupt version
refused). Timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import reliability


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[reliability.Env]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is needed in CI (.ci/run installs it)")
        pytest.skip("redis-server is not installed")
    if not (reliability.DATA / "train.jsonl").is_file():
        pytest.skip("the shipped cooking corpus is missing")
    built = reliability.make_env(tmp_path_factory.mktemp("reliability"), quick=True)
    yield built
    built.redis.kill()


@pytest.mark.parametrize("name", list(reliability.SCENARIOS))
def test_scenario_holds(env: reliability.Env, name: str) -> None:
    row = reliability.SCENARIOS[name](env)
    assert row.requests > 0
    assert row.ok, row.checked
    if name != "workers":  # a SIGKILL may fail the requests in flight on that worker
        assert row.failed == 0, row.checked


def test_the_table_keeps_rows_not_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "RELIABILITY.md"
    doc.write_text("# Reliability\n\n## Other\n\ntext\n")
    monkeypatch.setattr(reliability, "DOC", doc)
    row = reliability.Row("soak", 10, 0, 1.0, 2.0, "-", "checked", True)
    reliability.write_doc([(row, "cmd soak")], "now")
    other = reliability.Row("overload", 5, 0, 1.0, 2.0, "-", "bounded", False)
    reliability.write_doc([(other, "cmd overload")], "later")
    text = doc.read_text()
    assert text.startswith("# Reliability\n\n## Scenarios under load")
    assert "| soak |" in text and "| overload |" in text and "**no**" in text
    assert text.index("| soak |") < text.index("| overload |") < text.index("## Other")
    assert text.count(reliability.SECTION) == 1
