"""The live RQML pages of the Dask dashboard in headless Chromium during a real multi-process run.

Screenshots of every page are kept in ``test-artifacts/screenshots/`` (``$RQML_TEST_ARTIFACTS/screenshots/``
where that is set): ``rqml.png`` (the overview's tables), ``rqml-tiles.png``,
``rqml-tiles-selected.png``, ``rqml-tiles-busiest.png`` (opened on the layer with the most tiles
refining), ``rqml-tiles-reused.png`` (a run whose results were all reused),
``rqml-convergence.png``, ``rqml-nodes.png``, ``rqml-nodes-no-gpu.png`` (its "no GPU" note, scrolled to) and
``rqml-events.png``.
"""

from __future__ import annotations

import threading
import time

import pytest
from distributed import Client
from selenium.webdriver.common.actions.action_builder import ActionBuilder

from conftest import ARTIFACTS
from rqml_dask.scheduler.live_pages import NO_GPU
from heterogeneous_cluster import heterogeneous_cluster, sleepy_pipeline
from timing import bound, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SCREENSHOTS = ARTIFACTS / "screenshots"
SCREENSHOTS.mkdir(exist_ok=True)

DEEP = """
    function* elements(root) {
        for (const el of root.querySelectorAll('*')) { yield el; if (el.shadowRoot) yield* elements(el.shadowRoot); }
    }"""
"""Every element of the page, those inside Bokeh's shadow roots too (a generator, in JavaScript)."""

SHOWN_TEXT = DEEP + """
    const parts = [];
    for (const el of elements(document))
        for (const node of el.childNodes)
            if (node.nodeType === Node.TEXT_NODE && node.textContent.trim() && el.getClientRects().length) parts.push(node.textContent.trim());
    return parts.join(' ');"""
"""The text a user sees on the page: every text node of an element that is laid out (not hidden)."""

TABLE_FIT = DEEP + """
    const headers = [], cells = [];
    for (const el of elements(document)) {
        if (el.classList.contains('slick-header-column') && el.getClientRects().length) {
            const name = el.querySelector('.slick-column-name'), style = getComputedStyle(el);
            headers.push([name.textContent, name.scrollWidth, el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)]);
        }
        if (el.classList.contains('slick-cell') && el.getClientRects().length && el.textContent.trim()) {
            const tip = el.querySelector('[title]');
            cells.push([el.textContent.trim(), el.scrollWidth, el.clientWidth, tip ? tip.getAttribute('title') : null]);
        }
    }
    return [headers, cells];"""
"""Each table header (its name, the name's width in full, the width its column has for it) and cell (text, width in
full, width shown, its tooltip)."""

LOG_TICKS = """
    const doc = Bokeh.documents[0];
    function find(v, model) { if (v.model === model) return v; for (const c of (v.child_views || [])) { const f = find(c, model); if (f) return f; } return null; }
    const out = {};
    for (const name of arguments[0]) {
        const plot = doc.get_model_by_name(name), view = find(Object.values(Bokeh.index)[0], plot), axis = plot.left[0];
        const ticks = axis.ticker.get_ticks(plot.y_range.start, plot.y_range.end, plot.y_range, NaN).major;
        out[name] = [ticks.map((t) => view.frame.y_scale.compute(t)), axis.formatter.doFormat(ticks, {loc: 0})];
    }
    return out;"""
"""For each named plot: the screen y of each major tick of its (log) y axis, and their labels, as its axis draws them."""

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


def assert_tables_fit(browser) -> None:
    """No table header is cut off (its tables scroll sideways instead), and every cell that is
    has its full text as its tooltip."""
    headers, cells = browser.execute_script(TABLE_FIT)
    assert headers and all(full <= shown for _, full, shown in headers), [h for h in headers if h[1] > h[2]]
    assert all(tip == text for text, full, shown, tip in cells if full > shown), [c for c in cells if c[1] > c[2]]


def busiest_layers(dask_scheduler) -> tuple[list, dict]:
    """The scheduler's layers of its latest run, and how many tiles refine in each (what the tiles page reads)."""
    from rqml_dask.scheduler.plugin import PLUGIN_NAME

    run = dask_scheduler.plugins[PLUGIN_NAME].runs.get(dask_scheduler.plugins[PLUGIN_NAME].runs.latest())
    return sorted(run.layers), run.refining_by_layer()


def test_live_pages_follow_a_running_pipeline_and_a_clicked_tile_shows_its_convergence(tmp_path, small_volume, browser):
    pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [8, 16, 16], iterations=120, delay=0.04, name="live")
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        # four tiles refining on each node at once (a CPU node with one FFT thread keeps the policy's minimum): curves to overlay
        client.sync(client.scheduler.rqml_policy, policy={"version": 2, "min_concurrency": 4})
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
        # its tables fit: every header in full (the node table, 16 columns, scrolls sideways), long cells in a tooltip
        wait_for(lambda: len(sources(browser)["rqml-nodes"]["name"]) == 2, timeout=30, what="both nodes on /rqml")
        assert_tables_fit(browser)
        browser.save_screenshot(str(SCREENSHOTS / "rqml.png"))

        # tiles: the states and iterations of the 27 tiles of this run change as it goes on
        browser.get(f"{base}/rqml-tiles")
        first, later = changes(browser, lambda s: (s["rqml-tiles"]["state"], s["rqml-tiles"]["iteration"]), "the tile map")
        assert len(first[0]) == 9 and set(later[0]) <= {"queued", "refining", "converged"}  # one layer of 3 x 3 tiles
        browser.save_screenshot(str(SCREENSHOTS / "rqml-tiles.png"))
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
        browser.save_screenshot(str(SCREENSHOTS / "rqml-tiles-selected.png"))

        # convergence: the overlaid curves of the tasks refining now grow
        browser.get(f"{base}/rqml-convergence")
        changes(browser, lambda s: sorted((tuple(v["task"][:1]), len(v["iteration"])) for k, v in s.items() if "misfit" in v),
                "the convergence curves")
        # the checkpoints its node took (every 10 iterations) are marked on the curves
        wait_for(lambda: sources(browser)["rqml-checkpoint-marks"]["iteration"], timeout=30, what="checkpoint marks")
        marked = sources(browser)["rqml-checkpoint-marks"]["iteration"]
        assert all(i % 10 == 0 for i in marked), marked
        # the log axes' labels do not crowd: at least 20 px apart, each one different
        for name, (ys, labels) in browser.execute_script(LOG_TICKS, ["rqml-convergence-misfit", "rqml-convergence-stability"]).items():
            assert len(ys) >= 2 and len(set(labels)) == len(labels), (name, ys, labels)
            assert min(abs(a - b) for a, b in zip(ys, ys[1:])) >= 20, (name, ys, labels)
        browser.save_screenshot(str(SCREENSHOTS / "rqml-convergence.png"))

        # nodes over time: both nodes' series gain samples
        browser.get(f"{base}/rqml-nodes")
        first, later = changes(browser, lambda s: [len(xs) for xs in s["rqml-nodes-iterations_per_second"]["xs"]], "the node series")
        assert len(later) == 2 and all(b > a for a, b in zip(first, later))
        assert len(sources(browser)["rqml-nodes-now"]["node"]) == 2
        # each line is named by its node's --name above the plots; no GPU here: the note, not an empty plot
        shown = wait_for(lambda: "Lines:" in (text := browser.execute_script(SHOWN_TEXT)) and text, timeout=30, what="the legend")
        assert "worker-0-x1" in shown and "worker-1-x1" in shown and "cluster mean" in shown, shown
        assert NO_GPU in shown and "GPU memory (fraction)" not in shown
        assert_tables_fit(browser)
        browser.save_screenshot(str(SCREENSHOTS / "rqml-nodes.png"))
        browser.execute_script(DEEP + "for (const el of elements(document)) if (el.textContent.startsWith('GPU memory:')) el.scrollIntoView();")
        browser.save_screenshot(str(SCREENSHOTS / "rqml-nodes-no-gpu.png"))

        # events: new events arrive; the kind filter keeps only what it names
        browser.get(f"{base}/rqml-events")
        changes(browser, lambda s: s["rqml-events"]["time"][:1] + s["rqml-events"]["kind"][:3], "the event list")
        browser.execute_script("Bokeh.documents[0].get_model_by_name('rqml-events-kind').value = 'queued'")
        wait_for(lambda: set(sources(browser)["rqml-events"]["kind"]) == {"queued"}, timeout=30, what="the filtered events")
        assert_tables_fit(browser)
        browser.save_screenshot(str(SCREENSHOTS / "rqml-events.png"))

        # tiles again, once the first layer has no tile refining: the page opens on the layer with the most
        wait_for(lambda: (found := client.run_on_scheduler(busiest_layers))[1] and found[0][0] not in found[1],
                 timeout=120, what="no tile of the first layer refining while others do")
        browser.get(f"{base}/rqml-tiles")
        sources(browser)

        def on_the_busiest() -> bool:
            at = browser.execute_script("return Bokeh.documents[0].get_model_by_name('rqml-tile-layer').value")
            layers, refining = client.run_on_scheduler(busiest_layers)
            return at > 0 and refining.get(layers[at], 0) == max(refining.values(), default=0) > 0

        wait_for(on_the_busiest, timeout=30, what="the slider on the layer with the most tiles refining")
        browser.save_screenshot(str(SCREENSHOTS / "rqml-tiles-busiest.png"))

        run.join(bound(240))
        assert reports and all(o.accepted for o in reports[0].outcomes)
        browser.get(f"{base}/rqml-tiles")
        wait_for(lambda: set(sources(browser)["rqml-tiles"]["state"]) == {"converged"}, timeout=30, what="every tile converged")

        # the same run again reuses every result: each tile says so, with the figures of the run that computed it
        again = pipeline.run(client, progress=False)
        assert all(o.reused for o in again.outcomes)
        browser.get(f"{base}/rqml-tiles")
        tiles = wait_for(lambda: set((t := sources(browser)["rqml-tiles"])["state"]) == {"reused"} and t, timeout=30,
                         what="every tile reused")
        assert set(tiles["iteration"]) == {120} and all(tiles["misfit"]), tiles
        assert set(tiles["node"]) <= {"worker-0-x1", "worker-1-x1"}, tiles["node"]  # nodes by their --name
        assert "reused" in browser.execute_script(SHOWN_TEXT)  # the colour key names it
        x, y, task = tile_centre(browser, 0)
        actions = ActionBuilder(browser)
        actions.pointer_action.move_to_location(x, y).click()
        actions.perform()
        wait_for(lambda: len(sources(browser)["rqml-selected-curve"]["iteration"]) > 0, timeout=30, what="the reused tile's curve")
        title = browser.execute_script("return Bokeh.documents[0].get_model_by_name('rqml-selected-plot').title.text")
        assert title.startswith(f"Selected task {task}:") and "reused" in title, title
        browser.save_screenshot(str(SCREENSHOTS / "rqml-tiles-reused.png"))


def test_log_axis_ticks_label_every_range_with_two_to_five_distinct_labels(browser):
    """The convergence pages' log-axis ticker and labels, run in the browser over the ranges a
    curve takes: a flat curve within a few per cent, within a factor of a few, over many decades."""
    from rqml_dask.scheduler.live_pages import LOG_TICKS as TICKER, SHORTEST_LABEL

    ranges = [(0.041, 0.059), (0.0499, 0.0501), (0.8, 1.5), (0.3, 7.0), (2e-3, 0.9), (1e-6, 1e3), (1e-30, 1.0),
              (133.0, 134.0), (9.99, 10.01), (123456.0, 123457.0)]
    found = browser.execute_script("""
        const ticker = new Function('cb_data', 'most', arguments[0]), label = new Function('tick', 'ticks', arguments[1]);
        return arguments[2].map(([lo, hi]) => {
            const ticks = ticker({start: lo, end: hi}, 5);
            return [ticks, ticks.map((t) => label(t, ticks))];
        });""", TICKER, SHORTEST_LABEL, ranges)
    for (lo, hi), (ticks, labels) in zip(ranges, found):
        assert 2 <= len(ticks) <= 5, (lo, hi, ticks)
        assert all(lo <= t <= hi * (1 + 1e-9) for t in ticks) and ticks == sorted(ticks), (lo, hi, ticks)
        assert len(set(labels)) == len(labels), (lo, hi, labels)
