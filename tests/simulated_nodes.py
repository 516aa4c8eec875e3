"""Simulated RQML nodes, for the scheduler plugin at scale: no worker process, Dask's own protocol.

Every node registers with a real, in-process ``Scheduler`` over a real comm (Dask's
``register-worker``: the scheduler's ``add_worker`` and every plugin's ``add_worker`` hook
run), keeps that comm as its batched stream (the scheduler sends ``compute-task`` on it; the
node reports ``task-finished`` on it), answers on an address of its own the handlers the
RQML scheduler plugin calls on nodes, and sends heartbeats to the scheduler's
``heartbeat_worker`` handler carrying the figures a node advertises (the ``rqml`` metric).
All nodes share one comm server (one listener per node) and one connection pool.
"""

from __future__ import annotations

import asyncio
import pickle
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import Scheduler
from distributed.comm import Comm, connect
from distributed.core import ConnectionPool, Server
from distributed.versions import get_versions
from dask.typing import Key

from rqml_dask.messages import POLICY_OP


def figures(**overrides: Any) -> dict[str, Any]:
    """An idle node's ``rqml`` metric (as :meth:`rqml_dask.node.NodePlugin.heartbeat` sends
    it, figures the scheduler does not read included), with ``overrides``."""
    return {"inbound": 0, "refining": 0, "outbound": 0, "concurrency_limit": 1, "busy_fraction": 0.0, "iterations_per_second": 0.0,
            "iterations_total": 0, "escalations_total": 0, "tasks_completed": 0, "warm_models": [], "policy_version": 1, "backend": "numpy",
            "progress": {}, "host_memory_fraction": 0.1, "system_memory_fraction": 0.2, "gpu_count": 0, "gpus": [],
            "device_memory_fraction": None, "bandwidth": 1e8, "checkpoints": {"pending": 0, "lag_seconds": 0.0, "written": 0},
            "link": {"status": "ok", "scheduler": "", "scheduler_losses": 0, "degraded_seconds_total": 0.0, "jobs": 0, "outbox": 0,
                     "reconciled": 0, "discarded": 0, "certificate": None},
            **overrides}


def metrics(rqml: dict[str, Any]) -> dict[str, Any]:
    """A worker's heartbeat metrics (what ``Scheduler.heartbeat_worker`` reads) carrying ``rqml``."""
    return {"bandwidth": {"total": 1e8, "workers": {}, "types": {}}, "digests_total_since_heartbeat": {}, "memory": 2**27,
            "managed_bytes": 0, "spilled_bytes": {"memory": 0, "disk": 0}, "task_counts": {}, "transfer": {}, "cpu": 0.0,
            "time": time.time(), "num_fds": 0, "rqml": rqml}


def rqml_graph(run: str, cores: list[tuple[tuple[int, int], ...]], model: str = "richardson_lucy") -> tuple[HighLevelGraph, list]:
    """One graph of a task per core in ``cores``, each annotated with its traits as
    :class:`~rqml_dask.pipeline.Pipeline` annotates it (task ids ``RUN/I``), and its keys.
    Each task computes ``int()``: no data."""
    traits = {}
    for i, core in enumerate(cores):
        key = f"{run}/{i}@{i:08x}"
        traits[("rqml", key, "0")] = {"key": key, "task_class": "deconvolution", "model": model, "difficulty": 1.0 + i % 5,
                                      "core": core}  # the key as messages.dask_key makes it
    layer = MaterializedLayer({key: (int, 0) for key in traits}, annotations={"rqml": traits.__getitem__})
    return HighLevelGraph({run: layer}, {run: set()}), list(traits)


@dataclass
class SimulatedNode:
    name: str
    address: str
    """Where it answers the plugin (its own listener)."""
    stream: Comm
    """Its registration comm, kept as its batched stream."""
    running: dict[Key, int] = field(default_factory=dict)
    """The tasks the scheduler sent it (``compute-task``) and not taken back, with their run ids."""


class SimulatedNodes:
    """Simulated nodes of ``scheduler`` (running in this process); ``async with`` closes them."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.nodes: dict[str, SimulatedNode] = {}
        self.policies = 0
        """Policies received on the nodes' streams (the plugin sends its policy to every node that registers)."""
        self.server = Server({"rqml_quarantined": self._ok, "rqml_decide": self._ok, "rqml_progress": self._progress})
        self.pool = ConnectionPool(limit=64)
        self._readers: list[asyncio.Task] = []

    async def __aenter__(self) -> SimulatedNodes:
        await self.pool.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @staticmethod
    def _ok(comm: Comm = None, **kwargs: Any) -> dict[str, str]:
        return {"status": "OK"}

    @staticmethod
    def _progress(comm: Comm = None, keys: list[str] | None = None) -> dict[str, int]:
        return {}

    async def add(self, name: str, rqml: dict[str, Any] | None = None) -> SimulatedNode:
        """Register a node named ``name`` advertising ``rqml`` (default :func:`figures`)."""
        await self.server.listen("tcp://127.0.0.1:0")
        address = self.server.listeners[-1].contact_address
        stream = await connect(self.scheduler.address)
        await stream.write({
            "op": "register-worker", "reply": False, "address": address, "status": "running", "server_id": uuid.uuid4().hex,
            "nthreads": 1, "name": name, "now": time.time(), "resources": {}, "memory_limit": 2**32, "pid": 0, "services": {},
            "local_directory": "/nowhere", "versions": get_versions(), "nanny": None, "extra": {}, "stimulus_id": f"register-{name}",
            "metrics": metrics(figures() if rqml is None else rqml),
        })
        answer = await stream.read()
        if answer.get("status") != "OK":
            raise RuntimeError(f"{name} could not register: {answer}")
        node = self.nodes[address] = SimulatedNode(name, address, stream)
        self._readers.append(asyncio.create_task(self._read(node)))
        return node

    async def _read(self, node: SimulatedNode) -> None:
        """Follow what the scheduler sends ``node`` on its stream."""
        try:
            while True:
                for message in await node.stream.read():
                    if message.get("op") == "compute-task":
                        node.running[message["key"]] = message["run_id"]
                    elif message.get("op") == POLICY_OP:
                        self.policies += 1
                    elif message.get("op") in ("free-keys", "cancel-compute"):
                        for key in message.get("keys", [message.get("key")]):
                            node.running.pop(key, None)
        except Exception:  # the comm closed: the node is gone
            return

    async def heartbeat(self, node: SimulatedNode, rqml: dict[str, Any], over_the_wire: bool = True) -> dict[str, Any]:
        """Send ``node``'s heartbeat to the scheduler's ``heartbeat_worker`` handler: over a comm,
        as a worker does, or (``over_the_wire=False``) handed to the handler in this process."""
        message = {"address": node.address, "now": time.time(), "metrics": metrics(rqml), "executing": {}, "extensions": {}}
        if not over_the_wire:
            return self.scheduler.handlers["heartbeat_worker"](**message)
        return await self.pool(self.scheduler.address).heartbeat_worker(**message)

    async def finish(self, node: SimulatedNode, key: Key) -> None:
        """Report the task ``key`` finished on ``node`` (a result of 8 bytes), as a worker does."""
        run_id = node.running.pop(key)
        now = time.time()
        await node.stream.write([{"op": "task-finished", "key": key, "run_id": run_id, "nbytes": 8, "type": pickle.dumps(int),
                                  "typename": "int", "metadata": {}, "thread": 0, "status": "OK",
                                  "startstops": [{"action": "compute", "start": now, "stop": now}], "stimulus_id": f"finished-{now}"}])

    async def remove(self, node: SimulatedNode) -> None:
        """The node leaves: its stream closes, as when a worker dies."""
        self.nodes.pop(node.address, None)
        await node.stream.close()

    async def close(self) -> None:
        for node in list(self.nodes.values()):
            await self.remove(node)
        for reader in self._readers:
            reader.cancel()
        await self.pool.close()
        self.server.stop()
