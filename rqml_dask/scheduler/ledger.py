"""The scheduler plugin's ledger of results and jobs, for reconciliation.

Nodes back from degraded mode report their jobs (:class:`~rqml_dask.messages.TaskReport`);
the ledger keeps, by RQML task key, whose result was accepted (the first one: later ones are
duplicates) and which node has a job of a task still going (a (re)submitted task is bound
there), and says when a task no node has a job for should wait because returning nodes have
not reported yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rqml_dask.messages import NodeLink


@dataclass
class Ledger:
    """Accepted results, and the node with each task's job, by RQML task key; ``kept``
    bounds the accepted.

    ``reconcile_grace``: seconds a task no node has a job for waits, after a node with jobs
    registers, for that node's reconciliation report (so a resubmitted task is not started
    elsewhere first); ``return_grace``: seconds it waits after a node back from degraded
    mode registers (the other nodes that lost the scheduler poll every half second and are
    about to register too). The scheduler plugin passes ``rqml.scheduler``'s values.
    """

    kept: int
    reconcile_grace: float = 10.0
    return_grace: float = 2.0
    accepted: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)
    """Task key -> the node that has its job (refining it, or its result in the outbox)."""
    awaiting: dict[str, float] = field(default_factory=dict)
    """Node -> until when its report is awaited (it registered with jobs)."""
    returns_until: float = 0.0
    """Until when more nodes back from degraded mode are expected to register."""

    def accept(self, key: str, node: str | None) -> None:
        """``node``'s result for ``key`` is the one, unless one was accepted before."""
        self.jobs.pop(key, None)
        if key in self.accepted or node is None:
            return
        self.accepted[key] = node
        while len(self.accepted) > self.kept:
            self.accepted.pop(next(iter(self.accepted)))

    def node_registered(self, node: str, link: NodeLink, now: float) -> None:
        """A node registered; ``link`` is its advertised scheduler link (heartbeat ``link``)."""
        if link.jobs > 0:
            self.awaiting[node] = now + self.reconcile_grace
        if link.jobs > 0 or link.scheduler_losses > 0:
            self.returns_until = max(self.returns_until, now + self.return_grace)

    def node_reported(self, node: str) -> None:
        self.awaiting.pop(node, None)

    def node_left(self, node: str) -> None:
        self.jobs = {key: owner for key, owner in self.jobs.items() if owner != node}
        self.awaiting.pop(node, None)

    def waiting_for_nodes(self, now: float) -> bool:
        """Whether a task no node has a job for should wait: returning nodes have not all reported."""
        return now < self.returns_until or any(deadline > now for deadline in self.awaiting.values())
