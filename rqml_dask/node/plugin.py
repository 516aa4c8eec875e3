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

import socket
import threading
from pathlib import Path
from typing import Any

from distributed import Worker, WorkerPlugin, get_worker
from distributed.utils import sync

from rqml_dask import events
from rqml_dask.arrays import default_backend
from rqml_dask.node.checkpointer import Checkpointer
from rqml_dask.node.http import add_routes, register_collector
from rqml_dask.node.orchestrator import NodeOrchestrator
from rqml_dask.node.policy import DECISION, POLICY, NodePolicy
from rqml_dask.node.resources import ResourceMonitor
from rqml_dask.stores import LMDBStore, open_store
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.task import CheckpointSettings

PLUGIN_NAME = "rqml-node"


class NodePlugin(WorkerPlugin):
    """Runs a :class:`NodeOrchestrator` on its worker. ``policy`` is the initial policy;
    a policy the node saved earlier, or one the scheduler sends, takes precedence."""

    name = PLUGIN_NAME

    def __init__(self, policy: NodePolicy | None = None) -> None:
        self.policy = policy
        self.orchestrator: NodeOrchestrator | None = None
        self.worker: Worker | None = None
        self.checkpointers: dict[tuple, Checkpointer] = {}
        self._checkpointers_lock = threading.Lock()

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        backend = default_backend(cpu_threads=worker.state.nthreads)
        resources = ResourceMonitor(worker.memory_manager.memory_limit)
        self.orchestrator = NodeOrchestrator(
            backend, Path(worker.local_directory) / "rqml", resources, self.policy, on_event=self._supervision_event
        )
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
        for checkpointer in self.checkpointers.values():
            checkpointer.flush(timeout=10)
            checkpointer.stop()

    def checkpointer_for(self, settings: CheckpointSettings) -> Checkpointer:
        """The node's writer for ``settings``' stores (one per distinct set, made on first use)."""
        local = settings.local.replace("{host}", socket.gethostname())
        key = (local, settings.shared, settings.artifacts)
        with self._checkpointers_lock:
            checkpointer = self.checkpointers.get(key)
            if checkpointer is None:
                local_store = open_store(local)
                if not isinstance(local_store, LMDBStore):
                    raise ValueError(f"checkpoint.local must be an lmdb:// URL, not {settings.local!r}")
                shared = open_store(settings.shared) if settings.shared else None
                checkpointer = Checkpointer(local_store, shared, ArtifactStore(settings.artifacts), self.worker.address, self._alert)
                self.checkpointers[key] = checkpointer
            return checkpointer

    def _alert(self, kind: str, payload: dict[str, Any]) -> None:
        events.publish(self.worker, events.ALERTS, kind, worker=self.worker.address, **payload)

    def _supervision_event(self, event: dict[str, Any]) -> None:
        payload = dict(event)
        events.publish(self.worker, events.SUPERVISION, payload.pop("kind"), worker=self.worker.address, **payload)

    def heartbeat(self, worker: Worker) -> dict[str, Any]:
        """The custom worker metric ``rqml`` (Dask calls it with the worker every heartbeat)."""
        figures = self.orchestrator.heartbeat()
        figures["bandwidth"] = worker.bandwidth
        figures["checkpoints"] = self.checkpoint_summary()
        return figures

    def checkpoint_state(self) -> dict[str, Any]:
        """Per task on this node: its iteration, its newest checkpoint (iteration, age, where
        stored) and the writes still waiting."""
        tasks: dict[str, dict[str, Any]] = {
            key: {"iteration": iteration} for key, iteration in self.orchestrator.iterations().items()
        }
        for checkpointer in list(self.checkpointers.values()):
            for key, state in checkpointer.state().items():
                tasks.setdefault(key, {"iteration": None}).update(state)
        return {"tasks": tasks, **self.checkpoint_summary()}

    def checkpoint_summary(self) -> dict[str, float]:
        summaries = [c.summary() for c in list(self.checkpointers.values())]
        return {
            "pending": sum(s["pending"] for s in summaries),
            "lag_seconds": max((s["lag_seconds"] for s in summaries), default=0.0),
            "written": sum(s["written"] for s in summaries),
        }

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
