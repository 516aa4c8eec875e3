"""Who may join the cluster and call the RQML handlers, and the nodes shut out.

Over a transport that authenticates its peers (``pqtls://``, :mod:`rqml_dask.trust`), each
comm carries the peer certificate's name and role; identity comes from there, never from a
field of a message. The scheduler plugin wraps Dask's ``register-worker`` with
:func:`guard_registration` (only a ``node`` certificate, whose name is the worker's
``--name``, and not one in quarantine), each RQML handler with :func:`only_roles`, and
asks :meth:`Gatekeeper.invalid_peers` every heartbeat which connected nodes' certificates
stopped being valid (revoked, expired) so that it quarantines them. Over ``tcp://`` nothing
here applies: there is no identity to check.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from distributed import Scheduler

from rqml_dask.trust.ca import revoked_serials
from rqml_dask.trust.transport import Credentials, TrustConfigError
from rqml_dask.trust.transport import peer_identity as identity

logger = logging.getLogger(__name__)

HANDLER_ROLES: dict[str, frozenset[str]] = {
    "rqml_reconcile": frozenset({"node"}),
    "rqml_policy": frozenset({"client", "scheduler"}),
    "rqml_decide": frozenset({"client", "scheduler"}),
    "rqml_status": frozenset({"client", "scheduler", "node"}),
    "rqml_quarantine": frozenset({"client", "scheduler"}),
    "rqml_session": frozenset({"node"}),
    "rqml_result": frozenset({"node"}),
}
"""Which certificate roles may call each RQML scheduler handler (nodes report and reconcile,
clients read the status, set the policy and decide)."""


def only_roles(handler: Callable[..., Any], roles: frozenset[str], name: str) -> Callable[..., Awaitable[Any]]:
    """``handler``, refusing (``PermissionError``, which Dask returns to the caller) a peer
    whose certificate role is not in ``roles``."""

    async def guarded(comm: Any = None, **kwargs: Any) -> Any:
        peer = identity(comm)
        if peer is not None and peer["role"] not in roles:
            raise PermissionError(f"{name}: the certificate of {peer['name']} has role {peer['role']}; "
                                  f"only {', '.join(sorted(roles))} may call it")
        result = handler(comm=comm, **kwargs)
        return await result if isinstance(result, Awaitable) else result

    return guarded


@dataclass
class Gatekeeper:
    """The quarantine, by node name (a name stays out when its process registers again)."""

    quarantined: dict[str, str] = field(default_factory=dict)
    sessions: dict[str, x509.Certificate] = field(default_factory=dict)
    """The latest session certificate issued to each node name (``rqml_session``)."""

    def guard_registration(self, register_worker: Callable[..., Awaitable[Any]],
                           on_refused: Callable[[str, str], None]) -> Callable[..., Awaitable[Any]]:
        """Wrap Dask's ``register-worker``: refuse a peer whose certificate is not a node's,
        whose certificate name is not the worker's ``--name``, or whose name is in
        quarantine, with Dask's registration error (the worker fails to start with it);
        ``on_refused(name, reason)`` is told."""

        async def register(comm: Any = None, **message: Any) -> Any:
            peer = identity(comm)
            if peer is not None:
                reason = self._registration_refusal(peer, str(message.get("name")))
                if reason is not None:
                    on_refused(str(peer["name"]), reason)
                    await comm.write({"status": "error", "time": time.time(), "message": reason})
                    return None
            return await register_worker(comm=comm, **message)

        return register

    def _registration_refusal(self, peer: dict[str, str | None], name: str) -> str | None:
        if peer["role"] != "node":
            return f"the certificate of {peer['name']} has role {peer['role']}: only a node certificate registers a worker"
        if peer["name"] != name:
            return f"the certificate names {peer['name']} but the worker registers as --name {name}"
        if name in self.quarantined:
            return f"node {name} is in quarantine: {self.quarantined[name]}"
        return None

    def invalid_peers(self, scheduler: Scheduler) -> list[tuple[str, str, str]]:
        """``(address, name, reason)`` of every connected node whose certificate is revoked
        (in this process's revocation list, read again when it changes) or expired."""
        revoked = self.revoked()
        now = dt.datetime.now(dt.timezone.utc)
        found = []
        for address, stream in list(scheduler.stream_comms.items()):
            certificate = getattr(getattr(stream, "comm", None), "peer_certificate", None)
            if certificate is None or address not in scheduler.workers:
                continue
            name = str(stream.comm.peer_name)
            if certificate.serial_number in revoked:
                found.append((address, name, "its certificate was revoked"))
            elif certificate.not_valid_after_utc <= now and not self.renewed(name, revoked, now):
                found.append((address, name, f"its certificate expired at {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"))
        return found

    def renewed(self, name: str, revoked: frozenset[int], now: dt.datetime) -> bool:
        """Whether ``name`` holds a session certificate issued here that is still valid (a
        connection opened with an earlier one may go on)."""
        session = self.sessions.get(name)
        return session is not None and session.serial_number not in revoked and now < session.not_valid_after_utc

    def session_refusal(self, name: str, holder: x509.Certificate, registered: set[str]) -> str | None:
        """Why ``name``, authenticated with ``holder``, may not have a session certificate
        (``None``: it may): it must be a registered, unquarantined node whose certificate is
        not revoked and is valid now or was renewed."""
        revoked, now = self.revoked(), dt.datetime.now(dt.timezone.utc)
        if name in self.quarantined:
            return f"node {name} is in quarantine: {self.quarantined[name]}"
        if name not in registered:
            return f"{name} is not a registered node"
        if holder.serial_number in revoked:
            return f"the certificate of {name} was revoked"
        if holder.not_valid_after_utc <= now and not self.renewed(name, revoked, now):
            return f"the certificate of {name} expired at {holder.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        return None

    def revoked(self) -> frozenset[int]:
        """The serials this process's revocation list revokes (none without ``pqtls://`` credentials)."""
        try:
            crl = Credentials.from_config().crl
        except TrustConfigError:
            return frozenset()
        return revoked_serials(crl) if crl is not None else frozenset()
