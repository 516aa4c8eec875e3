"""The worker plugin the RQML scheduler plugin registers, so that a bare ``dask worker`` is a node.

The scheduler plugin registers :class:`NodeInstaller` with
``Scheduler.register_worker_plugin``: Dask sends it to every worker running now and to every
worker that registers later (a new one, one a Nanny restarted, an
:class:`~rqml_dask.node.worker.RQMLWorker` registering again after it lost its scheduler).
On each worker it installs the node plugin (:class:`rqml_dask.node.plugin.NodePlugin`) if the
worker has none yet, and otherwise leaves the running one alone: Dask *replaces* a plugin
registered again under its own name (tearing it down), which would end a node's jobs at every
re-registration, so the node plugin is never itself the registered plugin.

The installer names the node plugin by its module and never imports it here: the scheduler
side and the node side import each other nowhere (``pyproject.toml``'s import contracts); the
node code loads on the worker, where it runs, as a Dask preload or an entry point would.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from distributed import WorkerPlugin

if TYPE_CHECKING:
    from distributed import Worker

INSTALLER_NAME = "rqml-node-installer"
NODE_PLUGIN = ("rqml_dask.node.plugin", "NodePlugin", "PLUGIN_NAME")
"""Where the node plugin lives: module, class, and the module constant with its plugin name."""


class NodeInstaller(WorkerPlugin):
    """Installs the node plugin on a worker that has none (a bad ``rqml.node`` value makes
    the worker's plugin setup fail, as Dask reports a failing plugin, naming the key)."""

    name = INSTALLER_NAME
    idempotent = True

    async def setup(self, worker: Worker) -> None:
        module_name, class_name, plugin_name = NODE_PLUGIN
        module = importlib.import_module(module_name)
        if getattr(module, plugin_name) not in worker.plugins:
            await worker.plugin_add(getattr(module, class_name)(), catch_errors=False)
