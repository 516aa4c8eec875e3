"""The scheduler plugin's cost follows what changed, and what it keeps and shows stays bounded.

A real, in-process Scheduler with the plugin, simulated nodes speaking Dask's protocol
(``simulated_nodes.py``: registration, heartbeats to the ``heartbeat_worker`` handler over a
comm, results on their streams) and a real Client; no worker process, so these are fast.
Timings are ``bench/bench_scale.py``'s; these tests assert behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager

import numpy as np
from click.testing import CliRunner
from distributed import Client, Scheduler

from rqml_dask import events
from rqml_dask.cli import main as cli
from rqml_dask.messages import TaskProgress, TaskTraits, read_heartbeat
from rqml_dask.scheduler import plugin as plugin_module
from rqml_dask.scheduler.dashboard import RQMLPage
from rqml_dask.scheduler.live_pages import CURVES_OVERLAID, NODES_DRAWN, TASKS_OFFERED, TILE_COLOURS, TILES_DRAWN, PAGES
from rqml_dask.scheduler.plugin import PLUGIN_NAME, RQMLSchedulerPlugin
from rqml_dask.scheduler.records import DECISIONS_KEPT, LIVE_TRACE_POINTS, Runs, TaskRecord, Trace
from simulated_nodes import SimulatedNodes, figures, rqml_graph
from timing import bound, until


def run(test: Callable[[], object]) -> None:
    asyncio.run(asyncio.wait_for(test(), bound(120)))


@asynccontextmanager
async def cluster():
    """A scheduler with the plugin (installed as the preload installs it), its simulated nodes and a client."""
    scheduler = Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0")
    plugin = RQMLSchedulerPlugin(seed=0)
    scheduler.add_plugin(plugin)
    await scheduler
    try:
        async with SimulatedNodes(scheduler) as nodes, Client(scheduler.address, asynchronous=True) as client:
            yield scheduler, plugin, nodes, client
    finally:
        await scheduler.close()


def grid(shape: tuple[int, ...], tile: int = 16) -> list[tuple[tuple[int, int], ...]]:
    """The cores of a tile grid of ``shape`` tiles (2-D or 3-D)."""
    return [tuple((i * tile, i * tile + tile) for i in index) for index in np.ndindex(*shape)]


def test_invalid_figures_are_refused_once_where_the_heartbeat_arrives_and_the_node_rests():
    async def test():
        async with cluster() as (scheduler, plugin, nodes, client):
            liar = await nodes.add("liar", figures(concurrency_limit=2))
            honest = await nodes.add("honest", figures(concurrency_limit=2))
            for _ in range(3):  # refused each time, said once
                answer = await nodes.heartbeat(liar, figures(concurrency_limit="many"))
                assert answer["status"] == "OK"  # Dask took the heartbeat; the plugin refused its figures
                assert plugin.nodes[liar.address].invalid_figures == "concurrency_limit: Input should be a valid integer (got 'many')"
            alerts = [e for _, e in scheduler.get_events(events.ALERTS) if e["kind"] == "invalid-figures"]
            assert [e["worker"] for e in alerts] == [liar.address]
            assert plugin.status()["nodes"][honest.address]["invalid_figures"] is None
            await until(lambda: plugin.table.refused[plugin.table.index[liar.address]], "the tick taking the refusal")
            futures = client.get(*rqml_graph("lied", grid((2, 2))), sync=False)
            await until(lambda: sum(r.state == "bound" for r in plugin.tasks.values()) == 3, "the honest node's room filled")
            assert {r.worker for r in plugin.tasks.values() if r.state == "bound"} == {honest.address}  # the liar rests
            await nodes.heartbeat(liar, figures(concurrency_limit=2))  # honest again: it takes work again
            assert plugin.nodes[liar.address].invalid_figures is None
            await until(lambda: any(r.worker == liar.address for r in plugin.tasks.values()), "a task bound to the node again")
            del futures

    run(test)


def test_a_heartbeat_is_checked_once_on_arrival_and_the_tick_takes_only_the_nodes_that_changed(monkeypatch):
    checked: list[str] = []

    def counting(raw):
        checked.append(raw["backend"])
        return read_heartbeat(raw)

    monkeypatch.setattr(plugin_module, "read_heartbeat", counting)

    async def test():
        async with cluster() as (scheduler, plugin, nodes, client):
            a, b, c = [await nodes.add(name, figures(iterations_per_second=10.0)) for name in "abc"]
            assert len(checked) == 3  # each registration's heartbeat, in add_worker
            await until(lambda: not plugin._dirty, "a tick")
            before = len(checked)
            await nodes.heartbeat(a, figures(iterations_per_second=30.0, warm_models=["landweber"], gpu_count=1, backend="a"))
            assert checked[-1] == "a" and len(checked) == before + 1
            assert plugin.nodes[a.address].figures.warm_models == ("landweber",)  # kept at once, on the node's record
            assert plugin._dirty == {a.address}
            plugin._tick()
            i = plugin.table.index[a.address]
            assert plugin.table.warm["landweber"].tolist() == [j == i for j in range(3)] and plugin.table.gpu[i]
            assert plugin.table.rate.tolist() == [30.0 if j == i else 10.0 for j in range(3)]
            assert plugin.table.speed[i] == max(plugin.table.speed) > 1
            for _ in range(5):  # ticks with nothing new: no heartbeat is checked again
                plugin._tick()
            await asyncio.sleep(0.3)  # and the periodic ones
            assert len(checked) == before + 1 and not plugin._dirty

    run(test)


def test_a_task_record_keeps_a_bounded_thinned_trace_and_its_latest_decisions():
    trace = Trace()
    for report in range(50):  # 50 heartbeats of 32 checks, a second model from the 40th on
        model = "richardson_lucy" if report < 40 else "landweber"
        points = tuple((report * 160 + 5 * (j + 1), model, 1.0 / (report * 160 + 5 * (j + 1)), 1e-3, None, 0.1) for j in range(32))
        checkpoints = tuple(range(report * 160 + 50, report * 160 + 161, 50))
        trace.add(TaskProgress(iteration=points[-1][0], trace=points, checkpoints=checkpoints))
        trace.add(TaskProgress(iteration=points[-1][0], trace=points[-5:]))  # a check reported again is taken once
        assert len(trace.checks) <= LIVE_TRACE_POINTS and len(trace.checkpoints) <= LIVE_TRACE_POINTS
    assert trace.iterations[0] == 5 and trace.iterations[-1] == 50 * 160  # the first and the latest kept
    assert (np.diff(trace.iterations) > 0).all()
    assert trace.models == ("richardson_lucy", "landweber") and [s[2] for s in trace.switches()] == ["landweber"]
    assert trace.latest() == {"misfit": trace.figure("misfit")[-1].item(), "stability": trace.figure("stability")[-1].item(),
                              "consistency": None, "novelty": trace.figure("novelty")[-1].item()}
    record = TaskRecord(traits=None, dask_key=("rqml", "t@0", "0"))
    for n in range(100):
        record.decided({"kind": "escalated", "n": n})
    assert [d["n"] for d in record.decisions] == list(range(100 - DECISIONS_KEPT, 100))


def test_the_index_of_runs_follows_records_as_they_change_are_replaced_and_go():
    def record(task_id: str, core=((0, 8), (0, 8))) -> TaskRecord:
        return TaskRecord(TaskTraits(f"{task_id}@1", "deconvolution", "m", core=core), ("rqml", f"{task_id}@1", "0"))

    runs = Runs()
    first, vote, other = record("r/0"), record("r/0/vote-landweber", core=()), record("s/0", core=((0, 8), (0, 8), (0, 8)))
    for r in (first, vote, other):
        runs.add(r)
    runs.set_state(first, "done")
    runs.set_iteration(first, 40)
    assert runs.names() == ["r", "s"] and runs.counts() == {"done": 1, "pending": 2} and runs.get("r").iterations == 40
    assert list(runs.get("r").voters) == ["r/0"] and list(runs.get("s").layers) == [(0, 8)] and list(runs.get("r").layers) == [(0, 0)]
    again = record("r/0")  # submitted again: it replaces the first, and its run is the latest
    runs.add(again)
    assert runs.names() == ["s", "r"] and runs.get("r").counts() == {"pending": 2} and runs.get("r").iterations == 0
    runs.set_state(first, "erred")  # the record it replaced is no longer counted
    runs.discard(first)
    assert runs.get("r").records["r/0@1"] is again and len(runs) == 3
    for r in (again, vote, other):
        runs.discard(r)
    assert runs.names() == [] and runs.counts() == {} and runs.latest() is None


def test_the_plugin_keeps_what_nodes_report_of_their_tasks_bounded():
    async def test():
        async with cluster() as (scheduler, plugin, nodes, client):
            node = await nodes.add("n", figures(concurrency_limit=1))
            futures = client.get(*rqml_graph("long", grid((1, 1))), sync=False)
            await until(lambda: node.running, "the task sent to the node")
            [key] = node.running
            for report in range(20):
                points = [(report * 100 + j + 1, "richardson_lucy", 1.0 / (report * 100 + j + 1), 1e-3, None, None) for j in range(100)]
                progress = {key[1]: {"iteration": points[-1][0], "trace": points, "checkpoints": [report * 100 + 50]}}
                await nodes.heartbeat(node, figures(concurrency_limit=1, refining=1, progress=progress))
            record = plugin.tasks[key[1]]
            assert record.iteration == 2000 and len(record.trace.checks) <= LIVE_TRACE_POINTS and record.trace.iterations[-1] == 2000
            assert plugin.nodes[node.address].figures.progress == {}  # taken into the record, not kept on the node
            await nodes.finish(node, key)
            await until(lambda: record.state == "done", "the task done")
            del futures

    run(test)


def test_status_of_many_tasks_is_counts_and_a_bounded_list_of_tasks_open_ones_first():
    async def test():
        async with cluster() as (scheduler, plugin, nodes, client):
            a, b = await nodes.add("a", figures(concurrency_limit=2)), await nodes.add("b", figures(concurrency_limit=2))
            earlier = client.get(*rqml_graph("earlier", grid((5, 10))), sync=False)
            await until(lambda: len(plugin.tasks) == 50, "the earlier run")
            for node in (a, b):  # the nodes finish what they got of it
                await until(lambda: len(node.running) == 3, "three tasks on each node")
                for key in list(node.running):
                    await nodes.finish(node, key)
            futures = client.get(*rqml_graph("many", grid((30, 100))), sync=False)
            await until(lambda: len(plugin.tasks) == 3050, "3,000 tasks more")
            await until(lambda: sum(len(n.running) for n in nodes.nodes.values()) == 6, "six tasks bound")
            status = plugin.status(limit=100)
            assert status["counts"] == {"done": 6, "bound": 6, "pending": 3038} and status["total"] == 3050
            assert list(status["runs"]) == ["earlier", "many"] and status["runs"]["many"]["tasks"] == 3000
            assert len(status["tasks"]) == 100
            assert [t["state"] for t in status["tasks"].values()][:7] == ["bound"] * 6 + ["pending"]  # open ones first
            page = plugin.status(limit=100, offset=100)
            assert len(page["tasks"]) == 100 and not set(page["tasks"]) & set(status["tasks"])
            assert set(plugin.status(limit=10_000, state="done")["tasks"]) == {
                r.traits.key for r in plugin.tasks.values() if r.state == "done"}
            many = plugin.status(limit=0, run="many")
            assert many["tasks"] == {} and many["counts"] == {"pending": 3000} and many["total"] == 3000  # the earlier run is first
            # `rqml status` prints the latest run's count of tasks (--all: every run's) and lists the open ones it was given
            latest, every = [await asyncio.to_thread(CliRunner().invoke, cli, ["status", "--scheduler", scheduler.address, *more])
                             for more in ([], ["--all"])]
            assert latest.exit_code == 0 and every.exit_code == 0, latest.output + every.output
            assert "tasks of run many (the latest of 2; --all for every run): 3000 pending" in latest.output
            assert "... and 2000 more open tasks, not listed" in latest.output  # 1,000 detailed, all of them open
            assert "tasks of every run (2): 6 bound, 6 done, 3038 pending" in every.output
            assert "... and 2044 more open tasks, not listed" in every.output
            del earlier, futures

    run(test)


def test_the_pages_render_ten_thousand_tasks_within_their_bounds():
    async def test():
        async with cluster() as (scheduler, plugin, nodes, client):
            added = [await nodes.add(f"node-{i}", figures(concurrency_limit=2)) for i in range(NODES_DRAWN + 2)]
            volume = client.get(*rqml_graph("volume", grid((10, 25, 40))), sync=False)  # 10 layers of 1,000 tiles
            plane = client.get(*rqml_graph("plane", grid((100, 100))), sync=False)  # one layer of 10,000
            await until(lambda: len(plugin.tasks) == 20_000, "20,000 tasks")
            await until(lambda: sum(len(n.running) for n in added) == 3 * len(added), "every node's room filled")
            for i, node in enumerate(added):  # each node reports its tasks' progress, one of them on another model
                progress = {key[1]: {"iteration": 50, "trace": [(5 * (j + 1), "landweber" if i == 0 else "richardson_lucy", 1.0 / (j + 1),
                                                                1e-3, None, None) for j in range(10)], "checkpoints": [50]}
                            for key in list(node.running)[:2]}
                await nodes.heartbeat(node, figures(concurrency_limit=2, refining=2, inbound=1, iterations_per_second=float(i + 1),
                                                    progress=progress))
            plugin._heartbeat()  # a sample of every node for the nodes page
            pages = {path: component(scheduler) for path, (_, component) in PAGES.items()}
            for page in [RQMLPage(scheduler), *pages.values()]:
                page.update()

            tiles = pages["/rqml-tiles"]
            assert tiles.run.select.value == "plane" and len(tiles.tiles.data["task"]) <= TILES_DRAWN  # drawn in blocks
            assert set(tiles.tiles.data["state"]) == {"queued"}  # the nodes took the hardest tasks first: the volume's
            assert tiles.summary.text == "10000 tiles: 10000 queued"  # one layer
            tiles.run.select.value = "volume"
            tiles.update()
            assert len(tiles.tiles.data["task"]) == 1000 and tiles.layer.end == 9  # one layer of tiles, one by one
            assert {"refining", "queued"} <= set(tiles.tiles.data["state"]) <= set(TILE_COLOURS)
            convergence = pages["/rqml-convergence"]
            convergence.run.select.value = "volume"
            convergence.update()
            assert len(convergence.choice.options) <= TASKS_OFFERED
            drawn = [s for s in convergence.sources if s.data["iteration"]]
            assert len(drawn) == CURVES_OVERLAID and convergence.legend.text.count("&#9632;") == 1  # one entry per model, not per task
            nodes_page = pages["/rqml-nodes"]
            assert len(nodes_page.series["iterations_per_second"].data["node"]) == NODES_DRAWN
            assert nodes_page.cluster["iterations_per_second"].data["value"][-1] == sum(range(1, len(added) + 1)) / len(added)
            assert len(nodes_page.table.data["node"]) == len(added)
            del volume, plane

    run(test)


def test_a_node_registered_with_a_bad_heartbeat_is_refused_from_the_start():
    async def test():
        async with cluster() as (scheduler, plugin, nodes, client):
            node = await nodes.add("bad", figures(busy_fraction=3.0))
            assert plugin.nodes[node.address].invalid_figures.startswith("busy_fraction: Input should be less than or equal to 1")
            assert [e["worker"] for _, e in scheduler.get_events(events.ALERTS) if e["kind"] == "invalid-figures"] == [node.address]

    run(test)
