"""Engine overhead per iteration (queues, heuristics, metrics) for a trivial model.

The model (:class:`TrivialModel`, defined here) does one in-place multiply-add on a tiny
float32 array per ``step()``, and its misfit keeps falling slowly, so no heuristic ever
stops a task early: every path runs exactly the same number of iterations of the same model.
Measured in one process, per iteration, best of ``--repeats`` (paths interleaved per repeat):

* ``bare``: ``for _ in range(N): model.step()``;
* ``refinement``: ``Refinement.start(...).run_to_end()`` -- convergence heuristics every
  ``check_every`` iterations, no queues;
* ``node 1 task`` / ``node K tasks``: tasks submitted to a started :class:`NodeOrchestrator`
  (``ResourceMonitor(None)``, concurrency pinned to the task count so K tasks interleave,
  default ``window_seconds``), timed from the first ``submit`` until every future is done
  (admission, interleaving, validation, retirement included);
* ``... + metrics``: the same, with a thread calling ``heartbeat()`` and ``queue_stats()``
  every 10 ms meanwhile.

Every path runs ``--iterations`` iterations in all (split evenly among K tasks). Overhead is
``engine - bare`` per iteration; the requirement is below ``--limit-us`` (20 µs) for every
node path. Exits 1 when a node path is over the limit.

Usage: python bench/bench_engine.py [--iterations 100000] [--tasks 8] [--size 8] [--repeats 3] [--check-every 10] [--limit-us 20]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The engine loads models by name ("module:Class" of a plugin module): make this file importable as
# ``bench_engine`` so the orchestrator's thread finds TrivialModel in this same process.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rqml_dask.arrays import ArrayBackend, numpy_backend  # noqa: E402
from rqml_dask.models import RefinementModel, allow_plugin_module, load_model  # noqa: E402
from rqml_dask.node.orchestrator import NodeOrchestrator  # noqa: E402
from rqml_dask.messages import NodePolicy  # noqa: E402
from rqml_dask.node.resources import ResourceMonitor  # noqa: E402
from rqml_dask.refinement import Refinement  # noqa: E402
from rqml_dask.task import ArrayRef, ConvergenceSettings, Region, RQMLTask, TaskInput  # noqa: E402

MODEL = "bench_engine:TrivialModel"
allow_plugin_module("bench_engine")  # as a pipeline's plugins: would: module:Class names resolve only in plugin files
METRICS_PERIOD = 0.010
"""Seconds between two heartbeat()/queue_stats() reads of the metrics thread."""


class TrivialModel(RefinementModel):
    """``x <- 0.5 x + 1`` in place on a tiny float32 array; misfit ``1 / (1 + k/1000)``
    after ``k`` steps, strictly decreasing, so consistency never holds (no convergence)
    and, with a huge novelty window, novelty is never judged (no stall)."""

    task_class = "deconvolution"
    family = "trivial"
    size = 1

    def __init__(self, problem, backend: ArrayBackend, **params) -> None:
        if params:
            raise TypeError(f"unexpected parameters {sorted(params)}")
        super().__init__(problem, backend)
        self._x = None
        self._steps = 0

    def start(self, estimate=None) -> None:
        image = self.problem["image"]
        self._x = self.xp.ones_like(image) if estimate is None else self.xp.asarray(estimate, copy=True)
        self._steps = 0

    def step(self) -> None:
        x = self._x
        x *= 0.5
        x += 1.0
        self._steps += 1

    @property
    def estimate(self):
        return self._x

    def misfit(self) -> float:
        return 1.0 / (1.0 + 1e-3 * self._steps)


def make_task(task_id: str, iterations: int, check_every: int) -> RQMLTask:
    ref = ArrayRef("/unused.zarr", "unused")
    never_stop = ConvergenceSettings(
        max_iterations=iterations,
        check_every=check_every,
        stability_tol=0.0,
        consistency_tol=0.0,
        novelty_window=10**9,
    )
    return RQMLTask(
        task_id=task_id,
        task_class="deconvolution",
        region=Region(((0, 1),), ((0, 1),)),
        input=TaskInput(ref, ref),
        output=ref,
        model_ladder=(MODEL,),
        convergence=never_stop,
    )


def make_problem(backend: ArrayBackend, size: int) -> dict:
    return {"image": backend.asarray(np.ones(size, dtype=np.float32))}


def time_bare(backend: ArrayBackend, size: int, iterations: int, check_every: int) -> float:
    model = load_model(MODEL)(make_problem(backend, size), backend)
    model.start(None)
    step = model.step
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return time.perf_counter() - start


def time_refinement(backend: ArrayBackend, size: int, iterations: int, check_every: int) -> float:
    task = make_task("solo", iterations, check_every)
    problem = make_problem(backend, size)
    start = time.perf_counter()
    refinement = Refinement.start(task, problem, backend)
    refinement.run_to_end()
    elapsed = time.perf_counter() - start
    assert refinement.status == "max_iterations" and refinement.iteration == iterations, refinement
    return elapsed


Timer = Callable[[ArrayBackend, int, int, int], float]
"""(backend, size, iterations, check_every) -> seconds of one run of a path."""


def node_timer(tasks: int, metrics: bool, seen: dict | None = None) -> Timer:
    """A timer of ``tasks`` tasks on a fresh node; with ``metrics``, ``seen`` gets the last
    run's count of metric reads and the deepest refinement queue they saw."""

    def timed(backend: ArrayBackend, size: int, iterations: int, check_every: int) -> float:
        per_task = iterations // tasks
        jobs = [(make_task(f"t{i}", per_task, check_every), make_problem(backend, size)) for i in range(tasks)]
        with tempfile.TemporaryDirectory() as state_dir:
            policy = NodePolicy(min_concurrency=tasks, max_concurrency=tasks, max_inbound=tasks)  # all submitted at once: none pushed back
            node = NodeOrchestrator(backend, Path(state_dir), ResourceMonitor(None), policy)
            node.start()
            stop = threading.Event()
            reads = {"reads": 0, "max_refining": 0}
            reader = threading.Thread(target=_read_metrics, args=(node, stop, reads), daemon=True)
            try:
                if metrics:
                    reader.start()
                start = time.perf_counter()
                futures = [node.submit(task, problem) for task, problem in jobs]
                concurrent.futures.wait(futures)
                elapsed = time.perf_counter() - start
            finally:
                stop.set()
                if metrics:
                    reader.join()
                node.stop()
        for future in futures:
            refinement = future.result()
            assert refinement.status == "max_iterations" and refinement.iteration == per_task, refinement
        if seen is not None:
            seen.update(reads)
        return elapsed

    return timed


def _read_metrics(node: NodeOrchestrator, stop: threading.Event, reads: dict) -> None:
    while not stop.is_set():
        node.heartbeat()
        depth = node.queue_stats()["refinement"]["depth"]
        reads["reads"] += 1
        reads["max_refining"] = max(reads["max_refining"], depth)
        stop.wait(METRICS_PERIOD)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100_000, help="iterations per path, in all")
    parser.add_argument("--tasks", type=int, default=8, help="tasks of the interleaved node paths")
    parser.add_argument("--size", type=int, default=8, help="elements of the model's estimate")
    parser.add_argument("--repeats", type=int, default=3, help="runs per path; best kept")
    parser.add_argument("--check-every", type=int, default=ConvergenceSettings().check_every)
    parser.add_argument("--limit-us", type=float, default=20.0, help="accepted overhead, µs/iteration")
    args = parser.parse_args(argv)
    iterations = args.iterations - args.iterations % args.tasks  # an equal share per task

    backend = numpy_backend()
    k = args.tasks
    seen_1: dict = {}
    seen_k: dict = {}
    paths: dict[str, Timer] = {
        "bare model.step() loop": time_bare,
        "refinement run_to_end": time_refinement,
        "node 1 task": node_timer(1, metrics=False),
        f"node {k} tasks": node_timer(k, metrics=False),
        "node 1 task + metrics": node_timer(1, metrics=True, seen=seen_1),
        f"node {k} tasks + metrics": node_timer(k, metrics=True, seen=seen_k),
    }
    print(
        f"trivial model ({args.size} float32), {iterations} iterations per path, check_every "
        f"{args.check_every}, best of {args.repeats}, os.cpu_count() = {os.cpu_count()}"
    )
    best = {name: float("inf") for name in paths}
    for _ in range(args.repeats):
        for name, timed in paths.items():
            best[name] = min(best[name], timed(backend, args.size, iterations, args.check_every))

    bare_us = best["bare model.step() loop"] / iterations * 1e6
    print(f"{'path':<28}{'total s':>10}{'µs/iteration':>15}{'overhead µs':>14}")
    worst = 0.0
    for name, seconds in best.items():
        us = seconds / iterations * 1e6
        overhead = us - bare_us
        if name.startswith("node"):
            worst = max(worst, overhead)
        shown = "-" if name.startswith("bare") else f"{overhead:.2f}"
        print(f"{name:<28}{seconds:>10.3f}{us:>15.2f}{shown:>14}")
    for label, seen in (("node 1 task + metrics", seen_1), (f"node {k} tasks + metrics", seen_k)):
        print(
            f"{label} (last run): {seen['reads']} heartbeat()+queue_stats() reads, "
            f"refinement queue depth up to {seen['max_refining']}"
        )
    verdict = "PASS" if worst < args.limit_us else "FAIL"
    print(f"worst node overhead {worst:.2f} µs/iteration: {verdict} (limit {args.limit_us:g} µs)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
