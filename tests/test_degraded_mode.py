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
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client
from prometheus_client.parser import text_string_to_metric_families

from rqml_dask import Pipeline, events
from rqml_dask.node.state import NodeState
from rqml_dask.pipeline.pipeline import RunReport

from dask_processes import DaskProcess, TcpLink, dask_scheduler, rqml_worker
from etcd_server import free_port
from conftest import write_yaml
from heterogeneous_cluster import sleepy_pipeline, sleepy_result, uninterrupted_result
from timing import bound, wait_for

pytestmark = pytest.mark.slow

ITERATIONS = 300
TILE = [12, 24, 48]  # 4 tasks on the 24x48x48 test volume
POLICY = {"version": 2, "min_concurrency": 4}  # every task refining at once on its node


def http_json(port: int, path: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=bound(5)) as response:
            return json.loads(response.read())
    except OSError:
        return None  # the worker is not (yet) serving


def iterations(port: int) -> dict[str, int]:
    """Task key -> the iteration it has reached on the node serving ``port``."""
    state = http_json(port, "/checkpoint_state")
    return {key: t["iteration"] for key, t in (state or {}).get("tasks", {}).items() if t["iteration"] is not None}


def checkpointed(port: int) -> dict[str, int]:
    """Task key -> the iteration of its newest checkpoint written on the node serving ``port``."""
    state = http_json(port, "/checkpoint_state")
    return {key: t["last_checkpoint_iteration"] for key, t in (state or {}).get("tasks", {}).items()
            if t.get("last_checkpoint_iteration") is not None}


def placed(http: dict[str, int], tasks: int = 4, at_least: int = 10) -> dict[str, dict[str, int]] | None:
    """Node name -> the tasks it refines and their iterations, once all ``tasks`` refine and
    each has ``at_least`` iterations (the scheduler plugin places them at random, by weight)."""
    placement = {name: iterations(port) for name, port in http.items()}
    reached = [i for tasks_ in placement.values() for i in tasks_.values()]
    return placement if len(reached) == tasks and min(reached) >= at_least else None


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
        self.join(bound(timeout))
        assert not self.is_alive(), f"the pipeline did not finish within {bound(timeout):.0f} s"
        if self.error is not None:
            raise self.error
        return self.report


def test_scheduler_killed_mid_run_nodes_keep_refining_reconcile_and_the_run_completes(tmp_path, engine_case, caplog):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    http = {"node-0": free_port(), "node-1": free_port()}
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    workers = [rqml_worker(address, name, http[name], tmp_path / "workers").start() for name in http]
    try:
        with Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(2, timeout=bound(60))
            client.sync(client.scheduler.rqml_policy, policy=POLICY)
            config = engine_case.pipeline(tmp_path / "out.zarr", tasks=4, iterations=ITERATIONS, delay=0.02, name="outage")
            pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config))
            run = RunInBackground(pipeline, client)
            placement = wait_for(lambda: placed(http, at_least=30), timeout=60)  # every task refining, checkpointed
            victim = max(placement, key=lambda name: len(placement[name]))  # the node to kill while degraded
            names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
            pids = {names[addr]: pid for addr, pid in client.run(os.getpid).items()}
            scheduler.kill()  # SIGKILL
            killed_at = time.time()

            # Both nodes notice and keep refining on their own, checkpointing into LMDB.
            wait_for(lambda: all((http_json(p, "/health") or {}).get("status") == "degraded" for p in http.values()), what="both nodes degraded")
            before = {name: checkpointed(p) for name, p in http.items()}
            assert sorted(k for c in before.values() for k in c) == sorted(k for p in placement.values() for k in p)
            wait_for(lambda: all(checkpointed(http[n]).get(k, -1) >= i + 20 for n in http for k, i in before[n].items()), what="checkpoints written while degraded")

            # A worker killed while degraded: its Nanny starts it again, and the new process
            # resumes the node's tasks from LMDB before any scheduler is back.
            victim_tasks = iterations(http[victim])
            written = checkpointed(http[victim])  # its newest checkpoints (the writer trails the refinement)
            os.kill(pids[victim], signal.SIGKILL)
            resumed = wait_for(lambda: (its := iterations(http[victim])) and its.keys() == victim_tasks.keys() and its, timeout=60)
            # from its newest checkpoints (or the one before, were the newest still being written), not from zero
            assert all(resumed[k] >= written[k] - 10 > 0 for k in victim_tasks), (resumed, written, victim_tasks)
            wait_for(lambda: all(iterations(http[victim]).get(k, 0) > i + 20 for k, i in victim_tasks.items()), what="the restarted worker refining")
            assert http_json(http[victim], "/health")["status"] == "degraded"
            assert run.is_alive()  # the client is still waiting

            scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()  # same address
            report = run.result(timeout=120)

            assert sorted(o.task_id for o in report.outcomes) == [f"outage/{i}" for i in range(4)]
            assert all(o.iterations == ITERATIONS and o.status == "max_iterations" for o in report.outcomes), report.outcomes
            said = [r.getMessage() for r in caplog.records if r.name == "rqml_dask.pipeline.pipeline"]
            assert any(m.startswith(f"lost the scheduler {address} with ") for m in said), said  # the run says so, and
            assert any(m.startswith(f"the scheduler {address} answers again") for m in said), said  # when it is back
            keys = {t.task_id: t.key for t in pipeline.tasks()}
            for outcome in report.outcomes:
                # no task started again from zero: it ran through the outage, or went on from a checkpoint
                assert outcome.began_at < killed_at or outcome.resumed_from is not None, outcome
                if keys[outcome.task_id] in victim_tasks:  # resumed by the restarted worker, from LMDB
                    # from its newest checkpoint, or the one before where the newest was still being written
                    assert outcome.resumed_from >= written[keys[outcome.task_id]] - 10, outcome

            # right, and complete: every core in the output is the expected result
            output = zarr.open_group(tmp_path / "out.zarr", mode="r")
            np.testing.assert_array_equal(output[engine_case.output_array][...], uninterrupted_result(pipeline))
            assert output.attrs["rqml"]["status"] == "complete"

            # each node, once back, says how long it worked alone (one may come back after the
            # run is over, its tasks taken up by the other: its alert follows, and it ends idle)
            def both_back():
                alerts = [e for _, e in client.get_events(events.ALERTS)]
                degraded = [e for e in alerts if e["kind"] == "node-degraded"]
                health = [http_json(p, "/health") or {} for p in http.values()]
                back = all(h.get("status") == "ok" and h.get("jobs") == 0 and h.get("outbox") == 0 for h in health)
                return back and len({e["worker"] for e in degraded}) == 2 and (alerts, degraded)

            alerts, degraded = wait_for(both_back, what="both nodes reconciled and idle")
            assert all(e["seconds"] > 1 for e in degraded)
            assert any(e["kind"] == "reconciled" for e in alerts)
    finally:
        for worker in workers:
            worker.kill()
        scheduler.kill()


@pytest.mark.parametrize(
    "resolution",
    [
        # it reconnects after the other node finished its tasks: its own results are discarded
        # (and the dashboard shows the outage and the duplicates)
        pytest.param("duplicate-result", marks=pytest.mark.browser),
        # it reconnects while the other node still refines them: its finished results win
        "duplicate-run",
    ],
)
def test_a_node_cut_off_while_its_tasks_move_elsewhere_reconnects_and_duplicates_resolve_to_one(
    tmp_path, small_volume, resolution, request
):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    http = {"node-0": free_port(), "node-1": free_port()}
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    links = {name: TcpLink(port) for name in http}  # each node reaches the scheduler through its own link
    workers = []
    try:
        with Client(address, timeout=bound(60)) as client:  # waits for the scheduler to be up
            workers += [rqml_worker(links[name].address, name, http[name], tmp_path / "workers").start() for name in http]
            client.wait_for_workers(2, timeout=bound(60))
            client.sync(client.scheduler.rqml_policy, policy=POLICY)
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", TILE, 200, 0.01, "cut")
            keys = {t.key: t.task_id for t in pipeline.tasks()}
            run = RunInBackground(pipeline, client)
            placement = wait_for(lambda: placed(http), timeout=60)
            far = min((name for name in http if placement[name]), key=lambda name: len(placement[name]))
            near = next(name for name in http if name != far)
            far_tasks = set(placement[far])  # one or two tasks
            far_ids = {keys[k]: k for k in far_tasks}

            links[far].cut()
            # the scheduler gives the far node's tasks to the near one; the far node goes on alone
            wait_for(lambda: far_tasks <= set(iterations(http[near])), what="the far node's tasks refining on the near node")
            wait_for(lambda: (http_json(http[far], "/health") or {}).get("status") == "degraded", what="the far node degraded")
            wait_for(lambda: (http_json(http[far], "/health") or {}).get("outbox") == len(far_tasks), what="the far node finished alone")
            if resolution == "duplicate-result":
                report = run.result(timeout=120)  # the near node's results are accepted meanwhile
                links[far].restore()
            else:
                links[far].restore()
                report = run.result(timeout=120)
            assert sorted(o.task_id for o in report.outcomes) == sorted(keys.values())
            assert all(o.iterations == 200 for o in report.outcomes)
            health = wait_for(lambda: (h := http_json(http[far], "/health")) and h["status"] == "ok" and h["outbox"] == 0 and h)
            assert health["jobs"] == 0 and health["reconciled"] >= len(far_tasks)

            # each of the far node's tasks ended with one accepted result; an alert records the other
            alerts = [e for _, e in client.get_events(events.ALERTS)]
            duplicates = [e for e in alerts if e["kind"] == resolution]
            assert sorted(e["task_id"] for e in duplicates) == sorted(far_ids)
            names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
            winner = near if resolution == "duplicate-result" else far
            assert all(names[e["kept"]] == winner and names[e["discarded"]] != winner for e in duplicates)
            assert [names[o.node] for o in report.outcomes if o.task_id in far_ids] == [winner] * len(far_tasks)
            np.testing.assert_array_equal(
                zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"][...],
                sleepy_result(small_volume, 200),
            )
            status = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "status", "--scheduler", address],
                                    capture_output=True, text=True, timeout=bound(60))
            lines = {n: line for line in status.stdout.splitlines() for n in names.values() if line.startswith(f"{n} ")}  # by --name
            assert "lost 1x" in lines[far] and " ok " in lines[near], status.stdout
            if request.node.get_closest_marker("browser"):
                check_dashboard(request.getfixturevalue("browser"), client, far, near, len(far_tasks), tmp_path / "rqml-page.png")
    finally:
        for worker in workers:
            worker.kill()
        scheduler.kill()
        for link in links.values():
            link.close()


def test_a_node_whose_link_is_left_half_open_registers_again_and_its_tasks_finish(tmp_path, small_volume):
    """The node's stream to the scheduler breaks as a partition or a NAT that dropped it
    breaks it: the scheduler sees the connection end, the node does not. The scheduler removes
    the node, and the next heartbeat, which gets through, is answered "missing": a stock worker
    closed then, its Nanny with it, and the run waited for a node that was gone. The node
    waits for its stream to say why, ends it, goes on in degraded mode, registers again, and
    the run completes bit for bit with the node's process never restarted."""
    port, http = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    link = TcpLink(port)
    worker = rqml_worker(link.address, "node-0", http, tmp_path / "workers")
    try:
        with Client(address, timeout=bound(60)) as client:
            worker.start()
            client.wait_for_workers(1, timeout=bound(60))
            client.sync(client.scheduler.rqml_policy, policy=POLICY)
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", TILE, 300, 0.01, "half-open")
            run = RunInBackground(pipeline, client)
            wait_for(lambda: placed({"node-0": http}), timeout=60)
            [(first, stream)] = client.run(lambda dask_worker: dask_worker.batched_stream.comm.local_address).items()
            link.half_open(int(stream.rsplit(":", 1)[1]))
            wait_for(lambda: first not in client.scheduler_info()["workers"], what="node-0 removed by the scheduler")
            wait_for(lambda: first in client.scheduler_info()["workers"], what="node-0 registered again")
            report = run.result(timeout=120)
            alerts = [e["kind"] for _, e in client.get_events(events.ALERTS)]
        assert worker.process.poll() is None, "the node's process ended"
        assert len(report.outcomes) == 4 and all(o.iterations == 300 for o in report.outcomes)
        np.testing.assert_array_equal(zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"][...],
                                      sleepy_result(small_volume, 300))
        assert "node-degraded" in alerts, alerts
        assert "connection never said why (half-open" in worker.log.read_text()
    finally:
        worker.kill()
        scheduler.kill()
        link.close()


def check_dashboard(browser, client: Client, far: str, near: str, discarded: int, screenshot: Path) -> None:
    """The scheduler dashboard's ``/rqml`` page, in Chromium, shows the far node's outage and
    the duplicates resolved (read from the page's Bokeh document, as the browser has it)."""
    browser.get(client.dashboard_link.replace("/status", "/rqml"))
    read = ("const doc = Bokeh.documents[0]; return [doc.get_model_by_name('rqml-nodes').data, "
            "doc.get_model_by_name('rqml-alerts').data, doc.get_model_by_name('rqml-summary').text]")

    def shown():
        try:
            nodes, alerts, summary = browser.execute_script(read)
        except Exception:
            return None  # the page is still loading
        rows = {name: {k: v[i] for k, v in nodes.items()} for i, name in enumerate(nodes["name"])}
        if far in rows and rows[far]["discarded"] == discarded and alerts["kind"].count("duplicate-result") == discarded:
            return rows, alerts, summary
        return None

    rows, alerts, summary = wait_for(shown, what="the dashboard showing the outage")
    browser.save_screenshot(str(screenshot))
    assert rows[far]["link"] == "ok" and rows[far]["losses"] == 1 and rows[far]["degraded_s"] > 1
    assert rows[near]["losses"] == 0
    assert "node-degraded" in alerts["kind"] and summary.startswith("2 nodes, 1 of them worked without a scheduler")


class RqmlRun:
    """``rqml run`` of the sleepy pipeline over ``store`` (TILE tiles, ``iterations`` each)
    against the scheduler at ``address``, as a subprocess with the tests' models importable."""

    def __init__(self, tmp_path: Path, store: Path, iterations: int, name: str, address: str) -> None:
        pipeline = sleepy_pipeline(store, tmp_path / "out.zarr", TILE, iterations, 0.02, name)
        config = write_yaml(tmp_path / f"{name}.yaml", pipeline.config.model_dump(mode="json", exclude_none=True))
        self.command = [sys.executable, "-m", "rqml_dask.cli", "run", str(config), "--scheduler", address, "--no-progress"]
        self.environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        self.log = tmp_path / "first-run.log"

    def killed_once_placed(self, http: dict[str, int]) -> dict[str, dict[str, int]]:
        """Start it, and SIGKILL it (the client) once every task refines with 20 iterations
        done; the placement then."""
        with open(self.log, "wb") as log:
            first = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.environ, start_new_session=True)
        try:
            return wait_for(lambda: placed(http, at_least=20), timeout=60)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(bound(30))

    def again(self, timeout: float) -> subprocess.CompletedProcess:
        """Run it again to the end."""
        return subprocess.run(self.command, capture_output=True, text=True, env=self.environ, timeout=bound(timeout))


def test_client_and_scheduler_killed_nodes_finish_alone_and_rqml_run_again_picks_up_their_results(tmp_path, small_volume):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    http = {"node-0": free_port(), "node-1": free_port()}
    rqml_run = RqmlRun(tmp_path, small_volume, 200, "rerun", address)
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    workers = [rqml_worker(address, name, http[name], tmp_path / "workers").start() for name in http]
    try:
        with Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(2, timeout=bound(60))
            client.sync(client.scheduler.rqml_policy, policy=POLICY)
            names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
            pids = {names[addr]: pid for addr, pid in client.run(os.getpid).items()}
        placement = rqml_run.killed_once_placed(http)  # the client...
        scheduler.kill()  # ...and the scheduler

        # the nodes finish every task on their own; the results wait in their outboxes
        wait_for(lambda: all((http_json(p, "/health") or {}).get("outbox") == len(placement[n]) for n, p in http.items()), timeout=60)
        assert not zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"].nchunks_initialized
        # a worker killed with a full outbox: its Nanny's new process parks the results again
        # from the final checkpoints, computing nothing
        victim = max(placement, key=lambda name: len(placement[name]))
        os.kill(pids[victim], signal.SIGKILL)
        wait_for(lambda: (h := http_json(http[victim], "/health")) and h["scheduler_losses"] == 0
                 and h["outbox"] == len(placement[victim]) and h["status"] == "degraded", timeout=60)
        assert metric(http[victim], "rqml_iterations_total") == 0
        scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
        # reconnected, the nodes have their results accepted and write them, with no client
        wait_for(lambda: all((h := http_json(p, "/health")) and h["status"] == "ok" and h["jobs"] == 0 for p in http.values()), timeout=60)
        iterations_done = {name: metric(p, "rqml_iterations_total") for name, p in http.items()}

        second = rqml_run.again(120)
        assert second.returncode == 0, second.stderr
        assert re.search(r"recovered\s+0 resumed from checkpoints, 4 finished by nodes without a scheduler, 0 reused", second.stdout), second.stdout
        assert re.search(r"^iterations\s+800 ", second.stdout, re.M)
        assert {name: metric(p, "rqml_iterations_total") for name, p in http.items()} == iterations_done  # nothing recomputed
        output = zarr.open_group(tmp_path / "out.zarr", mode="r")
        np.testing.assert_array_equal(output["deconvolved"][...], sleepy_result(small_volume, 200))
        assert output.attrs["rqml"]["status"] == "complete"
    finally:
        for worker in workers:
            worker.kill()
        scheduler.kill()


def test_a_task_a_node_kept_refining_while_its_input_changed_is_computed_again_from_the_new_input(tmp_path, small_volume):
    store = tmp_path / "in.zarr"
    shutil.copytree(small_volume, store)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    http = {"node-0": free_port(), "node-1": free_port()}
    rqml_run = RqmlRun(tmp_path, store, 600, "changed", address)
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    workers = [rqml_worker(address, name, http[name], tmp_path / "workers").start() for name in http]
    try:
        with Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(2, timeout=bound(60))
            client.sync(client.scheduler.rqml_policy, policy=POLICY)
        rqml_run.killed_once_placed(http)
        scheduler.kill()
        wait_for(lambda: all((http_json(p, "/health") or {}).get("status") == "degraded" for p in http.values()), timeout=60)
        observed = zarr.open_group(store, mode="r+")["observed"]
        observed[...] = observed[...] * 1.5  # regenerated in place while the nodes refine the old data
        scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
        second = rqml_run.again(180)
        assert second.returncode == 0, second.stdout + second.stderr
        assert re.search(r"finished by nodes without a scheduler, 0 reused", second.stdout), second.stdout
        np.testing.assert_array_equal(zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"][...],
                                      sleepy_result(store, 600))  # from the new input, not the old
    finally:
        for worker in workers:
            worker.kill()
        scheduler.kill()


def metric(port: int, name: str) -> float:
    """One sample of the worker's Prometheus ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=bound(5)) as response:
        for family in text_string_to_metric_families(response.read().decode()):
            for sample in family.samples:
                if sample.name == name:
                    return sample.value
    raise AssertionError(f"{name} not in /metrics")


def test_a_node_gives_up_after_the_degraded_limit_keeps_its_tasks_and_alerts_of_damaged_checkpoints_at_restart(
        tmp_path, small_volume):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    http = {"node-0": free_port()}
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    worker = rqml_worker(address, "node-0", http["node-0"], tmp_path / "workers",
                         env={"DASK_RQML__NODE__DEGRADED_LIMIT": "3"}).start()
    try:
        with Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(1, timeout=bound(60))
            client.sync(client.scheduler.rqml_policy, policy={"version": 2, "min_concurrency": 2, "max_concurrency": 2})
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", TILE, 10_000, 0.02, "limit")
            futures = pipeline.submit(client)
            # two tasks refining and one queued (room: the concurrency limit plus one)
            wait_for(lambda: (h := http_json(http["node-0"], "/health")) and h["jobs"] == 3 and placed(http, tasks=2), timeout=60)
            scheduler.kill()
            lost_at = time.monotonic()
            worker.process.wait(bound(60))  # the worker closes, and its Nanny with it
            assert 3 <= time.monotonic() - lost_at < bound(30)
            del futures
        state = NodeState(tmp_path / "workers" / "dask-scratch-space" / "rqml-node" / "node-0" / "node.lmdb")
        jobs = {task.task_id for task in state.jobs()}
        assert len(jobs) == 3  # what a restarted node 'node-0' takes up again
        # the checkpoints' artifact chunks damaged while the node was down: at its restart it
        # resumes its jobs before it registers, rejects every checkpoint, and the alerts it
        # raised with no scheduler reach the scheduler once it registers
        artifacts = tmp_path / "out.zarr.checkpoints"
        chunks = [p for p in artifacts.rglob("*") if p.is_file() and "c" in p.relative_to(artifacts).parts]
        checkpointed = {f"{d.parent.name}/{d.name.split('@')[0]}" for d in (artifacts / "tasks").glob("*/*@*")}
        assert chunks and len(checkpointed) == 2 and checkpointed <= jobs  # the two refining; the queued one has none
        for chunk in chunks:
            chunk.write_bytes(np.random.default_rng(1).bytes(chunk.stat().st_size))
        scheduler = dask_scheduler(port, tmp_path / "scheduler-2.log").start()
        worker = rqml_worker(address, "node-0", http["node-0"], tmp_path / "workers").start()
        with Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(1, timeout=bound(60))
            rejected = wait_for(lambda: {e["task_id"] for _, e in client.get_events(events.ALERTS) if e["kind"] == "checkpoint-rejected"}
                                == checkpointed and client.get_events(events.ALERTS), what="a checkpoint-rejected alert per checkpointed job")
            assert all("raised_at" in e for _, e in rejected if e["kind"] == "checkpoint-rejected")
    finally:
        worker.kill()
        scheduler.kill()


def test_a_damaged_node_state_is_moved_aside_with_an_alert_and_the_node_works(tmp_path, small_volume):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    state = tmp_path / "workers" / "dask-scratch-space" / "rqml-node" / "node-0" / "node.lmdb"
    state.mkdir(parents=True)
    (state / "data.mdb").write_bytes(np.random.default_rng(0).bytes(64 * 1024))  # not an LMDB file
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    worker = rqml_worker(address, "node-0", free_port(), tmp_path / "workers").start()
    try:
        with Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(1, timeout=bound(60))
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", TILE, 20, 0.01, "damaged")
            report = pipeline.run(client, progress=False)
            assert len(report.outcomes) == 4 and not report.rejected
            alerts = wait_for(lambda: [e for _, e in client.get_events(events.ALERTS) if e["kind"] == "node-state-damaged"],
                              what="the node-state-damaged alert")
        [aside] = state.parent.glob("node.lmdb.damaged-*")
        assert len(alerts) == 1 and str(aside) in alerts[0]["problem"] and "InvalidError" in alerts[0]["problem"]
        assert (aside / "data.mdb").read_bytes() == np.random.default_rng(0).bytes(64 * 1024)  # kept for a post-mortem
        assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"
    finally:
        worker.kill()
        scheduler.kill()


def test_rqml_events_says_when_the_scheduler_is_lost_and_follows_the_one_that_answers_again(tmp_path):
    from test_scheduler_plugin import subscribed_to_every_topic

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()
    follow = subprocess.Popen([sys.executable, "-m", "rqml_dask.cli", "events", "--scheduler", address],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, into=into: into.extend(s), daemon=True)
               for s, into in ((follow.stdout, out), (follow.stderr, err))]
    for reader in readers:
        reader.start()
    try:
        def followed(client: Client) -> bool:
            return client.run_on_scheduler(subscribed_to_every_topic, client_id=client.id)

        with Client(address, timeout=bound(60)) as client:
            wait_for(lambda: followed(client), what="rqml events subscribed")
        scheduler.kill()
        wait_for(lambda: any(f"lost the scheduler {address}" in line for line in err), what="the loss said on stderr")
        assert follow.poll() is None  # still waiting, not gone
        scheduler = dask_scheduler(port, tmp_path / "scheduler.log").start()  # the same address
        wait_for(lambda: any("answers again" in line for line in err), timeout=60, what="the return said on stderr")
        with Client(address, timeout=bound(60)) as client:
            wait_for(lambda: followed(client), what="rqml events subscribed to the new scheduler")
            client.log_event(events.ALERTS, {"kind": "after-the-outage", "time": time.time()})
            wait_for(lambda: any("after-the-outage" in line for line in out), what="an event of the new scheduler printed")
    finally:
        follow.terminate()
        follow.wait(bound(30))
        scheduler.kill()
    assert follow.returncode == 0, "".join(err)


@pytest.mark.parametrize("liar", [None, "node-1"])
def test_over_pqtls_results_finished_without_a_scheduler_are_checked_at_reconciliation(tmp_path, small_volume, liar):
    """Both nodes finish their tasks while the scheduler is down and report them, signed,
    when it is back: the scheduler accepts the results that verify; a node whose reported
    result was changed after it signed it (``liar``) is quarantined, and its tasks are
    computed again by the other node."""
    import dask

    from rqml_dask.trust import ca

    from test_trust import trust_config, trust_env

    authority = tmp_path / "ca"
    ca.init(authority)
    for name, role in (("scheduler", "scheduler"), ("node-0", "node"), ("node-1", "node"), ("alice", "client")):
        ca.issue(authority, name, role)

    port = free_port()
    address = f"pqtls://127.0.0.1:{port}"
    http = {"node-0": free_port(), "node-1": free_port()}
    scheduler_args = ["scheduler", "--protocol", "pqtls", "--host", "127.0.0.1", "--port", str(port),
                      "--dashboard-address", "127.0.0.1:0", "--preload", "rqml_dask.scheduler"]
    exactly_two = {"DASK_RQML__SCHEDULER__QUEUED_PER_NODE": "0"}  # with the policy below: two tasks on each node
    scheduler = DaskProcess(scheduler_args, tmp_path / "scheduler.log", {**trust_env(authority, "scheduler"), **exactly_two}).start()
    workers = [rqml_worker(address, name, http[name], tmp_path / "workers",
                           {**trust_env(authority, name), "RQML_ATTACK": "tamper-outbox" if name == liar else ""},
                           preloads=("lying_node",) if name == liar else ()).start()
               for name in http]
    try:
        with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(2, timeout=bound(60))
            client.sync(client.scheduler.rqml_policy, policy={"version": 2, "min_concurrency": 2, "max_concurrency": 2})
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", TILE, 150, 0.02, "signed")
            run = RunInBackground(pipeline, client)
            placement = wait_for(lambda: placed(http, at_least=10), timeout=60)
            assert all(placement.values()), placement  # each node refines some
            names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
            scheduler.kill()  # SIGKILL: the nodes finish on their own, their results wait in their outboxes

            def finished_alone() -> bool:
                health = [http_json(p, "/health") or {} for p in http.values()]
                return all(h.get("status") == "degraded" and h.get("jobs", 0) > 0 and h.get("outbox") == h.get("jobs") for h in health)

            wait_for(finished_alone, timeout=60, what="every task finished in degraded mode")
            scheduler = DaskProcess(scheduler_args, tmp_path / "scheduler.log", {**trust_env(authority, "scheduler"), **exactly_two}).start()
            report = run.result(timeout=120)
            alerts = wait_for(lambda: (a := [e for _, e in client.get_events(events.ALERTS)])
                              and any(e["kind"] == "reconciled" for e in a) and a, what="a reconciliation")
            # the liar reconciles when it reconnects, which may be after the other node took its
            # tasks over and the run ended: its refusal follows
            quarantined = client.sync(client.scheduler.rqml_status)["quarantined"] if liar is None else wait_for(
                lambda: liar in (q := client.sync(client.scheduler.rqml_status)["quarantined"]) and q,
                what=f"{liar} quarantined at its reconciliation")
            names.update({addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()})
        assert all(o.accepted and o.iterations == 150 for o in report.outcomes) and len(report.outcomes) == 4
        np.testing.assert_array_equal(zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"][...],
                                      uninterrupted_result(pipeline))
        if liar is None:
            assert not quarantined
            assert {names[o.node] for o in report.outcomes if o.reconciled} == {"node-0", "node-1"}  # from both outboxes
        else:
            assert "result refused at reconciliation" in quarantined[liar] and "does not match the record" in quarantined[liar]
            assert any(e["kind"] == "node-quarantined" and e["node_name"] == liar and e["security"] for e in alerts)
            assert {names[o.node] for o in report.outcomes} == {"node-0"}  # nothing of the liar's
        assert {o.signature["signer"] for o in report.outcomes} <= {"node-0", "node-1"} - {liar}
    finally:
        for worker in workers:
            worker.kill()
        scheduler.kill()
