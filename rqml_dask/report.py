"""Pictures of a finished run: ``rqml show`` (a PNG of slices) and ``rqml report`` (one HTML file).

Both read only the output store: its ``rqml`` attribute (what :meth:`Pipeline.finalize
<rqml_dask.pipeline.pipeline.Pipeline.finalize>` wrote: the run's summary, each task's core,
state and convergence trace, where the input is) and the planes they draw (three orthogonal
slices of an image, one plane of each of a batch's first systems), so they cost the same for
a small volume and a large one; what the report holds per task is bounded (a tile each; the
curves of :data:`CURVES_SHOWN` tasks, the rest as one band), so a run of 10^4 tasks has one.

* :func:`write_slices` draws the middle slices (z, y and x) of the observed image, the result
  and, where the input has one, the ground truth, on one colour scale, with matplotlib; for a
  batch of systems (``linear_solve``), the first :data:`SYSTEMS_SHOWN` systems.
* :func:`write_report` writes a self-contained HTML file (Bokeh standalone, BokehJS inline: it
  opens without a network): the summary, a map of the tiles (state, iterations, escalations;
  a slider walks the tile layers along z), the convergence of the tasks and the slices.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from rqml_dask.volumes import InputError, read_outcome_records

STATE_COLOURS = {"accepted": "#2ca02c", "stalled": "#ff7f0e", "max_iterations": "#bcbd22", "terminated": "#7f7f7f",
                 "rejected": "#d62728", "failed": "#9467bd"}
"""A colour per terminal state (:data:`rqml_dask.messages.TERMINAL_STATES`)."""
CURVES_SHOWN = 40
"""The report draws the convergence curves of at most this many tasks (those not accepted,
and the most escalated, first): beyond that a plot is a blur and the file grows."""
CURVE_POINTS = 64
"""Each curve drawn is thinned to about this many points (model switches kept)."""
BAND_BINS = 200
"""The band of every task's checks is drawn in at most this many bins of iteration."""
LABELLED_TILES = 64
"""Tiles carry text (iterations, escalations) only while no layer has more than this many."""
SYSTEMS_SHOWN = 4
"""``rqml show`` draws the first this many systems of a batch."""
PLANE_PIXELS = 1024
"""A slice is read at every n-th voxel so that neither side exceeds this (a panel is 320 pixels)."""


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

    @functools.cached_property
    def outcomes(self) -> list[dict[str, Any]]:
        """Each task's outcome record (:func:`~rqml_dask.volumes.read_outcome_records`)."""
        return read_outcome_records(self.store, self.rqml["outcomes"])

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
        """The arrays to picture: ``observed`` (the input image), ``result``, and ``truth`` where
        there is one; each opened alone (its groups' attributes, the outcomes among them, are not
        read again)."""
        shown = {"result": zarr.open_array(self.store, path=self.rqml.get("array", "deconvolved"), mode="r")}
        inputs = self.rqml.get("input") or {}
        for name in ("image", "truth"):
            ref = inputs.get(name)
            if ref:
                try:
                    shown["observed" if name == "image" else name] = zarr.open_array(ref["store"], path=ref["path"], mode="r")
                except (FileNotFoundError, zarr.errors.NodeNotFoundError):
                    pass  # moved or deleted since the run: the picture shows what is there
        return {name: shown[name] for name in ("observed", "result", "truth") if name in shown}


def is_batch(result: zarr.Array) -> bool:
    """Whether a result is a batch of systems (one along the first axis) rather than an image:
    the pipeline names the axes of a task class's image results (``TaskClass.image_axes``) and
    leaves those of a batch unnamed."""
    return result.metadata.dimension_names is None


def middle_slices(array: zarr.Array) -> list[tuple[str, np.ndarray]]:
    """The middle z, y and x slices of a volume (the image itself if 2-D); reads three planes."""
    if array.ndim == 2:
        return [("y-x", _plane(array, {}))]
    if array.ndim != 3:
        raise InputError(f"{array.store_path}: has {array.ndim} axes; nothing to draw (rqml show draws 2-D and 3-D images)")
    z, y, x = (n // 2 for n in array.shape)
    return [(f"z = {z}", _plane(array, {0: z})), (f"y = {y}", _plane(array, {1: y})), (f"x = {x}", _plane(array, {2: x}))]


def system_slices(array: zarr.Array) -> list[tuple[str, np.ndarray]]:
    """The first :data:`SYSTEMS_SHOWN` systems of a batch (count, *grid): a 2-D system whole, a
    3-D one its middle plane along the grid's first axis; reads one plane per system."""
    if array.ndim not in (3, 4):
        raise InputError(f"{array.store_path}: a batch with {array.ndim} axes; nothing to draw "
                         "(rqml show draws batches of 2-D and 3-D systems)")
    if array.ndim == 3:
        return [(f"system {i}", _plane(array, {0: i})) for i in range(min(array.shape[0], SYSTEMS_SHOWN))]
    middle = array.shape[1] // 2
    return [(f"system {i}, plane {middle}", _plane(array, {0: i, 1: middle})) for i in range(min(array.shape[0], SYSTEMS_SHOWN))]


def _plane(array: zarr.Array, fixed: dict[int, int]) -> np.ndarray:
    """The 2-D plane of ``array`` at the ``fixed`` {axis: index}, every ``step``-th voxel along
    both free axes so that neither exceeds :data:`PLANE_PIXELS` (a panel draws fewer); reads
    only the chunks the plane crosses, with Dask's scheduler of the moment: on the cluster
    while a ``distributed.Client`` is open (``rqml run``: the chunks a plane crosses can be
    a good part of a large volume; only the plane comes back), else in this process."""
    step = max(1, -(-max(n for axis, n in enumerate(array.shape) if axis not in fixed) // PLANE_PIXELS))
    plane = da.from_zarr(array)[tuple(fixed.get(axis, slice(None, None, step)) for axis in range(array.ndim))]
    return np.asarray(plane.compute(), np.float32)


def default_path(store: Path, suffix: str) -> Path:
    """Beside the store: ``results/quickstart.zarr`` -> ``results/quickstart{suffix}``."""
    return store.with_name(store.name.removesuffix(".zarr") + suffix)


def write_slices(store: Path, path: Path | None = None) -> Path:
    """Draw the run's volumes into a PNG (default: beside the store), :func:`slices_png`, and
    return its path; :class:`InputError` if there is nothing to draw."""
    path = path or default_path(Path(store), ".png")
    path.write_bytes(slices_png(FinishedRun.open(store)))
    return path


def slices_png(run: FinishedRun) -> bytes:
    """The PNG of :func:`write_slices`: a row per volume (observed, result, truth), a column per
    panel: an image's middle slices (:func:`middle_slices`) on one colour scale for every panel,
    or a batch's first systems (:func:`system_slices`), the right-hand sides on a scale of their
    own and the solutions and truth on one. Each scale spans the 0.1-99.9 percentiles of its
    panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = run.volumes()
    batch = is_batch(volumes["result"])
    slices = {name: (system_slices if batch else middle_slices)(array) for name, array in volumes.items()}
    columns = len(slices["result"])
    aspect = {"y-x": 1.0}
    if (voxel := run.voxel) is not None and len(voxel[0]) == 3:
        z, y, x = voxel[0]
        aspect = {"z": y / x, "y": z / x, "x": z / y}
    figure, axes = plt.subplots(len(slices), columns, figsize=(4 * columns, 3.6 * len(slices)), squeeze=False)
    names = list(slices)
    for group in ([[n for n in names if n == "observed"], [n for n in names if n != "observed"]] if batch else [names]):
        if not group:
            continue
        values = np.concatenate([plane.ravel() for name in group for _, plane in slices[name]])
        low, high = (float(v) for v in np.percentile(values, [0.1, 99.9]))
        for name in group:
            row = names.index(name)
            label = name if volumes[name].basename == name else f"{name} ({volumes[name].basename})"
            for column, (where, plane) in enumerate(slices[name]):
                ax = axes[row][column]
                shown = ax.imshow(plane, cmap="magma", vmin=low, vmax=high, interpolation="nearest",
                                  aspect=aspect.get(where.split(" ")[0], 1.0))
                ax.set_title(f"{label}\n{where}", fontsize=10)
                ax.set_xticks([])
                ax.set_yticks([])
        figure.colorbar(shown, ax=[axes[names.index(n)][c] for n in group for c in range(columns)], shrink=0.8,
                        label=f"one scale: {', '.join(group)}")
    status = run.rqml["status"]
    title = f"{run.rqml.get('pipeline', '')}: {status}" + ("" if status == "complete" else " (NOT accepted)")
    if batch:
        title += f"; systems 0-{columns - 1} of {volumes['result'].shape[0]} shown"
    figure.suptitle(title)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=80)
    plt.close(figure)
    return png.getvalue()


def drawn_pictures(store: Path) -> tuple[Path, Path] | None:
    """The slices and the report drawn of the results ``store`` holds now (recorded by
    :func:`record_pictures` with the digest of its results, which :meth:`Pipeline.finalize
    <rqml_dask.pipeline.pipeline.Pipeline.finalize>` writes), where both files are still
    there: a run whose results are the same ones has nothing to draw; else ``None``."""
    rqml = zarr.open_group(store, mode="r").attrs.get("rqml") or {}
    drawn = rqml.get("drawn")
    if not isinstance(drawn, dict) or rqml.get("results") is None or drawn.get("results") != rqml["results"]:
        return None
    paths = Path(drawn["slices"]), Path(drawn["report"])
    return paths if all(path.is_file() for path in paths) else None


def record_pictures(store: Path, pictures: tuple[Path, Path] | None) -> None:
    """Record in ``store``'s ``rqml`` attribute that ``pictures`` (slices, report) show its
    results as they are now (:func:`drawn_pictures`); ``None``: take the record off, before
    they are drawn anew."""
    group = zarr.open_group(store, mode="r+")
    rqml = dict(group.attrs["rqml"])
    if pictures is None:
        if rqml.pop("drawn", None) is None:
            return
    else:
        rqml["drawn"] = {"results": rqml.get("results"), "slices": str(pictures[0]), "report": str(pictures[1])}
    group.attrs["rqml"] = rqml


def write_report(store: Path, path: Path | None = None, slices: bytes | None = None) -> Path:
    """Write the run's report, one self-contained HTML file (default: beside the store), and
    return its path. ``slices``: the run's :func:`slices_png` where it is drawn already (else
    it is drawn here; if there is nothing to draw, the report says why)."""
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.models import Div
    from bokeh.resources import INLINE

    run = FinishedRun.open(store)
    path = path or default_path(Path(store), ".report.html")
    parts = [Div(text=_summary_html(run)), *_tile_map(run), Div(text="<h3>Convergence</h3>"), *_convergence(run)]
    try:
        encoded = base64.b64encode(slices or slices_png(run)).decode()
        parts.append(Div(text=f'<h3>Slices</h3><img alt="slices" src="data:image/png;base64,{encoded}" style="max-width:100%">'))
    except InputError as exc:
        parts.append(Div(text=f"<h3>Slices</h3><p>{html.escape(str(exc))}</p>"))
    path.write_text(file_html(column(*parts, sizing_mode="stretch_width"), resources=INLINE,
                              title=f"rqml report: {run.rqml.get('pipeline', '')}"))
    return path


def _summary_html(run: FinishedRun) -> str:
    rqml, outcomes = run.rqml, run.outcomes
    rows = {
        "pipeline": rqml.get("pipeline", ""),
        "status": rqml["status"] + ("" if rqml["status"] == "complete" else ": NOT every task was accepted"),
        "tasks": f"{len(outcomes)}: {_counts(o['state'] for o in outcomes)}",
        "final models": _counts(str(o.get("model")) for o in outcomes),
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
    """A map of the tiles of one layer along the first axis, a slider choosing the layer, its
    title counting the layer's states. Per tile: its state's colour and a hover (task, model,
    iterations, escalations, node); text on the tiles only while every layer has at most
    :data:`LABELLED_TILES`. Numbers travel as binary arrays: about 100 bytes a tile."""
    from bokeh.models import ColumnDataSource, CustomJS, Div, HoverTool, Slider
    from bokeh.plotting import figure
    from bokeh.transform import factor_cmap

    outcomes = [o for o in run.outcomes if o.get("core")]
    if not outcomes:
        return [Div(text="<p>No tile geometry recorded for this run.</p>")]
    layers: dict[tuple[int, int], list[dict]] = {}
    for outcome in outcomes:
        core = outcome["core"]
        layers.setdefault(tuple(core[0]) if len(core) == 3 else (0, 0), []).append(outcome)
    order = sorted(layers)
    labelled = max(len(layer) for layer in layers.values()) <= LABELLED_TILES
    by_layer = [_tile_columns(layers[key], labelled) for key in order]
    titles = [f"Tiles{f', z {a}-{b}' if len(order) > 1 else ''}: {_counts(o['state'] for o in layers[(a, b)])}" for a, b in order]
    source = ColumnDataSource(by_layer[0], name="tiles")
    plot = figure(title=titles[0], match_aspect=True, height=420, sizing_mode="stretch_width", tools="pan,wheel_zoom,reset")
    plot.y_range.flipped = True
    plot.rect("x", "y", "w", "h", source=source, fill_alpha=0.6, line_color="black",
              fill_color=factor_cmap("state", list(STATE_COLOURS.values()), list(STATE_COLOURS), nan_color="#1f77b4"))
    if labelled:
        plot.text("x", "y", text="label", source=source, text_align="center", text_baseline="middle", text_font_size="9pt")
    plot.add_tools(HoverTool(tooltips=[("task", "@task"), ("state", "@state"), ("model", "@model"),
                                       ("iterations", "@iterations"), ("escalations", "@escalations"), ("node", "@node")]))
    plot.xaxis.axis_label, plot.yaxis.axis_label = "x (voxels)", "y (voxels)"
    legend = " ".join(f"<span style='background:{c};padding:0 6px'>&nbsp;</span> {s}" for s, c in STATE_COLOURS.items())
    text = "" if labelled else f" (more than {LABELLED_TILES} tiles a layer: hover a tile for its iterations and escalations)"
    parts = [Div(text=f"<h3>Tiles</h3><p>{legend}{html.escape(text)}</p>"), plot]
    if len(order) > 1:
        slider = Slider(start=0, end=len(order) - 1, value=0, step=1, title="tile layer along z", name="tile-layer")
        slider.js_on_change("value", CustomJS(args={"source": source, "layers": by_layer, "plot": plot, "titles": titles},
                                              code="source.data = layers[cb_obj.value]; plot.title.text = titles[cb_obj.value];"))
        parts.append(slider)
    return parts


def _tile_columns(layer: list[dict], labelled: bool) -> dict[str, Any]:
    """The tile map's columns for one layer's outcomes: numbers as NumPy arrays (Bokeh sends
    them as binary), ``label`` (iterations, escalations) only where ``labelled``."""
    cores = np.array([o["core"][-2:] for o in layer], dtype=np.float64)  # (tiles, y|x, start|stop)
    data: dict[str, Any] = {
        "x": cores[:, 1].mean(axis=1), "y": cores[:, 0].mean(axis=1),
        "w": cores[:, 1, 1] - cores[:, 1, 0], "h": cores[:, 0, 1] - cores[:, 0, 0],
        "iterations": np.array([o["iterations"] for o in layer], dtype=np.int32),
        "escalations": np.array([o.get("escalations", 0) for o in layer], dtype=np.int32),
        **{column: [str(o.get(key) or "") for o in layer]
           for column, key in (("task", "task_id"), ("state", "state"), ("model", "model"), ("node", "node"))},
    }
    if labelled:
        data["label"] = [f"{o['iterations']} it" + (f", {o['escalations']} esc" if o.get("escalations") else "") for o in layer]
    return data


def _counts(values: Iterable[str]) -> str:
    """``"998 accepted, 2 stalled"``: how many times each value occurs, in order of the values."""
    return ", ".join(f"{n} {value}" for value, n in sorted(Counter(values).items()))


def _convergence(run: FinishedRun) -> list:
    """Misfit and stability against iteration: the 10-90 % band and median of every task's
    checks (:func:`_band`), and the curves of the :data:`CURVES_SHOWN` tasks most worth a look
    (not accepted, the most escalated, the longest first), each thinned to about
    :data:`CURVE_POINTS` points and coloured by the model that made each point: one legend
    entry per model, whatever the number of tasks. Triangles mark model switches."""
    from bokeh.models import ColumnDataSource, Div, HoverTool
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure

    traced = [o for o in run.outcomes if o.get("trace")]
    if not traced:
        return [Div(text="<p>No convergence trace recorded for this run.</p>")]
    traced.sort(key=lambda o: (o["state"] == "accepted", -o.get("escalations", 0), -o["iterations"], o["task_id"]))
    shown = traced[:CURVES_SHOWN]
    models = list(dict.fromkeys(p["model"] for o in shown for p in o["trace"]))
    plots = []
    for figure_name, key in (("misfit", "misfit"), ("stability (relative change per check)", "stability")):
        plot = figure(title=f"{figure_name} against iteration", y_axis_type="log", height=320,
                      sizing_mode="stretch_width", tools="pan,wheel_zoom,box_zoom,reset")
        if (band := _band(traced, key)) is not None:
            source = ColumnDataSource(band)
            plot.varea("iteration", "low", "high", source=source, fill_color="#999999", fill_alpha=0.25,
                       legend_label=f"10-90 % of {len(traced)} tasks")
            plot.line("iteration", "median", source=source, color="black", line_dash="dashed", legend_label="median")
        curves, switches = _curves(shown, key)
        drawn = [plot.multi_line("xs", "ys", source=ColumnDataSource(curves[model]), color=Category10_10[i % 10],
                                 line_width=1.5, legend_label=model) for i, model in enumerate(models) if model in curves]
        if switches:
            plot.scatter(*zip(*switches), marker="triangle", size=9, color="black", legend_label="model switch")
        plot.add_tools(HoverTool(renderers=drawn, tooltips=[("task", "@task"), ("model", "@model"), ("iteration", "$x{0}"),
                                                            (key, "$y")]))
        plot.xaxis.axis_label = "iteration"
        plot.legend.click_policy = "hide"
        plot.legend.label_text_font_size = "8pt"
        plots.append(plot)
    note = (f"Curves of {len(shown)} of {len(traced)} tasks (those not accepted, the most escalated and the longest first), "
            f"coloured by model; the band and median: every check of all {len(traced)} tasks, by iteration.")
    return [Div(text=f"<p>{html.escape(note)}</p>"), *plots]


def _curves(outcomes: list[dict], key: str) -> tuple[dict[str, dict[str, list]], list[tuple[float, float]]]:
    """Per model, the multi-line columns of the ``key`` curves of ``outcomes`` (one line per run
    of one model in a task's trace, joined to the previous run's last point), and the (iteration,
    value) where each run after a task's first starts; each trace thinned first
    (:func:`_thinned`), its points without a positive value left out."""
    curves: dict[str, dict[str, list]] = {}
    switches = []
    for outcome in outcomes:
        points = _thinned([p for p in outcome["trace"] if p.get(key) is not None and p[key] > 0])
        start = 0
        for end in range(1, len(points) + 1):
            if end < len(points) and points[end]["model"] == points[start]["model"]:
                continue
            model = points[start]["model"]
            line = points[max(start - 1, 0):end]
            columns = curves.setdefault(model, {"xs": [], "ys": [], "task": [], "model": []})
            columns["xs"].append(np.array([p["iteration"] for p in line], dtype=np.float64))
            columns["ys"].append(np.array([p[key] for p in line], dtype=np.float64))
            columns["task"].append(outcome["task_id"])
            columns["model"].append(model)
            if start > 0:
                switches.append((points[start]["iteration"], points[start][key]))
            start = end
    return curves, switches


def _thinned(points: list[dict]) -> list[dict]:
    """At most about :data:`CURVE_POINTS` of a curve's points, evenly spaced, with the first,
    the last and every model's first kept."""
    if len(points) <= CURVE_POINTS:
        return points
    keep = set(np.linspace(0, len(points) - 1, CURVE_POINTS).round().astype(int).tolist())
    keep.update(i for i in range(1, len(points)) if points[i]["model"] != points[i - 1]["model"])
    return [points[i] for i in sorted(keep)]


def _band(outcomes: list[dict], key: str) -> dict[str, np.ndarray] | None:
    """The 10th, 50th and 90th percentiles of the positive ``key`` values of every check of
    ``outcomes``, in at most :data:`BAND_BINS` equal bins of iteration (each bin's middle);
    ``None`` if there are none."""
    values = [(p["iteration"], p[key]) for o in outcomes for p in o["trace"] if p.get(key) is not None and p[key] > 0]
    if not values:
        return None
    iterations, figures = np.array(values).T
    width = max(1, -(-int(iterations.max() + 1) // BAND_BINS))
    bins = iterations.astype(np.int64) // width
    order = np.lexsort((figures, bins))
    bins, figures = bins[order], figures[order]
    found, starts, counts = np.unique(bins, return_index=True, return_counts=True)
    at = {name: figures[starts + np.floor(q * (counts - 1)).astype(np.int64)] for name, q in (("low", 0.1), ("median", 0.5), ("high", 0.9))}
    return {"iteration": found * width + (width - 1) / 2, **at}
