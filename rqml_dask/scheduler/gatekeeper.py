"""Who may join the cluster and call the RQML handlers, and the nodes shut out.

Over a transport that authenticates its peers (``pqtls://``, :mod:`rqml_dask.trust`), each
comm carries the peer certificate's name and role; identity comes from there, never from a
field of a message. The scheduler plugin wraps Dask's ``register-worker`` with
:func:`guard_registration` (only a ``node`` certificate, whose name is the worker's
``--name``, and not one in quarantine), each RQML handler with :func:`only_roles` (roles,
and a rate per peer, :data:`HANDLER_RATES`: a call over it also loses its connection), Dask's own handlers with
:meth:`Gatekeeper.guard_doors` (:mod:`rqml_dask.scheduler.doors`), and every heartbeat asks
:meth:`Gatekeeper.invalid_peers` which connected nodes' certificates stopped being valid
(revoked, expired) so that it quarantines them, and :meth:`Gatekeeper.sweep` ends every
other connection whose certificate did (clients' included). A refused call is answered with
a ``PermissionError`` and logged in one line (at most one a window per peer and handler). Over ``tcp://`` nothing here applies: there is no identity to check.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from distributed import Scheduler
from distributed.comm.addressing import get_address_host
from distributed.core import Status, error_message

from rqml_dask import events
from rqml_dask.compat import open_comms
from rqml_dask.config import admin_names
from rqml_dask.scheduler.rate_limits import Rate, RateLimits, Throttle
from rqml_dask.trust.ca import revoked_serials
from rqml_dask.trust.transport import Credentials, HandshakeRefusal, TrustConfigError
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


def _give_back_freed_memory() -> None:
    """``malloc_trim(0)``: glibc returns the free pages of its heaps to the system (a no-op
    without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


HANDLER_RATES: dict[str, Rate] = {
    "rqml_reconcile": Rate(20, 2),
    "rqml_policy": Rate(10, 1),
    "rqml_decide": Rate(50, 10),
    "rqml_status": Rate(50, 20),
    "rqml_quarantine": Rate(10, 1),
    "rqml_session": Rate(10, 1),
    "rqml_result": Rate(500, 200),
}
"""How often each peer (by certificate name) may call each RQML handler: a burst, then a
steady rate (operators' calls are rare, a node presents one result per task it ends)."""
REFUSALS_LOGGED_EVERY = 10.0
"""Seconds between two log lines about refused calls of one peer to one handler."""
ALERTS_EVERY = 60.0
"""Seconds between two alerts of one kind about one peer (refused handshakes, refused calls)."""


def only_roles(handler: Callable[..., Any], roles: frozenset[str], name: str, gatekeeper: Gatekeeper) -> Callable[..., Awaitable[Any]]:
    """``handler``, refusing (:meth:`Gatekeeper.refuse`) a peer whose certificate role is
    not in ``roles``, or that calls it more often than :data:`HANDLER_RATES` allows."""

    async def guarded(comm: Any = None, **kwargs: Any) -> Any:
        peer = identity(comm)
        if peer is not None:
            if peer["role"] not in roles:
                return await gatekeeper.refuse(comm, name, f"the certificate of {peer['name']} has role {peer['role']}; "
                                                           f"only {', '.join(sorted(roles))} may call it")
            if not gatekeeper.limits.allow(str(peer["name"]), name, time.monotonic()):
                return await gatekeeper.refuse(comm, name, f"{peer['name']} calls it more often than "
                                                           f"{gatekeeper.limits.rates[name]} allows", close=True)
        result = handler(comm=comm, **kwargs)
        return await result if isinstance(result, Awaitable) else result

    return guarded


@dataclass
class Gatekeeper:
    """The quarantine, by node name (a name stays out when its process registers again), and
    who may open which door."""

    quarantined: dict[str, str] = field(default_factory=dict)
    sessions: dict[str, x509.Certificate] = field(default_factory=dict)
    """The latest session certificate issued to each node name (``rqml_session``)."""
    admins: frozenset[str] = field(default_factory=admin_names)
    """Client certificate names with the admin role (``rqml.trust.admin-names``)."""
    limits: RateLimits = field(default_factory=lambda: RateLimits(HANDLER_RATES))
    logged: Throttle = field(default_factory=lambda: Throttle(REFUSALS_LOGGED_EVERY))
    alerted: Throttle = field(default_factory=lambda: Throttle(ALERTS_EVERY))
    cut: set[int] = field(default_factory=set)
    """Serials of the certificates whose connections :meth:`cut_off` ended (alerted once each)."""
    shed: int = 0
    """Connections closed by :meth:`refuse` since :meth:`sweep` last gave memory back."""
    _shed_at_sweep: int = 0

    def is_admin(self, peer: dict[str, str | None]) -> bool:
        """A scheduler certificate, or a client certificate named in :attr:`admins`."""
        return peer["role"] == "scheduler" or (peer["role"] == "client" and peer["name"] in self.admins)

    async def refuse(self, comm: Any, handler: str, reason: str, answer: Any = None, close: bool = False) -> Status:
        """Answer the call of ``handler`` on ``comm`` with ``answer`` (default: a
        ``PermissionError``, which the caller's ``rpc`` raises) and log one line
        (:data:`REFUSALS_LOGGED_EVERY`: how many more it held back); with ``close``, close
        the connection too, so that a flood of calls leaves none open. What a handler
        returns to Dask for it not to answer again."""
        peer = identity(comm)
        name = str(peer["name"]) if peer is not None else str(getattr(comm, "peer_address", "?"))
        held = self.logged.admit((name, handler), time.monotonic())
        if held is not None:
            logger.warning("refused %s to %s: %s%s", handler, name, reason,
                           f" ({held} more refused calls since the last line)" if held else "")
        try:
            await comm.write(error_message(PermissionError(f"{handler}: {reason}"), status="uncaught-error") if answer is None else answer)
        except OSError:
            close = True
        if close:
            self.shed += 1
            await comm.close()
        return Status.dont_reply

    def security_alert(self, scheduler: Scheduler, kind: str, peer: str, reason: str, **extra: Any) -> None:
        """One ``rqml-alerts`` event of ``kind`` about ``peer`` (and a log line) per
        :data:`ALERTS_EVERY` seconds; the next one says how many were held back (``repeated``)."""
        held = self.alerted.admit((kind, peer), time.monotonic())
        if held is None:
            return
        logger.warning("%s: %s: %s", kind, peer, reason)
        events.publish(scheduler, events.ALERTS, kind, peer=peer, reason=reason, security=True, repeated=held, **extra)

    def guard_doors(self, scheduler: Scheduler) -> None:
        """Put Dask's own handlers and streams behind roles (:mod:`rqml_dask.scheduler.doors`),
        and alert on every handshake the scheduler's ``pqtls://`` listeners refuse."""
        from rqml_dask.scheduler.doors import guard

        guard(scheduler, self)
        for listener in scheduler.listeners:
            if hasattr(listener, "on_refused"):
                listener.on_refused = lambda refusal, scheduler=scheduler: self.handshake_refused(scheduler, refusal)

    def handshake_refused(self, scheduler: Scheduler, refusal: HandshakeRefusal) -> None:
        host = get_address_host(refusal.address)
        peer = f"{refusal.name} ({host})" if refusal.name else host
        self.security_alert(scheduler, "handshake-refused", peer, refusal.reason, address=refusal.address, name=refusal.name)

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
            reason = self._invalid(certificate, name, revoked, now)
            if reason is not None:
                found.append((address, name, reason))
        return found

    def sweep(self, scheduler: Scheduler) -> None:
        """What the scheduler plugin's heartbeat does here: :meth:`cut_off`; and once a flood
        of refused calls is over (connections were shed, none since the last sweep), give the
        memory their connections held back to the system (glibc keeps what it freed)."""
        self.cut_off(scheduler)
        if self.shed and self.shed == self._shed_at_sweep:
            self.shed = 0
            _give_back_freed_memory()
        self._shed_at_sweep = self.shed

    def cut_off(self, scheduler: Scheduler) -> None:
        """End every connection to the scheduler whose certificate stopped being valid
        (revoked, expired: :meth:`invalid_peers` says which), but a registered node's stream
        (the node is quarantined instead): a client's session is removed and its connections
        closed, with one alert per certificate."""
        revoked, now = self.revoked(), dt.datetime.now(dt.timezone.utc)
        workers = {id(getattr(stream.comm, "inner", stream.comm)) for address, stream in scheduler.stream_comms.items()
                   if address in scheduler.workers and stream.comm is not None}
        for comm in open_comms(scheduler):
            certificate = getattr(comm, "peer_certificate", None)
            if certificate is None or id(comm) in workers or comm.closed():
                continue
            name = str(comm.peer_name)
            reason = self._invalid(certificate, name, revoked, now)
            if reason is None:
                continue
            for client, stream in list(scheduler.client_comms.items()):
                if getattr(getattr(stream, "comm", None), "peer_certificate", None) is certificate:
                    scheduler.remove_client(client, stimulus_id=f"rqml-cut-off-{time.time()}")
            comm.abort()
            if certificate.serial_number not in self.cut:
                self.cut.add(certificate.serial_number)
                logger.warning("connection-cut: %s (%s): %s", name, comm.peer_role, reason)
                events.publish(scheduler, events.ALERTS, "connection-cut", peer=name, role=comm.peer_role, reason=reason,
                               address=comm.peer_address, security=True)

    def _invalid(self, certificate: x509.Certificate, name: str, revoked: frozenset[int], now: dt.datetime) -> str | None:
        """Why a connection opened with ``certificate`` may not go on (``None``: it may)."""
        if certificate.serial_number in revoked:
            return "its certificate was revoked"
        if certificate.not_valid_after_utc <= now and not self.renewed(name, revoked, now):
            return f"its certificate expired at {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        return None

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
