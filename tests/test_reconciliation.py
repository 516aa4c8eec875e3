"""Reconciliation rules of the scheduler plugin, and the node state that feeds them.

The plugin runs in a real scheduler (the embedded cluster of ``rqml run``); reports are
sent to its ``rqml_reconcile`` handler as a node sends them after registering.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import dask
import pytest
from distributed import Client, get_worker

from rqml_dask import events
from rqml_dask.node.state import NodeState
from rqml_dask.messages import TaskTraits, dask_key
from rqml_dask.task import ArrayRef, Region, RQMLTask, TaskInput

from conftest import local_cluster
from timing import bound


@pytest.fixture(scope="module")
def rqml_client():
    with local_cluster() as cluster, Client(cluster) as client:
        yield client


def reconcile(client: Client, node: str, *reports: tuple[str, int, bool]) -> dict[str, str]:
    tasks = [{"key": key, "iteration": it, "finished": done} for key, it, done in reports]
    return client.sync(client.scheduler.rqml_reconcile, node=node, tasks=tasks)


def test_first_accepted_result_wins_and_later_ones_are_duplicates_with_an_alert(rqml_client):
    a, b = sorted(rqml_client.scheduler_info()["workers"])
    assert reconcile(rqml_client, a, ("t1@x", 40, False)) == {"t1@x": "keep"}  # nobody else knows it
    assert reconcile(rqml_client, a, ("t1@x", 90, True)) == {"t1@x": "accept"}
    assert reconcile(rqml_client, a, ("t1@x", 90, True)) == {"t1@x": "accept"}  # asking again changes nothing
    assert reconcile(rqml_client, b, ("t1@x", 90, True), ("t2@x", 5, False)) == {"t1@x": "duplicate", "t2@x": "keep"}
    assert reconcile(rqml_client, b, ("t1@x", 120, False)) == {"t1@x": "drop"}  # a run of a task already settled
    alerts = [e for _, e in rqml_client.get_events(events.ALERTS) if e.get("task_id") == "t1"]
    assert [(e["kind"], e["kept"], e["discarded"]) for e in alerts] == [("duplicate-result", a, b), ("duplicate-run", a, b)]


def test_a_task_submitted_later_is_bound_to_the_node_that_holds_it(rqml_client):
    workers = sorted(rqml_client.scheduler_info()["workers"])
    holders = {f"job-{i}@y": workers[i % 2] for i in range(6)}
    for key, node in holders.items():
        assert reconcile(rqml_client, node, (key, 10, False)) == {key: "keep"}
    futures = {}
    for key in holders:
        traits = TaskTraits(key=key, task_class="deconvolution", model="m")
        with dask.annotate(rqml=asdict(traits)):
            futures[key] = rqml_client.submit(lambda: get_worker().address, key=dask_key(key, "0"), pure=False)
    assert {key: future.result(timeout=bound(60)) for key, future in futures.items()} == holders


@pytest.mark.parametrize(
    ("tasks", "complaint"),
    [
        ([{"key": "k", "iteration": -1, "finished": False}], "iteration"),
        ([{"key": "k", "iteration": 3}], "finished"),
        ("not a list", "list"),
    ],
)
def test_a_malformed_report_is_refused_naming_the_field(rqml_client, tasks, complaint):
    node = sorted(rqml_client.scheduler_info()["workers"])[0]
    with pytest.raises(ValueError, match=f"reconciliation report from .* refused(.|\n)*{complaint}"):
        rqml_client.sync(rqml_client.scheduler.rqml_reconcile, node=node, tasks=tasks)


def small_task(task_id: str) -> RQMLTask:
    ref = ArrayRef("/nowhere.zarr", "image")
    return RQMLTask(task_id, "deconvolution", Region(((0, 4), (0, 4)), ((0, 4), (0, 4))), TaskInput(ref, ref), ref, ("richardson_lucy",))


def test_node_state_keeps_held_tasks_and_outbox_across_reopening_and_drops_a_corrupt_record(tmp_path, caplog):
    state = NodeState(tmp_path / "node.lmdb")
    first, second = small_task("a/0"), small_task("a/1")
    state.take(first)
    state.take(second)
    state.park(second.key, b'{"status": "converged"}')
    with state.env.begin(write=True) as txn:  # a record damaged on disk
        txn.put(b"broken@0", b"\x93not a task", db=state._jobs)
    reopened = NodeState(tmp_path / "node.lmdb")
    with caplog.at_level(logging.ERROR, logger="rqml_dask.node.state"):
        assert sorted(t.task_id for t in reopened.jobs()) == ["a/0", "a/1"]
    assert "job 'broken@0' is unreadable, dropped" in caplog.text
    assert reopened.outbox() == {second.key: b'{"status": "converged"}'}
    reopened.release(second.key)
    assert [t.task_id for t in reopened.jobs()] == ["a/0"] and reopened.outbox() == {}
