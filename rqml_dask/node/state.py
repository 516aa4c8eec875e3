"""What an autonomous node remembers across its own restarts: its tasks and its outbox.

An :class:`~rqml_dask.node.worker.RQMLWorker` keeps one LMDB environment in its node
directory. ``held`` has the full spec of every RQML task the node has taken and not yet
delivered, so a node restarted while its scheduler is away (killed, then started again by
its Nanny or launcher) resumes them from their checkpoints before it registers. ``outbox``
has the outcome of every task that finished while no scheduler was there to take it; the
node reports it when it reconnects, and clears both records once a scheduler has settled
which result is accepted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from rqml_dask.stores.lmdb_store import open_environment
from rqml_dask.task import RQMLTask

logger = logging.getLogger(__name__)


class NodeState:
    """The node's ``held`` tasks and ``outbox`` outcomes, by task key. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.env = open_environment(self.path)
        self._held = self.env.open_db(b"held")
        self._outbox = self.env.open_db(b"outbox")

    def hold(self, task: RQMLTask) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(task.key.encode(), task.to_msgpack(), db=self._held)

    def park(self, key: str, outcome: bytes) -> None:
        """Keep a finished task's outcome until a scheduler settles it."""
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), outcome, db=self._outbox)

    def release(self, key: str) -> None:
        """The task is delivered, or given up: forget it."""
        with self.env.begin(write=True) as txn:
            txn.delete(key.encode(), db=self._held)
            txn.delete(key.encode(), db=self._outbox)

    def held(self) -> list[RQMLTask]:
        """Every held task; a record that does not decode is logged and dropped (it names
        the key and why), never resumed half-read."""
        tasks, broken = [], []
        with self.env.begin() as txn:
            for key, payload in txn.cursor(db=self._held):
                try:
                    tasks.append(RQMLTask.from_msgpack(payload))
                except (ValidationError, ValueError, TypeError) as exc:
                    broken.append(key)
                    logger.error("node state %s: held task %r is unreadable, dropped: %s", self.path, key.decode(errors="replace"), exc)
        for key in broken:
            self.release(key.decode(errors="replace"))
        return tasks

    def outbox(self) -> dict[str, bytes]:
        with self.env.begin() as txn:
            return {key.decode(): bytes(value) for key, value in txn.cursor(db=self._outbox)}
