"""NodePlugin: the node orchestrator as a Dask WorkerPlugin.

Installed by ``dask worker ... --preload rqml_dask.node`` (also ``dask cuda worker``), by
``Pipeline.submit`` (``client.register_plugin``, idempotent, replayed to restarted and new
workers), or on first use by :func:`current_node`. On setup it starts the orchestrator on the
worker's array backend (CuPy on a GPU worker, else NumPy with one FFT thread per worker
thread), advertises the node's figures on every heartbeat as the custom metric ``rqml``,
mounts ``/queue_stats`` and ``/checkpoint_state`` and the RQML Prometheus series, and takes
supervision messages from the scheduler through worker handlers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from distributed import Worker, WorkerPlugin, get_worker
from distributed.utils import sync

from rqml_dask.arrays import default_backend
from rqml_dask.node.http import add_routes, register_collector
from rqml_dask.node.orchestrator import NodeOrchestrator
from rqml_dask.node.policy import DECISION, POLICY, NodePolicy
from rqml_dask.node.resources import ResourceMonitor

PLUGIN_NAME = "rqml-node"


class NodePlugin(WorkerPlugin):
    """Runs a :class:`NodeOrchestrator` on its worker. ``policy`` is the initial policy;
    a policy the node saved earlier, or one the scheduler sends, takes precedence."""

    name = PLUGIN_NAME

    def __init__(self, policy: NodePolicy | None = None) -> None:
        self.policy = policy
        self.orchestrator: NodeOrchestrator | None = None
        self.worker: Worker | None = None

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        backend = default_backend(cpu_threads=worker.state.nthreads)
        resources = ResourceMonitor(worker.memory_manager.memory_limit)
        self.orchestrator = NodeOrchestrator(backend, Path(worker.local_directory) / "rqml", resources, self.policy)
        self.orchestrator.start()
        worker.metrics["rqml"] = self.heartbeat
        worker.handlers["rqml_decide"] = self._handle_decision
        worker.handlers["rqml_policy"] = self._handle_policy
        add_routes(worker)
        register_collector(worker)

    def teardown(self, worker: Worker) -> None:
        worker.metrics.pop("rqml", None)
        if self.orchestrator is not None:
            self.orchestrator.stop()

    def heartbeat(self, worker: Worker) -> dict[str, Any]:
        """The custom worker metric ``rqml`` (Dask calls it with the worker every heartbeat)."""
        figures = self.orchestrator.heartbeat()
        figures["bandwidth"] = worker.bandwidth
        figures["checkpoints"] = self.checkpoint_summary()
        return figures

    def checkpoint_state(self) -> dict[str, Any]:
        """Per task on this node: its iteration and its latest checkpoint (none kept yet)."""
        now = time.monotonic()
        with self.orchestrator._cond:
            active = [(a.queued.task.task_id, a.refinement.iteration, a.started_at) for a in self.orchestrator.refining]
        return {
            "tasks": {
                task_id: {
                    "iteration": iteration,
                    "refining_for_s": now - started,
                    "last_checkpoint_iteration": None,
                    "last_checkpoint_age_s": None,
                    "stored_in": [],
                    "pending_writes": 0,
                }
                for task_id, iteration, started in active
            }
        }

    def checkpoint_summary(self) -> dict[str, float]:
        return {"pending": 0, "lag_seconds": 0.0}

    def _handle_decision(self, decision: dict) -> dict:
        self.orchestrator.decide(DECISION.validate_python(decision))
        return {"status": "OK"}

    def _handle_policy(self, policy: dict) -> dict:
        self.orchestrator.set_policy(POLICY.validate_python(policy))
        return {"status": "OK"}


_install_lock = threading.Lock()


def current_node() -> NodePlugin:
    """The node plugin of the worker running the calling task, installed if it is missing."""
    worker = get_worker()
    with _install_lock:
        node = worker.plugins.get(PLUGIN_NAME)
        if node is None:
            sync(worker.loop, worker.plugin_add, NodePlugin(), catch_errors=False)
            node = worker.plugins[PLUGIN_NAME]
    return node
