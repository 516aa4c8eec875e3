"""Nodes as batch jobs: Slurm or PBS through dask-jobqueue (``cluster.kind: slurm | pbs``).

The scheduler runs in the ``rqml run`` process (the login node) with the RQML scheduler
plugin preloaded; each job runs one node (``dask worker --worker-class
rqml_dask.node.RQMLWorker --preload rqml_dask.node``, or ``dask cuda worker`` with ``gpu``)
with the embedded cluster's worker settings (:data:`~rqml_dask.deploy.local.WORKER_ENVIRON`,
:data:`~rqml_dask.deploy.local.WORKER_CONFIG`) exported by the job script.

Nodes are named ``node-0``, ``node-1``, ...: a job that ends while the cluster still wants
its node (cancelled, pre-empted, out of walltime, its host lost) is submitted again under the
same name once Dask gives the worker up (``distributed.deploy.lost-worker-timeout``), and the
new job's node takes up that node's checkpoints (:class:`~rqml_dask.node.RQMLWorker`'s node
directory, under the job's ``local_directory``). Meanwhile its tasks resume on the other
nodes from the shared checkpoints (``checkpoint.artifacts`` on the shared filesystem, or
etcd / Consul). With ``adapt``, Dask's adaptive scaling retires only nodes that hold no
refining task (the scheduler plugin's ``valid_workers_downscaling``).

Over ``pqtls://`` (``rqml run --cluster slurm --secure``, :func:`secure_jobs`) the user's
Central Authority issues the scheduler, this process (a client, the cluster's admin) and
each job's node a certificate of its own, the node's under its name, into a directory the
jobs read (``credentials_directory``: on a filesystem the compute hosts share), deleted when
the run ends; each job script exports its node's as ``DASK_RQML__TRUST__*``, and gives the
nanny the node's doors (``dask worker --preload-nanny rqml_dask.node``; for ``dask cuda
worker``, which has no such option, ``distributed.nanny.preload`` exported).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import dask
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy import Cluster
from tornado.ioloop import PeriodicCallback

from rqml_dask.deploy import ClusterStartError
from rqml_dask.deploy.local import NODE_ARGUMENTS, PRELOADS, SCHEDULER_PRELOADS, WORKER_CONFIG, WORKER_ENVIRON, own_scheduler_trust, secure_authority
from rqml_dask.pipeline.config import ClusterSpec, JobQueueSpec
from rqml_dask.scheduler.plugin import PLUGIN_NAME as SCHEDULER_PLUGIN

logger = logging.getLogger(__name__)

JOB_NAME = "rqml-node"
"""The batch system's name of every job (``squeue``, ``qstat``)."""


def job_environment() -> list[str]:
    """The job script's ``export`` lines: the worker settings of the embedded cluster."""
    config = {f"DASK_{k.upper().replace('.', '__').replace('-', '_')}": str(v) for k, v in WORKER_CONFIG.items()}
    return [f"export {name}={shlex.quote(value)}" for name, value in {**WORKER_ENVIRON, **config}.items()]


JOB_CHECK_SECONDS = 5.0
"""How often the cluster asks the batch system which of its jobs still run."""
FAILED_STARTS = 3
"""Jobs in a row that end before their node registers, after which the run's waiting tasks fail."""


class _StableNodes:
    """A dask-jobqueue cluster whose nodes keep their names (``node-I``, a lost job's node
    submitted again under its name) and that notices jobs ending before their node starts."""

    _job_watch: PeriodicCallback | None = None
    _failed_starts: int = 0
    _failure: str | None = None
    """Why the cluster gave up on starting nodes: every task waiting for one fails with it."""
    _registered_jobs: set[str]

    def _new_worker_name(self, worker_number: int) -> str:
        return f"node-{worker_number}"

    def _update_worker_status(self, op: str, msg: object) -> None:
        name = self.scheduler_info["workers"].get(msg, {}).get("name") if op == "remove" else None  # type: ignore[attr-defined]
        if op == "add":  # before Dask's handler, which pops the workers out of the message
            self._failed_starts = 0  # a node came up: the jobs can start one
            for info in msg.get("workers", {}).values():  # type: ignore[union-attr]
                if (job := self.workers.get(info.get("name"))) is not None:  # type: ignore[attr-defined]
                    self._registered_jobs.add(job.job_id)
        super()._update_worker_status(op, msg)  # type: ignore[misc]
        if name is not None:  # after Dask drops the lost job (the same delay, so later)
            delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay, self._submit_again, name)

    def _submit_again(self, name: str) -> None:
        if self.status == Status.running and name in self.worker_spec and name not in self.workers:  # type: ignore[attr-defined]
            logger.warning("node %s: its job ended while the cluster still wants it; submitting a new job under its name", name)
            self._correct_state()  # type: ignore[attr-defined]

    async def _correct_state_internal(self) -> None:
        try:
            await super()._correct_state_internal()  # type: ignore[misc]
        except Exception as exc:  # a job that could not be submitted (no sbatch/qsub, refused by the batch system)
            self._give_up(f"could not submit a job for the run's nodes: {type(exc).__name__}: {' '.join(str(exc).split())}")

    def watch_jobs(self, kind: Literal["slurm", "pbs"]) -> None:
        """Every :data:`JOB_CHECK_SECONDS`, find the jobs that ended before their node
        registered: each is submitted again under its name; after :data:`FAILED_STARTS` in a
        row (no node registered meanwhile), or a job that could not be submitted, no more are
        submitted and every task waiting for a node fails, saying why (naming the job's output)."""
        async def check() -> None:
            if self._failure is not None:  # tasks submitted after it gave up fail too
                self._fail_waiting()
                return
            alive = await _alive_jobs(kind)
            if alive is None or self.status != Status.running:  # type: ignore[attr-defined]
                return
            registered = {w.get("name") for w in self.scheduler_info["workers"].values()}  # type: ignore[attr-defined]
            dropped = False
            for name, job in list(self.workers.items()):  # type: ignore[attr-defined]
                if job.job_id is None or job.job_id in alive or job.job_id in self._registered_jobs or name in registered:
                    continue  # queued or running, or its node started (a lost node is submitted again by _submit_again)
                self._failed_starts += 1
                where = f"{job.log_directory}/{job.job_name}-{job.job_id}.err" if job.log_directory else f"the output of job {job.job_id}"
                logger.warning("node %s: job %s ended before the node started (%d in a row); see %s", name, job.job_id,
                               self._failed_starts, where)
                del self.workers[name]  # type: ignore[attr-defined]
                dropped = True
                if self._failed_starts >= FAILED_STARTS:
                    self._give_up(f"{self._failed_starts} {kind} jobs in a row ended before their node started; "
                                  f"the latest, job {job.job_id} of node {name}, says why in {where}")
                    return
            if dropped:
                self._correct_state()  # type: ignore[attr-defined]

        def start() -> None:  # on the cluster's event loop
            self._job_watch = PeriodicCallback(check, JOB_CHECK_SECONDS * 1000)
            self._job_watch.start()

        self._registered_jobs = set()
        self.loop.add_callback(start)  # type: ignore[attr-defined]

    def _give_up(self, reason: str) -> None:
        if self._failure is None:
            logger.error("%s", reason)
            self._failure = reason
        self.worker_spec.clear()  # type: ignore[attr-defined]  # submit no more jobs
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        plugin = self.scheduler.plugins.get(SCHEDULER_PLUGIN)  # type: ignore[attr-defined]
        if plugin is not None and self._failure is not None:
            plugin.fail_waiting(self._failure)

    async def _close(self) -> None:
        if self._job_watch is not None:
            self._job_watch.stop()
        await super()._close()  # type: ignore[misc]


async def _alive_jobs(kind: Literal["slurm", "pbs"]) -> set[str] | None:
    """The ids of this user's jobs the batch system still holds (queued or running), or
    ``None`` where it did not answer."""
    user = getpass.getuser()
    command = ["squeue", "-h", "-o", "%i", "-u", user] if kind == "slurm" else ["qselect", "-u", user]
    try:
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(process.communicate(), JOB_CHECK_SECONDS)
    except (OSError, asyncio.TimeoutError):
        return None
    if process.returncode != 0:
        return None
    return {line.split(".")[0] for line in out.decode().split()}


def cluster_class(kind: Literal["slurm", "pbs"]) -> type[Cluster]:
    """dask-jobqueue's ``SLURMCluster`` or ``PBSCluster`` with stable node names. Raises
    :class:`~rqml_dask.deploy.ClusterStartError` naming the extra when dask-jobqueue is not installed."""
    try:
        from dask_jobqueue import PBSCluster, SLURMCluster
    except ImportError as exc:
        raise ClusterStartError(f"cluster kind '{kind}' needs dask-jobqueue: pip install 'rqml-dask[cluster]'") from exc
    base = SLURMCluster if kind == "slurm" else PBSCluster
    return type(f"RQML{base.__name__}", (_StableNodes, base), {})


def cluster_options(jobs: JobQueueSpec, dashboard_address: str) -> dict[str, object]:
    """The keyword arguments of :func:`cluster_class` for ``jobs``: one node per job, started
    with :data:`NODE_ARGUMENTS` and :func:`job_environment`, and the scheduler with the RQML
    scheduler plugin."""
    return {
        "cores": jobs.cores,
        "processes": 1,  # one node per job: its name is the job's
        "memory": jobs.memory,
        "walltime": jobs.walltime,
        "queue": jobs.queue,
        **({"account": jobs.account} if jobs.account else {}),
        "job_name": JOB_NAME,
        "job_extra_directives": jobs.job_extra_directives,
        "job_script_prologue": [*job_environment(), *jobs.job_script_prologue],
        "python": jobs.python,
        "interface": jobs.interface,
        "local_directory": jobs.local_directory,
        "log_directory": jobs.log_directory,
        "worker_command": "dask_cuda.cli worker" if jobs.gpu else "distributed.cli.dask_worker",
        "worker_extra_args": NODE_ARGUMENTS,
        "scheduler_options": {"preload": SCHEDULER_PRELOADS, "dashboard_address": dashboard_address},
        "protocol": None if jobs.protocol == "tcp" else jobs.protocol,
    }


def start(kind: Literal["slurm", "pbs"], spec: ClusterSpec) -> Cluster:
    """A cluster of ``kind``'s jobs set by ``spec``'s section of that name, scaled to its
    ``jobs`` (or adaptive between its ``adapt`` bounds)."""
    jobs: JobQueueSpec = getattr(spec, kind)
    return _scaled(cluster_class(kind)(**cluster_options(jobs, spec.dashboard_address)), jobs, kind)


@contextlib.contextmanager
def secure_jobs(kind: Literal["slurm", "pbs"], spec: ClusterSpec) -> Iterator[Cluster]:
    """:func:`start` over ``pqtls://`` with certificates of the user's Central Authority
    (:func:`~rqml_dask.deploy.local.secure_authority`), issued for this run (see the module
    docstring). While the context is open this process presents the client's."""
    from rqml_dask.trust import ca

    jobs: JobQueueSpec = getattr(spec, kind)
    if jobs.protocol != "tcp":
        raise ClusterStartError(f"cluster.{kind}.protocol {jobs.protocol!r} cannot be --secure: pqtls:// runs over TCP")
    authority = secure_authority()
    shared = Path(jobs.credentials_directory).expanduser() if jobs.credentials_directory else authority.parent / "jobs"
    shared.mkdir(mode=0o700, parents=True, exist_ok=True)
    issued = Path(tempfile.mkdtemp(prefix="run-", dir=shared))  # the nodes'
    own = Path(tempfile.mkdtemp(prefix="rqml-run-"))  # the scheduler's and the client's: never leave this host
    node_hours = _hours(jobs.walltime) + 1.0  # a job's life (its node renews a session certificate meanwhile)
    try:
        def trust(name: str, role: str) -> dict[str, str]:
            out, hours = (issued, node_hours) if role == "node" else (own, 24.0 * 365)
            credential = ca.issue(authority, name, role, out=out, hours=hours)  # type: ignore[arg-type]
            return {"ca": str(authority / "ca.pem"), "cert": str(credential.cert), "key": str(credential.key)}

        base = cluster_class(kind)
        options = cluster_options(jobs, spec.dashboard_address)
        if jobs.gpu:  # dask cuda worker has no --preload-nanny; its nanny reads Dask's config (as configs/pqtls.yaml sets it)
            options["job_script_prologue"] = [*options["job_script_prologue"], f"export DASK_DISTRIBUTED__NANNY__PRELOAD={shlex.quote(repr(PRELOADS))}"]
        else:  # dask worker passes its (empty) --preload-nanny, which overrides the config
            options["worker_extra_args"] = [*NODE_ARGUMENTS, *(a for p in PRELOADS for a in ("--preload-nanny", p))]
        options["protocol"] = "pqtls"
        with dask.config.set({"rqml.trust": trust("client", "client")}):
            with dask.config.set(own_scheduler_trust(trust("scheduler", "scheduler"), authority)):
                cluster = base(job_cls=_trusted_job(base.job_cls, trust), **options)
            with _scaled(cluster, jobs, kind):
                yield cluster
    finally:
        shutil.rmtree(issued, ignore_errors=True)
        shutil.rmtree(own, ignore_errors=True)


def _hours(walltime: str) -> float:
    """A batch walltime (``[D-]HH:MM:SS``, ``HH:MM``, ``MM``; Slurm's and PBS's forms) in
    hours; 24 where it is not one of those."""
    days, _, clock = walltime.rpartition("-")
    try:
        parts = [float(v) for v in clock.split(":")]
        whole_days = float(days) if days else 0.0
    except ValueError:
        return 24.0
    if len(parts) == 1 and not days:  # minutes
        return parts[0] / 60
    hours = sum(v / 60**i for i, v in enumerate(parts)) if days or len(parts) == 3 else parts[0] / 60 + parts[1] / 3600
    return whole_days * 24 + hours


def _trusted_job(job_cls: type, trust) -> type:
    """``job_cls`` whose script exports its node's own credentials, issued by ``trust(name, role)``."""

    class TrustedJob(job_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, name: str | None = None, job_script_prologue: list[str] | None = None, **kwargs) -> None:
            prologue = list(job_script_prologue or [])
            if name is not None and name != "dummy-name":  # dask-jobqueue's sample job (job_script()) gets none
                prologue += [f"export DASK_RQML__TRUST__{k.upper()}={shlex.quote(v)}" for k, v in trust(str(name), "node").items()]
            super().__init__(*args, name=name, job_script_prologue=prologue, **kwargs)

    return TrustedJob


def _scaled(cluster: Cluster, jobs: JobQueueSpec, kind: Literal["slurm", "pbs"]) -> Cluster:
    cluster.watch_jobs(kind)  # type: ignore[attr-defined]
    if jobs.adapt is not None:
        cluster.adapt(minimum_jobs=jobs.adapt.minimum, maximum_jobs=jobs.adapt.maximum)
    else:
        cluster.scale(jobs=jobs.jobs)
    return cluster
