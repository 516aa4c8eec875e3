"""The node orchestrator: a Dask WorkerPlugin with three queues, heartbeat figures and endpoints.

As a preload: ``dask worker tcp://scheduler:8786 --preload rqml_dask.node`` (or
``dask cuda worker ... --preload rqml_dask.node``) installs :class:`NodePlugin` on the worker.
With ``--worker-class rqml_dask.node.RQMLWorker`` the node also keeps working when the
scheduler is lost, and reconciles when it is back (:mod:`rqml_dask.node.worker`).
"""

from rqml_dask.node.plugin import PLUGIN_NAME, NodePlugin, SchedulerLost, current_node
from rqml_dask.node.policy import Decision, NodePolicy
from rqml_dask.node.worker import RQMLWorker


async def dask_setup(worker) -> None:
    """Preload hook: start the node plugin on this worker."""
    await worker.plugin_add(NodePlugin(), catch_errors=False)


__all__ = ["PLUGIN_NAME", "Decision", "NodePlugin", "NodePolicy", "RQMLWorker", "SchedulerLost", "current_node", "dask_setup"]
