"""Assignment decision time: the scheduler plugin's per-task release path, without a cluster.

Requirement: "Assignment decision time with 1,000 simulated nodes and 100,000 queued tasks:
below 100 µs per task".

Setup (not timed): a ``NodeTable`` of ``--nodes`` nodes with random relative speeds (as
``set_speeds`` makes them, from random iterations/s), random reliability scores, ~10% GPU
nodes, warm sets of 0-3 models drawn from ``--models`` model names, and room 1-3; and
``--tasks`` ``TaskTraits`` (random class, model, priority and difficulty; 10% ``wants_gpu``)
pushed on a heap keyed as ``RQMLSchedulerPlugin._hold`` keys it.

Timed, per decision, what ``RQMLSchedulerPlugin._release`` does for one held task: pop the
heap, look the record up, ``NodeTable.choose`` (with ``gpu_only`` from the class policy and
the record's ``avoid`` set as a frozenset), mark the record bound and decrement the chosen
node's room (``_update_room``: capacity minus bound tasks). Not timed: the scheduler's own
transition work, and the refill of every node's room (as completions would) whenever no
node has room for the next task. Reported: mean, p50, p99 and max µs per decision over
all tasks, the mean of ``choose`` alone,
and PASS/FAIL of the mean (and p99) against the 100 µs budget.

Usage: python bench/bench_assignment.py [--nodes 1000] [--tasks 100000] [--models 20]
       [--gpu-fraction 0.1] [--gpu-class NAME] [--avoid-fraction 0.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import platform
import time

import numpy as np

from rqml_dask.messages import TaskTraits
from rqml_dask.scheduler.assignment import NodeTable

BUDGET_US = 100.0
CLASSES = ("deconvolution", "denoising", "registration", "segmentation")


def build_table(args: argparse.Namespace, rng: np.random.Generator) -> tuple[NodeTable, np.ndarray]:
    table = NodeTable()
    addresses = [f"tcp://10.0.{i // 250}.{i % 250}:{40000 + i}" for i in range(args.nodes)]
    for address in addresses:
        table.add(address)
    models = [f"model-{m}" for m in range(args.models)]
    for address in addresses:
        table.set_warm(address, list(rng.choice(models, size=rng.integers(0, 4), replace=False)))
    table.set_speeds({a: float(rate) for a, rate in zip(addresses, rng.lognormal(3.0, 0.6, args.nodes))})
    table.reliability[:] = rng.uniform(0.3, 1.0, args.nodes)
    table.gpu[:] = rng.random(args.nodes) < args.gpu_fraction
    capacity = rng.integers(1, 4, args.nodes).astype(float)  # concurrency limit + queued slot
    table.room[:] = capacity
    return table, capacity


def build_tasks(args: argparse.Namespace, rng: np.random.Generator, addresses: list[str]) -> tuple[list, dict]:
    counter = itertools.count()
    held: list[tuple] = []
    records: dict[str, dict] = {}
    classes = rng.integers(0, len(CLASSES), args.tasks)
    models = rng.integers(0, args.models, args.tasks)
    priorities = rng.integers(0, 5, args.tasks)
    difficulties = rng.uniform(0.5, 4.0, args.tasks)
    wants_gpu = rng.random(args.tasks) < 0.1
    handed_back = rng.random(args.tasks) < args.avoid_fraction
    for i in range(args.tasks):
        traits = TaskTraits(
            key=f"task-{i}@0",
            task_class=CLASSES[classes[i]],
            model=f"model-{models[i]}",
            priority=int(priorities[i]),
            difficulty=float(difficulties[i]),
            wants_gpu=bool(wants_gpu[i]),
        )
        key = f"rqml-{i}"
        avoid = {addresses[rng.integers(len(addresses))]} if handed_back[i] else set()
        records[key] = {"traits": traits, "state": "pending", "worker": None, "avoid": avoid}
        heapq.heappush(held, (-traits.priority, -traits.difficulty, next(counter), key))
    return held, records


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    table, capacity = build_table(args, rng)
    held, records = build_tasks(args, rng, table.addresses)
    gpu_classes = frozenset(args.gpu_class)
    bound = np.zeros(args.nodes)
    choose_rng = np.random.default_rng(args.seed + 1)
    index = table.index
    room = table.room
    clock = time.perf_counter_ns

    decision_ns = np.empty(args.tasks, dtype=np.int64)
    choose_ns = np.empty(args.tasks, dtype=np.int64)
    refills = waits = 0
    total_start = clock()
    for n in range(args.tasks):
        if not room.any():  # every node full: completions free them all (not timed)
            bound[:] = 0
            room[:] = capacity
            refills += 1
        started = clock()
        entry = heapq.heappop(held)
        record = records[entry[-1]]
        traits = record["traits"]
        c0 = clock()
        address = table.choose(traits, choose_rng, traits.task_class in gpu_classes, frozenset(record["avoid"]))
        c1 = clock()
        if address is None:  # only gpu-only tasks with every GPU node full (not timed further)
            waits += 1
            bound[table.gpu] = 0
            room[table.gpu] = capacity[table.gpu]
            c0 = clock()
            address = table.choose(traits, choose_rng, traits.task_class in gpu_classes, frozenset(record["avoid"]))
            c1 = clock()
        record["state"], record["worker"] = "bound", address
        i = index[address]
        bound[i] += 1
        room[i] = max(capacity[i] - bound[i], 0.0)
        decision_ns[n] = clock() - started
        choose_ns[n] = c1 - c0
    total_s = (clock() - total_start) / 1e9

    decision_us = decision_ns / 1e3
    return {
        "mean": decision_us.mean(),
        "p50": np.percentile(decision_us, 50),
        "p99": np.percentile(decision_us, 99),
        "max": decision_us.max(),
        "choose_mean": choose_ns.mean() / 1e3,
        "total_s": total_s,
        "refills": refills,
        "waits": waits,
        "gpu_nodes": int(table.gpu.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=20, help="distinct model names for warm sets")
    parser.add_argument("--gpu-fraction", type=float, default=0.1)
    parser.add_argument("--gpu-class", action="append", default=[], choices=CLASSES, help="a gpu-only task class (repeatable); the default policy has none")
    parser.add_argument("--avoid-fraction", type=float, default=0.0, help="share of tasks handed back once (choose with one avoided node)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print(f"{args.nodes} nodes, {args.tasks} queued tasks, {args.models} models, gpu classes {args.gpu_class or 'none'}, avoid fraction {args.avoid_fraction}")
    r = run(args)
    print(f"{r['gpu_nodes']} GPU nodes; room refilled {r['refills']} times; {r['waits']} gpu-only waits")
    print(
        f"per decision (heap pop + choose + room update): mean {r['mean']:.1f} µs, p50 {r['p50']:.1f} µs, "
        f"p99 {r['p99']:.1f} µs, max {r['max']:.1f} µs; choose() alone mean {r['choose_mean']:.1f} µs"
    )
    print(f"loop wall time {r['total_s']:.2f} s for {args.tasks} decisions (incl. timers and refills)")
    verdict = "PASS" if r["mean"] < BUDGET_US else "FAIL"
    print(f"{verdict}: mean {r['mean']:.1f} µs vs budget {BUDGET_US:.0f} µs per task (p99 {'within' if r['p99'] < BUDGET_US else 'over'} budget)")


if __name__ == "__main__":
    main()
