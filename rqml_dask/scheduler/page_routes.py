"""Where the RQML pages are served on the Dask dashboard, registered without importing Bokeh.

The scheduler preload registers every page when it is imported (Dask reads
``distributed.dashboard.scheduler.applications`` when it builds the dashboard); the modules
that build the pages (:mod:`rqml_dask.scheduler.dashboard`,
:mod:`rqml_dask.scheduler.live_pages`) import Bokeh's models, 0.8 s of a scheduler's start on
this project's test machine, and are imported when a page is first opened instead.
"""

from __future__ import annotations

import functools
from typing import Any

from rqml_dask.compat import add_dashboard_page

PATH = "/rqml"
TITLES = {PATH: "RQML", "/rqml-tiles": "Tiles", "/rqml-convergence": "Convergence", "/rqml-nodes": "Nodes over time",
          "/rqml-events": "Events"}
"""Path -> title of every RQML page: ``/rqml`` (:class:`~rqml_dask.scheduler.dashboard.RQMLPage`)
and the live pages (:data:`rqml_dask.scheduler.live_pages.PAGES`)."""


def register() -> None:
    """Add the pages to the dashboards of schedulers made from now on (idempotent)."""
    for path in TITLES:
        add_dashboard_page(path, functools.partial(_make_doc, path))


def _make_doc(path: str, scheduler: Any, extra: dict, doc: Any) -> None:
    from rqml_dask.scheduler.dashboard import RQMLPage, page_doc
    from rqml_dask.scheduler.live_pages import PAGES

    component = RQMLPage if path == PATH else PAGES[path][1]
    page_doc(component, "RQML" if path == PATH else f"RQML {TITLES[path]}")(scheduler, extra, doc)
