"""Roles on Dask's own scheduler handlers and streams (``pqtls://``).

Dask's scheduler answers anyone who connects on every handler it has; among them
``run_function`` (``Client.run_on_scheduler``), ``broadcast`` (``Client.run``),
``register_scheduler_plugin`` and ``restart`` run code or change the cluster. Over a
transport that authenticates its peers, :func:`guard` puts each handler behind the roles of
the peer's certificate (never a field of the message):

* **admin** (a ``scheduler`` certificate, or a ``client`` certificate named in
  ``rqml.trust.admin-names``) may call every handler;
* **client** may open a client session (``register-client``) and call what a Dask client
  needs to submit, follow and fetch work (:data:`CLIENT`), log events outside the RQML
  topics, and register a worker plugin named ``rqml-plugin-*`` (what
  :func:`~rqml_dask.pipeline.plugins.ship_plugins` ships: a pipeline's model files);
* **node** may register a worker (:meth:`~rqml_dask.scheduler.gatekeeper.Gatekeeper.guard_registration`
  refuses any other certificate) and a nanny and call what a worker needs (:data:`NODE`),
  each only about the worker registered under its certificate's name (:data:`OWN_WORKER`);
* no role: every other handler (:data:`CLIENT` and :data:`NODE` are allow-lists, so a
  handler Dask adds later is an admin's until it is listed).

A session's stream is filtered as well: on a client's, only the ops of a client
(:data:`CLIENT_STREAM`), speaking for itself; on a node's, only those of a worker
(:data:`WORKER_STREAM`). A refused call gets a ``PermissionError`` and one log line
(:meth:`~rqml_dask.scheduler.gatekeeper.Gatekeeper.refuse`); a refused stream message is
dropped, with one alert a minute per peer. Over ``tcp://`` nothing here applies.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from distributed import Scheduler

from rqml_dask.compat import handler_signature, takes_comm
from rqml_dask.scheduler.gatekeeper import HANDLER_ROLES, Gatekeeper
from rqml_dask.trust.transport import peer_identity as identity

ANYONE = frozenset({"identity"})
"""What every authenticated peer may call (Dask's clients, workers and nannies start with it)."""
CLIENT = frozenset({
    "register-client", "versions", "gather", "scatter", "update_data", "who_has", "has_what", "ncores", "ncores_running",
    "nbytes", "processing", "retry", "rebalance", "replicate", "events", "log_event", "get_metadata", "set_metadata",
    "subscribe_worker_status", "adaptive_target", "workers_to_close", "get_task_status", "get_task_stream",
    "get_task_stream_index", "get_task_prefix_states", "get_story", "get_runspec", "get_error_cause", "profile",
    "call_stack", "performance_report", "get_logs", "logs", "worker_logs", "start_task_metadata", "stop_task_metadata",
    "memory_sampler_start", "memory_sampler_stop", "register_worker_plugin",
    "publish_put", "publish_get", "publish_delete", "publish_list", "variable_set", "variable_get",
    "queue_create", "queue_put", "queue_get", "queue_qsize", "event_set", "event_clear", "event_wait", "event_is_set",
    "semaphore_register", "semaphore_acquire", "semaphore_release", "semaphore_refresh_leases", "semaphore_value",
    "semaphore_close", "multi_lock_acquire", "multi_lock_release",
})
"""Dask's handlers a client certificate may call (a client's session and what it asks of the
scheduler; not: run code, add plugins other than a pipeline's, restart, retire or close)."""
NODE = frozenset({
    "register-worker", "register_nanny", "unregister", "heartbeat_worker", "set_resources", "add_keys", "retire_workers",
    "who_has", "log_event", "shuffle_barrier", "shuffle_get", "shuffle_get_or_create", "shuffle_restrict_task",
})
"""Dask's handlers a node certificate may call (a worker's and a nanny's)."""
OWN_WORKER: dict[str, str] = {
    "unregister": "address", "heartbeat_worker": "address", "set_resources": "worker", "add_keys": "worker",
    "retire_workers": "workers",
}
"""For a node: the argument naming the worker(s) a call is about, which must be its own."""
PIPELINE_PLUGINS = "rqml-plugin-"
"""The worker plugins a client may register: a pipeline's model files."""
RQML_TOPICS = "rqml"
"""Event topics only the scheduler and its nodes' streams write (alerts among them)."""
CLIENT_STREAM = frozenset({
    "update-graph", "client-desires-keys", "update-data", "report-key", "client-releases-keys", "heartbeat-client",
    "close-client", "subscribe-topic", "unsubscribe-topic", "cancel-keys", "publish_flush_batched_send",
    "queue-future-release", "queue_release", "variable-future-received-confirm", "variable_delete", "close-stream",
})
"""The stream messages of a client's session."""
WORKER_STREAM = frozenset({
    "task-finished", "task-erred", "release-worker-data", "add-keys", "long-running", "reschedule", "keep-alive",
    "log-event", "worker-status-change", "request-refresh-who-has", "steal-response", "close-stream",
})
"""The stream messages of a registered worker."""


def guard(scheduler: Scheduler, gatekeeper: Gatekeeper) -> None:
    """Wrap every handler of ``scheduler`` but the RQML ones (guarded by
    :func:`~rqml_dask.scheduler.gatekeeper.only_roles`) in :func:`door`."""
    for name, handler in list(scheduler.handlers.items()):
        if name not in HANDLER_ROLES:
            scheduler.handlers[name] = door(scheduler, gatekeeper, name, handler)


def refusal(scheduler: Scheduler, gatekeeper: Gatekeeper, name: str, peer: dict[str, str | None], message: dict[str, Any]) -> str | None:
    """Why ``peer`` may not call the handler ``name`` with ``message`` (``None``: it may)."""
    role, who = peer["role"], peer["name"]
    if gatekeeper.is_admin(peer) or name in ANYONE or name == "register-worker":  # its own guard says why, as Dask's error
        return None
    if role == "client" and name in CLIENT:
        if name == "register_worker_plugin" and not str(message.get("name")).startswith(PIPELINE_PLUGINS):
            return (f"a client registers only a pipeline's plugins ({PIPELINE_PLUGINS}*), not {message.get('name')!r}; "
                    "other plugins need an admin certificate (rqml.trust.admin-names)")
        return _rqml_topic(name, message)
    if role == "node" and name in NODE:
        if name in OWN_WORKER:
            named = message.get(OWN_WORKER[name])
            addresses = named if isinstance(named, list) else [named]
            others = [a for a in addresses if a is None or str(getattr(scheduler.workers.get(a), "name", who)) != who]
            if others:
                return f"node {who} may call it about its own worker only, not {others}"
        return _rqml_topic(name, message)
    if name == "register-client":
        return f"the certificate of {who} has role {role}: only a client certificate opens a client session"
    return (f"the certificate of {who} has role {role}, which may not call it"
            f"{'' if role != 'client' else ' (code execution and cluster changes need rqml.trust.admin-names)'}")


def _rqml_topic(name: str, message: dict[str, Any]) -> str | None:
    topics = message.get("topic")
    topics = [topics] if isinstance(topics, str) else list(topics or [])
    if name == "log_event" and any(str(t).startswith(RQML_TOPICS) for t in topics):
        return f"only the scheduler and its nodes' streams write the {RQML_TOPICS} event topics"
    return None


def door(scheduler: Scheduler, gatekeeper: Gatekeeper, name: str, handler: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """``handler`` behind :func:`refusal`; a session it opens (``register-client``,
    ``register-worker``) gets a :class:`FilteredStream` of its peer's role."""
    comm_first = takes_comm(handler)

    async def guarded(comm: Any = None, **message: Any) -> Any:
        peer = identity(comm)
        if peer is not None:
            reason = refusal(scheduler, gatekeeper, name, peer, message)
            if reason is not None:  # a client that asked for a session reads why as Dask's own error
                if name == "register-client":
                    return await gatekeeper.refuse(comm, name, reason, [{"op": "stream-start", "error": f"{name}: {reason}"}], close=True)
                return await gatekeeper.refuse(comm, name, reason)
            if name == "register-client":
                comm = FilteredStream(comm, CLIENT_STREAM, "client", str(message.get("client")), scheduler, gatekeeper)
            elif name == "register-worker" and peer["role"] == "node":
                comm = FilteredStream(comm, WORKER_STREAM, "worker", None, scheduler, gatekeeper)
        result = handler(comm, **message) if comm_first else handler(**message)
        return await result if inspect.isawaitable(result) else result

    handler_signature(guarded, handler)
    return guarded


class FilteredStream:
    """A session's comm whose reads keep only the stream messages its role sends: ops in
    ``ops``, naming no other ``client`` than ``own`` (a client's) and no ``worker`` or
    ``client`` at all (a worker's: Dask adds its address). Everything else is the comm's."""

    def __init__(self, inner: Any, ops: frozenset[str], kind: str, own: str | None, scheduler: Scheduler, gatekeeper: Gatekeeper) -> None:
        self.inner, self.ops, self.kind, self.own = inner, ops, kind, own
        self._scheduler, self._gatekeeper = scheduler, gatekeeper

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read(self, deserializers: Any = None) -> Any:
        messages = await self.inner.read(deserializers)
        batch = messages if isinstance(messages, (list, tuple)) else [messages]
        kept = [m for m in batch if self._allowed(m)]
        if len(kept) < len(batch):
            dropped = sorted({str(m.get("op")) if isinstance(m, dict) else type(m).__name__ for m in batch if not self._allowed(m)})
            self._gatekeeper.security_alert(self._scheduler, "stream-message-refused", str(self.inner.peer_name),
                                            f"a {self.kind} session may not send {', '.join(dropped)}: dropped")
        return kept

    def _allowed(self, message: Any) -> bool:
        if not isinstance(message, dict) or message.get("op") not in self.ops:
            return False
        if self.kind == "worker":
            return "worker" not in message and "client" not in message
        return "worker" not in message and message.get("client", self.own) == self.own
