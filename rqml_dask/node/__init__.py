"""The node orchestrator: a Dask WorkerPlugin with three queues, heartbeat figures and endpoints.

As a preload: ``dask worker tcp://scheduler:8786 --preload rqml_dask.node`` (or
``dask cuda worker ... --preload rqml_dask.node``) installs :class:`NodePlugin` on the worker.
With ``--worker-class rqml_dask.node.RQMLWorker`` the node also keeps working when the
scheduler is lost, and reconciles when it is back (:mod:`rqml_dask.node.worker`).

The names below load on first use (PEP 562): importing a module of this package (its
queues, its state) does not load the worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rqml_dask._lazy import lazy_exports

_EXPORTS = {
    "PLUGIN_NAME": "rqml_dask.node.plugin",
    "NodePlugin": "rqml_dask.node.plugin",
    "SchedulerLost": "rqml_dask.node.plugin",
    "current_node": "rqml_dask.node.plugin",
    "RQMLWorker": "rqml_dask.node.worker",
}

if TYPE_CHECKING:
    from rqml_dask.node.plugin import PLUGIN_NAME, NodePlugin, SchedulerLost, current_node
    from rqml_dask.node.worker import RQMLWorker


__getattr__ = lazy_exports(__name__, _EXPORTS)


async def dask_setup(worker) -> None:
    """Preload hook: move the worker's HTTP endpoints to loopback unless
    ``rqml.trust.expose-http`` (:func:`~rqml_dask.exposure.confine_http`) and log where they
    listen; start the node plugin on this worker. A bad ``rqml.node`` or ``rqml.trust`` value
    stops the worker, naming its key (Dask only logs an exception a preload raises)."""
    import logging

    from rqml_dask.config import ConfigError, exposure_settings, node_settings
    from rqml_dask.exposure import confine_http
    from rqml_dask.node.plugin import NodePlugin

    try:
        node_settings()
        exposure = exposure_settings()
    except ConfigError as exc:
        raise SystemExit(f"rqml node: {exc}") from None
    if worker.http_server is not None:
        door = confine_http(worker.http_server, exposure)
        logging.getLogger(__name__).log(door.level, door.describe(f"node {worker.name}'s HTTP server (/health, /metrics, ...)"))
    await worker.plugin_add(NodePlugin(), catch_errors=False)


__all__ = ["PLUGIN_NAME", "NodePlugin", "RQMLWorker", "SchedulerLost", "current_node", "dask_setup"]
