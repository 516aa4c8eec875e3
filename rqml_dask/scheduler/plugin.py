"""The RQML scheduler plugin: weighted, late-binding placement and the supervision runtime.

Mechanism (chosen after reading ``distributed/scheduler.py`` and ``stealing.py``): an RQML
task carries an ``rqml`` annotation. In :meth:`update_graph`, before the scheduler's first
transition, the plugin restricts it to a worker name no worker has (``PENDING``): it waits in
``no-worker`` instead of binding to a worker at once. The plugin then *binds* pending tasks
itself, in priority order, whenever a node has inbound room (an idle node pulls): it draws a
node in proportion to its weight (:mod:`rqml_dask.scheduler.assignment`), restricts the task
to that node's address (strict: work stealing then never moves it) and asks the scheduler to
transition it ``no-worker -> processing``. This gives weighted choice and late binding with
one mechanism; resources would bind at once, and stealing cannot weigh reliability or warm
models. Releases run from the event loop (``add_callback``), never inside a transition.

Feedback: a task ending in ``memory`` counts as a success for its node, ``erred`` and a
worker lost while the task ran count as failures, and nodes report validation failures and
timeouts on the supervision topic; the reliability record decays, with exponential backoff
for a failing streak. A task handed back (its node pushed it back, rerouting, a dead
worker) is pending again and rebound, avoiding the node it left when another has room.

Supervision: nodes apply the policy this plugin sends them (escalate along the ladder, then
diversify to another model family, then end the task with a clear reason) and report every
decision on the ``supervision_events`` topic; the runtime records them per task, reroutes a
task to another node when its node reports it stuck there, and terminates tasks past the
policy's limits. The policy is the scheduler's (:mod:`rqml_dask.scheduler.policy`): numbered
and, over ``pqtls://``, signed here, sent to each node on its batched stream when it
registers and on every change; a task of a class no node can run under it fails with the
reason instead of waiting for ever.

Reconciliation: a node that kept working without a scheduler (an
:class:`~rqml_dask.node.worker.RQMLWorker` in degraded mode) reports, once registered again,
every job it has and every result in its outbox; :meth:`reconcile` settles each one so
that a task ends with exactly one accepted result: the first result accepted wins (a later
one is a duplicate, discarded, and an alert says so); a finished result beats a run still
going elsewhere, and of two runs the one further along goes on (the other is rerouted to
the node with the other job, or dropped there). The node with a task's job is preferred
when the task is (re)submitted, so a client that resubmits after the scheduler came back
joins the running work instead of starting it again.

Trust (``pqtls://``): the gatekeeper (:mod:`rqml_dask.scheduler.gatekeeper`) decides who may
register and call each handler; a node presents every result signed (``rqml_result``, and
with its reconciliation report), and :class:`~rqml_dask.scheduler.result_check.ResultCheck`
accepts it or the node is quarantined; a task that ends on a node without a result it
presented is not accepted either. Voters' verdicts count for the node whose result they
judged: results that keep losing votes lower its reliability down to quarantine.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.comm import CommClosedError
from distributed.core import normalize_address
from distributed.scheduler import TaskState, WorkerState
from distributed.utils import log_errors
from tornado.ioloop import PeriodicCallback
from pydantic import ValidationError
from dask.typing import Key

from rqml_dask import events
from rqml_dask.compat import fail_task, restrict_strictly
from rqml_dask.config import SchedulerSettings, result_settings, scheduler_settings, session_settings
from rqml_dask.messages import (
    DECISION, POLICY, POLICY_OP, PROGRESS, TASK_REPORTS, InvalidHeartbeat, NoCapableNode, NodeLink, NodePolicy, TaskProgress, TaskReport,
    TaskTraits, dask_key, delivered_as, read_heartbeat, read_policy, task_name,
)
from rqml_dask.key_guard import refusing_rqml_keys
from rqml_dask.node_installer import INSTALLER_NAME, NodeInstaller
from rqml_dask.scheduler.assignment import NodeTable
from rqml_dask.scheduler.gatekeeper import HANDLER_ROLES, Gatekeeper, only_roles
from rqml_dask.scheduler import policy as policies
from rqml_dask.scheduler.ledger import Ledger
from rqml_dask.scheduler.records import NODE_SERIES, NodeHistory, NodeRecord, Runs, TaskRecord, Trace, run_name_of_key
from rqml_dask.scheduler.reliability import Reliability
from rqml_dask.scheduler.result_check import ResultCheck, read_outcome
from rqml_dask.trust.ca import Authority
from rqml_dask.trust.session import SessionRenewer, leaf_certificate
from rqml_dask.trust.signing import SignatureError, Verifier
from rqml_dask.trust.transport import Credentials, present_own
from rqml_dask.trust.transport import peer_identity as identity

logger = logging.getLogger(__name__)

DATA_ERRORS = ("InputError(",)
"""Task errors (``repr`` of the exception, as Dask reports it) that blame the data, not the
node: they do not lower its reliability."""
PENDING = "rqml-pending"
"""The worker restriction that keeps an RQML task *pending* (in Dask's ``no-worker``) until the
plugin binds it to a node."""

PLUGIN_NAME = "rqml-scheduler"
TICK = "rqml-release"
"""The plugin's entry in ``scheduler.periodic_callbacks`` that brings the node table up to
date for the nodes that changed and binds pending tasks (every ``release_interval``)."""
HEARTBEAT_TICK = "rqml-heartbeat"
"""Its entry that goes over every node once per ``rqml.scheduler.heartbeat-interval``
(reliability decay, the nodes' history, the heartbeats and metrics topics)."""
LINK_FIGURES = tuple(f.name for f in fields(NodeLink))
STATUS_TASKS = 1000
"""``rqml_status`` details at most this many tasks unless asked for another ``limit``."""
SESSION_TICK = "rqml-session"
"""Its entry that renews the scheduler's own certificate from the CA it holds."""


class RQMLSchedulerPlugin(SchedulerPlugin):
    """The plugin (see the module docstring). Its cost follows what changed: a node's
    heartbeat figures are checked once, when the heartbeat arrives (Dask's
    ``heartbeat_worker`` handler, wrapped, and :meth:`add_worker`), and every
    ``release_interval`` :meth:`_tick` touches only the nodes that changed since the last
    one; what decays with time is refreshed for every node once per
    ``rqml.scheduler.heartbeat-interval`` (:meth:`_heartbeat`)."""

    name = PLUGIN_NAME

    def __init__(self, policy: NodePolicy | None = None, seed: int | None = None, release_interval: float = 0.1) -> None:
        self.settings: SchedulerSettings = scheduler_settings()
        self.policy = policy or NodePolicy()
        """The policy every node is sent; numbered (and signed) when the plugin starts."""
        self.credentials: Credentials | None = None
        """This scheduler's own (``pqtls://``): what it presents, signs policies and renews with,
        taken when it starts (later, ``rqml.trust`` may be a client's of the same process)."""
        """Whether this scheduler signs the policies it sends (``pqtls://``)."""
        self._policy_sent = False
        """Whether nodes are sent the policy yet (once every worker gets the node plugin)."""
        self._no_gpu_since: float | None = None
        """Since when GPU-only tasks have waited on a cluster with nodes but no GPU node."""
        self.rng = np.random.default_rng(seed)
        self.release_interval = release_interval
        self.tasks: dict[str, TaskRecord] = {}
        """The tasks Dask has, by task key."""
        self.finished: dict[str, TaskRecord] = {}
        """Tasks Dask forgot, by task key (the latest :attr:`SchedulerSettings.finished_kept`)."""
        self.runs = Runs()
        """Every record of :attr:`tasks` and :attr:`finished`, by run."""
        self.history = NodeHistory()
        """The mean of the nodes' figures at each of the plugin's heartbeats."""
        self.ledger = Ledger(self.settings.finished_kept, self.settings.reconcile_grace, self.settings.return_grace)
        self.nodes: dict[str, NodeRecord] = {}
        self.table = NodeTable(self.settings.speed_bounds, self.settings.gpu_preference)
        self._pending: list[tuple] = []
        self._counter = itertools.count()
        self._release_scheduled = False
        self._dirty: set[str] = set()
        """Nodes whose figures or reliability changed since the last :meth:`_tick`."""
        self._heard_from: set[str] = set()
        """Nodes whose heartbeat arrived since the last :meth:`_heartbeat`."""
        self._ticked_at = 0.0
        self.gatekeeper = Gatekeeper()
        self.session = session_settings()
        self.authority: Authority | None = None
        """The CA this scheduler issues session certificates from (``rqml.trust.session.authority``)."""
        self.result_check: ResultCheck | None = None
        """Checks the signed results nodes present, on a ``pqtls://`` scheduler; ``None`` elsewhere."""
        self.scheduler: Scheduler | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        handlers = {"rqml_status": self.status, "rqml_policy": self.handle_policy, "rqml_decide": self.handle_decision,
                    "rqml_reconcile": self.reconcile, "rqml_quarantine": self.handle_quarantine,
                    "rqml_session": self.handle_session, "rqml_result": self.handle_result}
        for name, handler in handlers.items():
            scheduler.handlers[name] = only_roles(handler, HANDLER_ROLES[name], name, self.gatekeeper)
        scheduler.handlers["register-worker"] = self.gatekeeper.guard_registration(
            scheduler.handlers["register-worker"], lambda name, reason: self._security_alert("registration-refused", name, reason))
        scheduler.handlers["heartbeat_worker"] = self._hear_heartbeats(scheduler.handlers["heartbeat_worker"])
        for door, keys_of in (("scatter", lambda kw: kw.get("data") or {}), ("update_data", lambda kw: kw.get("who_has") or {})):
            scheduler.handlers[door] = refusing_rqml_keys(scheduler.handlers[door], door, keys_of,
                                                          lambda who, reason: events.publish(scheduler, events.ALERTS, "data-refused", node_name=who,
                                                                                             reason=reason, security=True))
        for address in scheduler.workers:
            self.add_worker(scheduler, address)
        for name, tick, interval in ((TICK, self._tick, self.release_interval), (HEARTBEAT_TICK, self._heartbeat, self.settings.heartbeat_interval)):
            callback = PeriodicCallback(tick, interval * 1000)
            scheduler.periodic_callbacks[name] = callback
            callback.start()
        secure = any(address.startswith("pqtls://") for address in scheduler.listen_address.split(","))
        if secure:
            self.credentials = credentials = Credentials.from_config()
            present_own(scheduler, credentials)
        if self.session.authority is not None:
            self._start_authority(scheduler)
        if secure:
            results = result_settings()
            verifier = Verifier.load(credentials.ca, credentials.crl, self.gatekeeper.quarantined)  # the quarantine, shared
            self.result_check = ResultCheck(verifier, results.max_skew, results.remembered)
        self.policy = policies.issue(self.policy, None, credentials=self.credentials)
        if secure:  # over tcp:// there is no identity to check: Dask's handlers stay as they are
            self.gatekeeper.guard_doors(scheduler)  # Dask's own handlers too, once every wrapper above is in place
        # every worker, now and later, becomes a node (a bare `dask worker` included)
        await scheduler.register_worker_plugin(None, dumps(NodeInstaller()), name=INSTALLER_NAME, idempotent=True)
        self._policy_sent = True  # from now on every worker has the node plugin's stream handler
        self._send_policy(list(self.nodes))

    def _start_authority(self, scheduler: Scheduler) -> None:
        """Hold the CA to issue session certificates, and renew this scheduler's own from it
        (over ``pqtls://``)."""
        self.authority = Authority.load(Path(self.session.authority), os.environ.get("RQML_CA_PASSPHRASE"))
        if self.credentials is None:  # not over pqtls://
            return
        credentials = self.credentials

        async def issue_own(request: str) -> str:
            return self.authority.session(x509.load_pem_x509_csr(request.encode()), leaf_certificate(credentials),
                                          self.session.lifetime).decode()

        renewer = SessionRenewer(credentials, issue_own, self.session.renew_when_left)
        callback = PeriodicCallback(renewer.check, self.session.check_interval * 1000)
        scheduler.periodic_callbacks[SESSION_TICK] = callback
        callback.start()

    def _hear_heartbeats(self, heartbeat_worker: Any) -> Any:
        """Wrap Dask's ``heartbeat_worker`` handler: once Dask has taken a heartbeat, the node's
        figures are checked and kept (:meth:`_heard`)."""

        def heartbeat(**message: Any) -> dict[str, Any]:
            answer = heartbeat_worker(**message)
            if answer.get("status") == "OK":
                address = normalize_address(self.scheduler.coerce_address(message["address"], message.get("resolve_address", True)))
                self._heard(address, message["metrics"].get("rqml"))
            return answer

        return heartbeat

    async def close(self) -> None:
        for name in (TICK, HEARTBEAT_TICK, SESSION_TICK):
            if self.scheduler is not None and (callback := self.scheduler.periodic_callbacks.pop(name, None)) is not None:
                callback.stop()

    def restart(self, scheduler: Scheduler) -> None:
        """``Client.restart``: every task is gone, so is what the plugin knew of them; the
        nodes, their reliability and the ledger of accepted results stay."""
        for record in self.tasks.values():
            self._keep_finished(record)
        self.tasks.clear()
        self._pending.clear()
        for node in self.nodes.values():
            node.bound.clear()
            self._update_room(node)

    # -- scheduler hooks -------------------------------------------------------------------

    def update_graph(self, scheduler: Scheduler, *, annotations: dict, tasks: list, stimulus_id: str, **kwargs: Any) -> None:
        for dask_key, info in annotations.get("rqml", {}).items():
            ts = scheduler.tasks.get(dask_key)
            if ts is None or ts.state not in ("released", "waiting"):
                continue
            traits = TaskTraits(**info)
            record = self.tasks.get(traits.key)
            if record is not None and record.dask_key != dask_key and record.state in ("pending", "bound"):
                # the same task submitted again while its earlier submission runs (another
                # client, or another output): Dask places it, and the node that gets it joins
                # the running job there
                logger.info("task %s submitted again as %s: placed by Dask", traits.key, dask_key)
                continue
            restrict_strictly(ts)
            if record is None or record.dask_key != dask_key:  # new, or a new submission of one that ended
                if record is not None:
                    self._keep_finished(record)
                record = self.tasks[traits.key] = TaskRecord(traits, ts.key)
                self.runs.add(record)
            self._make_pending(record, ts)
            events.publish(scheduler, events.TASK_INBOUND, "pending", task_id=traits.task_id, key=traits.key)
        self._schedule_release()

    def _record_of_dask_key(self, dask_key: Key) -> TaskRecord | None:
        """The record managing the Dask task ``dask_key`` (:func:`~rqml_dask.messages.dask_key`)."""
        if not (isinstance(dask_key, tuple) and len(dask_key) == 3 and dask_key[0] == "rqml"):
            return None
        record = self.tasks.get(dask_key[1])
        return record if record is not None and record.dask_key == dask_key else None

    def transition(self, key: Key, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        record = self._record_of_dask_key(key)
        if record is None:
            return
        if finish == "forgotten":
            del self.tasks[record.traits.key]
            self._keep_finished(record)
            return
        now = time.monotonic()
        node = self.nodes.get(record.worker) if record.worker is not None else None
        if start == "processing" and node is not None:
            node.bound.discard(record.traits.key)
            self._update_room(node)
        if start == "processing" and finish == "memory":
            if self.result_check is not None and (record.verified_by is None or record.verified_by != record.worker):
                # a node that returned a result without proving it: shut out, and the
                # result, which only it holds, is computed again elsewhere
                self.runs.set_state(record, "bound")
                self._quarantine(record.worker, self._name(record.worker),
                                 f"returned a result of {record.traits.task_id} without presenting it signed")
                return
            self.runs.set_state(record, "done")
            self.ledger.accept(record.traits.key, record.worker)
            if node is not None:
                node.completed += 1
                if not record.failed_here:  # a result its node reported invalid is no success
                    node.reliability.success(now)
                    self._note_reliability(node, now)
        elif start == "processing" and finish == "erred":
            self.runs.set_state(record, "erred")
            if not str(kwargs.get("exception_text", "")).startswith(DATA_ERRORS):  # bad input is not the node's fault
                self._failure(record.worker, now)
        elif finish in ("released", "waiting", "no-worker") and record.state != "pending":
            # handed back by its node, its worker died, or its result was lost with a worker:
            # pending again, to be bound elsewhere if another node has room
            if start == "processing" and record.worker is not None:
                record.avoid |= {record.worker}
            self._make_pending(record, self.scheduler.tasks.get(key))
        else:
            return
        self._schedule_release()

    def _keep_finished(self, record: TaskRecord) -> None:
        """Keep a forgotten task's record for ``rqml status`` (bounded); one its clients let go
        of before it ended is ``released``, not pending or bound any more."""
        if record.state in ("pending", "bound"):
            self.runs.set_state(record, "released")
            record.worker = None
        if (earlier := self.finished.pop(record.traits.key, None)) not in (None, record):  # kept in order of forgetting
            self.runs.discard(earlier)
        self.finished[record.traits.key] = record
        while len(self.finished) > self.settings.finished_kept:
            self.runs.discard(self.finished.pop(next(iter(self.finished))))

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        """A node registered: its record, and the figures of the heartbeat it registered with
        (Dask takes that one itself, not through the ``heartbeat_worker`` handler)."""
        if worker not in self.nodes:
            self.nodes[worker] = NodeRecord(worker, Reliability(**asdict(self.settings.reliability)))
            self.table.add(worker)
            self._update_room(self.nodes[worker])
            self._send_policy([worker])
            if self.gatekeeper.quarantined:
                scheduler.loop.add_callback(self._push_quarantine, worker)
        ws = scheduler.workers.get(worker)
        self._heard(worker, ws.metrics.get("rqml") if ws is not None else None)
        self.ledger.node_registered(worker, self.nodes[worker].figures.link, time.monotonic())
        self._schedule_release()

    def remove_worker(self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        node = self.nodes.pop(worker, None)
        self.table.remove(worker)
        self._dirty.discard(worker)
        self._heard_from.discard(worker)
        self.ledger.node_left(worker)
        if node is not None and node.bound:
            logger.info("node %s lost with %d RQML tasks", worker, len(node.bound))

    def fail_waiting(self, reason: str) -> int:
        """End every RQML task still waiting for a node (pending) as erred with
        :class:`~rqml_dask.messages.NoCapableNode` (``reason``): what the process that started
        the cluster does when its nodes cannot start (a batch job that ends before its node
        registers, again and again), so that the run fails saying why instead of waiting for
        ever. Tasks bound to a node go on. Returns how many were ended."""
        ended = 0
        for record in [r for r in self.tasks.values() if r.state == "pending"]:
            ts = self.scheduler.tasks.get(record.dask_key)
            if ts is None or ts.state != "no-worker":
                continue
            self.runs.set_state(record, "erred")
            fail_task(self.scheduler, ts.key, NoCapableNode(reason), f"rqml-nodes-cannot-start-{time.time()}")
            ended += 1
        if ended:
            events.publish(self.scheduler, events.ALERTS, "nodes-cannot-start", reason=reason, tasks=ended)
        return ended

    def valid_workers_downscaling(self, scheduler: Scheduler, workers: list[WorkerState]) -> list[WorkerState]:
        """Which of ``workers`` Dask may retire when it scales down (``cluster.adapt``,
        ``workers_to_close``): none that holds a refining RQML task. A node retired when idle
        stops as every node does, its checkpoint writers flushed first."""
        return [ws for ws in workers if not ((node := self.nodes.get(ws.address)) is not None and node.bound)]

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == events.TASK_RESULTS and isinstance(msg, dict):
            record = self.tasks.get(msg.get("key")) or self.finished.get(msg.get("key"))
            if record is not None and record.worker == msg.get("worker"):  # Dask sets "worker" from the connection
                record.result_state = msg.get("state")
                record.reused = msg.get("kind") == "reused"
                self._record_result(record, msg.get("progress"))
            return
        if topic != events.SUPERVISION or not isinstance(msg, dict):
            return
        record = self.tasks.get(msg.get("key"))
        if record is not None:
            record.decided(msg)
        switched = msg.get("to_model") if msg.get("kind") == "escalated" else msg.get("model") if msg.get("kind") == "diversified" else None
        held = record or self.finished.get(msg.get("key"))
        if isinstance(switched, str) and held is not None and held.worker == msg.get("worker"):  # only its own node says
            held.model = switched
        if msg.get("kind") in ("validation_failed", "timeout") and msg.get("worker") in self.nodes:
            self._failure(msg["worker"], time.monotonic())
            if record is not None and record.worker == msg["worker"]:
                record.failed_here = True

    # -- placement -------------------------------------------------------------------------

    def _make_pending(self, record: TaskRecord, ts: TaskState | None) -> None:
        """Keep ``record``'s task (Dask's ``ts``) pending until :meth:`_release` binds it to a node.
        Called from :meth:`transition` too: a task handed back must be restricted before the
        scheduler's next transition would bind it to any worker. What its node presented
        (:attr:`TaskRecord.verified_by`) stays: a node that presented the signed result of this
        submission and runs it again (Dask took it back while it finished, and gave it back)
        may deliver that result without presenting it twice; the client checks what it gets."""
        if ts is not None:
            self.scheduler.set_restrictions({ts.key: PENDING})
        if record.worker is not None and (node := self.nodes.get(record.worker)) is not None:
            node.bound.discard(record.traits.key)  # it may come back without having run there
            self._update_room(node)
        self.runs.set_state(record, "pending")
        record.worker = None
        traits = record.traits
        heapq.heappush(self._pending, (-traits.priority, -traits.difficulty, next(self._counter), traits.key))

    def _schedule_release(self) -> None:
        if not self._release_scheduled and self.scheduler is not None:
            self._release_scheduled = True
            self.scheduler.loop.add_callback(self._release)

    @log_errors
    def _tick(self) -> None:
        """Every ``release_interval``: bring the node table up to date for the nodes that
        changed since the last tick (:meth:`_refresh_nodes`), then bind pending tasks."""
        self._refresh_nodes()
        self._note_gpu_nodes()
        self._release()

    def _quarantine(self, address: str, name: str, reason: str) -> None:
        """Shut a node out: it is removed (Dask rebinds its tasks elsewhere, and results
        only it held are computed again) and may not register again under its name."""
        self.scheduler.loop.add_callback(self._shut_out, address, name, reason)

    async def _shut_out(self, address: str, name: str, reason: str) -> None:
        """:meth:`_quarantine`, done when this returns."""
        if name in self.gatekeeper.quarantined:
            return
        self.gatekeeper.quarantined[name] = reason
        self._security_alert("node-quarantined", name, reason, worker=address)
        self._tell_quarantine()
        if address in self.scheduler.workers:
            # expected: its tasks are not suspect (Dask would fail one whose workers keep dying)
            await self.scheduler.remove_worker(address=address, close=True, expected=True,
                                               stimulus_id=f"rqml-quarantine-{time.time()}")

    def _security_alert(self, kind: str, name: str, reason: str, **extra: Any) -> None:
        logger.warning("%s: %s: %s", kind, name, reason)
        events.publish(self.scheduler, events.ALERTS, kind, node_name=name, reason=reason, security=True, **extra)

    @log_errors
    def _heartbeat(self) -> None:
        """Every ``rqml.scheduler.heartbeat-interval``, over every node: quarantine those whose
        certificates stopped being valid (and end other peers' connections); refresh each one's reliability in the table (it
        decays with time); keep a sample of its figures (:attr:`NodeRecord.history`, the
        Nodes page), and of their mean (:attr:`history`). The figures of the nodes heard from
        since the last pass go on ``heartbeats``; the cluster's task counts (of every task the
        plugin holds, as ``rqml_status`` counts them) on ``metrics``."""
        for address, name, reason in self.gatekeeper.invalid_peers(self.scheduler):
            self._quarantine(address, name, reason)
        self.gatekeeper.sweep(self.scheduler)  # clients' connections too
        now, wall = time.monotonic(), time.time()
        samples = np.full((len(self.nodes), len(NODE_SERIES)), np.nan, np.float32)
        for row, (address, node) in zip(samples, self.nodes.items()):
            f = node.figures
            reliability = self._note_reliability(node, now)
            device = math.nan if f.device_memory_fraction is None else f.device_memory_fraction
            row[:] = (f.iterations_per_second, f.inbound + f.refining, f.host_memory_fraction, device, reliability)
            node.history.append(wall, row)
            if address not in self._heard_from:
                continue
            events.publish(self.scheduler, events.HEARTBEATS, "node", node=address, inbound=f.inbound, refining=f.refining,
                           outbound=f.outbound, busy_fraction=f.busy_fraction, iterations_per_second=f.iterations_per_second,
                           concurrency_limit=f.concurrency_limit, host_memory_fraction=f.host_memory_fraction,
                           device_memory_fraction=f.device_memory_fraction, reliability=reliability, link=f.link.status,
                           invalid_figures=node.invalid_figures)
        self._heard_from.clear()
        if len(samples):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a series no node reports (GPU memory on CPU nodes) stays NaN
                self.history.append(wall, np.nanmean(samples, axis=0))
        events.publish(self.scheduler, events.METRICS, "cluster", nodes=len(self.nodes), tasks=self.runs.counts(),
                       iterations_per_second=float(samples[:, 0].sum()))

    @log_errors
    def _release(self) -> None:
        """Bind pending tasks, highest priority first, to nodes with inbound room. A task that
        cannot be placed, for any reason (an exception included, logged), stays pending."""
        self._release_scheduled = False
        if not self._pending or not self.scheduler.running or (self.table.room.max(initial=0) <= 0 and not self.ledger.jobs):
            return  # nothing to place, or nowhere to place it (a task joins its job's node without room)
        scheduler = self.scheduler
        recommendations: dict = {}
        skipped = []
        # Nodes in backoff, nodes whose figures were refused, and slow nodes in the tail of a
        # run get nothing new while another node Dask runs tasks on can take the work; nodes
        # Dask does not run tasks on get nothing (found as they are drawn, in _place).
        now = time.monotonic()
        blocked = (now < self.table.backoff_until) | self.table.refused
        if len(self._pending) < len(self.table.addresses):
            blocked |= self._slow()
        if not any(self._running(self.table.addresses[i]) for i in np.flatnonzero(~blocked)):  # the first one, as a rule
            blocked[:] = False
        awaiting = self.ledger.waiting_for_nodes(now)
        saved_room = self.table.room.copy()
        self.table.room[blocked] = 0
        try:
            while self._pending:
                entry = heapq.heappop(self._pending)
                try:
                    placed = self._place(entry, blocked, awaiting)
                except Exception:
                    logger.exception("could not place RQML task %s; it stays pending", entry[-1])
                    placed = "wait"
                if placed == "wait":
                    skipped.append(entry)
                elif placed == "full":
                    skipped.append(entry)
                    break  # no node has room: the rest waits too
                elif placed is not None:
                    recommendations[placed.dask_key] = "processing"
        finally:
            for entry in skipped:
                heapq.heappush(self._pending, entry)
            self.table.room = np.where(blocked, saved_room, self.table.room)
        if recommendations:
            scheduler.transitions(recommendations, stimulus_id=f"rqml-release-{time.time()}")
            for dask_key in recommendations:  # the scheduler may refuse (the node left meanwhile)
                ts, record = scheduler.tasks.get(dask_key), self._record_of_dask_key(dask_key)
                if record is not None and (ts is None or ts.processing_on is None or ts.processing_on.address != record.worker):
                    node = self.nodes.get(record.worker)
                    if node is not None:
                        node.bound.discard(record.traits.key)
                        self._update_room(node)
                    if ts is not None and ts.state == "no-worker":
                        self._make_pending(record, ts)

    def _running(self, address: str) -> bool:
        """Whether Dask runs tasks on ``address`` (not still registering, paused or closing)."""
        ws = self.scheduler.workers.get(address)
        return ws is not None and ws in self.scheduler.running

    def _place(self, entry: tuple, blocked: np.ndarray, awaiting: bool) -> TaskRecord | str | None:
        """Bind the pending task of heap ``entry`` to a node: its record once bound; ``"wait"`` if
        it stays pending, ``"full"`` if it stays pending and no node has room; ``None`` if it is no
        longer pending (done, forgotten, or bound meanwhile). A node Dask does not run tasks on,
        found when drawn, gets no room until the release ends (marked in ``blocked``)."""
        record = self.tasks.get(entry[-1])
        ts = self.scheduler.tasks.get(record.dask_key) if record is not None else None
        if record is None or record.state != "pending" or ts is None or ts.state != "no-worker":
            if record is not None and record.state == "pending" and ts is not None and ts.state in ("waiting", "released"):
                return "wait"  # not runnable yet
            return None
        if self._gpu_only(record.traits) and not self.table.gpu.any():
            return self._without_capable_node(record, ts)
        job_node = self.ledger.jobs.get(record.traits.key)
        if job_node in self.nodes and self._running(job_node):
            address = job_node  # the node already refines it (or has its result): join it there
        elif awaiting:
            return "wait"  # a node that may have its job has not reported yet
        else:
            # a task that depends on results (a vote) goes to a node not holding them
            result_holders = frozenset(ws.address for dts in ts.dependencies for ws in dts.who_has)
            while (address := self.table.choose(record.traits, self.rng, self._gpu_only(record.traits), record.avoid,
                                                result_holders)) is not None and not self._running(address):
                i = self.table.index[address]
                blocked[i], self.table.room[i] = True, 0
        if address is None:
            # this task's nodes are full (e.g. GPU only): others may still fit
            return "full" if self.table.room.max(initial=0) <= 0 else "wait"
        self.runs.set_state(record, "bound")
        record.worker, record.failed_here = address, False
        record.attempts += 1
        self.scheduler.set_restrictions({ts.key: address})
        node = self.nodes[address]
        node.bound.add(record.traits.key)
        self._update_room(node)
        return record

    def _gpu_only(self, traits: TaskTraits) -> bool:
        return traits.task_class in self.policy.gpu_classes

    def _note_gpu_nodes(self) -> None:
        """Keep since when the cluster has had nodes but none with a GPU."""
        if self.table.gpu.any() or not self.nodes:
            self._no_gpu_since = None
        elif self._no_gpu_since is None:
            self._no_gpu_since = time.monotonic()

    def _without_capable_node(self, record: TaskRecord, ts: TaskState) -> str | None:
        """A GPU-only task on a cluster without a GPU node: it waits
        (``"wait"``) while that has lasted less than ``rqml.scheduler.capable-node-grace``,
        then fails with the reason (:class:`~rqml_dask.messages.NoCapableNode`; ``None``)."""
        waited = time.monotonic() - self._no_gpu_since if self._no_gpu_since is not None else 0.0
        if waited < self.settings.capable_node_grace:
            return "wait"
        reason = policies.no_capable_node(self.policy, record.traits.task_class, len(self.nodes), waited)
        logger.warning("%s: %s", record.traits.task_id, reason)
        self.runs.set_state(record, "erred")
        fail_task(self.scheduler, ts.key, NoCapableNode(reason), f"rqml-no-capable-node-{time.time()}")
        events.publish(self.scheduler, events.ALERTS, "no-capable-node", task_id=record.traits.task_id, key=record.traits.key,
                       reason=reason)
        return None

    def _slow(self) -> np.ndarray:
        """Which nodes are slow: below ``rqml.scheduler.tail-speed-ratio`` of the fastest."""
        return self.table.speed < self.settings.tail_speed_ratio * self.table.speed.max(initial=0)

    def _capacity(self, node: NodeRecord) -> int:
        """Tasks a node may hold: what it refines at once, plus one queued if it is not slow
        (a task queued on a slow node would wait there while faster nodes free up)."""
        i = self.table.index.get(node.address)
        slow = i is not None and self.table.speed[i] < self.settings.tail_speed_ratio * self.table.speed.max()
        return node.figures.concurrency_limit + (0 if slow else self.settings.queued_per_node)

    def _update_room(self, node: NodeRecord) -> None:
        i = self.table.index.get(node.address)
        if i is not None:
            self.table.room[i] = max(self._capacity(node) - len(node.bound), 0)
            self.table.free[i] = max(node.figures.concurrency_limit - len(node.bound), 0)

    def _note_reliability(self, node: NodeRecord, now: float) -> float:
        """Write ``node``'s reliability score and backoff into the table; the score."""
        score = node.reliability.score(now)
        if (i := self.table.index.get(node.address)) is not None:
            self.table.reliability[i] = score
            self.table.backoff_until[i] = node.reliability.backoff_until
        return score

    def _failure(self, worker: str, now: float) -> None:
        node = self.nodes.get(worker)
        if node is not None:
            node.reliability.failure(now)
            node.failed += 1
            self._note_reliability(node, now)

    def _heard(self, address: str, raw: Any) -> None:
        """A heartbeat of the node ``address`` arrived with the figures ``raw`` (its ``rqml``
        metric; none before its node plugin is installed): check them, once. Valid figures are
        kept on its record, and the progress of the tasks bound to it taken into theirs;
        invalid ones are refused, said once (an ``invalid-figures`` alert) and the node rests
        at once, until its figures pass again. The models warm on it count at once too (where
        they changed: what ``rqml_status`` shows is what places tasks). Either way the node is
        marked for the next :meth:`_tick`, which brings the rest of its row of the table up to date."""
        node = self.nodes.get(address)
        if node is None or not raw:
            return
        try:
            heartbeat = read_heartbeat(raw)
        except InvalidHeartbeat as exc:
            if node.invalid_figures != str(exc):
                logger.warning("node %s sent invalid heartbeat figures, not used: %s", address, exc)
                events.publish(self.scheduler, events.ALERTS, "invalid-figures", worker=address, error=str(exc))
            node.invalid_figures = str(exc)
            if (i := self.table.index.get(address)) is not None:
                self.table.refused[i] = True  # it rests from now, not from the next tick: no task is bound to it meanwhile
        else:
            node.invalid_figures = None
            self._record_progress(address, heartbeat.progress)
            if heartbeat.warm_models != node.figures.warm_models and address in self.table.index:
                self.table.set_warm(address, heartbeat.warm_models)  # placement knows at once what rqml_status shows
            node.figures = replace(heartbeat, progress={})
        self._dirty.add(address)
        self._heard_from.add(address)

    def _refresh_nodes(self) -> None:
        """Bring the node table up to date for the nodes marked since the last call (a
        heartbeat arrived) and those whose backoff ended meanwhile; relative speeds (and the
        room of a node whose speed made it slow, or no longer slow) follow."""
        now = time.monotonic()
        ended = np.flatnonzero((self.table.backoff_until > self._ticked_at) & (self.table.backoff_until <= now))
        self._ticked_at = now
        dirty, self._dirty = self._dirty.union(self.table.addresses[i] for i in ended), set()
        rates = {}
        for address in dirty:
            node, i = self.nodes.get(address), self.table.index.get(address)
            if node is None or i is None:
                continue
            refused = node.invalid_figures is not None
            self.table.refused[i] = refused
            rates[address] = 0.0 if refused else node.figures.iterations_per_second
            if not refused:
                self.table.set_warm(address, node.figures.warm_models)
                self.table.gpu[i] = node.figures.gpu_count > 0
            self._note_reliability(node, now)
            self._update_room(node)
        if rates:
            slow = self._slow()
            self.table.set_speeds(rates)
            for i in np.flatnonzero(slow != self._slow()):
                self._update_room(self.nodes[self.table.addresses[i]])

    def _record_progress(self, address: str, progress: dict[str, TaskProgress]) -> None:
        """Keep what ``address`` reports of the tasks bound to it (only its own node speaks
        for a task), each check once."""
        for key, reported in progress.items():
            record = self.tasks.get(key)
            if record is None or record.worker != address:
                continue
            self.runs.set_iteration(record, max(record.iteration, reported.iteration))
            if record.trace is None:
                record.trace = Trace()
            record.trace.add(reported)

    def _record_result(self, record: TaskRecord, raw: Any) -> None:
        """Keep the figures its node sent with ``record``'s result (its iteration, model and
        convergence checks, those of the run that computed it where it was reused), checked
        as a heartbeat's progress is; figures that do not pass are left out."""
        try:
            progress = PROGRESS.validate_python(raw)
        except ValidationError:
            logger.warning("the result of %s came with invalid figures, not shown: %.200s", record.traits.task_id, raw)
            return
        self.runs.set_iteration(record, max(record.iteration, progress.iteration))
        if progress.trace:
            record.model = progress.trace[-1][1]
            if record.trace is None:
                record.trace = Trace()
            record.trace.add(progress)

    # -- handlers --------------------------------------------------------------------------

    @log_errors
    def status(self, comm: Any = None, limit: int = STATUS_TASKS, offset: int = 0, run: str | None = None,
               state: str | None = None) -> dict[str, Any]:
        """``rqml_status``: the cluster as the plugin sees it, of a bounded size at any number of tasks.

        * ``nodes``: every node's weight figures, reliability, queues, iteration rate, warm
          models, link, whether its figures were refused, and the version of the policy it
          enforces (``policy_version``, from its latest heartbeat);
        * ``counts``: how many tasks are in each state (``pending``, ``bound``, ``done``,
          ``erred``, ``released``): of the run ``run`` if given, else of every run;
        * ``runs``: for each of those runs (the latest submitted last), its number of tasks
          and the sum of their iterations;
        * ``tasks``: by task key, the details (task id, state, node, attempts, iteration,
          model, decisions) of at most ``limit`` of those tasks, only those in state ``state``
          if given: the open ones first (bound, then pending), then the others by state,
          each state's in the order they came to it, from the ``offset``-th on;
        * ``total``: how many tasks ``tasks`` was taken from (``offset`` and ``limit`` page
          through them);
        * ``policy`` (the scheduler's, as :func:`~rqml_dask.scheduler.policy.summary` shows
          it) and ``quarantined`` (node name -> reason).
        """
        now = time.monotonic()
        nodes = {address: self._node_status(address, node, now) for address, node in self.nodes.items()}
        runs = {name: found for name in ([run] if run is not None else self.runs.names()) if (found := self.runs.get(name)) is not None}
        counts = self.runs.counts() if run is None else runs[run].counts() if runs else {}
        order = ["bound", "pending", *sorted(set(counts) - {"bound", "pending"})]
        groups = [group for name in order if state in (None, name) for found in runs.values() if (group := found.by_state.get(name))]
        shown = itertools.islice(itertools.chain.from_iterable(group.values() for group in groups), max(offset, 0), max(offset, 0) + max(limit, 0))
        tasks = {
            r.traits.key: {"task_id": r.traits.task_id, "state": r.state, "node": r.worker, "attempts": r.attempts,
                           "iteration": r.iteration, "model": r.model or r.traits.model, "decisions": [d.get("kind") for d in r.decisions]}
            for r in shown
        }
        return {"nodes": nodes, "counts": counts, "runs": {name: {"tasks": len(found.records), "iterations": found.iterations}
                                                           for name, found in runs.items()},
                "tasks": tasks, "total": sum(map(len, groups)), "policy": policies.summary(self.policy),
                "quarantined": dict(self.gatekeeper.quarantined)}

    def _node_status(self, address: str, node: NodeRecord, now: float) -> dict[str, Any]:
        i, f = self.table.index.get(address), node.figures
        return {
            "room": float(self.table.room[i]) if i is not None else 0.0,
            "speed": float(self.table.speed[i]) if i is not None else 0.0,
            "reliability": node.reliability.score(now),
            "in_backoff": now < node.reliability.backoff_until,
            "bound": len(node.bound),
            "completed": node.completed,
            "failed": node.failed,
            "queues": {"inbound": f.inbound, "refining": f.refining, "outbound": f.outbound},
            "iterations_per_second": f.iterations_per_second,
            "warm_models": list(f.warm_models),
            "policy_version": f.policy_version,
            "gpu_count": f.gpu_count,
            "checkpoint_backlog": f.checkpoints.pending,
            "link": {name: getattr(f.link, name) for name in LINK_FIGURES},
            "invalid_figures": node.invalid_figures,
            "identity": self._identity(address),
        }

    def _identity(self, address: str) -> dict[str, Any] | None:
        """Who ``address`` authenticated as, and when its certificate (or its latest renewal) expires."""
        comm = getattr(self.scheduler.stream_comms.get(address), "comm", None)
        peer = identity(comm)
        if peer is None:
            return None
        session = self.gatekeeper.sessions.get(str(peer["name"]))
        expires = max(comm.peer_certificate.not_valid_after_utc, session.not_valid_after_utc if session else comm.peer_certificate.not_valid_after_utc)
        return {**peer, "expires": expires.timestamp(), "renewed": session is not None}

    @log_errors
    def handle_quarantine(self, comm: Any = None, release: str | None = None) -> dict[str, str]:
        """The nodes in quarantine (name -> reason), after releasing ``release`` if given (it
        may register again; a node whose certificate is revoked is still refused by TLS)."""
        if release is not None:
            if self.gatekeeper.quarantined.pop(release, None) is None:
                raise KeyError(f"node {release!r} is not in quarantine")
            self._security_alert("node-released", release, "released from quarantine")
            self._tell_quarantine()
        return dict(self.gatekeeper.quarantined)

    async def handle_session(self, comm: Any = None, csr: str = "") -> str:
        """``rqml_session``: a session certificate (PEM chain) for the key of ``csr``, with
        the name, role and hosts of the certificate the calling node authenticated with,
        valid for ``rqml.trust.session.lifetime`` (:mod:`rqml_dask.trust.session`). Refused
        (``PermissionError``, and a security alert) to a peer that is not a registered node
        in good standing, and where this scheduler holds no CA."""
        holder = getattr(comm, "peer_certificate", None)
        if holder is None:
            raise PermissionError("rqml_session: session certificates are issued over pqtls:// only")
        name = str(comm.peer_name)
        if self.authority is None:
            raise PermissionError("rqml_session: this scheduler issues no session certificates "
                                  "(Dask config rqml.trust.session.authority is unset)")
        reason = self.gatekeeper.session_refusal(name, holder, {str(ws.name) for ws in self.scheduler.workers.values()})
        if reason is not None:
            self._security_alert("session-refused", name, reason)
            raise PermissionError(f"rqml_session: {reason}")
        try:
            request = x509.load_pem_x509_csr(csr.encode())
        except ValueError as exc:
            raise ValueError(f"rqml_session: the request of {name} cannot be read: {exc}") from None
        chain = self.authority.session(request, holder, self.session.lifetime)
        self.gatekeeper.sessions[name] = x509.load_pem_x509_certificates(chain)[0]
        logger.info("issued %s a session certificate valid until %s", name, self.gatekeeper.sessions[name].not_valid_after_utc)
        return chain.decode()

    @log_errors
    async def handle_result(self, comm: Any = None, key: str = "", submission: str = "", outcome: dict | None = None) -> dict[str, str]:
        """``rqml_result``: the signed outcome of the task ``key`` for the client's
        ``submission`` (the Dask task ``("rqml", key, submission)``), presented by the node
        running it before its Dask task ends. ``{"status": "OK"}`` once it passes
        :class:`ResultCheck`; ``{"status": "stale", ...}`` if that Dask task is no longer
        running there (Dask released it meanwhile: the result is not taken, and that is no
        fault); else the node is quarantined (removed before this answers, so its Dask task's
        end is not taken: the task runs again elsewhere) and the answer is ``{"status":
        "refused", "reason": ...}``. Over ``tcp://`` there is nothing to check."""
        peer = identity(comm)
        if self.result_check is None or peer is None:
            return {"status": "OK"}
        name = str(peer["name"])
        address = next((a for a, ws in self.scheduler.workers.items() if str(ws.name) == name), None)
        if address is None:
            return {"status": "refused", "reason": f"{name} is not a registered node"}
        ws, record, dask_task = self.scheduler.workers[address], self.tasks.get(key), dask_key(key, str(submission))
        if self.scheduler.tasks.get(dask_task) not in ws.processing:  # released meanwhile: not taken, no fault
            return {"status": "stale", "reason": f"{task_name(key)} is not running on {name} for that submission any more"}
        try:
            parsed = read_outcome(outcome, key)
            self.result_check.check(parsed, key, name, live=True, signed_for=delivered_as(key, str(submission)))
        except SignatureError as exc:
            reason = f"result refused: {exc}"
            self._security_alert("result-refused", name, reason, key=key, task_id=task_name(key))
            await self._shut_out(address, name, reason)
            return {"status": "refused", "reason": reason}
        if record is not None and record.dask_key == dask_task:
            record.verified_by = address
        if parsed.vote is not None:
            self._count_vote(parsed.vote, address)
        return {"status": "OK"}

    def _count_vote(self, vote: dict[str, Any], voter: str) -> None:
        """A voter's verdict on the result of the task ``vote["of"]``, counted for the node
        whose accepted result that was (the ledger says which, not the vote), unless it is the
        voter itself, in the streak of that task's run (pipeline name) and the vote's
        tolerance: a lost vote lowers its reliability, and the one that makes
        ``rqml.scheduler.lost-votes`` in a row in one streak quarantines it while another
        node's results pass theirs in that streak (when every node loses, the tolerance is at
        fault, not the nodes). A streak never carries into another run or tolerance, and an
        old streak never quarantines a node that lost no new vote."""
        of = str(vote.get("of"))
        holder = self.ledger.accepted.get(of)
        node = self.nodes.get(holder) if holder is not None else None
        if node is None or holder == voter:
            return
        streak = (run_name_of_key(of), float(vote.get("tolerance") or 0.0))
        if vote.get("agreed") is True:
            node.lost_votes.pop(streak, None)
            node.won_votes[streak] = node.won_votes.get(streak, 0) + 1
        else:
            node.lost_votes[streak] = lost = node.lost_votes.get(streak, 0) + 1
            node.reliability.failure(time.monotonic())
            events.publish(self.scheduler, events.ALERTS, "vote-lost", node=holder, node_name=self._name(holder),
                           task_id=task_name(of), voter=voter, difference=vote.get("difference"), lost_in_a_row=lost)
        limit = self.settings.lost_votes
        if limit is None or node.lost_votes.get(streak, 0) < limit:
            return  # a node is quarantined on a vote it loses, never for an old streak
        passing = {address for address, other in self.nodes.items() if other.won_votes.get(streak) and not other.lost_votes.get(streak)}
        if passing - {holder}:
            self._quarantine(holder, self._name(holder), f"its results lost {node.lost_votes[streak]} cross-node votes in a row "
                                                         f"in run {streak[0]} while other nodes' results passed theirs")

    def _name(self, address: str) -> str:
        ws = self.scheduler.workers.get(address)
        return str(ws.name) if ws is not None else "?"

    def handle_policy(self, comm: Any = None, policy: dict | None = None) -> dict[str, Any]:
        """``rqml_policy``: adopt ``policy`` (when given) and return the policy
        (:func:`~rqml_dask.scheduler.policy.summary`). A new one is numbered (its ``version``
        is the scheduler's; a caller's is ignored), signed over ``pqtls://``, and sent to every
        node. Refused with :class:`~rqml_dask.messages.InvalidPolicy` naming the field: a
        field out of its bounds, or ``gpu_classes`` on a cluster whose nodes have no GPU."""
        if policy is not None:
            proposed = read_policy(policy)
            gpu_nodes = sum(node.figures.gpu_count > 0 for node in self.nodes.values())
            if (refused := policies.refusal(proposed, len(self.nodes), gpu_nodes)) is not None:
                raise refused
            self.policy = policies.issue(proposed, self.policy, credentials=self.credentials)
            logger.info("policy version %d adopted", self.policy.version)
            self._send_policy(list(self.nodes))
        return policies.summary(self.policy)

    @log_errors
    async def handle_decision(self, comm: Any = None, key: str = "", action: str = "", reason: str = "") -> dict[str, Any]:
        """Send a supervision decision (``escalate``, ``terminate``, ``reroute``) to the node
        refining the task ``key`` (``rqml status`` lists the keys); published on the
        supervision topic."""
        record = self.tasks.get(key)
        if record is None or record.state != "bound" or record.worker is None:
            return {"status": "error", "message": f"task {key!r} is not running on a node"}
        decision = {"key": key, "action": action, "reason": reason or "decided by the supervision runtime"}
        DECISION.validate_python(decision)
        events.publish(self.scheduler, events.SUPERVISION, "decision", node=record.worker, task_id=record.traits.task_id, **decision)
        await self.scheduler.rpc(record.worker).rqml_decide(decision=decision)
        return {"status": "OK", "node": record.worker}

    @log_errors
    async def reconcile(self, comm: Any = None, node: str = "", tasks: list[dict] | None = None) -> dict[str, str]:
        """Settle the tasks ``node`` reports after registering (each ``{key, iteration,
        finished}``). Verdicts, by task key: ``accept`` (write this finished
        result: it is the one), ``duplicate`` (another node's result was accepted: discard
        yours), ``keep`` (go on; the task is bound to you when submitted) or ``drop`` (another
        node is further along: stop). Published on the alerts topic. Over ``pqtls://``
        ``node`` must be the worker the calling certificate registered."""
        peer, worker = identity(comm), self.scheduler.workers.get(node)
        if peer is not None and (worker is None or str(worker.name) != peer["name"]):
            raise PermissionError(f"rqml_reconcile: {peer['name']} may not report for {node}")
        try:
            reports = TASK_REPORTS.validate_python(tasks or [])
        except ValidationError as exc:
            raise ValueError(f"reconciliation report from {node!r} refused: {exc}") from None
        self.ledger.node_reported(node)
        verdicts: dict[str, str] = {}
        for report in reports:
            key, task_id, finished = report.key, task_name(report.key), report.finished
            winner = self.ledger.accepted.get(key)
            if finished and peer is not None and self.result_check is not None and (refusal := self._unproven(report, peer["name"])):
                reason = f"result refused at reconciliation: {refusal}"
                self._security_alert("result-refused", peer["name"], reason, key=key, task_id=task_id)
                await self._shut_out(node, peer["name"], reason)
                return {}
            if winner is not None and winner != node:
                verdict = "duplicate" if finished else "drop"
                events.publish(self.scheduler, events.ALERTS, "duplicate-result" if finished else "duplicate-run",
                               key=key, task_id=task_id, kept=winner, discarded=node)
            else:
                verdict = "accept" if finished else "keep"
                record = self.tasks.get(key)
                if record is not None and record.state == "bound" and record.worker not in (None, node):
                    # bound elsewhere while this node was away: the run further along goes on
                    other = await self._progress(record.worker, key)
                    if finished or report.iteration > other:
                        events.publish(self.scheduler, events.ALERTS, "duplicate-run", key=key, task_id=task_id,
                                       kept=node, discarded=record.worker, iterations={node: report.iteration, record.worker: other})
                        await self._reroute(record, f"{node} has it further along")
                    else:
                        verdict = "drop"
                        events.publish(self.scheduler, events.ALERTS, "duplicate-run", key=key, task_id=task_id, kept=record.worker,
                                       discarded=node, iterations={node: report.iteration, record.worker: other})
                if verdict == "accept":
                    self.ledger.accept(key, node)
                if verdict in ("accept", "keep"):
                    self.ledger.jobs[key] = node  # an accepted result is returned from its node's store
            verdicts[key] = verdict
        counts = {v: list(verdicts.values()).count(v) for v in set(verdicts.values())}
        events.publish(self.scheduler, events.ALERTS, "reconciled", node=node, verdicts=counts)
        self._schedule_release()
        return verdicts

    def _unproven(self, report: TaskReport, name: str) -> str | None:
        """Why the finished result ``report`` carries does not prove itself (``None``: it does)."""
        if report.outcome is None:
            return f"reported {task_name(report.key)} finished without its signed result"
        try:
            self.result_check.check(read_outcome(report.outcome, report.key), report.key, name, live=False)
        except SignatureError as exc:
            return str(exc)
        return None

    async def _progress(self, address: str, key: str) -> int:
        try:
            return int((await self.scheduler.rpc(address).rqml_progress(keys=[key])).get(key, 0))
        except Exception:
            return 0

    async def _reroute(self, record: TaskRecord, reason: str) -> None:
        decision = {"key": record.traits.key, "action": "reroute", "reason": reason}
        try:
            await self.scheduler.rpc(record.worker).rqml_decide(decision=decision)
        except Exception as exc:
            logger.warning("could not reroute %s from %s: %s", record.traits.task_id, record.worker, exc)

    def _tell_quarantine(self) -> None:
        """Send every node the quarantine: each refuses what a quarantined node signed."""
        for address in list(self.nodes):
            self.scheduler.loop.add_callback(self._push_quarantine, address)

    async def _push_quarantine(self, address: str) -> None:
        try:
            await self.scheduler.rpc(address).rqml_quarantined(quarantined=dict(self.gatekeeper.quarantined))
        except Exception as exc:
            logger.warning("could not send the quarantine to %s: %s", address, exc)

    def _send_policy(self, addresses: list[str]) -> None:
        """Send the policy to the nodes at ``addresses`` on their batched streams (coalesced
        with whatever else goes to each; no connection of its own). A node that is gone is
        skipped: it is sent the policy when it registers again."""
        if not self._policy_sent:
            return
        policy = POLICY.dump_python(self.policy, mode="json")
        for address in addresses:
            if (stream := self.scheduler.stream_comms.get(address)) is not None:
                with contextlib.suppress(CommClosedError):  # leaving: it gets the policy when it registers again
                    stream.send({"op": POLICY_OP, "policy": policy})
