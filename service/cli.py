"""``xmc serve PATH``: run the prediction service (uvicorn workers under a supervisor).

``xmc/cli.py`` imports this module to build its parser: keep the top-level imports cheap
(the web stack is imported only when serving).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xmc serve``; other settings come from ``XMC_*`` variables."""
    parser.add_argument(
        "bundle_dir",
        type=Path,
        metavar="PATH",
        help="a bundle folder written by `xmc build`, or a model repository: "
        "PATH/NAME/VERSION/ bundle folders (see docs/service.md)",
    )
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
    """Serve the bundle or repository until SIGTERM/SIGINT; returns the exit status (0 after
    a clean shutdown, 2 when nothing can be served)."""
    # Not resolved: a path that is a symlink (a "current" link) is followed anew at each reload.
    path = Path(args.bundle_dir).absolute()
    # Workers are separate processes that read XMC_* themselves: hand them our choices.
    overrides = {
        "XMC_BUNDLE_PATH": str(path),
        "XMC_HOST": args.host,
        "XMC_PORT": None if args.port is None else str(args.port),
        "XMC_WORKERS": None if args.workers is None else str(args.workers),
        "XMC_LOG_LEVEL": getattr(args, "log_level", None),
    }
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = value

    from pydantic import ValidationError

    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"xmc serve: bad setting: {exc}", file=sys.stderr)
        return 2
    # Fail fast on a path that holds nothing to serve. Whether its models load is left to
    # the workers, which load them anyway: checking here first would add a whole load to the
    # time until ready. If a worker fails its first start (no model loads), the supervisor
    # asks _check_servable why, says it once and exits 2.
    problem = _check_layout(path)
    if problem:
        print(f"xmc serve: {problem}", file=sys.stderr)
        return 2

    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must exist, empty, before any worker imports prometheus_client.
        metrics_dir = tempfile.mkdtemp(prefix="xmc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    from service.middleware import configure_logging
    from service.workers import NothingToServe, supervise

    configure_logging(settings.log_level)
    # A supervisor at any worker count: whatever kills a worker, it is restarted.
    try:
        return supervise(settings.host, settings.port, settings.workers,
                         diagnose=lambda: _check_servable(path))
    except NothingToServe as exc:
        print(f"xmc serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"xmc serve: cannot listen on {settings.host}:{settings.port}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 2
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_layout(path: Path) -> str | None:
    """None when ``path`` is a bundle folder or a model repository with models; else why
    not. Reads folder names only."""
    from service import repository

    if repository.is_bundle(path):
        return None
    if not path.is_dir():
        return f"{path} is not a bundle folder (no manifest.json) nor a model repository"
    if not repository.model_names(path):
        return (f"{path} is neither a bundle folder (no manifest.json) nor a model repository "
                "(no NAME/VERSION/manifest.json)")  # fmt: skip
    return None


def _check_servable(path: Path) -> str | None:
    """None when at least one model loads; else why not. A repository's models that fail
    are reported on stderr (the workers serve the others). Memory-mapped: this costs little."""
    import models
    from service import repository

    problem = _check_layout(path)
    if problem:
        return problem
    if repository.is_bundle(path):
        try:
            models.load_bundle(str(path), mmap=True).close()
        except models.XMCError as exc:
            return f"cannot load {path}: {exc}"
        return None
    names = repository.model_names(path)
    failures = []
    for name in names:
        try:
            source = repository.resolve(path / name)
            models.load_bundle(str(source.path), mmap=True).close()
        except models.XMCError as exc:
            failures.append(f"model {name!r}: {exc}")
    for failure in failures:
        print(f"xmc serve: cannot load {failure}", file=sys.stderr)
    if len(failures) == len(names):
        return f"cannot load any model of {path}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    add_serve_arguments(parser)
    return serve_command(parser.parse_args(argv))
