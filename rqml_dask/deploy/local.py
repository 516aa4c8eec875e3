"""The embedded cluster ``rqml run`` starts when it is given no scheduler.

A LocalCUDACluster (one worker per GPU, dask-cuda's spilling defaults) when a GPU and
dask-cuda are present, else a process-based LocalCluster. Both bind to loopback only.

Worker processes start with :data:`WORKER_ENVIRON` (``configs/dask.yaml`` sets the same
for clusters launched with ``dask worker``): Dask's own ``MALLOC_TRIM_THRESHOLD_`` makes
glibc return freed memory at once, so every FFT-sized temporary of an iteration is a fresh
mapping and page faults; a 256 MiB top pad keeps that memory in the heap between
iterations (an RL iteration on 96^3: 25 ms with Dask's setting alone, 14 ms with the pad;
BENCHMARKS.md). And one malloc arena: the pad is larger than a thread arena's heap (64 MiB),
so glibc never shrinks one (``malloc_trim`` does not either); with glibc's arenas for the
worker's threads (Dask's executor threads, replaced as tasks secede, the refinement,
checkpoint and I/O threads), the freed memory they held ratcheted up run after run while
the memory in use stayed flat (issue 30, BENCHMARKS.md). In the one arena the pad bounds
what is kept, with the same iterations (no page faults).

On a host without a GPU the workers are forked from a fork server this process starts once
(:func:`fork_server`, ``rqml run`` at its start), which has imported Dask, the array stack
and the node plugin and holds :data:`WORKER_ENVIRON` in its environment: a worker starts in
about a tenth of a second instead of importing them itself (0.5 s of a core each;
``bench/bench_start.py``, BENCHMARKS.md).

They also run without Dask's statistical profiler (:data:`WORKER_CONFIG`): it samples every
thread's stack every 10 ms and keeps a tree of them per second for the last 1,000 seconds
(``distributed.admin.low-level-log-length``), 2 MiB of Python objects a 64-task run here and
more of the heap: a long-lived cluster's workers grew by it for their first 17 minutes
(issue 30; ten runs: RSS 1.38x the first run's with it, 1.11x without; BENCHMARKS.md).
Dask's Profile page is empty for these workers; a cluster of one's own keeps it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import dask
from distributed import LocalCluster
from distributed.deploy import Cluster

from rqml_dask.arrays import gpu_count
from rqml_dask.pipeline.config import ClusterSpec


PRELOADS = ["rqml_dask.node"]
"""What every worker of the embedded cluster loads, as ``dask worker --preload`` would (and,
over ``pqtls://``, its nanny, as ``--preload-nanny`` would: the nanny's doors)."""
SCHEDULER_PRELOADS = ["rqml_dask.scheduler"]
"""What its scheduler loads, as ``dask scheduler --preload`` would."""
NODE_ARGUMENTS = ["--worker-class", "rqml_dask.node.RQMLWorker", *(a for p in PRELOADS for a in ("--preload", p))]
"""What a node started by command line (a batch job's, a pod's ``dask worker`` / ``dask cuda
worker``) is given: the worker class that outlives its scheduler, and the node preload."""

WORKER_ENVIRON = {"MALLOC_TOP_PAD_": str(256 * 2**20), "MALLOC_ARENA_MAX": "1"}
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
"""Dask settings of the embedded cluster's workers (``configs/dask.yaml`` sets the same)."""


def embedded_cluster(spec: ClusterSpec) -> Cluster:
    with dask.config.set(_worker_config()):
        return _start(spec)


def _worker_config() -> dict[str, object]:
    """:data:`WORKER_CONFIG` and :data:`WORKER_ENVIRON`, as the Dask config the nannies take
    when they start; on a host without a GPU, worker processes forked from this process's
    fork server (:func:`fork_server`)."""
    config = {**{f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENVIRON.items()}, **WORKER_CONFIG}
    if fork_server():
        config["distributed.worker.multiprocessing-method"] = "forkserver"
    return config


FORK_SERVER_PRELOAD = ["distributed", "numpy", "scipy.fft", "zarr", "lmdb", "rqml_dask.node.plugin", "rqml_dask.node.worker"]
"""What the fork server imports once, so that a worker process forked from it starts with
Dask, the array stack and the node plugin loaded (a spawned one imports them itself: about
0.5 s of a core per worker, BENCHMARKS.md)."""
_FORK_SERVER_LOCK = threading.Lock()
_fork_server_started = False


def worker_start_environ() -> dict[str, str]:
    """What a worker process must hold in its environment when it starts: Dask's
    ``distributed.nanny.pre-spawn-environ`` (one BLAS and OpenMP thread per worker:
    ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``; glibc's
    ``MALLOC_TRIM_THRESHOLD_``) and :data:`WORKER_ENVIRON` over it."""
    dask_environ = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {**{str(k): str(v) for k, v in dask_environ.items()}, **WORKER_ENVIRON}


def fork_server() -> bool:
    """Start this process's ``multiprocessing`` fork server, once, with
    :data:`FORK_SERVER_PRELOAD` imported and :func:`worker_start_environ` in its
    environment: glibc reads the ``MALLOC_*`` settings and OpenBLAS its thread count when a
    process starts or the library loads, and a forked worker keeps its fork server's (Dask's
    ``pre-spawn-environ`` cannot reach a forked process; its ``environ`` and config still
    do). Without it, each worker's NumPy ran as many BLAS threads as the host has cores, on
    top of the other workers': on 2 cores, two workers of SciPy's ``cg`` on 128x128
    systems ran 4.3x slower (BENCHMARKS.md, linear_solve). Its ``sys.path`` is this
    process's now. Whether the embedded cluster's workers fork from it: not where a GPU is
    visible (dask-cuda's workers are spawned, and nothing here may touch CUDA before they
    start)."""
    from multiprocessing import forkserver

    if gpu_count() > 0:
        return False
    global _fork_server_started
    with _FORK_SERVER_LOCK:
        if _fork_server_started:
            return True
        multiprocessing.get_context("forkserver").set_forkserver_preload(FORK_SERVER_PRELOAD)
        environ = worker_start_environ()
        saved = {name: os.environ.get(name) for name in environ}
        os.environ.update(environ)
        try:
            forkserver.ensure_running()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        _fork_server_started = True
    return True


def secure_authority() -> Path:
    """The Central Authority of ``rqml run --secure``, kept per user so that a run verifies
    the signed results of the runs before it and reuses them: ``$XDG_CONFIG_HOME/rqml/secure-ca``
    (default ``~/.config/rqml/secure-ca``), mode 0700, made on first use. Made whole in a
    directory of its own and renamed into place, so two first runs at once agree on one."""
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "rqml"
    directory = home / "secure-ca"
    if not (directory / "ca.pem").exists():
        from rqml_dask.trust import ca

        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        made = Path(tempfile.mkdtemp(prefix="secure-ca-", dir=home))  # mode 0700
        ca.init(made, name="rqml-secure-ca")
        try:
            os.rename(made, directory)
        except OSError:  # another run made it first
            shutil.rmtree(made)
    return directory


def own_scheduler_trust(credentials: dict[str, str], authority: Path) -> dict[str, dict[str, object]]:
    """The ``rqml.trust`` config a run's own scheduler starts under: its listener presents
    ``credentials``, it holds the CA at ``authority`` to renew the nodes' certificates, and
    this process's client is its admin (the cluster is this process's own: it closes it at
    the end)."""
    return {"rqml.trust": {**credentials, "session": {"authority": str(authority)}, "admin-names": ["client"]}}


@contextlib.contextmanager
def secure_embedded_cluster(spec: ClusterSpec) -> Iterator[Cluster]:
    """The embedded cluster over ``pqtls://`` (``rqml run --secure``): the user's Central
    Authority (:func:`secure_authority`) gives the scheduler, every worker (``node-I``, its
    ``--name``) and this process (a client, the cluster's admin: ``rqml.trust.admin-names``)
    their own ML-DSA-65 certificate, issued for this run into a directory deleted at its
    end. While the context is open this process presents the client's; process workers
    only (no LocalCUDACluster)."""
    from distributed import Nanny, Scheduler, SpecCluster

    from rqml_dask.trust import ca

    n_workers = spec.n_workers or os.cpu_count() or 1
    directory = secure_authority()
    with tempfile.TemporaryDirectory(prefix="rqml-secure-") as tmp:
        names = {"scheduler": "scheduler", "client": "client", **{f"node-{i}": "node" for i in range(n_workers)}}
        issued = {name: ca.issue(directory, name, role, out=Path(tmp)) for name, role in names.items()}  # type: ignore[arg-type]

        def trust(name: str) -> dict[str, str]:
            return {"ca": str(directory / "ca.pem"), "cert": str(issued[name].cert), "key": str(issued[name].key)}

        worker = {"nthreads": spec.threads_per_worker, "host": "127.0.0.1", "preload": PRELOADS, "preload_nanny": PRELOADS,
                  "memory_limit": spec.memory_limit, "dashboard_address": "127.0.0.1:0"}
        with dask.config.set({"rqml.trust": trust("client"), **_worker_config()}):
            with dask.config.set(own_scheduler_trust(trust("scheduler"), directory)):
                cluster = SpecCluster(
                    scheduler={"cls": Scheduler, "options": {"protocol": "pqtls", "host": "127.0.0.1",
                                                             "dashboard_address": spec.dashboard_address,
                                                             "preload": SCHEDULER_PRELOADS}},
                    # a Nanny's config replaces whole top-level sections (toolz.merge): pass all of rqml
                    workers={name: {"cls": Nanny, "options": {**worker, "config": {"rqml": {**dask.config.get("rqml"), "trust": trust(name)}}}}
                             for name in names if name.startswith("node-")},
                )
            with cluster:
                yield cluster


def _start(spec: ClusterSpec) -> Cluster:
    if gpu_count() > 0:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            return LocalCUDACluster(
                host="127.0.0.1",
                preload=PRELOADS,
                scheduler_kwargs={"preload": SCHEDULER_PRELOADS},
                dashboard_address=spec.dashboard_address,
                threads_per_worker=spec.threads_per_worker,
                silence_logs=False,  # Dask's logging config decides (rqml: quiet unless -v)
            )
    return LocalCluster(
        preload=PRELOADS,
        scheduler_kwargs={"preload": SCHEDULER_PRELOADS},
        n_workers=spec.n_workers or os.cpu_count() or 1,
        threads_per_worker=spec.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=spec.dashboard_address,
        memory_limit=spec.memory_limit,
        silence_logs=False,  # Dask's logging config decides (rqml: quiet unless -v)
    )
