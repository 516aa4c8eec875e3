"""Live RQML pages of the Dask dashboard: tiles, convergence, nodes over time, events.

Each page is a Dask dashboard component (``root`` laid out, ``update`` on a periodic
callback) that reads the RQML scheduler plugin's records and the scheduler's event log; none
asks a node anything. What they show:

* ``/rqml-tiles``: the tile grid of one pipeline run (the latest submitted, or the one
  chosen), one layer of tiles along z at a time (a slider, which follows the layer with the
  most tiles refining until a user moves it), each tile coloured by its state (``reused``: a
  result an earlier run computed, with that run's figures), hover showing node, model,
  iteration and latest convergence figures; clicking a tile
  selects it and draws its convergence below. A layer of more than :data:`TILES_DRAWN`
  tiles is drawn in blocks of neighbouring tiles, each coloured by the most pressing state
  among them (:data:`TILE_COLOURS`' order).
* ``/rqml-convergence``: misfit, stability, consistency and novelty against iteration of the
  tasks chosen (up to :data:`CURVES_OVERLAID` overlaid, coloured by model; by default the
  ones refining now), model switches, checkpoints and failed validations marked on the
  misfit curves, and each task's supervision events (escalations, validation failures,
  reroutes) listed. The tasks offered for choosing are at most :data:`TASKS_OFFERED`.
* ``/rqml-nodes``: per node over time, iterations/s, queue depths, host and GPU memory, and
  the reliability weight (the plugin's samples, :attr:`NodeRecord.history
  <rqml_dask.scheduler.records.NodeRecord.history>`), for at most :data:`NODES_DRAWN` nodes
  (the least reliable first) beside the cluster's mean, each line named in a legend and its
  hover, "no GPU on this cluster" in place of the GPU plot where that is so, with each
  node's link (degraded?) and quarantine state.
* ``/rqml-events``: the RQML topics of the scheduler's event log, newest first, filtered by
  topic and kind.

Tasks of earlier runs are not mixed in: every page shows one run (pipeline name) at a time.
Each page reads the plugin's index of runs (:class:`~rqml_dask.scheduler.records.Runs`) and
touches the records it shows, so that an update stays within 100 ms at 10^5 tasks and 10^3
nodes (``bench/bench_scale.py``).
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource, CustomJSTicker, CustomJSTickFormatter, DataTable, Div, HoverTool, HTMLTemplateFormatter, MultiChoice, Select,
    Slider, TableColumn, TapTool, TextInput,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from distributed import Scheduler

from rqml_dask import events
from rqml_dask.scheduler.page_routes import TITLES
from rqml_dask.scheduler.records import FIGURES, NODE_SERIES, NodeHistory, Run, TaskRecord

TILE_COLOURS = {"failed": "#9467bd", "rejected": "#d62728", "stalled": "#8c564b", "escalated": "#ff7f0e",
                "refining": "#1f77b4", "queued": "#c7c7c7", "voted": "#17becf", "converged": "#2ca02c", "reused": "#98df8a",
                "released": "#f7f7f7"}
"""A colour per tile state (:func:`tile_state`), the most pressing first."""
TILES_DRAWN = 2500
"""A layer of more tiles than this is drawn in blocks of neighbouring tiles."""
EVENTS_SHOWN = 200
ALL_BUT_HEARTBEATS = "all but heartbeats and metrics"
CURVES_OVERLAID = 8
TASKS_OFFERED = 200
"""The convergence page offers at most this many tasks to choose from: those chosen, those
refining now, then the latest submitted with a trace."""
NODES_DRAWN = 10
"""The nodes page draws at most this many nodes' series, the least reliable first."""


def plugin_of(scheduler: Scheduler):
    from rqml_dask.scheduler.plugin import PLUGIN_NAME

    return scheduler.plugins.get(PLUGIN_NAME)


def tile_state(record: TaskRecord, voters: dict[str, TaskRecord] | None) -> str:
    """One word for where a task stands: queued, refining, escalated, converged, voted,
    reused (accepted by an earlier run, nothing computed now), stalled, rejected, failed (or
    released: its client let go of it before it ended); ``voters``: the records of the votes
    on it, if any."""
    if record.state == "erred" or record.result_state == "failed":
        return "failed"
    if record.state == "done":
        if record.result_state in (None, "accepted"):
            if record.reused:
                return "reused"
            return "voted" if voters and all(v.state == "done" for v in voters.values()) else "converged"
        return "stalled" if record.result_state == "stalled" else "rejected"
    if record.state == "released":
        return "released"
    if record.state == "bound" and record.iteration > 0:
        return "escalated" if record.switched else "refining"
    return "queued"


def _shown(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


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

    def update(self, names: list[str]) -> str | None:
        """Offer the runs ``names`` (the latest last); the one shown."""
        self._setting = True
        try:
            if self.select.options != names:
                self.select.options = names
            if names and (self.follow_latest or self.select.value not in names):
                self.select.value = names[-1]
        finally:
            self._setting = False
        return self.select.value or None


LOG_TICKS = """
const lo = Math.min(cb_data.start, cb_data.end), hi = Math.max(cb_data.start, cb_data.end);
if (!(lo > 0) || !(hi > lo)) return [];
const within = (ticks) => ticks.filter((t) => t >= lo && t <= hi);
const e0 = Math.floor(Math.log10(lo)), e1 = Math.ceil(Math.log10(hi));
for (const mantissas of [[1, 2, 5], [1, 3], [1]]) {
    const ticks = [];
    for (let e = e0; e <= e1; e++) for (const m of mantissas) ticks.push(Number((m * 10 ** e).toPrecision(1)));
    const kept = within(ticks);
    if (kept.length >= 2 && kept.length <= most) return kept;
    if (kept.length < 2) break;
}
const powers = [];
for (let e = e0; e <= e1; e++) powers.push(Number((10 ** e).toPrecision(1)));
const decades = within(powers);
if (decades.length > most) {
    const every = Math.ceil(decades.length / most);
    return decades.filter((_, i) => i % every == 0);
}
const half = (hi - lo) / 2, unit = 10 ** Math.floor(Math.log10(half));
const step = [5, 2, 1].map((m) => m * unit).find((s) => s <= half);
const ticks = [];
for (let k = Math.ceil(lo / step); k * step <= hi * (1 + 1e-12); k++) ticks.push(k * step);
return ticks;
"""
"""Major ticks of a log axis that never crowd: at most ``most`` of 1-2-5, 1-3 or 1 per
decade (every n-th decade over many), or, where the range is within a factor of a few (a
flat curve), two to five evenly spaced at the largest 1-2-5 step that fits twice into the
range, where a log axis would label a linear ladder of ticks bunched at its top."""
SHORTEST_LABEL = """
for (let digits = 1; digits < 12; digits++) {
    const labels = ticks.map((t) => Number(t.toPrecision(digits)));
    if (new Set(labels).size == labels.length) return String(Number(tick.toPrecision(digits)));
}
return String(tick);
"""
"""A tick's label with the fewest significant digits that still tell every tick apart."""


def _curve_figure(title: str, name: str) -> figure:
    """A figure against iteration whose y axis is logarithmic, its ticks :data:`LOG_TICKS`."""
    plot = figure(title=title, y_axis_type="log", height=260, sizing_mode="stretch_width", name=name,
                  tools="pan,wheel_zoom,box_zoom,reset")
    plot.xaxis.axis_label = "iteration"
    ticker = CustomJSTicker(major_code=LOG_TICKS, args={"most": 5})
    plot.yaxis.ticker = plot.ygrid.ticker = ticker
    plot.yaxis.formatter = CustomJSTickFormatter(code=SHORTEST_LABEL)
    return plot


CELL = '<span title="<%- value %>"><%- value %></span>'
"""A table cell's template: its text, and the same as its tooltip, for one cut off by its column's width."""


def fitted_table(source: ColumnDataSource, columns: dict[str, str], widths: dict[str, int] | None = None, **options) -> DataTable:
    """A table of ``source``'s ``columns`` (field -> header) in which no header is cut off:
    each column is as wide as its header in full, or its width in ``widths`` (pixels, for its
    content) if wider, and the table scrolls sideways where they do not fit the page; a cell
    cut off shows its full text as its tooltip. ``options`` go to the :class:`DataTable`."""
    widths, cell = widths or {}, HTMLTemplateFormatter(template=CELL)
    return DataTable(source=source, autosize_mode="none", sizing_mode="stretch_width", index_position=None,
                     columns=[TableColumn(field=field, title=title, formatter=cell,
                                          width=max(8 * len(title) + 24, widths.get(field, 0)))
                              for field, title in columns.items()], **options)


class TilesPage:
    """The tile map of one run, one layer along z at a time; a clicked tile's convergence below."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.run = RunChoice()
        self.layer = Slider(start=0, end=1, value=0, step=1, title="tile layer along z", name="rqml-tile-layer", width=300)
        self.layer.on_change("value", self._moved)
        self.follow_busiest = True
        """Show the layer with the most tiles refining, until a user moves the slider."""
        self._setting = False
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

    def _moved(self, attr, old, new) -> None:
        if not self._setting:
            self.follow_busiest = False

    def _tapped(self, attr, old, new) -> None:
        if new:
            self.selected = self.tiles.data["key"][new[0]]
            self._draw_selected()

    def update(self) -> None:
        plugin = plugin_of(self.scheduler)
        if plugin is None:
            self.summary.text = "The RQML scheduler plugin is not installed on this scheduler."
            return
        name = self.run.update(plugin.runs.names())
        run = plugin.runs.get(name) or Run()
        layers = sorted(run.layers)
        at = self.layer.value
        if layers != self._layers:
            self._layers = layers
            self.layer.end = max(len(layers) - 1, 1)
            at = min(at, len(layers) - 1) if layers else 0
        if self.follow_busiest and (refining := run.refining_by_layer()):
            here = refining.get(layers[at], 0) if at < len(layers) else 0
            busiest = max(refining, key=lambda layer: (refining[layer], -layer[0]))
            if refining[busiest] > here:  # a tie keeps the layer shown: no flicker between equals
                at = layers.index(busiest)
        if at != self.layer.value:
            self._setting = True
            try:
                self.layer.value = at
            finally:
                self._setting = False
        current = layers[self.layer.value] if layers else None
        tiles = list(run.layers.get(current, {}).values())
        states = [tile_state(record, run.voters.get(record.traits.task_id)) for record in tiles]
        if len(tiles) <= TILES_DRAWN:
            data = self._tiles(tiles, states, {address: str(ws.name) for address, ws in self.scheduler.workers.items()})
        else:
            data = self._blocks(tiles, states)
        if data["task"] != list(self.tiles.data["task"]):
            self.tiles.selected.indices = []
        self.tiles.data = data
        where = f", layer z {current[0]}-{current[1]}" if current and len(layers) > 1 else ""
        blocks = f", {len(tiles)} tiles in {len(data['task'])} blocks" if len(tiles) > TILES_DRAWN else ""
        self.map.title.text = f"Tiles of {name or 'no run yet'}{where}{blocks}"
        layer: dict[str, int] = {}
        for state in states:
            layer[state] = layer.get(state, 0) + 1
        shown = ", ".join(f"{n} {s}" for s, n in sorted(layer.items()))
        total = sum(map(len, run.layers.values()))
        following = "; the slider follows the layer with the most tiles refining until you move it" if self.follow_busiest else ""
        self.summary.text = (f"{total} tiles in {len(layers)} layers; tasks: {', '.join(f'{n} {s}' for s, n in sorted(run.counts().items()))}; "
                             f"this layer: {shown}{following}" if len(layers) > 1 else f"{total} tiles: {shown}")
        self._draw_selected()

    @staticmethod
    def _tiles(tiles: list[TaskRecord], states: list[str], names: dict[str, str]) -> dict[str, list]:
        """One rectangle per tile; its node by name (``names``: address -> the node's ``--name``)."""
        data: dict[str, list] = {f: [] for f in ("x", "y", "w", "h", "colour", "task", "key", "state", "node", "model", "iteration", *FIGURES)}
        for record, state in zip(tiles, states):
            (y0, y1), (x0, x1) = record.traits.core[-2:]
            data["x"].append((x0 + x1) / 2)
            data["y"].append((y0 + y1) / 2)
            data["w"].append(x1 - x0)
            data["h"].append(y1 - y0)
            data["colour"].append(TILE_COLOURS[state])
            data["task"].append(record.traits.task_id)
            data["key"].append(record.traits.key)
            data["state"].append(state)
            data["node"].append(names.get(record.worker, record.worker) if record.worker else "")
            data["model"].append(record.model or record.traits.model)
            data["iteration"].append(record.iteration)
            latest = record.trace.latest() if record.trace is not None else dict.fromkeys(FIGURES)
            for figure in FIGURES:
                data[figure].append(_shown(latest[figure]))
        return data

    @staticmethod
    def _blocks(tiles: list[TaskRecord], states: list[str]) -> dict[str, list]:
        """One rectangle per block of about ``side`` x ``side`` neighbouring tiles (at most
        :data:`TILES_DRAWN` blocks), coloured by the most pressing state among them; hover:
        how many tiles of each state it holds."""
        side = math.ceil(math.sqrt(len(tiles) / TILES_DRAWN))
        bounds = np.array([[y0, y1, x0, x1] for (y0, y1), (x0, x1) in (record.traits.core[-2:] for record in tiles)], float)
        rows = np.unique(bounds[:, 0], return_inverse=True)[1].ravel() // side
        columns = np.unique(bounds[:, 2], return_inverse=True)[1].ravel() // side
        blocks, block_of = np.unique(rows * (columns.max() + 1) + columns, return_inverse=True)
        block_of = block_of.ravel()
        rank = {state: i for i, state in enumerate(TILE_COLOURS)}
        codes = np.array([rank[state] for state in states])
        worst = np.full(len(blocks), len(rank))
        np.minimum.at(worst, block_of, codes)
        tally = np.zeros((len(blocks), len(rank)), int)
        np.add.at(tally, (block_of, codes), 1)
        low, high = np.full((len(blocks), 2), np.inf), np.full((len(blocks), 2), -np.inf)
        np.minimum.at(low, block_of, bounds[:, [0, 2]])
        np.maximum.at(high, block_of, bounds[:, [1, 3]])
        names = list(TILE_COLOURS)
        state = [names[code] for code in worst]
        return {
            "x": list((low[:, 1] + high[:, 1]) / 2), "y": list((low[:, 0] + high[:, 0]) / 2),
            "w": list(high[:, 1] - low[:, 1]), "h": list(high[:, 0] - low[:, 0]),
            "colour": [TILE_COLOURS[s] for s in state],
            "task": [", ".join(f"{n} {names[j]}" for j, n in enumerate(counts) if n) for counts in tally],
            "key": [""] * len(blocks), "state": state, "node": [""] * len(blocks), "model": [""] * len(blocks),
            "iteration": [""] * len(blocks), **{figure: [""] * len(blocks) for figure in FIGURES},
        }

    def _draw_selected(self) -> None:
        plugin = plugin_of(self.scheduler)
        record = None
        if plugin is not None and self.selected:
            record = plugin.tasks.get(self.selected) or plugin.finished.get(self.selected)
        if record is None or record.trace is None:
            return
        iterations, misfit, stability = record.trace.iterations, record.trace.figure("misfit"), record.trace.figure("stability")
        kept = misfit > 0  # NaN compares False
        self.curve.data = {"iteration": iterations[kept].tolist(), "misfit": misfit[kept].tolist(),
                           "stability": np.where(stability[kept] > 0, stability[kept], np.nan).tolist()}
        reused = ", reused: computed by an earlier run" if record.reused else ""
        self.curve_plot.title.text = f"Selected task {record.traits.task_id}: {record.model or record.traits.model}, iteration {record.iteration}{reused}"


class ConvergencePage:
    """The convergence figures of several tasks of one run, overlaid and coloured by model,
    model switches marked."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.run = RunChoice()
        self.choice = MultiChoice(title=f"tasks (unset: up to {CURVES_OVERLAID} refining now, else the latest; "
                                        f"offered: those refining now, then the latest, {TASKS_OFFERED} at most)",
                                  options=[], value=[], name="rqml-convergence-tasks", sizing_mode="stretch_width")
        self.sources = [ColumnDataSource({"iteration": [], **{f: [] for f in FIGURES}, "model": [], "task": []},
                                         name=f"rqml-convergence-{i}") for i in range(CURVES_OVERLAID)]
        self.switches = ColumnDataSource({"iteration": [], "misfit": [], "to": [], "task": []}, name="rqml-model-switches")
        self.marks = {kind: ColumnDataSource({"iteration": [], "misfit": [], "task": []}, name=f"rqml-{kind}-marks")
                      for kind in ("checkpoint", "validation")}
        self.plots = {}
        self.lines: list[list] = [[] for _ in self.sources]
        """Each source's line on every plot: coloured by the model its task runs now."""
        for name in FIGURES:
            plot = _curve_figure(name, f"rqml-convergence-{name}")
            for i, source in enumerate(self.sources):
                self.lines[i].append(plot.line("iteration", name, source=source, color=Category10_10[0], line_width=2))
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
        table = fitted_table(self.decisions, {f: f for f in ("task", "kind", "detail")}, {"task": 200, "kind": 160, "detail": 900},
                             height=200)
        self.legend = Div(text="")
        self.root = column(row(self.run.select), self.choice, self.legend, *self.plots.values(),
                           Div(text="<b>Supervision events</b>"), table,
                           sizing_mode="stretch_width")

    def update(self) -> None:
        plugin = plugin_of(self.scheduler)
        if plugin is None:
            return
        run = plugin.runs.get(self.run.update(plugin.runs.names())) or Run()
        records = run.records
        chosen = [records[key] for key in self.choice.value if key in records]
        refining = [records[key] for node in plugin.nodes.values() for key in node.bound
                    if key in records and records[key].trace is not None]
        latest = []
        for record in reversed(records.values()):  # the latest submitted with a trace, as many as may be offered
            if len(latest) >= TASKS_OFFERED:
                break
            if record.trace is not None:
                latest.append(record)
        offered = list(dict.fromkeys(r.traits.key for r in [*chosen, *refining, *latest]))[:TASKS_OFFERED]
        options = [(key, records[key].traits.task_id) for key in offered]
        if self.choice.options != options:
            self.choice.options = options
        if not chosen:
            chosen = (refining or latest)[:CURVES_OVERLAID]
        models = sorted({record.model or record.traits.model for record in chosen[:CURVES_OVERLAID]})
        colour = {model: Category10_10[i % 10] for i, model in enumerate(models)}
        switches: dict[str, list] = {"iteration": [], "misfit": [], "to": [], "task": []}
        marks: dict[str, dict[str, list]] = {kind: {"iteration": [], "misfit": [], "task": []} for kind in self.marks}
        decisions: dict[str, list] = {"task": [], "kind": [], "detail": []}
        for i, source in enumerate(self.sources):
            record = chosen[i] if i < len(chosen) else None
            trace = record.trace if record is not None else None
            if trace is None:
                source.data = {"iteration": [], **{f: [] for f in FIGURES}, "model": [], "task": []}
                continue
            task_id = record.traits.task_id
            for line in self.lines[i]:
                line.glyph.line_color = colour[record.model or record.traits.model]
            source.data = {"iteration": trace.iterations.tolist(), "model": trace.model_at(), "task": [task_id] * len(trace.checks),
                           **{name: np.where(trace.figure(name) > 0, trace.figure(name), np.nan).tolist() for name in FIGURES}}
            for iteration, misfit, to in trace.switches():
                if misfit > 0:
                    for column_, value in zip(("iteration", "misfit", "to", "task"), (iteration, misfit, to, task_id)):
                        switches[column_].append(value)
            placed = [("checkpoint", int(i)) for i in trace.checkpoints]
            placed += [("validation", d["iteration"]) for d in record.decisions
                       if d.get("kind") == "validation_failed" and isinstance(d.get("iteration"), int)]
            misfits = trace.figure("misfit")
            for kind, iteration in placed:  # drawn on the curve: at the misfit of the check nearest it
                nearest = misfits[int(np.abs(trace.iterations - iteration).argmin())] if len(misfits) else math.nan
                if nearest > 0:
                    marks[kind]["iteration"].append(iteration)
                    marks[kind]["misfit"].append(float(nearest))
                    marks[kind]["task"].append(task_id)
            for decision in record.decisions:
                decisions["task"].append(task_id)
                decisions["kind"].append(str(decision.get("kind", "")))
                decisions["detail"].append(", ".join(f"{k}={v}" for k, v in decision.items()
                                                     if k not in ("kind", "task_id", "key", "time", "worker")))
        self.switches.data = switches
        for kind, source in self.marks.items():
            source.data = marks[kind]
        self.decisions.data = decisions
        shown = min(len(chosen), CURVES_OVERLAID)
        self.legend.text = f"{shown} task{'s' if shown != 1 else ''} by model: " + " ".join(
            f"<span style='color:{c}'>&#9632; {model}</span>" for model, c in colour.items())


SERIES_TITLES = {"iterations_per_second": "iterations/s", "queued": "queue depth (inbound + refining)",
                 "host_memory_fraction": "host memory (fraction of limit)", "device_memory_fraction": "GPU memory (fraction)",
                 "reliability": "reliability weight"}
"""A plot's title for each of :data:`~rqml_dask.scheduler.records.NODE_SERIES`."""


def _series(history: NodeHistory, name: str) -> tuple[list[float], list[float]]:
    """Times (ms, as Bokeh's datetime axis has them) and values of one series of ``history``, gaps left out."""
    times, values = history.series()
    column_ = values[:, NODE_SERIES.index(name)]
    kept = ~np.isnan(column_)
    return (times[kept] * 1000).tolist(), column_[kept].tolist()


NO_GPU = "no GPU on this cluster: no node has reported one, so there is no GPU memory to draw"


class NodesPage:
    """The figures over time (the plugin's samples, one per heartbeat) of the cluster (its
    mean) and of at most :data:`NODES_DRAWN` nodes, the least reliable first, each line
    named (by the node's ``--name``) in a legend above the plots and in its hover; every
    node's link and quarantine state now. Where no node has a GPU, the GPU plot gives way to
    :data:`NO_GPU`."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.series = {key: ColumnDataSource({"xs": [], "ys": [], "node": [], "address": [], "colour": []}, name=f"rqml-nodes-{key}")
                       for key in NODE_SERIES}
        self.cluster = {key: ColumnDataSource({"time": [], "value": []}, name=f"rqml-nodes-cluster-{key}") for key in NODE_SERIES}
        self.plots = {}
        for key in NODE_SERIES:
            plot = figure(title=SERIES_TITLES[key], x_axis_type="datetime", height=200, sizing_mode="stretch_width",
                          name=f"rqml-nodes-plot-{key}", tools="pan,wheel_zoom,reset")
            lines = plot.multi_line("xs", "ys", source=self.series[key], line_color="colour", line_width=2)
            plot.line("time", "value", source=self.cluster[key], line_color="black", line_dash="dashed", line_width=2)
            plot.add_tools(HoverTool(renderers=[lines], tooltips=[("node", "@node"), ("address", "@address")]))
            self.plots[key] = plot
        self.legend = Div(text="", name="rqml-nodes-legend")
        self.no_gpu = Div(text=f"<b>GPU memory</b>: {NO_GPU}", name="rqml-nodes-no-gpu", visible=False)
        self.drawn = Div(text="", name="rqml-nodes-drawn")
        columns = {"node": "node", "link": "link", "reliability": "reliability", "state": "state"}
        self.table = ColumnDataSource({c: [] for c in columns}, name="rqml-nodes-now")
        table = fitted_table(self.table, columns, {"node": 320, "state": 420}, height=180)
        shown = [item for key, plot in self.plots.items() for item in ((plot, self.no_gpu) if key == "device_memory_fraction" else (plot,))]
        self.root = column(table, self.drawn, self.legend, *shown, sizing_mode="stretch_width")

    def update(self) -> None:
        plugin = plugin_of(self.scheduler)
        if plugin is None:
            return
        nodes = sorted(plugin.nodes)
        reliability = {address: plugin.nodes[address].history.latest("reliability") for address in nodes}
        drawn = sorted(nodes, key=lambda a: (1.0 if reliability[a] is None else reliability[a], a))[:NODES_DRAWN]
        colours = [Category10_10[i % 10] for i in range(len(drawn))]
        names = {address: str(ws.name) for address, ws in self.scheduler.workers.items()}
        drawn_names = [names.get(address, address) for address in drawn]
        for key in NODE_SERIES:
            lines = [_series(plugin.nodes[address].history, key) for address in drawn]
            self.series[key].data = {"xs": [x for x, _ in lines], "ys": [y for _, y in lines], "node": drawn_names,
                                     "address": drawn, "colour": colours}
            times, values = _series(plugin.history, key)
            self.cluster[key].data = {"time": times, "value": values}
        gpu = bool(plugin.table.gpu.any())
        self.plots["device_memory_fraction"].visible, self.no_gpu.visible = gpu, not gpu
        self.legend.text = "Lines: " + " ".join(
            f"<span style='color:{colour};white-space:nowrap' title='{html.escape(address)}'>&#9644; {html.escape(name)}</span>"
            for name, address, colour in zip(drawn_names, drawn, colours)) + " <span style='white-space:nowrap'>- - - cluster mean</span>"
        self.drawn.text = (f"{len(drawn)} of {len(nodes)} nodes drawn, the least reliable first, beside the cluster's mean"
                           if len(drawn) < len(nodes) else "")
        rows: dict[str, list] = {"node": [], "link": [], "reliability": [], "state": []}
        for node in nodes:
            record = plugin.nodes[node]
            rows["node"].append(f"{names.get(node, node)} ({node})")
            rows["link"].append(record.figures.link.status)
            rows["reliability"].append("" if reliability[node] is None else round(reliability[node], 3))
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
        columns = {c: c for c in ("time", "topic", "kind", "about", "detail")}
        self.source = ColumnDataSource({c: [] for c in columns}, name="rqml-events")
        table = fitted_table(self.source, columns, {"time": 80, "topic": 140, "kind": 160, "about": 200, "detail": 900}, height=600)
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


PAGES = {path: (TITLES[path], component) for path, component in {
    "/rqml-tiles": TilesPage, "/rqml-convergence": ConvergencePage, "/rqml-nodes": NodesPage, "/rqml-events": EventsPage,
}.items()}
"""Path -> (title, component) of every live page (served where :mod:`~rqml_dask.scheduler.page_routes` says)."""
