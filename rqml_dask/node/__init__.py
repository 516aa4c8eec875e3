"""The node orchestrator: a Dask WorkerPlugin with three queues, heartbeat figures and endpoints.

As a preload: ``dask worker tcp://scheduler:8786 --preload rqml_dask.node`` (or
``dask cuda worker ... --preload rqml_dask.node``) installs :class:`NodePlugin` on the worker.
"""

from rqml_dask.node.plugin import PLUGIN_NAME, NodePlugin, current_node
from rqml_dask.node.policy import Decision, NodePolicy


async def dask_setup(worker) -> None:
    """Preload hook: start the node plugin on this worker."""
    await worker.plugin_add(NodePlugin(), catch_errors=False)


__all__ = ["PLUGIN_NAME", "Decision", "NodePlugin", "NodePolicy", "current_node", "dask_setup"]
