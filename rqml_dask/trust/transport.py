"""``pqtls://``: a Dask comm over TLS 1.3 with ML-DSA-65 certificates and X25519MLKEM768.

Python's ``ssl`` (and so Dask's ``tls://``) is linked to an OpenSSL that has neither ML-DSA
nor ML-KEM here; ``cryptography``'s wheels bundle one that has both, and pyOpenSSL runs on
it (``../shared/notes/pqc.md``). This backend drives a pyOpenSSL connection over memory BIOs
on asyncio streams: the TLS is OpenSSL's, the framing is Dask's (``to_frames`` /
``from_frames``), nothing is a protocol of our own. Dask finds it through the entry-point
group ``distributed.comm.backends`` (name ``pqtls``), so ``dask scheduler --protocol pqtls``,
``dask worker pqtls://...`` and ``Client("pqtls://...")`` use it with no patching.

Both ends present a certificate of the cluster's CA (:mod:`rqml_dask.trust.ca`) and verify
the other's: a peer without one, with an expired one, or with a revoked one (the CRL file is
read again whenever it changes) never completes the handshake. The credentials are the
project's own Dask config keys ``rqml.trust.{ca,cert,key,crl}``. Each comm knows its
peer's certificate name and role (``peer_name``, ``peer_role``) and the negotiated group;
what a role may do is the scheduler plugin's to enforce (a client certificate cannot
register a worker). A listener tells its :attr:`PQTLSListener.on_refused` of every
handshake it refuses (:class:`HandshakeRefusal`: who, from where, why); without one it logs
a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import dask.config
from cryptography import x509
from distributed.comm.core import BaseListener, Comm, CommClosedError, Connector, FatalCommClosedError
from distributed.comm.registry import Backend
from distributed.comm.utils import ensure_concrete_host, from_frames, to_frames
from distributed.protocol.utils import pack_frames_prelude, unpack_frames
from distributed.utils import ensure_ip, get_ip
from distributed.comm.addressing import parse_host_port, unparse_host_port
from OpenSSL import SSL, crypto

from rqml_dask.trust.ca import load_crl, name_of, role_of

logger = logging.getLogger(__name__)

SCHEME = "pqtls"
PREFIX = f"{SCHEME}://"
_CHUNK = 1 << 20
_SMALL = 64 << 10
_BUFFER = 8 << 20  # what the socket reader may hold: large reads, few wake-ups
_LENGTH = struct.Struct("!Q")


VERIFY_ERRORS = {
    2: "its issuer is not this cluster's CA",
    7: "its signature does not verify",
    9: "it is not valid yet",
    10: "it has expired",
    18: "it is self-signed",
    19: "it is not of this cluster's CA",
    20: "it is not of this cluster's CA",
    21: "it is not of this cluster's CA",
    23: "it was revoked",
}
"""OpenSSL's certificate verification errors (``X509_V_ERR_*``) that a refused peer
certificate shows, in words."""


@dataclass(frozen=True)
class HandshakeRefusal:
    """A connection a listener refused before any Dask message: the peer's address, the name
    its certificate gives (``None``: it showed none, or the handshake ended before its
    certificate was checked, e.g. because the peer refused ours) and why."""

    address: str
    name: str | None
    reason: str


@dataclass
class _Checked:
    """What verifying one connection's peer certificate found (its ``app_data``)."""

    name: str | None = None
    error: int = 0


def _verify(connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int) -> bool:
    """OpenSSL's verdict, unchanged; the leaf's name and the first error are noted for a refusal."""
    checked = connection.get_app_data()
    if isinstance(checked, _Checked):
        if depth == 0:
            checked.name = name_of(certificate.to_cryptography())
        if not ok and not checked.error:
            checked.error = error
    return bool(ok)


class TrustConfigError(ValueError):
    """The ``rqml.trust`` credentials are missing or unusable."""


@dataclass(frozen=True)
class Credentials:
    """Paths of this process's credentials (``rqml.trust`` in Dask's config)."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None

    @classmethod
    def from_config(cls) -> Credentials:
        settings = dask.config.get("rqml.trust", default={}) or {}
        missing = [k for k in ("ca", "cert", "key") if not settings.get(k)]
        if missing:
            raise TrustConfigError(
                f"pqtls:// needs Dask config rqml.trust.{', rqml.trust.'.join(missing)} (the CA certificate, this "
                "process's certificate and key: `rqml ca issue`)"
            )
        paths = {k: Path(os.path.expanduser(str(settings[k]))) for k in ("ca", "cert", "key")}
        crl = settings.get("crl") or (paths["ca"].parent / "crl.pem")
        crl = Path(os.path.expanduser(str(crl)))
        for key, path in paths.items():
            if not path.is_file():
                made = {"ca": "`rqml ca init CA_DIR` makes CA_DIR/ca.pem",
                        "cert": "`rqml ca issue CA_DIR NAME --role node|scheduler|client` makes CA_DIR/issued/NAME.pem",
                        "key": "`rqml ca issue CA_DIR NAME ...` makes CA_DIR/issued/NAME-key.pem"}[key]
                raise TrustConfigError(f"Dask config rqml.trust.{key}: {path} is not a file ({made}; set rqml.trust.{key} to it)")
        return cls(paths["ca"], paths["cert"], paths["key"], crl if crl.is_file() else None)


_contexts: dict[Credentials, tuple[tuple, SSL.Context]] = {}


def _stamp(credentials: Credentials) -> tuple:
    return tuple(path.stat().st_mtime_ns if path is not None else None
                 for path in (credentials.cert, credentials.key, credentials.crl))


def context(credentials: Credentials) -> SSL.Context:
    """A TLS 1.3-only context presenting ``credentials`` and requiring a peer certificate
    from their CA, not revoked (built again when the certificate, the key or the revocation
    list changes: a renewed certificate, :mod:`rqml_dask.trust.session`)."""
    stamp = _stamp(credentials)
    cached = _contexts.get(credentials)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    try:
        ctx.use_certificate_chain_file(str(credentials.cert))
        ctx.use_privatekey_file(str(credentials.key))
        ctx.check_privatekey()
        ctx.load_verify_locations(str(credentials.ca))
    except SSL.Error as exc:
        if cached is not None:  # caught between a renewal's key and its certificate: the last pair serves
            return cached[1]
        raise TrustConfigError(f"rqml.trust credentials {credentials.cert}, {credentials.key}: {exc}") from None
    if credentials.crl is not None:
        store = ctx.get_cert_store()
        store.add_crl(load_crl(credentials.crl))
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify)
    _contexts[credentials] = (stamp, ctx)
    return ctx


def _reason(exc: SSL.Error) -> str:
    """OpenSSL's reasons, e.g. ``tlsv1 alert unknown ca`` or ``certificate has expired``."""
    reasons = [str(part[-1]) for part in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else []) if part]
    return "; ".join(reasons) or str(exc)


class _Channel:
    """One TLS connection on an asyncio stream pair, driven through memory BIOs."""

    def __init__(self, connection: SSL.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tls, self.reader, self.writer = connection, reader, writer
        self._read_lock, self._write_lock = asyncio.Lock(), asyncio.Lock()

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush()
                await self._feed()
        await self._flush()

    def _pending_out(self) -> None:
        while True:
            try:
                data = self.tls.bio_read(_CHUNK)
            except SSL.WantReadError:
                return
            if not data:
                return
            self.writer.write(data)

    async def _flush(self) -> None:
        self._pending_out()
        await self.writer.drain()

    async def _feed(self) -> None:
        data = await self.reader.read(_CHUNK)
        if not data:
            raise CommClosedError("the peer closed the connection")
        self.tls.bio_write(data)

    async def send(self, parts: list[bytes | memoryview]) -> None:
        """Encrypt and send ``parts`` in order: small ones together in one record, large
        ones a chunk at a time (waiting for the socket between chunks, so a large message
        is never held encrypted in memory whole)."""
        async with self._write_lock:
            small = bytearray()
            for part in parts:
                view = memoryview(part).cast("B")
                if len(view) < _SMALL:
                    small += view
                    continue
                if small:
                    self.tls.sendall(small)
                    small.clear()
                for i in range(0, len(view), _CHUNK):
                    self.tls.sendall(view[i : i + _CHUNK])
                    self._pending_out()
                    await self.writer.drain()
            if small:
                self.tls.sendall(small)
            self._pending_out()
            await self.writer.drain()

    async def receive(self, n: int) -> bytearray:
        """Exactly ``n`` decrypted bytes, decrypted straight into one buffer."""
        buffer = bytearray(n)
        view, filled = memoryview(buffer), 0
        while filled < n:
            try:
                filled += self.tls.recv_into(view[filled:], min(n - filled, _CHUNK))
            except SSL.WantReadError:
                self._pending_out()  # e.g. a key update
                await self._feed()
            except SSL.ZeroReturnError:
                raise CommClosedError("the peer closed the TLS session") from None
        return buffer

    async def read_message(self) -> bytearray:
        async with self._read_lock:
            (length,) = _LENGTH.unpack(await self.receive(_LENGTH.size))
            return await self.receive(length)

    def close(self) -> None:
        try:
            self.tls.shutdown()
            self._pending_out()
        except SSL.Error:
            pass
        self.writer.close()


class PQTLS(Comm):
    """A Dask comm over :class:`_Channel`; ``peer_name``/``peer_role`` come from the peer's
    verified certificate, ``group`` is the negotiated key exchange."""

    def __init__(self, channel: _Channel, local_address: str, peer_address: str, deserialize: bool = True) -> None:
        super().__init__(deserialize=deserialize)
        self._channel: _Channel | None = channel
        self._local_addr, self._peer_addr = local_address, peer_address
        peer = channel.tls.get_peer_certificate()
        certificate = peer.to_cryptography() if peer is not None else None
        self.peer_certificate: x509.Certificate | None = certificate
        self.peer_name = name_of(certificate) if certificate is not None else None
        self.peer_role = role_of(certificate) if certificate is not None else None
        self.group = channel.tls.get_group_name()
        self.cipher = channel.tls.get_cipher_name()

    @property
    def local_address(self) -> str:
        return self._local_addr

    @property
    def peer_address(self) -> str:
        return self._peer_addr

    def extra_info(self) -> dict[str, Any]:
        return {"peer_name": self.peer_name, "peer_role": self.peer_role, "group": self.group, "cipher": self.cipher}

    async def read(self, deserializers=None) -> Any:
        channel = self._channel
        if channel is None:
            raise CommClosedError()
        try:
            payload = await channel.read_message()
        except SSL.Error as exc:  # with TLS 1.3 a peer refusing our certificate says so here
            self.abort()
            raise FatalCommClosedError(f"pqtls session with {self._peer_addr} ended by TLS: {_reason(exc)}") from None
        except (CommClosedError, OSError) as exc:
            self.abort()
            raise CommClosedError(f"{self}: {exc}") from None
        except BaseException:
            self.abort()
            raise
        frames = unpack_frames(memoryview(payload))
        return await from_frames(frames, deserialize=self.deserialize, deserializers=deserializers, allow_offload=self.allow_offload)

    async def write(self, msg, serializers=None, on_error="message") -> int:
        channel = self._channel
        if channel is None:
            raise CommClosedError()
        frames = await to_frames(msg, allow_offload=self.allow_offload, serializers=serializers, on_error=on_error,
                                 context={"sender": self.local_info, "recipient": self.remote_info, **self.handshake_options})
        prelude = pack_frames_prelude(frames)  # the frames go out as they are: no joined copy
        size = len(prelude) + sum(memoryview(frame).nbytes for frame in frames)
        try:
            await channel.send([_LENGTH.pack(size), prelude, *frames])
        except (OSError, SSL.Error) as exc:
            self.abort()
            raise CommClosedError(f"{self}: {exc}") from None
        except BaseException:
            self.abort()
            raise
        return size

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
            try:
                await channel.writer.wait_closed()
            except OSError:
                pass

    def abort(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.writer.transport.abort()

    def closed(self) -> bool:
        """Closed here, or by the peer (asyncio reads in the background: an idle pooled comm
        whose peer went away says so, as Tornado's does for ``tcp://``, and is not reused)."""
        channel = self._channel
        return channel is None or channel.writer.is_closing() or channel.reader.at_eof()


def peer_identity(comm: Any) -> dict[str, str | None] | None:
    """The authenticated peer of ``comm``: its certificate's name and role, and the
    key-exchange group; ``None`` over a transport without certificates (``tcp://``)."""
    if getattr(comm, "peer_certificate", None) is None:
        return None
    return {"name": comm.peer_name, "role": comm.peer_role, "group": comm.group}


def _address(sock_address: tuple) -> str:
    return PREFIX + unparse_host_port(*sock_address[:2])


PRESENTED = "pqtls_credentials"
"""A ``connection_args`` key: the :class:`Credentials` a connection presents, where they are
not the process's ``rqml.trust`` read at the time of connecting. A scheduler sets its own
there (:func:`present_own`): in a process that also holds a client (``rqml run --secure``),
``rqml.trust`` is the client's while the run goes on."""


def present_own(server: Any, credentials: Credentials) -> None:
    """Make ``server``'s outgoing connections (its ``rpc`` pool, and Dask's ``rpc(...,
    connection_args=server.connection_args)``) present ``credentials``."""
    server.connection_args[PRESENTED] = credentials
    server.rpc.connection_args[PRESENTED] = credentials  # the same dict, unless Dask copied it


class PQTLSConnector(Connector):
    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> PQTLS:
        host, port = parse_host_port(address)
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=_BUFFER)
        except OSError as exc:
            raise CommClosedError(f"pqtls connect to {address}: {exc}") from None
        connection = SSL.Connection(context(connection_args.get(PRESENTED) or Credentials.from_config()), None)
        connection.set_connect_state()
        channel = _Channel(connection, reader, writer)
        try:
            await channel.handshake()
        except SSL.Error as exc:
            writer.close()
            raise FatalCommClosedError(f"pqtls handshake with {address} failed: {_reason(exc)}") from None
        except CommClosedError as exc:
            writer.close()
            raise FatalCommClosedError(f"pqtls handshake with {address} failed (the peer refused our certificate?): {exc}") from None
        local = _address(writer.get_extra_info("sockname"))
        return PQTLS(channel, local, PREFIX + unparse_host_port(host, port), deserialize)


async def _refuse(channel: _Channel) -> None:
    """Close a refused connection so that the peer reads why: send OpenSSL's alert, then
    read what the peer sent meanwhile until it hangs up (closing with unread data would
    reset the connection, and the alert with it), for at most a few seconds."""
    with contextlib.suppress(SSL.Error, OSError):
        channel._pending_out()
        await channel.writer.drain()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        async with asyncio.timeout(5):
            while await channel.reader.read(_CHUNK):
                pass
    channel.writer.close()


def _why(checked: _Checked, exc: BaseException) -> str:
    if checked.error:
        return f"its certificate: {VERIFY_ERRORS.get(checked.error, f'verification error {checked.error}')}"
    if isinstance(exc, asyncio.TimeoutError):
        return "no handshake within 30 s"
    if isinstance(exc, SSL.Error):
        return _reason(exc)
    return f"the peer ended the handshake (it refused this listener's certificate?): {exc}"


class PQTLSListener(BaseListener):
    prefix = PREFIX

    def __init__(self, address: str, comm_handler, deserialize: bool = True, allow_offload: bool = True,
                 default_host: str | None = None, default_port: int = 0, **connection_args: Any) -> None:
        super().__init__()
        self.ip, self.port = parse_host_port(address, default_port)
        self.default_host = default_host
        self.comm_handler = comm_handler
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self.server: asyncio.base_events.Server | None = None
        self.credentials = Credentials.from_config()  # this listener's, for its life; refused without them
        self.on_refused: Callable[[HandshakeRefusal], None] | None = None
        """Told of every handshake this listener refuses (instead of a warning in the log)."""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.ip or None, self.port, family=socket.AF_INET,
                                                 reuse_address=True, limit=_BUFFER)

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _address(writer.get_extra_info("peername"))
        connection = SSL.Connection(context(self.credentials), None)
        connection.set_accept_state()
        checked = _Checked()
        connection.set_app_data(checked)
        channel = _Channel(connection, reader, writer)
        try:
            await asyncio.wait_for(channel.handshake(), timeout=30)
        except (SSL.Error, CommClosedError, OSError, asyncio.TimeoutError) as exc:
            self._refused(HandshakeRefusal(peer, checked.name, _why(checked, exc)))
            await _refuse(channel)
            return
        if self.server is None:
            channel.close()
            return
        comm = PQTLS(channel, _address(writer.get_extra_info("sockname")), peer, self.deserialize)
        comm.allow_offload = self.allow_offload
        try:
            await self.on_connection(comm)
        except CommClosedError:
            logger.info("pqtls connection from %s closed before the Dask handshake", peer)
            return
        await self.comm_handler(comm)

    def _refused(self, refusal: HandshakeRefusal) -> None:
        if self.on_refused is None:
            logger.warning("pqtls listener %s: handshake with %s refused: %s", self.listen_address, refusal.address, refusal.reason)
            return
        try:
            self.on_refused(refusal)
        except Exception:
            logger.exception("pqtls listener %s: reporting a refused handshake failed", self.listen_address)

    def get_host_port(self) -> tuple[str, int]:
        if self.server is None:
            raise ValueError("invalid operation on a pqtls listener that is not started")
        return self.server.sockets[0].getsockname()[:2]

    @property
    def listen_address(self) -> str:
        return self.prefix + unparse_host_port(*self.get_host_port())

    @property
    def contact_address(self) -> str:
        host, port = self.get_host_port()
        host = ensure_concrete_host(host, default_host=self.default_host)
        return self.prefix + unparse_host_port(host, port)


class PQTLSBackend(Backend):
    """The ``pqtls`` scheme for Dask (entry point ``distributed.comm.backends``)."""

    def get_connector(self) -> PQTLSConnector:
        return PQTLSConnector()

    def get_listener(self, loc, handle_comm, deserialize, **connection_args) -> PQTLSListener:
        return PQTLSListener(loc, handle_comm, deserialize, **connection_args)

    def get_address_host(self, loc: str) -> str:
        return parse_host_port(loc)[0]

    def get_address_host_port(self, loc: str) -> tuple[str, int]:
        return parse_host_port(loc)

    def resolve_address(self, loc: str) -> str:
        host, port = parse_host_port(loc)
        return unparse_host_port(ensure_ip(host), port)

    def get_local_address_for(self, loc: str) -> str:
        host, _ = parse_host_port(loc)
        return unparse_host_port(get_ip(ensure_ip(host)), None)
