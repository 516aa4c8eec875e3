"""The node orchestrator in one process: queue order, interleaving, decisions, policy, concurrency."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy

from rqml_dask.arrays import numpy_backend
from rqml_dask.node.concurrency import AdaptiveConcurrency
from rqml_dask.node.orchestrator import NodeOrchestrator
from rqml_dask.messages import Decision, NodePolicy
from rqml_dask.models import allow_plugin_module
from rqml_dask.node.resources import ResourceMonitor
from rqml_dask.refinement import Refinement
from rqml_dask.synthetic import gaussian_psf
from rqml_dask.task import ArrayRef, ConvergenceSettings, Region, RQMLTask, TaskInput

from timing import bound, wait_for

UNTIL_TERMINATED = ConvergenceSettings(max_iterations=10**7, stability_tol=0, consistency_tol=0, novelty_window=10**8)
"""A task that refines (minutes of iterations) until the test terminates it by a decision."""


def make_task(task_id: str, **fields) -> RQMLTask:
    ref = ArrayRef("/unused.zarr", "observed")
    defaults = dict(
        task_id=task_id,
        task_class="deconvolution",
        region=Region(((0, 16),) * 3, ((0, 16),) * 3),
        input=TaskInput(ref, ref),
        output=ref,
        model_ladder=("richardson_lucy", "richardson_lucy_tv"),
        convergence=ConvergenceSettings(max_iterations=40, check_every=5),
    )
    return RQMLTask(**{**defaults, **fields})


def make_problem(seed: int, backend=numpy_backend(), task_class: str = "deconvolution") -> dict:
    rng = np.random.default_rng(seed)
    if task_class == "linear_solve":  # two 24x24 diffusion systems
        rhs = backend.asarray(rng.standard_normal((2, 24, 24)))
        return {"image": rhs, "observed": rhs, "coefficients": backend.asarray(10 ** rng.random((2, 2, 24, 24)) * 3)}
    image = rng.poisson(rng.random((16, 16, 16)) * 50).astype(np.float32) / 50
    return {"image": backend.asarray(image), "psf": backend.asarray(gaussian_psf((1.0, 1.0, 1.0)))}


@pytest.fixture
def node(tmp_path):
    nodes = []

    def make(policy: NodePolicy = NodePolicy(), state_dir=None, backend=numpy_backend(), start: bool = True) -> NodeOrchestrator:
        orchestrator = NodeOrchestrator(backend, state_dir or tmp_path / "node", ResourceMonitor(None), policy, window_seconds=0.2)
        if start:
            orchestrator.start()
        nodes.append(orchestrator)
        return orchestrator

    yield make
    for orchestrator in nodes:
        orchestrator.stop()


def admitted_order(orchestrator: NodeOrchestrator, futures: dict) -> list[str]:
    results = {task_id: future.result(timeout=bound(60)) for task_id, future in futures.items()}
    return sorted(results, key=lambda task_id: results[task_id].started_at)


def test_inbound_serves_priority_class_difficulty_then_warm_models(node):
    orchestrator = node(NodePolicy(class_order=("deconvolution", "linear_solve"), min_concurrency=1, max_concurrency=1, max_inbound=10))
    rl = ("richardson_lucy",)  # one-model ladders: no escalation warms another model meanwhile
    blocking = make_task("blocker", model_ladder=rl, convergence=UNTIL_TERMINATED)
    blocker = orchestrator.submit(blocking, make_problem(0))
    wait_for(lambda: orchestrator.refining, interval=0.01, what="the blocker refining")
    orchestrator.warm_models["landweber"] = time.monotonic()  # as if this node ran Landweber a moment ago
    tasks = [
        make_task("solve", task_class="linear_solve", model_ladder=rl),
        make_task("easy", expected_difficulty=1.0, model_ladder=rl),
        make_task("cold-hard", expected_difficulty=5.0, model_ladder=("richardson_lucy_tv",)),
        make_task("warm-hard", expected_difficulty=5.0, model_ladder=("landweber",)),
        make_task("urgent", priority=10, expected_difficulty=0.5, model_ladder=rl),
    ]
    futures = {t.task_id: orchestrator.submit(t, make_problem(i + 1)) for i, t in enumerate(tasks)}
    expected = ["urgent", "warm-hard", "cold-hard", "easy", "solve"]
    assert orchestrator.queue_stats()["inbound"]["order"] == expected
    orchestrator.decide(Decision(blocking.key, "terminate", "let the queue go"))
    assert blocker.result(timeout=bound(60)).status == "terminated"
    assert admitted_order(orchestrator, futures) == expected


@pytest.mark.parametrize("fft_threads", [1, 2], ids=["interleaved", "batched"])
@pytest.mark.parametrize("task_class", ["deconvolution", "linear_solve"])
def test_refinement_queue_interleaves_and_each_result_equals_a_solo_run(node, task_class, fft_threads, monkeypatch):
    batches = []
    step_batch = RichardsonLucy.step_batch.__func__
    monkeypatch.setattr(RichardsonLucy, "step_batch", classmethod(lambda cls, models: (batches.append(len(models)), step_batch(cls, models))))
    orchestrator = node(NodePolicy(min_concurrency=3, max_concurrency=3), backend=numpy_backend(fft_threads), start=False)
    assert orchestrator.batching == (fft_threads > 1)
    # plain Richardson-Lucy: the model that batches; conjugate gradient steps one task at a time
    ladder = ("richardson_lucy",) if task_class == "deconvolution" else ("conjugate_gradient",)
    settings = ConvergenceSettings(max_iterations=60, check_every=5, held_out_fraction=0)
    tasks = [make_task(f"t{i}", task_class=task_class, model_ladder=ladder, convergence=settings) for i in range(3)]
    futures = [orchestrator.submit(t, make_problem(i, task_class=task_class)) for i, t in enumerate(tasks)]  # queued before the node starts
    orchestrator.start()
    results = [future.result(timeout=bound(60)) for future in futures]
    assert max(r.started_at for r in results) < min(r.finished_at for r in results)  # all three iterated at once
    if task_class == "deconvolution":
        assert (max(batches) == 3) if fft_threads > 1 else (set(batches) <= {1})  # batched: all three in one call
    for i, (task, interleaved) in enumerate(zip(tasks, results)):
        solo = Refinement.start(task, make_problem(i, task_class=task_class), numpy_backend())
        solo.run_to_end()
        assert interleaved.iteration == solo.iteration and interleaved.status == solo.status
        np.testing.assert_array_equal(interleaved.estimate, solo.estimate)


def test_decisions_escalate_and_terminate_running_tasks(node):
    orchestrator = node(NodePolicy(min_concurrency=2, max_concurrency=2))
    task_a, task_b = make_task("a", convergence=UNTIL_TERMINATED, model_ladder=("richardson_lucy", "landweber")), make_task("b", convergence=UNTIL_TERMINATED)
    escalated = orchestrator.submit(task_a, make_problem(1))
    terminated = orchestrator.submit(task_b, make_problem(2))
    wait_for(lambda: len(orchestrator.refining) == 2, interval=0.01, what="both tasks refining")
    orchestrator.decide(Decision(task_a.key, "escalate", "supervisor: stalled on the cluster"))
    orchestrator.decide(Decision(task_b.key, "terminate", "supervisor: hopeless"))
    b = terminated.result(timeout=bound(30))
    assert b.status == "terminated" and b.reason == "supervisor: hopeless"
    wait_for(lambda: [len(a.refinement.runs) for a in orchestrator.refining] == [2], interval=0.01, what="task a escalated")
    orchestrator.decide(Decision(task_a.key, "terminate", "enough"))
    a = escalated.result(timeout=bound(30))
    assert [run.model for run in a.runs] == ["richardson_lucy", "landweber"]
    assert a.runs[0].stop == "escalated" and a.status == "terminated"


def test_failed_validation_escalates_per_policy(node):
    orchestrator = node(NodePolicy(on_validation_failure="escalate"))
    task = make_task("v", validation=dataclasses.replace(make_task("x").validation, max_misfit=1e-9),
                     convergence=ConvergenceSettings(max_iterations=30, check_every=5))
    refinement = orchestrator.submit(task, make_problem(3)).result(timeout=bound(60))
    assert [run.model for run in refinement.runs] == ["richardson_lucy", "richardson_lucy_tv"]
    assert refinement.validation_failures and "above max_misfit" in refinement.validation_failures[0]
    assert orchestrator.counters.validation_failures == 2


def test_policy_is_persisted_for_the_next_start_which_enforces_what_it_is_given(node, tmp_path):
    orchestrator = node(state_dir=tmp_path / "state")
    orchestrator.set_policy(NodePolicy(version=3, max_concurrency=2, on_validation_failure="reject"))
    orchestrator.set_policy(NodePolicy(version=2, max_concurrency=7))  # the latest the scheduler sent is enforced
    assert orchestrator.concurrency.maximum == 7
    saved = NodeOrchestrator.saved_policy(tmp_path / "state")
    assert saved == NodePolicy(version=2, max_concurrency=7)
    restarted = node(saved, state_dir=tmp_path / "state")  # the node plugin decides whether to trust it
    assert restarted.policy == saved and restarted.concurrency.maximum == 7
    (tmp_path / "state" / "policy.json").write_text("{not json")
    assert NodeOrchestrator.saved_policy(tmp_path / "state") is None


def test_adaptive_concurrency_grows_while_throughput_rises_and_backs_off():
    c = AdaptiveConcurrency(minimum=1, maximum=6, hold_windows=2)
    throughput = {1: 100.0, 2: 180.0, 3: 240.0, 4: 245.0}
    limits = [c.update(throughput[min(c.limit, 4)], 0.1, saturated=True) for _ in range(4)]
    assert limits == [2, 3, 4, 3]  # probe 4 did not pay: back to 3, then hold
    assert c.update(240.0, 0.1, True) == 3 and c.update(240.0, 0.1, True) == 3
    assert c.update(240.0, 0.1, True) == 4  # the hold is over: probe again
    assert c.update(240.0, 0.95, True) == 2  # memory pressure halves
    assert c.update(240.0, 0.1, True) == 2 and c.update(100.0, 0.1, True) == 1  # a slowdown steps back
    assert AdaptiveConcurrency(minimum=1, maximum=4).update(50.0, 0.1, saturated=False) == 1  # not saturated: no probe


def test_a_node_over_its_inbound_limit_pushes_back_the_last_tasks_in_its_order(node):
    from rqml_dask.node.orchestrator import PushedBack

    events = []
    orchestrator = node(NodePolicy(min_concurrency=1, max_concurrency=1, max_inbound=2))
    orchestrator.on_event = events.append
    rl = ("richardson_lucy",)
    blocking = make_task("blocker", model_ladder=rl, convergence=UNTIL_TERMINATED)
    blocker = orchestrator.submit(blocking, make_problem(0))
    wait_for(lambda: orchestrator.refining, interval=0.01, what="the blocker refining")
    queued = {d: orchestrator.submit(make_task(f"d{d}", model_ladder=rl, expected_difficulty=d), make_problem(d)) for d in (3, 1, 4, 2)}
    orchestrator.decide(Decision(blocking.key, "terminate", "let the queue go"))
    blocker.result(timeout=bound(60))
    pushed = sorted(d for d, f in queued.items() if isinstance(f.exception(timeout=bound(60)), PushedBack))
    assert pushed == [1, 2]  # the easiest, served last, go back to the scheduler
    assert [e["task_id"] for e in events if e["kind"] == "pushed_back"] == ["d1", "d2"]


def test_a_revalidate_decision_escalates_a_task_whose_estimate_fails_now(node):
    orchestrator = node(NodePolicy(on_validation_failure="escalate"))
    task = make_task("r", convergence=UNTIL_TERMINATED, validation=dataclasses.replace(make_task("x").validation, max_misfit=1e-9))
    future = orchestrator.submit(task, make_problem(4))
    wait_for(lambda: orchestrator.refining, interval=0.01, what="the task refining")
    orchestrator.decide(Decision(task.key, "revalidate"))
    wait_for(lambda: [len(a.refinement.runs) for a in orchestrator.refining] == [2], interval=0.01, what="the task escalated")
    orchestrator.decide(Decision(task.key, "terminate", "done checking"))
    refinement = future.result(timeout=bound(30))
    assert refinement.runs[0].stop == "escalated" and refinement.runs[1].model == "richardson_lucy_tv"
    assert orchestrator.counters.validation_failures == 1


def test_a_model_that_raises_fails_its_task_alone_and_the_node_goes_on(node):
    allow_plugin_module("raising_model")  # as shipping it with a pipeline (plugins:) does on a worker
    events = []
    orchestrator = node(NodePolicy(min_concurrency=2, max_concurrency=2))
    orchestrator.on_event = events.append
    raising = orchestrator.submit(make_task("bad", model_ladder=("raising_model:RaisingModel",)), make_problem(1))
    unbuildable = orchestrator.submit(make_task("missing", model_ladder=("no_such_module:Model",)), make_problem(2))
    healthy = orchestrator.submit(make_task("good", model_ladder=("richardson_lucy",)), make_problem(3))
    bad, missing, good = (f.result(timeout=bound(60)) for f in (raising, unbuildable, healthy))
    assert bad.status == "failed" and bad.iteration == 2
    assert bad.reason == "model raising_model:RaisingModel raised in step at iteration 2: RuntimeError: a bug in the model"
    assert missing.status == "failed" and missing.reason.startswith("model no_such_module:Model raised in construction")
    assert good.status in ("converged", "max_iterations") and good.iteration > 2
    assert [e["task_id"] for e in events if e["kind"] == "failed"] == ["missing", "bad"]
    assert orchestrator.counters.failed == 2
    after = orchestrator.submit(make_task("after", model_ladder=("richardson_lucy",)), make_problem(4))
    assert after.result(timeout=bound(60)).status in ("converged", "max_iterations")  # the thread is alive


def test_a_decision_reaches_the_task_its_key_names_not_another_of_the_same_id(node):
    """Two jobs of one task id made by different configurations (another ladder: another
    key) on one node: a decision by key ends the one it names and leaves the other running."""
    orchestrator = node(NodePolicy(min_concurrency=2, max_concurrency=2))
    old = make_task("run/0", convergence=UNTIL_TERMINATED, model_ladder=("richardson_lucy",))
    new = make_task("run/0", convergence=UNTIL_TERMINATED, model_ladder=("landweber",))
    assert old.task_id == new.task_id and old.key != new.key
    old_future, new_future = orchestrator.submit(old, make_problem(1)), orchestrator.submit(new, make_problem(2))
    wait_for(lambda: len(orchestrator.refining) == 2, interval=0.01, what="both refining")
    orchestrator.decide(Decision(old.key, "terminate", "superseded"))
    assert old_future.result(timeout=bound(30)).status == "terminated"
    assert [a.queued.task.key for a in orchestrator.refining] == [new.key] and not new_future.done()
    assert set(orchestrator.heartbeat()["progress"]) == {new.key}  # progress is reported by key too
    orchestrator.decide(Decision(new.key, "terminate", "enough"))
    assert new_future.result(timeout=bound(30)).reason == "enough"
