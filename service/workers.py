"""Several uvicorn worker processes, each with its own ``SO_REUSEPORT`` listening socket.

uvicorn's own ``--workers`` shares one listening socket: whichever worker wakes first
accepts, so a burst of new keep-alive connections can pile onto one worker while the other
idles (the HTTP benchmark showed 87 % / 17 % CPU). With one socket per worker and
``SO_REUSEPORT``, the kernel spreads connections evenly over the workers. A worker calls
``listen()`` only once its bundle is loaded and warmed up, so a still-loading worker never
gets a connection.

The supervisor runs at any worker count (one included): it forwards SIGTERM once to every
worker (each drains its in-flight requests), relays SIGHUP (reload) to all of them, and
restarts a worker that dies, whatever killed it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from service.repository import SAFE_PUBLISHING, SUPERVISOR_PID_ENV

log = logging.getLogger("xmc.service")

_CRASH_WINDOW_S = 10.0  # a worker dying sooner than this after its start counts as a crash
_MAX_CRASHES = 5  # failed starts in a row before giving up, only if no worker ever served
_MAX_PAUSE_S = 30.0


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


#: a worker's exit status when its app could not start (no model could be loaded)
STARTUP_FAILED = 3


def worker_main() -> None:
    """One worker process: settings from ``XMC_*``, which the supervisor set."""
    # Own process group: a terminal's Ctrl-C reaches only the supervisor, which then sends
    # each worker exactly one SIGTERM (a second signal would make uvicorn skip draining).
    os.setpgrp()
    _die_with_parent()
    # A reload relayed before the app is up must not kill us (SIGHUP's default); the app
    # installs its own handler once it serves, and loads the newest versions anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
        # uvicorn sleeps on it as a float; its annotation says int.
        timeout_graceful_shutdown=settings.graceful_timeout_seconds,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILED)


def describe_exit(exitcode: int | None) -> str:
    """What a worker's exit status means, and what to do about it."""
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode)
        what = f"was killed by {sig.name}"
        if sig in (signal.SIGBUS, signal.SIGSEGV):
            what += (
                ": a memory-mapped bundle file was most likely truncated or overwritten while"
                f" it was served; {SAFE_PUBLISHING} (docs/service.md, 'Publishing a version')"
            )
        return what
    if exitcode == STARTUP_FAILED:
        return "could not start: no model could be loaded (see the worker's log above)"
    return f"exited with status {exitcode}"


class NothingToServe(Exception):
    """Every worker failed its first start, and ``diagnose`` says why (the message)."""


def supervise(host: str, port: int, n_workers: int,
              diagnose: Callable[[], str | None] = lambda: None) -> int:
    """Run ``n_workers`` workers until SIGTERM/SIGINT; 0 after a clean stop, 1 if workers
    could not load any model, time after time, before any of them ever served.

    When a worker fails its first start before any worker served, ``diagnose`` is asked why
    (None: no reason found, so a passing fault, and the worker is restarted as below); with
    a reason the workers are stopped and NothingToServe raised with it.

    Whatever ends a worker later (a crash, SIGBUS from a bundle truncated under it), it is
    restarted, with a pause that doubles while restarts keep failing (at most 30 s): never
    given up, so the service comes back as soon as a model can be loaded again. SIGHUP is
    relayed to every worker (each rescans its models).
    """
    # Holding a bound socket reserves the port (port 0: picks one) and fails fast (address
    # in use, bad host) before anything starts; only the workers' sockets listen.
    reserved = reuseport_socket(host, port)
    port = reserved.getsockname()[1]
    os.environ["XMC_PORT"] = str(port)
    os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())
    supervisor = _Supervisor(n_workers)
    previous = {sig: signal.signal(sig, supervisor.stop) for sig in (signal.SIGTERM,
                                                                     signal.SIGINT)}  # fmt: skip
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, supervisor.relay_reload)
    try:
        for slot in range(n_workers):
            supervisor.start(slot)
        log.info("started %d workers on %s:%d (SO_REUSEPORT)", n_workers, host, port)
        supervisor.run(diagnose)
    finally:
        reserved.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if supervisor.problem is not None:
        raise NothingToServe(supervisor.problem)
    return 1 if supervisor.gave_up else 0


class _Supervisor:
    """The worker processes, and what to do when one ends."""

    def __init__(self, n_workers: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, tuple[BaseProcess, float]] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.gave_up = False
        self.ever_up = False  # a worker lived past the crash window: it served
        self.crashes = 0  # quick deaths in a row
        self.startup_failures = 0  # workers in a row that could not load any model
        self.problem: str | None = None  # why nothing can be served, once diagnosed

    def start(self, slot: int) -> None:
        proc = self._ctx.Process(target=worker_main, name=f"xmc-worker-{slot}")
        proc.start()
        self.workers[slot] = (proc, time.monotonic())

    def signal_workers(self, sig: int) -> None:
        for proc, _ in self.workers.values():
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def stop(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: draining %d workers", len(self.workers))
        self.signal_workers(signal.SIGTERM)

    def relay_reload(self, signum: int, frame: object) -> None:
        log.info("SIGHUP: every worker rescans its models")
        self.signal_workers(signal.SIGHUP)

    def run(self, diagnose: Callable[[], str | None]) -> None:
        while self.workers or (self.restart_at and not self.stopping):
            sentinels = [proc.sentinel for proc, _ in self.workers.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            for slot, (proc, started) in list(self.workers.items()):
                if proc.is_alive():
                    if time.monotonic() - started > _CRASH_WINDOW_S:
                        self.ever_up, self.crashes = True, 0
                    continue
                proc.join()
                del self.workers[slot]
                if self.stopping:
                    continue
                if (proc.exitcode == STARTUP_FAILED and not self.ever_up
                        and self.startup_failures == 0):
                    self.problem = diagnose()
                    if self.problem is not None:
                        self.stop(signal.SIGTERM, None)
                        continue
                self._ended(slot, proc, started)
            for slot, when in list(self.restart_at.items()):
                if self.stopping:
                    self.restart_at.clear()
                elif time.monotonic() >= when:
                    del self.restart_at[slot]
                    self.start(slot)

    def _ended(self, slot: int, proc: BaseProcess, started: float) -> None:
        """A worker ended on its own: say why, and restart it after a pause that doubles
        while restarts keep failing."""
        quick = time.monotonic() - started < _CRASH_WINDOW_S
        self.crashes = self.crashes + 1 if quick else 0
        pause = min(_MAX_PAUSE_S, 0.5 * 2 ** (self.crashes - 1)) if self.crashes else 0.0
        log.error("worker %s %s; restarting it in %.1f s", proc.pid,
                  describe_exit(proc.exitcode), pause)  # fmt: skip
        failed_start = proc.exitcode == STARTUP_FAILED
        self.startup_failures = self.startup_failures + 1 if failed_start else 0
        if self.startup_failures >= _MAX_CRASHES and not self.ever_up:
            # Nothing can be served and nothing ever was: a setup error, not a crash.
            log.error("no worker could load a model %d times in a row; giving up",
                      self.startup_failures)  # fmt: skip
            self.gave_up = True
            self.stop(signal.SIGTERM, None)
            return
        self.restart_at[slot] = time.monotonic() + pause
