"""Recovery with real processes: a killed run restarted, the shared etcd store lost mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import zarr
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.arrays import numpy_backend
from rqml_dask.checkpoint import TaskCheckpoint
from rqml_dask.problem import load_problem
from rqml_dask.node.checkpointer import done_key
from rqml_dask.stores import open_store

from conftest import local_cluster, pipeline_dict, write_yaml
from test_node_cluster import node_metrics
from timing import bound, gather, wait_for

pytestmark = pytest.mark.slow

FIXED = {"max_iterations": 300, "check_every": 10, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 10**6,
         "accept_max_iterations": True}


def lmdb_entries(path, db: bytes) -> int:
    """Entries in one database of the node's LMDB, read from outside (0 while it is created)."""
    try:
        env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=4)
    except lmdb.Error:
        return 0
    try:
        with env.begin() as txn:
            return txn.stat(env.open_db(db, txn=txn, create=False))["entries"]
    except lmdb.NotFoundError:
        return 0
    finally:
        env.close()


def test_a_killed_run_started_again_resumes_unfinished_tasks_and_reuses_finished_ones(tmp_path, engine_case):
    config = engine_case.pipeline(tmp_path / "out.zarr", tasks=8, iterations=100, delay=0.01)
    path = write_yaml(tmp_path / "p.yaml", config)
    node_db = tmp_path / "out.zarr.checkpoints" / "nodes" / f"{os.uname().nodename}.lmdb"
    run = [sys.executable, "-m", "rqml_dask.cli", "run", str(path), "--no-progress"]
    first = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # two unfinished tasks with a checkpoint (a finished task's slots go): one may still finish before the kill lands
        wait_for(lambda: lmdb_entries(node_db, b"done") >= 2 and lmdb_entries(node_db, b"slots") >= 2, timeout=120, interval=0.05, what="two tasks done and two checkpointed")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the client, the scheduler and every worker at once
        first.wait(bound(30))
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "incomplete"
    second = subprocess.run(run, capture_output=True, text=True, timeout=bound(300))
    assert second.returncode == 0, second.stderr
    recovered = re.search(r"recovered\s+(\d+) resumed from checkpoints, \d+ finished by nodes without a scheduler, (\d+) reused from an earlier run", second.stdout)
    assert recovered and int(recovered[1]) >= 1 and int(recovered[2]) >= 2, second.stdout
    assert re.search(r"^iterations\s+800 ", second.stdout, re.M), second.stdout  # 8 tasks x 100, counted once each
    # the same pipeline run once, uninterrupted (checkpoints of its own: nothing to reuse), gives the same result
    reference = write_yaml(tmp_path / "ref.yaml", {**config, "output": {"store": str(tmp_path / "ref.zarr")},
                                                   "checkpoint": {**config["checkpoint"], "artifacts": str(tmp_path / "ref.checkpoints")}})
    assert subprocess.run([*run[:-2], str(reference), "--no-progress"], capture_output=True, timeout=bound(300)).returncode == 0
    np.testing.assert_array_equal(
        zarr.open_group(tmp_path / "out.zarr", mode="r")[engine_case.output_array][...],
        zarr.open_group(tmp_path / "ref.zarr", mode="r")[engine_case.output_array][...],
    )


@pytest.mark.etcd
def test_etcd_lost_mid_run_checkpoints_pile_up_in_lmdb_and_reach_etcd_after_restart(tmp_path, small_volume, etcd):
    config = pipeline_dict(small_volume, tmp_path / "out.zarr", convergence={**FIXED, "max_iterations": 600},
                           models={"ladder": ["richardson_lucy"]},
                           checkpoint={"shared": etcd.url, "every_iterations": 10, "retention": "keep"})
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config))
    with local_cluster() as cluster, Client(cluster) as client:
        futures = pipeline.submit(client)
        wait_for(lambda: sum(f["iterations_total"] for f in node_metrics(client).values() if f) > 200, what="200 iterations")
        etcd.stop()
        backlog = wait_for(lambda: (m := node_metrics(client)) and sum(f["checkpoints"]["pending"] for f in m.values()) > 0 and m, what="a checkpoint backlog")
        iterations_at_stop = sum(f["iterations_total"] for f in backlog.values())
        wait_for(lambda: sum(f["iterations_total"] for f in node_metrics(client).values()) > iterations_at_stop + 500, what="500 more iterations without etcd")
        assert not any(f.done() for f in futures if f.status == "error")
        etcd.start()
        outcomes = gather(client, futures, timeout=300)
        assert all(o.iterations == 600 and o.status == "max_iterations" for o in outcomes)
        wait_for(lambda: sum(f["checkpoints"]["pending"] for f in node_metrics(client).values()) == 0, what="the backlog flushed to etcd")
    shared = open_store(etcd.url)
    local = open_store(pipeline.checkpoint_settings.local.replace("{host}", os.uname().nodename))
    try:
        newest = []
        for task in pipeline.tasks():
            in_etcd, in_lmdb = shared.checkpoints(task.key), local.checkpoints(task.key)
            assert in_etcd and in_etcd[0].rank == in_lmdb[0].rank  # the newest record reached etcd
            newest.append(TaskCheckpoint.from_msgpack(in_etcd[0].record).verify().iteration)
            assert shared.done(done_key(load_problem(task, numpy_backend())[0])) is not None  # its outcome too
        # records written while etcd was down are there: beyond the 200 iterations no task could
        # have reached before it stopped (a task may have none after it: on a busy machine the
        # writer coalesces snapshots, and drops those of a task that finished meanwhile)
        assert max(newest) > 200, newest
    finally:
        shared.close()
