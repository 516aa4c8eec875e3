"""NodePlugin: the node orchestrator as a Dask WorkerPlugin.

Installed on every worker of a cluster whose scheduler runs the RQML scheduler plugin, when
the worker registers (:mod:`rqml_dask.node_installer`: a bare ``dask worker`` is a node); before
registration by ``dask worker ... --preload rqml_dask.node`` (also ``dask cuda worker``: a bad
``rqml.node`` value then stops the worker at start) or by an
:class:`~rqml_dask.node.worker.RQMLWorker`; on a stock scheduler, by the first RQML task
(:func:`current_node`). On setup it starts the orchestrator on the
worker's array backend (CuPy on a GPU worker, else NumPy with one FFT thread per worker
thread), advertises the node's figures on every heartbeat as the custom metric ``rqml``,
mounts ``/queue_stats`` and ``/checkpoint_state`` and the RQML Prometheus series, and takes
supervision messages from the scheduler through worker handlers.

**Jobs.** Every RQML task the node takes is a :class:`Job`: the orchestrator refines it, and
the Dask task that carries it *claims* it and waits. When the worker loses its scheduler
(only an :class:`~rqml_dask.node.worker.RQMLWorker` survives that), the waiting Dask tasks
end with :class:`SchedulerLost` but the jobs go on (*degraded mode*); a job that finishes
unclaimed is *parked* in the outbox (a final checkpoint, its outcome in the node state's
LMDB) and reported to the scheduler plugin, which settles whether it is accepted
(:meth:`NodePlugin.reconcile`). A Dask task of the same task that arrives later claims the
running job instead of starting again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any

from distributed import Reschedule, Worker, WorkerPlugin, get_worker, rejoin, secede
from distributed.utils import log_errors, sync
from pydantic import ValidationError
from tornado.ioloop import PeriodicCallback

from rqml_dask import events
from rqml_dask.arrays import default_backend
from rqml_dask.checkpoint import CheckpointError
from rqml_dask.config import NodeSettings, node_settings, session_settings
from rqml_dask.key_guard import refusing_rqml_keys
from rqml_dask.node.kept_plugins import restore_plugins
from rqml_dask.messages import DECISION, OUTCOME, POLICY_OP, Decision, NodePolicy, TaskOutcome, delivered_as, thin
from rqml_dask.node.checkpointer import Checkpointer, Resume
from rqml_dask.node.doors import check_nanny
from rqml_dask.node.doors import guard as guard_doors
from rqml_dask.node.http import add_routes, register_collector
from rqml_dask.node.orchestrator import PROGRESS_POINTS, NodeOrchestrator, PushedBack
from rqml_dask.node.policy import PolicyGate
from rqml_dask.node.resources import ResourceMonitor
from rqml_dask.node.results import copy_result, host_core, outcome_of, recorded_outcome, vote_on
from rqml_dask.node.state import NodeState
from rqml_dask.problem import load_problem
from rqml_dask.refinement import Refinement
from rqml_dask.stores import LMDBStore, open_store
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.task import CheckpointSettings, RQMLTask
from rqml_dask.trust.policy import PolicyVerifier
from rqml_dask.trust.signing import Seal, SignatureError
from rqml_dask.trust.session import SessionRenewer
from rqml_dask.trust.transport import Credentials, peer_identity
from rqml_dask.volumes import write_core

logger = logging.getLogger(__name__)

PLUGIN_NAME = "rqml-node"
UNSENT_ALERTS = 1000
"""Alerts raised while the node has no scheduler that it keeps to publish once registered."""
IDLE_CHECKPOINTERS = 1
"""Checkpoint writers a node keeps open that nothing uses: the latest used, for the next run
on the same stores. Each writer has a thread and its stores open, and a long-lived node
meets a new set of stores with every input (``INPUT.checkpoints``): older idle writers are
closed."""


class ResultRefused(RuntimeError):
    """The scheduler did not take the signed result this node presented: refused (and the
    node quarantined), or stale (the task no longer runs here)."""


class SchedulerLost(RuntimeError):
    """The worker lost its scheduler while this Dask task waited: the node keeps the task."""


@dataclass(eq=False)
class Job:
    """An RQML task this node has taken, from submission until delivered or given up.

    ``future`` is the orchestrator's (it resolves to the finished
    :class:`~rqml_dask.refinement.Refinement`); ``claimed`` says a Dask task waits for it
    and will deliver its result; ``outcome`` is set once it is parked in the outbox;
    ``dropped`` says why reconciliation gave it up.
    """

    task: RQMLTask
    future: Future
    checkpointer: Checkpointer | None
    resume: Resume | None
    began_at: float = field(default_factory=time.time)
    claimed: bool = True
    finished: bool = False
    outcome: TaskOutcome | None = None
    dropped: str = ""


@dataclass
class NodeLink:
    """The node's view of its scheduler connection."""

    degraded_since: float | None = None
    degraded_seconds_total: float = 0.0
    losses: int = 0
    reconciled: int = 0
    accepted_from_outbox: int = 0
    discarded: int = 0


SESSION_TICK = "rqml-session"
"""The node's entry in ``worker.periodic_callbacks`` that renews its certificate."""


class NodePlugin(WorkerPlugin):
    """Runs a :class:`NodeOrchestrator` on its worker. ``policy`` is the initial policy;
    a policy the node saved earlier, or one the scheduler sends, takes precedence."""

    name = PLUGIN_NAME

    def __init__(self, policy: NodePolicy | None = None) -> None:
        self.policy = policy
        self.orchestrator: NodeOrchestrator | None = None
        self.settings: NodeSettings | None = None
        self.worker: Worker | None = None
        self.state: NodeState | None = None
        self.checkpointers: dict[tuple, Checkpointer] = {}
        """One writer per set of checkpoint stores, the least recently used first."""
        self._holders: Counter[tuple] = Counter()
        self.jobs: dict[str, Job] = {}
        self.link = NodeLink()
        self._checkpointers_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._session: Future = Future()
        self._outbox_thread = ThreadPoolExecutor(1, thread_name_prefix="rqml-outbox")
        self._resumed = False
        self._unsent_alerts: list[tuple[str, dict[str, Any]]] = []
        self.quarantined: dict[str, str] = {}
        """The nodes the scheduler quarantined (name -> reason): their signatures are refused."""
        self.renewer: SessionRenewer | None = None
        """Renews this node's certificate through the scheduler (``pqtls://`` clusters)."""
        self.seal: Seal | None = None
        """This node's signing key and what it checks others' signatures with (``pqtls://`` clusters)."""
        self.policy_gate = PolicyGate(None)
        """Checks the policies the node is given (signed by its scheduler over ``pqtls://``)."""
        self._dropped_policy: str | None = None
        """Why the policy the node saved was dropped when it started, until alerted."""

    def setup(self, worker: Worker) -> None:
        self.settings = node_settings()  # checked at start: a bad value stops the worker, naming its key
        self.worker = worker
        secure = str(worker.scheduler.address).startswith("pqtls://")
        if secure:
            check_nanny(worker)  # a nanny with open doors would run any certificate's code
        # An RQMLWorker has a node directory that outlives the process; a stock worker does not.
        node_directory = getattr(worker, "node_directory", None)
        state_dir = node_directory or Path(worker.local_directory) / "rqml"
        if node_directory is not None:
            restore_plugins(node_directory)  # the models of the jobs it may resume before a scheduler sends them
            self.state, damage = NodeState.open(node_directory / "node.lmdb")
            if damage is not None:  # Dask drops events sent before the worker registers
                self._unsent_alerts.append(("node-state-damaged", {"problem": damage}))
        backend = default_backend(cpu_threads=worker.state.nthreads)
        resources = ResourceMonitor(worker.memory_manager.memory_limit)
        policy = self._starting_policy(worker, state_dir)
        self.orchestrator = NodeOrchestrator(backend, state_dir, resources, policy, on_event=self._supervision_event,
                                             settings=self.settings)
        self.orchestrator.start()
        worker.metrics["rqml"] = self.heartbeat
        worker.handlers["rqml_decide"] = self._handle_decision
        worker.stream_handlers[POLICY_OP] = self._receive_policy
        worker.handlers["rqml_progress"] = self._handle_progress
        worker.handlers["rqml_quarantined"] = self._handle_quarantined
        worker.handlers["update_data"] = refusing_rqml_keys(worker.handlers["update_data"], "update_data", lambda kw: kw.get("data") or {})
        guard_doors(worker)  # all but data, actors and shuffles: the scheduler's certificate only
        add_routes(worker)
        register_collector(worker)
        if secure:
            self.seal = self._seal()
            self._renew_certificates(worker)

    def _renew_certificates(self, worker: Worker) -> None:
        """Keep this node's short-lived certificate renewed (:mod:`rqml_dask.trust.session`)."""
        settings = session_settings()

        async def ask(request: str) -> str:
            return await worker.scheduler.rqml_session(csr=request)

        def resealed(certificate) -> None:  # sign with the new key from now on
            self.seal = seal = self._seal()
            with self._checkpointers_lock:
                for checkpointer in self.checkpointers.values():
                    checkpointer.seal = seal

        self.renewer = SessionRenewer(Credentials.from_config(), ask, settings.renew_when_left, resealed)
        callback = PeriodicCallback(self.renewer.check, settings.check_interval * 1000)
        worker.periodic_callbacks[SESSION_TICK] = callback
        callback.start()

    def teardown(self, worker: Worker) -> None:
        worker.metrics.pop("rqml", None)
        if (callback := worker.periodic_callbacks.pop(SESSION_TICK, None)) is not None:
            callback.stop()
        if not self._session.done():  # Dask tasks still waiting for jobs end now
            self._session.set_result(None)
        if self.orchestrator is not None:
            self.orchestrator.stop()
        self._outbox_thread.shutdown(wait=True)
        for checkpointer in self.checkpointers.values():
            checkpointer.flush(timeout=10)
            checkpointer.stop()

    @contextlib.contextmanager
    def checkpointer_for(self, settings: CheckpointSettings | None) -> Iterator[Checkpointer | None]:
        """The node's writer for ``settings``' stores (one per distinct set, made on first
        use; ``None`` without settings), kept open while the ``with`` block runs and while a
        job made in it uses the writer. On leaving the block, writers that nothing holds or
        uses, but the latest used :data:`IDLE_CHECKPOINTERS`, are stopped and their stores
        closed once they have nothing left to write."""
        if settings is None:
            yield None
            return
        local = settings.local.replace("{host}", socket.gethostname())
        key = (local, settings.shared, settings.artifacts)
        with self._checkpointers_lock:
            checkpointer = self.checkpointers.pop(key, None)
            if checkpointer is None:
                local_store = open_store(local)
                if not isinstance(local_store, LMDBStore):
                    raise ValueError(f"checkpoint.local must be an lmdb:// URL, not {settings.local!r}")
                shared = open_store(settings.shared) if settings.shared else None
                writer = self.settings.checkpoint
                checkpointer = Checkpointer(local_store, shared, ArtifactStore(settings.artifacts), self.worker.address, self._alert,
                                            max_backoff=writer.max_backoff, max_duty=writer.max_duty, seal=self.seal)
            self.checkpointers[key] = checkpointer  # the latest used last
            self._holders[key] += 1
        try:
            yield checkpointer
        finally:
            with self._checkpointers_lock:
                self._holders[key] -= 1
                closing = self._idle_checkpointers()
            for idle in closing:
                idle.stop()
                idle.local.close()

    def _idle_checkpointers(self) -> list[Checkpointer]:
        """Take out of :attr:`checkpointers` the writers to close: those that nothing holds
        or uses, but the latest used :data:`IDLE_CHECKPOINTERS`, that have nothing left to
        write (``_checkpointers_lock`` held: a job is only made in a ``checkpointer_for``
        block, so none can appear for a writer that nothing holds)."""
        with self._jobs_lock:
            used = {id(job.checkpointer) for job in self.jobs.values()}
        unused = [key for key, checkpointer in self.checkpointers.items() if not self._holders[key] and id(checkpointer) not in used]
        closing = [key for key in unused[:max(len(unused) - IDLE_CHECKPOINTERS, 0)] if self.checkpointers[key].idle]
        for key in closing:
            del self._holders[key]
        return [self.checkpointers.pop(key) for key in closing]

    def _seal(self) -> Seal:
        """This node's credentials as they are now, to sign and check checkpoints and results."""
        credentials = Credentials.from_config()
        return Seal.load(credentials.ca, credentials.cert, credentials.key, credentials.crl, self.quarantined)

    # -- jobs ------------------------------------------------------------------------------

    def run(self, task: RQMLTask, submission: str, judging: tuple[TaskOutcome, str] | None = None) -> TaskOutcome:
        """Run ``task`` here and return its outcome: what a Dask task of it does, for the
        client's ``submission`` (:func:`~rqml_dask.messages.dask_key`). A voter is given
        ``judging``, the result it votes on and that task's key: its outcome carries its
        verdict. On a ``pqtls://`` cluster the outcome is signed by this node now, for this
        submission, and accepted by the scheduler first (:meth:`present`).

        A task whose outcome was recorded before (a re-run of the same pipeline, or a result
        settled when a degraded node reconnected) and whose core is in the output returns
        that outcome at once. A task this node already has (it kept refining it without a
        scheduler) is joined, not started again. Otherwise it starts from its newest valid
        checkpoint. The data is read on the calling Dask thread, which then secedes from the
        worker's pool while the refinement thread iterates, so the worker can hand the node
        more tasks. A task pushed back or rerouted raises :class:`~distributed.Reschedule`.
        """
        outcome = self._run(task)
        if judging is not None:
            outcome = vote_on(task, outcome, *judging)
        return self.present(task, outcome, submission)

    def present(self, task: RQMLTask, outcome: TaskOutcome, submission: str) -> TaskOutcome:
        """``outcome`` of ``task`` signed by this node now for ``submission``
        (:func:`~rqml_dask.messages.delivered_as`) and presented to the scheduler
        (``rqml_result``), which checks it before the Dask task ends, as the client does when
        it gets it; raises :class:`ResultRefused` if it is refused. Without ``pqtls://``:
        ``outcome`` as it is."""
        if self.seal is None:
            return outcome
        signed = self.seal.sign_outcome(outcome, delivered_as(task.key, submission))
        answer = sync(self.worker.loop, self.worker.scheduler.rqml_result, key=task.key, submission=submission,
                      outcome=OUTCOME.dump_python(signed, mode="json"))
        if answer.get("status") != "OK":
            raise ResultRefused(f"the scheduler refused the result of {task.task_id}: {answer.get('reason')}")
        return signed

    def _run(self, task: RQMLTask) -> TaskOutcome:
        with self.checkpointer_for(task.checkpoint) as checkpointer:
            task, problem = load_problem(task, self.orchestrator.backend)
            if (recorded := recorded_outcome(task, checkpointer)) is not None:
                self._announce(task, recorded)
                return recorded
            job = self.claim(task)
            if job is None:
                job = self.start_job(task, problem, checkpointer)
                events.publish(self.worker, events.TASK_INBOUND, "queued", key=task.key, task_id=task.task_id, worker=self.worker.address,
                               resume_from=job.resume.checkpoint.iteration if job.resume and job.resume.checkpoint else None)
            else:
                events.publish(self.worker, events.TASK_INBOUND, "joined", key=task.key, task_id=task.task_id, worker=self.worker.address)
            secede()
            try:
                refinement = self.wait(job)
            except PushedBack:
                raise Reschedule() from None
            finally:
                rejoin()
            if refinement.handed_back:  # rerouted: go on elsewhere from the checkpoint just taken
                if checkpointer is not None:
                    checkpointer.flush()
                self.forget(job)
                raise Reschedule()
            outcome = self.deliver(job, refinement)
            if outcome.written_to is not None and outcome.written_to != task.output:  # joined a run writing elsewhere
                outcome = copy_result(outcome, task, outcome.written_to)
            return outcome

    def start_job(self, task: RQMLTask, problem: dict, checkpointer: Checkpointer | None, claimed: bool = True) -> Job:
        """Hand ``task`` (its problem loaded) to the orchestrator, from its newest valid
        checkpoint; remember it until delivered."""
        resume = checkpointer.latest(task) if checkpointer is not None else None
        job = Job(task, self.orchestrator.submit(task, problem, checkpointer, resume), checkpointer, resume, claimed=claimed)
        with self._jobs_lock:
            self.jobs[task.key] = job
        if self.state is not None:
            self.state.take(task)
        # by key, not by job: a callback holding the job would make a cycle (job -> future ->
        # callback -> job) that keeps every finished refinement's arrays until a full GC
        job.future.add_done_callback(lambda future, key=task.key: self._on_finished(key, future))
        return job

    def claim(self, task: RQMLTask) -> Job | None:
        """The job this node already has for ``task`` (refining, queued or parked), now
        claimed by the calling Dask task; ``None`` if there is none to join. A job made from
        other input content (the input changed while the node had it) is dropped: it is
        ended and forgotten before this returns ``None``, so the task starts afresh."""
        with self._jobs_lock:
            job = self.jobs.get(task.key)
            if job is None or job.dropped:
                return None
            if job.task.input_digest == task.input_digest:
                job.claimed = True
                return job
            job.dropped = "input changed"
        logger.warning("%s: the job here was made from other input data; ending it to start afresh", task.task_id)
        self.orchestrator.decide(Decision(task.key, "terminate", "the input changed"))
        try:
            job.future.exception(timeout=60)
        except (TimeoutError, CancelledError):
            pass
        self.forget(job)
        return None

    def wait(self, job: Job) -> Refinement:
        """The finished refinement of a claimed job. Raises :class:`SchedulerLost` (the job
        goes on, unclaimed) when the worker loses its scheduler first, and what the job
        raised (e.g. :class:`~rqml_dask.node.orchestrator.PushedBack`) after forgetting it."""
        wait([job.future, self._session], return_when=FIRST_COMPLETED)
        if not job.future.done():
            with self._jobs_lock:
                job.claimed = False
                finished = job.finished
            if finished:  # it finished between the two checks: nobody else will park it
                self._outbox_thread.submit(self._park, job)
            raise SchedulerLost(f"the worker lost its scheduler; {job.task.task_id} goes on in degraded mode")
        if job.future.exception() is not None:
            self.forget(job)
        return job.future.result()

    def forget(self, job: Job) -> None:
        """The job is delivered or given up: drop it from the node and its state."""
        with self._jobs_lock:
            if self.jobs.get(job.task.key) is not job:  # forgotten already
                return
            del self.jobs[job.task.key]
        self.orchestrator.release(job.task.key)
        if self.state is not None:
            self.state.release(job.task.key)

    def deliver(self, job: Job, refinement: Refinement) -> TaskOutcome:
        """Write the task's core into the output, record its outcome (the done marker) and
        forget the job; the outcome is the job's parked one, if it was parked. If a result
        for the task was recorded and written first (by another node), that one stands:
        nothing is written and its outcome is returned. A failed task (its model raised) has
        no result: nothing is written or recorded, and the next run of the pipeline tries it
        again; a terminated one is written but not recorded, so the next run tries it again
        too (from its checkpoints). Only another node can have recorded the task since its
        job began (a node has one job per task), so the done marker is looked up again only
        where nodes share a store."""
        task = job.task
        shared = job.checkpointer is not None and job.checkpointer.shared is not None
        if shared and (recorded := recorded_outcome(task, job.checkpointer)) is not None:
            self.forget(job)
            self._announce(task, recorded)
            return recorded
        outcome = job.outcome
        core = None if refinement.status == "failed" else host_core(refinement)
        if outcome is None:
            outcome = self._outcome_of(job, refinement, core)
        if core is not None:
            write_core(task.output, task.region, core)
            if job.checkpointer is not None and outcome.state != "terminated":  # a terminated one: tried again
                if self.seal is not None:
                    outcome = self.seal.sign_outcome(outcome, task.key)
                job.checkpointer.finish(task, OUTCOME.dump_json(outcome))
        self.forget(job)
        self._announce(task, outcome)
        return outcome

    def _announce(self, task: RQMLTask, outcome: TaskOutcome) -> None:
        """Publish the end of ``task`` on ``rqml-task_results``: ``reused`` where ``outcome`` was
        recorded by an earlier run (not one settled by reconciliation), else ``finished``. Either
        carries the state and figures, and the outcome's convergence checks as a heartbeat's
        ``progress`` has a task's (at most :data:`PROGRESS_POINTS`, thinned evenly over the
        whole run), so the live pages draw a reused result with the figures of the run that
        computed it."""
        progress = {"iteration": outcome.iterations, "trace": [astuple(p) for p in thin(outcome.trace, PROGRESS_POINTS)]}
        events.publish(self.worker, events.TASK_RESULTS, "reused" if outcome.reused and not outcome.reconciled else "finished", key=task.key,
                       task_id=task.task_id, worker=self.worker.address, state=outcome.state, status=outcome.status,
                       iterations=outcome.iterations, model=outcome.model, escalations=outcome.escalations,
                       resumed_from=outcome.resumed_from, reconciled=outcome.reconciled, progress=progress)

    def _outcome_of(self, job: Job, refinement: Refinement, core) -> TaskOutcome:
        return outcome_of(refinement, self.worker.address, core, job.began_at, job.resume.rejected if job.resume else [])

    def _on_finished(self, key: str, future: Future) -> None:
        """Done-callback of a job's future (on the refinement thread: hand work off)."""
        with self._jobs_lock:
            job = self.jobs.get(key)
            if job is None or job.future is not future:
                return
            job.finished = True
            claimed = job.claimed
        if not claimed:
            self._outbox_thread.submit(self._park, job)

    def _park(self, job: Job) -> None:
        """Keep an unclaimed finished job in the outbox: a final checkpoint, its outcome in
        LMDB; report it if the scheduler is there. A Dask task that claims the job meanwhile
        delivers it instead."""
        if job.dropped or job.future.exception() is not None:  # given up, or pushed back unstarted
            self.forget(job)
            return
        try:
            refinement = job.future.result()
            if refinement.handed_back or refinement.status == "failed":  # a failed one runs again when asked
                self.forget(job)
                return
            if job.checkpointer is not None:
                job.checkpointer.submit(refinement.snapshot("finished"))
                job.checkpointer.flush()
            outcome = replace(self._outcome_of(job, refinement, host_core(refinement)), reconciled=True)
            if self.seal is not None:  # presented with the reconciliation report
                outcome = self.seal.sign_outcome(outcome, job.task.key)
            with self._jobs_lock:
                if job.claimed or job.dropped:
                    return
                job.outcome = outcome
                if self.state is not None:
                    self.state.park(job.task.key, OUTCOME.dump_json(outcome))
        except Exception:
            logger.exception("could not park the result of %s", job.task.task_id)
            self.forget(job)
            return
        if self.link.degraded_since is None:
            self.worker.loop.add_callback(self._report, [job])

    def resume_jobs(self) -> None:
        """Take up again the jobs a previous process of this node had (once, at start):
        a task whose outcome is in the outbox is parked again from its final checkpoint,
        the others go on refining from their newest checkpoints."""
        if self._resumed or self.state is None:
            return
        self._resumed = True
        parked = self.state.outbox()
        for task in self.state.jobs():
            if task.key in self.jobs:
                continue
            with contextlib.ExitStack() as held:  # the checkpoint writer, until the job is made
                try:
                    checkpointer = held.enter_context(self.checkpointer_for(task.checkpoint))
                    task, problem = load_problem(task, self.orchestrator.backend)
                    outcome = OUTCOME.validate_json(parked[task.key]) if task.key in parked else None
                    self.link.degraded_since = self.link.degraded_since or time.time()  # working with no scheduler yet
                    if outcome is not None and self._repark(task, problem, checkpointer, outcome):
                        logger.info("job %s is finished: its result waits in the outbox", task.task_id)
                        continue
                    job = self.start_job(task, problem, checkpointer, claimed=False)
                except Exception as exc:  # the node starts without it: a scheduler sends the task again
                    logger.error("job %s cannot be resumed, dropped: %s", task.task_id, exc)
                    self.state.release(task.key)
                    continue
                checkpoint = job.resume.checkpoint if job.resume is not None else None
                logger.info("resumed job %s from iteration %s", task.task_id, checkpoint.iteration if checkpoint else 0)

    def _repark(self, task: RQMLTask, problem: dict, checkpointer: Checkpointer | None, outcome: TaskOutcome) -> bool:
        """Put a finished job back in the outbox from its final checkpoint (the one at
        its outcome's iteration); False if that checkpoint is missing or not usable."""
        resume = checkpointer.latest(task) if checkpointer is not None else None
        checkpoint = resume.checkpoint if resume is not None else None
        if checkpoint is None or checkpoint.iteration != outcome.iterations:
            return False
        try:
            refinement = Refinement.resume(task, problem, self.orchestrator.backend, checkpoint, resume.arrays)
        except CheckpointError as exc:
            logger.error("final checkpoint of %s not usable, refining again: %s", task.task_id, exc)
            return False
        finished: Future = Future()
        finished.set_result(refinement)
        with self._jobs_lock:
            self.jobs[task.key] = Job(task, finished, checkpointer, resume, claimed=False, finished=True, outcome=outcome)
        return True

    # -- the scheduler link ------------------------------------------------------------------

    def scheduler_lost(self) -> None:
        """Enter degraded mode: the Dask tasks waiting for jobs end, the jobs go on."""
        self.link.degraded_since = time.time()
        self.link.losses += 1
        lost, self._session = self._session, Future()
        lost.set_result(None)

    async def reconcile(self) -> None:
        """Just registered: leave degraded mode, publish what happened meanwhile, and report
        every job to the scheduler plugin for a verdict."""
        link = self.link
        since, link.degraded_since = link.degraded_since, None  # out of degraded mode: alerts are published again
        unsent, self._unsent_alerts = self._unsent_alerts, []
        for kind, payload in unsent:
            self._alert(kind, payload)
        if since is not None:
            seconds = time.time() - since
            link.degraded_seconds_total += seconds
            self._alert("node-degraded", {"since": since, "seconds": seconds, "tasks": len(self.jobs)})
        with self._jobs_lock:
            jobs = [job for job in self.jobs.values() if not job.dropped]
        if jobs:
            await self._report(jobs)

    async def _report(self, jobs: list[Job]) -> None:
        progress = self._progress()
        tasks = [
            {
                "key": job.task.key,
                "iteration": progress.get(job.task.key, 0),
                "finished": job.outcome is not None,
                "outcome": OUTCOME.dump_python(job.outcome, mode="json") if job.outcome is not None and self.seal is not None else None,
            }
            for job in jobs
        ]
        try:
            verdicts = await self.worker.scheduler.rqml_reconcile(node=self.worker.address, tasks=tasks)
        except Exception as exc:  # no RQML scheduler plugin, or lost again: the jobs wait
            logger.warning("could not reconcile %d tasks with the scheduler: %s", len(tasks), exc)
            return
        self.link.reconciled += len(tasks)
        for job in jobs:
            await self._settle(job, verdicts.get(job.task.key, "keep"))

    async def _settle(self, job: Job, verdict: str) -> None:
        if verdict == "accept" and job.outcome is not None:
            await asyncio.to_thread(self.deliver, job, job.future.result())
            self.link.accepted_from_outbox += 1
        elif verdict in ("duplicate", "drop"):
            job.dropped = verdict
            self.link.discarded += 1
            if job.finished:
                self.forget(job)
            else:
                self.orchestrator.decide(Decision(job.task.key, "terminate", f"{verdict}: settled by the scheduler"))

    # -- events and figures ----------------------------------------------------------------

    def _alert(self, kind: str, payload: dict[str, Any]) -> None:
        """Publish an alert on ``rqml-alerts``; with no scheduler (Dask would drop it), keep it
        (the first :data:`UNSENT_ALERTS`) until the node registers again."""
        if self.link.degraded_since is not None:
            if len(self._unsent_alerts) < UNSENT_ALERTS:
                self._unsent_alerts.append((kind, {**payload, "raised_at": time.time()}))
            return
        events.publish(self.worker, events.ALERTS, kind, worker=self.worker.address, **payload)

    def _supervision_event(self, event: dict[str, Any]) -> None:
        payload = dict(event)
        kind = payload.pop("kind")
        events.publish(self.worker, events.SUPERVISION, kind, worker=self.worker.address, **payload)
        if kind == "failed":  # a model raised: the operator needs to know, not just the supervisor
            self._alert("task-failed", payload)

    def health(self) -> dict[str, Any]:
        """``/health``: the scheduler link, and the node's jobs and outbox."""
        link = self.link
        with self._jobs_lock:
            jobs = len(self.jobs)
            parked = sum(job.outcome is not None for job in self.jobs.values())
        return {
            "status": "ok" if link.degraded_since is None else "degraded",
            "scheduler": self.worker.scheduler.address,
            "degraded_seconds": time.time() - link.degraded_since if link.degraded_since is not None else 0.0,
            "degraded_seconds_total": link.degraded_seconds_total,
            "scheduler_losses": link.losses,
            "jobs": jobs,
            "outbox": parked,
            "reconciled": link.reconciled,
            "accepted_from_outbox": link.accepted_from_outbox,
            "discarded": link.discarded,
            "scheduler_identity": peer_identity(getattr(self.worker.batched_stream, "comm", None)),
            "certificate": self.renewer.status() if self.renewer is not None else None,
        }

    def heartbeat(self, worker: Worker) -> dict[str, Any]:
        """The custom worker metric ``rqml`` (Dask calls it with the worker every heartbeat)."""
        figures = self.orchestrator.heartbeat()
        figures["bandwidth"] = worker.bandwidth
        figures["checkpoints"] = self.checkpoint_summary()
        figures["link"] = self.health()
        return figures

    def checkpoint_state(self) -> dict[str, Any]:
        """Per task on this node: its iteration, its newest checkpoint (iteration, age, where
        stored) and the writes still waiting."""
        tasks: dict[str, dict[str, Any]] = {
            key: {"iteration": iteration} for key, iteration in self.orchestrator.iterations().items()
        }
        for checkpointer in list(self.checkpointers.values()):
            for key, state in checkpointer.state().items():
                tasks.setdefault(key, {"iteration": None}).update(state)
        return {"tasks": tasks, **self.checkpoint_summary()}

    def checkpoint_summary(self) -> dict[str, float]:
        summaries = [c.summary() for c in list(self.checkpointers.values())]
        return {
            "pending": sum(s["pending"] for s in summaries),
            "lag_seconds": max((s["lag_seconds"] for s in summaries), default=0.0),
            "written": sum(s["written"] for s in summaries),
        }

    @log_errors
    def _handle_decision(self, decision: dict | None = None) -> dict:
        self.orchestrator.decide(DECISION.validate_python(decision))
        return {"status": "OK"}

    def _handle_quarantined(self, quarantined: dict | None = None) -> dict:
        """``rqml_quarantined``: the scheduler's quarantine (name -> reason), in full."""
        names = {str(name): str(reason) for name, reason in (quarantined or {}).items()}
        self.quarantined.clear()  # in place: the seals hold this dict
        self.quarantined.update(names)
        return {"status": "OK"}

    def _starting_policy(self, worker: Worker, state_dir: Path) -> NodePolicy:
        """The policy the node enforces until its scheduler sends one: the one it saved, if
        it may be trusted (:class:`~rqml_dask.node.policy.PolicyGate`), else its initial one."""
        secure = str(worker.scheduler.address).startswith("pqtls://")
        if secure:
            credentials = Credentials.from_config()
            self.policy_gate = PolicyGate(PolicyVerifier.load(credentials.ca, credentials.crl))
        saved, dropped = self.policy_gate.saved(NodeOrchestrator.saved_policy(state_dir))
        if dropped is not None:
            logger.warning("%s", dropped)
            self._dropped_policy = dropped  # alerted once the scheduler hears (Dask drops events sent before)
        return saved or self.policy or NodePolicy()

    def _receive_policy(self, policy: Any = None) -> None:
        """``rqml-policy`` on the scheduler's batched stream: the policy to enforce from now
        on (:mod:`rqml_dask.node.policy`). One refused is logged and alerted, never raised:
        an exception here would end the worker's stream."""
        peer = peer_identity(getattr(self.worker.batched_stream, "comm", None))
        try:
            received = self.policy_gate.received(policy, str(peer["name"]) if peer is not None else None)
        except (ValidationError, SignatureError) as exc:
            logger.error("policy from the scheduler refused: %s", exc)
            self._alert("policy-refused", {"reason": str(exc)})
            return
        previous = self.orchestrator.policy
        self.orchestrator.set_policy(received)
        if (dropped := PolicyGate.replaced(previous, received)) is not None:
            logger.warning("%s", dropped)
        if (dropped := self._dropped_policy or dropped) is not None:
            self._dropped_policy = None
            self._alert("policy-dropped", {"reason": dropped, "version": received.version})

    @log_errors
    def _handle_progress(self, keys: list[str]) -> dict[str, int]:
        """``rqml_progress``: the iteration each of ``keys`` has reached here."""
        progress = self._progress()
        return {key: progress[key] for key in keys if key in progress}

    def _progress(self) -> dict[str, int]:
        """The iteration each task has reached here, by task key (a parked one: its last)."""
        iterations = self.orchestrator.iterations()
        with self._jobs_lock:
            for key, job in self.jobs.items():
                if job.outcome is not None:
                    iterations[key] = job.outcome.iterations
        return iterations


_install_lock = threading.Lock()


def current_node() -> NodePlugin:
    """The node plugin of the worker running the calling task, installed if it is missing."""
    worker = get_worker()
    with _install_lock:
        node = worker.plugins.get(PLUGIN_NAME)
        if node is None:
            sync(worker.loop, worker.plugin_add, NodePlugin(), catch_errors=False)
            node = worker.plugins[PLUGIN_NAME]
    return node
