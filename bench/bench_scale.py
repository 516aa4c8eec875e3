"""The RQML scheduler plugin at scale: ``--nodes`` simulated nodes and ``--tasks`` tasks on a real
Scheduler, in one process.

A real ``distributed.Scheduler`` (in-process, on loopback) with the RQML scheduler plugin
installed as the preload installs it; ``--nodes`` simulated nodes (``tests/simulated_nodes.py``:
no worker process, Dask's own protocol) register over real comms, answer the plugin's calls,
report the tasks the scheduler sends them as finished on their streams, and send heartbeats
to the scheduler's ``heartbeat_worker`` handler, each carrying the node's figures and
``progress`` (32 new convergence checks of each of the two tasks it refines, a checkpoint
every 50 iterations, one task in seven escalated to a second model), as a node does. A real
``Client`` submits ``--tasks`` tasks (no data: each computes ``int()``) in one graph, each
annotated with its traits, the cores of a 3-D tile grid. A task finishes after three
heartbeats of its node.

1. The timed run, to ``--measure-at`` of its tasks ended: heartbeats are handed to the
   handler in-process, as fast as the scheduler takes them (the handler a comm calls).
2. Timed, over ``--seconds``: heartbeats arrive over the wire at Dask's rate for that
   many workers (one per node every ``heartbeat_interval(nodes)`` seconds, 6 s at 1,000),
   tasks go on finishing and being bound; every run of the plugin's periodic callbacks is
   timed: its ``rqml-release`` tick (every 0.1 s) and, where the plugin has one, its
   ``rqml-heartbeat`` pass over all nodes (every ``rqml.scheduler.heartbeat-interval``).
   Then ``rqml_status`` and each dashboard page's server-side ``update()`` are timed (the
   median of ``--repeat`` calls; the first builds the page and is not counted). The run
   then ends; the growth of the whole process's RSS over it (the scheduler with the plugin,
   the client, the simulated nodes) is printed.
3. Memory at ``--tasks``: once every task of the timed run ended (each with a full trace),
   its futures still held, the plugin's state is walked (:func:`plugin_size`: every object
   reachable from the plugin, Dask's own objects aside) and compared with the same walk
   after the nodes registered, before any task: the growth per task.
4. Memory under ``tracemalloc``, a cross-check of 3.: the timed run's futures are let go of
   and its tasks forgotten *before* tracing starts (not by ``Client.cancel``: Dask's
   ``stimulus_cancel`` calls ``client_releases_keys`` with all the keys once per key,
   10^10 steps at 10^5 keys), then a second run of ``--traced-tasks`` tasks (default
   10,000; tracing slows the whole process about 15x) to its end: the bytes still held
   that were allocated with the plugin's code (``rqml_dask``) on the stack, per task, and
   the walk of 3. over the same run, side by side.

The last line is ``tick_ms=<p99 of the tick> status_ms=<rqml_status> bytes_per_task=<plugin
state per task at --tasks, 3.> page_ms=<the slowest page's median>``.

    .venv/bin/python bench/bench_scale.py                  # 1,000 nodes, 100,000 tasks
    .venv/bin/python bench/bench_scale.py --nodes 50 --tasks 2000 --seconds 3   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import statistics
import sys
import time
import tracemalloc
import types
from pathlib import Path

import dask
import numpy as np
import psutil
from distributed import Client, Scheduler
from distributed.scheduler import heartbeat_interval

from rqml_dask.scheduler.dashboard import RQMLPage
from rqml_dask.scheduler.live_pages import PAGES
from rqml_dask.scheduler.plugin import PLUGIN_NAME, RQMLSchedulerPlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from simulated_nodes import SimulatedNode, SimulatedNodes, figures, rqml_graph  # noqa: E402

TICK, SWEEP = "rqml-release", "rqml-heartbeat"
PASSED = ("/numpy/", "/pydantic/", "/pydantic_core/", "<string>")
"""Code an allocation is attributed through, to its caller (:func:`plugin_bytes`)."""
CHECKS = 32  # convergence checks a node reports of each task it refines, per heartbeat (PROGRESS_POINTS)
REFINING = 2  # tasks a simulated node refines at once (its concurrency limit)
HEARTBEATS_PER_TASK = 3
MODELS = ("richardson_lucy", "richardson_lucy_tv")


class Simulation:
    """The nodes' side of the run: what each node refines, and how far each task got."""

    def __init__(self, nodes: SimulatedNodes, seed: int = 0) -> None:
        self.nodes = nodes
        self.rng = np.random.default_rng(seed)
        self.reports: dict = {}  # Dask key -> heartbeats that reported it
        self.speed: dict[str, float] = {}
        self.ended = 0

    def rqml(self, node: SimulatedNode) -> dict:
        """``node``'s heartbeat figures now, with the progress of the tasks it refines."""
        refining = list(node.running)[:REFINING]
        progress = {}
        for key in refining:
            done = self.reports.get(key, 0)
            first = done * CHECKS * 5
            model = MODELS[1] if done == HEARTBEATS_PER_TASK - 1 and hash(key) % 7 == 0 else MODELS[0]
            trace = [(first + 5 * (j + 1), model, 1.0 / (first + 5 * (j + 1)), 1e-3, 1e-4 if j else None, 0.01) for j in range(CHECKS)]
            checkpoints = [i for i in range(50, first + 5 * CHECKS + 1, 50) if i > first]
            progress[key[1]] = {"iteration": first + 5 * CHECKS, "trace": trace, "checkpoints": checkpoints}
            self.reports[key] = done + 1
        speed = self.speed.setdefault(node.address, float(self.rng.lognormal(3.0, 0.3)))
        return figures(concurrency_limit=REFINING, iterations_per_second=speed, inbound=len(node.running) - len(refining),
                       refining=len(refining), busy_fraction=0.9 if refining else 0.0, warm_models=list(MODELS[:1 + len(node.address) % 2]),
                       progress=progress)

    async def beat(self, node: SimulatedNode, over_the_wire: bool) -> None:
        """One heartbeat of ``node``, then report the tasks it has refined long enough."""
        await self.nodes.heartbeat(node, self.rqml(node), over_the_wire)
        for key in [k for k in list(node.running)[:REFINING] if self.reports.get(k, 0) >= HEARTBEATS_PER_TASK]:
            await self.nodes.finish(node, key)
            del self.reports[key]
            self.ended += 1

    async def run_until(self, ended: int) -> None:
        """Rounds of one in-process heartbeat per node until ``ended`` tasks ended."""
        while self.ended < ended:
            for node in list(self.nodes.nodes.values()):
                await self.beat(node, over_the_wire=False)
                if self.ended >= ended:
                    break
            await asyncio.sleep(0.02)  # the scheduler takes the results, binds more tasks and sends them

    async def run_for(self, seconds: float) -> int:
        """Heartbeats over the wire at Dask's rate, for ``seconds``; how many were sent."""
        nodes = list(self.nodes.nodes.values())
        pause = heartbeat_interval(len(nodes)) / len(nodes)
        began, sent = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            await self.beat(nodes[sent % len(nodes)], over_the_wire=True)
            sent += 1
            await asyncio.sleep(max(began + sent * pause - time.perf_counter(), 0))
        return sent


def timed(callback, into: list[tuple[float, float]]):
    """``callback``, keeping the wall and CPU (this thread's) milliseconds of each call in ``into``."""

    def run() -> None:
        began, cpu = time.perf_counter(), time.thread_time()
        callback()
        into.append(((time.perf_counter() - began) * 1000, (time.thread_time() - cpu) * 1000))

    return run


def summary(times: list[tuple[float, float]]) -> str:
    wall, cpu = np.array(times).T
    return (f"{len(times)} runs: wall median {np.median(wall):.2f} ms, p99 {np.percentile(wall, 99):.2f} ms, max {wall.max():.2f} ms; "
            f"CPU median {np.median(cpu):.2f} ms, p99 {np.percentile(cpu, 99):.2f} ms, max {cpu.max():.2f} ms")


async def submit(client: Client, plugin: RQMLSchedulerPlugin, run: str, tasks: int) -> list:
    """``tasks`` RQML-annotated tasks of the run ``run`` on a 3-D tile grid, in one graph;
    their futures once the plugin holds them all."""
    side = math.ceil(tasks ** (1 / 3))
    cores = [((z * 32, z * 32 + 32), (y * 64, y * 64 + 64), (x * 64, x * 64 + 64))
             for z, y, x in ((i // (side * side), (i // side) % side, i % side) for i in range(tasks))]
    futures = client.get(*rqml_graph(run, cores, MODELS[0]), sync=False)
    while sum(r.traits.task_id.startswith(f"{run}/") for r in plugin.tasks.values()) < tasks:
        await asyncio.sleep(0.2)
    return futures


def plugin_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still held that the plugin's code allocated: those whose innermost frame, past
    NumPy, pydantic and generated code (a dataclass's ``__init__``), is in ``rqml_dask``.
    What Dask allocates when the plugin calls it (``transitions``) is Dask's."""
    held = 0
    for trace in snapshot.traces:
        for frame in reversed(trace.traceback):  # the innermost first
            if not any(part in frame.filename for part in PASSED):
                held += trace.size if "/rqml_dask/" in frame.filename else 0
                break
    return held


SKIPPED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.CodeType,
           types.FrameType, types.CoroutineType, types.GeneratorType, logging.Logger, asyncio.AbstractEventLoop)
"""Objects :func:`plugin_size` does not count nor walk into: code, classes, modules, loggers, the loop."""


def plugin_size(plugin: RQMLSchedulerPlugin) -> tuple[int, int]:
    """Bytes of every object reachable from ``plugin`` (``sys.getsizeof``; an array's buffer
    with it, a view's base walked), and how many objects: Dask's and Tornado's objects (the
    scheduler, its task states) are neither counted nor walked into, code and classes
    neither (:data:`SKIPPED`). Strings and key tuples the plugin shares with Dask are
    counted: an upper bound of what the plugin holds."""
    seen: set[int] = set()
    stack: list = [plugin]
    size = count = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        module = type(obj).__module__ or ""
        if isinstance(obj, SKIPPED) or module.startswith(("distributed", "tornado", "dask", "bokeh")):
            continue
        size += sys.getsizeof(obj)
        count += 1
        if isinstance(obj, np.ndarray):
            if obj.base is not None:
                stack.append(obj.base)
            continue
        stack.extend(gc.get_referents(obj))
    return size, count


async def forgotten(scheduler: Scheduler, plugin: RQMLSchedulerPlugin, run: str) -> None:
    """Until the scheduler forgot every task of ``run`` and the plugin holds none of them as current."""
    while (any(isinstance(k, tuple) and len(k) == 3 and str(k[1]).startswith(f"{run}/") for k in scheduler.tasks)
           or any(key.startswith(f"{run}/") for key in plugin.tasks)):
        await asyncio.sleep(0.5)


def top_lines(snapshot: tracemalloc.Snapshot, top: int) -> list[str]:
    """The ``top`` lines of ``rqml_dask`` by the bytes still held that they allocated (attributed as :func:`plugin_bytes` does)."""
    lines: dict[str, list[int]] = {}
    for trace in snapshot.traces:
        for frame in reversed(trace.traceback):
            if not any(part in frame.filename for part in PASSED):
                if "/rqml_dask/" in frame.filename:
                    where = lines.setdefault(f"{frame.filename.split('/rqml_dask/')[1]}:{frame.lineno}", [0, 0])
                    where[0] += trace.size
                    where[1] += 1
                break
    return [f"rqml_dask/{where}: {size / 2**20:.2f} MiB in {count} blocks"
            for where, (size, count) in sorted(lines.items(), key=lambda item: -item[1][0])[:top]]


async def main(args: argparse.Namespace) -> None:
    dask.config.set({"distributed.logging.distributed": "warning"})
    logging.getLogger("distributed").setLevel(logging.ERROR)
    process = psutil.Process()
    scheduler = Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0", validate=False)
    plugin = RQMLSchedulerPlugin(seed=0)
    scheduler.add_plugin(plugin)  # as the preload installs it, before the scheduler starts
    await scheduler
    async with SimulatedNodes(scheduler) as nodes, Client(scheduler.address, asynchronous=True) as client:
        began = time.perf_counter()
        for i in range(args.nodes):
            await nodes.add(f"node-{i}", figures(concurrency_limit=REFINING))
        print(f"{args.nodes} nodes registered in {time.perf_counter() - began:.1f} s")
        gc.collect()
        empty, _ = plugin_size(plugin)

        # the timed run
        simulation = Simulation(nodes)
        rss = process.memory_info().rss
        began = time.perf_counter()
        futures = await submit(client, plugin, "timed", args.tasks)
        print(f"{args.tasks} tasks submitted in {time.perf_counter() - began:.1f} s")
        began = time.perf_counter()
        await simulation.run_until(int(args.measure_at * args.tasks))
        print(f"{simulation.ended} tasks ended in {time.perf_counter() - began:.1f} s")
        await asyncio.sleep(2)  # the scheduler binds the tasks the last results made room for
        ticks: list[tuple[float, float]] = []
        sweeps: list[tuple[float, float]] = []
        for name, into in ((TICK, ticks), (SWEEP, sweeps)):
            if (callback := scheduler.periodic_callbacks.get(name)) is not None:
                callback.callback = timed(callback.callback, into)
        sent = await simulation.run_for(args.seconds)
        print(f"{sent} heartbeats over the wire in {args.seconds:g} s ({sent / args.seconds:.0f}/s, Dask's rate for {args.nodes} workers)")
        tick_ms = float(np.percentile([wall for wall, _ in ticks], 99))
        print(f"tick ({TICK}), {summary(ticks)}")
        if sweeps:
            print(f"heartbeat pass ({SWEEP}), {summary(sweeps)}")
        states: dict[str, int] = {}
        for record in plugin.tasks.values():
            states[record.state] = states.get(record.state, 0) + 1
        print(f"tasks now: {states}")
        status_ms, page_ms = time_views(scheduler, plugin, args.repeat)
        await simulation.run_until(args.tasks)
        grown = process.memory_info().rss - rss
        print(f"process RSS grew {grown / 2**20:.0f} MiB over the timed run ({grown / args.tasks:.0f} bytes per task: "
              f"the scheduler with the plugin, the client, the simulated nodes)")
        await asyncio.sleep(1)  # the last results reach the plugin
        records = [r for r in plugin.tasks.values() if r.traits.task_id.startswith("timed/")]
        gc.collect()
        began = time.perf_counter()
        full, objects = plugin_size(plugin)
        bytes_per_task = (full - empty) / args.tasks
        print(f"plugin state ({time.perf_counter() - began:.1f} s to walk): {full / 2**20:.1f} MiB, {objects} objects, with "
              f"{len(records)} of {args.tasks} records held ({sum(r.state == 'done' for r in records)} done, "
              f"{sum(r.trace is not None for r in records)} with a trace); before any task {empty / 2**20:.1f} MiB: "
              f"{bytes_per_task:.0f} bytes per task")
        del records
        # let go of the futures (not Client.cancel: Dask's stimulus_cancel calls
        # client_releases_keys once per key with every key, quadratic: hours at 10^5)
        del futures
        gc.collect()
        began = time.perf_counter()
        await forgotten(scheduler, plugin, "timed")  # Dask's release of the keys, before tracing
        print(f"the timed run's tasks forgotten in {time.perf_counter() - began:.0f} s")

        if args.traced_tasks:
            # the same run again, smaller, its memory traced
            traced_tasks = args.traced_tasks
            gc.collect()
            before, _ = plugin_size(plugin)
            began = time.perf_counter()
            tracemalloc.start(3)
            futures = await submit(client, plugin, "traced", traced_tasks)
            await simulation.run_until(simulation.ended + traced_tasks)
            await asyncio.sleep(1)
            records = [r for r in plugin.tasks.values() if r.traits.task_id.startswith("traced/")]
            assert len(records) == traced_tasks and all(r.state == "done" for r in records), "the traced run did not end"
            gc.collect()
            snapshot = tracemalloc.take_snapshot()
            tracemalloc.stop()
            held = plugin_bytes(snapshot)
            traced = sum(r.trace is not None for r in records)
            del records
            after, _ = plugin_size(plugin)
            print(f"traced run ({time.perf_counter() - began:.0f} s): {traced} of {traced_tasks} records with a trace; still held, "
                  f"allocated by the plugin's code: {held / 2**20:.1f} MiB, {held / traced_tasks:.0f} bytes per task; "
                  f"the plugin's state grew {(after - before) / 2**20:.1f} MiB, {(after - before) / traced_tasks:.0f} bytes per task")
            for line in top_lines(snapshot, args.top):
                print(f"  {line}")
            del snapshot, futures
    await scheduler.close()
    print(f"tick_ms={tick_ms:.2f} status_ms={status_ms:.1f} bytes_per_task={bytes_per_task:.0f} page_ms={page_ms:.1f}")


def time_views(scheduler: Scheduler, plugin: RQMLSchedulerPlugin, repeat: int) -> tuple[float, float]:
    """The median time of ``rqml_status`` and of the slowest page's ``update()``, printed with the others'."""
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        status = plugin.status()
        times.append((time.perf_counter() - began) * 1000)
    status_ms = statistics.median(times)
    print(f"rqml_status: median {status_ms:.1f} ms, max {max(times):.1f} ms; {len(status['tasks'])} tasks detailed, "
          f"{len(status['nodes'])} nodes")
    page_ms = 0.0
    for path, component in {"/rqml": RQMLPage, **{path: component for path, (_, component) in PAGES.items()}}.items():
        page = component(scheduler)
        times = []
        for _ in range(repeat + 1):
            began = time.perf_counter()
            page.update()
            times.append((time.perf_counter() - began) * 1000)
        median = statistics.median(times[1:])  # the first builds the page's state
        page_ms = max(page_ms, median)
        print(f"page {path:<18} update: median {median:.1f} ms, max {max(times[1:]):.1f} ms")
    return status_ms, page_ms


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--measure-at", type=float, default=0.9, help="the share of tasks ended when the timing starts")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long ticks are timed")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--traced-tasks", type=int, default=10_000, help="tasks of the run under tracemalloc (0: none)")
    parser.add_argument("--top", type=int, default=8, help="rqml_dask lines shown by the bytes they hold after the traced run")
    asyncio.run(main(parser.parse_args()))
