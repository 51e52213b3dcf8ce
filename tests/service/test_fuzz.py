"""Schemathesis over the served OpenAPI spec, every operation, ``--checks all``: the short
form of ``python -m benchmarks.fuzz`` (a few cases per operation, small limits so that the
generated bodies stay small). Any failure means the spec and the service disagree, or the
service answered 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.fuzz import answers_by_status, run_schemathesis
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import served

pytest.importorskip("schemathesis", reason="dev extra: schemathesis")

SMALL_LIMITS = {"max_batch_size": 8, "max_text_bytes": 512, "max_top_k": 20,
                "max_beam_size": 30}  # fmt: skip


def server_errors(base: str) -> int:
    return sum(n for status, n in answers_by_status(base).items() if status >= 500)


@pytest.mark.parametrize("key", [None, "fuzz-key"], ids=["open", "with-keys"])
def test_schemathesis_finds_nothing(tuned_bundle: Path, tmp_path: Path, key: str | None,
                                    predictor: Any) -> None:  # fmt: skip
    settings = Settings(bundle_path=tuned_bundle, feedback_dir=tmp_path, access_log=False,
                        watch=False, api_keys=key or "", **SMALL_LIMITS)  # fmt: skip
    with served(create_app(settings)) as base:
        before = server_errors(base)
        # not the examples phase: the spec's examples name the cooking demo's labels
        result = run_schemathesis(base, max_examples=4, seed=1, key=key,
                                  phases="coverage,fuzzing,stateful")
        assert result.returncode == 0, result.output[-6000:]
        assert result.failures == 0 and result.cases >= 300, result.output[-2000:]
        # metrics are per process, shared by every app of this test session: the difference
        assert server_errors(base) == before
