"""Roles on a node's own doors: its worker's handlers and its nanny's (``pqtls://``).

Any authenticated peer can open a connection to a worker or to its nanny. Dask's worker
answers ``run`` (code), ``plugin-add`` (code that stays), ``benchmark_*`` (minutes of disk and
network), ``terminate`` and the rest to whoever asks, and its nanny ``run``, ``plugin_add``,
``restart`` and ``kill``. Here every handler a worker has when :func:`guard` runs answers the
scheduler's certificate only, but for what peers need of a worker directly
(:data:`ANY_PEER`: fetch and send data, call an actor) and what other nodes need
(:data:`NODE_PEER`: a P2P shuffle's transfers); a client reaches the rest through the
scheduler, which lets only an admin run code (:mod:`rqml_dask.scheduler.doors`). A nanny
(:func:`guard_nanny`, by ``--preload-nanny rqml_dask.node``) answers the scheduler, and its
own worker's ``close_gracefully``. A refused call gets a
``PermissionError`` and one log line. Over ``tcp://`` nothing here applies: there is no
identity to check.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from distributed import Nanny, Worker
from distributed.core import error_message

from rqml_dask.compat import handler_signature, takes_comm
from rqml_dask.trust.transport import peer_identity

logger = logging.getLogger(__name__)

ANY_PEER = frozenset({"identity", "ping", "get_data", "update_data", "actor_execute", "actor_attribute"})
"""The worker's handlers any authenticated peer may call: a client's direct gather and
scatter (``update_data`` refuses RQML keys, :mod:`rqml_dask.key_guard`), a node fetching a
dependency, an actor's handle."""
NODE_PEER = frozenset({"shuffle_receive", "shuffle_inputs_done"})
"""The worker's handlers another node may call as well (a P2P shuffle sends between workers)."""
NANNY_GUARDED = "RQML_NANNY_DOORS"
"""The environment variable a guarded nanny sets for the worker it starts (:func:`check_nanny`)."""
NANNY_OWN_WORKER = frozenset({"close_gracefully"})
"""The nanny's handlers its own worker (a node certificate of the nanny's name) may call."""


def guard(worker: Worker) -> None:
    """Put every handler ``worker`` has now behind the scheduler's certificate, but
    :data:`ANY_PEER` (anyone) and :data:`NODE_PEER` (nodes too)."""
    for name, handler in list(worker.handlers.items()):
        if name not in ANY_PEER:
            roles = ("scheduler", "node") if name in NODE_PEER else ("scheduler",)
            worker.handlers[name] = _only(handler, name, lambda peer, roles=roles: peer["role"] in roles,
                                          "only the scheduler may call it" if len(roles) == 1 else "only the scheduler and nodes may call it")


def guard_nanny(nanny: Nanny) -> None:
    """Put every handler of ``nanny`` behind the scheduler's certificate, but
    :data:`NANNY_OWN_WORKER`, which its own worker may call too; tell the worker processes it
    starts so (:data:`NANNY_GUARDED` in their environment)."""
    nanny.env[NANNY_GUARDED] = "1"
    own = str(nanny.name)
    for name, handler in list(nanny.handlers.items()):
        if name in NANNY_OWN_WORKER:
            allowed = lambda peer: peer["role"] == "scheduler" or (peer["role"] == "node" and peer["name"] == own)  # noqa: E731
            rule = f"only the scheduler and node {own}'s own worker may call it"
        else:
            allowed, rule = (lambda peer: peer["role"] == "scheduler"), "only the scheduler may call it"
        nanny.handlers[name] = _only(handler, f"nanny {name}", allowed, rule)


class OpenNanny(RuntimeError):
    """A node's nanny answers any certificate of the CA (it was started without the node preload)."""


def check_nanny(worker: Worker) -> None:
    """Raise :class:`OpenNanny` if ``worker`` runs under a nanny whose doors are open: one
    started without the node preload, so that any certificate of the CA may ``run`` code in
    it. (The worker cannot ask its nanny: a nanny answers no call until its worker started.
    The check is against an operator's slip, not against the node's own operator, who may
    set the variable by hand.)"""
    if worker.nanny is not None and os.environ.get(NANNY_GUARDED) != "1":
        raise OpenNanny(
            f"the nanny of node {worker.name} ({worker.nanny}) runs without the node's doors, so any certificate of the CA "
            "could run code in it: start it with `--preload-nanny rqml_dask.node` (configs/pqtls.yaml sets "
            "distributed.nanny.preload) or run the worker with --no-nanny")


def _only(handler: Callable[..., Any], name: str, allowed: Callable[[dict[str, Any]], bool], rule: str) -> Callable[..., Awaitable[Any]]:
    """``handler``, answering only peers for whom ``allowed(identity)`` holds (any peer over tcp)."""
    comm_first = takes_comm(handler)

    async def guarded(comm: Any = None, **message: Any) -> Any:
        peer = peer_identity(comm)
        if peer is not None and not allowed(peer):
            reason = f"{name}: the certificate of {peer['name']} has role {peer['role']}; {rule}"
            logger.warning("refused %s", reason)
            return error_message(PermissionError(reason), status="uncaught-error")
        result = handler(comm, **message) if comm_first else handler(**message)
        return await result if inspect.isawaitable(result) else result

    handler_signature(guarded, handler)
    return guarded
