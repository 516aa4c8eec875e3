"""``rqml show`` and ``rqml report`` on finished runs; the report in Chromium without a network."""

from __future__ import annotations

import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rqml_dask import Pipeline

from conftest import ARTIFACTS, pipeline_dict, write_yaml

RQML = [sys.executable, "-m", "rqml_dask.cli"]


def rqml(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RQML, *args], capture_output=True, text=True, timeout=120)


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
            const lines = doc.all_models ? [...doc.all_models].filter(m => m.type === 'GlyphRenderer' && m.glyph.type === 'Line').length : -1;
            const views = Object.keys(Bokeh.index);  // the rendered root views: the page was drawn, not only parsed
            const divs = [...doc.all_models].filter(m => m.type === 'Div').map(m => m.text);
            return [tiles.data.task, tiles.data.state, layer ? layer.end : 0, lines, views.length, divs.join('\\n')];"""
        deadline = time.monotonic() + 30
        while True:
            try:
                tasks, states, last_layer, lines, views, page_text = browser.execute_script(read)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert last_layer == 1 and sorted(tasks) == ["reported/0", "reported/1", "reported/2", "reported/3"]
        assert set(states) == {"max_iterations"} and "NOT every task was accepted" in page_text
        assert lines == 2 * 8 and views >= 1  # misfit and stability curves of all 8 tasks
        assert 'alt="slices" src="data:image/png;base64,' in page_text
        browser.execute_script("Bokeh.documents[0].get_model_by_name('tile-layer').value = 1")
        next_layer = browser.execute_script("return Bokeh.documents[0].get_model_by_name('tiles').data.task")
        assert sorted(next_layer) == ["reported/4", "reported/5", "reported/6", "reported/7"]
        browser.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        browser.set_network_conditions(offline=False, latency=0, download_throughput=-1, upload_throughput=-1)
