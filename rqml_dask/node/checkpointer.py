"""The node's checkpoint writer and reader.

**Never blocking.** The refinement thread hands :meth:`Checkpointer.submit` a
:class:`~rqml_dask.refinement.Snapshot` (already a copy) and moves on. One writer thread per
store set writes it: the artifacts to Zarr, then the record to the node's LMDB, then to the
shared store. A newer snapshot of a task replaces a queued older one, so a slow disk costs
skipped checkpoints, never iterations. The writer also keeps to a duty cycle
(``max_duty``): after a write that took ``w`` seconds it waits ``w * (1 - max_duty) /
max_duty`` before the next, so writing, whose cost is mostly the kernel copying artifacts to
the page cache, never takes more than that share of a core from the refinement (a 4 MiB
artifact is ~9 ms on this project's development machine). When the shared store is slow or down the record
stays in LMDB, the task is marked pending there (so a restarted worker still knows), and
the writer replicates the newest record when the store answers again, with backoff.

**Recovery.** :meth:`Checkpointer.latest` gathers a task's records from LMDB and the shared
store, newest first, and returns the first whose record hash and artifact digests verify;
each one rejected on the way is reported (an alert, and the outcome's notes).

**Retention.** Each store keeps a task's two newest records; artifact sets no kept record
refers to are deleted after each write (unless replication is pending), and a finished
task's checkpoints go entirely under ``retention: delete``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rqml_dask.checkpoint import CheckpointError, TaskCheckpoint
from rqml_dask.trust.signing import Seal
from rqml_dask.refinement import Snapshot
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.stores.base import RecordStore, SlotEntry, StoreUnavailable
from rqml_dask.stores.lmdb_store import LMDBStore
from rqml_dask.task import RQMLTask

logger = logging.getLogger(__name__)

DONE_PREFIX = "done:"
"""Pending-replication marker of a task's done record (beside its checkpoint's)."""

FINISHED_KEPT = 4096
"""How many of the latest finished tasks a writer remembers, to drop a snapshot of one that
arrives after its finish (being written as it finished, or from a job parked as a Dask task
delivered it): moments later, never thousands of tasks later."""


def done_key(task: RQMLTask) -> str:
    """Where a task's outcome is recorded: its key and the digest of the input it read, so a
    result of other input content is never found (and never blocks recording a new one)."""
    return f"{task.key}~{task.input_digest}" if task.input_digest else task.key


@dataclass
class Resume:
    """The newest valid checkpoint of a task, its artifact arrays (host), and why any newer
    candidates were rejected."""

    checkpoint: TaskCheckpoint | None
    arrays: dict[str, np.ndarray]
    rejected: list[str]


@dataclass
class WrittenCheckpoint:
    iteration: int
    written_at: float
    stored_in: set[str] = field(default_factory=set)


class Checkpointer:
    """Background writer and verifying reader of one node's checkpoints."""

    def __init__(
        self,
        local: LMDBStore,
        shared: RecordStore | None,
        artifacts: ArtifactStore,
        node: str,
        on_alert: Callable[[str, dict[str, Any]], None] = lambda kind, payload: None,
        max_backoff: float = 10.0,
        max_duty: float = 0.2,
        seal: Seal | None = None,
    ) -> None:
        self.local, self.shared, self.artifacts, self.node = local, shared, artifacts, node
        self.seal = seal  # sign what is written, refuse what does not verify (pqtls:// clusters)
        self.on_alert = on_alert
        self.max_backoff = max_backoff
        self.max_duty = max_duty
        self._next_write = 0.0
        self.written: dict[str, WrittenCheckpoint] = {}
        self.writes = 0
        self._queued: dict[str, Snapshot] = {}
        self._finished: dict[str, None] = {}  # the latest FINISHED_KEPT finished keys, oldest first
        self._pending: set[str] = set(local.pending()) if shared is not None else set()
        self._backoff = 0.5
        self._retry_at = time.monotonic()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="rqml-checkpoint-writer", daemon=True)
        self._thread.start()

    # -- refinement thread ---------------------------------------------------------------

    def submit(self, snapshot: Snapshot) -> None:
        """Queue a snapshot for writing, replacing a queued older one of the same task."""
        key = snapshot.task.key
        with self._cond:
            if key in self._finished:
                return
            self._queued.pop(key, None)
            self._queued[key] = snapshot
            self._cond.notify_all()

    # -- Dask task threads ---------------------------------------------------------------

    def latest(self, task: RQMLTask) -> Resume:
        """The newest checkpoint of ``task`` that verifies, from LMDB or the shared store."""
        key = task.key
        entries = self.local.checkpoints(key)
        rejected: list[str] = []
        if self.shared is not None:
            try:
                entries += self.shared.checkpoints(key)
            except StoreUnavailable as exc:
                rejected.append(f"shared store not consulted: {exc}")
        seen = set()
        for entry in sorted(entries, key=lambda e: e.rank, reverse=True):
            if entry.rank in seen:
                continue
            seen.add(entry.rank)
            try:
                checkpoint = TaskCheckpoint.from_msgpack(entry.record)
                if (checkpoint.task_id, checkpoint.iteration) != (task.task_id, entry.iteration):
                    raise CheckpointError(f"record is of {checkpoint.task_id!r} at {checkpoint.iteration}")
                if self.seal is not None:
                    self.seal.verify(checkpoint)
                arrays = {ref.name: self.artifacts.read(ref) for ref in checkpoint.intermediate_artifacts}
                return Resume(checkpoint, arrays, rejected)
            except CheckpointError as exc:
                reason = f"checkpoint of {task.task_id} at iteration {entry.iteration} from {entry.node} rejected: {exc}"
                rejected.append(reason)
                logger.warning(reason)
                self.on_alert("checkpoint-rejected", {"key": task.key, "task_id": task.task_id, "iteration": entry.iteration, "reason": str(exc)})
        return Resume(None, {}, rejected)

    def outcome(self, task: RQMLTask) -> bytes | None:
        """The recorded outcome of a task that finished before from the same input content,
        from LMDB or the shared store."""
        found = self.local.done(done_key(task))
        if found is None and self.shared is not None:
            try:
                found = self.shared.done(done_key(task))
            except StoreUnavailable:
                pass
        return found

    def finish(self, task: RQMLTask, outcome: bytes) -> None:
        """Record a finished task's outcome (first record wins, per input content) and apply
        retention."""
        key = task.key
        with self._cond:
            self._finished.pop(key, None)
            self._finished[key] = None
            if len(self._finished) > FINISHED_KEPT:
                del self._finished[next(iter(self._finished))]
            self._queued.pop(key, None)
        self.local.put_done(done_key(task), outcome)
        if self.shared is not None:
            self._replicate_done(done_key(task), outcome)
        if task.checkpoint is None or task.checkpoint.retention == "delete":
            with self._cond:
                if self._writing_key == key:  # the writer deletes them once its write is over
                    self._delete_after_write = True
                    return
            self._delete_checkpoints(key)

    def _delete_checkpoints(self, key: str) -> None:
        """Forget every checkpoint record of ``key`` and delete its artifacts (``retention:
        delete`` of a finished task)."""
        self.local.forget(key)
        if self.shared is not None:
            try:
                self.shared.forget(key)
            except StoreUnavailable:
                pass  # its records only ever refer to a finished task's artifacts: harmless
        self.artifacts.delete_task(key)
        with self._cond:
            self.written.pop(key, None)
            self._pending.discard(key)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is queued (replication may still be pending); False if that
        did not happen within ``timeout``, or at once if the writer is stopped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued or self._writing:
                if self._stopped:
                    return False
                self._next_write = 0.0  # a caller waits: write now
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    @property
    def idle(self) -> bool:
        """Nothing queued, being written or waiting for the shared store: stopping the writer
        now loses nothing."""
        with self._cond:
            return not (self._queued or self._writing or self._pending)

    # -- observation ---------------------------------------------------------------------

    def state(self) -> dict[str, dict[str, Any]]:
        """Per task key: newest written checkpoint, its age, where it is stored, what waits."""
        now = time.time()
        with self._cond:
            keys = set(self.written) | set(self._queued) | {k for k in self._pending if not k.startswith(DONE_PREFIX)}
            return {
                key: {
                    "last_checkpoint_iteration": w.iteration if (w := self.written.get(key)) else None,
                    "last_checkpoint_age_s": now - w.written_at if w else None,
                    "stored_in": sorted(w.stored_in) if w else [],
                    "artifacts": str(self.artifacts.task_dir(key)),
                    "pending_writes": int(key in self._queued) + int(key in self._pending),
                    "queued_iteration": q.iteration if (q := self._queued.get(key)) else None,
                }
                for key in sorted(keys)
            }

    def summary(self) -> dict[str, float]:
        """Checkpoints waiting (queued or unreplicated) and the age of the oldest of them."""
        now = time.time()
        with self._cond:
            ages = [now - s.taken_at for s in self._queued.values()]
            ages += [now - w.written_at for k, w in self.written.items() if k in self._pending]
            pending = len(self._queued) + len(self._pending)
        return {"pending": pending, "lag_seconds": max(ages, default=0.0), "written": self.writes}

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self.shared is not None:
            self.shared.close()

    # -- writer thread -------------------------------------------------------------------

    _writing = False
    _writing_key: str | None = None  # the task whose snapshot is being written
    _delete_after_write = False  # it finished meanwhile under ``retention: delete``

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._work_due():
                    self._cond.wait(self._until_due())
                if self._stopped:
                    return
                snapshot = None
                if self._queued and time.monotonic() >= self._next_write:
                    snapshot = self._queued.pop(next(iter(self._queued)))
                    self._writing_key = snapshot.task.key
                    self._writing = True
            try:
                if snapshot is not None:
                    started = time.monotonic()
                    self._write(snapshot)
                    spent = time.monotonic() - started
                    self._next_write = time.monotonic() + spent * (1 - self.max_duty) / self.max_duty
                elif self._pending:
                    self._replicate_pending()
            except Exception:
                logger.exception("checkpoint writer failed")
            finally:
                with self._cond:
                    finished, self._delete_after_write = self._delete_after_write, False
                    self._writing_key = None
                if finished:
                    try:
                        self._delete_checkpoints(snapshot.task.key)
                    except Exception:
                        logger.exception("deleting the checkpoints of finished task %s failed", snapshot.task.key)
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def _work_due(self) -> bool:
        now = time.monotonic()
        return bool(self._queued and now >= self._next_write) or bool(self._pending and now >= self._retry_at)

    def _until_due(self) -> float | None:
        times = ([self._next_write] if self._queued else []) + ([self._retry_at] if self._pending else [])
        return max(min(times) - time.monotonic(), 0.001) if times else None

    def _write(self, snapshot: Snapshot) -> None:
        task, key = snapshot.task, snapshot.task.key
        arrays = {name: snapshot.backend.to_numpy(array) for name, array in snapshot.arrays.items()}
        refs = self.artifacts.write(key, snapshot.iteration, self.node, arrays)
        checkpoint = TaskCheckpoint.create(
            task.task_id, snapshot.iteration, snapshot.model_config, refs, snapshot.supervision_state
        )
        if self.seal is not None:
            checkpoint = self.seal.sign(checkpoint)
        entry = SlotEntry(snapshot.iteration, self.node, checkpoint.to_msgpack())
        with self._cond:
            if key in self._finished:
                self.artifacts.delete_task(key)
                return
        if self.local.put_checkpoint(key, entry) is None:
            self._collect(key)  # a newer record is stored (another worker): drop ours
            return
        written = WrittenCheckpoint(snapshot.iteration, time.time(), {self.local.scheme})
        with self._cond:
            self.written[key] = written
            self.writes += 1
        if self.shared is not None and self._replicate(key, entry):
            written.stored_in.add(self.shared.scheme)
        self._collect(key)

    def _replicate(self, key: str, entry: SlotEntry) -> bool:
        try:
            self.shared.put_checkpoint(key, entry)  # None: the shared store holds a newer one
        except StoreUnavailable as exc:
            self._defer(key, exc)
            return False
        self._clear_pending(key)
        return True

    def _replicate_done(self, key: str, outcome: bytes) -> None:
        try:
            self.shared.put_done(key, outcome)
        except StoreUnavailable as exc:
            self._defer(DONE_PREFIX + key, exc)
            return
        self._clear_pending(DONE_PREFIX + key)

    def _clear_pending(self, key: str) -> None:
        if key in self._pending:
            self.local.clear_pending(key)
            with self._cond:
                self._pending.discard(key)

    def _defer(self, key: str, exc: Exception) -> None:
        first = not self._pending
        self.local.mark_pending(key)
        with self._cond:
            self._pending.add(key)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.max_backoff)
        if first:
            logger.warning("shared checkpoint store unavailable, keeping checkpoints in LMDB: %s", exc)
            self.on_alert("shared-store-unavailable", {"store": self.shared.url, "error": str(exc)})

    def _replicate_pending(self) -> None:
        """Send the newest local record (or done marker) of every pending task; stop at the
        first failure (the store is still down) and back off."""
        for key in sorted(self._pending):
            if key.startswith(DONE_PREFIX):
                outcome = self.local.done(key.removeprefix(DONE_PREFIX))
                if outcome is None:
                    self._clear_pending(key)  # nothing left to send
                else:
                    self._replicate_done(key.removeprefix(DONE_PREFIX), outcome)
            else:
                entries = self.local.checkpoints(key)
                if not entries:
                    self._clear_pending(key)  # forgotten meanwhile (a finished task)
                elif self._replicate(key, entries[0]):
                    if (w := self.written.get(key)) is not None:
                        w.stored_in.add(self.shared.scheme)
                    self._collect(key)
            if key in self._pending:
                return
        with self._cond:
            self._backoff = 0.5
            if not self._pending:
                self.on_alert("shared-store-recovered", {"store": self.shared.url})

    def _collect(self, key: str) -> None:
        """Delete artifact sets of this task that no kept record refers to."""
        if key in self._pending:
            return
        entries = self.local.checkpoints(key)
        if self.shared is not None:
            try:
                entries += self.shared.checkpoints(key)
            except StoreUnavailable:
                return
        referenced = []
        for entry in entries:
            try:
                referenced += [ref.location for ref in TaskCheckpoint.from_msgpack(entry.record).intermediate_artifacts]
            except CheckpointError:
                continue
        self.artifacts.keep_only(key, referenced)
