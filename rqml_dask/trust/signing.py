"""Checkpoint records and outcomes signed with the writing node's ML-DSA-65 key, and checked
before they are used.

Over ``pqtls://`` a node signs every checkpoint record it writes (to LMDB, etcd or Consul)
and accepts one to resume from only if the signature verifies. The record's ``hash``
already covers its content (model configuration, artifact digests, supervision state); the
signature binds that hash to the task, the iteration and a timestamp, so whoever can change
a record in a store (and recompute its hash) cannot make it verify. The format, checkable
with plain ``cryptography`` calls:

* ``record.signature`` is ``{"signer": NAME, "certificate": PEM, "signed_at": UNIX_SECONDS,
  "value": HEX}``, left out of the record's hash;
* ``value`` is the ML-DSA-65 signature, by the key of ``certificate``, of
  :func:`signed_message`: the canonical msgpack of ``{"hash", "iteration", "signed_at",
  "task_id"}`` (keys sorted).

An outcome (what a node returns for a task, presents to the scheduler, and records as the
done marker a later run reuses) is signed the same way over its JSON without ``signature``,
then ``|``, the task key, ``|`` and ``repr(signed_at)``: :func:`outcome_message`.

A record is refused (:class:`SignatureError`) when it is unsigned, its certificate was not
issued by the cluster's CA, is revoked in the CA's current list or was not valid when it
signed, its signer is a node the scheduler quarantined (the scheduler tells every node), or
the signature does not verify.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from rqml_dask.checkpoint import CheckpointError, TaskCheckpoint
from rqml_dask.messages import OUTCOME, TaskOutcome
from rqml_dask.trust.ca import name_of, revoked_serials


class SignatureError(CheckpointError):
    """A signed record that does not prove who wrote it: treated like a damaged one."""


def signed_message(task_id: str, iteration: int, record_hash: str, signed_at: float) -> bytes:
    """The bytes a checkpoint signature is over."""
    return msgpack.packb({"hash": record_hash, "iteration": iteration, "signed_at": signed_at, "task_id": task_id})


def outcome_message(outcome: TaskOutcome, key: str, signed_at: float) -> bytes:
    """The bytes an outcome signature is over: the outcome's JSON without its signature,
    the task key and the time it was signed."""
    return OUTCOME.dump_json(replace(outcome, signature=None)) + f"|{key}|{signed_at!r}".encode()


@dataclass(frozen=True)
class Verifier:
    """The CA (and revocation list) signed records are checked against, and the nodes in
    quarantine. Every process of a ``pqtls://`` cluster has one: a node its :class:`Seal`,
    the scheduler plugin its result check."""

    ca: x509.Certificate
    crl: Path | None
    quarantined: dict[str, str] = field(default_factory=dict)
    """Node names in quarantine (name -> reason), kept up to date by the owner: what they
    signed is refused."""

    @classmethod
    def load(cls, ca: Path, crl: Path | None, quarantined: dict[str, str] | None = None) -> Verifier:
        return cls(x509.load_pem_x509_certificate(Path(ca).read_bytes()), crl, quarantined if quarantined is not None else {})

    def verify_outcome(self, outcome: TaskOutcome, key: str) -> str:
        """The signer of ``outcome`` for the task ``key``, or :class:`SignatureError` saying why not."""
        return self._verify(outcome.signature, lambda signed_at: outcome_message(outcome, key, signed_at), "outcomes")

    def verify(self, record: TaskCheckpoint) -> str:
        """The signer's name, or :class:`SignatureError` saying why the record is refused."""
        return self._verify(record.signature,
                            lambda signed_at: signed_message(record.task_id, record.iteration, record.hash, signed_at),
                            "checkpoints")

    def _verify(self, signature: dict | None, message: Callable[[float], bytes], what: str) -> str:
        if not signature:
            raise SignatureError(f"unsigned, on a cluster whose nodes sign their {what}")
        try:
            certificate = x509.load_pem_x509_certificate(str(signature["certificate"]).encode())
            value, signed_at = bytes.fromhex(str(signature["value"])), float(signature["signed_at"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureError(f"malformed signature: {exc}") from None
        signer = name_of(certificate) or "?"
        try:
            self.ca.public_key().verify(certificate.signature, certificate.tbs_certificate_bytes)
        except InvalidSignature:
            raise SignatureError(f"signed by {signer}, whose certificate is not from this cluster's CA") from None
        if certificate.issuer != self.ca.subject:
            raise SignatureError(f"signed by {signer}, whose certificate is not from this cluster's CA")
        when = dt.datetime.fromtimestamp(signed_at, dt.timezone.utc)
        if not certificate.not_valid_before_utc <= when <= certificate.not_valid_after_utc:
            raise SignatureError(f"signed by {signer} at {when:%Y-%m-%d %H:%M:%S} UTC, outside its certificate's validity")
        if self.crl is not None and self.crl.is_file() and certificate.serial_number in revoked_serials(self.crl):
            raise SignatureError(f"signed by {signer}, whose certificate is revoked")
        if (reason := self.quarantined.get(signer)) is not None:
            raise SignatureError(f"signed by {signer}, a node in quarantine ({reason})")
        try:
            certificate.public_key().verify(value, message(signed_at))
        except InvalidSignature:
            raise SignatureError(f"the signature of {signer} does not match the record (changed after it was signed)") from None
        return signer


@dataclass(frozen=True, kw_only=True)
class Seal(Verifier):
    """This node's signing key and certificate, and what it checks other records against."""

    key: mldsa.MLDSA65PrivateKey
    certificate_pem: str
    signer: str

    @classmethod
    def load(cls, ca: Path, cert: Path, key: Path, crl: Path | None,  # type: ignore[override]
             quarantined: dict[str, str] | None = None) -> Seal:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), None)
        if not isinstance(private, mldsa.MLDSA65PrivateKey):
            raise SignatureError(f"{key} is not an ML-DSA-65 key")
        leaf = x509.load_pem_x509_certificates(Path(cert).read_bytes())[0]
        verifier = Verifier.load(ca, crl, quarantined)
        return cls(ca=verifier.ca, crl=crl, quarantined=verifier.quarantined, key=private,
                   certificate_pem=leaf.public_bytes(serialization.Encoding.PEM).decode(), signer=name_of(leaf) or "")

    def sign(self, record: TaskCheckpoint) -> TaskCheckpoint:
        """``record`` with this node's signature over its hash, task, iteration and now."""
        return replace(record, signature=self._signature(
            lambda signed_at: signed_message(record.task_id, record.iteration, record.hash, signed_at)))

    def sign_outcome(self, outcome: TaskOutcome, key: str) -> TaskOutcome:
        """``outcome`` of the task ``key`` signed by this node now (any earlier signature
        replaced): what it presents to the scheduler, returns, and records."""
        unsigned = replace(outcome, signature=None)
        return replace(unsigned, signature=self._signature(lambda signed_at: outcome_message(unsigned, key, signed_at)))

    def _signature(self, message: Callable[[float], bytes]) -> dict[str, str | float]:
        signed_at = time.time()
        return {"signer": self.signer, "certificate": self.certificate_pem, "signed_at": signed_at,
                "value": self.key.sign(message(signed_at)).hex()}
