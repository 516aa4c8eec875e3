"""What an autonomous node remembers across its own restarts: its tasks and its outbox.

An :class:`~rqml_dask.node.worker.RQMLWorker` keeps one LMDB environment in its node
directory. ``jobs`` has the full spec of every RQML task the node has taken and not yet
delivered, so a node restarted while its scheduler is away (killed, then started again by
its Nanny or launcher) resumes them from their checkpoints before it registers. ``outbox``
has the outcome of every task that finished while no scheduler was there to take it; the
node reports it when it reconnects, and clears both records once a scheduler has settled
which result is accepted.

A damaged environment (a crash mid-write on a disk that lies, a truncated copy) never stops
the node from starting: :meth:`NodeState.open` moves it aside and starts a fresh one, and the
node raises an alert. What is lost is only the list of jobs; their checkpoints are in
the checkpoint stores, so a resubmitted task still resumes from them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lmdb
from pydantic import ValidationError

from rqml_dask.stores.lmdb_store import close_environment, open_databases, open_environment
from rqml_dask.task import RQMLTask

logger = logging.getLogger(__name__)


class NodeState:
    """The node's ``jobs`` (their tasks) and ``outbox`` outcomes, by task key. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.env = open_environment(self.path)
        self._jobs, self._outbox = open_databases(self.env, b"jobs", b"outbox")

    @classmethod
    def open(cls, path: Path) -> tuple[NodeState, str | None]:
        """The node state at ``path``, read through once to check it; a damaged one is moved
        aside (``node.lmdb.damaged-<unix time>``) and replaced by an empty one. Returns the
        state and, if it was replaced, what was wrong and where the damaged copy went."""
        path = Path(path)
        try:
            state = cls(path)
            state.outbox()
            with state.env.begin() as txn:
                for _ in txn.cursor(db=state._jobs):
                    pass
            return state, None
        except lmdb.Error as exc:
            close_environment(path)
            aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            path.rename(aside)
            problem = f"node state {path} is damaged ({type(exc).__name__}: {exc}); moved to {aside}, started empty"
            logger.error(problem)
            return cls(path), problem

    def take(self, task: RQMLTask) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(task.key.encode(), task.to_msgpack(), db=self._jobs)

    def park(self, key: str, outcome: bytes) -> None:
        """Keep a finished task's outcome until a scheduler settles it."""
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), outcome, db=self._outbox)

    def release(self, key: str) -> None:
        """The task is delivered, or given up: forget it."""
        with self.env.begin(write=True) as txn:
            txn.delete(key.encode(), db=self._jobs)
            txn.delete(key.encode(), db=self._outbox)

    def jobs(self) -> list[RQMLTask]:
        """The task of every job; a record that does not decode is logged and dropped (it names
        the key and why), never resumed half-read."""
        tasks, broken = [], []
        with self.env.begin() as txn:
            for key, payload in txn.cursor(db=self._jobs):
                try:
                    tasks.append(RQMLTask.from_msgpack(payload))
                except (ValidationError, ValueError, TypeError) as exc:
                    broken.append(key)
                    logger.error("node state %s: job %r is unreadable, dropped: %s", self.path, key.decode(errors="replace"), exc)
        for key in broken:
            self.release(key.decode(errors="replace"))
        return tasks

    def outbox(self) -> dict[str, bytes]:
        with self.env.begin() as txn:
            return {key.decode(): bytes(value) for key, value in txn.cursor(db=self._outbox)}
