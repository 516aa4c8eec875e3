"""The event bus: the seed's messaging channels as Dask event topics.

Nodes and the scheduler plugin publish structured, msgpack-serialisable payloads with
:func:`publish` (``Worker.log_event``/``Scheduler.log_event``); a client follows them with
``client.subscribe_topic(topic, handler)`` (``rqml events`` prints them live). Dask keeps the
last ``distributed.admin.low-level-log-length`` events per topic: the bus is for watching,
durable state lives in the stores.

Every payload has ``kind`` (what happened) and ``time`` (Unix seconds); major events (model
divergence, novel findings, consistency anomalies, performance spikes, security flags) go
to ``alerts`` with their kind.
"""

from __future__ import annotations

import time
from typing import Any

TASK_INBOUND = "rqml-task_inbound"
TASK_RESULTS = "rqml-task_results"
METRICS = "rqml-metrics"
HEARTBEATS = "rqml-heartbeats"
ALERTS = "rqml-alerts"
SUPERVISION = "rqml-supervision_events"

TOPICS = (TASK_INBOUND, TASK_RESULTS, METRICS, HEARTBEATS, ALERTS, SUPERVISION)


def publish(server: Any, topic: str, kind: str, **payload: Any) -> None:
    """Log ``{kind, time, **payload}`` on ``topic`` through a Dask worker or scheduler."""
    server.log_event(topic, {"kind": kind, "time": time.time(), **payload})
