"""The node orchestrator: three queues and one refinement thread per worker.

* **inbound** (:class:`~rqml_dask.node.queues.InboundQueue`): tasks bound to this node,
  their data already loaded by the Dask task that carries each one, not started;
* **refinement**: the tasks being iterated, at most ``concurrency.limit`` of them. The
  refinement thread steps them in turn, one iteration each per round, so they interleave;
  tasks whose models share a batch key (same model, shape and PSF) are stepped together in
  one batched call where that pays: on a GPU, and on a CPU with several FFT threads (8 RL
  tasks of 64^3 on this project's 2-core machine: 1.30x faster with 2 threads, 0.75x with
  one; ``bench/bench_batch.py``). Nothing in that loop waits on the scheduler, the network
  or the disk;
* **outbound**: finished and validated refinements, until their Dask task has written the
  result and returned it.

A finished task is validated on the refinement thread; under the policy's ``escalate`` rule
a rejected result goes on refining with the next model of its ladder. A model that raises
(built, stepped, checkpointed, validated) fails its own task only, status ``failed`` with
the model and the error in its reason; the thread goes on with the others. Models are
built outside the lock, so a large tile does not stall the worker's event loop. Supervision decisions
(:class:`~rqml_dask.messages.Decision`) are applied between rounds. The size of the
refinement queue adapts to throughput and memory pressure
(:class:`~rqml_dask.node.concurrency.AdaptiveConcurrency`) where tasks batch; where they do
not (a CPU with one FFT thread) it stays at the policy's minimum: interleaving tasks on one
thread cannot raise throughput, and each task refining holds its working set (about a dozen
window-sized arrays: ``bench/bench_task_memory.py``).

The orchestrator lives in the worker process, started by :class:`~rqml_dask.node.NodePlugin`;
it knows nothing of the scheduler, so it runs on unchanged when the scheduler is lost
(degraded mode, :mod:`rqml_dask.node.worker`). What must outlive the process is persisted:
its policy (``policy.json`` in the node's directory: :meth:`NodeOrchestrator.saved_policy`
reads it, the node plugin decides whether to trust it), its tasks' checkpoints with the
checkpoint store, and the tasks it holds (:mod:`rqml_dask.node.state`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

from rqml_dask.arrays import ArrayBackend
from rqml_dask.checkpoint import CheckpointError
from rqml_dask.config import NodeSettings, node_settings
from rqml_dask.messages import Decision, NodePolicy
from rqml_dask.node.checkpointer import Checkpointer, Resume
from rqml_dask.node.concurrency import AdaptiveConcurrency
from rqml_dask.node.queues import InboundQueue, QueuedTask
from rqml_dask.node.resources import ResourceMonitor
from rqml_dask.refinement import Refinement
from rqml_dask.task import RQMLTask


logger = logging.getLogger(__name__)


PROGRESS_POINTS = 32
"""Each heartbeat carries the latest this many convergence checks of every task refining
(the scheduler keeps the ones it has not seen: a lost heartbeat loses nothing at up to this
many checks per heartbeat)."""
POLICY_FILE = "policy.json"
"""Where in its state directory an orchestrator keeps the policy it enforces."""


class PushedBack(RuntimeError):
    """A queued task the node handed back unstarted, for the scheduler to place elsewhere."""



@dataclass
class ActiveTask:
    queued: QueuedTask
    refinement: Refinement
    voxels: int
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class NodeCounters:
    """Running totals since the orchestrator started."""

    iterations: int = 0
    escalations: int = 0
    completed: int = 0
    terminated: int = 0
    failed: int = 0
    validation_failures: int = 0
    busy_seconds: float = 0.0


class NodeOrchestrator:
    """Queues and refines the RQML tasks of one worker. Thread-safe public methods."""

    def __init__(
        self,
        backend: ArrayBackend,
        state_dir: Path,
        resources: ResourceMonitor,
        policy: NodePolicy | None = None,
        window_seconds: float = 1.0,
        on_event: Callable[[dict[str, Any]], None] = lambda event: None,
        settings: NodeSettings | None = None,
    ) -> None:
        self.settings = settings or node_settings()
        self.backend = backend
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.resources = resources
        self.policy = policy or NodePolicy()
        knobs = self.settings.concurrency
        self.concurrency = AdaptiveConcurrency(self.policy.min_concurrency, self.policy.max_concurrency, gain=knobs.gain,
                                               memory_high=knobs.memory_high, hold_windows=knobs.hold_windows)
        self.window_seconds = window_seconds
        self.on_event = on_event
        self.batching = backend.is_gpu or backend.fft_workers > 1
        self.inbound = InboundQueue()
        self.refining: list[ActiveTask] = []
        self.outbound: dict[str, Refinement] = {}
        self.counters = NodeCounters()
        self.warm_models: dict[str, float] = {}
        self.iterations_per_second = 0.0
        self.busy_fraction = 0.0
        self._decisions: list[Decision] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="rqml-refinement", daemon=True)

    @property
    def policy_path(self) -> Path:
        return self.state_dir / POLICY_FILE

    @staticmethod
    def saved_policy(state_dir: Path) -> NodePolicy | None:
        """The policy an orchestrator on ``state_dir`` saved last (``None``: none, or unreadable)."""
        return NodePolicy.load(Path(state_dir) / POLICY_FILE)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(
        self, task: RQMLTask, problem: dict[str, Any], checkpointer: Checkpointer | None = None, resume: Resume | None = None
    ) -> Future:
        """Queue ``task`` (its ``problem`` loaded onto this node's backend), to resume from
        ``resume`` if it holds a checkpoint and to checkpoint through ``checkpointer``; the
        future resolves to the finished, validated :class:`Refinement`, or fails with
        :class:`PushedBack` when the inbound queue is over the policy's ``max_inbound``."""
        result: Future = Future()
        with self._cond:
            self.inbound.push(QueuedTask(task, problem, result, checkpointer, resume))
            while len(self.inbound) > self.policy.max_inbound:
                last = self.inbound.ordered(self.policy, self.is_warm)[-1]
                self.inbound.remove(last.task.key)
                last.result.set_exception(PushedBack(f"inbound queue over max_inbound={self.policy.max_inbound}"))
                self.on_event({"kind": "pushed_back", "key": last.task.key, "task_id": last.task.task_id, "inbound": len(self.inbound)})
            self._cond.notify_all()
        return result

    def release(self, key: str) -> None:
        """The caller has written and returned the result of task ``key``: drop it from outbound."""
        with self._cond:
            self.outbound.pop(key, None)

    def decide(self, decision: Decision) -> None:
        """Carry out a supervision decision on the next round."""
        with self._cond:
            self._decisions.append(decision)
            self._cond.notify_all()

    def set_policy(self, policy: NodePolicy) -> None:
        """Enforce ``policy`` from now on, and persist it (whoever calls decides whether it
        is to be trusted: the node enforces the latest policy its scheduler sent)."""
        with self._cond:
            self.policy = policy
            self.concurrency.bound(policy.min_concurrency, policy.max_concurrency)
            policy.save(self.policy_path)

    def iterations(self) -> dict[str, int]:
        """The iteration each task in the refinement queue has reached, by task key."""
        with self._cond:
            return {a.queued.task.key: a.refinement.iteration for a in self.refining}

    def is_warm(self, model: str) -> bool:
        return time.monotonic() - self.warm_models.get(model, -math.inf) < self.settings.warm_seconds

    def queue_stats(self) -> dict[str, Any]:
        """Each queue's depth, oldest age (seconds) and per-class counts."""
        now = time.monotonic()
        with self._cond:
            queues = {
                "inbound": [(q.task.task_class, q.enqueued_at) for q in self.inbound],
                "refinement": [(a.queued.task.task_class, a.started_at) for a in self.refining],
                "outbound": [(r.task.task_class, r.finished_at) for r in self.outbound.values()],
            }
            order = [q.task.task_id for q in self.inbound.ordered(self.policy, self.is_warm)]
            limit = self.concurrency.limit
        stats: dict[str, Any] = {
            name: {
                "depth": len(entries),
                "oldest_age_s": max((now - t for _, t in entries), default=0.0),
                "by_class": dict(Counter(c for c, _ in entries)),
            }
            for name, entries in queues.items()
        }
        stats["inbound"]["order"] = order
        stats["refinement"]["limit"] = limit
        return stats

    def heartbeat(self) -> dict[str, Any]:
        """The figures advertised on every Dask heartbeat (custom worker metric ``rqml``)."""
        with self._cond:
            depths = {"inbound": len(self.inbound), "refining": len(self.refining), "outbound": len(self.outbound)}
            warm = sorted(m for m in self.warm_models if self.is_warm(m))
            counters = self.counters
            figures = {
                **depths,
                "concurrency_limit": self.concurrency.limit,
                "busy_fraction": self.busy_fraction,
                "iterations_per_second": self.iterations_per_second,
                "iterations_total": counters.iterations,
                "escalations_total": counters.escalations,
                "tasks_completed": counters.completed,
                "tasks_terminated": counters.terminated,
                "tasks_failed": counters.failed,
                "validation_failures": counters.validation_failures,
                "warm_models": warm,
                "policy_version": self.policy.version,
                "backend": self.backend.name,
                "progress": {
                    a.queued.task.key: {"iteration": a.refinement.iteration,
                                            "trace": [astuple(p) for p in a.refinement.trace[-PROGRESS_POINTS:]],
                                            "checkpoints": a.refinement.checkpoints[-PROGRESS_POINTS:]}
                    for a in self.refining
                },
            }
        return {**figures, **self.resources.read()}

    # -- the refinement thread -------------------------------------------------------------

    def _loop(self) -> None:
        window_start = time.monotonic()
        window_busy = 0.0
        window_iterations = 0
        window_voxel_iterations = 0
        saturated = True
        while True:
            with self._cond:
                if self._stopped:
                    return
                admitted = self._take_admissible()
            self._admit(admitted)
            with self._cond:
                decisions, self._decisions = self._decisions, []
                batch = list(self.refining)
                if not batch and not decisions:
                    self._cond.wait(self.window_seconds)
                saturated = saturated and self.batching and len(batch) >= self.concurrency.limit  # no probe where nothing batches
            for decision in decisions:
                self._apply(decision, batch)
            started = time.perf_counter()
            stepped, voxel_iterations = self._step(batch)
            busy = time.perf_counter() - started
            window_busy += busy
            window_iterations += stepped
            window_voxel_iterations += voxel_iterations
            self._retire([a for a in batch if a.refinement.done], busy, stepped)
            self._publish(batch)
            now = time.monotonic()
            if now - window_start >= self.window_seconds:
                elapsed = now - window_start
                with self._cond:
                    self.busy_fraction = min(window_busy / elapsed, 1.0)
                    self.iterations_per_second = window_iterations / elapsed
                    if window_busy > 0:
                        self.concurrency.update(
                            window_voxel_iterations / window_busy, self.resources.memory_pressure(), saturated
                        )
                window_start, window_busy, window_iterations, window_voxel_iterations = now, 0.0, 0, 0
                saturated = True

    def _step(self, batch: list[ActiveTask]) -> tuple[int, int]:
        """One iteration of every running task in ``batch`` (batched where shapes match),
        then the checkpoints that are due; returns (tasks stepped, voxel iterations). A
        method of its own so that nothing of a finished task outlives the round in the
        loop's locals while the node idles (its arrays would stay allocated)."""
        stepped = voxel_iterations = 0
        running = [a for a in batch if not a.refinement.done]
        for group in _batches(running) if self.batching else [[a] for a in running]:
            refinements = [a.refinement for a in group]
            try:
                _step_together(refinements)
            except Exception as exc:  # a batch steps one model class: each of its tasks fails
                for refinement in refinements:
                    _fail(refinement, "step", exc)
                continue
            stepped += len(group)
            voxel_iterations += sum(a.voxels for a in group)
        self._checkpoint(running)
        return stepped, voxel_iterations

    def _take_admissible(self) -> list[QueuedTask]:
        """Pop the tasks that fit under the concurrency limit, in the inbound order (lock held)."""
        taken = []
        while self.inbound and len(self.refining) + len(taken) < self.concurrency.limit:
            queued = self.inbound.pop(self.policy, self.is_warm)
            if queued.result.set_running_or_notify_cancel():
                taken.append(queued)
        return taken

    def _admit(self, admitted: list[QueuedTask]) -> None:
        """Build each admitted task's refinement (its model: outside the lock, it may take a
        while) and move it into the refinement queue; one whose model raises joins it failed."""
        for queued in admitted:
            try:
                refinement = self._refinement_of(queued)
            except Exception as exc:
                refinement = Refinement(queued.task, queued.problem, self.backend)
                _fail(refinement, "construction", exc)
            voxels = math.prod(queued.problem["image"].shape)
            with self._cond:
                self.refining.append(ActiveTask(queued, refinement, voxels))
                if not refinement.done:
                    self.warm_models[refinement.model_name] = time.monotonic()

    def _refinement_of(self, queued: QueuedTask) -> Refinement:
        resume = queued.resume
        if resume is not None and resume.checkpoint is not None:
            try:
                return Refinement.resume(queued.task, queued.problem, self.backend, resume.checkpoint, resume.arrays)
            except CheckpointError as exc:
                resume.rejected.append(f"checkpoint at iteration {resume.checkpoint.iteration} not resumable: {exc}")
        return Refinement.start(queued.task, queued.problem, self.backend)

    def _checkpoint(self, batch: list[ActiveTask]) -> None:
        """Hand a snapshot of every task whose checkpoint is due to its writer."""
        for active in batch:
            checkpointer = active.queued.checkpointer
            if checkpointer is not None and (reason := active.refinement.checkpoint_due()):
                try:
                    snapshot = active.refinement.snapshot(reason)
                except Exception as exc:
                    _fail(active.refinement, "state", exc)
                    continue
                checkpointer.submit(snapshot)

    def _judge(self, refinement: Refinement, what: str) -> bool:
        """Validate the estimate; on failure report it and, under the policy's ``escalate``
        rule, go on with the next model (taking a checkpoint): where every model fitted the
        noise, the next that regularises (:meth:`Refinement.regularize`). True if the task
        goes on."""
        if not refinement.validate():
            return False
        self.counters.validation_failures += 1
        refinement.record_event("validation_failed", failures=refinement.validation_failures)
        if self.policy.on_validation_failure != "escalate":
            return False
        reason = f"{what} failed: " + "; ".join(refinement.validation_failures)
        if refinement.fitted_noise:  # the data say noise dominates: regularise, or end honestly
            if not refinement.regularize(reason):
                return False
        elif refinement.can_escalate:
            refinement.escalate(reason)
        else:
            return False
        refinement.checkpoint_reason = "validation failure"
        return True

    def _diversity_model(self, refinement: Refinement) -> str | None:
        """The next model of another family the policy offers for a task that stalled on
        every model it ran, or ``None``; a task that already ran it ends as it is."""
        for model in self.policy.diversity.get(refinement.task.task_class, ()):
            if model not in refinement.models:
                return model
        return None

    def _publish(self, batch: list[ActiveTask]) -> None:
        for active in batch:
            while active.refinement.events:
                self.on_event(active.refinement.events.pop(0))

    def _apply(self, decision: Decision, batch: list[ActiveTask]) -> None:
        for active in batch:
            refinement = active.refinement
            if active.queued.task.key == decision.key and not refinement.done:
                try:
                    if decision.action == "escalate":
                        refinement.escalate(decision.reason)
                    elif decision.action == "revalidate":
                        self._judge(refinement, "revalidation")
                    elif decision.action == "reroute":
                        if active.queued.checkpointer is not None:
                            active.queued.checkpointer.submit(refinement.snapshot("reroute"))
                        refinement.hand_back(decision.reason)
                    else:
                        refinement.terminate(decision.reason)
                except Exception as exc:
                    _fail(refinement, decision.action, exc)
                return
        if decision.action in ("reroute", "terminate"):  # not started yet: hand it back as it is
            with self._cond:
                queued = self.inbound.remove(decision.key)
            if queued is not None:
                queued.result.set_exception(PushedBack(f"{decision.action} before it started: {decision.reason}"))

    def _retire(self, finished: list[ActiveTask], busy: float, stepped: int) -> None:
        """Validate finished tasks; hand them to outbound or, per policy, refine them further."""
        done = []
        for active in finished:
            refinement = active.refinement
            try:
                if refinement.status == "stalled" and (model := self._diversity_model(refinement)):
                    refinement.diversify(model, f"stalled on every model of its ladder; policy adds {model}")
                    continue
                if refinement.status not in ("terminated", "failed") and self._judge(refinement, "validation"):
                    continue
            except Exception as exc:
                _fail(refinement, "validation", exc)
            done.append(active)
        limit = self.policy.max_task_seconds
        now = time.monotonic()
        with self._cond:
            self.counters.iterations += stepped
            self.counters.busy_seconds += busy
            for active in self.refining:
                if limit and not active.refinement.done and now - active.started_at > limit:
                    active.refinement.terminate(f"exceeded max_task_seconds={limit:g}")
            for active in done:
                refinement = active.refinement
                self.refining.remove(active)
                self.counters.escalations += refinement.escalations
                self.counters.completed += 1
                self.counters.terminated += refinement.status == "terminated"
                self.counters.failed += refinement.status == "failed"
                refinement.finished_at = now
                self.outbound[refinement.task.key] = refinement
                if refinement.status != "failed":
                    self.warm_models[refinement.model_name] = now
                active.queued.result.set_result(refinement)


def _batches(active: list[ActiveTask]) -> list[list[ActiveTask]]:
    """Group tasks whose models can be stepped in one batched call; the rest alone."""
    groups: dict[object, list[ActiveTask]] = {}
    singles = []
    for a in active:
        key = a.refinement.model.batch_key()
        if key is None:
            singles.append([a])
        else:
            groups.setdefault(key, []).append(a)
    return [*groups.values(), *singles]


def _fail(refinement: Refinement, what: str, exc: Exception) -> None:
    """End ``refinement`` as failed because its model raised ``exc`` during ``what``."""
    logger.error("task %s: model %s raised in %s", refinement.task.task_id, refinement.model_name, what, exc_info=exc)
    refinement.fail(f"model {refinement.model_name} raised in {what} at iteration {refinement.iteration}: "
                    f"{type(exc).__name__}: {exc}")


def _step_together(refinements: list[Refinement]) -> None:
    if len(refinements) == 1:
        refinements[0].step()
        return
    previous = [r.before_step() for r in refinements]
    type(refinements[0].model).step_batch([r.model for r in refinements])
    for refinement, copy in zip(refinements, previous):
        refinement.after_step(copy)
