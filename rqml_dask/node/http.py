"""The node's HTTP endpoints on the worker's own server, and its Prometheus series.

``/queue_stats``, ``/checkpoint_state`` and ``/health`` answer JSON; the RQML series join
Dask's own ``/metrics`` through a collector in ``prometheus_client``'s global registry, the
one Dask's handler serves. ``/health`` replaces Dask's plain ``ok`` (handlers added at run
time are matched before the server's own): it is still 200 while the worker lives, and says
whether the node has its scheduler (``"status": "ok"``) or works without it
(``"degraded"``), with the tasks it holds and its outbox.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from distributed.http.utils import RequestHandler

if TYPE_CHECKING:
    from distributed import Worker

    from rqml_dask.node.plugin import NodePlugin


def node_of(worker: Worker) -> NodePlugin | None:
    from rqml_dask.node.plugin import PLUGIN_NAME

    return worker.plugins.get(PLUGIN_NAME)


class _JSONHandler(RequestHandler):
    def write_json(self, body: object) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(body))

    def node_or_503(self) -> NodePlugin | None:
        node = node_of(self.server)
        if node is None or node.orchestrator is None:
            self.set_status(503)
            self.write_json({"error": "the rqml node plugin is not running on this worker"})
            return None
        return node


class QueueStatsHandler(_JSONHandler):
    def get(self) -> None:
        if node := self.node_or_503():
            self.write_json(node.orchestrator.queue_stats())


class CheckpointStateHandler(_JSONHandler):
    def get(self) -> None:
        if node := self.node_or_503():
            self.write_json(node.checkpoint_state())


class HealthHandler(_JSONHandler):
    def get(self) -> None:
        if node := self.node_or_503():
            self.write_json(node.health())


ROUTES = [
    (r"/queue_stats", QueueStatsHandler),
    (r"/checkpoint_state", CheckpointStateHandler),
    (r"/health", HealthHandler),
]


def add_routes(worker: Worker) -> None:
    """Mount the node's endpoints on the worker's HTTP server (once per worker)."""
    if getattr(worker, "_rqml_routes", False) or worker.http_application is None:
        return
    worker.http_application.add_handlers(r".*", [(path, handler, {"dask_server": worker}) for path, handler in ROUTES])
    worker._rqml_routes = True


class NodeCollector:
    """Prometheus collector for the RQML figures of the worker this process runs."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        node = node_of(self.worker)
        if node is None or node.orchestrator is None:
            return
        figures = node.orchestrator.heartbeat()
        depth = GaugeMetricFamily("rqml_queue_depth", "RQML tasks in each of the node's queues", labels=["queue"])
        for queue in ("inbound", "refining", "outbound"):
            depth.add_metric([queue], figures[queue])
        yield depth
        for name, key, help_text in (
            ("rqml_iterations", "iterations_total", "Refinement iterations run on this node"),
            ("rqml_escalations", "escalations_total", "Model escalations of tasks finished on this node"),
            ("rqml_validation_failures", "validation_failures", "Results that failed validation on this node"),
            ("rqml_tasks_completed", "tasks_completed", "RQML tasks finished on this node"),
        ):
            yield CounterMetricFamily(name, help_text, value=figures[key])
        yield GaugeMetricFamily("rqml_concurrency_limit", "Tasks the refinement queue may interleave", value=figures["concurrency_limit"])
        yield GaugeMetricFamily("rqml_busy_fraction", "Fraction of the last window spent refining", value=figures["busy_fraction"])
        yield GaugeMetricFamily("rqml_iterations_per_second", "Iterations per second over the last window", value=figures["iterations_per_second"])
        checkpoints = node.checkpoint_summary()
        yield GaugeMetricFamily("rqml_checkpoint_lag_seconds", "Age of the oldest checkpoint not yet stored", value=checkpoints["lag_seconds"])
        yield GaugeMetricFamily("rqml_checkpoint_pending", "Checkpoints waiting to be written or replicated", value=checkpoints["pending"])
        yield CounterMetricFamily("rqml_checkpoints_written", "Checkpoints written to the node's store", value=checkpoints["written"])
        link = node.health()
        yield GaugeMetricFamily("rqml_degraded", "1 while the node works without its scheduler", value=int(link["status"] == "degraded"))
        yield GaugeMetricFamily("rqml_outbox", "Finished results waiting for a scheduler's verdict", value=link["outbox"])
        yield CounterMetricFamily("rqml_scheduler_losses", "Times the node lost its scheduler", value=link["scheduler_losses"])


_collector: NodeCollector | None = None


def register_collector(worker: Worker) -> None:
    """Add :class:`NodeCollector` to the global registry once per process (Dask's way)."""
    global _collector
    try:
        import prometheus_client
    except ImportError:
        return
    if _collector is None:
        _collector = NodeCollector(worker)
        prometheus_client.REGISTRY.register(_collector)
    _collector.worker = worker
