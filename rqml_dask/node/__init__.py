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


async def dask_setup(server) -> None:
    """Preload hook, for a worker (``--preload rqml_dask.node``) and for its nanny
    (``--preload-nanny rqml_dask.node``).

    On a nanny: put its doors behind the scheduler's certificate
    (:func:`~rqml_dask.node.doors.guard_nanny`). On a worker: refuse listeners beyond loopback
    without ``pqtls://`` unless ``rqml.trust.allow-insecure`` (:func:`~rqml_dask.exposure.check_listeners`);
    move its HTTP endpoints to loopback unless ``rqml.trust.expose-http``
    (:func:`~rqml_dask.exposure.confine_http`) and log where they listen; start the node
    plugin. A bad ``rqml.node`` or ``rqml.trust`` value, a refused listener, or on ``pqtls://``
    a nanny without its doors, stops the worker, naming why (Dask only logs an exception a
    preload raises)."""
    import logging

    from distributed import Nanny

    from rqml_dask.config import ConfigError, exposure_settings, node_settings
    from rqml_dask.exposure import ExposureError, check_listeners, confine_http, insecure_warning
    from rqml_dask.node.doors import OpenNanny, guard_nanny
    from rqml_dask.node.plugin import NodePlugin

    if isinstance(server, Nanny):
        guard_nanny(server)
        return
    logger = logging.getLogger(__name__)
    try:
        node_settings()
        exposure = exposure_settings()
        insecure = check_listeners([listener.listen_address for listener in server.listeners], exposure, kind="node")
    except ConfigError as exc:
        raise SystemExit(f"rqml node: {exc}" if not isinstance(exc, ExposureError) else str(exc)) from None
    if insecure:
        logger.warning("rqml: %s", insecure_warning(insecure, kind="node"))
    if server.http_server is not None:
        door = confine_http(server.http_server, exposure)
        logger.log(door.level, door.describe(f"node {server.name}'s HTTP server (/health, /metrics, ...)"))
    try:
        await server.plugin_add(NodePlugin(), catch_errors=False)
    except OpenNanny as exc:
        raise SystemExit(f"rqml node: {exc}") from None


__all__ = ["PLUGIN_NAME", "NodePlugin", "RQMLWorker", "SchedulerLost", "current_node", "dask_setup"]
