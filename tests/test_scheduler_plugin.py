"""The RQML scheduler plugin with real worker processes of unequal speed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from distributed import Client

from rqml_dask import Pipeline, events
from rqml_dask.events import SUPERVISION, TASK_RESULTS

from conftest import pipeline_dict, write_yaml
from dask_processes import dask_scheduler, node_worker
from etcd_server import free_port
from heterogeneous_cluster import heterogeneous_cluster, placement, sleepy_pipeline
from timing import bound, gather, wait_for

pytestmark = pytest.mark.slow

SLOWDOWNS = [1.0, 1.0, 3.0]  # two fast nodes and one three times slower


def test_tasks_spread_in_proportion_to_node_speed(tmp_path, small_volume):
    # Dask's default placement (an even share up front, evened out in part by the nodes'
    # push-back) is the baseline of bench/bench_heterogeneous.py, not a property to test.
    with heterogeneous_cluster(SLOWDOWNS) as cluster, Client(cluster) as client:
        client.wait_for_workers(3, timeout=bound(60))
        # 30 ms of sleep per iteration: the nodes' speeds stay 1:1:3 however busy the CPUs are
        pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=20, delay=0.03, name="spread")
        report = pipeline.run(client, progress=False)
        counts = placement(client, report)
    assert len(report.outcomes) == 27 and sum(counts.values()) == 27
    fair = 27 * (1 / 3) / (1 + 1 + 1 / 3)  # ~3.9 tasks for a node of a third of the speed
    assert counts["worker-2-x3"] <= fair + 2, counts
    assert min(counts["worker-0-x1"], counts["worker-1-x1"]) >= 9, counts


def test_a_node_that_keeps_failing_gets_fewer_tasks(tmp_path, small_volume):
    with heterogeneous_cluster([1.0, 1.0, 1.0], faulty=frozenset({2})) as cluster, Client(cluster) as client:
        client.wait_for_workers(3, timeout=bound(60))
        pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=10, delay=0.01, name="faulty")
        report = pipeline.run(client, progress=False)
        counts = placement(client, report)
        status = client.sync(client.scheduler.rqml_status)
    rejected = {o.node for o in report.rejected}
    assert len(rejected) == 1 and all(o.validation_failures for o in report.rejected)
    faulty = next(n for n in counts if n.startswith("worker-2"))
    assert counts[faulty] <= 5 and all(v > counts[faulty] for n, v in counts.items() if n != faulty), counts
    assert status["nodes"][rejected.pop()]["reliability"] < 0.3


def test_a_data_error_a_node_meets_fails_the_run_and_does_not_lower_the_nodes_reliability(tmp_path, small_volume):
    import shutil

    import zarr
    from rqml_dask.pipeline.pipeline import PipelineError

    store = tmp_path / "in.zarr"
    shutil.copytree(small_volume, store)
    config = pipeline_dict(store, tmp_path / "out.zarr", tiling={"tile": [24, 48, 48]}, models={"ladder": ["richardson_lucy"]})
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config))
    tasks = pipeline.prepare()  # the input is checked here...
    zarr.open_group(store, mode="r+")["observed"][3, 4, 5] = float("nan")  # ...and changes before a node reads it
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        before = {a: n["reliability"] for a, n in client.sync(client.scheduler.rqml_status)["nodes"].items()}
        with pytest.raises(PipelineError, match=r"task test/0 failed: .*NaN or infinite value\(s\) in \[.*\], the first at \(3, 4, 5\)"):
            pipeline.run(client, progress=False, tasks=tasks)
        status = client.sync(client.scheduler.rqml_status)
    assert {a: n["reliability"] for a, n in status["nodes"].items()} == before
    assert all(n["failed"] == 0 for n in status["nodes"].values()), status["nodes"]


def test_supervision_decisions_are_published_and_tasks_end_in_a_clear_state(tmp_path, small_volume):
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        seen = {SUPERVISION: [], TASK_RESULTS: []}
        for topic in seen:
            client.subscribe_topic(topic, lambda event, topic=topic: seen[topic].append(event[1]))
        config = pipeline_dict(small_volume, tmp_path / "out.zarr", models={"ladder": ["richardson_lucy", "richardson_lucy_tv"]},
                               convergence={"max_iterations": 300, "check_every": 5, "stability_tol": 1e-12, "novelty_window": 10, "min_progress": 0.5})
        report = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config)).run(client, progress=False)
        wait_for(lambda: len(seen[TASK_RESULTS]) == 8, what="8 task results published")
    assert all(o.status == "stalled" and o.reason for o in report.outcomes)
    kinds = {}
    for event in seen[SUPERVISION]:
        kinds.setdefault(event["task_id"], []).append(event["kind"])
    assert set(kinds) == {o.task_id for o in report.outcomes}
    for task_kinds in kinds.values():
        assert task_kinds == ["escalated", "stalled", "diversified", "stalled"], task_kinds
    assert sorted(e["task_id"] for e in seen[TASK_RESULTS]) == sorted(o.task_id for o in report.outcomes)


def test_losing_a_node_and_adding_one_mid_run_loses_no_task_and_runs_none_twice(tmp_path, small_volume):
    # The fast node is killed (no Nanny brings it back); the slow one (three times slower) left
    # alone holds enough work for a new node to join and take some, however long a worker
    # takes to start on this machine.
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "logs"
    scheduler = dask_scheduler(port, logs / "scheduler.log").start()
    fast = node_worker(address, "fast", logs / "fast.log", env={"RQML_TEST_SLOWDOWN": "1"}).start()
    slow = node_worker(address, "slow", logs / "slow.log", env={"RQML_TEST_SLOWDOWN": "3"}).start()
    joiner = node_worker(address, "joiner", logs / "joiner.log")
    try:
        with Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(2, timeout=bound(60))
            finished = []
            # computed to the end ("finished"), not a result the killed node recorded and another
            # node then took up ("reused")
            client.subscribe_topic(TASK_RESULTS, lambda event: event[1]["kind"] == "finished" and finished.append(event[1]["task_id"]))
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=60, delay=0.01, name="churn")
            futures = pipeline.submit(client)
            wait_for(lambda: len(finished) >= 2, interval=0.02, what="two tasks finished")
            fast.kill()  # SIGKILL, mid-run
            joiner.start()  # a new node joins, the way users start one
            outcomes = gather(client, futures)
            wait_for(lambda: len(finished) == 27, what="27 task results published")
            names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    finally:
        for process in (joiner, slow, fast, scheduler):
            process.kill()
    assert "joiner" in {names.get(o.node) for o in outcomes}  # the new node took work
    assert sorted(o.task_id for o in outcomes) == sorted(t.task_id for t in pipeline.tasks())
    assert sorted(finished) == sorted(set(finished))  # each task ran to completion exactly once


def test_a_task_goes_first_to_the_node_where_its_model_is_warm(tmp_path, small_volume):
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        warmup = sleepy_pipeline(small_volume, tmp_path / "warm.zarr", [24, 48, 48], iterations=5, delay=0.01, name="warmup")
        [warm_node] = {o.node for o in warmup.run(client, progress=False).outcomes}
        # the plugin reads heartbeats on its own tick: wait until it knows the model is warm there
        wait_for(lambda: "sleepy_model:SleepyModel" in client.sync(client.scheduler.rqml_status)["nodes"][warm_node]["warm_models"],
                 what="the plugin knowing the warm model")
        nodes = set()
        for attempt in range(4):  # both nodes idle each time: warm first decides
            single = sleepy_pipeline(small_volume, tmp_path / f"one{attempt}.zarr", [24, 48, 48], iterations=5, delay=0.01, name=f"one{attempt}")
            nodes |= {o.node for o in single.run(client, progress=False).outcomes}
    assert nodes == {warm_node}


def test_rqml_status_and_rqml_events_show_the_cluster(tmp_path, small_volume):
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        follow = subprocess.Popen(
            [sys.executable, "-m", "rqml_dask.cli", "events", "--scheduler", cluster.scheduler_address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            lines: list[dict] = []
            reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in follow.stdout if line.startswith("{")), daemon=True)
            reader.start()
            # `rqml events` follows the run once the scheduler lists it as a subscriber of every topic
            wait_for(lambda: follow.poll() is None and client.run_on_scheduler(subscribed_to_every_topic, client_id=client.id),
                     what="rqml events subscribed")
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=10, delay=0.01, name="watched")
            pipeline.run(client, progress=False)
            sleepy_pipeline(small_volume, tmp_path / "again.zarr", [24, 48, 48], iterations=5, delay=0.01, name="again").run(client, progress=False)
            status, every_run = (subprocess.run([sys.executable, "-m", "rqml_dask.cli", "status", "--scheduler", cluster.scheduler_address, *more],
                                                capture_output=True, text=True, timeout=bound(60)) for more in ([], ["--all"]))
            finished = lambda: [l for l in lines if l["topic"] == "rqml-task_results" and l["kind"] == "finished"  # noqa: E731
                                and l["task_id"].startswith("watched/")]
            wait_for(lambda: len(finished()) == 27, what="27 finished events printed by rqml events")
            follow.terminate()  # SIGTERM: it stops as on Ctrl-C
            follow.wait(bound(30))
            reader.join(bound(10))
            err = follow.stderr.read()
        finally:
            if follow.poll() is None:
                os.killpg(follow.pid, signal.SIGKILL)
                follow.wait()
    assert follow.returncode == 0, err
    assert status.returncode == 0 and every_run.returncode == 0, status.stderr + every_run.stderr
    # nodes by their --name; the tasks of the latest run, unless --all
    assert [line.split()[0] for line in status.stdout.splitlines() if line.startswith("worker-")] == ["worker-0-x1", "worker-1-x1"]
    assert "tcp://127.0.0.1:" not in status.stdout
    latest = re.search(r"^tasks of run again \(the latest of 2; --all for every run\): (\d+) done$", status.stdout, re.M)
    assert latest, status.stdout
    assert f"tasks of every run (2): {27 + int(latest[1])} done" in every_run.stdout, every_run.stdout
    topics = {line["topic"] for line in lines}
    assert {"rqml-task_inbound", "rqml-task_results", "rqml-heartbeats", "rqml-metrics"} <= topics, topics
    assert len(finished()) == 27


def subscribed_to_every_topic(dask_scheduler, client_id: str) -> bool:
    """Whether a client other than ``client_id`` subscribes to every RQML topic."""
    topics = dask_scheduler._broker._topics  # what Broker.publish sends to (distributed/broker.py)
    return all(topic in topics and topics[topic].subscribers - {client_id} for topic in events.TOPICS)


def test_a_rerouted_task_resumes_on_another_node_from_its_checkpoint(tmp_path, small_volume):
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        seen = []
        client.subscribe_topic(SUPERVISION, lambda event: seen.append(event[1]))
        pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [24, 48, 48], iterations=300, delay=0.01, name="moved")
        [future] = pipeline.submit(client)

        def checkpointed():
            states = client.run(lambda dask_worker: dask_worker.plugins["rqml-node"].checkpoint_state()["tasks"])
            return next((a for a, tasks in states.items() for t in tasks.values() if (t.get("last_checkpoint_iteration") or 0) >= 30), None)

        first = wait_for(checkpointed, interval=0.05, what="a checkpoint at iteration 30")
        [task] = pipeline.tasks()
        answer = client.sync(client.scheduler.rqml_decide, key=task.key, action="reroute", reason="operator: move it")
        assert answer == {"status": "OK", "node": first}
        outcome = future.result(timeout=bound(120))
        wait_for(lambda: any(e["kind"] == "rerouted" for e in seen), what="the rerouted event")
    assert outcome.node != first and outcome.iterations == 300
    assert outcome.resumed_from is not None and outcome.resumed_from >= 30  # not from the start
    kinds = [e["kind"] for e in seen if e.get("task_id") == "moved/0"]
    assert kinds[:2] == ["decision", "rerouted"]


@pytest.mark.parametrize("tolerance,agreed", [(0.5, True), (1e-6, False)], ids=["agree", "disagree"])
def test_cross_node_vote_accepts_agreeing_results_and_rejects_others(tmp_path, small_volume, tolerance, agreed):
    config = pipeline_dict(small_volume, tmp_path / "out.zarr", tiling={"tile": [24, 24, 24]},
                           models={"ladder": ["richardson_lucy"]},
                           convergence={"max_iterations": 20, "check_every": 5, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 1000,
                                        "accept_max_iterations": True},
                           validation={"vote_models": ["landweber"], "vote_tolerance": tolerance})
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        report = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config)).run(client, progress=False)
    assert len(report.outcomes) == 4
    for outcome in report.outcomes:
        vote = outcome.vote
        assert vote["agreed"] is agreed and set(vote["differences"]) == {"landweber"}
        assert vote["voters"] != [outcome.node]  # voted on by another node than the one holding the result
        assert outcome.accepted is agreed
        if not agreed:
            assert outcome.validation_failures[-1].startswith("vote: landweber differs by")


def test_work_still_finishes_when_every_node_but_one_disappears(tmp_path, small_volume):
    with heterogeneous_cluster([1.0, 1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(3, timeout=bound(60))
        pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=20, delay=0.01, name="last")
        futures = pipeline.submit(client)
        wait_for(lambda: sum(f.done() for f in futures) >= 3, interval=0.02, what="three tasks done")
        workers = sorted(client.scheduler_info()["workers"])
        client.retire_workers(workers[1:], close_workers=True)  # two of three nodes leave mid-run
        retired_at = time.time()
        outcomes = gather(client, futures)
        assert list(client.scheduler_info()["workers"]) == workers[:1]
    assert sorted(o.task_id for o in outcomes) == sorted(t.task_id for t in pipeline.tasks())
    late = [o for o in outcomes if o.began_at > retired_at]
    assert late and {o.node for o in late} == {workers[0]}  # the one node left took the rest


def test_a_node_advertising_invalid_figures_is_flagged_and_the_others_get_the_work(tmp_path, small_volume):
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        liar, honest = sorted(client.scheduler_info()["workers"])

        def lie(dask_worker):  # its heartbeat now carries a figure of the wrong type
            node = dask_worker.plugins["rqml-node"]
            dask_worker.metrics["rqml"] = lambda worker: {**node.heartbeat(worker), "concurrency_limit": "many"}

        client.run(lie, workers=[liar])
        status = wait_for(lambda: (s := client.sync(client.scheduler.rqml_status))["nodes"][liar]["invalid_figures"] and s,
                          what="the plugin flagging the node")
        assert status["nodes"][liar]["invalid_figures"] == "concurrency_limit: Input should be a valid integer (got 'many')"
        assert status["nodes"][honest]["invalid_figures"] is None
        alerts = [e for _, e in client.get_events(events.ALERTS) if e["kind"] == "invalid-figures"]
        assert [e["worker"] for e in alerts] == [liar]  # once, not every heartbeat
        pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=5, delay=0.01, name="lied")
        report = pipeline.run(client, progress=False)
    assert sorted(o.task_id for o in report.outcomes) == sorted(t.task_id for t in pipeline.tasks())
    assert {o.node for o in report.outcomes} == {honest}  # the flagged node got no work


def test_a_client_restart_mid_run_binds_nothing_to_the_old_workers_and_the_next_run_completes(tmp_path, small_volume):
    """(It once waited for ever about one run in three on a loaded machine: the plugin bound the
    next run's tasks to workers the restart's Nannies were still registering, and their room
    stayed taken; fixed with the plugin binding only to running nodes.)"""
    pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=40, delay=0.03, name="restart")
    with heterogeneous_cluster([1.0, 1.0]) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=bound(60))
            futures = pipeline.submit(client)
            wait_for(lambda: any(t["state"] == "bound" for t in client.sync(client.scheduler.rqml_status)["tasks"].values()),
                     timeout=60, what="a task bound to a node")
            old_workers = set(client.scheduler_info()["workers"])
            client.restart(timeout=bound(60))
            del futures
            status = client.sync(client.scheduler.rqml_status)
            assert not old_workers & set(status["nodes"])
            assert not [t for t in status["tasks"].values() if t["node"] in old_workers], status["tasks"]
        with Client(cluster) as again:  # the next run, as `rqml run` would start it: a client of its own
            again.wait_for_workers(2, timeout=bound(60))
            report = run_or_explain(pipeline, again, timeout=bound(150))
    assert len(report.outcomes) == 27 and all(o.accepted for o in report.outcomes)


def run_or_explain(pipeline: Pipeline, client: Client, timeout: float):
    """``pipeline.run``, or a failure that shows where each unfinished task is (the scheduler's
    state, the plugin's record, the nodes' jobs) if it has not returned within ``timeout``."""
    done: list = []
    thread = threading.Thread(target=lambda: done.append(pipeline.run(client, progress=False)), daemon=True)
    thread.start()
    thread.join(timeout)
    if done:
        return done[0]

    def scheduler_view(dask_scheduler):
        plugin = dask_scheduler.plugins["rqml-scheduler"]
        return {
            "dask": {str(k): (ts.state, sorted(ts.worker_restrictions or ()), ts.processing_on and ts.processing_on.address)
                     for k, ts in dask_scheduler.tasks.items()},
            "plugin": {str(k): (r.state, r.worker) for k, r in plugin.tasks.items()},
            "nodes": {a: sorted(n.bound) for a, n in plugin.nodes.items()},
            "workers": list(dask_scheduler.workers), "pending": len(plugin._pending),
        }

    def node_view(dask_worker):
        node = dask_worker.plugins["rqml-node"]
        return {"jobs": {k: (j.claimed, j.finished, j.future.done()) for k, j in node.jobs.items()},
                "dask": {str(k): ts.state for k, ts in dask_worker.state.tasks.items()}}

    pytest.fail(f"pipeline.run did not return in {timeout:g} s:\nscheduler {client.run_on_scheduler(scheduler_view)}\n"
                f"nodes {client.run(node_view)}")


def test_a_pipeline_submitted_before_any_node_registers_runs_once_one_does(tmp_path, small_volume):
    """Tasks wait pending with no node; a node that is registering (not yet running tasks) is
    not bound any, so none is lost to it, and the run completes once it runs. (The plugin
    once bound tasks to a node still registering: they came back without having run, its
    room stayed taken, and the run waited for ever.)"""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr")))
    with dask_scheduler(port, tmp_path / "scheduler.log"), Client(address, timeout=bound(60)) as client:
        futures = pipeline.submit(client)
        wait_for(lambda: {t["state"] for t in client.sync(client.scheduler.rqml_status)["tasks"].values()} == {"pending"},
                 what="every task pending")
        with node_worker(address, "late", tmp_path / "late.log"):
            outcomes = gather(client, futures, timeout=120)
            state = client.sync(client.scheduler.rqml_status)
    assert len(outcomes) == len(futures) and all(o.state == "accepted" for o in outcomes), outcomes
    assert [n["bound"] for n in state["nodes"].values()] == [0]  # nothing left taking its room
