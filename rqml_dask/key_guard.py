"""Data under an RQML task's Dask key comes only from a node computing that task.

A submission's Dask keys are ``("rqml", task_key, submission)`` with an unguessable
``submission`` (:func:`~rqml_dask.messages.dask_key`), but anyone who may list the
scheduler's tasks sees them once submitted. Dask lets any client put data under any key:
``scatter`` (the scheduler's ``scatter`` handler, or the client's own ``update_data`` call
on workers then on the scheduler), and the scheduler's ``update_data`` marks a key ``memory``
whatever state it was in, a task being computed included. The scheduler plugin and the
node plugin wrap those doors (:func:`refusing_rqml_keys`): a call naming any RQML key is
refused, with one warning line naming the caller, before anything is stored. The client's
signature check (:mod:`rqml_dask.pipeline.verification`) is the last word either way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from distributed.utils import has_keyword

from rqml_dask.trust.transport import peer_identity

logger = logging.getLogger(__name__)


def is_rqml_key(key: Any) -> bool:
    """Whether ``key`` is in the RQML namespace (``("rqml", ...)``)."""
    return isinstance(key, tuple) and len(key) > 0 and key[0] == "rqml"


def refusing_rqml_keys(handler: Callable[..., Any], name: str, keys_of: Callable[[dict[str, Any]], Iterable[Any]],
                       on_refused: Callable[[str, str], None] | None = None) -> Callable[..., Awaitable[Any]]:
    """``handler`` (a Dask handler taking ``comm`` or not), refusing with ``PermissionError``
    (which Dask returns to the caller) any call whose keys (``keys_of(arguments)``) include
    an RQML key; ``on_refused(caller, reason)`` is told (the caller's certificate name, or
    its address where the transport has no identity)."""
    takes_comm = has_keyword(handler, "comm")

    async def guarded(comm: Any = None, **kwargs: Any) -> Any:
        keys = [key for key in keys_of(kwargs) if is_rqml_key(key)]
        if keys:
            peer = peer_identity(comm)
            who = peer["name"] if peer is not None else (getattr(comm, "peer_address", None) or "a caller")
            message = (f"{name}: {who} may not put data under RQML task keys ({len(keys)}, e.g. {keys[0]!r}): only a node "
                       f"computing a task produces its result")
            logger.warning(message)
            if on_refused is not None:
                on_refused(str(who), message)
            raise PermissionError(message)
        result = handler(comm=comm, **kwargs) if takes_comm else handler(**kwargs)
        return await result if isinstance(result, Awaitable) else result

    return guarded
