"""Pictures of a finished run: ``rqml show`` (a PNG of slices) and ``rqml report`` (one HTML file).

Both read only the output store: its ``rqml`` attribute (what :meth:`Pipeline.finalize
<rqml_dask.pipeline.pipeline.Pipeline.finalize>` wrote: the run's summary, each task's core,
state and convergence trace, where the input is) and three orthogonal slices of each volume,
so they cost the same for a small volume and a large one.

* :func:`write_slices` draws the middle slices (z, y and x) of the observed image, the result
  and, where the input has one, the ground truth, on one colour scale, with matplotlib.
* :func:`write_report` writes a self-contained HTML file (Bokeh standalone, BokehJS inline: it
  opens without a network): the summary, a map of the tiles (state, iterations, escalations;
  a slider walks the tile layers along z), the convergence curves of the tasks and the slices.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from rqml_dask.volumes import InputError

STATE_COLOURS = {"accepted": "#2ca02c", "stalled": "#ff7f0e", "max_iterations": "#bcbd22", "terminated": "#7f7f7f",
                 "rejected": "#d62728", "failed": "#9467bd"}
"""A colour per terminal state (:data:`rqml_dask.messages.TERMINAL_STATES`)."""
CURVES_SHOWN = 40
"""The report draws the convergence curves of at most this many tasks (those not accepted,
and the most escalated, first): beyond that a plot is a blur and the file grows."""


@dataclass(frozen=True)
class FinishedRun:
    """What the output store of a run says about it."""

    store: Path
    attrs: dict[str, Any]

    @classmethod
    def open(cls, store: Path) -> FinishedRun:
        """The run whose output is ``store``; :class:`InputError` if it is not one, or not finished."""
        try:
            attrs = zarr.open_group(store, mode="r").attrs.asdict()
        except Exception as exc:
            raise InputError(f"{store} is not a readable Zarr group: {exc}") from None
        rqml = attrs.get("rqml")
        if not isinstance(rqml, dict) or "status" not in rqml:
            raise InputError(f"{store} is not the output of an rqml run (it has no 'rqml' attribute)")
        if rqml["status"] == "incomplete" or "outcomes" not in rqml:
            raise InputError(f"{store}: the run has not finished (status {rqml['status']!r}); its tasks are not all in")
        return cls(Path(store), attrs)

    @property
    def rqml(self) -> dict[str, Any]:
        return self.attrs["rqml"]

    @property
    def outcomes(self) -> list[dict[str, Any]]:
        return self.rqml["outcomes"]

    @property
    def voxel(self) -> tuple[list[float], str | None] | None:
        """The result's voxel size and unit, where it is an OME image."""
        multiscales = (self.attrs.get("ome") or {}).get("multiscales")
        if not multiscales:
            return None
        scale = multiscales[0]["datasets"][0]["coordinateTransformations"][0]["scale"]
        units = {axis.get("unit") for axis in multiscales[0]["axes"]}
        return scale, units.pop() if len(units) == 1 else None

    def volumes(self) -> dict[str, zarr.Array]:
        """The arrays to picture: ``observed`` (the input image), ``result``, and ``truth`` where there is one."""
        result = zarr.open_group(self.store, mode="r")[self.rqml.get("array", "deconvolved")]
        shown = {}
        inputs = self.rqml.get("input") or {}
        for name in ("image", "truth"):
            ref = inputs.get(name)
            if ref:
                try:
                    shown["observed" if name == "image" else name] = zarr.open_group(ref["store"], mode="r")[ref["path"]]
                except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
                    pass  # moved or deleted since the run: the picture shows what is there
        shown["result"] = result
        return {name: shown[name] for name in ("observed", "result", "truth") if name in shown}


def middle_slices(array: zarr.Array) -> list[tuple[str, np.ndarray]]:
    """The middle z, y and x slices of a volume (the image itself if 2-D); reads three planes."""
    if array.ndim == 2:
        return [("y-x", np.asarray(array[...], dtype=np.float32))]
    if array.ndim != 3:
        raise InputError(f"{array.store_path}: has {array.ndim} axes; rqml show draws 2-D and 3-D images")
    z, y, x = (n // 2 for n in array.shape)
    return [(f"z = {z}", np.asarray(array[z], np.float32)), (f"y = {y}", np.asarray(array[:, y], np.float32)),
            (f"x = {x}", np.asarray(array[:, :, x], np.float32))]


def default_path(store: Path, suffix: str) -> Path:
    """Beside the store: ``results/quickstart.zarr`` -> ``results/quickstart{suffix}``."""
    return store.with_name(store.name.removesuffix(".zarr") + suffix)


def write_slices(store: Path, path: Path | None = None) -> Path:
    """Draw the middle slices of the run's volumes into a PNG (default: beside the store) and
    return its path."""
    path = path or default_path(Path(store), ".png")
    path.write_bytes(slices_png(FinishedRun.open(store)))
    return path


def slices_png(run: FinishedRun) -> bytes:
    """The PNG of :func:`write_slices`: a row per volume, a column per slice, one colour scale
    for every panel (the 0.1-99.9 percentiles of them all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = {name: middle_slices(array) for name, array in run.volumes().items()}
    values = np.concatenate([plane.ravel() for planes in slices.values() for _, plane in planes])
    low, high = (float(v) for v in np.percentile(values, [0.1, 99.9]))
    columns = len(next(iter(slices.values())))
    voxel = run.voxel
    aspect = {"y-x": 1.0}
    if voxel is not None and len(voxel[0]) == 3:
        z, y, x = voxel[0]
        aspect = {"z": y / x, "y": z / x, "x": z / y}
    figure, axes = plt.subplots(len(slices), columns, figsize=(4 * columns, 3.6 * len(slices)), squeeze=False)
    for row, (name, planes) in enumerate(slices.items()):
        for column, (where, plane) in enumerate(planes):
            ax = axes[row][column]
            shown = ax.imshow(plane, cmap="magma", vmin=low, vmax=high, interpolation="nearest",
                              aspect=aspect.get(where.split(" ")[0], 1.0))
            ax.set_title(f"{name}, {where}")
            ax.set_xticks([])
            ax.set_yticks([])
    figure.colorbar(shown, ax=axes, shrink=0.8, label="intensity (one scale for all panels)")
    status = run.rqml["status"]
    figure.suptitle(f"{run.rqml.get('pipeline', '')}: {status}" + ("" if status == "complete" else " (NOT accepted)"))
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=80)
    plt.close(figure)
    return png.getvalue()


def write_report(store: Path, path: Path | None = None) -> Path:
    """Write the run's report, one self-contained HTML file (default: beside the store), and
    return its path."""
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.models import Div
    from bokeh.resources import INLINE

    run = FinishedRun.open(store)
    path = path or default_path(Path(store), ".report.html")
    parts = [Div(text=_summary_html(run)), *_tile_map(run), Div(text="<h3>Convergence</h3>"), *_convergence(run)]
    try:
        encoded = base64.b64encode(slices_png(run)).decode()
        parts.append(Div(text=f'<h3>Slices</h3><img alt="slices" src="data:image/png;base64,{encoded}" style="max-width:100%">'))
    except InputError:
        pass  # not an image result
    path.write_text(file_html(column(*parts, sizing_mode="stretch_width"), resources=INLINE,
                              title=f"rqml report: {run.rqml.get('pipeline', '')}"))
    return path


def _summary_html(run: FinishedRun) -> str:
    rqml, outcomes = run.rqml, run.outcomes
    states: dict[str, int] = {}
    for outcome in outcomes:
        states[outcome["state"]] = states.get(outcome["state"], 0) + 1
    rows = {
        "pipeline": rqml.get("pipeline", ""),
        "status": rqml["status"] + ("" if rqml["status"] == "complete" else ": NOT every task was accepted"),
        "tasks": ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
        "iterations": rqml.get("iterations"),
        "escalations": rqml.get("escalations"),
        "started": rqml.get("started"),
        "finished": rqml.get("finished"),
        "output": f"{run.store}::{rqml.get('array', '')}",
    }
    if rqml.get("input_error") is not None:
        rows["error vs truth"] = f"input {rqml['input_error']:.4g} -> output {rqml['output_error']:.4g} (relative RMSE)"
    if (voxel := run.voxel) is not None:
        rows["voxel size"] = f"{tuple(voxel[0])} {voxel[1]}" if voxel[1] else "not known (the OME metadata says 1 per voxel)"
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    colour = "#2ca02c" if rqml["status"] == "complete" else "#d62728"
    return f"<h2 style='color:{colour}'>rqml run {html.escape(str(rows['pipeline']))}: {html.escape(rqml['status'])}</h2><table>{body}</table>"


def _tile_map(run: FinishedRun) -> list:
    """A map of the tiles of one layer along the first axis, a slider choosing the layer."""
    from bokeh.models import ColumnDataSource, CustomJS, Div, HoverTool, Slider
    from bokeh.plotting import figure

    outcomes = [o for o in run.outcomes if o.get("core")]
    if not outcomes:
        return [Div(text="<p>No tile geometry recorded for this run.</p>")]
    layers: dict[tuple[int, int], list[dict]] = {}
    for outcome in outcomes:
        core = outcome["core"]
        layers.setdefault(tuple(core[0]) if len(core) == 3 else (0, 0), []).append(outcome)
    order = sorted(layers)

    def columns(layer: list[dict]) -> dict[str, list]:
        data: dict[str, list] = {k: [] for k in ("x", "y", "w", "h", "colour", "label", "task", "state", "model", "iterations",
                                                 "escalations", "node")}
        for o in layer:
            (y0, y1), (x0, x1) = o["core"][-2:]
            data["x"].append((x0 + x1) / 2)
            data["y"].append((y0 + y1) / 2)
            data["w"].append(x1 - x0)
            data["h"].append(y1 - y0)
            data["colour"].append(STATE_COLOURS.get(o["state"], "#1f77b4"))
            data["label"].append(f"{o['iterations']} it" + (f", {o.get('escalations', 0)} esc" if o.get("escalations") else ""))
            for key in ("task_id", "state", "model", "iterations", "escalations", "node"):
                data["task" if key == "task_id" else key].append(o.get(key, ""))
        return data

    by_layer = [columns(layers[key]) for key in order]
    source = ColumnDataSource(by_layer[0], name="tiles")
    plot = figure(title="Tiles (colour: terminal state; text: iterations, escalations)", match_aspect=True,
                  height=420, sizing_mode="stretch_width", tools="pan,wheel_zoom,reset")
    plot.y_range.flipped = True
    plot.rect("x", "y", "w", "h", source=source, fill_color="colour", fill_alpha=0.6, line_color="black")
    plot.text("x", "y", text="label", source=source, text_align="center", text_baseline="middle", text_font_size="9pt")
    plot.add_tools(HoverTool(tooltips=[("task", "@task"), ("state", "@state"), ("model", "@model"),
                                       ("iterations", "@iterations"), ("escalations", "@escalations"), ("node", "@node")]))
    plot.xaxis.axis_label, plot.yaxis.axis_label = "x (voxels)", "y (voxels)"
    legend = " ".join(f"<span style='background:{c};padding:0 6px'>&nbsp;</span> {s}" for s, c in STATE_COLOURS.items())
    parts = [Div(text=f"<h3>Tiles</h3><p>{legend}</p>"), plot]
    if len(order) > 1:
        slider = Slider(start=0, end=len(order) - 1, value=0, step=1, title="tile layer along z", name="tile-layer")
        labels = [f"z {a}-{b}" for a, b in order]
        slider.js_on_change("value", CustomJS(args={"source": source, "layers": by_layer, "plot": plot, "labels": labels},
                                              code="source.data = layers[cb_obj.value]; plot.title.text = "
                                                   "'Tiles, ' + labels[cb_obj.value] + ' (colour: terminal state; text: iterations, escalations)';"))
        parts.append(slider)
    return parts


def _convergence(run: FinishedRun) -> list:
    """Misfit and stability against iteration for the tasks most worth a look; model
    switches marked."""
    from bokeh.models import ColumnDataSource, Div, HoverTool
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure

    traced = [o for o in run.outcomes if o.get("trace")]
    if not traced:
        return [Div(text="<p>No convergence trace recorded for this run.</p>")]
    traced.sort(key=lambda o: (o["state"] == "accepted", -o.get("escalations", 0), o["task_id"]))
    shown = traced[:CURVES_SHOWN]
    plots = []
    for figure_name, key, log in (("misfit", "misfit", True), ("stability (relative change per check)", "stability", True)):
        plot = figure(title=f"{figure_name} against iteration", y_axis_type="log" if log else "linear", height=320,
                      sizing_mode="stretch_width", tools="pan,wheel_zoom,box_zoom,reset")
        for i, outcome in enumerate(shown):
            points = [p for p in outcome["trace"] if p.get(key) is not None and p[key] > 0]
            if not points:
                continue
            source = ColumnDataSource({"iteration": [p["iteration"] for p in points], "value": [p[key] for p in points],
                                       "model": [p["model"] for p in points], "task": [outcome["task_id"]] * len(points)})
            colour = Category10_10[i % 10]
            plot.line("iteration", "value", source=source, color=colour, legend_label=outcome["task_id"] if i < 10 else None)
            switches = [p for prev, p in zip(points, points[1:]) if p["model"] != prev["model"]]
            if switches:
                plot.scatter([p["iteration"] for p in switches], [p[key] for p in switches], marker="triangle", size=9, color=colour)
        plot.add_tools(HoverTool(tooltips=[("task", "@task"), ("iteration", "@iteration"), ("model", "@model"), (key, "@value")]))
        plot.xaxis.axis_label = "iteration"
        if plot.legend:
            plot.legend.click_policy = "hide"
            plot.legend.label_text_font_size = "8pt"
        plots.append(plot)
    note = f"{len(shown)} of {len(traced)} tasks shown (those not accepted and the most escalated first); triangles: model switches."
    return [Div(text=f"<p>{html.escape(note)}</p>"), *plots]
