"""The handlers of a worker that run code or end it, for the scheduler's certificate only.

Any authenticated peer can open a connection to a worker (``pqtls://``); Dask's worker
answers ``run`` and ``run_coroutine`` (code), ``upload_file``, ``plugin-add`` and
``plugin-remove`` (code that stays), ``terminate`` and ``close`` to whoever asks.
:func:`guard` lets only the scheduler's certificate call them: a client reaches them
through the scheduler, which lets only an admin do so (:mod:`rqml_dask.scheduler.doors`).
A refused call gets a ``PermissionError`` and one log line. Over ``tcp://`` nothing here
applies.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from distributed import Worker
from distributed.core import error_message

from rqml_dask.compat import handler_signature, takes_comm
from rqml_dask.trust.transport import peer_identity

logger = logging.getLogger(__name__)

SCHEDULER_ONLY = ("run", "run_coroutine", "upload_file", "plugin-add", "plugin-remove", "terminate", "close")
"""The worker's handlers only the scheduler's certificate may call."""


def guard(worker: Worker) -> None:
    """Put each of :data:`SCHEDULER_ONLY` that ``worker`` has behind the scheduler's certificate."""
    for name in SCHEDULER_ONLY:
        if name in worker.handlers:
            worker.handlers[name] = _scheduler_only(worker.handlers[name], name)


def _scheduler_only(handler: Callable[..., Any], name: str) -> Callable[..., Awaitable[Any]]:
    comm_first = takes_comm(handler)

    async def guarded(comm: Any = None, **message: Any) -> Any:
        peer = peer_identity(comm)
        if peer is not None and peer["role"] != "scheduler":
            reason = f"{name}: the certificate of {peer['name']} has role {peer['role']}; only the scheduler may call it"
            logger.warning("refused %s", reason)
            return error_message(PermissionError(reason), status="uncaught-error")
        result = handler(comm, **message) if comm_first else handler(**message)
        return await result if inspect.isawaitable(result) else result

    handler_signature(guarded, handler)
    return guarded
