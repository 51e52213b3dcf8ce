"""Schemathesis over the service's own OpenAPI spec: ``python -m benchmarks.fuzz BUNDLE_DIR``.

Serves BUNDLE_DIR (a bundle or a model repository; build it with ``--tune-threshold`` so
that ``threshold: "auto"`` is valid) with ``xmc serve --workers 2`` on a free loopback port,
then runs ``st run --checks all`` over every operation of ``/openapi.json``: examples,
boundary (coverage) cases, random valid and invalid cases, and stateful sequences following
the spec's links. ``--keys`` serves with an API key and sends it, so the key check is
fuzzed too (``ignored_auth``: a request without the key must be refused).

Prints the cases generated, the failures schemathesis found, and the 5xx answers the service
gave, counted by the service itself (``xmc_requests_total`` in ``/metrics``), then exits
non-zero if there was any failure or any 5xx. The short form runs in CI
(tests/service/test_fuzz.py), through :func:`run_schemathesis` too.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.http import free_port, start_server, wait_ready

REPO = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).with_name("schemathesis.toml")
HOOKS = "benchmarks.fuzz_hooks"
PHASES = "examples,coverage,fuzzing,stateful"
_GENERATED = re.compile(r"(\d+) generated")
_FAILURES = re.compile(r"(\d+) unique failures?")
_REQUESTS = re.compile(r'^xmc_requests_total\{endpoint="[^"]*",status="(\d+)"\} ([0-9.e+]+)$',
                       flags=re.M)  # fmt: skip


@dataclass
class FuzzResult:
    returncode: int
    cases: int
    failures: int
    output: str


def st_command(base_url: str, max_examples: int, seed: int, key: str | None,
               phases: str) -> list[str]:  # fmt: skip
    st = Path(sys.executable).parent / "st"
    argv = [str(st), "--config-file", str(CONFIG), "run", f"{base_url}/openapi.json",
            "--checks", "all", "--max-examples", str(max_examples), "--seed", str(seed),
            "--workers", "1", "--no-color", "--suppress-health-check", "all",
            "--phases", phases]  # fmt: skip
    if key:
        argv += ["--header", f"Authorization: Bearer {key}"]
    return argv


def run_schemathesis(base_url: str, max_examples: int, seed: int = 0, key: str | None = None,
                     phases: str = PHASES, timeout_s: float = 900) -> FuzzResult:  # fmt: skip
    """``st run --checks all`` against a served spec, with this project's hooks and config.
    The spec's examples name cooking labels (the demo's): their phase fits the cooking
    bundle only."""
    env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as scratch:  # st writes its example database here
        argv = st_command(base_url, max_examples, seed, key, phases)
        done = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    output = done.stdout + done.stderr
    generated = _GENERATED.findall(output)
    failures = _FAILURES.findall(output)
    return FuzzResult(done.returncode, int(generated[-1]) if generated else 0,
                      int(failures[-1]) if failures else 0, output)  # fmt: skip


def answers_by_status(base_url: str) -> dict[int, int]:
    """Requests answered so far, by status, as the service's own metrics count them."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[int, int] = {}
    for status, value in _REQUESTS.findall(text):
        counts[int(status)] = counts.get(int(status), 0) + int(float(value))
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="bundle folder or model repository to serve")
    ap.add_argument("--max-examples", type=int, default=50,
                    help="cases per operation and phase (default 50: over 1,000 in all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keys", action="store_true", help="serve with an API key and send it")
    args = ap.parse_args(argv)

    key = "fuzz-key" if args.keys else None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as feedback:
        env = {"XMC_FEEDBACK_DIR": feedback, "XMC_ACCESS_LOG": "false"}
        if key:
            env["XMC_API_KEYS"] = key
        server = start_server(args.bundle, port, args.workers, env)
        try:
            wait_ready(base, server, args.workers)
            start = time.monotonic()
            result = run_schemathesis(base, args.max_examples, args.seed, key)
            seconds = time.monotonic() - start
            statuses = answers_by_status(base)
            alive = urllib.request.urlopen(f"{base}/readyz", timeout=10).status == 200
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(result.output[-3000:])
    n_5xx = sum(n for status, n in statuses.items() if status >= 500)
    print(f"cases generated: {result.cases}; schemathesis failures: {result.failures}; "
          f"answers: {sum(statuses.values())}, 5xx: {n_5xx}; "
          f"by status: {dict(sorted(statuses.items()))}; ready after: {alive}; {seconds:.0f} s")
    return 0 if result.returncode == 0 and n_5xx == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
