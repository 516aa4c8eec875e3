"""``rqml show`` and ``rqml report`` on finished runs; the report in Chromium without a network."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from rqml_dask import Pipeline
from rqml_dask.report import CURVES_SHOWN, SYSTEMS_SHOWN
from rqml_dask.synthetic import SystemsSpec, write_systems
from rqml_dask.volumes import write_outcome_records

from conftest import ARTIFACTS, pipeline_dict, systems_dict, write_yaml
from timing import bound

RQML = [sys.executable, "-m", "rqml_dask.cli"]


def rqml(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RQML, *args], capture_output=True, text=True, timeout=bound(timeout))


def finished_run(tmp_path: Path, client, store: Path, name: str, **overrides) -> Path:
    out = tmp_path / f"{name}.zarr"
    config = pipeline_dict(store, out, **overrides)
    config["name"] = name
    Pipeline.from_yaml(write_yaml(tmp_path / f"{name}.yaml", config)).run(client, progress=False)
    return out


def external_resources(page: str) -> list[str]:
    """What the page's own tags load from outside it (scripts, stylesheets, images not ``data:``)."""
    found: list[str] = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            url = dict(attrs).get("src") or (dict(attrs).get("href") if tag == "link" else None)
            if url and not url.startswith("data:"):
                found.append(f"<{tag}> {url}")

    Tags().feed(page)
    return found


def panel_rows(png: Path) -> int:
    """Rows of panels in a picture ``rqml show`` drew (3.6 inches at 80 dpi each)."""
    return round(Image.open(png).height / (3.6 * 80))


def test_show_draws_observed_result_and_truth_on_one_scale_and_prints_the_path(tmp_path, client, small_volume):
    out = finished_run(tmp_path, client, small_volume, "shown", input={"store": str(small_volume), "truth": "truth"})
    done = rqml("show", str(out))
    assert done.returncode == 0, done.stderr
    png = Path(done.stdout.strip())
    assert png == tmp_path / "shown.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert panel_rows(png) == 3  # observed, result, truth
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 10  # a picture, not a blank page

    without_truth = finished_run(tmp_path, client, small_volume, "no-truth", input={"store": str(small_volume), "truth": None})
    chosen = tmp_path / "elsewhere" / "slices.png"
    chosen.parent.mkdir()
    done = rqml("show", str(without_truth), "-o", str(chosen))
    assert done.returncode == 0 and Path(done.stdout.strip()) == chosen and panel_rows(chosen) == 2


def test_show_and_report_refuse_a_run_that_has_not_finished_or_is_no_run(tmp_path, small_volume):
    config = pipeline_dict(small_volume, tmp_path / "open.zarr")
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "open.yaml", config))
    pipeline.create_output(pipeline.prepare())  # what a run leaves while its tasks are out
    for command in ("show", "report"):
        done = rqml(command, str(tmp_path / "open.zarr"))
        assert done.returncode == 1 and "the run has not finished (status 'incomplete')" in done.stderr
    done = rqml("report", str(small_volume))
    assert done.returncode == 1 and "is not the output of an rqml run" in done.stderr


@pytest.mark.browser
def test_the_report_is_one_file_that_opens_offline_with_its_tiles_curves_and_slices(tmp_path, client, small_volume, browser):
    # a budget too small for the strict stopping rule: every task escalates, some not accepted
    strict = {"max_iterations": 40, "max_iterations_per_model": 20, "check_every": 5, "stability_tol": 1e-6,
              "consistency_tol": 1e-9, "novelty_window": 10**6}
    out = finished_run(tmp_path, client, small_volume, "reported", convergence=strict)
    done = rqml("report", str(out))
    assert done.returncode == 0, done.stderr
    report = Path(done.stdout.strip())
    assert report == tmp_path / "reported.report.html"
    text = report.read_text()
    assert not external_resources(text)  # BokehJS and the picture are inline

    browser.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
    try:
        browser.get(report.as_uri())
        read = """
            const doc = Bokeh.documents[0];
            const tiles = doc.get_model_by_name('tiles');
            const layer = doc.get_model_by_name('tile-layer');
            const curves = [...doc.all_models].filter(m => m.type === 'GlyphRenderer' && m.glyph.type === 'MultiLine');
            const curve_tasks = new Set(curves.flatMap(r => [...r.data_source.data.task])).size;
            const legend = [...doc.all_models].filter(m => m.type === 'LegendItem').map(m => m.label.value);
            const views = Object.keys(Bokeh.index);  // the rendered root views: the page was drawn, not only parsed
            const divs = [...doc.all_models].filter(m => m.type === 'Div').map(m => m.text);
            return [tiles.data.task, tiles.data.state, layer ? layer.end : 0, curve_tasks, legend, views.length, divs.join('\\n')];"""
        deadline = time.monotonic() + 30
        while True:
            try:
                tasks, states, last_layer, curve_tasks, legend, views, page_text = browser.execute_script(read)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert last_layer == 1 and sorted(tasks) == ["reported/0", "reported/1", "reported/2", "reported/3"]
        assert set(states) == {"max_iterations"} and "NOT every task was accepted" in page_text
        assert curve_tasks == 8 and views >= 1  # the curves of all 8 tasks
        assert "richardson_lucy" in legend and not any(label.startswith("reported/") for label in legend)  # per model, never per task
        assert 'alt="slices" src="data:image/png;base64,' in page_text
        browser.execute_script("Bokeh.documents[0].get_model_by_name('tile-layer').value = 1")
        next_layer = browser.execute_script("return Bokeh.documents[0].get_model_by_name('tiles').data.task")
        assert sorted(next_layer) == ["reported/4", "reported/5", "reported/6", "reported/7"]
        browser.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        browser.set_network_conditions(offline=False, latency=0, download_throughput=-1, upload_throughput=-1)


def finished_store(path: Path, result: np.ndarray, outcomes: list[dict], image_axes: tuple[str, ...] | None) -> Path:
    """The output store of a finished run as ``Pipeline.finalize`` leaves it, without running one:
    ``result`` (its axes named where it is an image, as the pipeline names them), the observed
    image and truth beside it (``result``'s shape, other values), the outcome records beside them."""
    group = zarr.open_group(path, mode="w")
    for name, data in (("solution", result), ("observed", result + 1), ("truth", result * 0.9)):
        group.create_array(name, data=data, dimension_names=image_axes)
    refs = {name: {"store": str(path), "path": name} for name in ("observed", "truth")}
    group.attrs["rqml"] = {
        "status": "rejected" if any(o["state"] != "accepted" for o in outcomes) else "complete",
        "pipeline": "simulated", "input": {"image": refs["observed"], "truth": refs["truth"]}, "array": "solution",
        "iterations": sum(o["iterations"] for o in outcomes), "escalations": sum(o["escalations"] for o in outcomes),
        "outcomes": write_outcome_records(path, outcomes),
    }
    return path


LADDER = ["jacobi", "conjugate_gradient", "mixed_precision"]


def tile_outcomes(layers: int, side: int, checks: int = 20) -> list[dict]:
    """Outcomes of ``layers * side * side`` tasks on 2x2x2 tiles, each with a trace of ``checks``
    checks climbing ``i % 3`` rungs of :data:`LADDER`; every 97th task stalled."""
    outcomes = []
    for i in range(layers * side * side):
        z, y, x = i // (side * side), (i // side) % side, i % side
        climbed = i % 3
        trace = [{"iteration": 5 * (n + 1), "model": LADDER[n * (climbed + 1) // checks], "misfit": 0.9**n,
                  "stability": 0.5 * 0.9**n if n else None, "consistency": None, "novelty": None} for n in range(checks)]
        outcomes.append({"task_id": f"simulated/{i}", "state": "stalled" if i % 97 == 5 else "accepted",
                         "iterations": 5 * checks, "model": LADDER[climbed], "escalations": climbed,
                         "node": f"tcp://10.0.0.{i % 7}:4000", "core": [[2 * z, 2 * z + 2], [2 * y, 2 * y + 2], [2 * x, 2 * x + 2]],
                         "trace": trace})
    return outcomes


def bokeh_models(page: str) -> list[dict]:
    """Every Bokeh model the standalone page defines (``{"type": "object", "name": ..., "attributes": ...}``)."""
    [document] = re.findall(r'<script type="application/json" id="[^"]+">\s*(.*?)\s*</script>', page, re.S)
    found: list[dict] = []

    def walk(value):
        if isinstance(value, dict):
            if value.get("type") == "object" and "name" in value:
                found.append(value)
            for inner in value.values():
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    walk(json.loads(document))
    return found


def divs_text(page: str) -> str:
    """The text of the page's Bokeh ``Div`` models (summary, headings, notes, the slices picture)."""
    return "\n".join(m["attributes"]["text"] for m in bokeh_models(page) if m["name"] == "Div")


def test_a_report_of_2000_tasks_has_a_legend_entry_per_model_a_bounded_set_of_curves_and_every_tile(tmp_path):
    outcomes = tile_outcomes(layers=2, side=32)
    store = finished_store(tmp_path / "many.zarr", np.random.default_rng(0).random((4, 64, 64)), outcomes, ("z", "y", "x"))
    done = rqml("report", str(store))
    assert done.returncode == 0, done.stderr
    page = Path(done.stdout.strip()).read_text()
    assert not external_resources(page)
    models = bokeh_models(page)
    legends = [m["attributes"]["label"]["value"] for m in models if m["name"] == "LegendItem"]
    per_plot = ["10-90 % of 2048 tasks", "median", *LADDER, "model switch"]
    assert sorted(legends) == sorted(per_plot * 2)  # misfit and stability: one entry per model, never per task
    sources = [dict(m["attributes"]["data"]["entries"]) for m in models if m["name"] == "ColumnDataSource"]
    drawn = {task for columns in sources if "xs" in columns for task in columns["task"]}
    stalled = {o["task_id"] for o in outcomes if o["state"] == "stalled"}
    assert stalled < drawn and len(drawn) == CURVES_SHOWN  # those not accepted first, then the most escalated
    [tiles] = [m for m in models if m.get("attributes", {}).get("name") == "tiles"]
    assert len(dict(tiles["attributes"]["data"]["entries"])["task"]) == 32 * 32  # the first layer's tiles, each its own
    assert f"2048: {2048 - len(stalled)} accepted, {len(stalled)} stalled" in divs_text(page)


def system_outcomes(count: int, grid: tuple[int, ...]) -> list[dict]:
    """Accepted outcomes of tasks of one system each, without traces."""
    return [{"task_id": f"simulated/{i}", "state": "accepted", "iterations": 10, "model": "mixed_precision", "escalations": 0,
             "node": "tcp://10.0.0.1:4000", "core": [[i, i + 1], *([0, n] for n in grid)], "trace": []} for i in range(count)]


def test_show_draws_the_first_systems_of_a_4d_batch_one_panel_each_and_the_report_holds_them(tmp_path):
    grid = (5, 6, 7)
    solutions = np.random.default_rng(0).random((6, *grid))
    store = finished_store(tmp_path / "systems.zarr", solutions, system_outcomes(6, grid), image_axes=None)
    done = rqml("show", str(store))
    assert done.returncode == 0, done.stderr
    png = Path(done.stdout.strip())
    assert panel_rows(png) == 3 and Image.open(png).width == 4 * 80 * SYSTEMS_SHOWN  # rhs, solution, truth; a column per system
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 10
    done = rqml("report", str(store))
    assert done.returncode == 0, done.stderr
    assert 'alt="slices" src="data:image/png;base64,' in divs_text(Path(done.stdout.strip()).read_text())


def test_a_result_with_nothing_to_draw_is_refused_by_show_and_said_in_the_report(tmp_path):
    store = finished_store(tmp_path / "5d.zarr", np.ones((2, 2, 3, 4, 5)), system_outcomes(2, (2, 3, 4, 5)), image_axes=None)
    done = rqml("show", str(store))
    assert done.returncode == 1 and "nothing to draw" in done.stderr
    done = rqml("report", str(store))
    assert done.returncode == 0, done.stderr
    assert "nothing to draw (rqml show draws batches of 2-D and 3-D systems)" in divs_text(Path(done.stdout.strip()).read_text())


def test_a_picture_that_cannot_be_drawn_is_one_warning_line_and_no_failure(tmp_path, capsys):
    from rqml_dask.cli import _drawn
    from rqml_dask.report import write_slices

    assert _drawn("slices", lambda: write_slices(tmp_path / "nothing.zarr")) is None
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("warning: no slices drawn: InputError: ") and err.count("\n") == 1


@pytest.mark.slow
def test_a_run_of_twelve_3d_systems_exits_0_with_its_slices_and_report(tmp_path):
    """More than ten tasks (one legend entry per task broke the report there) and a 4-D result."""
    store = write_systems(tmp_path / "systems.zarr", SystemsSpec(kind="systems", grid=(4, 6, 6), count=12, contrast=10))
    config = systems_dict(store, tmp_path / "solved.zarr", tiling={"tile": [1, 4, 6, 6], "halo": 0})
    done = rqml("run", str(write_yaml(tmp_path / "p.yaml", config)), "--no-progress", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert re.search(r"^tasks\s+12 \(12 accepted\)", done.stdout, re.M), done.stdout
    png, page = (Path(re.search(rf"^{what}\s+(\S+)$", done.stdout, re.M)[1]) for what in ("slices", "report"))
    assert png == tmp_path / "solved.png" and panel_rows(png) == 3
    assert 'alt="slices" src="data:image/png;base64,' in divs_text(page.read_text())
