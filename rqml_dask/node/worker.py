"""RQMLWorker: a Dask worker whose node keeps working when the scheduler is gone.

Launch it with ``--worker-class``::

    dask worker tcp://scheduler:8786 --worker-class rqml_dask.node.RQMLWorker --name gpu-a
    dask cuda worker tcp://scheduler:8786 --worker-class rqml_dask.node.RQMLWorker --name gpu-a

**Why a Worker subclass.** A stock worker closes as soon as its scheduler connection breaks
(``Worker.handle_scheduler``), its Nanny then closes too, and nothing re-registers with a
scheduler that comes back (``../shared/notes/dask-extension-points.md``). A WorkerPlugin or
preload cannot change that, and a supervisor restarting the process would throw away the
warm models, the GPU context and every iteration since the last checkpoint. This class
overrides only what happens on a broken connection (``handle_scheduler``, and a heartbeat
answered "missing" in ``close``), registers again (``_register_with_scheduler``), and keeps
heartbeats out of its own close (``heartbeat``): the Dask internals that takes are in
:mod:`rqml_dask.compat`, each checked by ``tests/test_compat.py``:

1. *Degraded mode.* The node (:class:`~rqml_dask.node.NodePlugin`) is told the scheduler is
   gone: its refinement thread and inbound queue go on under the cached policy, results
   that finish wait in its durable outbox. The Dask tasks that were waiting for the node
   end, and every Dask task is released, so the worker's state machine is empty again.
2. *Reconnection.* The worker registers again, as a new worker, retrying until a scheduler
   answers at the same address (a restarted one, or the same one after a network cut)
   or until ``rqml.node.degraded-limit`` seconds have passed (then it closes, its work
   safe in LMDB). Heartbeats restart with the registration.
3. *Reconciliation.* The node reports its jobs and its outbox to the RQML
   scheduler plugin, which settles each one (:meth:`RQMLSchedulerPlugin.reconcile`).

A scheduler that closes normally tells its workers to close: they do, as stock workers do.
A link left half-open (the scheduler saw it end, the worker did not) is found by the next
heartbeat that gets through, answered "missing": the worker ends its end and goes into
degraded mode (:meth:`RQMLWorker._forgotten_by_scheduler`).

**Its own restarts.** A node with a stable name (``--name``) keeps its state in
``<local directory>/rqml-node/<name>/``: the cached policy and the LMDB of its jobs and
outbox (:mod:`rqml_dask.node.state`). A worker killed while degraded and started again by
its Nanny (which restarts a worker that dies) resumes those tasks from their checkpoints
before it registers: the node plugin is installed, by ``--preload rqml_dask.node`` or by
this class, before registration.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

from distributed import Worker
from distributed.comm import Comm, connect
from distributed.core import Status
from distributed.worker import WORKER_ANY_RUNNING
from distributed.worker_state_machine import FreeKeysEvent

from rqml_dask.compat import in_background, prepare_registration, stop_heartbeats
from rqml_dask.node.plugin import PLUGIN_NAME, NodePlugin

logger = logging.getLogger(__name__)

FORGOTTEN_GRACE = 5.0
"""Seconds a worker the scheduler answered "missing" waits for its stream to say why before
it takes the link for half-open (:meth:`RQMLWorker._forgotten_by_scheduler`)."""


class RQMLWorker(Worker):
    """A Dask worker that survives the loss of its scheduler (see the module docstring)."""

    _without_scheduler = False
    """True from the loss of the scheduler until the worker is registered again."""
    _heartbeat: asyncio.Future[None] | None = None
    """The heartbeat in flight, if any."""
    _forgotten = False
    """True while :meth:`_forgotten_by_scheduler` waits for the stream to say why."""

    @property
    def node_directory(self) -> Path:
        """Where this node keeps what outlives its process; stable across restarts when the
        worker has a ``--name``."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(self.name))
        return Path(self.local_directory).parent / "rqml-node" / name

    async def _register_with_scheduler(self) -> None:
        node = await self._node()
        node.resume_jobs()  # no-op once running: the first registration of a restarted node
        await super()._register_with_scheduler()
        in_background(self, node.reconcile)

    async def handle_scheduler(self, comm: Comm) -> None:
        try:
            await self.handle_stream(comm)
        finally:
            if self.status in (Status.running, Status.paused):
                in_background(self, self._degraded)
            else:  # closing on request: as a stock worker
                await self.close(reason="worker-handle-scheduler-connection-broken")

    async def heartbeat(self) -> None:
        """As Dask's, while the worker runs; none once it is closing (its ``close-stream``
        tells the scheduler), and one in flight when it starts closing is cancelled
        (:meth:`close`)."""
        if self.status not in WORKER_ANY_RUNNING:
            return
        beat = self._heartbeat = asyncio.ensure_future(super().heartbeat())
        await asyncio.wait([beat])
        if not beat.cancelled():
            beat.result()

    async def close(self, timeout: float = 30, executor_wait: bool = True, nanny: bool = True,
                    reason: str = "worker-close") -> str | None:
        """As Dask's, with two differences.

        A heartbeat in flight is cancelled first: Dask closes the worker's connections after
        its plugins' teardown, and a heartbeat still waiting for its answer then failed and
        logged an ERROR with its traceback at the end of a run that went well.

        A heartbeat answered "missing" does not close it. The scheduler removed this worker:
        a scheduler that means it to close says so on the stream, and it closes then; one
        whose link to it broke has lost it, which degraded mode handles (a heartbeat that got
        through a flapping link after the loss: the node goes on and registers again; one
        that got through before this worker saw the loss: :meth:`_forgotten_by_scheduler`)."""
        if reason == "worker-heartbeat-missing":
            if self._without_scheduler:
                logger.info("the scheduler no longer knows this worker: still in degraded mode, registering again when it answers")
            elif not self._forgotten:
                self._forgotten = True
                stop_heartbeats(self)  # they are answered "missing" too; registration starts them again
                logger.warning("not shutting down: waiting up to %g s for the stream from the scheduler %s to say why "
                               "(a close instruction, or its end)", FORGOTTEN_GRACE, self.scheduler.address)
                in_background(self, self._forgotten_by_scheduler)
            return None
        beat = self._heartbeat
        if beat is not None and not beat.done() and beat is not asyncio.current_task():  # not the heartbeat closing it
            beat.cancel()
        return await super().close(timeout=timeout, executor_wait=executor_wait, nanny=nanny, reason=reason)

    async def _forgotten_by_scheduler(self) -> None:
        """The scheduler answered a heartbeat "missing" while this worker's stream to it is
        open: wait :data:`FORGOTTEN_GRACE` seconds (heartbeats wait too) for the stream to say
        why, a close instruction or its end. If it says nothing, the link is half-open: the
        scheduler's end broke and this end never heard (a partition, a NAT or firewall that
        dropped the connection). This worker then ends its end, and degraded mode takes over
        and registers the node again. A stock worker closed at the first "missing": its node
        and the tasks refining on it ended with a link that had come back. (A worker removed
        without being told to close, ``retire_workers(close_workers=False)``, so registers
        again: a stock one closed.)"""
        try:
            comm = self.batched_stream.comm
            deadline = time.monotonic() + FORGOTTEN_GRACE
            while self._stream_open(comm) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self._stream_open(comm):
                logger.warning("the scheduler %s no longer knows this worker and its connection never said why (half-open "
                               "for %g s): ending it; the node goes on in degraded mode and registers again",
                               self.scheduler.address, FORGOTTEN_GRACE)
                comm.abort()
        finally:
            self._forgotten = False

    def _stream_open(self, comm: Comm | None) -> bool:
        """Whether ``comm`` is still the open scheduler stream of this running, registered worker."""
        return (comm is not None and self.status in WORKER_ANY_RUNNING and not self._without_scheduler
                and self.batched_stream.comm is comm and not comm.closed())

    async def _degraded(self) -> None:
        """Keep the node working without a scheduler; register again when one answers."""
        self._without_scheduler = True
        node = await self._node()
        lost_at = time.monotonic()
        limit, pause = node.settings.degraded_limit, node.settings.reconnect_pause
        logger.warning("lost the scheduler %s: degraded mode, the node keeps refining its tasks", self.scheduler.address)
        stop_heartbeats(self)
        node.scheduler_lost()
        await self._release_dask_tasks()
        while self.status in (Status.running, Status.paused):
            remaining = None if limit is None else limit - (time.monotonic() - lost_at)
            if remaining is not None and remaining <= 0:
                await self.close(reason="rqml-degraded-limit")
                return
            if not await self._scheduler_answers(pause):
                await asyncio.sleep(pause)
                continue
            prepare_registration(self)
            try:
                await asyncio.wait_for(self._register_with_scheduler(), remaining)
                self._without_scheduler = False
                return
            except (ValueError, OSError, asyncio.TimeoutError) as exc:
                logger.info("not registered again yet: %s", exc)
                await asyncio.sleep(pause)

    async def _scheduler_answers(self, pause: float) -> bool:
        """One short connection attempt: ``connect``'s own retries back off exponentially
        (seconds between tries after an outage of a few seconds); polling keeps the gap
        between the scheduler's return and re-registration under ``pause``."""
        try:
            comm = await connect(self.scheduler.address, timeout=pause * 2, **self.connection_args)
        except OSError:
            return False
        await comm.close()
        return True

    async def _release_dask_tasks(self) -> None:
        """Release every Dask task (the scheduler that wanted them is gone) and wait until
        the state machine is empty, as registration requires."""
        while self.state.tasks or self.data:
            keys = [key for key, ts in self.state.tasks.items() if ts.state not in ("cancelled", "released")]
            if keys:
                self.handle_stimulus(FreeKeysEvent(keys=keys, stimulus_id=f"rqml-scheduler-lost-{time.time()}"))
            await asyncio.sleep(0.05)

    async def _node(self):
        if PLUGIN_NAME not in self.plugins:
            await self.plugin_add(NodePlugin(), catch_errors=False)
        return self.plugins[PLUGIN_NAME]
