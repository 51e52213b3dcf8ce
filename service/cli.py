"""``xmc serve BUNDLE_DIR``: run the prediction service with uvicorn.

``models/cli.py`` imports this lazily, so the builder's CLI never pays for the web stack.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xmc serve``; other settings come from ``XMC_*`` variables."""
    parser.add_argument("bundle_dir", type=Path, help="bundle folder written by `xmc build`")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    parser.add_argument(
        "--workers", type=int, default=None, help="uvicorn worker processes (default 1)"
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level (default info)",
    )


def serve_command(args: argparse.Namespace) -> int:
    """Start uvicorn on the bundle; returns the exit status (0 after a clean shutdown)."""
    bundle = Path(args.bundle_dir).resolve()
    if not (bundle / "manifest.json").is_file():
        print(f"xmc serve: {bundle} is not a bundle folder (no manifest.json)", file=sys.stderr)
        return 2
    # Workers are separate processes that read XMC_* themselves: hand them our choices.
    overrides = {
        "XMC_BUNDLE_PATH": str(bundle),
        "XMC_HOST": args.host,
        "XMC_PORT": None if args.port is None else str(args.port),
        "XMC_WORKERS": None if args.workers is None else str(args.workers),
        "XMC_LOG_LEVEL": getattr(args, "log_level", None),
    }
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = value

    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"xmc serve: bad setting: {exc}", file=sys.stderr)
        return 2

    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must exist, empty, before any worker imports prometheus_client.
        metrics_dir = tempfile.mkdtemp(prefix="xmc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    import uvicorn

    from service.middleware import configure_logging

    configure_logging(settings.log_level)
    try:
        uvicorn.run(
            "service.app:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            log_config=None,
            access_log=False,
            server_header=False,
            # SIGTERM: stop accepting, let in-flight requests finish, then exit.
            timeout_graceful_shutdown=settings.graceful_timeout_seconds,
        )
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    add_serve_arguments(parser)
    return serve_command(parser.parse_args(argv))
