"""Live RQML pages of the Dask dashboard: tiles, convergence, nodes over time, events.

Each page is a Dask dashboard component (``root`` laid out, ``update`` on a periodic
callback) that reads the RQML scheduler plugin's records and the scheduler's event log; none
asks a node anything. What they show:

* ``/rqml-tiles``: the tile grid of one pipeline run (the latest submitted, or the one
  chosen), one layer of tiles along z at a time (a slider), each tile coloured by its state,
  hover showing node, model, iteration and latest convergence figures; clicking a tile
  selects it and draws its convergence below.
* ``/rqml-convergence``: misfit, stability, consistency and novelty against iteration of the
  tasks chosen (several overlaid; by default the ones refining now), model switches,
  checkpoints and failed validations marked on the misfit curves, and each task's
  supervision events (escalations, validation failures, reroutes) listed.
* ``/rqml-nodes``: per node over time, iterations/s, queue depths, host and GPU memory, and
  the reliability weight (the plugin's samples, :attr:`NodeRecord.history
  <rqml_dask.scheduler.plugin.NodeRecord.history>`), with each node's link (degraded?) and
  quarantine state.
* ``/rqml-events``: the RQML topics of the scheduler's event log, newest first, filtered by
  topic and kind.

Tasks of earlier runs are not mixed in: every page shows one run (pipeline name) at a time.
"""

from __future__ import annotations

import math
import time
from typing import Any

from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource, DataTable, Div, HoverTool, MultiChoice, Select, Slider, TableColumn, TapTool, TextInput,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from distributed import Scheduler

from rqml_dask import events

TILE_COLOURS = {"queued": "#c7c7c7", "refining": "#1f77b4", "escalated": "#ff7f0e", "converged": "#2ca02c",
                "voted": "#17becf", "stalled": "#8c564b", "rejected": "#d62728", "failed": "#9467bd", "released": "#f7f7f7"}
"""A colour per tile state (:func:`tile_state`)."""
FIGURES = ("misfit", "stability", "consistency", "novelty")
EVENTS_SHOWN = 200
ALL_BUT_HEARTBEATS = "all but heartbeats and metrics"
CURVES_OVERLAID = 8


def plugin_of(scheduler: Scheduler):
    from rqml_dask.scheduler.plugin import PLUGIN_NAME

    return scheduler.plugins.get(PLUGIN_NAME)


def run_records(plugin) -> dict[str, dict[str, Any]]:
    """Every task record the plugin has (current and kept finished), by run (pipeline name),
    runs in order of their latest submission."""
    runs: dict[str, dict[str, Any]] = {}
    for record in sorted([*plugin.finished.values(), *plugin.tasks.values()], key=lambda r: r.submitted_at):
        name = record.traits.task_id.split("/", 1)[0]
        runs.setdefault(name, {})[record.traits.task_id] = record
        runs[name] = runs.pop(name)  # latest submitted last
    return runs


def tile_state(record, voters: list) -> str:
    """One word for where a task stands: queued, refining, escalated, converged, voted,
    stalled, rejected, failed (or released: its client let go of it before it ended)."""
    if record.state == "erred" or record.result_state == "failed":
        return "failed"
    if record.state == "done":
        if record.result_state in (None, "accepted"):
            return "voted" if voters and all(v.state == "done" for v in voters) else "converged"
        return "stalled" if record.result_state == "stalled" else "rejected"
    if record.state == "released":
        return "released"
    if record.state == "bound" and record.iteration > 0:
        switched = any(d.get("kind") in ("escalated", "diversified") for d in record.decisions)
        return "escalated" if switched else "refining"
    return "queued"


def _latest_figures(record) -> dict[str, Any]:
    if not record.trace:
        return {name: "" for name in FIGURES}
    point = record.trace[-1]
    return {name: "" if value is None else f"{value:.3g}" for name, value in zip(FIGURES, point[2:])}


class RunChoice:
    """A Select of the runs the plugin knows, following the latest until a user picks one."""

    def __init__(self) -> None:
        self.select = Select(title="run", options=[], value="", name="rqml-run", width=220)
        self.follow_latest = True
        self.select.on_change("value", self._picked)
        self._setting = False

    def _picked(self, attr, old, new) -> None:
        if not self._setting:
            self.follow_latest = new == (self.select.options[-1] if self.select.options else new)

    def update(self, runs: dict[str, dict]) -> str | None:
        names = list(runs)
        self._setting = True
        try:
            if self.select.options != names:
                self.select.options = names
            if names and (self.follow_latest or self.select.value not in names):
                self.select.value = names[-1]
        finally:
            self._setting = False
        return self.select.value or None


def _curve_figure(title: str, name: str) -> figure:
    plot = figure(title=title, y_axis_type="log", height=260, sizing_mode="stretch_width", name=name,
                  tools="pan,wheel_zoom,box_zoom,reset")
    plot.xaxis.axis_label = "iteration"
    return plot


class TilesPage:
    """The tile map of one run, one layer along z at a time; a clicked tile's convergence below."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.run = RunChoice()
        self.layer = Slider(start=0, end=1, value=0, step=1, title="tile layer along z", name="rqml-tile-layer", width=300)
        self.summary = Div(text="", name="rqml-tiles-summary")
        fields = ("x", "y", "w", "h", "colour", "task", "key", "state", "node", "model", "iteration", *FIGURES)
        self.tiles = ColumnDataSource({f: [] for f in fields}, name="rqml-tiles")
        self.map = figure(title="Tiles", match_aspect=True, height=460, sizing_mode="stretch_width",
                          tools="pan,wheel_zoom,reset,tap", name="rqml-tile-map")
        self.map.y_range.flipped = True
        self.map.rect("x", "y", "w", "h", source=self.tiles, fill_color="colour", fill_alpha=0.75, line_color="black")
        self.map.add_tools(HoverTool(tooltips=[("task", "@task"), ("state", "@state"), ("node", "@node"), ("model", "@model"),
                                               ("iteration", "@iteration"), ("misfit", "@misfit"), ("stability", "@stability"),
                                               ("consistency", "@consistency"), ("novelty", "@novelty")]))
        self.map.select_one(TapTool).behavior = "select"
        self.map.xaxis.axis_label, self.map.yaxis.axis_label = "x (voxels)", "y (voxels)"
        self.tiles.selected.on_change("indices", self._tapped)
        self.selected: str | None = None
        self.curve = ColumnDataSource({"iteration": [], "misfit": [], "stability": []}, name="rqml-selected-curve")
        self.curve_plot = _curve_figure("Selected task: click a tile", "rqml-selected-plot")
        self.curve_plot.line("iteration", "misfit", source=self.curve, legend_label="misfit", color=Category10_10[0])
        self.curve_plot.line("iteration", "stability", source=self.curve, legend_label="stability", color=Category10_10[1])
        legend = " ".join(f"<span style='background:{c};padding:0 6px'>&nbsp;</span> {s}" for s, c in TILE_COLOURS.items())
        self.root = column(row(self.run.select, self.layer), self.summary, Div(text=legend), self.map, self.curve_plot,
                           sizing_mode="stretch_width")
        self._layers: list[tuple[int, int]] = []

    def _tapped(self, attr, old, new) -> None:
        if new:
            self.selected = self.tiles.data["key"][new[0]]
            self._draw_selected()

    def update(self) -> None:
        plugin = plugin_of(self.scheduler)
        if plugin is None:
            self.summary.text = "The RQML scheduler plugin is not installed on this scheduler."
            return
        runs = run_records(plugin)
        name = self.run.update(runs)
        records = runs.get(name, {})
        voters: dict[str, list] = {}
        tiles = []
        for task_id, record in records.items():
            if "/vote-" in task_id:
                voters.setdefault(task_id.split("/vote-")[0], []).append(record)
            elif record.traits.core:
                tiles.append(record)
        layers = sorted({tuple(r.traits.core[0]) if len(r.traits.core) == 3 else (0, 0) for r in tiles})
        if layers != self._layers:
            self._layers = layers
            self.layer.end = max(len(layers) - 1, 1)
            self.layer.value = min(self.layer.value, len(layers) - 1) if layers else 0
        current = layers[self.layer.value] if layers else None
        data: dict[str, list] = {f: [] for f in self.tiles.data}
        counts: dict[str, int] = {}
        for record in tiles:
            state = tile_state(record, voters.get(record.traits.task_id, []))
            counts[state] = counts.get(state, 0) + 1
            core = record.traits.core
            if (tuple(core[0]) if len(core) == 3 else (0, 0)) != current:
                continue
            (y0, y1), (x0, x1) = core[-2:]
            data["x"].append((x0 + x1) / 2)
            data["y"].append((y0 + y1) / 2)
            data["w"].append(x1 - x0)
            data["h"].append(y1 - y0)
            data["colour"].append(TILE_COLOURS[state])
            data["task"].append(record.traits.task_id)
            data["key"].append(record.traits.key)
            data["state"].append(state)
            data["node"].append(record.worker or "")
            data["model"].append(record.model or record.traits.model)
            data["iteration"].append(record.iteration)
            for key, value in _latest_figures(record).items():
                data[key].append(value)
        if data["task"] != list(self.tiles.data["task"]):
            self.tiles.selected.indices = []
        self.tiles.data = data
        where = f", layer z {current[0]}-{current[1]}" if current and len(layers) > 1 else ""
        self.map.title.text = f"Tiles of {name or 'no run yet'}{where}"
        self.summary.text = f"{len(tiles)} tiles: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        self._draw_selected()

    def _draw_selected(self) -> None:
        plugin = plugin_of(self.scheduler)
        record = None
        if plugin is not None and self.selected is not None:
            record = plugin.tasks.get(self.selected) or plugin.finished.get(self.selected)
        if record is None:
            return
        points = [p for p in record.trace if p[2] is not None and p[2] > 0]
        self.curve.data = {"iteration": [p[0] for p in points], "misfit": [p[2] for p in points],
                           "stability": [p[3] if p[3] and p[3] > 0 else math.nan for p in points]}
        self.curve_plot.title.text = f"Selected task {record.traits.task_id}: {record.model or record.traits.model}, iteration {record.iteration}"


class ConvergencePage:
    """The convergence figures of several tasks of one run, overlaid, model switches marked."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.run = RunChoice()
        self.choice = MultiChoice(title=f"tasks (unset: up to {CURVES_OVERLAID} refining now, else the latest)", options=[],
                                  value=[], name="rqml-convergence-tasks", sizing_mode="stretch_width")
        self.sources = [ColumnDataSource({"iteration": [], **{f: [] for f in FIGURES}, "model": [], "task": []},
                                         name=f"rqml-convergence-{i}") for i in range(CURVES_OVERLAID)]
        self.switches = ColumnDataSource({"iteration": [], "misfit": [], "to": [], "task": []}, name="rqml-model-switches")
        self.marks = {kind: ColumnDataSource({"iteration": [], "misfit": [], "task": []}, name=f"rqml-{kind}-marks")
                      for kind in ("checkpoint", "validation")}
        self.plots = {}
        for name in FIGURES:
            plot = _curve_figure(name, f"rqml-convergence-{name}")
            for i, source in enumerate(self.sources):
                plot.line("iteration", name, source=source, color=Category10_10[i], line_width=2)
            if name == "misfit":
                plot.scatter("iteration", "misfit", source=self.switches, marker="triangle", size=10, color="black",
                             legend_label="model switch")
                plot.scatter("iteration", "misfit", source=self.marks["checkpoint"], marker="square", size=6, color="grey",
                             fill_alpha=0.3, legend_label="checkpoint")
                plot.scatter("iteration", "misfit", source=self.marks["validation"], marker="x", size=12, color="red",
                             line_width=2, legend_label="validation failed")
                plot.legend.location = "top_right"
            plot.add_tools(HoverTool(tooltips=[("task", "@task"), ("iteration", "@iteration"), ("model", "@model"), (name, f"@{name}")]))
            self.plots[name] = plot
        self.decisions = ColumnDataSource({"task": [], "kind": [], "detail": []}, name="rqml-convergence-decisions")
        table = DataTable(source=self.decisions, columns=[TableColumn(field=f, title=f) for f in ("task", "kind", "detail")],
                          height=200, sizing_mode="stretch_width", index_position=None)
        self.legend = Div(text="")
        self.root = column(row(self.run.select), self.choice, self.legend, *self.plots.values(),
                           Div(text="<b>Supervision events</b>"), table,
                           sizing_mode="stretch_width")

    def update(self) -> None:
        plugin = plugin_of(self.scheduler)
        if plugin is None:
            return
        runs = run_records(plugin)
        records = runs.get(self.run.update(runs), {})
        options = sorted(records)
        if self.choice.options != options:
            self.choice.options = options
        chosen = [records[t] for t in self.choice.value if t in records]
        if not chosen:
            refining = [r for r in records.values() if r.state == "bound" and r.trace]
            chosen = (refining or sorted((r for r in records.values() if r.trace), key=lambda r: -r.submitted_at))[:CURVES_OVERLAID]
        switches: dict[str, list] = {"iteration": [], "misfit": [], "to": [], "task": []}
        marks: dict[str, dict[str, list]] = {kind: {"iteration": [], "misfit": [], "task": []} for kind in self.marks}
        decisions: dict[str, list] = {"task": [], "kind": [], "detail": []}
        for i, source in enumerate(self.sources):
            record = chosen[i] if i < len(chosen) else None
            trace = record.trace if record is not None else []
            data = {"iteration": [p[0] for p in trace], "model": [p[1] for p in trace],
                    "task": [record.traits.task_id] * len(trace) if record else []}
            for j, name in enumerate(FIGURES):
                data[name] = [p[2 + j] if p[2 + j] is not None and p[2 + j] > 0 else math.nan for p in trace]
            source.data = data
            for prev, point in zip(trace, trace[1:]):
                if point[1] != prev[1] and point[2]:
                    switches["iteration"].append(point[0])
                    switches["misfit"].append(point[2])
                    switches["to"].append(point[1])
                    switches["task"].append(record.traits.task_id)
            if record is not None and trace:
                placed = [("checkpoint", i) for i in record.checkpoints]
                placed += [("validation", d["iteration"]) for d in record.decisions
                           if d.get("kind") == "validation_failed" and isinstance(d.get("iteration"), int)]
                for kind, iteration in placed:  # drawn on the curve: at the misfit of the check nearest it
                    nearest = min(trace, key=lambda p: abs(p[0] - iteration))
                    if nearest[2]:
                        marks[kind]["iteration"].append(iteration)
                        marks[kind]["misfit"].append(nearest[2])
                        marks[kind]["task"].append(record.traits.task_id)
            for decision in (record.decisions if record is not None else []):
                decisions["task"].append(record.traits.task_id)
                decisions["kind"].append(str(decision.get("kind", "")))
                decisions["detail"].append(", ".join(f"{k}={v}" for k, v in decision.items()
                                                     if k not in ("kind", "task_id", "key", "time", "worker")))
        self.switches.data = switches
        for kind, source in self.marks.items():
            source.data = marks[kind]
        self.decisions.data = decisions
        self.legend.text = " ".join(f"<span style='color:{Category10_10[i]}'>&#9632; {r.traits.task_id}</span>"
                                    for i, r in enumerate(chosen[:CURVES_OVERLAID]))


NODE_SERIES = {"iterations_per_second": "iterations/s", "queued": "queue depth (inbound + refining)",
               "host_memory_fraction": "host memory (fraction of limit)", "device_memory_fraction": "GPU memory (fraction)",
               "reliability": "reliability weight"}


class NodesPage:
    """Each node's figures over time (the plugin's samples, one per heartbeat) and its link
    and quarantine state now."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.series = {key: ColumnDataSource({"xs": [], "ys": [], "node": [], "colour": []}, name=f"rqml-nodes-{key}")
                       for key in NODE_SERIES}
        plots = []
        for key, title in NODE_SERIES.items():
            plot = figure(title=title, x_axis_type="datetime", height=200, sizing_mode="stretch_width", name=f"rqml-nodes-plot-{key}",
                          tools="pan,wheel_zoom,reset")
            plot.multi_line("xs", "ys", source=self.series[key], line_color="colour", line_width=2)
            plot.add_tools(HoverTool(tooltips=[("node", "@node")]))
            plots.append(plot)
        columns = ("node", "link", "reliability", "state")
        self.table = ColumnDataSource({c: [] for c in columns}, name="rqml-nodes-now")
        table = DataTable(source=self.table, columns=[TableColumn(field=c, title=c) for c in columns], height=180,
                          sizing_mode="stretch_width", index_position=None)
        self.root = column(table, *plots, sizing_mode="stretch_width")

    def update(self) -> None:
        plugin = plugin_of(self.scheduler)
        if plugin is None:
            return
        nodes = sorted(plugin.nodes)
        colours = [Category10_10[i % 10] for i in range(len(nodes))]
        samples = [list(plugin.nodes[n].history) for n in nodes]
        for key in NODE_SERIES:
            xs, ys = [], []
            for history in samples:
                points = [(s.time * 1000, getattr(s, key)) for s in history if getattr(s, key) is not None]
                xs.append([p[0] for p in points])
                ys.append([p[1] for p in points])
            self.series[key].data = {"xs": xs, "ys": ys, "node": nodes, "colour": colours}
        names = {address: str(ws.name) for address, ws in self.scheduler.workers.items()}
        rows: dict[str, list] = {"node": [], "link": [], "reliability": [], "state": []}
        for node in nodes:
            record = plugin.nodes[node]
            link = record.figures.get("link")
            rows["node"].append(f"{names.get(node, node)} ({node})")
            rows["link"].append(str(link.get("status", "unknown")) if isinstance(link, dict) else "unknown")
            rows["reliability"].append(round(record.history[-1].reliability, 3) if record.history else "")
            rows["state"].append(f"figures refused: {record.invalid_figures}" if record.invalid_figures else "working")
        for name, reason in sorted(plugin.gatekeeper.quarantined.items()):
            rows["node"].append(name)
            rows["link"].append("-")
            rows["reliability"].append(0.0)
            rows["state"].append(f"quarantined: {reason}")
        self.table.data = rows


class EventsPage:
    """The RQML topics of the event log, newest first, filtered by topic and kind."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.topic = Select(title="topic", value=ALL_BUT_HEARTBEATS, options=["all", ALL_BUT_HEARTBEATS, *events.TOPICS],
                            name="rqml-events-topic", width=260)
        self.kind = TextInput(title="kind contains", value="", name="rqml-events-kind", width=220)
        columns = ("time", "topic", "kind", "about", "detail")
        self.source = ColumnDataSource({c: [] for c in columns}, name="rqml-events")
        table = DataTable(source=self.source, columns=[TableColumn(field=c, title=c) for c in columns], height=600,
                          sizing_mode="stretch_width", index_position=None)
        self.root = column(row(self.topic, self.kind), table, sizing_mode="stretch_width")

    def update(self) -> None:
        topics = {"all": events.TOPICS, ALL_BUT_HEARTBEATS: [t for t in events.TOPICS if t not in (events.HEARTBEATS, events.METRICS)]
                  }.get(self.topic.value, (self.topic.value,))
        wanted = self.kind.value.strip()
        merged = []
        for topic in topics:
            for stamp, message in self.scheduler.get_events(topic):
                if isinstance(message, dict) and (not wanted or wanted in str(message.get("kind", ""))):
                    merged.append((stamp, topic, message))
        merged = sorted(merged, key=lambda e: e[0])[-EVENTS_SHOWN:][::-1]
        rows: dict[str, list] = {c: [] for c in self.source.data}
        for stamp, topic, message in merged:
            rows["time"].append(time.strftime("%H:%M:%S", time.localtime(stamp)))
            rows["topic"].append(topic.removeprefix("rqml-"))
            rows["kind"].append(str(message.get("kind", "")))
            rows["about"].append(str(message.get("task_id") or message.get("node") or message.get("worker") or ""))
            rows["detail"].append(", ".join(f"{k}={v}" for k, v in message.items() if k not in ("kind", "time", "task_id", "key")))
        self.source.data = rows


PAGES = {"/rqml-tiles": ("Tiles", TilesPage), "/rqml-convergence": ("Convergence", ConvergencePage),
         "/rqml-nodes": ("Nodes over time", NodesPage), "/rqml-events": ("Events", EventsPage)}
"""Path -> (title, component) of every live page."""
