"""The node's inbound and outbound queues.

Inbound holds tasks bound to this node and not started. It serves the highest ``priority``
first, then by the policy's task-class order, then the hardest ``expected_difficulty`` first
(longest-first keeps a node's makespan short), then a task whose first model is already warm
on this node before one whose model is cold, then arrival order.
Outbound holds finished refinements until the Dask task that carries each one has validated
it, written it and returned it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rqml_dask.messages import NodePolicy
from rqml_dask.task import RQMLTask


@dataclass
class QueuedTask:
    """A task waiting on this node, with its data loaded and the future its caller waits on."""

    task: RQMLTask
    problem: dict[str, Any]
    result: Any  # concurrent.futures.Future[Refinement]
    checkpointer: Any = None  # Checkpointer of the task's checkpoint settings, if any
    resume: Any = None  # Resume: the checkpoint to start from, if any
    enqueued_at: float = field(default_factory=time.monotonic)
    sequence: int = 0


class InboundQueue:
    """Tasks not started, served in the policy's order (see the module docstring).

    Not thread-safe: the orchestrator guards it with its lock. ``pop`` re-sorts on demand,
    since warm models and the policy change while tasks wait.
    """

    def __init__(self) -> None:
        self._items: list[QueuedTask] = []
        self._counter = itertools.count()

    def push(self, item: QueuedTask) -> None:
        item.sequence = next(self._counter)
        self._items.append(item)

    def pop(self, policy: NodePolicy, is_warm: Callable[[str], bool]) -> QueuedTask:
        best = min(self._items, key=lambda q: order_key(q, policy, is_warm))
        self._items.remove(best)
        return best

    def ordered(self, policy: NodePolicy, is_warm: Callable[[str], bool]) -> list[QueuedTask]:
        return sorted(self._items, key=lambda q: order_key(q, policy, is_warm))

    def remove(self, key: str) -> QueuedTask | None:
        """Take the task ``key`` (its :attr:`~rqml_dask.task.RQMLTask.key`) out of the queue."""
        for item in self._items:
            if item.task.key == key:
                self._items.remove(item)
                return item
        return None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[QueuedTask]:
        return iter(self._items)


def order_key(item: QueuedTask, policy: NodePolicy, is_warm: Callable[[str], bool]) -> tuple:
    task = item.task
    return (
        -task.priority,
        policy.class_rank(task.task_class),
        task.task_class,
        -task.expected_difficulty,
        0 if is_warm(task.model_ladder[0]) else 1,
        item.sequence,
    )
