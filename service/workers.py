"""Several uvicorn worker processes, each with its own ``SO_REUSEPORT`` listening socket.

uvicorn's own ``--workers`` shares one listening socket: whichever worker wakes first
accepts, so a burst of new keep-alive connections can pile onto one worker while the other
idles (the HTTP benchmark showed 87 % / 17 % CPU). With one socket per worker and
``SO_REUSEPORT``, the kernel spreads connections evenly over the workers. A worker calls
``listen()`` only once its bundle is loaded and warmed up, so a still-loading worker never
gets a connection.

The supervisor forwards SIGTERM once to every worker (each drains its in-flight requests),
restarts a worker that dies on its own, and gives up if workers keep dying at startup.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess

log = logging.getLogger("xmc.service")

_CRASH_WINDOW_S = 10.0  # a worker dying sooner than this after its start counts as a crash
_MAX_CRASHES = 5


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket that shares its port with the other workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _die_with_parent() -> None:
    """Linux: get SIGTERM if the supervisor dies, so no worker is left orphaned."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def worker_main() -> None:
    """One worker process: settings from ``XMC_*``, which the supervisor set."""
    # Own process group: a terminal's Ctrl-C reaches only the supervisor, which then sends
    # each worker exactly one SIGTERM (a second signal would make uvicorn skip draining).
    os.setpgrp()
    _die_with_parent()
    import uvicorn

    from service.middleware import configure_logging
    from service.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level)
    sock = reuseport_socket(settings.host, settings.port)
    config = uvicorn.Config(
        "service.app:create_app_from_env",
        factory=True,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=settings.graceful_timeout_seconds,
    )
    uvicorn.Server(config).run(sockets=[sock])


def supervise(host: str, port: int, n_workers: int) -> int:
    """Run ``n_workers`` workers until SIGTERM/SIGINT; 0 after a clean stop, 1 if workers
    kept crashing."""
    # Fail fast (address in use, bad host) before starting anything.
    reuseport_socket(host, port).close()
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    workers: dict[int, tuple[BaseProcess, float]] = {}

    def start(slot: int) -> None:
        proc = ctx.Process(target=worker_main, name=f"xmc-worker-{slot}")
        proc.start()
        workers[slot] = (proc, time.monotonic())

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("stopping: draining %d workers", len(workers))
        for proc, _ in workers.values():
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    crashes = 0
    try:
        for slot in range(n_workers):
            start(slot)
        log.info("started %d workers on %s:%d (SO_REUSEPORT)", n_workers, host, port)
        while workers:
            for slot, (proc, started) in list(workers.items()):
                proc.join(timeout=0.2)
                if proc.is_alive():
                    continue
                del workers[slot]
                if stopping:
                    continue
                if time.monotonic() - started < _CRASH_WINDOW_S:
                    crashes += 1
                log.error("worker %s exited with %s; restarting", proc.pid, proc.exitcode)
                if crashes >= _MAX_CRASHES:
                    log.error("workers keep dying at startup; giving up")
                    stop(signal.SIGTERM, None)
                    continue
                start(slot)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if crashes < _MAX_CRASHES else 1
