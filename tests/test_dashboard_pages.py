"""The live RQML pages of the Dask dashboard in headless Chromium during a real multi-process run."""

from __future__ import annotations

import threading
import time

import pytest
from distributed import Client
from selenium.webdriver.common.actions.action_builder import ActionBuilder

from conftest import ARTIFACTS
from heterogeneous_cluster import heterogeneous_cluster, sleepy_pipeline
from timing import bound, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

READ = """
    const doc = Bokeh.documents[0];
    const out = {};
    for (const m of doc.all_models) {
        if (m.type === 'ColumnDataSource' && m.name) out[m.name] = m.data;
    }
    return out;"""
"""Every named data source of the page, as the browser has it (what its plots draw)."""


def sources(browser, timeout: float = 30) -> dict:
    deadline = time.monotonic() + bound(timeout)
    while True:
        try:
            found = browser.execute_script(READ)
            if found:
                return found
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("the page's Bokeh document never loaded")
        time.sleep(0.25)


def changes(browser, figure, what: str, timeout: float = 30):
    """``figure(sources)`` read now, and a later reading that differs from it (else fail)."""
    first = figure(sources(browser))
    deadline = time.monotonic() + bound(timeout)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        later = figure(sources(browser))
        if later != first:
            return first, later
    raise AssertionError(f"{what} did not change in {timeout} s: {first}")


def tile_centre(browser, index: int) -> tuple[int, int, str]:
    """Viewport coordinates of tile ``index``'s centre on the map, and its task."""
    x, y, task = browser.execute_script("""
        const doc = Bokeh.documents[0];
        const plot = doc.get_model_by_name('rqml-tile-map'), tiles = doc.get_model_by_name('rqml-tiles');
        function find(v) { if (v.model === plot) return v; for (const c of (v.child_views || [])) { const f = find(c); if (f) return f; } return null; }
        const view = find(Object.values(Bokeh.index)[0]);
        const box = view.el.getBoundingClientRect();
        return [box.left + view.frame.x_scale.compute(tiles.data.x[arguments[0]]),
                box.top + view.frame.y_scale.compute(tiles.data.y[arguments[0]]), tiles.data.task[arguments[0]]];""", index)
    return int(x), int(y), task


def test_live_pages_follow_a_running_pipeline_and_a_clicked_tile_shows_its_convergence(tmp_path, small_volume, browser):
    pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=80, delay=0.03, name="live")
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        base = client.dashboard_link.replace("/status", "")
        reports: list = []
        run = threading.Thread(target=lambda: reports.append(pipeline.run(client, progress=False)), daemon=True)
        run.start()
        wait_for(lambda: any(t["state"] == "bound" for t in client.sync(client.scheduler.rqml_status)["tasks"].values()),
                 timeout=60, what="a task bound to a node")

        # the overview links every live page, and Dask's navigation bar links the overview
        browser.get(f"{base}/rqml")
        sources(browser)
        assert browser.execute_script("return [...document.querySelectorAll('a')].some(a => a.getAttribute('href') === 'rqml')")

        # tiles: the states and iterations of the 27 tiles of this run change as it goes on
        browser.get(f"{base}/rqml-tiles")
        first, later = changes(browser, lambda s: (s["rqml-tiles"]["state"], s["rqml-tiles"]["iteration"]), "the tile map")
        assert len(first[0]) == 9 and set(later[0]) <= {"queued", "refining", "converged"}  # one layer of 3 x 3 tiles
        browser.save_screenshot(str(ARTIFACTS / "rqml-tiles.png"))
        # a real click on a tile that has iterated selects it and draws its convergence curve
        states, iterations = later
        index = max(range(len(iterations)), key=lambda i: iterations[i])
        x, y, task = tile_centre(browser, index)
        actions = ActionBuilder(browser)
        actions.pointer_action.move_to_location(x, y).click()
        actions.perform()
        wait_for(lambda: len(sources(browser)["rqml-selected-curve"]["iteration"]) > 0, timeout=30, what="the clicked tile's curve")
        title = browser.execute_script("return Bokeh.documents[0].get_model_by_name('rqml-selected-plot').title.text")
        assert title.startswith(f"Selected task {task}:")
        browser.save_screenshot(str(ARTIFACTS / "rqml-tiles-selected.png"))

        # convergence: the overlaid curves of the tasks refining now grow
        browser.get(f"{base}/rqml-convergence")
        changes(browser, lambda s: sorted((tuple(v["task"][:1]), len(v["iteration"])) for k, v in s.items() if "misfit" in v),
                "the convergence curves")
        # the checkpoints its node took (every 10 iterations) are marked on the curves
        wait_for(lambda: sources(browser)["rqml-checkpoint-marks"]["iteration"], timeout=30, what="checkpoint marks")
        marked = sources(browser)["rqml-checkpoint-marks"]["iteration"]
        assert all(i % 10 == 0 for i in marked), marked
        browser.save_screenshot(str(ARTIFACTS / "rqml-convergence.png"))

        # nodes over time: both nodes' series gain samples
        browser.get(f"{base}/rqml-nodes")
        first, later = changes(browser, lambda s: [len(xs) for xs in s["rqml-nodes-iterations_per_second"]["xs"]], "the node series")
        assert len(later) == 2 and all(b > a for a, b in zip(first, later))
        assert len(sources(browser)["rqml-nodes-now"]["node"]) == 2
        browser.save_screenshot(str(ARTIFACTS / "rqml-nodes.png"))

        # events: new events arrive; the kind filter keeps only what it names
        browser.get(f"{base}/rqml-events")
        changes(browser, lambda s: s["rqml-events"]["time"][:1] + s["rqml-events"]["kind"][:3], "the event list")
        browser.execute_script("Bokeh.documents[0].get_model_by_name('rqml-events-kind').value = 'queued'")
        wait_for(lambda: set(sources(browser)["rqml-events"]["kind"]) == {"queued"}, timeout=30, what="the filtered events")
        browser.save_screenshot(str(ARTIFACTS / "rqml-events.png"))

        run.join(bound(240))
        assert reports and all(o.accepted for o in reports[0].outcomes)
        browser.get(f"{base}/rqml-tiles")
        wait_for(lambda: set(sources(browser)["rqml-tiles"]["state"]) == {"converged"}, timeout=30, what="every tile converged")
