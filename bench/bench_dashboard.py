"""Server-side update time of each RQML dashboard page with simulated state.

A real (unstarted) Dask ``Scheduler`` holds the RQML scheduler plugin with ``--tasks`` task
records (a 3-D tile grid, half of them refining with a convergence trace of ``--trace``
checks each, kept as the plugin keeps it, the rest finished or queued) and ``--history`` heartbeat samples
of each of ``--nodes`` nodes, as a real run leaves them; each page's ``update()`` is timed
(median and worst of ``--repeat`` calls) against the 100 ms budget.

    .venv/bin/python bench/bench_dashboard.py --tasks 5000 --nodes 100
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
from distributed import Scheduler

from rqml_dask import events
from rqml_dask.messages import NodeHeartbeat, NodeLink, TaskProgress, TaskTraits, dask_key
from rqml_dask.scheduler.dashboard import RQMLPage
from rqml_dask.scheduler.live_pages import PAGES
from rqml_dask.scheduler.plugin import PLUGIN_NAME, RQMLSchedulerPlugin
from rqml_dask.scheduler.records import NodeRecord, TaskRecord, Trace
from rqml_dask.scheduler.reliability import Reliability

BUDGET_MS = 100.0


def simulated(scheduler: Scheduler, tasks: int, nodes: int, trace: int, history: float) -> None:
    plugin = RQMLSchedulerPlugin(seed=0)
    plugin.scheduler = scheduler
    scheduler.plugins[PLUGIN_NAME] = plugin
    rng = np.random.default_rng(0)
    side = round(tasks ** (1 / 3))
    addresses = [f"tcp://10.0.{i // 250}.{i % 250}:4000" for i in range(nodes)]
    for i in range(tasks):
        z, y, x = i // (side * side), (i // side) % side, i % side
        core = ((z * 32, z * 32 + 32), (y * 64, y * 64 + 64), (x * 64, x * 64 + 64))
        traits = TaskTraits(f"volume/{i:05d}@0", "deconvolution", "richardson_lucy", core=core)
        record = TaskRecord(traits, dask_key(traits.key, "x"))
        plugin.tasks[traits.key] = record
        plugin.runs.add(record)
        kind = i % 4
        plugin.runs.set_state(record, ("bound", "bound", "done", "pending")[kind])
        record.worker = addresses[i % nodes] if kind < 3 else None
        if kind < 3:
            misfit = np.exp(-np.arange(trace) / 40) + rng.random()
            record.trace = Trace()
            record.trace.add(TaskProgress(5 * trace, tuple((5 * (j + 1), "richardson_lucy", float(misfit[j]), float(misfit[j] / 10), 1e-4, None)
                                                           for j in range(trace))))
            plugin.runs.set_iteration(record, 5 * trace)
            if i % 7 == 0:
                record.decided({"kind": "escalated", "task_id": traits.task_id, "to_model": "richardson_lucy_tv"})
                record.model = "richardson_lucy_tv"
            record.result_state = "accepted" if kind == 2 else None
    start = time.time() - history
    for address in addresses:  # what the plugin's heartbeat pass keeps: one sample per node and second
        node = NodeRecord(address, Reliability(), figures=NodeHeartbeat(link=NodeLink(status="ok")))
        for second in range(int(history)):
            node.history.append(start + second, (40 + rng.random(), 4, 0.3, np.nan, 0.9))
        plugin.nodes[address] = node
    for second in range(int(history)):  # and their mean
        plugin.history.append(start + second, (40.5, 4, 0.3, np.nan, 0.9))
    for topic in events.TOPICS:  # a full event log: Dask keeps the latest 1000 of each topic
        for i in range(1000):
            scheduler.log_event(topic, {"kind": "queued", "time": start + i, "task_id": f"volume/{i:05d}", "node": addresses[i % nodes]})


async def main(args: argparse.Namespace) -> None:
    scheduler = Scheduler(dashboard_address="127.0.0.1:0", validate=False)
    simulated(scheduler, args.tasks, args.nodes, args.trace, args.history)
    pages = {"/rqml": RQMLPage, **{path: component for path, (_, component) in PAGES.items()}}
    print(f"{args.tasks} tasks, {args.nodes} nodes, {args.trace} checks per traced task, {args.history:g} heartbeat samples per node")
    print(f"{'page':<20}{'median ms':>10}{'worst ms':>10}  within {BUDGET_MS:g} ms")
    for path, component in pages.items():
        page = component(scheduler)
        times = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            page.update()
            times.append((time.perf_counter() - began) * 1000)
        worst = max(times[1:] or times)  # the first call builds the page's state
        print(f"{path:<20}{statistics.median(times):>10.1f}{worst:>10.1f}  {'yes' if worst <= BUDGET_MS else 'NO'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--trace", type=int, default=64)
    parser.add_argument("--history", type=float, default=600.0)
    parser.add_argument("--repeat", type=int, default=10)
    asyncio.run(main(parser.parse_args()))
