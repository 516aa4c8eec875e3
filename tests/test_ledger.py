"""The scheduler plugin's ledger: first accepted result wins, jobs, and the wait for
returning nodes (pure bookkeeping, no cluster)."""

from __future__ import annotations

from rqml_dask.messages import NodeLink
from rqml_dask.scheduler.ledger import Ledger


def test_the_first_accepted_result_stays_and_the_ledger_is_bounded():
    ledger = Ledger(kept=2)
    ledger.jobs["a"] = "n1"
    ledger.accept("a", "n1")
    ledger.accept("a", "n2")
    assert ledger.accepted == {"a": "n1"} and "a" not in ledger.jobs
    ledger.accept("b", "n2")
    ledger.accept("c", "n2")
    assert list(ledger.accepted) == ["b", "c"]  # the oldest goes first


def test_tasks_wait_for_returning_nodes_until_they_report_or_the_grace_ends():
    ledger = Ledger(kept=10)
    ledger.node_registered("fresh", NodeLink(jobs=0, scheduler_losses=0), now=0.0)
    assert not ledger.waiting_for_nodes(0.0)  # a new node holds nothing: no wait
    ledger.node_registered("back", NodeLink(jobs=3, scheduler_losses=1), now=0.0)
    assert ledger.waiting_for_nodes(ledger.return_grace + 0.1)  # its report is still awaited
    ledger.node_reported("back")
    assert ledger.waiting_for_nodes(ledger.return_grace - 0.1) and not ledger.waiting_for_nodes(ledger.return_grace + 0.1)
    ledger.node_registered("silent", NodeLink(jobs=1), now=10.0)
    assert ledger.waiting_for_nodes(10.0 + ledger.reconcile_grace - 0.1) and not ledger.waiting_for_nodes(10.0 + ledger.reconcile_grace + 0.1)


def test_a_node_that_leaves_holds_nothing_any_more():
    ledger = Ledger(kept=10)
    ledger.jobs.update({"a": "n1", "b": "n2"})
    ledger.node_registered("n1", NodeLink(jobs=1), now=0.0)
    ledger.node_left("n1")
    assert ledger.jobs == {"b": "n2"} and not ledger.awaiting
