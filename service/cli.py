"""``xmc serve BUNDLE_DIR``: run the prediction service with uvicorn.

``models/cli.py`` imports this module to build its parser: keep the top-level imports cheap
(the web stack is imported only when serving).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


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

    from pydantic import ValidationError

    import models
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"xmc serve: bad setting: {exc}", file=sys.stderr)
        return 2
    # Fail fast on a corrupt bundle here, once, rather than in every worker (uvicorn would
    # restart workers that die at startup). Memory-mapped: this costs little.
    try:
        models.load_bundle(str(bundle), mmap=True).close()
    except models.XMCError as exc:
        print(f"xmc serve: cannot load {bundle}: {exc}", file=sys.stderr)
        return 2

    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must exist, empty, before any worker imports prometheus_client.
        metrics_dir = tempfile.mkdtemp(prefix="xmc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    import uvicorn

    from service.middleware import configure_logging

    configure_logging(settings.log_level)
    if settings.workers > 1:
        if settings.port == 0:
            print("xmc serve: several workers need a fixed --port", file=sys.stderr)
            return 2
        from service.workers import supervise

        try:
            return supervise(settings.host, settings.port, settings.workers)
        except OSError as exc:
            print(f"xmc serve: cannot listen on {settings.host}:{settings.port}: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 2
        finally:
            if metrics_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)
    # One worker: plain uvicorn. It drains on SIGTERM/SIGINT, then re-raises the signal to
    # the handler that was there before it: make that a clean exit (status 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    try:
        uvicorn.run(
            "service.app:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
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


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    add_serve_arguments(parser)
    return serve_command(parser.parse_args(argv))
