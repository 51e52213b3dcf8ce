"""Where the trees of an ensemble are trained: on this machine's cores, or on a Dask cluster.

The trees of an ensemble are independent once the PIFA label embeddings exist (tree t is
clustered and trained with seed + t), so they are the unit sent out: with
``xmc build --dask tcp://SCHEDULER:8786`` (or ``XMC_DASK``) the builder scatters the feature
matrix, the label matrix and the embeddings to every worker once, submits one task per tree
(clustering and rankers, trained on the worker's own threads) and takes the trees back in
tree order. Training is deterministic whatever the thread count (see :mod:`models.train`), so
a bundle built through Dask is byte for byte the one built locally, and has its ``version``.

Dask is imported only here, and only when a scheduler address is given: a local build and
the serving path never need it. Scheduling, data transfer and retries are Dask's own.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import resource
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import scipy.sparse as sp

from models.cluster import build_tree
from models.errors import InvalidInputError
from models.params import BuildParams
from models.train import train_tree
from models.tree import Ensemble

log = logging.getLogger(__name__)


class StageTimer:
    """Times each stage of a build and records the peak RSS after it (silently when not
    ``verbose``): the builder's stages, and a Dask worker's for the same records."""

    def __init__(self, verbose: bool = True) -> None:
        self.records: dict[str, dict[str, float]] = {}
        self.verbose = verbose

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.verbose:
            log.info("stage %s ...", name)
        t0 = time.perf_counter()
        yield
        secs = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.records[name] = {"seconds": round(secs, 3), "peak_rss_mb": round(peak, 1)}
        if self.verbose:
            log.info("stage %s: %.2fs, peak RSS %.0f MB", name, secs, peak)


#: seconds to reach the scheduler before a build gives up with a clear message
CONNECT_TIMEOUT = 5
#: seconds to wait for a first worker on a scheduler that has none yet (e.g. still scaling up)
WORKER_TIMEOUT = 60
#: a worker started with ``--resources xmc_tree=1`` trains one tree at a time on all its threads
TREE_RESOURCE = "xmc_tree"

Stage = Callable[[str], AbstractContextManager[None]]


class StageLog(Protocol):
    """The builder's stage timer: a context per stage, and the records it keeps."""

    records: dict[str, dict[str, Any]]

    def __call__(self, name: str) -> AbstractContextManager[None]: ...


class TreeEngine(Protocol):
    """Trains the trees of an ensemble; yields each as a one-tree :class:`Ensemble`, in tree
    order, as it becomes available."""

    def trees(self, X: sp.csr_matrix, Y: sp.csr_matrix, Z: sp.csr_matrix, params: BuildParams,
              *, threads: int, stages: StageLog,
              dense_start: int | None) -> Iterator[Ensemble]: ...

    def describe(self) -> dict[str, Any]:
        """What the manifest's ``build`` section records about where training ran."""
        ...


def train_one_tree(X: sp.csr_matrix, Y: sp.csr_matrix, Z: sp.csr_matrix, params: BuildParams,
                   t: int, *, threads: int, stage: Stage,
                   dense_start: int | None) -> Ensemble:
    """Tree ``t`` of the ensemble: its clustering of the label embeddings ``Z``, then its
    rankers. The same code runs locally and on a Dask worker."""
    with stage(f"cluster_tree{t}"):
        tree = build_tree(Z, params.cluster, seed=params.seed + t, threads=threads)
    with stage(f"train_tree{t}"):
        return train_tree(X, Y, tree, params.ranker, seed=params.seed + t, threads=threads,
                          post_processor=params.post_processor, dense_start=dense_start,
                          desc=f"tree {t + 1}/{params.n_trees}")


class LocalEngine:
    """One tree after the other, each on ``threads`` local threads."""

    def trees(self, X: sp.csr_matrix, Y: sp.csr_matrix, Z: sp.csr_matrix, params: BuildParams,
              *, threads: int, stages: StageLog,
              dense_start: int | None) -> Iterator[Ensemble]:
        for t in range(params.n_trees):
            yield train_one_tree(X, Y, Z, params, t, threads=threads, stage=stages,
                                 dense_start=dense_start)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local"}

    def close(self) -> None:
        """Nothing to let go of (the same interface as :class:`DaskEngine`)."""


class DaskEngine:
    """One Dask task per tree on the cluster whose scheduler is at ``address``.

    Connects at once (a wrong address fails here, within :data:`CONNECT_TIMEOUT` seconds),
    waits for a first worker and checks that every worker runs the same xmc code and numeric
    libraries as this process: other code could build other trees. Use as a context manager
    (or call :meth:`close`) to let go of the cluster.
    """

    def __init__(self, address: str) -> None:
        try:
            from distributed import Client
            from distributed.comm import get_address_host, normalize_address
        except ImportError:
            raise InvalidInputError(
                "--dask needs the distributed package: pip install 'xmc-serve[build]'"
            ) from None
        try:
            # checked before a Client exists: a Client that failed on a malformed address
            # stalls and prints a traceback when it is collected
            address = normalize_address(address)
            self.host = get_address_host(address)
        except ValueError as exc:
            raise InvalidInputError(f"Dask scheduler {address!r}: not an address ({exc}); "
                                    "expected e.g. tcp://scheduler:8786") from None
        try:
            self.client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise InvalidInputError(f"Dask scheduler {address}: no answer ({exc})") from None
        self._workers_used: set[str] = set()
        self._fingerprint = code_fingerprint()
        try:
            self._check_workers(address)
        except BaseException:
            self.close()
            raise

    def _check_workers(self, address: str) -> None:
        try:
            self.client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
        except TimeoutError:
            raise InvalidInputError(f"Dask scheduler {address}: no worker joined it within "
                                    f"{WORKER_TIMEOUT} s") from None
        try:
            theirs = self.client.run(code_fingerprint)
        except Exception as exc:  # e.g. a worker without xmc-serve cannot load the function
            raise InvalidInputError(f"Dask scheduler {address}: its workers cannot run xmc "
                                    f"({type(exc).__name__}: {exc}); install xmc-serve[build] "
                                    "on them") from None
        other = sorted(w for w, fp in theirs.items() if fp != self._fingerprint)
        if other:
            raise InvalidInputError(
                f"Dask scheduler {address}: {len(other)} of {len(theirs)} worker(s) run other "
                f"xmc code or numpy/scipy/numba versions than this client (e.g. {other[0]}); "
                f"install the same versions everywhere")

    def _workers(self) -> dict[str, dict[str, Any]]:
        return self.client.scheduler_info(n_workers=-1)["workers"]

    def trees(self, X: sp.csr_matrix, Y: sp.csr_matrix, Z: sp.csr_matrix, params: BuildParams,
              *, threads: int, stages: StageLog,
              dense_start: int | None) -> Iterator[Ensemble]:
        """``threads`` (this machine's) is not used: a tree trains on its worker's threads,
        or on ``params.threads`` when set."""
        workers = self._workers()
        # only when every worker offers it: a task asking for a resource nobody has never runs
        one_at_a_time = bool(workers) and all(
            w.get("resources", {}).get(TREE_RESOURCE, 0) >= 1 for w in workers.values())
        if not one_at_a_time:
            log.warning("Dask workers without --resources %s=1: a worker may train several "
                        "trees at once, each on all its threads", TREE_RESOURCE)
        t0 = time.perf_counter()
        # broadcast: every worker gets its own copy once, instead of fetching it per task;
        # no content hash of gigabytes just to name them
        shared = self.client.scatter([X, Y, Z], broadcast=True, hash=False)
        log.info("dask: features, labels and embeddings sent to %d worker(s) in %.1fs",
                 len(workers), time.perf_counter() - t0)
        run_id = uuid.uuid4().hex[:8]  # readable, unique task names on the dashboard
        futures: list[Any] = [  # dask Futures, each dropped (None) once its tree is here
            self.client.submit(_tree_task, *shared, params, t, dense_start, self._fingerprint,
                               key=f"xmc-tree-{t}-{run_id}",
                               resources={TREE_RESOURCE: 1} if one_at_a_time else None)
            for t in range(params.n_trees)
        ]
        try:
            for t in range(params.n_trees):
                ensemble, records, worker = futures[t].result()
                futures[t] = None  # the worker may drop its copy as soon as we hold it
                self._workers_used.add(worker)
                for name, record in records.items():
                    stages.records[name] = {**record, "on": "dask"}
                log.info("dask: tree %d/%d trained (%s)", t + 1, params.n_trees,
                         ", ".join(f"{n} {r['seconds']:.1f}s" for n, r in records.items()))
                yield ensemble
        finally:  # a build that stops early leaves no tree running for nothing
            self.client.cancel([f for f in futures if f is not None])

    def describe(self) -> dict[str, Any]:
        workers = self._workers()
        return {"kind": "dask", "scheduler_host": self.host, "n_workers": len(workers),
                "worker_threads": sum(int(w.get("nthreads", 0)) for w in workers.values()),
                "workers_used": len(self._workers_used)}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> DaskEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tree_task(X: sp.csr_matrix, Y: sp.csr_matrix, Z: sp.csr_matrix, params: BuildParams,
               t: int, dense_start: int | None,
               fingerprint: str) -> tuple[Ensemble, dict[str, Any], str]:
    """Runs on a Dask worker: tree ``t``, the worker's stage records, and which worker."""
    from distributed import get_worker

    worker = get_worker()
    if code_fingerprint() != fingerprint:  # a worker that joined after the client's check
        raise InvalidInputError(f"Dask worker {worker.address} runs other xmc code or "
                                "numpy/scipy/numba versions than the client")
    stages = StageTimer(verbose=False)
    ensemble = train_one_tree(X, Y, Z, params, t, threads=params.threads or worker.state.nthreads,
                              stage=stages, dense_start=dense_start)
    return ensemble, stages.records, worker.address


@functools.cache  # the code a process loaded, even if the files change under it later
def code_fingerprint() -> str:
    """sha256 of the ``models`` package source and of the numeric libraries' versions:
    what decides the trees a worker builds."""
    import numba
    import numpy
    import scipy

    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(f"{numpy.__version__} {scipy.__version__} {numba.__version__}".encode())
    return h.hexdigest()[:16]


def open_engine(address: str | None) -> LocalEngine | DaskEngine:
    """The Dask engine for a scheduler ``address``, else the local one."""
    return DaskEngine(address) if address else LocalEngine()
