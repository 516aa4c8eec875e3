"""Degraded mode and reconciliation, with real processes: ``dask scheduler`` and ``dask
worker --worker-class rqml_dask.node.RQMLWorker`` (each with its Nanny), a scheduler killed
with SIGKILL and started again on the same address, a worker killed while it has no
scheduler, and a node whose TCP link to the scheduler is cut while the scheduler hands its
tasks to another node.

The model is the sleepy test model at a fixed iteration count: its result is exactly
``image * 0.999 ** iterations`` in float32 whichever node computes it and however often it
is resumed, so the output is checked bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client

from rqml_dask import events
from rqml_dask.pipeline.pipeline import RunReport

from dask_processes import TcpLink, dask_scheduler, free_port, rqml_worker
from heterogeneous_cluster import sleepy_pipeline
from test_node_cluster import wait_for

pytestmark = pytest.mark.slow

ITERATIONS = 300
TILE = [12, 24, 48]  # 4 tasks on the 24x48x48 test volume
POLICY = {"version": 2, "min_concurrency": 4}  # every task refining at once on its node


def http_json(port: int, path: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None  # the worker is not (yet) serving


def iterations(port: int) -> dict[str, int]:
    """Task key -> the iteration it has reached on the node serving ``port``."""
    state = http_json(port, "/checkpoint_state")
    return {key: t["iteration"] for key, t in (state or {}).get("tasks", {}).items() if t["iteration"] is not None}


def sleepy_result(store: Path, iterations_: int) -> np.ndarray:
    """What the sleepy model computes from the observed volume in ``iterations_`` steps."""
    x = zarr.open_group(store, mode="r")["observed"][...].astype(np.float32)
    for _ in range(iterations_):
        x = x * 0.999
    return x


class RunInBackground(threading.Thread):
    """``pipeline.run(client)`` on a thread, so the test can break things meanwhile."""

    def __init__(self, pipeline, client: Client) -> None:
        super().__init__(daemon=True)
        self.pipeline, self.client = pipeline, client
        self.report: RunReport | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.report = self.pipeline.run(self.client, progress=False)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float) -> RunReport:
        self.join(timeout)
        assert not self.is_alive(), "the pipeline did not finish"
        if self.error is not None:
            raise self.error
        return self.report


def test_scheduler_killed_mid_run_nodes_keep_refining_reconcile_and_the_run_completes(tmp_path, small_volume):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    http = {"node-0": free_port(), "node-1": free_port()}
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    workers = [rqml_worker(address, name, http[name], tmp_path / "workers").start() for name in http]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            client.sync(client.scheduler.rqml_policy, policy=POLICY)
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", TILE, ITERATIONS, 0.02, "outage")
            run = RunInBackground(pipeline, client)
            # every task refining and checkpointed on its node
            wait_for(lambda: all(len(its) == 2 and min(its.values()) >= 30 for its in map(iterations, http.values())), timeout=60)
            names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
            pids = {names[addr]: pid for addr, pid in client.run(os.getpid).items()}
            scheduler.kill()  # SIGKILL
            killed_at = time.time()

            # Both nodes notice and keep refining on their own.
            wait_for(lambda: all((http_json(p, "/health") or {}).get("status") == "degraded" for p in http.values()))
            before = {name: iterations(p) for name, p in http.items()}
            wait_for(lambda: all(iterations(http[n])[k] > i + 20 for n in http for k, i in before[n].items()))

            # A worker killed while degraded: its Nanny starts it again, and the new process
            # resumes the node's tasks from LMDB before any scheduler is back.
            node_1_tasks = before["node-1"]
            os.kill(pids["node-1"], signal.SIGKILL)
            resumed = wait_for(lambda: (its := iterations(http["node-1"])) and its.keys() == node_1_tasks.keys() and its, timeout=60)
            assert all(resumed[k] >= i for k, i in node_1_tasks.items())  # from checkpoints, not from zero
            wait_for(lambda: all(iterations(http["node-1"]).get(k, 0) > i + 20 for k, i in node_1_tasks.items()), timeout=30)
            assert http_json(http["node-1"], "/health")["status"] == "degraded"
            assert not run.is_alive() or run.report is None  # the client is still waiting

            scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()  # same address
            report = run.result(timeout=120)

            assert sorted(o.task_id for o in report.outcomes) == [f"outage/{i}" for i in range(4)]
            assert all(o.iterations == ITERATIONS and o.status == "max_iterations" for o in report.outcomes)
            keys = {t.task_id: t.key for t in pipeline.tasks()}
            for outcome in report.outcomes:
                key = keys[outcome.task_id]
                if key in node_1_tasks:  # resumed by the restarted worker, from its checkpoint
                    assert outcome.resumed_from is not None and outcome.resumed_from >= node_1_tasks[key] - 20
                else:  # refined by node-0 in one go, through the outage
                    assert outcome.resumed_from is None and outcome.began_at < killed_at

            # right, and complete: every core in the output is the expected result
            output = zarr.open_group(tmp_path / "out.zarr", mode="r")
            np.testing.assert_array_equal(output["deconvolved"][...], sleepy_result(small_volume, ITERATIONS))
            assert output.attrs["rqml"]["status"] == "complete"

            alerts = [e for _, e in client.get_events(events.ALERTS)]
            degraded = {e["worker"] for e in alerts if e["kind"] == "node-degraded"}
            assert len(degraded) == 2 and all(e["seconds"] > 1 for e in alerts if e["kind"] == "node-degraded")
            assert any(e["kind"] == "reconciled" for e in alerts)
            health = [http_json(p, "/health") for p in http.values()]
            assert all(h["status"] == "ok" and h["held"] == 0 and h["outbox"] == 0 for h in health)
    finally:
        for worker in workers:
            worker.kill()
        scheduler.kill()


@pytest.mark.parametrize(
    ("far_slowdown", "resolution"),
    [
        ("3", "duplicate-result"),  # the near node finishes first: the far node's result is discarded
        ("1", "duplicate-run"),  # the far node finishes first: its result wins, the near node's run stops
    ],
)
def test_a_node_cut_off_while_its_tasks_move_elsewhere_reconnects_and_duplicates_resolve_to_one(
    tmp_path, small_volume, far_slowdown, resolution
):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    http = {"near": free_port(), "far": free_port()}
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    link = TcpLink(port)  # the far node reaches the scheduler only through this link
    workers = [rqml_worker(address, "near", http["near"], tmp_path / "workers").start()]
    try:
        with Client(address, timeout=60) as client:  # waits for the scheduler to be up
            workers.append(
                rqml_worker(link.address, "far", http["far"], tmp_path / "workers", env={"RQML_TEST_SLOWDOWN": far_slowdown}).start()
            )
            client.wait_for_workers(2, timeout=60)
            client.sync(client.scheduler.rqml_policy, policy=POLICY)
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", TILE, 200, 0.01, "cut")
            keys = {t.key: t.task_id for t in pipeline.tasks()}
            run = RunInBackground(pipeline, client)
            wait_for(lambda: all(len(its) == 2 and min(its.values()) >= 10 for its in map(iterations, http.values())), timeout=60)
            far_tasks = set(iterations(http["far"]))
            far_ids = {keys[k]: k for k in far_tasks}

            link.cut()
            # the scheduler gives the far node's tasks to the near one; the far node goes on alone
            wait_for(lambda: far_tasks <= set(iterations(http["near"])), timeout=30)
            assert (http_json(http["far"], "/health") or {}).get("status") == "degraded"
            wait_for(lambda: http_json(http["far"], "/health")["outbox"] == 2, timeout=60)
            link.restore()

            report = run.result(timeout=120)
            assert sorted(o.task_id for o in report.outcomes) == sorted(keys.values())
            assert all(o.iterations == 200 for o in report.outcomes)
            far = wait_for(lambda: (h := http_json(http["far"], "/health")) and h["status"] == "ok" and h["outbox"] == 0 and h)
            assert far["held"] == 0 and far["reconciled"] >= 2

            # each of the far node's tasks ended with one accepted result; an alert records the other
            alerts = [e for _, e in client.get_events(events.ALERTS)]
            duplicates = [e for e in alerts if e["kind"] == resolution]
            assert sorted(e["task_id"] for e in duplicates) == sorted(keys[k] for k in far_tasks)
            names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
            winner = "near" if resolution == "duplicate-result" else "far"
            assert all(names[e["kept"]] == winner and names[e["discarded"]] != winner for e in duplicates)
            assert sorted(names[o.node] for o in report.outcomes if far_ids.get(o.task_id)) == [winner] * 2
            np.testing.assert_array_equal(
                zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"][...],
                sleepy_result(small_volume, 200),
            )
    finally:
        for worker in workers:
            worker.kill()
        scheduler.kill()
        link.close()

