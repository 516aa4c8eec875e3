"""Safe by default: which doors of a scheduler or a node other hosts may reach.

* A Dask scheduler with the RQML preload, and a node, listen beyond loopback (127.0.0.0/8,
  ``::1``) only over ``pqtls://``, or where ``rqml.trust.allow-insecure`` is true: over
  ``tcp://`` anyone who reaches the scheduler's port runs code on the scheduler and every
  worker, sets the supervision policy and forges results, and anyone who reaches a node's,
  runs code there and replaces its results. :func:`check_listeners` refuses such an address (:class:`ExposureError`)
  and says loudly when one is allowed (:func:`insecure_warning`). ``dask scheduler`` is
  checked before it listens (:func:`dask_scheduler_command_addresses`, read while the preload
  is imported); a scheduler built in Python, after (its preload's ``dask_setup`` then fails it);
  a node as its preload starts, after it listens and before it registers.
* Dashboards and node HTTP endpoints (plain HTTP, no identity) listen on 127.0.0.1 unless
  ``rqml.trust.expose-http`` is true: :func:`confine_http` moves a server Dask bound beyond
  loopback there, at the same port, and says where it really listens (:class:`HTTPDoor`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from distributed.comm.addressing import addresses_from_user_args, parse_address, parse_host_port
from distributed.comm.utils import get_tcp_server_addresses
from tornado.netutil import bind_sockets

from rqml_dask.config import ConfigError, ExposureSettings

LOOPBACK = "127.0.0.1"
SECURE_SCHEMES = frozenset({"pqtls", "inproc"})
"""Schemes whose listeners are safe beyond loopback: the cluster's authenticated transport,
and in-process queues (no socket)."""


class ExposureError(ConfigError):
    """A scheduler or a node about to listen (or listening) beyond loopback without ``pqtls://`` or
    ``rqml.trust.allow-insecure``; the message names the addresses and the ways out."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or a name) reaches this host only: an address of
    127.0.0.0/8 or ``::1``, or a name all of whose addresses are. ``""``, ``0.0.0.0`` and
    ``::`` (every interface) are not, nor is a name that does not resolve."""
    host = host.strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in found)


def exposed(addresses: Iterable[str]) -> list[str]:
    """The listen addresses of ``addresses`` (``tcp://10.0.0.5:8786``, ``tcp://:8786``) that
    other hosts reach without ``pqtls://``; an address without a scheme is Dask's default (tcp)."""
    found = []
    for address in addresses:
        scheme, location = parse_address(address or "", strict=False)
        if scheme in SECURE_SCHEMES:
            continue
        host, _ = parse_host_port(location, default_port=0) if location else ("", None)
        if not is_loopback(host):
            shown = address if "://" in (address or "") else f"{scheme}://{location}"
            found.append(shown + (" (every interface)" if host in ("", "0.0.0.0", "::") else ""))
    return found


RISKS = {
    "scheduler": "runs code on the scheduler and every worker, sets the supervision policy and forges results",
    "node": "runs code on this node, reads its results and replaces them",
}
"""What anyone who reaches a server's port over ``tcp://`` can do, by the server's kind."""


def check_listeners(addresses: Iterable[str], settings: ExposureSettings, kind: str = "scheduler") -> list[str]:
    """The addresses of ``addresses`` reachable beyond loopback without ``pqtls://`` (none
    but where ``settings.allow_insecure``: the insecure mode in use); raises
    :class:`ExposureError` for them otherwise, saying what that would let anyone do to a
    server of ``kind`` (:data:`RISKS`)."""
    found = exposed(addresses)
    if found and not settings.allow_insecure:
        raise ExposureError(
            f"rqml {kind}: refusing to listen on {', '.join(found)} without pqtls://: anyone who reaches that port "
            f"{RISKS[kind]}. Listen on loopback (--host 127.0.0.1), use the cluster's CA (pqtls://, README: Trust "
            f"between nodes), or, on a network you trust, set rqml.trust.allow-insecure: true "
            f"(DASK_RQML__TRUST__ALLOW_INSECURE=true)"
        )
    return found


def insecure_warning(addresses: Iterable[str], kind: str = "scheduler") -> str:
    """The loud line a scheduler (or a node, ``kind``) logs, and ``rqml status`` prints for a
    scheduler, while it listens on ``addresses`` beyond loopback without ``pqtls://``."""
    return (f"INSECURE: the RQML {kind} listens on {', '.join(addresses)} without pqtls:// "
            f"(rqml.trust.allow-insecure: true): anyone who reaches it {RISKS[kind]}")


def dask_scheduler_command_addresses() -> list[str] | None:
    """Where the ``dask scheduler`` command running this process will listen (its ``--host``,
    ``--interface``, ``--protocol`` and ``--port``), read from its click context while it is
    building its Scheduler (the preload is imported then, before anything listens); ``None``
    in any other process."""
    import click

    context = click.get_current_context(silent=True)
    if context is None or getattr(context.command.callback, "__module__", None) != "distributed.cli.dask_scheduler":
        return None
    params = context.params

    def listed(value: str | None) -> str | list[str] | None:
        return value.split(",") if value and "," in value else value

    protocol, interface, port = (listed(params.get(name)) for name in ("protocol", "interface", "port"))
    port = [int(p) for p in port] if isinstance(port, list) else int(port) if port else None
    return addresses_from_user_args(host=params.get("host"), port=port, interface=interface, protocol=protocol,
                                    default_port=8786)


@dataclass(frozen=True)
class HTTPDoor:
    """Where an HTTP server listens (``HOST:PORT`` each), and where Dask had bound it if
    :func:`confine_http` moved it."""

    listening: tuple[str, ...]
    moved_from: tuple[str, ...] = ()

    @property
    def loopback(self) -> bool:
        return all(is_loopback(where.rpartition(":")[0]) for where in self.listening)

    @property
    def level(self) -> int:
        """The level to log :meth:`describe` at: a warning unless it is where Dask said and on loopback."""
        return logging.INFO if self.loopback and not self.moved_from else logging.WARNING

    def describe(self, what: str) -> str:
        where = ", ".join(self.listening)
        if self.moved_from:
            return (f"rqml: {what} listens on {where} only, not on {', '.join(self.moved_from)} where Dask bound it "
                    f"(rqml.trust.expose-http: true leaves it there)")
        if self.loopback:
            return f"rqml: {what} listens on {where} (loopback only)"
        return f"rqml: {what} listens on {where}: plain HTTP beyond loopback (rqml.trust.expose-http: true)"


def _listening(server: Any) -> tuple[str, ...]:
    return tuple(f"{host}:{port}" for host, port, *_ in get_tcp_server_addresses(server))


def confine_http(server: Any, settings: ExposureSettings) -> HTTPDoor:
    """Move ``server`` (a Dask node's HTTP server: a dashboard, a worker's endpoints) to
    127.0.0.1 at the port it has, unless ``settings.expose_http`` or it listens on loopback
    only; returns where it listens now. Tornado has no call to close a server's listening
    sockets and keep it usable (``stop()`` marks it stopped for good), so its sockets are
    swapped here: the connections it has go on."""
    door = HTTPDoor(_listening(server))
    if settings.expose_http or door.loopback:
        return door
    port = server.port
    for fd, sock in list(server._sockets.items()):
        server._handlers.pop(fd)()
        sock.close()
        del server._sockets[fd]
    server.add_sockets(bind_sockets(port, LOOPBACK))
    server.address = LOOPBACK
    return HTTPDoor(_listening(server), door.listening)
