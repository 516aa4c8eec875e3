"""The cluster's Central Authority: an ML-DSA-65 root that issues node, scheduler and client
certificates and revokes them.

A CA directory holds ``ca.pem`` (the root certificate, what every node trusts),
``ca-key.pem`` (its ML-DSA-65 key, mode 0600, encrypted with the passphrase if one is given),
``crl.pem`` (the signed revocation list, rewritten atomically by :func:`revoke`; the pqtls
transport reloads it when it changes), ``issued/NAME.pem`` / ``issued/NAME-key.pem`` for
each credential it issued, and ``issued/NAME.serials``, the serial of every certificate
issued to NAME (its session certificates too, :class:`Authority`). A certificate names its holder (subject CN) and its role (subject
OU: ``node``, ``scheduler`` or ``client``), and its hosts as DNS/IP subject alternative
names. Everything is X.509 from ``cryptography``; nothing here is a protocol of our own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Role = Literal["node", "scheduler", "client"]
ROLES: tuple[Role, ...] = ("node", "scheduler", "client")


class CAError(ValueError):
    """A CA directory, credential or name that cannot be used, and why."""


@dataclass(frozen=True)
class Credential:
    """Where an issued certificate and its key are."""

    name: str
    role: Role
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _encryption(passphrase: str | None) -> serialization.KeySerializationEncryption:
    return serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def key_pem(key: mldsa.MLDSA65PrivateKey, passphrase: str | None) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(passphrase))


def init(directory: Path, name: str = "rqml-ca", passphrase: str | None = None, days: int = 3650) -> Path:
    """Create a CA in ``directory`` (refused if one is there); the root certificate's path."""
    directory = Path(directory)
    if (directory / "ca.pem").exists():
        raise CAError(f"{directory} already holds a CA (ca.pem): refusing to replace it")
    key = mldsa.MLDSA65PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rqml-dask")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    write_private(directory / "ca-key.pem", key_pem(key, passphrase))
    write_public(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write_crl(directory, key, cert, [])
    return directory / "ca.pem"


def _load_ca(directory: Path, passphrase: str | None) -> tuple[mldsa.MLDSA65PrivateKey, x509.Certificate]:
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), passphrase.encode() if passphrase else None)
    except FileNotFoundError as exc:
        raise CAError(f"{directory} is not a CA directory: {exc.filename} is missing (run `rqml ca init {directory}`)") from None
    except (TypeError, ValueError) as exc:
        raise CAError(f"{directory / 'ca-key.pem'} cannot be read: {exc} (wrong or missing passphrase?)") from None
    if not isinstance(key, mldsa.MLDSA65PrivateKey):
        raise CAError(f"{directory / 'ca-key.pem'} is not an ML-DSA-65 key")
    return key, cert


def _host_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _leaf(ca_key: mldsa.MLDSA65PrivateKey, ca_cert: x509.Certificate, public_key: mldsa.MLDSA65PublicKey, name: str,
          role: Role, names: list[x509.GeneralName], not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    """A certificate of this CA binding ``public_key`` to ``name``, ``role`` and ``names``."""
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rqml-dask"),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage, ExtendedKeyUsageOID.CLIENT_AUTH] if role != "client" else [usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, None)
    )


def _record_serial(directory: Path, name: str, serial: int) -> None:
    """Note a serial issued to ``name`` (``issued/NAME.serials``): :func:`revoke` revokes them all."""
    path = Path(directory) / "issued" / f"{name}.serials"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{serial}\n")


def issue(
    directory: Path,
    name: str,
    role: Role,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    hours: float = 24.0 * 365,
    passphrase: str | None = None,
    out: Path | None = None,
) -> Credential:
    """Issue an ML-DSA-65 key and a certificate binding ``name``, ``role`` and ``hosts``
    (IP addresses or DNS names), valid for ``hours``, into ``out`` (default
    ``DIRECTORY/issued``): ``NAME.pem`` (the certificate) and ``NAME-key.pem`` (0600)."""
    if role not in ROLES:
        raise CAError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    if not name or "/" in name or name.startswith("."):
        raise CAError(f"credential name {name!r}: expected a plain file name")
    ca_key, ca_cert = _load_ca(directory, passphrase)
    key = mldsa.MLDSA65PrivateKey.generate()
    now = _now()
    cert = _leaf(ca_key, ca_cert, key.public_key(), name, role, _host_names(hosts),
                 now - dt.timedelta(minutes=5), now + dt.timedelta(hours=hours))
    out = Path(out) if out is not None else Path(directory) / "issued"
    credential = Credential(name, role, out / f"{name}.pem", out / f"{name}-key.pem")
    write_private(credential.key, key_pem(key, None))
    write_public(credential.cert, cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM))
    _record_serial(directory, name, cert.serial_number)
    return credential


SKEW = dt.timedelta(minutes=1)
"""How far before its issue a session certificate is valid (at most a tenth of its lifetime):
clocks of the cluster may differ by this much."""


@dataclass(frozen=True)
class Authority:
    """The CA, loaded once, as the scheduler holds it to issue session certificates."""

    directory: Path
    key: mldsa.MLDSA65PrivateKey
    certificate: x509.Certificate

    @classmethod
    def load(cls, directory: Path, passphrase: str | None = None) -> Authority:
        key, cert = _load_ca(directory, passphrase)
        return cls(Path(directory), key, cert)

    def session(self, csr: x509.CertificateSigningRequest, holder: x509.Certificate, seconds: float) -> bytes:
        """A certificate for the key of ``csr`` with the name, role and hosts of ``holder``
        (the certificate its requester authenticated with: the request only brings the key),
        valid for ``seconds`` from now; the PEM chain (it, then the CA's). Refused
        (:class:`CAError`) if the request's signature or key is not ML-DSA-65, or it names
        another holder."""
        name, role = name_of(holder), role_of(holder)
        if not csr.is_signature_valid:
            raise CAError(f"session request of {name}: its signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, mldsa.MLDSA65PublicKey):
            raise CAError(f"session request of {name}: its key is not an ML-DSA-65 key")
        if name_of_csr(csr) != name:
            raise CAError(f"session request of {name} names {name_of_csr(csr)!r}")
        try:
            names = list(holder.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            names = []
        now = _now()
        lifetime = dt.timedelta(seconds=seconds)
        cert = _leaf(self.key, self.certificate, public_key, name, role, names, now - min(SKEW, lifetime / 10), now + lifetime)
        _record_serial(self.directory, name, cert.serial_number)
        return cert.public_bytes(serialization.Encoding.PEM) + self.certificate.public_bytes(serialization.Encoding.PEM)


def revoke(directory: Path, name: str, passphrase: str | None = None) -> int:
    """Add the certificate issued as ``name``, and every session certificate issued to it
    (``issued/NAME.serials``), to the revocation list and sign it again; the serial number
    of ``issued/NAME.pem``. Transports that trust this CA refuse them from their next
    connection, and the scheduler quarantines a node connected with one."""
    ca_key, ca_cert = _load_ca(directory, passphrase)
    path = Path(directory) / "issued" / f"{name}.pem"
    serials_path = path.with_suffix(".serials")
    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except FileNotFoundError:
        raise CAError(f"{directory} issued no credential named {name!r} ({path} is missing)") from None
    issued = [int(line) for line in serials_path.read_text().split()] if serials_path.is_file() else []
    revoked = [entry.serial_number for entry in load_crl(Path(directory) / "crl.pem")]
    for serial in [cert.serial_number, *issued]:  # its session certificates too
        if serial not in revoked:
            revoked.append(serial)
    _write_crl(directory, ca_key, ca_cert, revoked)
    return cert.serial_number


def load_crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(Path(path).read_bytes())


_revoked: dict[Path, tuple[int, frozenset[int]]] = {}


def revoked_serials(path: Path) -> frozenset[int]:
    """The serial numbers the revocation list at ``path`` revokes, read again only when the
    file changes (every check of a peer or a signature asks)."""
    stamp = Path(path).stat().st_mtime_ns
    cached = _revoked.get(Path(path))
    if cached is None or cached[0] != stamp:
        cached = (stamp, frozenset(entry.serial_number for entry in load_crl(path)))
        _revoked[Path(path)] = cached
    return cached[1]


def _write_crl(directory: Path, key: mldsa.MLDSA65PrivateKey, ca_cert: x509.Certificate, serials: list[int]) -> None:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=365))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(key, None)
    write_public(Path(directory) / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))


def role_of(cert: x509.Certificate) -> str | None:
    """The role a certificate of this CA names (subject OU), or ``None``."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(values[0].value) if values else None


def name_of(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def name_of_csr(csr: x509.CertificateSigningRequest) -> str | None:
    values = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None
