"""Short-lived certificates, renewed before they expire without interrupting any work.

On a ``pqtls://`` cluster every process holds a certificate of the cluster's CA. A node's
lives as long as the scheduler makes it (``rqml.trust.session.lifetime``, default an hour):
when less than ``renew-when-left`` of its life is left, the node makes a new ML-DSA-65 key
and a certificate signing request (PKCS #10, from ``cryptography``) and sends the request to
the scheduler over its authenticated connection (handler ``rqml_session``). The scheduler,
which holds the CA (``rqml.trust.session.authority``: :class:`~rqml_dask.trust.ca.Authority`),
issues a certificate for the new key with the name, role and hosts of the certificate the
connection was authenticated with (the request brings only the key), valid for
``lifetime``. The node checks what comes back (the CA's signature, its own name, its new key)
and replaces its key and certificate files: its new connections present the new
certificate, its open ones go on (TLS checks a certificate at the handshake; the scheduler
accepts a connection whose certificate expired while a renewal of it is valid), and it signs
with the new key from then on. The scheduler renews its own certificate the same way, from
the CA it holds.

A certificate that expired is refused at every handshake, and the scheduler quarantines a
node connected with one that it did not renew. Every certificate issued to a name is noted
in the CA directory (``issued/NAME.serials``), and ``rqml ca revoke`` revokes them all.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import NameOID

from rqml_dask.trust.ca import key_pem, name_of, write_private, write_public
from rqml_dask.trust.transport import Credentials

logger = logging.getLogger(__name__)


class SessionError(ValueError):
    """A renewed certificate that cannot be used, and why."""


def leaf_certificate(credentials: Credentials) -> x509.Certificate:
    """The certificate ``credentials`` present (the first of their chain)."""
    return x509.load_pem_x509_certificates(credentials.cert.read_bytes())[0]


def life_left(certificate: x509.Certificate, now: dt.datetime | None = None) -> float:
    """The fraction of ``certificate``'s validity still ahead (0 once it has expired)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return max((end - now) / (end - start), 0.0) if end > start else 0.0


def signing_request(name: str) -> tuple[mldsa.MLDSA65PrivateKey, str]:
    """A new ML-DSA-65 key and a PEM request for a certificate of it naming ``name``."""
    key = mldsa.MLDSA65PrivateKey.generate()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, None))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def install(chain_pem: str, key: mldsa.MLDSA65PrivateKey, credentials: Credentials) -> x509.Certificate:
    """Check a renewed certificate chain (issued by the CA of ``credentials`` to the name of
    their current certificate, for ``key``) and write it and ``key`` over ``credentials``'
    files (the key first, mode 0600); the new certificate. Refused (:class:`SessionError`)
    otherwise, and nothing is written."""
    try:
        certificate = x509.load_pem_x509_certificates(chain_pem.encode())[0]
    except (ValueError, IndexError) as exc:
        raise SessionError(f"the renewed certificate cannot be read: {exc}") from None
    ca = x509.load_pem_x509_certificate(credentials.ca.read_bytes())
    try:
        ca.public_key().verify(certificate.signature, certificate.tbs_certificate_bytes)
    except (InvalidSignature, TypeError):
        raise SessionError("the renewed certificate is not from this cluster's CA") from None
    if name_of(certificate) != name_of(leaf_certificate(credentials)):
        raise SessionError(f"the renewed certificate names {name_of(certificate)!r}, not this process")
    if certificate.public_key() != key.public_key():
        raise SessionError("the renewed certificate is not for the key this process asked with")
    write_private(credentials.key, key_pem(key, None))
    write_public(credentials.cert, chain_pem.encode())
    return certificate


@dataclass
class SessionRenewer:
    """Renews the certificate of ``credentials`` through ``ask`` (a PEM request in, a PEM
    chain out) once less than ``renew_when_left`` of its life is left; ``on_renewed`` is
    told of each new certificate. :meth:`check` is what a periodic callback calls."""

    credentials: Credentials
    ask: Callable[[str], Awaitable[str]]
    renew_when_left: float
    on_renewed: Callable[[x509.Certificate], None] = lambda certificate: None
    renewals: int = 0
    last_error: str | None = None
    _busy: bool = False

    async def check(self) -> None:
        if self._busy:
            return
        current = leaf_certificate(self.credentials)
        if life_left(current) > self.renew_when_left:
            return
        self._busy = True
        try:
            key, request = signing_request(name_of(current) or "")
            certificate = install(str(await self.ask(request)), key, self.credentials)
        except Exception as exc:  # refused, or no scheduler now: the current one serves until it expires
            if str(exc) != self.last_error:
                logger.warning("could not renew the certificate of %s (it expires at %s): %s", name_of(current),
                               current.not_valid_after_utc, exc)
            self.last_error = str(exc)
            return
        finally:
            self._busy = False
        self.renewals += 1
        self.last_error = None
        logger.info("renewed the certificate of %s: valid until %s", name_of(certificate), certificate.not_valid_after_utc)
        self.on_renewed(certificate)

    def status(self) -> dict[str, object]:
        """What ``/health`` and ``rqml status`` show of it."""
        current = leaf_certificate(self.credentials)
        return {"expires": current.not_valid_after_utc.timestamp(), "renewals": self.renewals, "error": self.last_error}
