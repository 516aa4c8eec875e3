"""The node plugin on real worker processes: heartbeat figures, HTTP endpoints, a killed worker."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client
from prometheus_client.parser import text_string_to_metric_families

from rqml_dask import Pipeline

from dask_processes import bare_worker, dask_scheduler
from etcd_server import free_port
from conftest import local_cluster, pipeline_dict, write_yaml
from heterogeneous_cluster import sleepy_pipeline, sleepy_result
from timing import bound, gather, until, wait_for

pytestmark = pytest.mark.slow

ADVERTISED = {
    "inbound", "refining", "outbound", "busy_fraction", "concurrency_limit", "iterations_per_second",
    "iterations_total", "warm_models", "host_memory_fraction", "system_memory_fraction", "gpu_count",
    "gpus", "device_memory_fraction", "bandwidth", "checkpoints", "policy_version",
}


def node_metrics(client: Client) -> dict[str, dict]:
    return client.run_on_scheduler(
        lambda dask_scheduler: {addr: ws.metrics.get("rqml") for addr, ws in dask_scheduler.workers.items()}
    )


def checkpointed_midway(client: Client) -> list[str]:
    """Workers refining a task that has a checkpoint (written and not yet superseded)."""
    states = client.run(lambda dask_worker: dask_worker.plugins["rqml-node"].checkpoint_state()["tasks"])
    return [
        address
        for address, tasks in states.items()
        if any(t.get("iteration") and (t.get("last_checkpoint_iteration") or 0) >= 20 for t in tasks.values())
    ]


def long_pipeline(tmp_path, store, iterations=400, name="long") -> Pipeline:
    fixed = {"max_iterations": iterations, "check_every": 10, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 10**6, "accept_max_iterations": True}
    data = pipeline_dict(store, tmp_path / f"{name}.zarr", name=name, convergence=fixed, models={"ladder": ["richardson_lucy"]})
    return Pipeline.from_yaml(write_yaml(tmp_path / f"{name}.yaml", data))


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=bound(10)) as response:
        return response.status, response.read().decode()


def test_heartbeat_advertises_every_figure_and_follows_load(tmp_path, small_volume, client):
    idle = wait_for(lambda: (m := node_metrics(client)) and all(v for v in m.values()) and m)
    for figures in idle.values():
        assert ADVERTISED <= set(figures)
        assert figures["refining"] == 0 and figures["gpu_count"] == 0 and figures["bandwidth"] > 0
    before = sum(f["iterations_total"] for f in idle.values())
    futures = long_pipeline(tmp_path, small_volume).submit(client)
    busy = wait_for(lambda: (m := node_metrics(client)) and sum(f["refining"] for f in m.values()) >= 2
                    and all(f["busy_fraction"] > 0.2 for f in m.values()) and m)
    assert all("richardson_lucy" in f["warm_models"] and f["iterations_per_second"] > 0 for f in busy.values())
    # what `rqml status` and the /rqml page show: the rate each node advertises (it once showed 0 always)
    shown = wait_for(lambda: (n := client.sync(client.scheduler.rqml_status)["nodes"])
                     and all(v["iterations_per_second"] > 0 for v in n.values()) and n, what="the iteration rates in rqml_status")
    assert set(shown) == set(busy)
    assert sum(f["inbound"] + f["refining"] for f in busy.values()) >= 2
    gather(client, futures)
    after = wait_for(lambda: (m := node_metrics(client)) and all(f["refining"] == 0 and f["busy_fraction"] < 0.05 for f in m.values()) and m)
    assert sum(f["iterations_total"] for f in after.values()) == before + 8 * 400
    assert sum(f["tasks_completed"] for f in after.values()) - sum(f["tasks_completed"] for f in idle.values()) == 8


def test_node_endpoints_answer_over_http_on_every_worker(tmp_path, small_volume, client):
    # the paced model: every task refines for at least 1.5 s whatever the load, one after
    # another on a node (6 s), so the nodes still refine while their pages are read (8 real
    # RL tasks took 1.5 s in all, and a busy machine once saw a node finish before the reads)
    futures = sleepy_pipeline(small_volume, tmp_path / "http.zarr", [12, 24, 24], iterations=150, delay=0.01, name="http").submit(client)
    # each node refining (a total of two could be one node refining both: the checks are per node)
    wait_for(lambda: (m := node_metrics(client)) and len(m) == 2 and all(f and f["refining"] >= 1 for f in m.values()),
             what="both nodes refining")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2
    for info in workers.values():
        base = f"http://127.0.0.1:{info['services']['dashboard']}"
        status, body = http_get(base + "/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok" and health["jobs"] >= 1 and health["outbox"] == 0
        status, body = http_get(base + "/queue_stats")
        stats = json.loads(body)
        assert status == 200 and set(stats) == {"inbound", "refinement", "outbound"}
        assert stats["refinement"]["depth"] >= 1 and stats["refinement"]["by_class"] == {"deconvolution": stats["refinement"]["depth"]}
        assert stats["refinement"]["oldest_age_s"] > 0
        status, body = http_get(base + "/checkpoint_state")
        tasks = json.loads(body)["tasks"]
        # the tasks refining here have an iteration; one the node only checkpointed (moved on
        # to another node, or finished and awaiting delivery) has none
        assert status == 200 and any(t["iteration"] is not None and t["iteration"] >= 0 for t in tasks.values())
        assert all(t["iteration"] is None or t["iteration"] >= 0 for t in tasks.values())
        status, body = http_get(base + "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert {"rqml_queue_depth", "rqml_iterations", "rqml_escalations", "rqml_checkpoint_lag_seconds"} <= set(families)
        assert "dask_worker_tasks" in families  # Dask's own series are still there
        depth = {s.labels["queue"]: s.value for s in families["rqml_queue_depth"].samples}
        assert depth["refining"] >= 1
    gather(client, futures)


def refinements_alive() -> int:
    return sum(type(o).__name__ == "Refinement" for o in gc.get_objects())


def test_a_delivered_task_leaves_no_refinement_behind_without_waiting_for_the_garbage_collector(tmp_path, small_volume, client):
    # A finished refinement holds the task's arrays: a reference cycle would keep every one
    # of them until a full collection (seen as +10 % CPU on the workers, bench_pipeline).
    client.run(lambda: (gc.collect(), gc.disable()))
    try:
        long_pipeline(tmp_path, small_volume, iterations=20, name="freed").run(client, progress=False)
        freed = lambda: not any(client.run(refinements_alive).values())  # noqa: E731
        wait_for(freed, what="every refinement freed")  # the refinement thread lets go of its last round at once
    finally:
        client.run(gc.enable)


def node_holdings(dask_worker) -> dict:
    """What a node holds of its tasks and checkpoint stores (issue 30: a long-lived worker grew run after run)."""
    import threading

    from rqml_dask.stores import lmdb_store

    node = dask_worker.plugins["rqml-node"]
    orchestrator = node.orchestrator
    return {
        "jobs": len(node.jobs),
        "queues": len(orchestrator.inbound) + len(orchestrator.refining) + len(orchestrator.outbound),
        "checkpoint_state": {key: state for c in node.checkpointers.values() for key, state in c.state().items()},
        "writers": sorted(str(c.local.path) for c in node.checkpointers.values()),
        "writer_threads": sum(t.name == "rqml-checkpoint-writer" for t in threading.enumerate()),
        "environments": sorted(str(path) for path in lmdb_store._environments),
    }


def test_a_node_keeps_nothing_of_delivered_tasks_and_closes_the_checkpoint_stores_of_finished_runs(tmp_path, small_volume, client):
    # each run checkpoints beside its own output: new stores on every node, as runs on new inputs
    runs = [long_pipeline(tmp_path, small_volume, iterations=20, name=f"run{i}") for i in range(3)]
    for pipeline in runs:
        pipeline.run(client, progress=False)
    latest = {Path(runs[-1].checkpoint_settings.local.removeprefix("lmdb://").replace("{host}", socket.gethostname())).resolve()}
    for address, held in client.run(node_holdings).items():
        assert held["jobs"] == 0 and held["queues"] == 0 and held["checkpoint_state"] == {}, (address, held)
        # at most the latest run's writer stays open, and only its LMDB environment
        assert len(held["writers"]) <= 1 and held["writer_threads"] == len(held["writers"]), (address, held)
        assert {Path(p) for p in held["environments"]} <= latest and len(held["environments"]) == len(held["writers"]), (address, held)


def test_the_embedded_cluster_workers_run_without_dask_s_profiler(client):
    # its history of stack trees (17 minutes of them) grew a long-lived cluster's workers run after run (issue 30)
    profiling = client.run(lambda dask_worker: "profile-cycle" in dask_worker.periodic_callbacks)
    assert profiling and not any(profiling.values()), profiling


def test_the_embedded_cluster_workers_start_with_one_blas_thread_and_dask_s_start_environment(client):
    """Forked from the fork server, a worker has the environment that server started with
    (``/proc/self/environ``), which is what glibc and OpenBLAS read: Dask's
    ``pre-spawn-environ`` must be in it, not only set in ``os.environ`` after the fork. It
    was not, and each worker's NumPy ran a BLAS thread per core (SciPy's ``cg`` in two
    workers on 2 cores: 4.3x slower)."""

    def start_state() -> tuple[list[int], dict[str, str | None]]:
        from threadpoolctl import threadpool_info

        with open("/proc/self/environ", "rb") as f:
            environ = dict(e.decode().split("=", 1) for e in f.read().split(b"\0") if b"=" in e)
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        return blas, {k: environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")}

    for address, (blas, environ) in client.run(start_state).items():
        assert blas and set(blas) == {1}, (address, blas)  # NumPy's OpenBLAS, one thread
        assert environ == {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_TRIM_THRESHOLD_": "65536",
                           "MALLOC_TOP_PAD_": str(256 * 2**20)}, (address, environ)


def test_a_node_closing_while_its_heartbeat_waits_for_the_scheduler_logs_no_error(tmp_path):
    """A worker that closes (as every node does at the end of ``rqml run``) with a heartbeat
    still waiting for the scheduler's answer: Dask closes its connections after the plugins'
    teardown, and that heartbeat failed with an ERROR and a traceback on the user's terminal
    (seen over pqtls:// in CI). It is cancelled instead; the worker closes and the scheduler
    hears of it."""
    import asyncio
    import logging

    from distributed import Scheduler

    from rqml_dask.node import RQMLWorker

    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]

    async def test() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0") as scheduler:
            answer, asked, release = scheduler.handlers["heartbeat_worker"], asyncio.Event(), asyncio.Event()

            async def held_heartbeat(**message):
                asked.set()
                await release.wait()
                return answer(**message)

            async with RQMLWorker(scheduler.address, nthreads=1, dashboard=False, local_directory=str(tmp_path)) as worker:
                scheduler.handlers["heartbeat_worker"] = held_heartbeat
                beat = asyncio.ensure_future(worker.heartbeat())
                await asyncio.wait_for(asked.wait(), bound(30))
                await worker.close()
                await beat
                release.set()
            await until(lambda: not scheduler.workers, "the scheduler hearing the worker closed")

    logger = logging.getLogger("distributed.worker")
    logger.addHandler(handler)
    try:
        asyncio.run(asyncio.wait_for(test(), bound(60)))
    finally:
        logger.removeHandler(handler)
    assert not errors, [record.getMessage() for record in errors]


def test_worker_killed_mid_task_the_pipeline_still_completes_correctly(tmp_path, small_volume):
    # The sleepy model: each task takes seconds of wall time whatever the load, so the kill
    # lands mid-task, and its exact result is known (``sleepy_result``).
    with local_cluster() as cluster, Client(cluster) as client:
        pipeline = sleepy_pipeline(small_volume, tmp_path / "killed.zarr", [12, 24, 24], iterations=150, delay=0.01, name="killed")
        futures = pipeline.submit(client)
        victim = wait_for(lambda: next(iter(checkpointed_midway(client)), None), what="a task checkpointed midway")
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        outcomes = gather(client, futures)
        assert len(outcomes) == 8 and all(o.iterations == 150 for o in outcomes)
        resumed = [o for o in outcomes if o.resumed_from is not None]
        assert resumed and all(0 < o.resumed_from < 150 for o in resumed)  # not from iteration 0
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, what="the Nanny restarting the worker")
        killed = zarr.open_group(tmp_path / "killed.zarr", mode="r")["deconvolved"][...]
        np.testing.assert_array_equal(killed, sleepy_result(small_volume, 150))


def test_a_bare_dask_worker_becomes_a_node_when_it_registers(tmp_path, small_volume):
    """The scheduler plugin registers the node installer: a stock `dask worker` (no preload,
    no worker class) advertises the node's figures before its first task, runs a pipeline,
    and so does the process its Nanny starts after `Client.restart`."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with dask_scheduler(port, tmp_path / "scheduler.log"), bare_worker(address, "bare", tmp_path / "bare.log"):
        with Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(1, timeout=bound(60))
            metrics = wait_for(lambda: (m := node_metrics(client)) and all(m.values()) and m, what="the node's figures")
            assert ADVERTISED <= set(next(iter(metrics.values()))), metrics
            plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
            assert all({"rqml-node", "rqml-node-installer"} <= set(p) for p in plugins.values()), plugins

            pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr")))
            report = pipeline.run(client, progress=False)
            assert not report.rejected and all(o.node in metrics for o in report.outcomes), report.summary()
            assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"

            client.restart()  # a new worker process: registered again, the installer runs there too
            client.wait_for_workers(1, timeout=bound(60))
            wait_for(lambda: (m := node_metrics(client)) and all(m.values()), what="the new process's figures")
