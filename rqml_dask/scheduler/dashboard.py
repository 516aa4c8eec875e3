"""The ``/rqml`` page of the Dask dashboard: nodes, their scheduler link, tasks and alerts,
with links to the live pages (:mod:`rqml_dask.scheduler.live_pages`).

Registered by the scheduler preload (``dask scheduler --preload rqml_dask.scheduler``) in
``distributed.dashboard.scheduler.applications``, which the scheduler reads when it starts its
dashboard (:mod:`rqml_dask.scheduler.page_routes`: this module is imported when a page is
first opened), so the page is served at ``http://<scheduler>:8787/rqml`` and linked ("Rqml") from
the navigation bar of every dashboard page (:func:`rqml_dask.compat.add_navigation_link`).
Every page has Dask's own template and theme.

What it shows, refreshed twice a second from the RQML scheduler plugin:

* a summary line: nodes, nodes that have worked without a scheduler, tasks by state;
* one row per node: queues, speed, reliability, warm models, checkpoint backlog, and its
  link: how often it lost the scheduler, for how long, its jobs and its outbox,
  what reconciliation settled;
* the latest alerts (``rqml-alerts``): degraded nodes, duplicates resolved, rejected
  checkpoints, an unavailable shared store, nodes quarantined (and why, in the summary);
* over ``pqtls://``, each node's certificate name and key exchange.
"""

from __future__ import annotations

import time
from typing import Any

from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div
from distributed import Scheduler
from distributed.dashboard.components import add_periodic_callback

from rqml_dask import events
from rqml_dask.compat import use_dask_look
from rqml_dask.scheduler.live_pages import PAGES, fitted_table

ALERTS_SHOWN = 50

NODE_COLUMNS = {
    "name": "node",
    "address": "address",
    "link": "link",
    "losses": "scheduler losses",
    "degraded_s": "degraded (s)",
    "jobs": "jobs",
    "outbox": "outbox",
    "reconciled": "reconciled",
    "discarded": "discarded",
    "refining": "refining",
    "inbound": "inbound",
    "iterations_per_second": "it/s",
    "reliability": "reliability",
    "warm": "warm models",
    "checkpoint_backlog": "checkpoint backlog",
    "certificate": "certificate",
}
ALERT_COLUMNS = {"time": "time", "kind": "alert", "subject": "about", "detail": "detail"}
NODE_WIDTHS = {"name": 140, "address": 180, "link": 80, "warm": 240, "certificate": 240}
ALERT_WIDTHS = {"time": 80, "kind": 160, "subject": 200, "detail": 900}
"""Widths (pixels) for the content of the columns that need more than their header: the
tables scroll sideways where the page is narrower (:func:`~rqml_dask.scheduler.live_pages.fitted_table`)."""


class RQMLPage:
    """The page's models and their refresh from the scheduler (Dask's component pattern:
    ``root`` is laid out, ``update`` runs on a periodic callback)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.summary = Div(name="rqml-summary", text="")
        self.nodes = ColumnDataSource({name: [] for name in NODE_COLUMNS}, name="rqml-nodes")
        self.alerts = ColumnDataSource({name: [] for name in ALERT_COLUMNS}, name="rqml-alerts")
        node_table = fitted_table(self.nodes, NODE_COLUMNS, NODE_WIDTHS, height=220)
        alert_table = fitted_table(self.alerts, ALERT_COLUMNS, ALERT_WIDTHS, height=320)
        links = " · ".join(f"<a href='{path.lstrip('/')}'>{title}</a>" for path, (title, _) in PAGES.items())
        self.root = column(
            Div(text=f"<h2>RQML</h2><p>Live pages: {links}</p>", name="rqml-links"), self.summary, Div(text="<h3>Nodes</h3>"), node_table,
            Div(text="<h3>Alerts</h3>"), alert_table, sizing_mode="stretch_width",
        )

    def update(self) -> None:
        from rqml_dask.scheduler.plugin import PLUGIN_NAME

        plugin = self.scheduler.plugins.get(PLUGIN_NAME)
        if plugin is None:
            self.summary.text = "The RQML scheduler plugin is not installed on this scheduler."
            return
        latest = plugin.runs.latest()
        status = plugin.status(limit=0, run=latest)  # the latest run's counts; no task's details
        names = {address: ws.name for address, ws in self.scheduler.workers.items()}
        rows = [self._node_row(address, names.get(address, address), node) for address, node in status["nodes"].items()]
        self.nodes.data = {name: [row[name] for row in rows] for name in NODE_COLUMNS}
        alerts = [self._alert_row(message) for _, message in list(self.scheduler.get_events(events.ALERTS))[-ALERTS_SHOWN:]][::-1]
        self.alerts.data = {name: [row[name] for row in alerts] for name in ALERT_COLUMNS}
        states = status["counts"]
        earlier = len(plugin.runs) - sum(run["tasks"] for run in status["runs"].values())
        degraded = sum(row["losses"] > 0 or row["degraded_s"] > 0 for row in rows)
        quarantined = "".join(f"; quarantined: {name} ({reason})" for name, reason in sorted(status["quarantined"].items()))
        self.summary.text = (
            f"{len(rows)} nodes, {degraded} of them worked without a scheduler; "
            f"run {latest or '(none yet)'}: {', '.join(f'{n} {s}' for s, n in sorted(states.items())) or 'no tasks'}"
            f"{f' ({earlier} tasks of earlier runs kept, not counted)' if earlier else ''}{quarantined}"
        )

    @staticmethod
    def _node_row(address: str, name: Any, node: dict[str, Any]) -> dict[str, Any]:
        link = node.get("link") or {}
        return {
            "name": str(name),
            "address": address,
            "link": link.get("status", "unknown"),
            "losses": link.get("scheduler_losses", 0),
            "degraded_s": round(link.get("degraded_seconds_total", 0.0), 1),
            "jobs": link.get("jobs", 0),
            "outbox": link.get("outbox", 0),
            "reconciled": link.get("reconciled", 0),
            "discarded": link.get("discarded", 0),
            "refining": node["queues"]["refining"],
            "inbound": node["queues"]["inbound"],
            "iterations_per_second": round(node.get("iterations_per_second", 0.0), 1),
            "reliability": round(node["reliability"], 3),
            "warm": ", ".join(node["warm_models"]),
            "checkpoint_backlog": node["checkpoint_backlog"],
            "certificate": f"{identity['name']}, {identity['group']}" if (identity := node.get("identity")) else "",
        }

    @staticmethod
    def _alert_row(message: dict[str, Any]) -> dict[str, Any]:
        subject = message.get("task_id") or message.get("node") or message.get("worker") or ""
        detail = {k: v for k, v in message.items() if k not in ("kind", "time", "task_id", "key", "node", "worker")}
        return {
            "time": time.strftime("%H:%M:%S", time.localtime(message.get("time", 0))),
            "kind": message.get("kind", ""),
            "subject": str(subject),
            "detail": ", ".join(f"{k}={v}" for k, v in detail.items()),
        }


def page_doc(component: type, title: str):
    """The Bokeh document builder (the signature ``applications`` entries have) of one page:
    ``component(scheduler)`` laid out with Dask's look, updated twice a second."""

    def make_doc(scheduler: Scheduler, extra: dict, doc) -> None:
        page = component(scheduler)
        page.update()
        add_periodic_callback(doc, page, 500)
        doc.title = f"Dask: {title}"
        doc.add_root(page.root)
        use_dask_look(doc, extra)

    return make_doc
