"""A server whose predictions wait for a file, to test that SIGTERM drains in-flight
requests: run as ``python slow_app.py BUNDLE PORT STARTED_FILE RELEASE_FILE``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import uvicorn

import models
from service.app import create_app
from service.settings import Settings


class GatedPredictor:
    """The real predictor; ``predict`` signals it started, then waits for the release."""

    def __init__(self, inner: Any, started: Path, release: Path) -> None:
        self._inner, self._started, self._release = inner, started, release

    def predict(self, texts: Any, **kwargs: Any) -> Any:
        self._started.touch()
        end = time.monotonic() + 120
        while not self._release.exists() and time.monotonic() < end:
            time.sleep(0.01)
        return self._inner.predict(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def main() -> None:
    bundle, port, started, release = sys.argv[1:5]
    inner = models.load_bundle(bundle)
    app = create_app(
        Settings(bundle_path=Path(bundle), lru_size=0),
        loader=lambda path: GatedPredictor(inner, Path(started), Path(release)),
    )
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning",
                timeout_graceful_shutdown=60)  # fmt: skip


if __name__ == "__main__":
    main()
