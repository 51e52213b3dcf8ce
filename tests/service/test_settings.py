"""Settings: the prediction threads share the machine's cores among the workers."""

from __future__ import annotations

import os

import pytest

from service.settings import Settings


@pytest.mark.parametrize("workers", [1, 2, 3, 64])
def test_auto_predict_threads_share_the_cores(workers, monkeypatch):
    monkeypatch.delenv("XMC_PREDICT_THREADS", raising=False)
    settings = Settings(workers=workers)
    assert settings.predict_threads == max(1, (os.cpu_count() or 1) // workers)


def test_explicit_predict_threads_are_kept(monkeypatch):
    monkeypatch.setenv("XMC_PREDICT_THREADS", "3")
    monkeypatch.setenv("XMC_WORKERS", "2")
    assert Settings().predict_threads == 3


def test_negative_predict_threads_are_refused():
    with pytest.raises(ValueError, match="predict_threads"):
        Settings(predict_threads=-1)
